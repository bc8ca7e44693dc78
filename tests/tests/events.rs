//! The durable event log that consumers replay.
//!
//! Scenarios:
//! 1. index a generated branch, then reorg to a longer one: offsets run from 0 without a
//!    gap; a consumer replaying the log block by block ends on exactly the final chain and
//!    exactly the confirmed transfers of the index; reading from any offset gives the
//!    rest of the same log.
//! 2. with a retention of 25 events, older offsets are reported pruned, naming the oldest.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bitcoin::{BlockHash, Network, Txid};
use indexer::pipeline::{PipelineOptions, WriteOptions};
use indexer::query::{Query, QueryError};
use indexer::rescan::{rescan_blocks_dir, RescanRequest};
use indexer::types::EventKind;
use indexer::wallets;
use system_tests::chaingen::{script_palette, ChainGen};
use system_tests::fixtures::write_blk_file;
use system_tests::harness::{deal, open_with_wallets};

const NET: Network = Network::Regtest;

fn rescan(store: &indexer::store::Store, dir: &std::path::Path, retention: Option<u64>) {
    let filter = wallets::load_filter(store, 1000, 1e-4).unwrap();
    let opts = PipelineOptions {
        chunk_bytes: 64 << 10,
        write: WriteOptions {
            max_blocks: 7,
            event_retention: retention,
            ..WriteOptions::default()
        },
    };
    let req = RescanRequest {
        blocks_dir: dir.to_owned(),
        from: None,
        to: None,
    };
    rescan_blocks_dir(store, NET, &filter, &req, &opts, &|_| {}, &|_| {}).unwrap();
}

#[test]
fn replaying_the_log_gives_the_final_chain_and_transfers() {
    let palette = script_palette(51, 20);
    let wallets = deal(palette.iter().cloned(), &["a", "b"], 4);
    let mut a = ChainGen::new(51, palette.clone());
    for i in 0..108 {
        a.add_random_block(i % 5);
    }
    let mut b = a.clone();
    a.reseed(52);
    b.reseed(53);
    for _ in 0..4 {
        a.add_random_block(4);
    }
    for _ in 0..7 {
        b.add_random_block(4);
    }
    let dir = tempfile::tempdir().unwrap();
    write_blk_file(&dir.path().join("blk00000.dat"), NET, a.blocks(), [0; 8]);
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, &wallets);
    rescan(&store, dir.path(), None);
    write_blk_file(
        &dir.path().join("blk00001.dat"),
        NET,
        &b.blocks()[109..],
        [0; 8],
    );
    rescan(&store, dir.path(), None);

    let q = Query::new(&store, NET).unwrap();
    let log = q.events(0, usize::MAX).unwrap();
    assert!(
        log.iter().enumerate().all(|(i, (o, _))| *o == i as u64),
        "offsets without gaps"
    );

    let mut chain: Vec<BlockHash> = Vec::new();
    let mut confirmed: BTreeSet<(u32, Txid)> = BTreeSet::new();
    let mut disconnects = 0;
    for (_, e) in &log {
        match e.kind {
            EventKind::BlockConnected => {
                assert_eq!(e.height as usize, chain.len(), "connected in height order");
                chain.push(e.block_hash);
            }
            EventKind::BlockDisconnected => {
                assert_eq!(chain.pop(), Some(e.block_hash), "disconnects the tip");
                disconnects += 1;
            }
            EventKind::TransferConfirmed => {
                assert_eq!(chain.last(), Some(&e.block_hash), "after its block");
                assert!(confirmed.insert((e.height, e.txid.unwrap())));
            }
            EventKind::TransferReorgedOut => {
                assert_eq!(chain.last(), Some(&e.block_hash), "before its block leaves");
                assert!(confirmed.remove(&(e.height, e.txid.unwrap())));
            }
            kind => panic!("no mempool events without bitcoind, got {kind:?}"),
        }
    }
    assert_eq!(disconnects, 4);
    let expected: Vec<BlockHash> = b.blocks().iter().map(|b| b.block_hash()).collect();
    assert_eq!(chain, expected);

    let mut indexed = BTreeSet::new();
    for w in &wallets {
        let (page, next) = q.list_transfers(&w.name, 0, None, 1000, None).unwrap();
        assert!(next.is_none());
        indexed.extend(page.iter().map(|t| (t.height, t.txid)));
    }
    assert_eq!(confirmed, indexed);
    assert!(!confirmed.is_empty());

    for from in [0, 1, 57, log.len() as u64 - 1, log.len() as u64] {
        let tail = q.events(from, usize::MAX).unwrap();
        assert_eq!(tail, log[from as usize..].to_vec());
    }
    let err = q.events(log.len() as u64 + 1, 10).err().unwrap();
    assert!(matches!(err, QueryError::FutureOffset { .. }), "{err}");
}

#[test]
fn pruned_offsets_are_a_clear_error() {
    let palette = script_palette(61, 10);
    let wallets = deal(palette.iter().cloned(), &["a"], 100);
    let mut gen = ChainGen::new(61, palette);
    for _ in 0..60 {
        gen.add_random_block(0);
    }
    let dir = tempfile::tempdir().unwrap();
    write_blk_file(&dir.path().join("blk00000.dat"), NET, gen.blocks(), [0; 8]);
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), NET, &wallets);
    rescan(&store, dir.path(), Some(25));
    let q = Query::new(&store, NET).unwrap();
    let err = q.events(0, 10).err().unwrap();
    let QueryError::Pruned { asked, first } = err else {
        panic!("not a pruned error: {err}");
    };
    assert_eq!(asked, 0);
    assert!(first > 0);
    let kept = q.events(first, usize::MAX).unwrap();
    assert!(kept.len() >= 25, "at least the retention is kept");
}
