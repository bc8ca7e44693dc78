//! Generated regtest chains: the edge cases of `bitcoind-interface.md` one by one, and
//! property tests of the pipeline and of reorgs against the reference model.
//!
//! Scenarios:
//! 1. edge cases on one hand-made chain: BIP30 duplicate coinbase overwrite, a watched
//!    OP_RETURN script, a spend within the same block, 50 outputs to one script, zero-value
//!    outputs, a P2PK output watched through `pk()`, coinbase maturity.
//! 2. property: random chains and random watch sets give the reference model's state.
//! 3. property: connect a branch, disconnect M blocks and reconnect them (byte-identical
//!    digest), then reorg to a longer branch == a fresh index of the final chain.
//! 4. a reorg deeper than the kept undo journal is refused with an error naming the fix.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use bitcoin::absolute::LockTime;
use bitcoin::script::Builder;
use bitcoin::secp256k1::{Secp256k1, SecretKey};
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, Block, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Witness,
};
use indexer::store::{Profile, Reader, Store};
use indexer::types::ScriptId;
use proptest::prelude::*;
use system_tests::chaingen::{op_return, script_palette, ChainGen};
use system_tests::fixtures::write_blk_file;
use system_tests::harness::{
    all_scripts, assert_store_matches, deal, open_with_wallets, open_with_wallets_as, rescan,
    TestWallet,
};
use system_tests::reference;

const NET: Network = Network::Regtest;

fn spend(inputs: &[OutPoint], outputs: Vec<TxOut>) -> Transaction {
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: inputs
            .iter()
            .map(|op| TxIn {
                previous_output: *op,
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: Witness::new(),
            })
            .collect(),
        output: outputs,
    }
}

fn out(script: &ScriptBuf, sat: u64) -> TxOut {
    TxOut {
        value: Amount::from_sat(sat),
        script_pubkey: script.clone(),
    }
}

fn write_chain(dir: &Path, name: &str, blocks: &[Block]) {
    write_blk_file(&dir.join(name), NET, blocks, [0; 8]);
}

#[test]
fn edge_cases_match_the_model_and_hold_individually() {
    let secp = Secp256k1::new();
    let key = SecretKey::from_slice(&[7; 32]).unwrap().public_key(&secp);
    let p2pk = Builder::new()
        .push_slice(key.serialize())
        .push_opcode(bitcoin::opcodes::all::OP_CHECKSIG)
        .into_script();
    let palette = script_palette(10, 12);
    let (s_many, s_zero, s_chain, s_bip30) = (
        palette[3].clone(),
        palette[4].clone(),
        palette[5].clone(),
        palette[1].clone(),
    );
    let unwatched = script_palette(99, 3);
    let memo = op_return(b"watched memo");

    let mut gen = ChainGen::new(1, unwatched.clone());
    for _ in 0..101 {
        gen.add_random_block(0);
    }
    let cb1 = gen.blocks()[1].txdata[0].compute_txid();
    let cb2 = gen.blocks()[2].txdata[0].compute_txid();

    // Height 102: 50 outputs to one script, zero-value outputs, a watched OP_RETURN,
    // P2PK, and a spend of an output created earlier in the same block.
    let many = spend(
        &[OutPoint::new(cb1, 0)],
        (0..50)
            .map(|_| out(&s_many, 1000))
            .chain([
                out(&s_zero, 0),
                out(&s_zero, 0),
                out(&memo, 0),
                out(&p2pk, 777),
                out(&s_chain, 5000),
            ])
            .collect(),
    );
    let same_block = spend(
        &[OutPoint::new(many.compute_txid(), 54)],
        vec![out(&unwatched[0], 4000)],
    );
    let cb = gen.coinbase(102, vec![out(&unwatched[1], 50_0000_0000)]);
    gen.add_block(cb, vec![many.clone(), same_block.clone()]);

    // Height 103 and 110: the same coinbase twice (BIP30): the later overwrites.
    let dup = gen.coinbase(103, vec![out(&s_bip30, 12_345)]);
    gen.add_block(
        dup.clone(),
        vec![spend(&[OutPoint::new(cb2, 0)], vec![out(&unwatched[2], 1)])],
    );
    for _ in 0..6 {
        gen.add_random_block(0);
    }
    gen.add_block(dup.clone(), vec![]);
    let chain = gen.blocks().to_vec();

    let watched = TestWallet {
        name: "edge".into(),
        scripts: [
            s_many.clone(),
            s_zero.clone(),
            s_chain.clone(),
            s_bip30.clone(),
            memo.clone(),
        ]
        .into(),
    };
    let blocks = tempfile::tempdir().unwrap();
    write_chain(blocks.path(), "blk00000.dat", &chain);
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, std::slice::from_ref(&watched));
    // P2PK through a descriptor, in a second wallet.
    indexer::wallets::add(&store, NET, "p2pk", &[format!("pk({key})")], None, 20).unwrap();
    rescan(&store, NET, blocks.path(), None, None, None).unwrap();

    let mut all = watched.scripts.clone();
    all.insert(p2pk.clone());
    let model = reference::compute(&chain, 0, &all);
    let p2pk_wallet = TestWallet {
        name: "p2pk".into(),
        scripts: [p2pk.clone()].into(),
    };
    assert_store_matches(&store, &model, &[watched.clone(), p2pk_wallet]);

    let balance = |s: &ScriptBuf| store.script_balance(&ScriptId::of(s)).unwrap();
    assert_eq!(
        (balance(&s_many).confirmed, balance(&s_many).utxo_count),
        (50_000, 50)
    );
    assert_eq!(
        (balance(&s_zero).confirmed, balance(&s_zero).utxo_count),
        (0, 2),
        "zero-value outputs are utxos"
    );
    assert_eq!(balance(&s_chain).utxo_count, 0, "spent in its own block");
    assert_eq!(balance(&memo).utxo_count, 0, "OP_RETURN is never a utxo");
    assert_eq!(balance(&p2pk).confirmed, 777);
    let bip30 = store
        .utxo(&OutPoint::new(dup.compute_txid(), 0))
        .unwrap()
        .unwrap();
    assert_eq!(
        bip30.height, 110,
        "the later duplicate coinbase overwrote the earlier"
    );
    assert_eq!(
        (balance(&s_bip30).immature, balance(&s_bip30).utxo_count),
        (12_345, 1)
    );

    // 100 blocks on top of 110, the duplicate coinbase matures: immature -> confirmed.
    for _ in 0..99 {
        gen.add_random_block(0);
    }
    write_chain(blocks.path(), "blk00001.dat", &gen.blocks()[chain.len()..]);
    rescan(&store, NET, blocks.path(), None, None, None).unwrap();
    assert_eq!(store.tip().unwrap().unwrap().0, 209);
    assert_eq!(
        balance(&s_bip30).immature,
        12_345,
        "one block short of maturity"
    );
    gen.add_random_block(0);
    write_chain(blocks.path(), "blk00002.dat", &gen.blocks()[210..]);
    rescan(&store, NET, blocks.path(), None, None, None).unwrap();
    assert_eq!(
        (balance(&s_bip30).confirmed, balance(&s_bip30).immature),
        (12_345, 0)
    );
}

/// A random chain of `len` blocks after genesis with up to `txs` transactions each.
fn random_chain(seed: u64, palette: &[ScriptBuf], len: u32, txs: usize) -> ChainGen {
    let mut gen = ChainGen::new(seed, palette.to_vec());
    for i in 0..len {
        gen.add_random_block((seed as usize + i as usize) % (txs + 1));
    }
    gen
}

fn wallets_from_mask(palette: &[ScriptBuf], mask: u64) -> Vec<TestWallet> {
    let chosen = palette
        .iter()
        .enumerate()
        .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
        .map(|(_, s)| s.clone());
    deal(chosen, &["a", "b"], 5)
}

fn fresh_digest(blocks: &[Block], wallets: &[TestWallet]) -> bitcoin::hashes::sha256::Hash {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), "blk00000.dat", blocks);
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, wallets);
    rescan(&store, NET, dir.path(), None, None, None).unwrap();
    let model = reference::compute(blocks, 0, &all_scripts(wallets));
    assert_store_matches(&store, &model, wallets);
    store.digest().unwrap()
}

/// Cases per property: 24 in CI; `PROPTEST_CASES=N` for a longer hunt.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn pipeline_equals_reference_model(seed in 0u64..1_000_000, len in 102u32..150, txs in 0usize..8, mask in any::<u64>()) {
        let palette = script_palette(seed, 24);
        let gen = random_chain(seed, &palette, len, txs);
        let wallets = wallets_from_mask(&palette, mask);
        fresh_digest(gen.blocks(), &wallets);
    }

    #[test]
    fn reorg_equals_fresh_index_of_the_final_chain(
        seed in 0u64..1_000_000,
        base in 101u32..120,
        a_len in 1u32..20,
        extra in 1u32..10,
        redo in 1u32..20,
        mask in any::<u64>(),
    ) {
        let palette = script_palette(seed, 24);
        let wallets = wallets_from_mask(&palette, mask);
        let common = random_chain(seed, &palette, base, 5);
        let mut a = common.clone();
        a.reseed(seed + 1);
        for _ in 0..a_len { a.add_random_block(5); }
        let mut b = common.clone();
        b.reseed(seed + 2);
        for _ in 0..a_len + extra { b.add_random_block(5); }

        let dir = tempfile::tempdir().unwrap();
        write_chain(dir.path(), "blk00000.dat", a.blocks());
        let db = tempfile::tempdir().unwrap();
        // Opened as `indexer rescan --blocks-dir` opens it (the disconnects read families
        // whose memtables are vectors there); the fresh index compared with is a serving one.
        let store: Store = open_with_wallets_as(db.path(), NET, &wallets, Profile::Indexing);
        rescan(&store, NET, dir.path(), None, None, None).unwrap();
        let digest_a = store.digest().unwrap();

        // Disconnect `redo` blocks and connect the same ones again: byte-identical state.
        let from = a.height() + 1 - redo.min(a.height());
        let report = rescan(&store, NET, dir.path(), Some(from), None, None).unwrap();
        prop_assert_eq!(report.disconnected, a.height() + 1 - from);
        prop_assert_eq!(store.digest().unwrap(), digest_a);

        // Branch b arrives with more work: reorg to it.
        write_chain(dir.path(), "blk00001.dat", &b.blocks()[base as usize + 1..]);
        let report = rescan(&store, NET, dir.path(), None, None, None).unwrap();
        prop_assert_eq!(report.disconnected, a_len);
        prop_assert_eq!(store.digest().unwrap(), fresh_digest(b.blocks(), &wallets));
    }
}

#[test]
fn a_reorg_deeper_than_the_undo_journal_is_refused() {
    let palette = script_palette(5, 12);
    let wallets = wallets_from_mask(&palette, u64::MAX);
    let common = random_chain(5, &palette, 110, 3);
    let mut a = common.clone();
    a.reseed(6);
    for _ in 0..6 {
        a.add_random_block(3);
    }
    let mut b = common;
    b.reseed(7);
    for _ in 0..8 {
        b.add_random_block(3);
    }
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), "blk00000.dat", a.blocks());
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, &wallets);
    rescan(&store, NET, dir.path(), None, None, Some(4)).unwrap();
    let before = store.digest().unwrap();
    write_chain(dir.path(), "blk00001.dat", &b.blocks()[111..]);
    let err = rescan(&store, NET, dir.path(), None, None, Some(4))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("undo") && err.contains("indexer rescan"),
        "{err}"
    );
    assert_eq!(
        store.tip().unwrap().unwrap().0,
        116,
        "refused before disconnecting anything"
    );
    assert_eq!(store.digest().unwrap(), before);

    // The way out the error names: forget the chain state and index the files afresh.
    store.reset_chain_state().unwrap();
    rescan(&store, NET, dir.path(), None, None, Some(4)).unwrap();
    assert_eq!(store.digest().unwrap(), fresh_digest(b.blocks(), &wallets));
}

/// Scenario 5: scripts that join a second wallet after their blocks were indexed; then
/// blocks are redone (`--from`) and the chain reorgs. Every wallet's balance still equals
/// the model, and the state equals a fresh index where the wallet existed from the start.
#[test]
fn a_wallet_added_after_indexing_stays_exact_through_redo_and_reorg() {
    let palette = script_palette(11, 24);
    let wallets = wallets_from_mask(&palette, u64::MAX);
    let common = random_chain(11, &palette, 110, 6);
    let mut a = common.clone();
    a.reseed(12);
    for _ in 0..8 {
        a.add_random_block(6);
    }
    let mut b = common;
    b.reseed(13);
    for _ in 0..12 {
        b.add_random_block(6);
    }
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path(), "blk00000.dat", a.blocks());
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, &wallets);
    rescan(&store, NET, dir.path(), None, None, None).unwrap();

    let late = TestWallet {
        name: "late".into(),
        scripts: wallets[0].scripts.clone(),
    };
    let descriptors: Vec<String> = late
        .scripts
        .iter()
        .map(|s| format!("raw({})", s.to_hex_string()))
        .collect();
    indexer::wallets::add(&store, NET, "late", &descriptors, None, 20).unwrap();
    let mut all = wallets.clone();
    all.push(late);
    assert_store_matches(
        &store,
        &reference::compute(a.blocks(), 0, &all_scripts(&all)),
        &all,
    );

    rescan(&store, NET, dir.path(), Some(100), None, None).unwrap();
    assert_store_matches(
        &store,
        &reference::compute(a.blocks(), 0, &all_scripts(&all)),
        &all,
    );

    write_chain(dir.path(), "blk00001.dat", &b.blocks()[111..]);
    let report = rescan(&store, NET, dir.path(), None, None, None).unwrap();
    assert_eq!(report.disconnected, 8);
    assert_store_matches(
        &store,
        &reference::compute(b.blocks(), 0, &all_scripts(&all)),
        &all,
    );
    assert_eq!(store.digest().unwrap(), fresh_digest(b.blocks(), &all));
}
