//! The gRPC API while following a node: deposits in the mempool, their confirmation, an RBF
//! replacement that pays elsewhere, an eviction, and the events a consumer sees for each.
//!
//! The devnet (bitcoind's RPC, REST and ZMQ on 127.0.0.1 ephemeral ports) validates every
//! transaction with Bitcoin Core's script interpreter; the test signs its own P2WPKH
//! transactions to replace one.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bitcoin::{Address, Amount};
use indexer::follow::FollowOptions;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use system_tests::harness::TestWallet;
use system_tests::live::{fund, Devnet, Following, Indexer, Served, TestKey};

const WAIT: Duration = Duration::from_secs(30);

/// A client of an indexer's gRPC server, and the runtime its calls run on.
struct Api<'a> {
    runtime: &'a tokio::runtime::Runtime,
    client: IndexerClient<tonic::transport::Channel>,
}

impl<'a> Api<'a> {
    fn of(f: &'a Indexer) -> Api<'a> {
        Api {
            runtime: &f.runtime,
            client: IndexerClient::new(f.channel.clone()),
        }
    }

    fn over(served: &'a Served) -> Api<'a> {
        Api {
            runtime: &served.runtime,
            client: IndexerClient::new(served.channel.clone()),
        }
    }

    fn balance(&mut self) -> pb::GetBalanceResponse {
        let req = pb::GetBalanceRequest {
            target: Some(pb::Target {
                target: Some(pb::target::Target::Wallet("hot".into())),
            }),
            min_conf: 0,
        };
        self.runtime
            .block_on(self.client.get_balance(req))
            .unwrap()
            .into_inner()
    }

    fn transfer(&mut self, txid: &str) -> Option<pb::Transfer> {
        let req = pb::GetTransferRequest {
            txid: txid.to_owned(),
        };
        self.runtime
            .block_on(self.client.get_transfer(req))
            .ok()
            .map(|r| r.into_inner().transfers.remove(0))
    }

    /// Polls `f` until it returns `Some`, for at most `WAIT`; returns it and the time taken.
    fn until<T>(&mut self, mut f: impl FnMut(&mut Api<'a>) -> Option<T>) -> (T, Duration) {
        let started = Instant::now();
        while started.elapsed() < WAIT {
            if let Some(v) = f(self) {
                return (v, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("condition not reached within {WAIT:?}");
    }

    fn events(&mut self) -> Vec<pb::Event> {
        let mut stream = self
            .runtime
            .block_on(self.client.subscribe(pb::SubscribeRequest {
                from_offset: 0,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        let mut events = Vec::new();
        // The stream follows live: read what is there, then stop waiting.
        while let Ok(Ok(Some(e))) = self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        }) {
            events.push(e);
        }
        events
    }
}

fn status(t: &pb::Transfer) -> pb::TransferStatus {
    pb::TransferStatus::try_from(t.status).unwrap()
}

/// Wallet `hot` watching one new address of `node`: the address, its script, the wallet.
fn hot_wallet(node: &Devnet) -> (String, bitcoin::ScriptBuf, Vec<TestWallet>) {
    let deposit = node.new_address("bech32");
    let script = Address::from_str(&deposit)
        .unwrap()
        .assume_checked()
        .script_pubkey();
    let wallets = vec![TestWallet {
        name: "hot".into(),
        scripts: BTreeSet::from([script.clone()]),
    }];
    (deposit, script, wallets)
}

#[test]
fn deposits_show_unconfirmed_then_confirmed_and_replacements_are_marked() {
    let node = Devnet::start(|c| c.filler_txs = 2);
    let (deposit, script, wallets) = hot_wallet(&node);
    let elsewhere = node.new_address("bech32m");
    node.mine_to(110, &node.new_address("bech32"));
    let key = TestKey::new();
    let (coin, value) = fund(&node, &key, 1.0);

    let db = tempfile::tempdir().unwrap();
    let f = Indexer::start(Indexer::settings(&node, db.path()), &wallets);
    assert!(f.wait_for(node.best().1, WAIT));
    let mut api = Api::of(&f);
    assert_eq!(api.balance().confirmed_sat, 0);

    // 1. A deposit appears as unconfirmed as soon as bitcoind accepts it.
    let fee = Amount::from_sat(1_000);
    let tx1 = key.spend(coin, value, &script, fee);
    let txid1 = tx1.compute_txid().to_string();
    node.call(
        "sendrawtransaction",
        json!([bitcoin::consensus::encode::serialize_hex(&tx1)]),
    );
    let (_, seen_after) = api.until(|a| {
        let b = a.balance();
        (b.unconfirmed_sat == (value - fee).to_sat()).then_some(())
    });
    eprintln!("deposit visible as unconfirmed {seen_after:?} after sendrawtransaction");
    let t = api.transfer(&txid1).unwrap();
    assert_eq!(status(&t), pb::TransferStatus::Mempool);
    assert_eq!(t.received[0].value_sat, (value - fee).to_sat());
    assert_eq!(t.confirmations, 0);

    // 2. An RBF replacement paying elsewhere: the deposit is marked replaced, not dropped.
    let tx2 = key.spend(
        coin,
        value,
        &Address::from_str(&elsewhere)
            .unwrap()
            .assume_checked()
            .script_pubkey(),
        Amount::from_sat(5_000),
    );
    let txid2 = tx2.compute_txid().to_string();
    node.call(
        "sendrawtransaction",
        json!([bitcoin::consensus::encode::serialize_hex(&tx2)]),
    );
    let (t, _) = api.until(|a| {
        a.transfer(&txid1)
            .filter(|t| status(t) == pb::TransferStatus::Replaced)
    });
    assert_eq!(t.replaced_by, txid2);
    assert_eq!(api.balance().unconfirmed_sat, 0);

    // 3. A deposit from the node's wallet: unconfirmed, then confirmed by the next block.
    let txid3 = node.call("sendtoaddress", json!([deposit, 0.5]));
    let txid3 = txid3.as_str().unwrap().to_owned();
    api.until(|a| (a.balance().unconfirmed_sat == 50_000_000).then_some(()));
    node.mine_to(1, &elsewhere);
    assert!(f.wait_for(node.best().1, WAIT));
    let (b, _) = api.until(|a| {
        let b = a.balance();
        (b.unconfirmed_sat == 0).then_some(b)
    });
    assert_eq!(b.confirmed_sat, 50_000_000);
    let t = api.transfer(&txid3).unwrap();
    assert_eq!(status(&t), pb::TransferStatus::Confirmed);
    assert_eq!(t.confirmations, 1);

    // 4. A deposit evicted from the mempool without a conflict.
    let txid4 = node.call("sendtoaddress", json!([deposit, 0.25]));
    let txid4 = txid4.as_str().unwrap().to_owned();
    api.until(|a| (a.balance().unconfirmed_sat == 25_000_000).then_some(()));
    node.call("devnet_evict", json!([txid4]));
    api.until(|a| {
        a.transfer(&txid4)
            .filter(|t| status(t) == pb::TransferStatus::Evicted)
    });
    assert_eq!(api.balance().unconfirmed_sat, 0);

    // The event log tells the same story, in order, each event naming the wallet.
    let story: Vec<(pb::EventKind, String)> = api
        .events()
        .into_iter()
        .filter(|e| [&txid1, &txid3, &txid4].contains(&&e.txid))
        .inspect(|e| assert_eq!(e.wallets, ["hot"], "{e:?}"))
        .map(|e| (pb::EventKind::try_from(e.kind).unwrap(), e.txid))
        .collect();
    assert_eq!(
        story,
        vec![
            (pb::EventKind::TransferSeen, txid1.clone()),
            (pb::EventKind::TransferReplaced, txid1),
            (pb::EventKind::TransferSeen, txid3.clone()),
            (pb::EventKind::TransferConfirmed, txid3),
            (pb::EventKind::TransferSeen, txid4.clone()),
            (pb::EventKind::TransferEvicted, txid4),
        ]
    );
    drop(api);
    f.stop().unwrap();
}

/// 1. A deposit confirms: CONFIRMED at its block.
/// 2. Its block leaves the chain and the deposit goes back to the mempool: MEMPOOL.
/// 3. bitcoind drops it from the mempool: REORGED_OUT, with the height and block that held
///    it and no confirmations (not NOT_FOUND, though no block holds it).
/// 4. Sent and mined again: CONFIRMED at its new block; the log says confirmed, reorged
///    out, confirmed.
#[test]
fn a_transfer_reorged_out_and_not_in_the_mempool_is_served_as_reorged_out() {
    let node = Devnet::start(|c| c.filler_txs = 0);
    let (deposit, _, wallets) = hot_wallet(&node);
    let miner = node.new_address("bech32");
    node.mine_to(110, &miner);
    let db = tempfile::tempdir().unwrap();
    let f = Indexer::start(Indexer::settings(&node, db.path()), &wallets);
    let mut api = Api::of(&f);
    let txid = node.call("sendtoaddress", json!([deposit, 0.5]));
    let txid = txid.as_str().unwrap().to_owned();
    let raw = node.call("getrawtransaction", json!([txid]));
    let block = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(block, WAIT));
    let t = api.transfer(&txid).unwrap();
    assert_eq!(
        (status(&t), t.confirmations),
        (pb::TransferStatus::Confirmed, 1)
    );
    let confirmed_at = t.height;

    node.call("invalidateblock", json!([block.to_string()]));
    let (t, _) = api.until(|a| {
        a.transfer(&txid)
            .filter(|t| status(t) == pb::TransferStatus::Mempool)
    });
    assert_eq!(t.confirmations, 0);
    node.call("devnet_evict", json!([txid]));
    let (t, _) = api.until(|a| {
        a.transfer(&txid)
            .filter(|t| status(t) == pb::TransferStatus::ReorgedOut)
    });
    assert_eq!(
        (t.height, t.block_hash.as_str(), t.confirmations),
        (confirmed_at, block.to_string().as_str(), 0)
    );
    assert_eq!(t.received[0].value_sat, 50_000_000);

    node.call("sendrawtransaction", json!([raw]));
    let again = node.mine_to(2, &miner);
    assert!(f.wait_for(again[1], WAIT));
    let t = api.transfer(&txid).unwrap();
    assert_eq!(
        (status(&t), t.block_hash),
        (pb::TransferStatus::Confirmed, again[0].to_string())
    );
    let story: Vec<pb::EventKind> = api
        .events()
        .into_iter()
        .filter(|e| e.txid == txid)
        .inspect(|e| assert_eq!(e.wallets, ["hot"], "{e:?}"))
        .map(|e| pb::EventKind::try_from(e.kind).unwrap())
        .filter(|k| *k != pb::EventKind::TransferSeen && *k != pb::EventKind::TransferEvicted)
        .collect();
    assert_eq!(
        story,
        vec![
            pb::EventKind::TransferConfirmed,
            pb::EventKind::TransferReorgedOut,
            pb::EventKind::TransferConfirmed
        ]
    );
    drop(api);
    f.stop().unwrap();
}

/// 1. A deposit from the node's wallet is confirmed by a block; following stops there.
/// 2. The mempool tracker still holds the deposit, as it does for a moment after a live
///    block commits and before the tracker hears the block mined it.
/// 3. GetBalance counts the deposit once: confirmed, and not also unconfirmed.
#[test]
fn a_deposit_confirmed_before_the_mempool_hears_of_it_is_counted_once() {
    let node = Devnet::start(|c| c.filler_txs = 0);
    let (deposit, script, wallets) = hot_wallet(&node);
    let miner = node.new_address("bech32");
    node.mine_to(110, &miner);
    let db = tempfile::tempdir().unwrap();
    let f = Following::start(
        node.daemon(true),
        Some(&node.zmq()),
        db.path(),
        &wallets,
        FollowOptions::default(),
    );
    let served = Served::start(&f, indexer::grpc::Access::default());
    let mut api = Api::over(&served);
    let txid = node.call("sendtoaddress", json!([deposit, 0.5]));
    let raw = node.call("getrawtransaction", json!([txid]));
    let tx: bitcoin::Transaction =
        bitcoin::consensus::encode::deserialize_hex(raw.as_str().unwrap()).unwrap();
    let block = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(block, WAIT));
    let (store, mempool) = (f.store.clone(), f.mempool.clone());
    f.stop().unwrap();

    let filter = indexer::script_filter::ScriptFilter::new(10, 0.001);
    filter.insert(script.as_bytes());
    // The tracker may still hold it (stopped inside that moment), or take it back here.
    mempool
        .write()
        .unwrap()
        .added(&store, &filter, &tx)
        .unwrap();
    assert!(
        mempool.read().unwrap().get(&tx.compute_txid()).is_some(),
        "the tracker holds the deposit"
    );
    let b = api.balance();
    assert_eq!(
        (b.confirmed_sat, b.unconfirmed_sat),
        (50_000_000, 0),
        "counted once: {b:?}"
    );
}
