//! ZMQ notifications: frames, per-topic sequence numbers, byte order, reorgs, faults.

#![allow(clippy::unwrap_used)] // helpers outside #[test] fns

mod common;

use std::collections::HashMap;

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Block, Transaction};
use common::{display, drain, subscribe};
use serde_json::json;

type Msg = Vec<Vec<u8>>;

fn topic(m: &Msg) -> &str {
    std::str::from_utf8(&m[0]).unwrap()
}

fn seq(m: &Msg) -> u32 {
    u32::from_le_bytes(m[2].as_slice().try_into().unwrap())
}

/// (label, hash) of the `sequence` messages for blocks.
fn block_sequence(msgs: &[Msg]) -> Vec<(char, Vec<u8>)> {
    msgs.iter()
        .filter(|m| topic(m) == "sequence" && m[1].len() == 33)
        .map(|m| (m[1][32] as char, m[1][..32].to_vec()))
        .collect()
}

fn of_topic<'a>(msgs: &'a [Msg], t: &str) -> Vec<&'a Msg> {
    msgs.iter().filter(|m| topic(m) == t).collect()
}

#[test]
fn frames_sequence_numbers_byte_order_and_mempool_events() {
    let t = common::start();
    let sub = subscribe(&t.node);
    let hashes = t.mine(101);
    let msgs = drain(&sub, 700);
    assert_eq!(
        msgs.len(),
        101 * 5,
        "rawtx, hashtx, sequence C, hashblock, rawblock per block"
    );
    let mut next: HashMap<String, u32> = HashMap::new();
    for m in &msgs {
        assert_eq!(m.len(), 3, "three frames");
        assert_eq!(m[2].len(), 4);
        let expected = next.entry(topic(m).to_string()).or_insert(0);
        assert_eq!(seq(m), *expected, "per-topic sequence for {}", topic(m));
        *expected += 1;
    }
    let hashblocks = of_topic(&msgs, "hashblock");
    for (m, h) in hashblocks.iter().zip(&hashes) {
        assert_eq!(m[1], display(h), "display order");
    }
    let rawblocks = of_topic(&msgs, "rawblock");
    let last: Block = deserialize(&rawblocks[100][1]).unwrap();
    assert_eq!(last.block_hash().to_string(), hashes[100]);
    // The internal order is the reverse of what is sent.
    let mut internal = last.block_hash().to_byte_array().to_vec();
    internal.reverse();
    assert_eq!(hashblocks[100][1], internal);
    let seqs = block_sequence(&msgs);
    assert!(seqs.iter().all(|(l, _)| *l == 'C'));
    assert_eq!(seqs[0].1, display(&hashes[0]));

    // A wallet send: rawtx, hashtx, sequence A with the mempool sequence number.
    let addr = t.call("getnewaddress", json!([]));
    let txid = t
        .call("sendtoaddress", json!([addr, 1.5]))
        .as_str()
        .unwrap()
        .to_string();
    let msgs = drain(&sub, 500);
    assert_eq!(msgs.len(), 3);
    assert_eq!(topic(&msgs[0]), "rawtx");
    assert_eq!(seq(&msgs[0]), 101);
    let tx: Transaction = deserialize(&msgs[0][1]).unwrap();
    assert_eq!(tx.compute_txid().to_string(), txid);
    assert_eq!(topic(&msgs[1]), "hashtx");
    assert_eq!(msgs[1][1], display(&txid));
    assert_eq!(topic(&msgs[2]), "sequence");
    assert_eq!(msgs[2][1].len(), 32 + 1 + 8);
    assert_eq!(msgs[2][1][..32], display(&txid)[..]);
    assert_eq!(msgs[2][1][32], b'A');
    let mempool_seq = u64::from_le_bytes(msgs[2][1][33..].try_into().unwrap());
    assert_eq!(mempool_seq, 1);

    // Mined: rawtx for both block txs, C, and no R.
    let mined = t.mine(1);
    let msgs = drain(&sub, 500);
    assert_eq!(of_topic(&msgs, "rawtx").len(), 2);
    assert!(!msgs
        .iter()
        .any(|m| topic(m) == "sequence" && m[1].len() == 41));
    assert_eq!(block_sequence(&msgs), vec![('C', display(&mined[0]))]);

    // Evicted: R with the next mempool sequence (the mined removal used one up).
    let txid = t
        .call("sendtoaddress", json!([addr, 0.5]))
        .as_str()
        .unwrap()
        .to_string();
    drain(&sub, 300);
    t.call("devnet_evict", json!([txid]));
    let msgs = drain(&sub, 500);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0][1][32], b'R');
    assert_eq!(u64::from_le_bytes(msgs[0][1][33..].try_into().unwrap()), 4);
}

#[test]
fn reorg_announces_disconnects_then_connects_and_only_the_new_tip() {
    let t = common::start();
    let sub = subscribe(&t.node);
    let base = t.mine(2);
    let a = t.mine(2);
    drain(&sub, 500);

    // Invalidating active blocks: D for each, from the tip down, and no new tip announced.
    t.call("invalidateblock", json!([a[0]]));
    let msgs = drain(&sub, 500);
    assert_eq!(
        block_sequence(&msgs),
        vec![('D', display(&a[1])), ('D', display(&a[0]))]
    );
    assert!(of_topic(&msgs, "rawblock").is_empty());
    assert!(of_topic(&msgs, "hashblock").is_empty());

    let b = t.mine(3);
    drain(&sub, 500);
    assert_eq!(t.call("getbestblockhash", json!([])), json!(b[2]));

    // Reorg back to the a-branch: 3 D's, then 2 C's, one rawblock for the new tip.
    t.call("reconsiderblock", json!([a[0]]));
    t.call("invalidateblock", json!([b[0]]));
    let msgs = drain(&sub, 700);
    assert_eq!(
        block_sequence(&msgs),
        vec![
            ('D', display(&b[2])),
            ('D', display(&b[1])),
            ('D', display(&b[0])),
            ('C', display(&a[0])),
            ('C', display(&a[1])),
        ]
    );
    let raw = of_topic(&msgs, "rawblock");
    assert_eq!(raw.len(), 1);
    let tip: Block = deserialize(&raw[0][1]).unwrap();
    assert_eq!(tip.block_hash().to_string(), a[1]);
    assert_eq!(tip.header.prev_blockhash.to_string(), a[0]);
    let hb = of_topic(&msgs, "hashblock");
    assert_eq!(hb.len(), 1);
    assert_eq!(hb[0][1], display(&a[1]));
    assert_eq!(t.call("getblockhash", json!([2])), json!(base[1]));
}

#[test]
fn faults_drop_and_garbage() {
    let t = common::start();
    let sub = subscribe(&t.node);
    t.mine(1);
    drain(&sub, 400);
    t.call("devnet_zmqfaults", json!([{"drop_next": 2}]));
    t.mine(1);
    let msgs = drain(&sub, 400);
    assert_eq!(msgs.len(), 3, "rawtx and hashtx dropped");
    t.call("devnet_zmqfaults", json!([{"garbage_next": 1}]));
    t.mine(1);
    let msgs = drain(&sub, 400);
    assert_eq!(msgs.len(), 5);
    assert_eq!(topic(&msgs[0]), "rawtx");
    assert_eq!(msgs[0][2].len(), 2, "malformed sequence frame");
    // The dropped rawtx of block 2 used sequence 1: block 3's is 2.
    assert_eq!(seq(&msgs[1]), 2, "hashtx");
    t.call("devnet_zmqfaults", json!([{"reorder_next": 1}]));
    t.mine(1);
    let msgs = drain(&sub, 600);
    assert_eq!(msgs.len(), 5);
    assert_eq!(topic(&msgs[0]), "hashtx");
    assert_eq!(topic(&msgs[1]), "rawtx");
}
