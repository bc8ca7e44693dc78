//! Mempool acceptance: Core's checks, in Core's order, with Core's reject reasons.

use std::collections::HashSet;

use bitcoin::consensus::serialize;
use bitcoin::{Amount, OutPoint, Transaction, TxOut, Txid};

use crate::chain::{Chain, COINBASE_MATURITY};
use crate::json::btc_string;
use crate::mempool::Mempool;

/// Script flags Core's mempool enforces that libbitcoinconsensus can check.
const SCRIPT_FLAGS: u32 = bitcoinconsensus::VERIFY_P2SH
    | bitcoinconsensus::VERIFY_DERSIG
    | bitcoinconsensus::VERIFY_NULLDUMMY
    | bitcoinconsensus::VERIFY_CHECKLOCKTIMEVERIFY
    | bitcoinconsensus::VERIFY_CHECKSEQUENCEVERIFY
    | bitcoinconsensus::VERIFY_WITNESS
    | bitcoinconsensus::VERIFY_TAPROOT;

/// Core's `-maxtxreplacement`-style cap on evicted transactions.
const MAX_REPLACEMENT_CANDIDATES: usize = 100;

/// A refused transaction: RPC error code, short reason (testmempoolaccept) and message.
#[derive(Debug, Clone)]
pub(crate) struct Reject {
    /// JSON-RPC error code (-25, -26 or -27).
    pub code: i32,
    /// The reject reason as `testmempoolaccept` shows it.
    pub reason: String,
    /// The message `sendrawtransaction` answers.
    pub message: String,
}

impl Reject {
    fn new(code: i32, reason: &str, detail: Option<String>) -> Reject {
        let message = match detail {
            Some(d) => format!("{reason}, {d}"),
            None => reason.to_string(),
        };
        Reject {
            code,
            reason: reason.to_string(),
            message,
        }
    }

    fn policy(reason: &str, detail: Option<String>) -> Reject {
        Reject::new(-26, reason, detail)
    }
}

/// Which checks apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Skip fee and replacement rules (re-adding transactions of disconnected blocks).
    pub bypass_fees: bool,
    /// Run the script interpreter.
    pub check_scripts: bool,
    /// `maxfeerate` in sat/kvB; `None` or 0 for no limit.
    pub max_fee_rate: Option<u64>,
}

/// A transaction that passed every check.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    /// Its txid.
    pub txid: Txid,
    /// Its fee.
    pub fee: Amount,
    /// Its virtual size.
    pub vsize: u64,
    /// Its weight.
    pub weight: u64,
    /// Mempool transactions it replaces, with their descendants.
    pub evict: Vec<Txid>,
}

fn prevout(chain: &Chain, mempool: &Mempool, op: &OutPoint) -> Option<(TxOut, Option<u32>)> {
    if let Some(coin) = chain.coin(op) {
        return Some((coin.txout.clone(), coin.coinbase.then_some(coin.height)));
    }
    mempool
        .get(&op.txid)
        .and_then(|e| e.tx.output.get(op.vout as usize).cloned())
        .map(|out| (out, None))
}

/// Checks a transaction against the chain and mempool without changing either.
pub(crate) fn check(
    chain: &Chain,
    mempool: &Mempool,
    tx: &Transaction,
    policy: &Policy,
) -> Result<Checked, Reject> {
    let txid = tx.compute_txid();
    // Like Core, which looks at the UTXO set, not a transaction index: a transaction is
    // "already in block chain" while one of its outputs is unspent; once all are spent it
    // is refused for its missing inputs instead.
    let unspent = (0..tx.output.len() as u32).any(|vout| {
        chain
            .utxos()
            .contains_key(&bitcoin::OutPoint::new(txid, vout))
    });
    if unspent {
        return Err(Reject {
            code: -27,
            reason: "txn-already-known".into(),
            message: "Transaction already in block chain".into(),
        });
    }
    if tx.input.is_empty() {
        return Err(Reject::policy("bad-txns-vin-empty", None));
    }
    if tx.output.is_empty() {
        return Err(Reject::policy("bad-txns-vout-empty", None));
    }
    if tx.is_coinbase() {
        return Err(Reject::policy("coinbase", None));
    }
    let weight = tx.weight().to_wu();
    if weight > 400_000 {
        return Err(Reject::policy("tx-size", None));
    }
    let mut seen = HashSet::new();
    if !tx.input.iter().all(|i| seen.insert(i.previous_output)) {
        return Err(Reject::policy("bad-txns-inputs-duplicate", None));
    }

    let mut conflicts = Vec::new();
    let mut spent = Vec::with_capacity(tx.input.len());
    let spend_height = chain.height() + 1;
    for input in &tx.input {
        let op = &input.previous_output;
        if let Some(spender) = mempool.spender(op) {
            if !conflicts.contains(&spender) {
                conflicts.push(spender);
            }
        }
        let Some((out, coinbase_height)) = prevout(chain, mempool, op) else {
            return Err(Reject {
                code: -25,
                reason: "missing-inputs".into(),
                message: "bad-txns-inputs-missingorspent".into(),
            });
        };
        if let Some(h) = coinbase_height {
            if spend_height - h < COINBASE_MATURITY {
                return Err(Reject::policy(
                    "bad-txns-premature-spend-of-coinbase",
                    Some(format!(
                        "tried to spend coinbase at depth {}",
                        spend_height - h
                    )),
                ));
            }
        }
        spent.push(out);
    }
    let value_in: Amount = spent.iter().map(|o| o.value).sum();
    let value_out: Amount = tx.output.iter().map(|o| o.value).sum();
    let Some(fee) = value_in.checked_sub(value_out) else {
        return Err(Reject::policy(
            "bad-txns-in-belowout",
            Some(format!(
                "value in ({}) < value out ({})",
                btc_string(value_in),
                btc_string(value_out)
            )),
        ));
    };
    let vsize = tx.vsize() as u64;
    if !policy.bypass_fees && fee.to_sat() < vsize {
        return Err(Reject::policy(
            "min relay fee not met",
            Some(format!("{} < {}", fee.to_sat(), vsize)),
        ));
    }

    let evict = if conflicts.is_empty() {
        Vec::new()
    } else if policy.bypass_fees {
        return Err(Reject::policy("txn-mempool-conflict", None));
    } else {
        check_replacement(mempool, tx, txid, fee, vsize, &conflicts)?
    };

    if policy.check_scripts {
        verify_scripts(tx, &spent)?;
    }

    if let Some(max) = policy.max_fee_rate.filter(|m| *m > 0) {
        if u128::from(fee.to_sat()) * 1000 > u128::from(max) * u128::from(vsize) {
            return Err(Reject {
                code: -25,
                reason: "max-fee-exceeded".into(),
                message: "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)"
                    .into(),
            });
        }
    }
    Ok(Checked {
        txid,
        fee,
        vsize,
        weight,
        evict,
    })
}

/// BIP125 rules as Core 28 applies them with full RBF: signalling is not required.
fn check_replacement(
    mempool: &Mempool,
    tx: &Transaction,
    txid: Txid,
    fee: Amount,
    vsize: u64,
    conflicts: &[Txid],
) -> Result<Vec<Txid>, Reject> {
    let mut evict: Vec<Txid> = conflicts.to_vec();
    for c in conflicts {
        for d in mempool.descendants(c) {
            if !evict.contains(&d) {
                evict.push(d);
            }
        }
    }
    if evict.len() > MAX_REPLACEMENT_CANDIDATES {
        return Err(Reject::policy(
            "too many potential replacements",
            Some(format!("rejecting replacement {txid}; too many potential replacements ({} > {MAX_REPLACEMENT_CANDIDATES})", evict.len())),
        ));
    }
    if tx
        .input
        .iter()
        .any(|i| evict.contains(&i.previous_output.txid))
    {
        return Err(Reject::policy(
            "bad-txns-spends-conflicting-tx",
            Some(format!("{txid} spends conflicting transaction")),
        ));
    }
    let mut allowed_parents = HashSet::new();
    for c in conflicts {
        if let Some(e) = mempool.get(c) {
            allowed_parents.extend(mempool.parents(&e.tx));
        }
    }
    for (i, input) in tx.input.iter().enumerate() {
        let parent = input.previous_output.txid;
        if mempool.contains(&parent) && !allowed_parents.contains(&parent) {
            return Err(Reject::policy(
                "replacement-adds-unconfirmed",
                Some(format!(
                    "replacement {txid} adds unconfirmed input, idx {i}"
                )),
            ));
        }
    }
    for c in conflicts {
        let Some(old) = mempool.get(c) else { continue };
        // new feerate <= old feerate, compared without division.
        if u128::from(fee.to_sat()) * u128::from(old.vsize)
            <= u128::from(old.fee.to_sat()) * u128::from(vsize)
        {
            return Err(Reject::policy(
                "insufficient fee",
                Some(format!(
                    "rejecting replacement {txid}; new feerate {} BTC/kvB <= old feerate {} BTC/kvB",
                    btc_string(Amount::from_sat(fee.to_sat() * 1000 / vsize.max(1))),
                    btc_string(Amount::from_sat(old.fee.to_sat() * 1000 / old.vsize.max(1)))
                )),
            ));
        }
    }
    let replaced_fees: Amount = evict
        .iter()
        .filter_map(|t| mempool.get(t))
        .map(|e| e.fee)
        .sum();
    if fee < replaced_fees {
        return Err(Reject::policy(
            "insufficient fee",
            Some(format!(
                "rejecting replacement {txid}, less fees than conflicting txs; {} < {}",
                btc_string(fee),
                btc_string(replaced_fees)
            )),
        ));
    }
    let additional = fee - replaced_fees;
    if additional.to_sat() < vsize {
        return Err(Reject::policy(
            "insufficient fee",
            Some(format!(
                "rejecting replacement {txid}, not enough additional fees to relay; {} < {}",
                btc_string(additional),
                btc_string(Amount::from_sat(vsize))
            )),
        ));
    }
    Ok(evict)
}

/// Runs Bitcoin Core's script interpreter on every input.
pub(crate) fn verify_scripts(tx: &Transaction, spent: &[TxOut]) -> Result<(), Reject> {
    let raw = serialize(tx);
    let utxos: Vec<bitcoinconsensus::Utxo> = spent
        .iter()
        .map(|o| bitcoinconsensus::Utxo {
            script_pubkey: o.script_pubkey.as_bytes().as_ptr(),
            script_pubkey_len: o.script_pubkey.len() as u32,
            value: o.value.to_sat() as i64,
        })
        .collect();
    for (i, out) in spent.iter().enumerate() {
        let result = bitcoinconsensus::verify_with_flags(
            out.script_pubkey.as_bytes(),
            out.value.to_sat(),
            &raw,
            Some(&utxos),
            i,
            SCRIPT_FLAGS,
        );
        if let Err(e) = result {
            return Err(Reject::policy(
                "mandatory-script-verify-flag-failed",
                Some(match e {
                    bitcoinconsensus::Error::ERR_SCRIPT => {
                        format!("script evaluation failed on input {i}")
                    }
                    other => format!("{other} on input {i}"),
                }),
            )
            .with_parenthesized_detail());
        }
    }
    Ok(())
}

impl Reject {
    /// Core writes script failures as `reason (detail)`, not `reason, detail`.
    fn with_parenthesized_detail(mut self) -> Reject {
        if let Some((reason, detail)) = self.message.split_once(", ") {
            self.message = format!("{reason} ({detail})");
        }
        self
    }
}
