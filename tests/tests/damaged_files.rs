//! Block files that hide a forgery or a cut: a rescan must never index a mutated block,
//! must use the good copy when one follows, and must say where its chain was cut.
//!
//! Scenarios (a generated regtest chain of 128 blocks; block 121 has three transactions):
//! 1. a mutated copy of block 121 (its last transaction repeated: the same merkle root,
//!    CVE-2012-2459) sits before the good copy: the rescan skips it and indexes the good
//!    one; the state equals the reference model of the real chain.
//! 2. only the mutated copy: the rescan stops with an error naming the file, the offset and
//!    the mutation; every block below it is indexed, none from it on.
//! 3. zeros in the middle of a file with blocks after them, blocks in a file whose name is
//!    not blkNNNNN.dat, a header without valid proof of work: each cuts the chain at 121;
//!    a rescan asked `--to` the real tip fails naming the cut, with blocks 0..120 indexed.
//! 4. an index that already had the whole chain, rescanned from files that end early:
//!    the rescan fails saying the files end below the index's tip.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use bitcoin::consensus::serialize;
use bitcoin::{Block, Network};
use indexer::rescan::RescanError;
use indexer::store::{Reader, Store};
use system_tests::chaingen::{script_palette, ChainGen};
use system_tests::harness::{
    all_scripts, assert_store_matches, deal, open_with_wallets, rescan, TestWallet,
};
use system_tests::reference;

const NET: Network = Network::Regtest;
/// The block that gets mutated or cut.
const CUT: usize = 121;

/// A chain whose block `CUT` has exactly three transactions, and wallets over it.
fn chain() -> (Vec<Block>, Vec<TestWallet>) {
    let palette = script_palette(3, 16);
    let mut gen = ChainGen::new(3, palette.clone());
    for _ in 0..CUT - 1 {
        gen.add_random_block(4);
    }
    let txs = gen.add_random_block(2).txdata.len();
    assert_eq!(txs, 3, "block {CUT}: a coinbase and two spends");
    for _ in 0..6 {
        gen.add_random_block(3);
    }
    let wallets = deal(palette, &["a", "b"], 7);
    (gen.blocks().to_vec(), wallets)
}

/// `block` with its last transaction repeated: the merkle root is unchanged.
fn mutated(block: &Block) -> Block {
    let mut m = block.clone();
    m.txdata.push(block.txdata.last().unwrap().clone());
    assert_eq!(m.compute_merkle_root(), Some(block.header.merkle_root));
    m
}

/// One blk record.
fn record(block: &Block) -> Vec<u8> {
    let bytes = serialize(block);
    let mut r = NET.magic().to_bytes().to_vec();
    r.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    r.extend_from_slice(&bytes);
    r
}

fn records(blocks: &[Block]) -> Vec<u8> {
    blocks.iter().flat_map(record).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn fresh(wallets: &[TestWallet]) -> (tempfile::TempDir, Store) {
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, wallets);
    (db, store)
}

fn tip(store: &Store) -> u32 {
    store.tip().unwrap().unwrap().0
}

#[test]
fn a_mutated_copy_is_skipped_for_the_good_one_and_never_indexed_alone() {
    let (blocks, wallets) = chain();
    let last = blocks.len() as u32 - 1;
    // 1.
    let files = tempfile::tempdir().unwrap();
    let mut first = records(&blocks[..CUT]);
    first.extend(record(&mutated(&blocks[CUT])));
    write(files.path(), "blk00000.dat", &first);
    write(files.path(), "blk00001.dat", &records(&blocks[CUT..]));
    let (_db, store) = fresh(&wallets);
    let report = rescan(&store, NET, files.path(), None, None, None).unwrap();
    assert_eq!(report.tip.unwrap().0, last);
    let model = reference::compute(&blocks, 0, &all_scripts(&wallets));
    assert_store_matches(&store, &model, &wallets);

    // 2.
    let alone = tempfile::tempdir().unwrap();
    let mut bytes = records(&blocks[..CUT]);
    bytes.extend(record(&mutated(&blocks[CUT])));
    bytes.extend(records(&blocks[CUT + 1..]));
    write(alone.path(), "blk00000.dat", &bytes);
    let (_db2, store2) = fresh(&wallets);
    let err = rescan(&store2, NET, alone.path(), None, None, None).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RescanError::Pipeline(_)), "{text}");
    assert!(text.contains("blk00000.dat offset"), "{text}");
    assert!(text.contains("CVE-2012-2459"), "{text}");
    assert_eq!(tip(&store2), CUT as u32 - 1);
}

#[test]
fn zeros_mid_file_odd_file_names_and_bad_proof_of_work_are_named_cuts() {
    let (blocks, wallets) = chain();
    let last = blocks.len() as u32 - 1;
    // 3. Zeros where a record should start, with blocks after them.
    let zeros = tempfile::tempdir().unwrap();
    let mut bytes = records(&blocks[..CUT]);
    bytes.extend([0u8; 1024]);
    bytes.extend(records(&blocks[CUT..]));
    write(zeros.path(), "blk00000.dat", &bytes);
    // Blocks in a file the name of which does not parse.
    let named = tempfile::tempdir().unwrap();
    write(named.path(), "blk00000.dat", &records(&blocks[..CUT]));
    write(named.path(), "blk0000x.dat", &records(&blocks[CUT..]));
    // A header that fails its own target (the real block CUT is not in the files).
    let forged = tempfile::tempdir().unwrap();
    let mut bad = blocks[CUT].clone();
    while bad.header.validate_pow(bad.header.target()).is_ok() {
        bad.header.nonce = bad.header.nonce.wrapping_add(1);
    }
    let mut bytes = records(&blocks[..CUT]);
    bytes.extend(record(&bad));
    bytes.extend(records(&blocks[CUT + 1..]));
    write(forged.path(), "blk00000.dat", &bytes);

    for (dir, says) in [
        (
            &zeros,
            "zeros where a record should start, but data follows",
        ),
        (&named, "blk0000x.dat offset 0: not a blkNNNNN.dat name"),
        (&forged, "without valid proof of work"),
    ] {
        let (_db, store) = fresh(&wallets);
        let err = rescan(&store, NET, dir.path(), None, Some(last), None).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RescanError::ShortChain { found, wanted, .. } if found == CUT as u32 - 1 && wanted == last),
            "{text}"
        );
        assert!(text.contains(says), "{says}: {text}");
        assert!(text.contains("asked for with --to"), "{text}");
        assert_eq!(tip(&store), CUT as u32 - 1, "{says}");
    }

    // 4.
    let whole = tempfile::tempdir().unwrap();
    write(whole.path(), "blk00000.dat", &records(&blocks));
    let (_db, store) = fresh(&wallets);
    rescan(&store, NET, whole.path(), None, None, None).unwrap();
    let err = rescan(&store, NET, named.path(), None, None, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("below the index's tip before the rescan")
            || err
                .to_string()
                .contains("the index's tip before the rescan"),
        "{err}"
    );
    assert_eq!(
        tip(&store),
        last,
        "an index ahead of the files is left alone"
    );
}
