//! A hot wallet described by an output descriptor of public keys (`wsh(sortedmulti(k,
//! xpub...))`, `tr(xpub)` key path, `wpkh(xpub)`...): the scripts it pays to up to a
//! range, the derivation of each, what a signed input weighs, the PSBT fields signers need,
//! and finalizing once enough signatures are there. Private keys stay with the signers.

use std::collections::HashMap;
use std::str::FromStr;

use bitcoin::secp256k1::{All, Secp256k1};
use bitcoin::{Network, NetworkKind, Psbt, ScriptBuf};
use miniscript::descriptor::DescriptorPublicKey;
use miniscript::psbt::PsbtExt;
use miniscript::{Descriptor, ForEachKey};

/// Outpoint, sequence and an empty script_sig's length byte, as weight, and the witness's
/// item count (1 weight unit): miniscript's `max_weight_to_satisfy` is what a satisfaction
/// adds to an input whose empty witness already has that count, so it leaves it out.
/// (Without it a P2WPKH input weighed 271, one short: a payment at the relay floor was
/// refused for 1 sat.)
const INPUT_BASE_WEIGHT: u64 = (32 + 4 + 4 + 1) * 4 + 1;

/// A descriptor that cannot describe the hot wallet.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// It does not parse (a threshold above its keys, a bad checksum, private keys...).
    #[error("descriptor {descriptor:?}: {detail}")]
    Invalid {
        /// The text given.
        descriptor: String,
        /// What is wrong.
        detail: String,
    },
    /// A key is of another network.
    #[error("descriptor {descriptor:?} has keys of another network than {network}")]
    WrongNetwork {
        /// The text given.
        descriptor: String,
        /// The orchestrator's network.
        network: Network,
    },
}

/// The hot wallet's descriptor and the scripts it stands for.
pub struct DescriptorWallet {
    descriptor: Descriptor<DescriptorPublicKey>,
    /// Each derived script, by its derivation index.
    by_script: HashMap<ScriptBuf, u32>,
    input_weight: u64,
    secp: Secp256k1<All>,
}

impl std::fmt::Debug for DescriptorWallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DescriptorWallet({}, {} scripts)",
            self.descriptor,
            self.by_script.len()
        )
    }
}

impl DescriptorWallet {
    /// Parses `text` (public keys of `network`; a checksum after `#` is checked) and
    /// derives its first `range` scripts (one for a descriptor without `*`).
    pub fn parse(text: &str, network: Network, range: u32) -> Result<Self, DescriptorError> {
        let invalid = |detail: String| DescriptorError::Invalid {
            descriptor: text.to_owned(),
            detail,
        };
        let descriptor = Descriptor::<DescriptorPublicKey>::from_str(text).map_err(|e| {
            let mut detail = e.to_string();
            if text.contains("prv") {
                detail.push_str(" (give public keys, xpubs: private keys go in the key file)");
            }
            invalid(detail)
        })?;
        if descriptor.is_multipath() {
            return Err(invalid(
                "a multipath descriptor (<a;b>): give the one path the wallet pays to".into(),
            ));
        }
        let kind = NetworkKind::from(network);
        let same_network = descriptor.for_each_key(|k| match k {
            DescriptorPublicKey::XPub(x) => x.xkey.network == kind,
            DescriptorPublicKey::MultiXPub(x) => x.xkey.network == kind,
            DescriptorPublicKey::Single(_) => true,
        });
        if !same_network {
            return Err(DescriptorError::WrongNetwork {
                descriptor: text.to_owned(),
                network,
            });
        }
        let satisfaction = descriptor
            .max_weight_to_satisfy()
            .map_err(|e| invalid(format!("cannot be spent: {e}")))?;
        let count = if descriptor.has_wildcard() {
            range.max(1)
        } else {
            1
        };
        let mut by_script = HashMap::with_capacity(count as usize);
        for index in 0..count {
            let definite = descriptor
                .at_derivation_index(index)
                .map_err(|e| invalid(format!("deriving index {index}: {e}")))?;
            by_script.insert(definite.script_pubkey(), index);
        }
        Ok(DescriptorWallet {
            descriptor,
            by_script,
            input_weight: INPUT_BASE_WEIGHT + satisfaction.to_wu(),
            secp: Secp256k1::new(),
        })
    }

    /// Every script derived: the coins a withdrawal may spend.
    pub fn scripts(&self) -> Vec<ScriptBuf> {
        self.by_script.keys().cloned().collect()
    }

    /// The script at derivation `index` (any index, derived now; `None` past the
    /// non-hardened range).
    pub fn script_at(&self, index: u32) -> Option<ScriptBuf> {
        let definite = self.descriptor.at_derivation_index(index).ok()?;
        Some(definite.script_pubkey())
    }

    /// Whether `script` is one of the wallet's.
    pub fn contains(&self, script: &ScriptBuf) -> bool {
        self.by_script.contains_key(script)
    }

    /// The weight of one of its inputs once signed (the largest satisfaction).
    pub fn input_weight(&self) -> u64 {
        self.input_weight
    }

    /// Fills input `i` of `psbt` (its `witness_utxo` set) with what signers need: the
    /// witness script, the keys' derivations, taproot's internal key.
    pub fn describe_input(&self, psbt: &mut Psbt, i: usize) -> Result<(), String> {
        let script = psbt.inputs[i]
            .witness_utxo
            .as_ref()
            .map(|o| o.script_pubkey.clone())
            .ok_or_else(|| format!("input {i}: no witness_utxo"))?;
        let index = self
            .by_script
            .get(&script)
            .ok_or_else(|| format!("input {i}: not a script of the wallet's descriptor"))?;
        let definite = self
            .descriptor
            .at_derivation_index(*index)
            .map_err(|e| e.to_string())?;
        psbt.update_input_with_descriptor(i, &definite)
            .map_err(|e| format!("input {i}: {e}"))
    }

    /// Finalizes every input of `psbt` (descriptor inputs from their signatures); fails,
    /// leaving `psbt` unchanged, while signatures are missing or one does not verify.
    pub fn finalize(&self, psbt: &mut Psbt) -> Result<(), String> {
        let mut done = psbt.clone();
        done.finalize_mut(&self.secp).map_err(|errors| {
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        *psbt = done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::bip32::{Xpriv, Xpub};

    fn xpub(seed: u8, network: Network) -> String {
        let secp = Secp256k1::new();
        let xpriv = Xpriv::new_master(network, &[seed; 32]).unwrap();
        Xpub::from_priv(&secp, &xpriv).to_string()
    }

    fn multi(k: usize, network: Network) -> String {
        let keys: Vec<String> = (1..=3)
            .map(|s| format!("{}/0/*", xpub(s, network)))
            .collect();
        format!("wsh(sortedmulti({k},{}))", keys.join(","))
    }

    #[test]
    fn a_multisig_descriptor_derives_its_range_and_weighs_its_witness() {
        let w = DescriptorWallet::parse(&multi(2, Network::Regtest), Network::Regtest, 20).unwrap();
        assert_eq!(w.scripts().len(), 20);
        assert!(w.scripts().iter().all(|s| s.is_p2wsh()));
        // 164 outside the witness, then (1 weight unit a byte) two signatures of up to 73
        // bytes, the empty push, the 105-byte script and their lengths.
        assert!(
            (410..=425).contains(&w.input_weight()),
            "{}",
            w.input_weight()
        );
        let tr = format!("tr({}/0/*)", xpub(4, Network::Regtest));
        let t = DescriptorWallet::parse(&tr, Network::Regtest, 5).unwrap();
        assert!(t.scripts().iter().all(|s| s.is_p2tr()));
        assert_eq!(t.input_weight(), INPUT_BASE_WEIGHT + 66);
        // A single key: the witness count, a 73-byte signature push and a 34-byte key push,
        // as the P2WPKH key file's wallet weighs it.
        let wpkh = format!("wpkh({}/0/*)", xpub(4, Network::Regtest));
        let k = DescriptorWallet::parse(&wpkh, Network::Regtest, 5).unwrap();
        assert_eq!(k.input_weight(), crate::select::P2WPKH_INPUT_WEIGHT);
    }

    #[test]
    fn another_network_a_threshold_above_its_keys_and_private_keys_are_refused() {
        let e =
            DescriptorWallet::parse(&multi(2, Network::Bitcoin), Network::Regtest, 5).unwrap_err();
        assert!(matches!(e, DescriptorError::WrongNetwork { .. }), "{e}");
        let e = DescriptorWallet::parse(&multi(4, Network::Regtest), Network::Regtest, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("wsh(sortedmulti(4,"), "{e}");
        let xpriv = Xpriv::new_master(Network::Regtest, &[9; 32]).unwrap();
        let e = DescriptorWallet::parse(&format!("wpkh({xpriv}/0/*)"), Network::Regtest, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("private keys go in the key file"), "{e}");
        let e = DescriptorWallet::parse("wsh(nonsense)", Network::Regtest, 5)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("descriptor \"wsh(nonsense)\""), "{e}");
    }
}
