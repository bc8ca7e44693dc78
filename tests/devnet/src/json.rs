//! Core's JSON shapes for amounts, headers, blocks and transactions.

use bitcoin::consensus::encode::serialize_hex;
use bitcoin::hex::DisplayHex;
use bitcoin::{Address, Amount, Network, Transaction};
use serde_json::{json, Value};

use crate::chain::{BlockEntry, Chain};

/// An amount as a JSON number of BTC.
pub(crate) fn btc(amount: Amount) -> Value {
    json!(amount.to_sat() as f64 / 100_000_000.0)
}

/// An amount as Core's `FormatMoney` writes it in messages (trailing zeros trimmed to two).
pub(crate) fn btc_string(amount: Amount) -> String {
    let sat = amount.to_sat();
    let mut s = format!("{}.{:08}", sat / 100_000_000, sat % 100_000_000);
    while s.ends_with('0') && s.len() - s.find('.').unwrap_or(0) > 3 {
        s.pop();
    }
    s
}

/// A BTC JSON number (or numeric string) as satoshis, rounded.
pub(crate) fn parse_btc(value: &Value) -> Option<Amount> {
    let f = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.parse::<f64>().ok()?,
        _ => return None,
    };
    if !f.is_finite() || f < 0.0 {
        return None;
    }
    Some(Amount::from_sat((f * 100_000_000.0).round() as u64))
}

/// `getblockheader`'s verbose object.
pub(crate) fn header_json(chain: &Chain, entry: &BlockEntry) -> Value {
    let h = &entry.block.header;
    let active = chain.is_active(&entry.hash);
    let confirmations: i64 = if active {
        i64::from(chain.height()) - i64::from(entry.height) + 1
    } else {
        -1
    };
    let mut v = json!({
        "hash": entry.hash.to_string(),
        "confirmations": confirmations,
        "height": entry.height,
        "version": h.version.to_consensus(),
        "versionHex": format!("{:08x}", h.version.to_consensus()),
        "merkleroot": h.merkle_root.to_string(),
        "time": h.time,
        "mediantime": chain.median_time_past(&entry.hash),
        "nonce": h.nonce,
        "bits": format!("{:08x}", h.bits.to_consensus()),
        "difficulty": h.difficulty_float(),
        "chainwork": entry.chainwork.to_be_bytes().to_lower_hex_string(),
        "nTx": entry.block.txdata.len(),
    });
    if entry.height > 0 {
        v["previousblockhash"] = json!(h.prev_blockhash.to_string());
    }
    if active {
        if let Some(next) = chain.at_height(entry.height + 1) {
            v["nextblockhash"] = json!(next.hash.to_string());
        }
    }
    v
}

/// `getblock`'s object for verbosity 1 (txids) or 2 (decoded transactions).
pub(crate) fn block_json(chain: &Chain, entry: &BlockEntry, verbosity: u64) -> Value {
    let mut v = header_json(chain, entry);
    let block = &entry.block;
    v["size"] = json!(block.total_size());
    v["strippedsize"] = json!((block.weight().to_wu() as usize - block.total_size()) / 3);
    v["weight"] = json!(block.weight().to_wu());
    v["tx"] = if verbosity >= 2 {
        Value::Array(block.txdata.iter().map(tx_json).collect())
    } else {
        Value::Array(
            block
                .txdata
                .iter()
                .map(|t| json!(t.compute_txid().to_string()))
                .collect(),
        )
    };
    v
}

/// `decoderawtransaction`'s object, with `hex`.
pub(crate) fn tx_json(tx: &Transaction) -> Value {
    let vin: Vec<Value> = tx
        .input
        .iter()
        .map(|i| {
            if tx.is_coinbase() {
                json!({
                    "coinbase": i.script_sig.as_bytes().to_lower_hex_string(),
                    "txinwitness": i.witness.iter().map(|w| w.to_lower_hex_string()).collect::<Vec<_>>(),
                    "sequence": i.sequence.0,
                })
            } else {
                let mut v = json!({
                    "txid": i.previous_output.txid.to_string(),
                    "vout": i.previous_output.vout,
                    "scriptSig": {
                        "asm": i.script_sig.to_asm_string(),
                        "hex": i.script_sig.as_bytes().to_lower_hex_string(),
                    },
                    "sequence": i.sequence.0,
                });
                if !i.witness.is_empty() {
                    v["txinwitness"] =
                        json!(i.witness.iter().map(|w| w.to_lower_hex_string()).collect::<Vec<_>>());
                }
                v
            }
        })
        .collect();
    let vout: Vec<Value> = tx
        .output
        .iter()
        .enumerate()
        .map(|(n, o)| {
            let mut spk = json!({
                "asm": o.script_pubkey.to_asm_string(),
                "hex": o.script_pubkey.as_bytes().to_lower_hex_string(),
                "type": script_type(&o.script_pubkey),
            });
            if let Ok(addr) = Address::from_script(&o.script_pubkey, Network::Regtest) {
                spk["address"] = json!(addr.to_string());
            }
            json!({ "value": btc(o.value), "n": n, "scriptPubKey": spk })
        })
        .collect();
    json!({
        "txid": tx.compute_txid().to_string(),
        "hash": tx.compute_wtxid().to_string(),
        "version": tx.version.0,
        "size": tx.total_size(),
        "vsize": tx.vsize(),
        "weight": tx.weight().to_wu(),
        "locktime": tx.lock_time.to_consensus_u32(),
        "vin": vin,
        "vout": vout,
        "hex": serialize_hex(tx),
    })
}

fn script_type(s: &bitcoin::Script) -> &'static str {
    if s.is_p2pkh() {
        "pubkeyhash"
    } else if s.is_p2sh() {
        "scripthash"
    } else if s.is_p2wpkh() {
        "witness_v0_keyhash"
    } else if s.is_p2wsh() {
        "witness_v0_scripthash"
    } else if s.is_p2tr() {
        "witness_v1_taproot"
    } else if s.is_op_return() {
        "nulldata"
    } else if s.is_p2pk() {
        "pubkey"
    } else if s.is_multisig() {
        "multisig"
    } else {
        "nonstandard"
    }
}
