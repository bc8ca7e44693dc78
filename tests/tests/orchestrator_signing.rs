//! The key-file signer against the devnet's script interpreter (libbitcoinconsensus): a
//! PSBT spending a coin the devnet paid to the key is signed, and the node accepts it.

#![allow(clippy::unwrap_used)]

use std::str::FromStr;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hex::{DisplayHex, FromHex};
use bitcoin::key::{CompressedPublicKey, PrivateKey};
use bitcoin::secp256k1::Secp256k1;
use bitcoin::transaction::Version;
use bitcoin::NetworkKind;
use bitcoin::{Address, Amount, Network, OutPoint, Psbt, Sequence, Transaction, TxIn, TxOut};
use orchestrator::signer::{KeyFileSigner, Signer};
use serde_json::json;
use system_tests::live::Devnet;

#[test]
fn a_signed_withdrawal_passes_the_nodes_script_checks() {
    use std::os::unix::fs::PermissionsExt;
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);

    let secp = Secp256k1::new();
    let key = PrivateKey::new(
        bitcoin::secp256k1::SecretKey::from_slice(&[7; 32]).unwrap(),
        NetworkKind::Test,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hot.keys");
    std::fs::write(&path, format!("{}\n", key.to_wif())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let signer = KeyFileSigner::open(&path, Network::Regtest).unwrap();

    let ours = Address::p2wpkh(
        &CompressedPublicKey(key.public_key(&secp).inner),
        Network::Regtest,
    );
    let txid = node.call("sendtoaddress", json!([ours.to_string(), 0.5]));
    node.mine_to(1, &miner);
    let raw = node.call("getrawtransaction", json!([txid]));
    let funding: Transaction =
        deserialize(&Vec::<u8>::from_hex(raw.as_str().unwrap()).unwrap()).unwrap();
    let vout = funding
        .output
        .iter()
        .position(|o| o.script_pubkey == ours.script_pubkey())
        .unwrap();

    let destination = Address::from_str(&node.new_address("bech32m"))
        .unwrap()
        .require_network(Network::Regtest)
        .unwrap();
    let tx = Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(funding.compute_txid(), vout as u32),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            ..TxIn::default()
        }],
        output: vec![TxOut {
            value: Amount::from_sat(49_990_000),
            script_pubkey: destination.script_pubkey(),
        }],
    };
    let mut psbt = Psbt::from_unsigned_tx(tx).unwrap();
    psbt.inputs[0].witness_utxo = Some(funding.output[vout].clone());
    assert_eq!(signer.sign(&mut psbt).unwrap(), 1);
    let unsigned = psbt.unsigned_tx.clone();
    let signed = psbt.extract_tx_unchecked_fee_rate();
    let hex = serialize(&signed).to_lower_hex_string();
    let verdict = node.call("testmempoolaccept", json!([[hex]]));
    assert_eq!(verdict[0]["allowed"], json!(true), "{verdict}");

    // A signature over other amounts fails the node's script check.
    let mut wrong = Psbt::from_unsigned_tx(unsigned).unwrap();
    let mut lied = funding.output[vout].clone();
    lied.value = Amount::from_sat(60_000_000);
    wrong.inputs[0].witness_utxo = Some(lied);
    signer.sign(&mut wrong).unwrap();
    let bad = serialize(&wrong.extract_tx_unchecked_fee_rate()).to_lower_hex_string();
    let verdict = node.call("testmempoolaccept", json!([[bad]]));
    assert_eq!(verdict[0]["allowed"], json!(false), "{verdict}");
}
