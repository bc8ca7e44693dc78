//! sendrawtransaction: real checks, RBF, mining threshold.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use bitcoin::{Amount, OutPoint, TxOut, Txid};
use common::{fund, hex, spend, TestKey};
use serde_json::json;

#[test]
fn accepts_signed_spends_and_rejects_like_core() {
    let t = common::start();
    t.mine(101);
    let wkey = TestKey::new(false);
    let tkey = TestKey::new(true);
    let wcoin = fund(&t, &wkey, Amount::from_btc(1.0).unwrap());
    let tcoin = fund(&t, &tkey, Amount::from_btc(1.0).unwrap());
    let bad_coin = fund(&t, &wkey, Amount::from_btc(1.0).unwrap());
    let dest = TestKey::new(false).script();

    // P2WPKH spend.
    let tx1 = spend(&wkey, &wcoin, &dest, 1_000);
    let txid1 = t.call("sendrawtransaction", json!([hex(&tx1)]));
    assert_eq!(txid1, json!(tx1.compute_txid().to_string()));
    // Re-sending a mempool tx succeeds with its txid.
    assert_eq!(t.call("sendrawtransaction", json!([hex(&tx1)])), txid1);
    let entry = t.call("getmempoolentry", json!([txid1]));
    assert_eq!(entry["vsize"], json!(tx1.vsize()));
    assert_eq!(entry["fees"]["base"], json!(0.00001));
    assert_eq!(entry["bip125-replaceable"], json!(true));
    assert_eq!(t.call("getrawmempool", json!([])), json!([txid1]));

    // P2TR key-path spend (needs every spent output for the sighash).
    let tx2 = spend(&tkey, &tcoin, &dest, 500);
    t.call("sendrawtransaction", json!([hex(&tx2)]));
    let accepted = t.call(
        "testmempoolaccept",
        json!([[hex(&spend(&wkey, &bad_coin, &dest, 300))]]),
    );
    assert_eq!(accepted[0]["allowed"], json!(true));

    // Bad signature: the interpreter refuses it.
    let mut bad = spend(&wkey, &bad_coin, &dest, 1_000);
    bad.output[0].value -= Amount::from_sat(10);
    let (code, msg) = t.call_err("sendrawtransaction", json!([hex(&bad)]));
    assert_eq!(code, -26);
    assert!(
        msg.starts_with("mandatory-script-verify-flag-failed"),
        "{msg}"
    );
    // Taproot signature by the wrong key.
    let wrong = spend(
        &TestKey {
            sk: wkey.sk,
            taproot: true,
        },
        &bad_coin,
        &dest,
        1_000,
    );
    assert_eq!(
        t.call_err("sendrawtransaction", json!([hex(&wrong)])).0,
        -26
    );

    // Missing input.
    let ghost = (
        OutPoint {
            txid: Txid::from_byte_array_for_test(),
            vout: 0,
        },
        wcoin.1.clone(),
    );
    let (code, msg) = t.call_err(
        "sendrawtransaction",
        json!([hex(&spend(&wkey, &ghost, &dest, 1_000))]),
    );
    assert_eq!(
        (code, msg.as_str()),
        (-25, "bad-txns-inputs-missingorspent")
    );
    let tm = t.call(
        "testmempoolaccept",
        json!([[hex(&spend(&wkey, &ghost, &dest, 1_000))]]),
    );
    assert_eq!(tm[0]["reject-reason"], json!("missing-inputs"));

    // Fee rules.
    let (code, msg) = t.call_err(
        "sendrawtransaction",
        json!([hex(&spend(&wkey, &bad_coin, &dest, 50))]),
    );
    assert_eq!(code, -26);
    assert!(msg.starts_with("min relay fee not met"), "{msg}");
    let greedy = spend(&wkey, &bad_coin, &dest, 50_000_000);
    let (code, msg) = t.call_err("sendrawtransaction", json!([hex(&greedy)]));
    assert_eq!(code, -25);
    assert!(msg.starts_with("Fee exceeds maximum"), "{msg}");
    t.call("sendrawtransaction", json!([hex(&greedy), 0]));
    t.call("devnet_evict", json!([greedy.compute_txid().to_string()]));

    // Double spend without enough extra fee, then a proper replacement.
    let double = spend(&wkey, &wcoin, &TestKey::new(true).script(), 1_000);
    let (code, msg) = t.call_err("sendrawtransaction", json!([hex(&double)]));
    assert_eq!(code, -26);
    assert!(msg.starts_with("insufficient fee"), "{msg}");
    let replacement = spend(&wkey, &wcoin, &TestKey::new(true).script(), 3_000);
    let rtxid = t.call("sendrawtransaction", json!([hex(&replacement)]));
    let pool = t.call("getrawmempool", json!([]));
    assert!(pool.as_array().unwrap().contains(&rtxid));
    assert!(!pool.as_array().unwrap().contains(&txid1));

    // Once mined, a re-broadcast is -27.
    t.mine(1);
    assert_eq!(t.call("getrawmempool", json!([])), json!([]));
    let (code, msg) = t.call_err("sendrawtransaction", json!([hex(&replacement)]));
    assert_eq!(
        (code, msg.as_str()),
        (-27, "Transaction already in block chain")
    );
    let (code, _) = t.call_err("sendrawtransaction", json!([hex(&tx1)]));
    assert_eq!(code, -25, "the replaced tx's input is spent now");

    // An immature coinbase.
    let cb_key = TestKey::new(false);
    let h = t.call(
        "generatetoaddress",
        json!([1, cb_key.address().to_string()]),
    );
    let block = t.call("getblock", json!([h[0], 1]));
    let cb = t.tx(block["tx"][0].as_str().unwrap());
    let cb_coin = (
        OutPoint {
            txid: cb.compute_txid(),
            vout: 0,
        },
        cb.output[0].clone(),
    );
    let (code, msg) = t.call_err(
        "sendrawtransaction",
        json!([hex(&spend(&cb_key, &cb_coin, &dest, 1_000))]),
    );
    assert_eq!(code, -26);
    assert!(
        msg.starts_with("bad-txns-premature-spend-of-coinbase"),
        "{msg}"
    );
}

trait ForTest {
    fn from_byte_array_for_test() -> Self;
}

impl ForTest for Txid {
    fn from_byte_array_for_test() -> Self {
        use bitcoin::hashes::Hash;
        Txid::from_byte_array([7; 32])
    }
}

#[test]
fn mining_fee_threshold_leaves_low_fee_tx_in_mempool() {
    let t = common::start();
    t.mine(101);
    let key = TestKey::new(false);
    let coin = fund(&t, &key, Amount::from_btc(0.5).unwrap());
    let low = spend(&key, &coin, &TestKey::new(false).script(), 200); // ~1.8 sat/vB
    let txid = t.call("sendrawtransaction", json!([hex(&low)]));
    t.call("devnet_setminingfeerate", json!([10]));
    t.mine(2);
    assert_eq!(t.call("getrawmempool", json!([])), json!([txid]));
    // Bumping it by RBF gets it mined.
    let bumped = spend(&key, &coin, &TestKey::new(false).script(), 2_000);
    let bumped_id = t.call("sendrawtransaction", json!([hex(&bumped)]));
    let mined = t.mine(1);
    let block = t.call("getblock", json!([mined[0]]));
    assert!(block["tx"].as_array().unwrap().contains(&bumped_id));
    assert_eq!(t.call("getrawmempool", json!([])), json!([]));
    let _ = TxOut::NULL;
}

#[test]
fn wallet_sends_and_reports_balance() {
    let t = common::start();
    assert_eq!(
        t.call_err(
            "sendtoaddress",
            json!([TestKey::new(false).address().to_string(), 1])
        )
        .0,
        -6
    );
    t.mine(101);
    assert_eq!(t.call("getbalance", json!([])), json!(50.0));
    // The later sends spend the unconfirmed change of the earlier ones, as Core's wallet does.
    for kind in ["legacy", "p2sh-segwit", "bech32", "bech32m"] {
        let addr = t.call("getnewaddress", json!(["", kind]));
        t.call("sendtoaddress", json!([addr, 1]));
    }
    assert_eq!(
        t.call("getrawmempool", json!([])).as_array().unwrap().len(),
        4
    );
    let balance = t.call("getbalance", json!([])).as_f64().unwrap();
    assert!(balance > 49.99 && balance < 50.0, "{balance}");
    t.mine(1);
    assert_eq!(t.call("getrawmempool", json!([])), json!([]));
}

#[test]
fn transactions_of_invalidated_blocks_return_to_the_mempool() {
    let t = common::start();
    t.mine(101);
    let addr = t.call("getnewaddress", json!([]));
    let txid = t.call("sendtoaddress", json!([addr, 2]));
    let mined = t.mine(1);
    assert_eq!(t.call("getrawmempool", json!([])), json!([]));
    t.call("invalidateblock", json!([mined[0]]));
    assert_eq!(t.call("getrawmempool", json!([])), json!([txid]));
    let raw = t.call("getrawtransaction", json!([txid, true]));
    assert!(raw.get("blockhash").is_none());
    t.mine(1);
    let raw = t.call("getrawtransaction", json!([txid, true]));
    assert_eq!(raw["confirmations"], json!(1));
}

#[test]
fn replacement_publishes_r_then_a() {
    let t = common::start();
    t.mine(101);
    let key = TestKey::new(true);
    let coin = fund(&t, &key, Amount::from_btc(0.3).unwrap());
    let first = spend(&key, &coin, &TestKey::new(false).script(), 1_000);
    t.call("sendrawtransaction", json!([hex(&first)]));
    let sub = common::subscribe(&t.node);
    let second = spend(&key, &coin, &TestKey::new(false).script(), 5_000);
    t.call("sendrawtransaction", json!([hex(&second)]));
    let msgs: Vec<_> = common::drain(&sub, 500)
        .into_iter()
        .filter(|m| m[0] == b"sequence")
        .map(|m| (m[1][32], m[1][..32].to_vec()))
        .collect();
    assert_eq!(
        msgs,
        vec![
            (b'R', common::display(&first.compute_txid().to_string())),
            (b'A', common::display(&second.compute_txid().to_string())),
        ]
    );
}
