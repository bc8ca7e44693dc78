//! Signing withdrawals. The executor hands a PSBT to a [`Signer`]; the default one holds
//! the wallet's private keys from a key file, and an HSM or remote signer fits behind the
//! same trait. Keys never reach a log: the signer's `Debug` shows only how many it holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bitcoin::bip32::Xpriv;
use bitcoin::key::{CompressedPublicKey, PrivateKey};
use bitcoin::secp256k1::{All, Message, Secp256k1};
use bitcoin::sighash::{EcdsaSighashType, SighashCache};
use bitcoin::NetworkKind;
use bitcoin::{Network, Psbt, ScriptBuf, Witness};

/// Why signing failed; nothing was signed when it is returned.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The key file could not be read.
    #[error("key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Others may read the key file.
    #[error("key file {path} is readable by group or others (mode {mode:o}): chmod 600 it")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not a WIF key of the network.
    #[error("key file {path}, line {line}: {detail}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// 1-based line number (the key itself is never shown).
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// An input lacks what signing needs or pays a script this signer cannot sign.
    #[error("input {input}: {detail}")]
    Input {
        /// Its index.
        input: usize,
        /// What is wrong.
        detail: String,
    },
}

/// Signs a withdrawal's PSBT: a P2WPKH input it holds the key for gets a final witness;
/// an input of a descriptor wallet (its derivations in the PSBT) gets this signer's
/// signatures, finalized once there are enough (see `descriptor_wallet`).
pub trait Signer: Send + Sync {
    /// Signs the inputs it can; returns how many. An input it cannot sign is an error
    /// only when it holds the key for its script but the input is unusable.
    fn sign(&self, psbt: &mut Psbt) -> Result<usize, SignError>;

    /// The scripts it can sign for: the coins a withdrawal may spend.
    fn scripts(&self) -> Vec<ScriptBuf>;
}

/// Holds no key: the signer of a wallet whose keys are all offline (the cold wallet), so
/// every payment from it waits for its external signers, whatever the key file holds.
pub struct Offline;

impl Signer for Offline {
    fn sign(&self, _psbt: &mut Psbt) -> Result<usize, SignError> {
        Ok(0)
    }

    fn scripts(&self) -> Vec<ScriptBuf> {
        Vec::new()
    }
}

/// Keys from a file of private keys, one per line (`#` starts a comment), which only its
/// owner may read: WIF keys sign P2WPKH inputs; extended keys (xprv/tprv) sign a
/// descriptor wallet's inputs whose derivations they hold (a hot cosigner of a multisig).
pub struct KeyFileSigner {
    secp: Secp256k1<All>,
    by_script: HashMap<ScriptBuf, PrivateKey>,
    xprivs: Vec<Xpriv>,
}

impl std::fmt::Debug for KeyFileSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyFileSigner({} keys, {} extended keys)",
            self.by_script.len(),
            self.xprivs.len()
        )
    }
}

impl KeyFileSigner {
    /// Loads `path`, refusing a file others can read and keys of another network.
    pub fn open(path: &Path, network: Network) -> Result<KeyFileSigner, SignError> {
        use std::os::unix::fs::PermissionsExt;
        let read_err = |source| SignError::Read {
            path: path.to_owned(),
            source,
        };
        let mode = std::fs::metadata(path)
            .map_err(read_err)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(SignError::Exposed {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let secp = Secp256k1::new();
        let mut by_script = HashMap::new();
        let mut xprivs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |detail: String| SignError::BadKey {
                path: path.to_owned(),
                line: i + 1,
                detail,
            };
            if let Ok(xpriv) = line.parse::<Xpriv>() {
                if xpriv.network != NetworkKind::from(network) {
                    return Err(bad(format!(
                        "an extended key of another network than {network}"
                    )));
                }
                xprivs.push(xpriv);
                continue;
            }
            let key = PrivateKey::from_wif(line)
                .map_err(|_| bad("neither a WIF private key nor an extended one".into()))?;
            if key.network != NetworkKind::from(network) {
                return Err(bad(format!("a key of another network than {network}")));
            }
            if !key.compressed {
                return Err(bad(
                    "an uncompressed key (P2WPKH needs compressed ones)".into()
                ));
            }
            let public = CompressedPublicKey(key.public_key(&secp).inner);
            by_script.insert(ScriptBuf::new_p2wpkh(&public.wpubkey_hash()), key);
        }
        Ok(KeyFileSigner {
            secp,
            by_script,
            xprivs,
        })
    }
}

/// Writes a new key file at `path` holding one fresh key of `network` (created with mode
/// 600, never over an existing file) and returns the P2WPKH address it signs for.
pub fn generate_key_file(path: &Path, network: Network) -> Result<bitcoin::Address, SignError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secp = Secp256k1::new();
    let (secret, _) = secp.generate_keypair(&mut bitcoin::secp256k1::rand::thread_rng());
    let key = PrivateKey::new(secret, network);
    let public = CompressedPublicKey(key.public_key(&secp).inner);
    let address = bitcoin::Address::p2wpkh(&public, network);
    let write_err = |source| SignError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_err)?;
    let written = writeln!(file, "# {address}\n{}", key.to_wif()).and_then(|()| file.sync_all());
    if let Err(e) = written {
        // A partial file would block the next attempt (never overwritten) and sign nothing.
        let _ = std::fs::remove_file(path);
        return Err(write_err(e));
    }
    Ok(address)
}

impl Signer for KeyFileSigner {
    fn scripts(&self) -> Vec<ScriptBuf> {
        self.by_script.keys().cloned().collect()
    }

    fn sign(&self, psbt: &mut Psbt) -> Result<usize, SignError> {
        // Compute every signature first, then write: all or nothing.
        let mut witnesses = Vec::new();
        {
            let mut cache = SighashCache::new(&psbt.unsigned_tx);
            for (i, input) in psbt.inputs.iter().enumerate() {
                let err = |detail: &str| SignError::Input {
                    input: i,
                    detail: detail.into(),
                };
                let Some(prev) = &input.witness_utxo else {
                    return Err(err("no witness_utxo: the spent output is needed to sign"));
                };
                let Some(key) = self.by_script.get(&prev.script_pubkey) else {
                    continue; // another signer's input
                };
                let sighash = cache
                    .p2wpkh_signature_hash(
                        i,
                        &prev.script_pubkey,
                        prev.value,
                        EcdsaSighashType::All,
                    )
                    .map_err(|e| err(&e.to_string()))?;
                let signature = bitcoin::ecdsa::Signature {
                    signature: self.secp.sign_ecdsa(&Message::from(sighash), &key.inner),
                    sighash_type: EcdsaSighashType::All,
                };
                let public = key.public_key(&self.secp).inner;
                witnesses.push((i, Witness::p2wpkh(&signature, &public)));
            }
        }
        let mut signed: std::collections::BTreeSet<usize> =
            witnesses.iter().map(|(i, _)| *i).collect();
        for (i, witness) in witnesses {
            psbt.inputs[i].final_script_witness = Some(witness);
        }
        for xpriv in &self.xprivs {
            // Inputs without a derivation of this key are skipped; an input it cannot
            // sign is reported among the errors, but the others are signed.
            let used = match psbt.sign(xpriv, &self.secp) {
                Ok(used) => used,
                Err((used, _)) => used,
            };
            signed.extend(used.keys());
        }
        Ok(signed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::absolute::LockTime;
    use bitcoin::hashes::Hash;
    use bitcoin::transaction::Version;
    use bitcoin::{Amount, OutPoint, Sequence, Transaction, TxIn, TxOut, Txid};

    fn key_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("keys");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn regtest_key(byte: u8) -> PrivateKey {
        let sk = bitcoin::secp256k1::SecretKey::from_slice(&[byte; 32]).unwrap();
        PrivateKey::new(sk, NetworkKind::Test)
    }

    #[test]
    fn key_files_must_be_private_of_the_network_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let wif = regtest_key(1).to_wif();
        let open = key_file(dir.path(), &format!("# hot wallet\n{wif}\n"), 0o644);
        let err = KeyFileSigner::open(&open, Network::Regtest).unwrap_err();
        assert!(matches!(err, SignError::Exposed { .. }), "{err}");
        let ok = key_file(
            dir.path(),
            &format!("# hot wallet\n{wif}  # key 1\n\n"),
            0o600,
        );
        let signer = KeyFileSigner::open(&ok, Network::Regtest).unwrap();
        assert_eq!(signer.scripts().len(), 1);
        assert_eq!(
            format!("{signer:?}"),
            "KeyFileSigner(1 keys, 0 extended keys)"
        );
        let err = KeyFileSigner::open(&ok, Network::Bitcoin).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(!err.to_string().contains(&wif), "the key is never shown");
        let garbage = key_file(dir.path(), "not-a-key\n", 0o600);
        assert!(matches!(
            KeyFileSigner::open(&garbage, Network::Regtest),
            Err(SignError::BadKey { line: 1, .. })
        ));
    }

    #[test]
    fn signs_its_own_inputs_and_leaves_others() {
        let dir = tempfile::tempdir().unwrap();
        let key = regtest_key(2);
        let path = key_file(dir.path(), &key.to_wif(), 0o600);
        let signer = KeyFileSigner::open(&path, Network::Regtest).unwrap();
        let ours = signer.scripts()[0].clone();
        let theirs = ScriptBuf::new_p2wpkh(
            &CompressedPublicKey(regtest_key(3).public_key(&Secp256k1::new()).inner).wpubkey_hash(),
        );
        let input = |n: u8| TxIn {
            previous_output: OutPoint::new(Txid::from_byte_array([n; 32]), 0),
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::new(),
        };
        let tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![input(1), input(2)],
            output: vec![TxOut {
                value: Amount::from_sat(90_000),
                script_pubkey: theirs.clone(),
            }],
        };
        let mut psbt = Psbt::from_unsigned_tx(tx).unwrap();
        psbt.inputs[0].witness_utxo = Some(TxOut {
            value: Amount::from_sat(60_000),
            script_pubkey: ours,
        });
        psbt.inputs[1].witness_utxo = Some(TxOut {
            value: Amount::from_sat(50_000),
            script_pubkey: theirs,
        });
        assert_eq!(signer.sign(&mut psbt).unwrap(), 1);
        let witness = psbt.inputs[0].final_script_witness.as_ref().unwrap();
        assert_eq!(witness.len(), 2);
        assert!(psbt.inputs[1].final_script_witness.is_none());
        // Without the spent output there is nothing to sign against.
        psbt.inputs[0].witness_utxo = None;
        assert!(matches!(
            signer.sign(&mut psbt),
            Err(SignError::Input { input: 0, .. })
        ));
    }

    #[test]
    fn a_generated_key_file_is_private_signs_for_its_address_and_is_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hot.keys");
        let address = generate_key_file(&path, Network::Regtest).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let signer = KeyFileSigner::open(&path, Network::Regtest).unwrap();
        assert_eq!(signer.scripts(), vec![address.script_pubkey()]);
        let before = std::fs::read(&path).unwrap();
        assert!(generate_key_file(&path, Network::Regtest).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn extended_keys_sign_what_their_derivations_name_and_must_be_of_the_network() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let mainnet = Xpriv::new_master(Network::Bitcoin, &[3; 32]).unwrap();
        std::fs::write(&path, format!("# cosigner\n{mainnet}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = KeyFileSigner::open(&path, Network::Regtest).unwrap_err();
        assert!(
            e.to_string()
                .contains("line 2: an extended key of another network"),
            "{e}"
        );
        let regtest = Xpriv::new_master(Network::Regtest, &[3; 32]).unwrap();
        std::fs::write(&path, format!("{regtest}\n")).unwrap();
        let signer = KeyFileSigner::open(&path, Network::Regtest).unwrap();
        assert_eq!(
            format!("{signer:?}"),
            "KeyFileSigner(0 keys, 1 extended keys)"
        );
        assert!(!format!("{signer:?}").contains("prv"), "keys never shown");
    }
}
