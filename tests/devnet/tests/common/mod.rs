//! Shared helpers for the devnet tests: a node in a temp dir, a client, keys that sign.
#![allow(dead_code, clippy::unwrap_used)]

use std::str::FromStr;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::hashes::Hash;
use bitcoin::key::{Keypair, TapTweak};
use bitcoin::secp256k1::{Message, Secp256k1, SecretKey};
use bitcoin::sighash::{EcdsaSighashType, Prevouts, SighashCache, TapSighashType};
use bitcoin::{
    ecdsa, taproot, Address, Amount, CompressedPublicKey, KnownHrp, OutPoint, ScriptBuf, Sequence,
    Transaction, TxIn, TxOut, Txid, Witness,
};
use devnet::client::{ClientError, RpcClient};
use devnet::{Config, Node, NodeHandle};
use serde_json::{json, Value};

pub struct TestNode {
    pub node: NodeHandle,
    pub rpc: RpcClient,
    pub dir: tempfile::TempDir,
}

pub fn start_with(f: impl FnOnce(&mut Config)) -> TestNode {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::new(dir.path());
    config.filler_txs = 0;
    f(&mut config);
    let node = Node::start(config).unwrap();
    let rpc = match node.cookie_file() {
        Some(cookie) => RpcClient::with_cookie(&node.rpc_url(), &cookie).unwrap(),
        None => RpcClient::new(&node.rpc_url(), None),
    };
    TestNode { node, rpc, dir }
}

pub fn start() -> TestNode {
    start_with(|_| {})
}

impl TestNode {
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.rpc
            .call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    pub fn call_err(&self, method: &str, params: Value) -> (i64, String) {
        match self.rpc.call(method, params) {
            Err(ClientError::Rpc { code, message }) => (code, message),
            other => panic!("{method}: expected an RPC error, got {other:?}"),
        }
    }

    /// Mines to a fresh wallet address.
    pub fn mine(&self, n: u32) -> Vec<String> {
        let addr = self.call("getnewaddress", json!([]));
        let hashes = self.call("generatetoaddress", json!([n, addr]));
        hashes
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect()
    }

    pub fn tx(&self, txid: &str) -> Transaction {
        let hex = self.call("getrawtransaction", json!([txid]));
        deserialize_hex(hex.as_str().unwrap()).unwrap()
    }
}

/// A key the test holds, able to receive and sign P2WPKH or P2TR spends.
pub struct TestKey {
    pub sk: SecretKey,
    pub taproot: bool,
}

impl TestKey {
    pub fn new(taproot: bool) -> TestKey {
        TestKey {
            sk: SecretKey::new(&mut rand::thread_rng()),
            taproot,
        }
    }

    pub fn address(&self) -> Address {
        let secp = Secp256k1::new();
        if self.taproot {
            let (x, _) = self.sk.x_only_public_key(&secp);
            Address::p2tr(&secp, x, None, KnownHrp::Regtest)
        } else {
            Address::p2wpkh(
                &CompressedPublicKey(self.sk.public_key(&secp)),
                KnownHrp::Regtest,
            )
        }
    }

    pub fn script(&self) -> ScriptBuf {
        self.address().script_pubkey()
    }

    /// Signs input `i` of `tx` (all prevouts given).
    pub fn sign(&self, tx: &mut Transaction, i: usize, prevouts: &[TxOut]) {
        let secp = Secp256k1::new();
        let mut cache = SighashCache::new(&*tx);
        let witness = if self.taproot {
            let h = cache
                .taproot_key_spend_signature_hash(
                    i,
                    &Prevouts::All(prevouts),
                    TapSighashType::Default,
                )
                .unwrap();
            let kp = Keypair::from_secret_key(&secp, &self.sk)
                .tap_tweak(&secp, None)
                .to_keypair();
            let sig = secp.sign_schnorr(&Message::from_digest(h.to_byte_array()), &kp);
            Witness::p2tr_key_spend(&taproot::Signature {
                signature: sig,
                sighash_type: TapSighashType::Default,
            })
        } else {
            let h = cache
                .p2wpkh_signature_hash(
                    i,
                    &prevouts[i].script_pubkey,
                    prevouts[i].value,
                    EcdsaSighashType::All,
                )
                .unwrap();
            let sig = secp.sign_ecdsa(&Message::from_digest(h.to_byte_array()), &self.sk);
            Witness::p2wpkh(
                &ecdsa::Signature {
                    signature: sig,
                    sighash_type: EcdsaSighashType::All,
                },
                &self.sk.public_key(&secp),
            )
        };
        tx.input[i].witness = witness;
    }
}

/// Funds `key` with `amount` from the node wallet and confirms it; returns the coin.
pub fn fund(t: &TestNode, key: &TestKey, amount: Amount) -> (OutPoint, TxOut) {
    let txid = t.call(
        "sendtoaddress",
        json!([key.address().to_string(), amount.to_btc()]),
    );
    let txid = Txid::from_str(txid.as_str().unwrap()).unwrap();
    t.mine(1);
    let tx = t.tx(&txid.to_string());
    let vout = tx
        .output
        .iter()
        .position(|o| o.script_pubkey == key.script())
        .unwrap();
    (
        OutPoint {
            txid,
            vout: vout as u32,
        },
        tx.output[vout].clone(),
    )
}

/// A one-input one-output spend of `coin` paying `fee` to `to`, signed by `key`.
pub fn spend(key: &TestKey, coin: &(OutPoint, TxOut), to: &ScriptBuf, fee: u64) -> Transaction {
    let mut tx = Transaction {
        version: bitcoin::transaction::Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: coin.0,
            script_sig: ScriptBuf::new(),
            sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
            witness: Witness::new(),
        }],
        output: vec![TxOut {
            value: coin.1.value - Amount::from_sat(fee),
            script_pubkey: to.clone(),
        }],
    };
    key.sign(&mut tx, 0, std::slice::from_ref(&coin.1));
    tx
}

pub fn hex(tx: &Transaction) -> String {
    serialize_hex(tx)
}

/// A SUB socket subscribed to every topic of the node (one shared endpoint).
pub fn subscribe(node: &NodeHandle) -> zmq::Socket {
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).unwrap();
    sub.set_rcvtimeo(3000).unwrap();
    sub.connect(&node.zmq_endpoint(devnet::Topic::RawBlock).unwrap())
        .unwrap();
    for t in devnet::Topic::ALL {
        sub.set_subscribe(t.name().as_bytes()).unwrap();
    }
    // Slow joiner: a PUB drops what is sent before the subscription reaches it.
    std::thread::sleep(std::time::Duration::from_millis(300));
    sub
}

/// Receives messages until `n` arrived or a timeout.
pub fn receive(sub: &zmq::Socket, n: usize) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while out.len() < n {
        match sub.recv_multipart(0) {
            Ok(m) => out.push(m),
            Err(_) => break,
        }
    }
    out
}

/// Receives every message until none arrives for `quiet_ms`.
pub fn drain(sub: &zmq::Socket, quiet_ms: i32) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    sub.set_rcvtimeo(quiet_ms).unwrap();
    while let Ok(m) = sub.recv_multipart(0) {
        out.push(m);
    }
    sub.set_rcvtimeo(3000).unwrap();
    out
}

/// A hash string (display order) as the bytes ZMQ sends.
pub fn display(hash: &str) -> Vec<u8> {
    use bitcoin::hex::FromHex;
    Vec::<u8>::from_hex(hash).unwrap()
}
