//! The node's own keys: addresses for `getnewaddress`, coins for `sendtoaddress` and fillers.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use bitcoin::hashes::{sha256, Hash};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::key::{Keypair, TapTweak};
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::secp256k1::{All, Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, Prevouts, SighashCache, TapSighashType};
use bitcoin::{
    ecdsa, taproot, Address, CompressedPublicKey, KnownHrp, Network, ScriptBuf, Transaction, TxOut,
    Witness,
};
use rand::{Rng, RngCore};

use crate::error::{io_err, Result};

/// Keys reserved for filler outputs, so the wallet stays small whatever is mined.
const FILLER_KEYS: u32 = 8;

/// The address types `getnewaddress` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddrKind {
    /// P2WPKH (`bech32`, the default).
    Bech32,
    /// P2TR key path (`bech32m`).
    Bech32m,
    /// P2PKH (`legacy`).
    Legacy,
    /// P2SH-P2WPKH (`p2sh-segwit`).
    P2shSegwit,
}

impl AddrKind {
    /// Every kind.
    pub(crate) const ALL: [AddrKind; 4] = [
        AddrKind::Bech32,
        AddrKind::Bech32m,
        AddrKind::Legacy,
        AddrKind::P2shSegwit,
    ];

    /// The kind for Core's `address_type` argument.
    pub(crate) fn from_name(name: &str) -> Option<AddrKind> {
        match name {
            "bech32" => Some(AddrKind::Bech32),
            "bech32m" => Some(AddrKind::Bech32m),
            "legacy" => Some(AddrKind::Legacy),
            "p2sh-segwit" => Some(AddrKind::P2shSegwit),
            _ => None,
        }
    }

    /// vbytes a signed input of this kind adds, for fee estimates before signing.
    pub(crate) fn input_vsize(self) -> u64 {
        match self {
            AddrKind::Bech32 => 68,
            AddrKind::Bech32m => 58,
            AddrKind::Legacy => 148,
            AddrKind::P2shSegwit => 91,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    seed: String,
    next: u32,
}

/// Deterministic keys from a seed kept in the data directory, so a restart keeps the coins.
pub(crate) struct Wallet {
    secp: Secp256k1<All>,
    seed: [u8; 32],
    next: u32,
    path: PathBuf,
    scripts: HashMap<ScriptBuf, (SecretKey, AddrKind)>,
    filler: Vec<ScriptBuf>,
}

impl Wallet {
    /// Loads the wallet file, or creates one with a random seed.
    pub(crate) fn open(path: &Path) -> Result<Wallet> {
        let (seed, next) = match fs::read(path) {
            Ok(bytes) => {
                let stored: Option<Stored> = serde_json::from_slice(&bytes).ok();
                let parsed = stored.and_then(|s| {
                    <[u8; 32]>::from_hex(&s.seed)
                        .ok()
                        .map(|seed| (seed, s.next))
                });
                match parsed {
                    Some(p) => p,
                    None => {
                        return Err(crate::Error::CorruptBlockFile {
                            path: path.into(),
                            reason: "unreadable wallet file".into(),
                        })
                    }
                }
            }
            Err(_) => {
                let mut seed = [0u8; 32];
                rand::thread_rng().fill_bytes(&mut seed);
                (seed, 0)
            }
        };
        let mut wallet = Wallet {
            secp: Secp256k1::new(),
            seed,
            next,
            path: path.into(),
            scripts: HashMap::new(),
            filler: Vec::new(),
        };
        for i in 0..next {
            let sk = wallet.derive("receive", i);
            wallet.register(sk);
        }
        for i in 0..FILLER_KEYS {
            let sk = wallet.derive("filler", i);
            let scripts = wallet.register(sk);
            wallet.filler.extend(scripts);
        }
        wallet.save()?;
        Ok(wallet)
    }

    fn save(&self) -> Result<()> {
        let stored = Stored {
            seed: self.seed.to_lower_hex_string(),
            next: self.next,
        };
        let bytes = serde_json::to_vec(&stored).unwrap_or_default();
        fs::write(&self.path, bytes).map_err(io_err(&self.path))
    }

    fn derive(&self, domain: &str, index: u32) -> SecretKey {
        let mut data = self.seed.to_vec();
        data.extend_from_slice(domain.as_bytes());
        data.extend_from_slice(&index.to_le_bytes());
        let mut counter = 0u8;
        loop {
            let mut attempt = data.clone();
            attempt.push(counter);
            let digest = sha256::Hash::hash(&attempt);
            // A digest of zero or beyond the curve order is astronomically unlikely; retry.
            if let Ok(sk) = SecretKey::from_slice(digest.as_byte_array()) {
                return sk;
            }
            counter = counter.wrapping_add(1);
        }
    }

    fn address_of(&self, sk: &SecretKey, kind: AddrKind) -> Address {
        let pk = CompressedPublicKey(sk.public_key(&self.secp));
        match kind {
            AddrKind::Bech32 => Address::p2wpkh(&pk, KnownHrp::Regtest),
            AddrKind::Bech32m => {
                let (xonly, _) = sk.x_only_public_key(&self.secp);
                Address::p2tr(&self.secp, xonly, None, KnownHrp::Regtest)
            }
            AddrKind::Legacy => Address::p2pkh(pk, Network::Regtest),
            AddrKind::P2shSegwit => Address::p2shwpkh(&pk, Network::Regtest),
        }
    }

    /// Makes every script type of a key ours; returns the scripts.
    fn register(&mut self, sk: SecretKey) -> Vec<ScriptBuf> {
        AddrKind::ALL
            .iter()
            .map(|&kind| {
                let spk = self.address_of(&sk, kind).script_pubkey();
                self.scripts.insert(spk.clone(), (sk, kind));
                spk
            })
            .collect()
    }

    /// A fresh receiving address.
    pub(crate) fn new_address(&mut self, kind: AddrKind) -> Result<Address> {
        let sk = self.derive("receive", self.next);
        self.next += 1;
        self.register(sk);
        self.save()?;
        Ok(self.address_of(&sk, kind))
    }

    /// Whether an output script belongs to the wallet.
    pub(crate) fn is_mine(&self, spk: &ScriptBuf) -> bool {
        self.scripts.contains_key(spk)
    }

    /// The kind of one of the wallet's scripts.
    pub(crate) fn kind_of(&self, spk: &ScriptBuf) -> Option<AddrKind> {
        self.scripts.get(spk).map(|(_, k)| *k)
    }

    /// A random filler script of a random type.
    pub(crate) fn filler_script(&self, rng: &mut impl Rng) -> ScriptBuf {
        self.filler[rng.gen_range(0..self.filler.len())].clone()
    }

    /// Signs every input whose spent output is ours. `prevouts` are all spent outputs, in
    /// input order (taproot signs all of them).
    pub(crate) fn sign(
        &self,
        tx: &mut Transaction,
        prevouts: &[TxOut],
    ) -> std::result::Result<(), String> {
        let mut signed = Vec::with_capacity(tx.input.len());
        {
            let mut cache = SighashCache::new(&*tx);
            for (i, prev) in prevouts.iter().enumerate() {
                let Some((sk, kind)) = self.scripts.get(&prev.script_pubkey) else {
                    continue;
                };
                let pk = sk.public_key(&self.secp);
                let cpk = CompressedPublicKey(pk);
                let ecdsa_sig = |msg: Message| ecdsa::Signature {
                    signature: self.secp.sign_ecdsa(&msg, sk),
                    sighash_type: EcdsaSighashType::All,
                };
                let (script_sig, witness) = match kind {
                    AddrKind::Bech32 | AddrKind::P2shSegwit => {
                        let wpkh = ScriptBuf::new_p2wpkh(&cpk.wpubkey_hash());
                        let hash = cache
                            .p2wpkh_signature_hash(i, &wpkh, prev.value, EcdsaSighashType::All)
                            .map_err(|e| e.to_string())?;
                        let sig = ecdsa_sig(Message::from_digest(hash.to_byte_array()));
                        let script_sig = if *kind == AddrKind::P2shSegwit {
                            let push = PushBytesBuf::try_from(wpkh.to_bytes())
                                .map_err(|e| e.to_string())?;
                            Builder::new().push_slice(push).into_script()
                        } else {
                            ScriptBuf::new()
                        };
                        (script_sig, Witness::p2wpkh(&sig, &pk))
                    }
                    AddrKind::Legacy => {
                        let hash = cache
                            .legacy_signature_hash(
                                i,
                                &prev.script_pubkey,
                                EcdsaSighashType::All.to_u32(),
                            )
                            .map_err(|e| e.to_string())?;
                        let sig = ecdsa_sig(Message::from_digest(hash.to_byte_array()));
                        let script_sig = Builder::new()
                            .push_slice(sig.serialize())
                            .push_key(&bitcoin::PublicKey::new(pk))
                            .into_script();
                        (script_sig, Witness::new())
                    }
                    AddrKind::Bech32m => {
                        let hash = cache
                            .taproot_key_spend_signature_hash(
                                i,
                                &Prevouts::All(prevouts),
                                TapSighashType::Default,
                            )
                            .map_err(|e| e.to_string())?;
                        let keypair = Keypair::from_secret_key(&self.secp, sk)
                            .tap_tweak(&self.secp, None)
                            .to_keypair();
                        let msg = Message::from_digest(hash.to_byte_array());
                        let sig = taproot::Signature {
                            signature: self.secp.sign_schnorr(&msg, &keypair),
                            sighash_type: TapSighashType::Default,
                        };
                        (ScriptBuf::new(), Witness::p2tr_key_spend(&sig))
                    }
                };
                signed.push((i, script_sig, witness));
            }
        }
        for (i, script_sig, witness) in signed {
            tx.input[i].script_sig = script_sig;
            tx.input[i].witness = witness;
        }
        Ok(())
    }
}
