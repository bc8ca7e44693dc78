//! Balance and UTXO queries against the reference model.
//!
//! Scenarios:
//! 1. mainnet 0..4312 (`../shared/fixtures`): every wallet's balance, at min_conf 0 and
//!    1000, equals the model; paging with small pages returns every UTXO exactly once.
//! 2. a query reads one snapshot: blocks committed after it was taken are not seen.
//! 3. address, script and wallet targets agree on a generated regtest chain; bad targets
//!    and bad page tokens are clear errors.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use bitcoin::{Address, Network, OutPoint};
use indexer::query::{Query, QueryError, Target};
use system_tests::chaingen::{script_palette, ChainGen};
use system_tests::fixtures::{fixture, read_blk_blocks, write_blk_file};
use system_tests::harness::{all_scripts, open_with_wallets, rescan, wallets_over, TestWallet};
use system_tests::reference::{self, Model};

fn model_utxos(model: &Model, w: &TestWallet, min_conf: u32) -> BTreeSet<OutPoint> {
    model
        .utxos
        .iter()
        .filter(|(_, u)| w.scripts.contains(&u.script) && model.tip + 1 - u.height >= min_conf)
        .map(|(op, _)| *op)
        .collect()
}

fn model_balance(model: &Model, w: &TestWallet, min_conf: u32) -> (u64, u64, u64) {
    let ops = model_utxos(model, w, min_conf);
    let mut b = (0, 0, 0);
    for op in ops {
        let u = &model.utxos[&op];
        if u.coinbase && model.tip < u.height + 100 {
            b.1 += u.value;
        } else {
            b.0 += u.value;
        }
        b.2 += 1;
    }
    b
}

/// (height, txid) of every transaction that pays or spends an output of `w`'s scripts:
/// the wallet's history, computed the plain way.
fn model_history(
    chain: &[bitcoin::Block],
    watched: &BTreeSet<bitcoin::ScriptBuf>,
    w: &TestWallet,
) -> Vec<(u32, bitcoin::Txid)> {
    let mut owner = std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for (height, block) in chain.iter().enumerate() {
        for tx in &block.txdata {
            let txid = tx.compute_txid();
            let mut involved = false;
            if !tx.is_coinbase() {
                for i in &tx.input {
                    if let Some(s) = owner.remove(&i.previous_output) {
                        involved |= w.scripts.contains(&s);
                    }
                }
            }
            for (vout, o) in tx.output.iter().enumerate() {
                if height > 0
                    && watched.contains(&o.script_pubkey)
                    && !o.script_pubkey.is_op_return()
                {
                    involved |= w.scripts.contains(&o.script_pubkey);
                    owner.insert(OutPoint::new(txid, vout as u32), o.script_pubkey.clone());
                }
            }
            if involved {
                out.push((height as u32, txid));
            }
        }
    }
    out
}

fn err<T>(r: Result<T, QueryError>) -> String {
    r.err().expect("an error").to_string()
}

fn all_pages(q: &Query<'_>, target: &Target, min_conf: u32, limit: u32) -> Vec<OutPoint> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let (page, next) = q
            .list_utxos(target, min_conf, limit, token.as_deref())
            .unwrap();
        assert!(page.len() <= limit as usize);
        out.extend(page.iter().map(|e| e.outpoint));
        match next {
            Some(t) => token = Some(t),
            None => return out,
        }
    }
}

#[test]
fn balances_and_pages_match_the_model_on_mainnet_blocks() {
    let file = fixture("mainnet-0-4312/blk00000.dat");
    let chain = read_blk_blocks(&file);
    let wallets = wallets_over(&chain, 21);
    let blocks = tempfile::tempdir().unwrap();
    std::fs::copy(&file, blocks.path().join("blk00000.dat")).unwrap();
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);

    // Index to 2000, take a snapshot, index the rest: the snapshot still answers for 2000.
    rescan(
        &store,
        Network::Bitcoin,
        blocks.path(),
        None,
        Some(2000),
        None,
    )
    .unwrap();
    let early = Query::new(&store, Network::Bitcoin).unwrap();
    rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
    let model_2000 = reference::compute(&chain[..2001], 0, &all_scripts(&wallets));
    assert_eq!(early.tip().unwrap().0, 2000);
    let b = early.balance(&Target::Wallet("hot".into()), 0).unwrap();
    assert_eq!(
        (b.confirmed, b.immature, b.utxo_count),
        model_2000.balance(&wallets[0].scripts)
    );

    let model = reference::compute(&chain, 0, &all_scripts(&wallets));
    let q = Query::new(&store, Network::Bitcoin).unwrap();
    for w in &wallets {
        let target = Target::Wallet(w.name.clone());
        for min_conf in [0, 1, 1000, 4000] {
            let b = q.balance(&target, min_conf).unwrap();
            assert_eq!(
                (b.confirmed, b.immature, b.utxo_count),
                model_balance(&model, w, min_conf),
                "{} min_conf {min_conf}",
                w.name
            );
        }
        let listed = all_pages(&q, &target, 0, 7);
        let unique: BTreeSet<OutPoint> = listed.iter().copied().collect();
        assert_eq!(unique.len(), listed.len(), "an outpoint listed twice");
        assert_eq!(unique, model_utxos(&model, w, 0));
        let deep: BTreeSet<OutPoint> = all_pages(&q, &target, 1000, 50).into_iter().collect();
        assert_eq!(deep, model_utxos(&model, w, 1000));

        // History, in chain order, paged; and each transfer found again by txid.
        let mut history = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let (page, next) = q
                .list_transfers(&w.name, 0, None, 13, token.as_deref())
                .unwrap();
            history.extend(page);
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        let expected = model_history(&chain, &all_scripts(&wallets), w);
        let got: Vec<(u32, bitcoin::Txid)> = history.iter().map(|t| (t.height, t.txid)).collect();
        let mut sorted = expected.clone();
        sorted.sort();
        assert_eq!(got, sorted, "history of {}", w.name);
        for t in history.iter().step_by(97) {
            let again = q.transfer(&t.txid.to_string()).unwrap();
            assert!(again.contains(t));
            assert_eq!(t.confirmations, 4312 + 1 - t.height);
            assert!(t
                .received
                .iter()
                .map(|r| &r.script)
                .chain(t.spent.iter().map(|s| &s.script))
                .any(|s| s.wallets.contains(&w.name)));
        }
        let (window, _) = q
            .list_transfers(&w.name, 1000, Some(2000), 1000, None)
            .unwrap();
        assert!(window.iter().all(|t| (1000..=2000).contains(&t.height)));
        assert_eq!(
            window.len(),
            sorted
                .iter()
                .filter(|(h, _)| (1000..=2000).contains(h))
                .count()
        );
    }
}

#[test]
fn targets_agree_and_bad_requests_are_clear_errors() {
    let palette = script_palette(31, 18);
    let mut gen = ChainGen::new(31, palette.clone());
    for i in 0..130 {
        gen.add_random_block(i % 6);
    }
    let dir = tempfile::tempdir().unwrap();
    write_blk_file(
        &dir.path().join("blk00000.dat"),
        Network::Regtest,
        gen.blocks(),
        [0; 8],
    );
    let p2wpkh = palette[3].clone();
    let wallet = TestWallet {
        name: "one".into(),
        scripts: [p2wpkh.clone()].into(),
    };
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Regtest, std::slice::from_ref(&wallet));
    rescan(&store, Network::Regtest, dir.path(), None, None, None).unwrap();
    let q = Query::new(&store, Network::Regtest).unwrap();

    let address = Address::from_script(&p2wpkh, Network::Regtest)
        .unwrap()
        .to_string();
    let by_wallet = q.balance(&Target::Wallet("one".into()), 1).unwrap();
    let by_address = q.balance(&Target::Address(address.clone()), 1).unwrap();
    let by_script = q
        .balance(&Target::ScriptHex(p2wpkh.to_hex_string()), 1)
        .unwrap();
    assert_eq!(by_wallet, by_address);
    assert_eq!(by_wallet, by_script);
    assert!(
        by_wallet.utxo_count > 0,
        "the chain pays the watched script"
    );
    let (page, _) = q
        .list_utxos(&Target::Address(address.clone()), 0, 1000, None)
        .unwrap();
    assert!(page
        .iter()
        .all(|e| e.address.as_ref().map(|a| a.to_string()) == Some(address.clone())));
    assert_eq!(page.len() as u64, by_wallet.utxo_count);

    assert!(err(q.balance(&Target::Wallet("nobody".into()), 0)).contains("unknown wallet"));
    assert!(err(q.balance(
        &Target::Address("bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu".into()),
        0
    ))
    .contains("not a regtest address"));
    assert!(
        err(q.balance(&Target::Address("not-an-address".into()), 0)).contains("invalid address")
    );
    assert!(err(q.balance(&Target::ScriptHex("zz".into()), 0)).contains("invalid script_hex"));
    assert!(err(q.transfer("abc")).contains("invalid txid"));
    assert!(q.transfer(&"00".repeat(32)).unwrap().is_empty());
    assert!(err(q.list_transfers("one", 10, Some(5), 10, None)).contains("above to_height"));
    assert!(err(q.list_transfers("one", 0, None, 10, Some("00"))).contains("invalid page token"));
    let wallet_target = Target::Wallet("one".into());
    assert!(
        err(q.list_utxos(&wallet_target, 0, 10, Some("garbage"))).contains("invalid page token")
    );
    // A well-formed token of another script is refused, not silently restarted.
    let other = palette[4].to_hex_string();
    let (_, token) = q.list_utxos(&wallet_target, 0, 1, None).unwrap();
    let token = token.expect("more than one utxo");
    assert!(
        err(q.list_utxos(&Target::ScriptHex(other), 0, 10, Some(&token)))
            .contains("invalid page token")
    );
    // Huge limits are capped.
    let (page, _) = q.list_utxos(&wallet_target, 0, u32::MAX, None).unwrap();
    assert!(page.len() <= indexer::query::MAX_PAGE as usize);
}

/// A database from before the per-height aggregates existed (simulated: the family
/// emptied and its built flag removed) builds them when opened, equal to those kept
/// while indexing: the same state digest, the same `min_conf` balances.
#[test]
fn an_older_database_builds_its_per_height_aggregates_on_open() {
    use indexer::store::schema::{self, Cf};
    use indexer::store::Batch;
    let file = fixture("mainnet-0-599/blk00000.dat");
    let chain = read_blk_blocks(&file);
    let wallets = wallets_over(&chain, 5);
    let blocks = tempfile::tempdir().unwrap();
    std::fs::copy(&file, blocks.path().join("blk00000.dat")).unwrap();
    let db = tempfile::tempdir().unwrap();
    let kept = {
        let store = open_with_wallets(db.path(), Network::Bitcoin, &wallets);
        rescan(&store, Network::Bitcoin, blocks.path(), None, None, None).unwrap();
        let digest = store.digest().unwrap();
        let q = Query::new(&store, Network::Bitcoin).unwrap();
        let b = q.balance(&Target::Wallet("hot".into()), 150).unwrap();
        let mut batch = Batch::default();
        batch.delete_range(&store, Cf::WalletRecent, &[0], &[0xff; 9]);
        batch.delete(&store, Cf::Meta, schema::META_RECENT_BUILT);
        store.commit(batch, true).unwrap();
        assert_ne!(store.digest().unwrap(), digest, "the aggregates are gone");
        (digest, (b.confirmed, b.immature, b.utxo_count))
    };
    let store = indexer::store::Store::open(db.path(), Network::Bitcoin).unwrap();
    assert_eq!(store.digest().unwrap(), kept.0);
    let q = Query::new(&store, Network::Bitcoin).unwrap();
    let b = q.balance(&Target::Wallet("hot".into()), 150).unwrap();
    assert_eq!((b.confirmed, b.immature, b.utxo_count), kept.1);
}
