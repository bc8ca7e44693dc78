//! A withdrawal end to end on real parts over 127.0.0.1: the devnet node, the indexer
//! following it and serving gRPC, the saga database, the key-file signer and the executor.
//! Submit -> RESERVED -> SIGNED -> BROADCAST -> CONFIRMING -> COMPLETED -> settled; the
//! destination receives exactly the amount and the wallet drops by amount + fee.

#![allow(clippy::unwrap_used)]

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::hex::FromHex;
use bitcoin::{Address, Amount, Network, Transaction};
use indexer::follow::FollowOptions;
use orchestrator::executor::{Executor, Policy};
use orchestrator::saga::{FeeRate, Request, State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use proto::indexer::v1 as ipb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use system_tests::live::{Devnet, Following, KeyedWallet, Served};

const WAIT: Duration = Duration::from_secs(30);

fn wait_for(store: &SagaStore, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
    let started = Instant::now();
    loop {
        let w = store.get(id).unwrap().unwrap();
        if ok(&w) {
            return w;
        }
        assert!(started.elapsed() < WAIT, "stuck at {w:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Devnet, a funded hot wallet (one key, `coins` outputs of `btc` each), the indexer
/// following and serving it, a saga database and a running executor.
struct World {
    node: Devnet,
    miner: String,
    hot: Address,
    key_file: std::path::PathBuf,
    wallets: Vec<system_tests::harness::TestWallet>,
    policy: Policy,
    store: Arc<SagaStore>,
    served: Served,
    following: Following,
    executor: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _rebuilt: Vec<tempfile::TempDir>,
}

impl World {
    fn start(coins: usize, btc: f64, policy: Policy) -> World {
        Self::start_with(coins, btc, policy, FollowOptions::default())
    }

    fn start_with(coins: usize, btc: f64, policy: Policy, follow: FollowOptions) -> World {
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(101 + coins.div_ceil(25) as u32, &miner);
        let dir = tempfile::tempdir().unwrap();
        let keyed = KeyedWallet::funded(&node, &miner, dir.path(), 11, coins, btc);
        let db = tempfile::tempdir().unwrap();
        let following = Following::start(
            node.daemon(true),
            Some(&node.zmq()),
            db.path(),
            &keyed.wallets,
            follow,
        );
        assert!(
            following.wait_for(node.best().1, WAIT),
            "the indexer caught up"
        );
        let served = Served::start(&following, indexer::grpc::Access::default());
        let store = Arc::new(SagaStore::open(&dir.path().join("sagas")).unwrap());
        let mut world = World {
            node,
            miner,
            hot: keyed.address.clone(),
            key_file: keyed.key_file.clone(),
            wallets: keyed.wallets.clone(),
            policy,
            store,
            served,
            following,
            executor: None,
            _dirs: (dir, db),
            _rebuilt: Vec::new(),
        };
        world.start_executor();
        world
    }

    /// Starts an executor on the saga database (as a restarted process would).
    fn start_executor(&mut self) {
        let executor = Executor::new(
            self.store.clone(),
            orchestrator::upstream::open_client(self.served.channel.clone()),
            Arc::new(self.node.daemon(false)),
            Arc::new(KeyFileSigner::open(&self.key_file, Network::Regtest).unwrap()),
            Network::Regtest,
            self.hot.script_pubkey(),
            self.policy.clone(),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = self.served.runtime.spawn(executor.run(async {
            let _ = stopped.await;
        }));
        self.executor = Some((stop, running));
    }

    /// Replaces the indexer with one rebuilt from scratch into a new database (another
    /// event log), serving on a new address.
    fn rebuild_indexer(&mut self) {
        let db = tempfile::tempdir().unwrap();
        let following = Following::caught_up(&self.node, db.path(), &self.wallets);
        let served = Served::start(&following, indexer::grpc::Access::default());
        self.served = served;
        self.following = following;
        self._rebuilt.push(db);
    }

    /// Stops the executor and waits until it has.
    fn stop_executor(&mut self) {
        let (stop, running) = self.executor.take().unwrap();
        let _ = stop.send(());
        self.served.runtime.block_on(running).unwrap();
    }

    fn balance(&self) -> u64 {
        let mut client = IndexerClient::new(self.served.channel.clone());
        self.served
            .runtime
            .block_on(client.get_balance(ipb::GetBalanceRequest {
                target: Some(ipb::Target {
                    target: Some(ipb::target::Target::Wallet("hot".into())),
                }),
                min_conf: 0,
            }))
            .unwrap()
            .into_inner()
            .confirmed_sat
    }

    fn tx(&self, txid: bitcoin::Txid) -> Transaction {
        let raw = self
            .node
            .call("getrawtransaction", json!([txid.to_string()]));
        deserialize(&Vec::<u8>::from_hex(raw.as_str().unwrap()).unwrap()).unwrap()
    }
}

fn script_of(address: &str) -> bitcoin::ScriptBuf {
    Address::from_str(address)
        .unwrap()
        .assume_checked()
        .script_pubkey()
}

#[test]
fn a_hundred_concurrent_withdrawals_spend_no_coin_twice_and_each_completes_once() {
    let world = World::start(
        120,
        0.01,
        Policy {
            confirmations: 1,
            settle_at: 2,
            ..Policy::default()
        },
    );
    let start_balance = world.balance();
    let destination = world.node.new_address("bech32");
    let ids: Vec<u64> = (0..100)
        .map(|i| {
            let request = Request {
                request_id: format!("batch-{i}"),
                wallet: "hot".into(),
                destination: destination.clone(),
                amount: Amount::from_sat(500_000 + i),
                fee_rate: FeeRate::SatPerVb(2.0),
                max_fee: Amount::from_sat(20_000),
            };
            world.store.submit(request, 0).unwrap().withdrawal.id
        })
        .collect();
    // Every one reaches the network before blocks confirm them.
    for id in &ids {
        wait_for(&world.store, *id, |w| w.state == State::Broadcast);
    }
    let started = Instant::now();
    while ids
        .iter()
        .any(|id| !world.store.get(*id).unwrap().unwrap().settled)
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not all settled"
        );
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut spent = std::collections::HashSet::new();
    let mut fees = 0;
    let to_destination = script_of(&destination);
    for (i, id) in ids.iter().enumerate() {
        let w = world.store.get(*id).unwrap().unwrap();
        assert_eq!((w.state, w.attempts.len()), (State::Completed, 1));
        let tx = world.tx(w.confirmed.unwrap());
        for input in &tx.input {
            assert!(spent.insert(input.previous_output), "coin spent twice");
        }
        let paid: Vec<_> = tx
            .output
            .iter()
            .filter(|o| o.script_pubkey == to_destination)
            .collect();
        assert_eq!(paid.len(), 1);
        assert_eq!(paid[0].value.to_sat(), 500_000 + i as u64);
        fees += w.current().unwrap().fee.to_sat();
    }
    let paid_total: u64 = (0..100).map(|i| 500_000 + i).sum();
    assert_eq!(world.balance(), start_balance - paid_total - fees);
    assert!(world.store.reserved().unwrap().is_empty());
}

#[test]
fn a_withdrawal_is_paid_exactly_once_and_completes() {
    let world = World::start(
        3,
        0.6,
        Policy {
            confirmations: 2,
            settle_at: 3,
            ..Policy::default()
        },
    );
    assert_eq!(world.balance(), 180_000_000);
    let (store, node) = (&world.store, &world.node);
    let destination = node.new_address("bech32m");
    let request = Request {
        request_id: "payout-1".into(),
        wallet: "hot".into(),
        destination: destination.clone(),
        amount: Amount::from_sat(40_000_000),
        fee_rate: FeeRate::SatPerVb(5.0),
        max_fee: Amount::from_sat(50_000),
    };
    let id = store.submit(request.clone(), 0).unwrap().withdrawal.id;
    let sent = wait_for(store, id, |w| w.state == State::Broadcast);
    assert_eq!(sent.attempts.len(), 1);
    // A resubmission changes nothing.
    let again = store.submit(request, 1).unwrap();
    assert!(!again.created);
    assert_eq!(again.withdrawal.id, id);

    node.mine_to(1, &world.miner);
    let w = wait_for(store, id, |w| w.state == State::Confirming);
    assert_eq!(w.confirmations, 1);
    node.mine_to(1, &world.miner);
    let done = wait_for(store, id, |w| w.state == State::Completed);
    assert!(store.reserved().unwrap().len() == done.coins.len() && !done.settled);
    node.mine_to(1, &world.miner);
    let settled = wait_for(store, id, |w| w.settled);
    assert!(store.reserved().unwrap().is_empty());

    // Paid exactly once, exactly the amount; change back to the hot wallet; the wallet
    // dropped by amount + fee.
    let txid = settled.confirmed.unwrap();
    assert_eq!(Some(txid), settled.current().map(|a| a.txid));
    let tx = world.tx(txid);
    let paid: Vec<_> = tx
        .output
        .iter()
        .filter(|o| o.script_pubkey == script_of(&destination))
        .collect();
    assert_eq!(paid.len(), 1);
    assert_eq!(paid[0].value, Amount::from_sat(40_000_000));
    assert!(tx
        .output
        .iter()
        .any(|o| o.script_pubkey == world.hot.script_pubkey()));
    let fee = settled.current().unwrap().fee.to_sat();
    assert!(fee > 0 && fee <= 50_000);
    assert_eq!(world.balance(), 180_000_000 - 40_000_000 - fee);
}

#[test]
fn insufficient_funds_and_fee_caps_fail_without_reserving_anything() {
    let world = World::start(1, 0.1, Policy::default());
    let destination = world.node.new_address("bech32");
    let ask = |id: &str, sat: u64, max_fee: u64| Request {
        request_id: id.into(),
        wallet: "hot".into(),
        destination: destination.clone(),
        amount: Amount::from_sat(sat),
        fee_rate: FeeRate::SatPerVb(20.0),
        max_fee: Amount::from_sat(max_fee),
    };
    let poor = world
        .store
        .submit(ask("too-much", 20_000_000, 50_000), 0)
        .unwrap();
    let capped = world
        .store
        .submit(ask("fee-cap", 1_000_000, 100), 0)
        .unwrap();
    for id in [poor.withdrawal.id, capped.withdrawal.id] {
        let w = wait_for(&world.store, id, |w| w.state == State::Failed);
        assert!(w.coins.is_empty() && w.attempts.is_empty(), "{w:?}");
    }
    let reason = |id| {
        world
            .store
            .get(id)
            .unwrap()
            .unwrap()
            .failure_reason
            .unwrap()
    };
    assert!(reason(poor.withdrawal.id).contains("insufficient funds"));
    assert!(reason(capped.withdrawal.id).contains("max_fee"));
    assert!(world.store.reserved().unwrap().is_empty());
}

fn request(id: &str, destination: &str, sat: u64, rate: f64, max_fee: u64) -> Request {
    Request {
        request_id: id.into(),
        wallet: "hot".into(),
        destination: destination.into(),
        amount: Amount::from_sat(sat),
        fee_rate: FeeRate::SatPerVb(rate),
        max_fee: Amount::from_sat(max_fee),
    }
}

/// Submits a withdrawal of `sat` to a new address of the node at `rate` sat/vB (fee at
/// most 20,000 sat) and waits until it is broadcast: its id and destination.
fn broadcast(world: &World, name: &str, sat: u64, rate: f64) -> (u64, String) {
    let destination = world.node.new_address("bech32");
    let id = world
        .store
        .submit(request(name, &destination, sat, rate, 20_000), 0)
        .unwrap()
        .withdrawal
        .id;
    wait_for(&world.store, id, |w| w.state == State::Broadcast);
    (id, destination)
}

/// Mines a block at a time until `ok` holds for withdrawal `id`.
fn mine_until(world: &World, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
    let started = Instant::now();
    loop {
        let w = world.store.get(id).unwrap().unwrap();
        if ok(&w) {
            return w;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck at {w:?}"
        );
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_stuck_withdrawal_is_replaced_at_a_higher_fee_and_completes() {
    let world = World::start(
        2,
        0.5,
        Policy {
            confirmations: 1,
            settle_at: 1,
            bump_after_blocks: 1,
            ..Policy::default()
        },
    );
    // The node mines nothing below 6 sat/vB: a payment at 2 stays in its mempool.
    world.node.call("devnet_setminingfeerate", json!([6]));
    let (id, destination) = broadcast(&world, "stuck", 30_000_000, 2.0);
    let done = mine_until(&world, id, |w| w.state == State::Completed);
    assert!(done.attempts.len() >= 2, "{done:?}");
    let first = &done.attempts[0];
    let last = done.current().unwrap();
    assert!(first.fee_rate < 6.0 && last.fee_rate >= 6.0, "{done:?}");
    assert!(done.attempts.windows(2).all(|p| p[1].fee > p[0].fee));
    assert_eq!(done.confirmed, Some(last.txid));
    assert!(last.fee.to_sat() <= 20_000);
    // The replacement is what the chain holds, paying exactly the amount.
    let tx = world.tx(last.txid);
    let paid: u64 = tx
        .output
        .iter()
        .filter(|o| o.script_pubkey == script_of(&destination))
        .map(|o| o.value.to_sat())
        .sum();
    assert_eq!(paid, 30_000_000);
    let replaced = world
        .node
        .try_call("getrawtransaction", json!([first.txid.to_string()]));
    assert!(replaced.is_err(), "the first version is gone");
}

#[test]
fn a_reorg_that_drops_a_confirmed_withdrawal_sends_it_back_and_it_completes_again() {
    let world = World::start(
        2,
        0.5,
        Policy {
            confirmations: 2,
            settle_at: 6,
            ..Policy::default()
        },
    );
    let (id, _) = broadcast(&world, "reorg", 10_000_000, 3.0);
    let w = mine_until(&world, id, |w| w.state == State::Completed);
    let txid = w.confirmed.unwrap();
    // Replace the blocks since the one that confirmed it: the payment returns to the
    // mempool and the index disconnects it.
    let (height, _) = world.node.best();
    let confirmed_at = height + 1 - w.confirmations;
    let block = world.node.hash_at(confirmed_at);
    world
        .node
        .call("invalidateblock", json!([block.to_string()]));
    let back = wait_for(&world.store, id, |w| {
        w.state == State::Confirming && w.confirmations == 0
    });
    assert_eq!(back.confirmed, None);
    let again = mine_until(&world, id, |w| w.settled);
    assert_eq!(
        (again.state, again.confirmed),
        (State::Completed, Some(txid))
    );
    assert_eq!(
        again.attempts.len(),
        1,
        "the same transaction confirmed again"
    );
    assert!(world.store.reserved().unwrap().is_empty());
}

#[test]
fn after_a_stop_long_enough_for_the_event_log_to_be_pruned_monitoring_resumes_from_the_present() {
    let mut follow = FollowOptions::default();
    follow.pipeline.write.event_retention = Some(4);
    let mut world = World::start_with(
        2,
        0.5,
        Policy {
            confirmations: 3,
            settle_at: 6,
            ..Policy::default()
        },
        follow,
    );
    let (id, _) = broadcast(&world, "pruned", 10_000_000, 3.0);
    let w = mine_until(&world, id, |w| w.confirmed.is_some());
    assert_eq!(w.state, State::Confirming);
    world.stop_executor();
    let stopped_at = world.store.cursor().unwrap().unwrap();
    // While it is stopped, a reorg moves the payment one block lower, then the chain
    // grows past the log's retention.
    let confirmed_at = world.node.best().0 + 1 - w.confirmations;
    let parent = world.node.hash_at(confirmed_at - 1);
    world
        .node
        .call("invalidateblock", json!([parent.to_string()]));
    world.node.mine_to(10, &world.miner);
    assert!(world.following.wait_for(world.node.best().1, WAIT));
    let (tip, _) = world.node.best();
    let info = world.node.call(
        "getrawtransaction",
        json!([w.confirmed.unwrap().to_string(), true]),
    );
    let block = info["blockhash"].as_str().unwrap().parse().unwrap();
    let moved_to = (0..=tip)
        .rev()
        .find(|h| world.node.hash_at(*h) == block)
        .unwrap();
    assert_eq!(moved_to, confirmed_at - 1, "the reorg moved it");
    // The offset the monitor stopped at is gone from the indexer's log.
    let mut client = IndexerClient::new(world.served.channel.clone());
    let refused = world
        .served
        .runtime
        .block_on(client.subscribe(ipb::SubscribeRequest {
            from_offset: stopped_at,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    world.start_executor();
    let done = wait_for(&world.store, id, |w| w.settled);
    assert_eq!(
        (done.state, done.confirmed, done.attempts.len()),
        (State::Completed, w.confirmed, 1)
    );
    // Counted from where it is now, not where it was before the stop.
    assert_eq!(done.confirmations, tip + 1 - moved_to, "{done:?}");
    assert!(world.store.cursor().unwrap().unwrap() > stopped_at);
    assert!(world.store.reserved().unwrap().is_empty());
}

#[test]
fn after_the_indexer_is_rebuilt_monitoring_moves_to_the_new_log_and_completes() {
    let mut world = World::start(
        2,
        0.5,
        Policy {
            confirmations: 3,
            settle_at: 4,
            ..Policy::default()
        },
    );
    let (id, _) = broadcast(&world, "rebuilt", 10_000_000, 3.0);
    let w = mine_until(&world, id, |w| w.confirmed.is_some());
    world.stop_executor();
    let old_log = world.store.log_id().unwrap();
    assert_eq!(old_log.len(), 32, "{old_log}");
    world.rebuild_indexer();
    let mut client = IndexerClient::new(world.served.channel.clone());
    let new_log = world
        .served
        .runtime
        .block_on(client.get_tip(ipb::GetTipRequest {}))
        .unwrap()
        .into_inner()
        .log_id;
    assert_ne!(new_log, old_log);
    world.start_executor();
    let done = mine_until(&world, id, |w| w.settled);
    assert_eq!(
        (done.state, done.confirmed, done.attempts.len()),
        (State::Completed, w.confirmed, 1)
    );
    // The cursor now belongs to the rebuilt index's log.
    assert_eq!(world.store.log_id().unwrap(), new_log);
}
