//! Signatures that external signers send back: each is checked against the pending
//! transaction (a key of that input, a signature that verifies for its sighash, SIGHASH_ALL;
//! ECDSA for P2WSH and P2WPKH, Schnorr for the taproot key path)
//! and only then copied into the PSBT gathered so far. Nothing else of what they send is
//! taken, so a bad or foreign PSBT is refused and changes nothing.

use bitcoin::key::XOnlyPublicKey;
use bitcoin::secp256k1::{Message, Secp256k1, Verification};
use bitcoin::sighash::{EcdsaSighashType, Prevouts, SighashCache, TapSighashType};
use bitcoin::{Psbt, TxOut};

/// Why submitted signatures were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CosignError {
    /// Not a PSBT.
    #[error("not a PSBT: {0}")]
    Decode(String),
    /// A PSBT of another transaction.
    #[error("the PSBT is of transaction {theirs}, not of the pending {ours}")]
    OtherTransaction {
        /// Its txid.
        theirs: bitcoin::Txid,
        /// The pending one's.
        ours: bitcoin::Txid,
    },
    /// A signature that cannot be used.
    #[error("input {input}: {detail}")]
    BadSignature {
        /// The input.
        input: usize,
        /// Why.
        detail: String,
    },
    /// No signature in it that was not there already.
    #[error("the PSBT holds no new signature")]
    Nothing,
}

fn bad(input: usize, detail: impl Into<String>) -> CosignError {
    CosignError::BadSignature {
        input,
        detail: detail.into(),
    }
}

/// The pending PSBT `ours` (serialized) with the verified signatures of `submitted`
/// added; how many were new.
pub fn add_signatures(ours: &[u8], submitted: &[u8]) -> Result<(Vec<u8>, usize), CosignError> {
    let mut ours = Psbt::deserialize(ours).map_err(|e| CosignError::Decode(e.to_string()))?;
    let theirs = Psbt::deserialize(submitted).map_err(|e| CosignError::Decode(e.to_string()))?;
    if theirs.unsigned_tx != ours.unsigned_tx {
        return Err(CosignError::OtherTransaction {
            theirs: theirs.unsigned_tx.compute_txid(),
            ours: ours.unsigned_tx.compute_txid(),
        });
    }
    let secp = Secp256k1::verification_only();
    let prevouts: Vec<TxOut> = ours
        .inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            input
                .witness_utxo
                .clone()
                .ok_or_else(|| bad(i, "the pending PSBT lacks its witness_utxo"))
        })
        .collect::<Result<_, _>>()?;
    let mut cache = SighashCache::new(&ours.unsigned_tx);
    let mut added = Vec::new();
    for (i, input) in theirs.inputs.iter().enumerate() {
        if input.final_script_witness.is_some() || input.final_script_sig.is_some() {
            return Err(bad(
                i,
                "finalized by the signer: send the signatures unfinalized (partial_sigs, tap_key_sig)",
            ));
        }
        if !input.tap_script_sigs.is_empty() {
            return Err(bad(
                i,
                "taproot script-path signatures are not taken (key path only)",
            ));
        }
        for (key, sig) in &input.partial_sigs {
            if ours.inputs[i].partial_sigs.get(key) == Some(sig) {
                continue;
            }
            if !ours.inputs[i].bip32_derivation.contains_key(&key.inner) {
                return Err(bad(i, format!("key {key} is not one of this input's")));
            }
            if sig.sighash_type != EcdsaSighashType::All {
                return Err(bad(
                    i,
                    format!("sighash {} (only ALL is taken)", sig.sighash_type),
                ));
            }
            let (value, spent) = (prevouts[i].value, &prevouts[i].script_pubkey);
            let sighash = match &ours.inputs[i].witness_script {
                Some(script) => cache
                    .p2wsh_signature_hash(i, script, value, sig.sighash_type)
                    .map_err(|e| bad(i, e.to_string())),
                // A single-key wallet (an offline cold key): the key must be the one the
                // output commits to.
                None if spent.is_p2wpkh() => {
                    let hash = key
                        .wpubkey_hash()
                        .map_err(|_| bad(i, format!("key {key} is uncompressed")))?;
                    if *spent != bitcoin::ScriptBuf::new_p2wpkh(&hash) {
                        return Err(bad(i, format!("key {key} is not the one this output pays")));
                    }
                    cache
                        .p2wpkh_signature_hash(i, spent, value, sig.sighash_type)
                        .map_err(|e| bad(i, e.to_string()))
                }
                None => {
                    return Err(bad(
                        i,
                        "an ECDSA signature for an input that is neither P2WSH nor P2WPKH",
                    ))
                }
            }?;
            secp.verify_ecdsa(&Message::from(sighash), &sig.signature, &key.inner)
                .map_err(|_| bad(i, format!("the signature of key {key} does not verify")))?;
            added.push((i, Added::Ecdsa(*key, *sig)));
        }
        if let Some(sig) = input.tap_key_sig {
            if ours.inputs[i].tap_key_sig == Some(sig) {
                continue;
            }
            verify_key_path(&secp, &mut cache, &prevouts, i, &sig)?;
            added.push((i, Added::KeyPath(sig)));
        }
    }
    if added.is_empty() {
        return Err(CosignError::Nothing);
    }
    let count = added.len();
    for (i, a) in added {
        match a {
            Added::Ecdsa(key, sig) => {
                ours.inputs[i].partial_sigs.insert(key, sig);
            }
            Added::KeyPath(sig) => ours.inputs[i].tap_key_sig = Some(sig),
        }
    }
    Ok((ours.serialize(), count))
}

/// A verified signature to copy.
enum Added {
    Ecdsa(bitcoin::PublicKey, bitcoin::ecdsa::Signature),
    KeyPath(bitcoin::taproot::Signature),
}

/// Checks a taproot key-path signature of input `i` against its output key.
fn verify_key_path<C: Verification>(
    secp: &Secp256k1<C>,
    cache: &mut SighashCache<&bitcoin::Transaction>,
    prevouts: &[TxOut],
    i: usize,
    sig: &bitcoin::taproot::Signature,
) -> Result<(), CosignError> {
    if !matches!(
        sig.sighash_type,
        TapSighashType::Default | TapSighashType::All
    ) {
        return Err(bad(
            i,
            format!("sighash {} (only ALL is taken)", sig.sighash_type),
        ));
    }
    let script = &prevouts[i].script_pubkey;
    if !script.is_p2tr() {
        return Err(bad(
            i,
            "a taproot signature for an input that is not taproot",
        ));
    }
    let output_key =
        XOnlyPublicKey::from_slice(&script.as_bytes()[2..34]).map_err(|e| bad(i, e.to_string()))?;
    let sighash = cache
        .taproot_key_spend_signature_hash(i, &Prevouts::All(prevouts), sig.sighash_type)
        .map_err(|e| bad(i, e.to_string()))?;
    secp.verify_schnorr(&sig.signature, &Message::from(sighash), &output_key)
        .map_err(|_| bad(i, "the taproot signature does not verify"))
}
