//! Rescans of real chain data from `../shared/fixtures` against the reference model.
//!
//! Scenarios:
//! 1. mainnet 0..4312 from one blk file: UTXOs and balances equal the model.
//! 2. the same file XOR-obfuscated with a random key and `xor.dat`: same result.
//! 3. mainnet 0..599 across two blk files (and Core's rev file beside them).
//! 4. btcd's reorg fixture in every file order: the most-work side chain wins; indexing
//!    the main chain first and then the side chain reorgs to the same digest.
//! 5. damaged files: a bad record names the file and offset and commits nothing; zero
//!    padding ends a file; a record cut off in the newest file is skipped.
//! 6. a block whose body is damaged stops the rescan with its file and offset; every block
//!    before it is committed, and a rerun on repaired files completes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

use bitcoin::{Block, Network, OutPoint};
use indexer::store::Reader;
use rand::Rng;
use system_tests::fixtures::{fixture, obfuscate, read_blk_blocks, write_blk_file};
use system_tests::harness::{
    all_scripts, assert_store_matches, open_with_wallets, rescan, wallets_over,
};
use system_tests::reference::{self, longest_chain};

fn copy_as(src: &Path, dir: &Path, name: &str) {
    std::fs::copy(src, dir.join(name)).expect("copy fixture");
}

#[test]
fn mainnet_0_4312_matches_the_reference_model() {
    let file = fixture("mainnet-0-4312/blk00000.dat");
    let chain = read_blk_blocks(&file);
    assert_eq!(chain.len(), 4313);
    let wallets = wallets_over(&chain, 1);
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));
    assert!(model.utxos.len() > 1000, "a meaningful watch set");

    let blocks = tempfile::tempdir().unwrap();
    copy_as(&file, blocks.path(), "blk00000.dat");
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    let report = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    assert_eq!(report.progress.blocks, 4313);
    assert_eq!(report.progress.txs, 4371);
    assert_store_matches(&store, &model, &wallets);
    let plain_digest = store.digest().unwrap();

    // The same blocks, obfuscated as Core 28+ writes them.
    let xored = tempfile::tempdir().unwrap();
    let key: [u8; 8] = rand::thread_rng().gen();
    let mut data = std::fs::read(&file).unwrap();
    obfuscate(&mut data, key);
    std::fs::write(xored.path().join("blk00000.dat"), data).unwrap();
    std::fs::write(xored.path().join("xor.dat"), key).unwrap();
    let db2 = tempfile::tempdir().unwrap();
    let store2 = open_with_wallets(db2.path(), Network::Bitcoin, &wallets);
    rescan(&store2, Network::Bitcoin, xored.path(), None, None, None).unwrap();
    assert_store_matches(&store2, &model, &wallets);
    assert_eq!(store2.digest().unwrap(), plain_digest);
}

#[test]
fn mainnet_0_599_across_two_files_matches_the_reference_model() {
    let dir = fixture("mainnet-0-599/blk00000.dat")
        .parent()
        .unwrap()
        .to_owned();
    let mut chain = read_blk_blocks(&dir.join("blk00000.dat"));
    chain.extend(read_blk_blocks(&dir.join("blk00001.dat")));
    assert_eq!(chain.len(), 600);
    let wallets = wallets_over(&chain, 2);
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    // Straight from the fixture directory: rev00000.dat beside the blk files is ignored.
    let report = rescan(&store, Network::Bitcoin, &dir, None, None, None).unwrap();
    assert_eq!(report.tip.unwrap().0, 599);
    assert_store_matches(&store, &model, &wallets);

    // A second rescan over an up-to-date index connects nothing and changes nothing.
    let digest = store.digest().unwrap();
    let again = rescan(&store, Network::Bitcoin, &dir, None, None, None).unwrap();
    assert_eq!(again.progress.blocks, 0);
    assert_eq!(store.digest().unwrap(), digest);
}

const REORG_FILES: [&str; 4] = ["blk_0_to_4.dat", "blk_3A.dat", "blk_4A.dat", "blk_5A.dat"];

#[test]
fn btcd_reorg_fixture_takes_the_most_work_chain_in_any_file_order() {
    let all: Vec<Block> = REORG_FILES
        .iter()
        .flat_map(|f| read_blk_blocks(&fixture(&format!("reorg-btcd/{f}"))))
        .collect();
    let chain = longest_chain(&all);
    assert_eq!(chain.len(), 6, "genesis..5A");
    let wallets = wallets_over(&all, 3);
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));

    let mut digests = BTreeSet::new();
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
        let blocks = tempfile::tempdir().unwrap();
        for (i, &f) in order.iter().enumerate() {
            copy_as(
                &fixture(&format!("reorg-btcd/{}", REORG_FILES[f])),
                blocks.path(),
                &format!("blk{i:05}.dat"),
            );
        }
        let db = tempfile::tempdir().unwrap();
        let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
        let report = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
        assert_eq!(report.tip.unwrap().1, chain[5].block_hash());
        assert_eq!(
            report.rejected.off_chain, 2,
            "blocks 3 and 4 of the main chain are stale"
        );
        assert_store_matches(&store, &model, &wallets);
        digests.insert(store.digest().unwrap());
    }
    assert_eq!(digests.len(), 1);

    // Index the first chain alone, then let the side chain arrive: a 2-block reorg.
    let blocks = tempfile::tempdir().unwrap();
    copy_as(
        &fixture("reorg-btcd/blk_0_to_4.dat"),
        blocks.path(),
        "blk00000.dat",
    );
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    let first = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    assert_eq!(first.tip.unwrap().0, 4);
    for (i, f) in REORG_FILES[1..].iter().enumerate() {
        copy_as(
            &fixture(&format!("reorg-btcd/{f}")),
            blocks.path(),
            &format!("blk{:05}.dat", i + 1),
        );
    }
    let second = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    assert_eq!(second.disconnected, 2);
    assert_eq!(second.progress.blocks, 3);
    assert_store_matches(&store, &model, &wallets);
    assert!(digests.contains(&store.digest().unwrap()));
}

#[test]
fn damaged_files_give_clear_errors_and_commit_nothing_half_done() {
    let good = fixture("mainnet-0-599/blk00000.dat");
    let first_half = read_blk_blocks(&good);
    let wallets = wallets_over(&first_half, 4);

    // A misaligned record after block 599: the error names the file and offset.
    let blocks = tempfile::tempdir().unwrap();
    copy_as(&good, blocks.path(), "blk00000.dat");
    copy_as(
        &fixture("damaged/corrupt-tail.dat"),
        blocks.path(),
        "blk00001.dat",
    );
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    let err = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk00001.dat") && err.contains("offset 70449"),
        "{err}"
    );
    assert_eq!(store.tip().unwrap(), None, "nothing committed");

    // Zero padding, as bitcoind preallocates: the end of the file, not an error.
    std::fs::remove_file(blocks.path().join("blk00001.dat")).unwrap();
    copy_as(
        &fixture("damaged/zero-padded.dat"),
        blocks.path(),
        "blk00001.dat",
    );
    let report = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    assert_eq!(report.tip.unwrap().0, 599);

    // testnet3 with block 401 cut off mid-record in the newest file: indexed to 400.
    let blocks = tempfile::tempdir().unwrap();
    copy_as(
        &fixture("damaged/testnet3-truncated-record.dat"),
        blocks.path(),
        "blk00000.dat",
    );
    let chain = read_blk_blocks(&blocks.path().join("blk00000.dat"));
    let wallets = wallets_over(&chain, 5);
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Testnet, &wallets);
    let report = rescan(&store, Network::Testnet, blocks.path(), None, None, None).unwrap();
    let tail = report.partial_tail.expect("partial record reported");
    assert_eq!(tail.offset, 95027);
    assert_store_matches(&store, &model, &wallets);

    // The same truncated record in a file that is not the newest is corruption.
    let genesis = bitcoin::blockdata::constants::genesis_block(Network::Testnet);
    write_blk_file(
        &blocks.path().join("blk00001.dat"),
        Network::Testnet,
        &[genesis],
        [0; 8],
    );
    let err = rescan(&store, Network::Testnet, blocks.path(), None, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("blk00000.dat offset 95027"), "{err}");
}

#[test]
fn a_damaged_block_body_stops_at_that_block_with_everything_before_committed() {
    let file = fixture("mainnet-0-4312/blk00000.dat");
    let chain = read_blk_blocks(&file);
    let wallets = wallets_over(&chain, 6);
    let mut data = std::fs::read(&file).unwrap();
    // Find block 3000's record and flip a byte in its last transaction.
    let mut offset = 0usize;
    for _ in 0..3000 {
        let len = u32::from_le_bytes(data[offset + 4..offset + 8].try_into().unwrap()) as usize;
        offset += 8 + len;
    }
    let len = u32::from_le_bytes(data[offset + 4..offset + 8].try_into().unwrap()) as usize;
    data[offset + 8 + len - 20] ^= 0x40;
    let blocks = tempfile::tempdir().unwrap();
    std::fs::write(blocks.path().join("blk00000.dat"), &data).unwrap();
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
    let err = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("blk00000.dat offset {offset}")) && err.contains("block 3000"),
        "{err}"
    );
    assert_eq!(store.tip().unwrap().unwrap().0, 2999);
    let model = reference::compute(&chain[..3000], 0, &all_scripts(&wallets));
    assert_store_matches(&store, &model, &wallets);

    // Repaired, the rerun resumes at 3000 and ends where a clean run ends.
    copy_as(&file, blocks.path(), "blk00000.dat");
    let report = rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    assert_eq!(report.start, 3000);
    let model = reference::compute(&chain, 0, &all_scripts(&wallets));
    assert_store_matches(&store, &model, &wallets);
}

/// The zero-copy parser agrees with rust-bitcoin's decoder on 30 real large blocks (segwit,
/// taproot, a 2,373-input taproot spend): every txid, every input's outpoint, and every
/// output (with a filter that lets all scripts through, OP_RETURN excepted).
#[test]
fn large_blocks_parse_exactly_like_rust_bitcoin() {
    use indexer::pipeline::parse::{parse_block, RawBlock};
    use indexer::script_filter::ScriptFilter;

    let mut total_txs = 0;
    for file in [
        "large-blocks/mainnet_large_blocks.blk",
        "large-blocks/testnet3_large_blocks.blk",
    ] {
        for block in read_blk_blocks(&fixture(file)) {
            let everything = ScriptFilter::new(100_000, 1e-6);
            for tx in &block.txdata {
                for o in &tx.output {
                    everything.insert(o.script_pubkey.as_bytes());
                }
            }
            let raw = RawBlock {
                height: 0,
                hash: block.block_hash(),
                bytes: bitcoin::consensus::serialize(&block),
                origin: file.into(),
            };
            let parsed = parse_block(raw, &everything).unwrap();
            assert_eq!(parsed.txs.len(), block.txdata.len());
            for (p, tx) in parsed.txs.iter().zip(&block.txdata) {
                assert_eq!(p.txid, tx.compute_txid());
                assert_eq!(p.coinbase, tx.is_coinbase());
                let inputs: Vec<OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
                assert_eq!(p.inputs, if tx.is_coinbase() { vec![] } else { inputs });
                let outputs: Vec<(u32, bitcoin::TxOut)> = (0u32..)
                    .zip(tx.output.iter().cloned())
                    .filter(|(_, o)| !o.script_pubkey.is_op_return())
                    .collect();
                assert_eq!(p.outputs, outputs);
            }
            total_txs += parsed.txs.len();
        }
    }
    assert_eq!(total_txs, 26_353 + 8_019);
}
