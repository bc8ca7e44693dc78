//! The look-ahead of ranged descriptors against a reference model: scripts are derived
//! `gap` beyond the highest index paid, in the same batch as the block that paid it, so a
//! payment to index i + gap in the same block as one to i is found, and a derived range
//! never shrinks, through reorgs too.
//!
//! Scenarios (`wpkh(tpub/<0;1>/*)`, gap 5, blocks written as blk files and rescanned):
//! 1. by hand: a payment inside the first gap; in one block, payments at i and i + gap
//!    (the second found only because the first grew the range); a payment past the end
//!    (not found); every position of the gap paid in one block, with the index just past
//!    it; both branches apart.
//! 2. a reorg: branch A pays index 18 and grows the range; the longer branch B, which
//!    replaces it, pays 22, inside the range A grew though not inside B's own: found.
//! 3. property: random payments to random indices of both branches in random blocks, then
//!    a random reorg: the watched UTXOs and each branch's range equal the model's.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bitcoin::absolute::LockTime;
use bitcoin::bip32::{Xpriv, Xpub};
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, Block, Network, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxOut, Txid, Witness,
};
use indexer::store::schema::{self, Cf};
use indexer::store::{Reader, Store};
use proptest::prelude::*;
use system_tests::chaingen::{script_palette, ChainGen};
use system_tests::fixtures::write_blk_file;
use system_tests::harness::rescan;

const NET: Network = Network::Regtest;
const GAP: u32 = 5;

fn descriptor() -> String {
    let secp = bitcoin::secp256k1::Secp256k1::new();
    let master = Xpriv::new_master(NET, &[42; 32]).unwrap();
    format!("wpkh({}/<0;1>/*)", Xpub::from_priv(&secp, &master))
}

/// The script of `branch` at `index`.
fn script(branch: u32, index: u32) -> ScriptBuf {
    indexer::descriptors::derive(&descriptor(), branch, index..index + 1)
        .unwrap()
        .remove(0)
}

/// A payment: (branch, index).
type Pay = (u32, u32);

/// One transaction paying each of `pays`, its inputs made up (nothing watched spends).
fn paying(pays: &[Pay], tag: u32) -> Transaction {
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::new(Txid::from_byte_array([7; 32]), tag),
            script_sig: ScriptBuf::new(),
            sequence: Sequence::MAX,
            witness: Witness::new(),
        }],
        output: pays
            .iter()
            .map(|&(b, i)| TxOut {
                value: Amount::from_sat(10_000 + u64::from(i)),
                script_pubkey: script(b, i),
            })
            .collect(),
    }
}

/// What the look-ahead must find: for each block (a list of payments), which payments
/// are watched, with the ranges carried from block to block (and never shrunk).
struct Model {
    next: [u32; 2],
}

impl Model {
    fn new() -> Self {
        Model { next: [GAP; 2] }
    }

    /// The payments of one block that are found, growing the ranges as the indexer does:
    /// until nothing more is found.
    fn block(&mut self, pays: &[Pay]) -> Vec<bool> {
        let mut found = vec![false; pays.len()];
        loop {
            let mut grew = false;
            for (k, &(b, i)) in pays.iter().enumerate() {
                if !found[k] && i < self.next[b as usize] {
                    found[k] = true;
                    let to = i + GAP + 1;
                    if to > self.next[b as usize] {
                        self.next[b as usize] = to;
                        grew = true;
                    }
                }
            }
            if !grew {
                return found;
            }
        }
    }
}

/// A chain whose blocks after genesis and `prefix` hold one transaction each, paying
/// `blocks[n]`; returns it with each block's transaction.
fn build(gen: &mut ChainGen, blocks: &[Vec<Pay>], salt: u32) -> Vec<Txid> {
    let mut txids = Vec::new();
    for (n, pays) in blocks.iter().enumerate() {
        let height = gen.height() + 1;
        let cb = gen.coinbase(
            height,
            vec![TxOut {
                value: Amount::from_sat(50),
                script_pubkey: ScriptBuf::from_bytes(vec![0x51]),
            }],
        );
        let tx = paying(pays, salt * 1000 + n as u32);
        txids.push(tx.compute_txid());
        gen.add_block(cb, vec![tx]);
    }
    txids
}

/// The outpoints the model says are watched on the final chain.
fn expected(blocks: &[Vec<Pay>], found: &[Vec<bool>], txids: &[Txid]) -> BTreeSet<OutPoint> {
    let mut out = BTreeSet::new();
    for ((pays, f), txid) in blocks.iter().zip(found).zip(txids) {
        for (vout, (_, hit)) in pays.iter().zip(f).enumerate() {
            if *hit {
                out.insert(OutPoint::new(*txid, vout as u32));
            }
        }
    }
    out
}

fn open(dir: &std::path::Path) -> Store {
    let store = Store::open(dir, NET).unwrap();
    indexer::wallets::add(&store, NET, "deposits", &[descriptor()], None, GAP).unwrap();
    store
}

fn index(store: &Store, blocks: &[Block]) {
    let files = tempfile::tempdir().unwrap();
    write_blk_file(&files.path().join("blk00000.dat"), NET, blocks, [0; 8]);
    rescan(store, NET, files.path(), None, None, None).unwrap();
}

fn watched(store: &Store) -> BTreeSet<OutPoint> {
    store
        .utxos()
        .unwrap()
        .into_iter()
        .map(|(op, _)| op)
        .collect()
}

fn ranges(store: &Store) -> [u32; 2] {
    let get = |branch| {
        let v = store
            .get(
                Cf::Ranges,
                &schema::range_key(indexer::types::WalletId(0), 0, branch),
            )
            .unwrap()
            .unwrap();
        schema::decode_range(&v).unwrap().next
    };
    [get(0), get(1)]
}

/// A reorg: `common` blocks, then branch `a` indexed, then the longer branch `b` from
/// the same fork. The model sees A's blocks, then B's (A's growth stays).
fn reorg_case(
    common: &[Vec<Pay>],
    a: &[Vec<Pay>],
    b: &[Vec<Pay>],
) -> (BTreeSet<OutPoint>, BTreeSet<OutPoint>, [u32; 2], [u32; 2]) {
    let mut gen = ChainGen::new(9, script_palette(1, 4));
    let common_txids = build(&mut gen, common, 1);
    let mut branch_b = gen.clone();
    build(&mut gen, a, 2);
    let b_txids = build(&mut branch_b, b, 3);
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    index(&store, gen.blocks());
    // Both branches in the files; B is longer, so it is the best chain.
    let mut all = gen.blocks().to_vec();
    all.extend_from_slice(&branch_b.blocks()[common.len() + 1..]);
    index(&store, &all);

    let mut model = Model::new();
    let found_common: Vec<Vec<bool>> = common.iter().map(|p| model.block(p)).collect();
    for p in a {
        model.block(p);
    }
    let found_b: Vec<Vec<bool>> = b.iter().map(|p| model.block(p)).collect();
    let mut want = expected(common, &found_common, &common_txids);
    want.extend(expected(b, &found_b, &b_txids));
    (watched(&store), want, ranges(&store), model.next)
}

#[test]
fn payments_across_the_gap_in_one_block_and_through_a_reorg_match_the_model() {
    // 1.
    let blocks: Vec<Vec<Pay>> = vec![
        vec![(0, 3)],                       // inside the first gap: range to 9
        vec![(0, 8), (0, 13)],              // 13 only once 8 grew the range: to 19
        vec![(0, 25)],                      // past the end: never found
        (14..20).map(|i| (0, i)).collect(), // the whole gap, and 19 past it: to 25
        vec![(1, 4), (1, 10), (0, 24)],     // the other branch apart; 24 now inside
    ];
    let mut gen = ChainGen::new(8, script_palette(1, 4));
    let txids = build(&mut gen, &blocks, 0);
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    index(&store, gen.blocks());
    let mut model = Model::new();
    let found: Vec<Vec<bool>> = blocks.iter().map(|p| model.block(p)).collect();
    assert_eq!(found[1], vec![true, true], "i and i + gap in one block");
    assert_eq!(found[2], vec![false], "past the end");
    assert!(
        found[3].iter().all(|f| *f),
        "every position of the gap: {found:?}"
    );
    assert_eq!(found[4], vec![true, false, true]);
    assert_eq!(watched(&store), expected(&blocks, &found, &txids));
    assert_eq!(ranges(&store), model.next);
    assert_eq!(model.next, [30, 10]);

    // 2.
    let common = vec![vec![(0, 3)]];
    let (got, want, r, m) = reorg_case(
        &common,
        &[vec![(0, 18)], vec![(0, 13)]],
        &[vec![(0, 1)], vec![(0, 22)], vec![(0, 2)]],
    );
    assert!(want.len() == 3, "22 is inside what A grew: {want:?}");
    assert_eq!((got, r), (want, m));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    // 3.
    #[test]
    fn random_payments_and_a_reorg_match_the_model(
        common in prop::collection::vec(prop::collection::vec((0u32..2, 0u32..30), 0..6), 1..5),
        a in prop::collection::vec(prop::collection::vec((0u32..2, 0u32..40), 0..6), 1..4),
        extra in 1usize..3,
        b in prop::collection::vec(prop::collection::vec((0u32..2, 0u32..40), 0..6), 5..8),
    ) {
        let b = &b[..(a.len() + extra).min(b.len())];
        prop_assume!(b.len() > a.len());
        let (got, want, r, m) = reorg_case(&common, &a, b);
        prop_assert_eq!(got, want);
        prop_assert_eq!(r, m);
    }
}
