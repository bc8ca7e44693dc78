//! A withdrawal end to end on real parts over 127.0.0.1: the devnet node, the indexer
//! following it and serving gRPC, the saga database, the key-file signer and the executor.
//! Submit -> RESERVED -> SIGNED -> BROADCAST -> CONFIRMING -> COMPLETED -> settled; the
//! destination receives exactly the amount and the wallet drops by amount + fee.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::hex::FromHex;
use bitcoin::{Address, Amount, Network, Transaction};
use indexer::config::{KafkaSettings, Settings};
use orchestrator::config::TemporalTarget;
use orchestrator::executor::{Boundaries, Boundary, Executor, Policy};
use orchestrator::kafka_events::KafkaEvents;
use orchestrator::payment::Payments;
use orchestrator::saga::{FeeRate, Priority, Request, State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use orchestrator::temporal::hot_wallet::HotWalletWorkflow;
use orchestrator::temporal::service::TemporalWithdrawals;
use orchestrator::temporal::WorkflowPolicy;
use proto::indexer::v1 as ipb;
use proto::indexer::v1::indexer_client::IndexerClient;
use proto::orchestrator::v1 as pb;
use serde_json::json;
use system_tests::harness::script_of;
use system_tests::kafka::Broker;
use system_tests::live::{Devnet, Indexer, KeyedWallet};
use system_tests::temporal::TemporalServer;

const WAIT: Duration = Duration::from_secs(30);

/// Devnet, a funded hot wallet (one key, `coins` outputs of `btc` each), `indexer run`
/// following and serving it, a saga database and a running executor.
struct World {
    node: Devnet,
    miner: String,
    hot: Address,
    key_file: std::path::PathBuf,
    wallets: Vec<system_tests::harness::TestWallet>,
    policy: Policy,
    store: Arc<SagaStore>,
    served: Indexer,
    executor: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
    /// With events from Kafka: the broker the indexer exports to, and where to read.
    kafka: Option<(Broker, KafkaEvents)>,
    /// On the Temporal engine: the dev server, the workers and the API over them
    /// (`store` and the executor are then unused).
    temporal: Option<TemporalWorld>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _rebuilt: Vec<tempfile::TempDir>,
}

/// A broker of its own with the indexer's topic (3 partitions), and where to read it.
fn kafka_source() -> (Broker, KafkaEvents) {
    let broker = Broker::start();
    broker.create_topic("indexer.events", 3);
    let events = KafkaEvents {
        brokers: broker.bootstrap(),
        topic: "indexer.events".into(),
        group_id: "orchestrator".into(),
        properties: Default::default(),
    };
    (broker, events)
}

/// Which engine runs the sagas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Embedded,
    Temporal,
}

/// The Temporal engine of a world: a dev server, worker processes' worth of workers
/// (each `temporal::worker::run` on a thread and runtime of its own, as `orchestrator run`
/// runs it) and the API object the tests call.
struct TemporalWorld {
    server: TemporalServer,
    target: TemporalTarget,
    api: TemporalWithdrawals,
    client: temporalio_client::Client,
    workers: Vec<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    /// Numeric id -> request id, as submitted.
    ids: std::sync::Mutex<std::collections::HashMap<u64, String>>,
}

impl Drop for TemporalWorld {
    fn drop(&mut self) {
        system_tests::temporal::record_histories(&self.target);
        // While the server still runs, so the workers stop cleanly.
        for (stop, running) in self.workers.drain(..) {
            let _ = stop.send(());
            let _ = running.join();
        }
    }
}

impl World {
    fn start(coins: usize, btc: f64, policy: Policy) -> World {
        Self::start_with(coins, btc, policy, None)
    }

    /// The world on `engine`, running.
    fn on(engine: Engine, coins: usize, btc: f64, policy: Policy) -> World {
        match engine {
            Engine::Embedded => Self::start(coins, btc, policy),
            Engine::Temporal => Self::on_temporal(Self::idle(coins, btc, policy, None)),
        }
    }

    /// The Temporal engine over the devnet and indexer of `world`, one worker running;
    /// each watching workflow also looks at the chain every 5 s on its own.
    fn on_temporal(world: World) -> World {
        Self::on_temporal_polling(world, 5)
    }

    /// The same, the workflows' own look every `poll_secs` (long: only the adapter's
    /// signals move them).
    fn on_temporal_polling(mut world: World, poll_secs: u64) -> World {
        let server = TemporalServer::start();
        let (target, client) = system_tests::temporal::connect_to(&server, &world.served.runtime);
        let api = TemporalWithdrawals::new(
            client.clone(),
            "default".into(),
            "withdrawals".into(),
            Network::Regtest,
            WorkflowPolicy {
                poll_secs,
                ..WorkflowPolicy::of(&world.policy)
            },
        );
        world.temporal = Some(TemporalWorld {
            server,
            target,
            api,
            client,
            workers: Vec::new(),
            ids: Default::default(),
        });
        world.start_worker();
        world
    }

    /// Starts one more Temporal worker (a process's worth: worker, adapter and API).
    fn start_worker(&mut self) {
        self.start_worker_with(self.served.channel.clone());
    }

    /// Starts a Temporal worker reaching the indexer over `indexer`.
    fn start_worker_with(&mut self, indexer: tonic::transport::Channel) {
        self.start_worker_hooked(indexer, None);
    }

    /// Starts a Temporal worker whose activities tell `hook` when they finished.
    fn start_worker_hooked(
        &mut self,
        indexer: tonic::transport::Channel,
        hook: Option<Arc<dyn orchestrator::temporal::worker::ActivityHook>>,
    ) {
        let t = self.temporal.as_mut().unwrap();
        let engine = orchestrator::temporal::worker::Engine {
            target: t.target.clone(),
            network: Network::Regtest,
            payments: Payments::new(
                Arc::new(self.node.daemon(false)),
                Arc::new(KeyFileSigner::open(&self.key_file, Network::Regtest).unwrap()),
                Network::Regtest,
                self.hot.script_pubkey(),
                self.policy.clone(),
            ),
            indexer: orchestrator::indexer_client::open_client(indexer),
            events: self.kafka.as_ref().map(|(_, events)| events.clone()),
            hook,
        };
        t.workers.push(system_tests::temporal::spawn_worker(engine));
    }

    /// Submits `request` through the engine's API: the withdrawal as it is then.
    fn submit(&self, request: Request) -> Withdrawal {
        self.try_submit(request).unwrap()
    }

    /// Submits `request`: the withdrawal, or the refusal's message.
    fn try_submit(&self, request: Request) -> Result<Withdrawal, String> {
        match &self.temporal {
            None => self
                .store
                .submit(request, 0)
                .map(|s| s.withdrawal)
                .map_err(|e| e.to_string()),
            Some(t) => {
                use proto::orchestrator::v1::withdrawals_server::Withdrawals;
                let pb_rate = match request.fee_rate {
                    FeeRate::SatPerVb(r) => {
                        proto::orchestrator::v1::submit_withdrawal_request::FeeRate::SatPerVb(r)
                    }
                    FeeRate::TargetBlocks(b) => {
                        proto::orchestrator::v1::submit_withdrawal_request::FeeRate::TargetBlocks(
                            b.into(),
                        )
                    }
                    FeeRate::Priority(p) => {
                        let p = match p {
                            Priority::Low => pb::Priority::Low,
                            Priority::Normal => pb::Priority::Normal,
                            Priority::High => pb::Priority::High,
                        };
                        proto::orchestrator::v1::submit_withdrawal_request::FeeRate::Priority(
                            p.into(),
                        )
                    }
                };
                let asked = proto::orchestrator::v1::SubmitWithdrawalRequest {
                    request_id: request.request_id.clone(),
                    wallet: request.wallet.clone(),
                    destination: request.destination.clone(),
                    amount_sat: request.amount.to_sat(),
                    max_fee_sat: request.max_fee.to_sat(),
                    fee_rate: Some(pb_rate),
                };
                // UNAVAILABLE: submitted again with the same request id, as a client
                // does (the API answers a repeated request id with the same withdrawal).
                let started = Instant::now();
                let shown = loop {
                    let asked = tonic::Request::new(asked.clone());
                    match self.served.runtime.block_on(t.api.submit_withdrawal(asked)) {
                        Ok(shown) => break shown.into_inner(),
                        Err(e) if e.code() == tonic::Code::Unavailable => {
                            eprintln!("submitting {}: {e}; asking again", request.request_id);
                            assert!(started.elapsed() < WAIT, "{e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        Err(e) => return Err(e.message().to_owned()),
                    }
                };
                t.ids
                    .lock()
                    .unwrap()
                    .insert(shown.id, request.request_id.clone());
                Ok(self.get(shown.id))
            }
        }
    }

    /// The withdrawal's whole record (the embedded store's, or the workflow's state).
    fn get(&self, id: u64) -> Withdrawal {
        match &self.temporal {
            None => self.store.get(id).unwrap().unwrap(),
            Some(t) => {
                let request_id = t.ids.lock().unwrap()[&id].clone();
                // UNAVAILABLE (a query the server could not have answered now, e.g. on a
                // loaded machine) means "ask again", as the API says.
                let started = Instant::now();
                loop {
                    match self.served.runtime.block_on(t.api.status(&request_id)) {
                        Ok(w) => return w.expect("the workflow exists"),
                        Err(e) if e.code() == tonic::Code::Unavailable => {
                            eprintln!("querying withdrawal {id}: {e}; asking again");
                            assert!(started.elapsed() < WAIT, "{e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => panic!("querying withdrawal {id}: {e}"),
                    }
                }
            }
        }
    }

    /// Batch `id`'s own record (on Temporal, its workflow's state).
    fn batch(&self, id: u64) -> Withdrawal {
        let Some(t) = &self.temporal else {
            return self.store.batch(id).unwrap().unwrap();
        };
        let workflow = self.served.runtime.block_on(t.api.workflow_of(id)).unwrap();
        self.served
            .runtime
            .block_on(t.api.status(&workflow))
            .unwrap()
            .expect("the batch's workflow exists")
    }

    /// The balancing runs of `kind` so far (on Temporal, as its search index shows them:
    /// registered for [`World::get`]).
    fn runs(&self, kind: orchestrator::balancing::Kind) -> Vec<Withdrawal> {
        use proto::orchestrator::v1::withdrawals_server::Withdrawals;
        let Some(t) = &self.temporal else {
            return self.store.by_request_prefix(kind.prefix()).unwrap();
        };
        let listed =
            self.served
                .runtime
                .block_on(t.api.list_withdrawals(tonic::Request::new(
                    pb::ListWithdrawalsRequest {
                        wallet: "hot".into(),
                        limit: 1000,
                        ..Default::default()
                    },
                )));
        let Ok(listed) = listed else {
            return Vec::new();
        };
        let ids: Vec<u64> = listed
            .into_inner()
            .withdrawals
            .into_iter()
            .filter(|w| w.request_id.starts_with(kind.prefix()))
            .map(|w| {
                t.ids.lock().unwrap().insert(w.id, w.request_id);
                w.id
            })
            .collect();
        ids.into_iter().map(|id| self.get(id)).collect()
    }

    /// Waits until `ok` holds for withdrawal `id`.
    fn wait_for(&self, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
        let started = Instant::now();
        loop {
            let w = self.get(id);
            if ok(&w) {
                return w;
            }
            assert!(started.elapsed() < WAIT, "stuck at {w:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether withdrawal `id`'s workflow has ended (Temporal).
    fn workflow_ended(&self, id: u64) -> bool {
        let t = self.temporal.as_ref().unwrap();
        let request_id = t.ids.lock().unwrap()[&id].clone();
        let handle = t
            .client
            .get_workflow_handle::<orchestrator::temporal::withdrawal::WithdrawalWorkflow>(
                request_id,
            );
        let described = self
            .served
            .runtime
            .block_on(handle.describe(temporalio_client::WorkflowDescribeOptions::default()))
            .unwrap();
        described.status() != temporalio_client::WorkflowExecutionStatus::Running
    }

    /// Waits up to a minute until `ok` holds for withdrawal `id` (a slow indexer).
    fn wait_for_long(&self, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
        let started = Instant::now();
        loop {
            let w = self.get(id);
            if ok(&w) {
                return w;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "stuck at {w:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every coin some withdrawal holds.
    fn reserved(&self) -> std::collections::HashSet<bitcoin::OutPoint> {
        match &self.temporal {
            None => self.store.reserved().unwrap(),
            Some(t) => {
                let wallet = t.client.get_workflow_handle::<HotWalletWorkflow>(
                    orchestrator::temporal::hot_wallet_workflow_id("hot"),
                );
                let held = self.served.runtime.block_on(wallet.query(
                    HotWalletWorkflow::held,
                    (),
                    temporalio_client::WorkflowQueryOptions::default(),
                ));
                match held {
                    Ok(held) => held.values().flatten().map(|c| c.outpoint).collect(),
                    Err(temporalio_client::errors::WorkflowQueryError::NotFound(_)) => {
                        Default::default()
                    }
                    Err(e) => panic!("querying the hot wallet: {e}"),
                }
            }
        }
    }

    /// Follows withdrawal `id` with WatchWithdrawal: the states streamed, once the stream
    /// ends (at a final state).
    fn watch(&self, id: u64) -> tokio::task::JoinHandle<Vec<i32>> {
        use proto::orchestrator::v1::withdrawals_server::Withdrawals;
        use tokio_stream::StreamExt;
        let req = || tonic::Request::new(pb::WatchWithdrawalRequest { id });
        let stream = match &self.temporal {
            None => {
                let service = orchestrator::grpc::WithdrawalService::new(
                    self.store.clone(),
                    Network::Regtest,
                );
                self.served
                    .runtime
                    .block_on(service.watch_withdrawal(req()))
            }
            Some(t) => self.served.runtime.block_on(t.api.watch_withdrawal(req())),
        };
        let mut stream = stream.unwrap().into_inner();
        self.served.runtime.spawn(async move {
            let mut seen = Vec::new();
            while let Some(w) = stream.next().await {
                seen.push(w.unwrap().state);
            }
            seen
        })
    }

    /// Cancels withdrawal `id` through the engine's API.
    fn cancel(&self, id: u64) -> Result<Withdrawal, tonic::Status> {
        use proto::orchestrator::v1::withdrawals_server::Withdrawals;
        let req = tonic::Request::new(proto::orchestrator::v1::CancelWithdrawalRequest { id });
        match &self.temporal {
            None => {
                let service = orchestrator::grpc::WithdrawalService::new(
                    self.store.clone(),
                    Network::Regtest,
                );
                self.served.runtime.block_on(service.cancel_withdrawal(req))
            }
            Some(t) => self.served.runtime.block_on(t.api.cancel_withdrawal(req)),
        }
        .map(|_| self.get(id))
    }

    fn start_with(coins: usize, btc: f64, policy: Policy, retention: Option<u64>) -> World {
        let mut world = Self::idle(coins, btc, policy, retention);
        world.start_executor();
        world
    }

    /// The world with its indexer exporting to a Kafka broker of its own and the executor
    /// taking its events from the topic (`events = "kafka"`).
    fn start_on_kafka(coins: usize, btc: f64, policy: Policy) -> World {
        let mut world = Self::idle_with(coins, btc, policy, None, Some(kafka_source()));
        world.start_executor();
        world
    }

    /// The world with no executor running yet.
    /// `retention`: events the indexer keeps in its log (`None`: all).
    fn idle(coins: usize, btc: f64, policy: Policy, retention: Option<u64>) -> World {
        Self::idle_with(coins, btc, policy, retention, None)
    }

    fn idle_with(
        coins: usize,
        btc: f64,
        policy: Policy,
        retention: Option<u64>,
        kafka: Option<(Broker, KafkaEvents)>,
    ) -> World {
        let node = Devnet::start(|c| c.filler_txs = 0);
        let miner = node.new_address("bech32");
        node.mine_to(101 + coins.div_ceil(25) as u32, &miner);
        let dir = tempfile::tempdir().unwrap();
        let keyed = KeyedWallet::funded(&node, &miner, dir.path(), 11, coins, btc);
        let db = tempfile::tempdir().unwrap();
        let settings = Settings {
            event_retention: retention,
            kafka: KafkaSettings {
                brokers: kafka.as_ref().map(|(b, _)| b.bootstrap()),
                ..KafkaSettings::default()
            },
            ..Indexer::settings(&node, db.path())
        };
        let served = Indexer::start(settings, &keyed.wallets);
        assert!(
            served.wait_for(node.best().1, WAIT),
            "the indexer caught up"
        );
        let store = Arc::new(SagaStore::open(&dir.path().join("sagas")).unwrap());
        World {
            node,
            miner,
            hot: keyed.address.clone(),
            key_file: keyed.key_file.clone(),
            wallets: keyed.wallets.clone(),
            policy,
            store,
            served,
            executor: None,
            kafka,
            temporal: None,
            _dirs: (dir, db),
            _rebuilt: Vec::new(),
        }
    }

    /// Starts an executor on the saga database (as a restarted process would).
    fn start_executor(&mut self) {
        self.start_executor_with(self.served.channel.clone(), None);
    }

    /// Starts an executor reaching the indexer over `indexer`, told of every step
    /// boundary when `boundaries` is given.
    fn start_executor_with(
        &mut self,
        indexer: tonic::transport::Channel,
        boundaries: Option<Arc<dyn Boundaries>>,
    ) {
        let mut executor = Executor::new(
            self.store.clone(),
            orchestrator::indexer_client::open_client(indexer),
            Payments::new(
                Arc::new(self.node.daemon(false)),
                Arc::new(KeyFileSigner::open(&self.key_file, Network::Regtest).unwrap()),
                Network::Regtest,
                self.hot.script_pubkey(),
                self.policy.clone(),
            ),
        );
        if let Some(b) = boundaries {
            executor = executor.with_boundaries(b);
        }
        if let Some((_, events)) = &self.kafka {
            executor = executor.with_kafka_events(events.clone());
        }
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
        self.served = Indexer::caught_up(&self.node, db.path(), &self.wallets);
        self._rebuilt.push(db);
    }

    /// Stops every Temporal worker and waits until they have.
    fn stop_workers(&mut self) {
        if let Some(t) = &mut self.temporal {
            for (stop, running) in t.workers.drain(..) {
                let _ = stop.send(());
                running.join().unwrap();
            }
        }
    }

    /// Stops the saga runner (the executor, or the Temporal workers) and starts it again,
    /// as a restarted process would.
    fn restart_engine(&mut self) {
        if self.temporal.is_some() {
            self.stop_workers();
            self.start_worker();
        } else {
            self.stop_executor();
            self.start_executor();
        }
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

#[test]
fn a_hundred_concurrent_withdrawals_spend_no_coin_twice_and_each_completes_once() {
    a_hundred_concurrent_withdrawals(Engine::Embedded);
}

#[test]
fn on_temporal_a_hundred_concurrent_withdrawals_spend_no_coin_twice_and_each_complete_once() {
    a_hundred_concurrent_withdrawals(Engine::Temporal);
}

/// The same with payout queues: the hundred are paid by a few batches.
#[test]
fn a_hundred_concurrent_withdrawals_in_batches_spend_no_coin_twice_and_each_completes_once() {
    a_hundred_concurrent_withdrawals_with(World::start(120, 0.01, batching_hundred()));
}

/// The same on Temporal, two workers: the wallet's workflow keeps the queue, each batch
/// is a workflow of its own and every member follows it.
#[test]
fn on_temporal_a_hundred_concurrent_withdrawals_in_batches_spend_no_coin_twice_and_complete_once() {
    // Submitted one by one through the API (seconds on a loaded machine, where the
    // embedded test writes all at one instant): a window of 5 s, so batches fill up to
    // their most outputs rather than close on the clock.
    let mut policy = batching_hundred();
    policy.batch = Some(orchestrator::executor::Batching {
        window_ms: 5_000,
        max_outputs: 30,
    });
    a_hundred_concurrent_withdrawals_with(World::on(Engine::Temporal, 120, 0.01, policy));
}

fn batching_hundred() -> Policy {
    Policy {
        confirmations: 1,
        settle_at: 2,
        batch: Some(orchestrator::executor::Batching {
            window_ms: 1_000,
            max_outputs: 30,
        }),
        ..Policy::default()
    }
}

fn a_hundred_concurrent_withdrawals(engine: Engine) {
    let world = World::on(
        engine,
        120,
        0.01,
        Policy {
            confirmations: 1,
            settle_at: 2,
            ..Policy::default()
        },
    );
    a_hundred_concurrent_withdrawals_with(world);
}

fn a_hundred_concurrent_withdrawals_with(mut world: World) {
    if world.temporal.is_some() {
        // Two workers: their reservations meet only in the hot wallet's workflow.
        world.start_worker();
    }
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
            match world.temporal {
                // Submitted now (not at time 0): the batch window counts.
                None => {
                    let now = orchestrator::saga::now_ms();
                    world.store.submit(request, now).unwrap().withdrawal.id
                }
                Some(_) => world.submit(request).id,
            }
        })
        .collect();
    // Every one reaches the network before blocks confirm them.
    for id in &ids {
        world.wait_for(*id, |w| w.state == State::Broadcast);
    }
    let started = Instant::now();
    while ids.iter().any(|id| !world.get(*id).settled) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not all settled"
        );
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut spent = std::collections::HashMap::new();
    let mut fees = 0;
    let mut paid = Vec::new();
    let mut batches = std::collections::HashSet::new();
    for id in &ids {
        let w = world.get(*id);
        assert_eq!((w.state, w.attempts.len()), (State::Completed, 1));
        let txid = w.confirmed.unwrap();
        // A batch's members share its transaction: its inputs and fee count once.
        if w.batch.is_some_and(|b| !batches.insert(b)) {
            continue;
        }
        let tx = world.tx(txid);
        for input in &tx.input {
            let first = spent.insert(input.previous_output, txid);
            assert!(first.is_none(), "coin spent twice");
        }
        paid.extend(outputs_to(&tx, &destination));
        fees += w.current().unwrap().fee.to_sat();
    }
    paid.sort_unstable();
    assert_eq!(paid, (0..100).map(|i| 500_000 + i).collect::<Vec<u64>>());
    if world.policy.batch.is_some() {
        assert!(batches.len() < 20, "{} batches for 100", batches.len());
    }
    let paid_total: u64 = (0..100).map(|i| 500_000 + i).sum();
    assert_eq!(world.balance(), start_balance - paid_total - fees);
    assert!(world.reserved().is_empty());
}

#[test]
fn a_withdrawal_is_paid_exactly_once_and_completes() {
    paid_exactly_once(Engine::Embedded);
}

#[test]
fn on_temporal_a_withdrawal_is_paid_exactly_once_and_completes() {
    paid_exactly_once(Engine::Temporal);
}

fn paid_exactly_once(engine: Engine) {
    let world = World::on(
        engine,
        3,
        0.6,
        Policy {
            confirmations: 2,
            settle_at: 3,
            ..Policy::default()
        },
    );
    assert_eq!(world.balance(), 180_000_000);
    let node = &world.node;
    let destination = node.new_address("bech32m");
    let request = Request {
        request_id: "payout-1".into(),
        wallet: "hot".into(),
        destination: destination.clone(),
        amount: Amount::from_sat(40_000_000),
        fee_rate: FeeRate::SatPerVb(5.0),
        max_fee: Amount::from_sat(50_000),
    };
    let id = world.submit(request.clone()).id;
    let watched = world.watch(id);
    let sent = world.wait_for(id, |w| w.state == State::Broadcast);
    assert_eq!(sent.attempts.len(), 1);
    // A resubmission changes nothing; the same request id for another payment is refused.
    let again = world.submit(request.clone());
    assert_eq!((again.id, again.created_ms), (id, sent.created_ms));
    assert_eq!(again.attempts, sent.attempts);
    let other = Request {
        amount: Amount::from_sat(40_000_001),
        ..request
    };
    let refused = world.try_submit(other).unwrap_err();
    assert!(refused.contains("already used"), "{refused}");

    node.mine_to(1, &world.miner);
    let w = world.wait_for(id, |w| w.state == State::Confirming);
    assert_eq!(w.confirmations, 1);
    node.mine_to(1, &world.miner);
    let done = world.wait_for(id, |w| w.state == State::Completed);
    assert!(world.reserved().len() == done.coins.len() && !done.settled);
    node.mine_to(1, &world.miner);
    let settled = world.wait_for(id, |w| w.settled);
    // WatchWithdrawal streamed every change in order (never back) and ended at COMPLETED
    // (final for the client), on Temporal too, where the stream polls the workflow's
    // kept changes rather than its present state (a loaded CI machine once made a
    // sampling stream miss BROADCAST and CONFIRMING).
    let seen = world.served.runtime.block_on(watched).unwrap();
    let has = |s: pb::WithdrawalState| seen.contains(&(s as i32));
    assert!(seen.windows(2).all(|p| p[0] <= p[1]), "{seen:?}");
    assert!(has(pb::WithdrawalState::Broadcast), "{seen:?}");
    assert!(has(pb::WithdrawalState::Confirming), "{seen:?}");
    assert_eq!(seen.last(), Some(&(pb::WithdrawalState::Completed as i32)));
    let released = Instant::now();
    // (On Temporal the release is a signal sent as the workflow ends.)
    while !world.reserved().is_empty() {
        assert!(released.elapsed() < WAIT, "coins still reserved");
        std::thread::sleep(Duration::from_millis(20));
    }

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
fn insufficient_funds_fee_caps_and_unknown_wallets_fail_without_reserving_anything() {
    failures_reserve_nothing(Engine::Embedded);
}

#[test]
fn on_temporal_insufficient_funds_fee_caps_and_unknown_wallets_fail_reserving_nothing() {
    failures_reserve_nothing(Engine::Temporal);
}

fn failures_reserve_nothing(engine: Engine) {
    let world = World::on(engine, 1, 0.1, Policy::default());
    let destination = world.node.new_address("bech32");
    let ask = |id: &str, sat: u64, max_fee: u64| Request {
        request_id: id.into(),
        wallet: "hot".into(),
        destination: destination.clone(),
        amount: Amount::from_sat(sat),
        fee_rate: FeeRate::SatPerVb(20.0),
        max_fee: Amount::from_sat(max_fee),
    };
    let poor = world.submit(ask("too-much", 20_000_000, 50_000)).id;
    let capped = world.submit(ask("fee-cap", 1_000_000, 100)).id;
    let unknown = world
        .submit(Request {
            wallet: "nosuch".into(),
            ..ask("no-wallet", 1_000_000, 50_000)
        })
        .id;
    for id in [poor, capped, unknown] {
        let w = world.wait_for(id, |w| w.state == State::Failed);
        assert!(w.coins.is_empty() && w.attempts.is_empty(), "{w:?}");
    }
    let reason = |id| world.get(id).failure_reason.unwrap();
    assert!(reason(poor).contains("insufficient funds"));
    assert!(reason(capped).contains("max_fee"));
    assert!(
        reason(unknown).contains("wallet nosuch is not one the indexer watches"),
        "{}",
        reason(unknown)
    );
    assert!(world.reserved().is_empty());
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
        .submit(request(name, &destination, sat, rate, 20_000))
        .id;
    world.wait_for(id, |w| w.state == State::Broadcast);
    (id, destination)
}

/// Mines a block at a time until `ok` holds for withdrawal `id`.
fn mine_until(world: &World, id: u64, ok: impl Fn(&Withdrawal) -> bool) -> Withdrawal {
    let started = Instant::now();
    loop {
        let w = world.get(id);
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
    replaced_when_stuck(Engine::Embedded);
}

#[test]
fn on_temporal_a_stuck_withdrawal_is_replaced_at_a_higher_fee_and_completes() {
    replaced_when_stuck(Engine::Temporal);
}

fn replaced_when_stuck(engine: Engine) {
    let world = World::on(
        engine,
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
    // The status says how each rate was chosen.
    assert_eq!(first.fee_choice, "fixed 2 sat/vB");
    assert!(
        last.fee_choice
            .starts_with("replacement of a version unmined after 1 blocks"),
        "{}",
        last.fee_choice
    );
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
fn fees_follow_the_estimate_the_priority_the_floor_and_the_ceiling() {
    fees_follow_the_policy(Engine::Embedded);
}

#[test]
fn on_temporal_fees_follow_the_estimate_the_priority_the_floor_and_the_ceiling() {
    fees_follow_the_policy(Engine::Temporal);
}

fn fees_follow_the_policy(engine: Engine) {
    let world = World::on(
        engine,
        4,
        0.5,
        Policy {
            fee_floor: 3.0,
            fee_ceiling: 40.0,
            ..Policy::default()
        },
    );
    // Each withdrawal broadcast at the rate chosen for `fee_rate` with bitcoind's
    // estimate at `estimate` (BTC/kvB, none when null): its current version.
    let paid = |name: &str, fee_rate: FeeRate, estimate: serde_json::Value| {
        world.node.call("devnet_setfeeestimate", json!([estimate]));
        let destination = world.node.new_address("bech32");
        let id = world
            .submit(Request {
                fee_rate,
                ..request(name, &destination, 10_000_000, 1.0, 50_000)
            })
            .id;
        let w = world.wait_for(id, |w| w.state == State::Broadcast);
        let attempt = w.current().unwrap().clone();
        // The API shows the same words.
        assert_eq!(
            orchestrator::grpc::withdrawal(&w).fee_choice,
            attempt.fee_choice
        );
        attempt
    };
    let near = |a: &orchestrator::saga::Attempt, rate: f64| {
        assert!(
            a.fee_rate >= rate && a.fee_rate < rate + 0.5,
            "{} for {rate}: {}",
            a.fee_rate,
            a.fee_choice
        );
    };
    // bitcoind without an estimate: the floor, and the status says why.
    let none = paid("none", FeeRate::Priority(Priority::High), json!(null));
    assert_eq!(
        none.fee_choice,
        "high priority: bitcoind had no estimate for 2 blocks: the fee floor, 3 sat/vB"
    );
    near(&none, 3.0);
    // A priority is the estimate for its target (low: 144 blocks by default).
    let low = paid("low", FeeRate::Priority(Priority::Low), json!(0.00012));
    assert_eq!(
        low.fee_choice,
        "low priority: bitcoind's estimate for 144 blocks, 12 sat/vB"
    );
    near(&low, 12.0);
    // An estimate above the ceiling is capped, a fixed rate below the floor raised.
    let high = paid("capped", FeeRate::TargetBlocks(3), json!(0.001));
    assert_eq!(
        high.fee_choice,
        "bitcoind's estimate for 3 blocks, 100 sat/vB, capped at the fee ceiling, 40 sat/vB"
    );
    near(&high, 40.0);
    let raised = paid("raised", FeeRate::SatPerVb(2.0), json!(null));
    assert_eq!(
        raised.fee_choice,
        "fixed 2 sat/vB, raised to the fee floor, 3 sat/vB"
    );
    near(&raised, 3.0);
}

fn reorg_policy() -> Policy {
    Policy {
        confirmations: 2,
        settle_at: 6,
        ..Policy::default()
    }
}

#[test]
fn a_reorg_that_drops_a_confirmed_withdrawal_sends_it_back_and_it_completes_again() {
    a_reorg_sends_it_back_and_it_completes_again(World::start(2, 0.5, reorg_policy()));
}

/// On Temporal with the chain's events from the Kafka topic the indexer exports to.
#[test]
fn on_temporal_and_kafka_events_a_reorg_sends_a_withdrawal_back_and_it_completes_again() {
    let world = World::idle_with(2, 0.5, reorg_policy(), None, Some(kafka_source()));
    // Only the adapter's signals (from the topic) move the workflows.
    let world = World::on_temporal_polling(world, 600);
    a_reorg_sends_it_back_and_it_completes_again(world);
}

#[test]
fn on_temporal_a_reorg_sends_a_confirmed_withdrawal_back_and_it_completes_again() {
    // Only the adapter's signals (from Subscribe) move the workflows.
    let idle = World::idle(2, 0.5, reorg_policy(), None);
    let world = World::on_temporal_polling(idle, 600);
    a_reorg_sends_it_back_and_it_completes_again(world);
}

/// The same with the executor taking its events from the Kafka topic the indexer
/// exports to: a reorg's events arrive in two partitions (the network's, the wallet's)
/// and must still apply in the log's order.
#[test]
fn on_kafka_events_a_reorg_sends_a_withdrawal_back_and_it_completes_again() {
    let world = World::start_on_kafka(2, 0.5, reorg_policy());
    a_reorg_sends_it_back_and_it_completes_again(world);
}

fn a_reorg_sends_it_back_and_it_completes_again(mut world: World) {
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
    let back = world.wait_for(id, |w| w.state == State::Confirming && w.confirmations == 0);
    assert_eq!(back.confirmed, None);
    // A restart here resumes the events from where their effects were written.
    world.restart_engine();
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
    assert!(world.reserved().is_empty());
}

#[test]
fn after_a_stop_long_enough_for_the_event_log_to_be_pruned_monitoring_resumes_from_the_present() {
    let mut world = World::start_with(
        2,
        0.5,
        Policy {
            confirmations: 3,
            settle_at: 6,
            ..Policy::default()
        },
        Some(4),
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
    assert!(world.served.wait_for(world.node.best().1, WAIT));
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
    let done = world.wait_for(id, |w| w.settled);
    assert_eq!(
        (done.state, done.confirmed, done.attempts.len()),
        (State::Completed, w.confirmed, 1)
    );
    // Counted from where it is now, not where it was before the stop.
    assert_eq!(done.confirmations, tip + 1 - moved_to, "{done:?}");
    assert!(world.store.cursor().unwrap().unwrap() > stopped_at);
    assert!(world.reserved().is_empty());
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

/// Mines until every withdrawal of `ids` is settled or cancelled, then returns what each
/// destination was paid.
fn settle_all(
    world: &World,
    ids: &[u64],
) -> std::collections::HashMap<bitcoin::ScriptBuf, Vec<u64>> {
    let started = Instant::now();
    while ids.iter().any(|id| {
        let w = world.get(*id);
        !(w.settled || w.state == State::Cancelled)
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "not all settled"
        );
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    }
    let tip = world.node.mine_to(1, &world.miner)[0];
    assert!(world.served.wait_for(tip, WAIT));
    world.served.payments(&world.node, "hot")
}

/// A cancelled withdrawal holds no transaction that could still confirm: nothing signed
/// is kept, and none of what was signed is in the node's mempool or chain.
fn assert_nothing_can_confirm(world: &World, w: &Withdrawal, signed: &[bitcoin::Txid]) {
    assert_eq!(w.state, State::Cancelled, "{w:?}");
    assert!(w.attempts.is_empty() && !w.holds_coins(), "{w:?}");
    for txid in signed {
        let known = world
            .node
            .try_call("getrawtransaction", json!([txid.to_string()]));
        assert!(known.is_err(), "cancelled, yet {txid} reached the node");
    }
}

/// 1. The indexer answers every call two seconds late (a proxy in front of it), so a
///    payment's send and the BROADCAST record after it lie seconds apart.
/// 2. A client cancels each withdrawal once its transaction has reached the node, while
///    the executor still waits for the indexer: the cancel is refused with
///    FAILED_PRECONDITION naming the txid, and the payment completes.
/// 3. Each destination is paid exactly once, its amount (a client that had been told
///    CANCELLED would have retried under a new request_id and paid again).
#[test]
fn a_cancel_after_the_send_is_refused_even_while_the_indexer_is_slow() {
    let mut world = World::idle(
        3,
        0.2,
        Policy {
            confirmations: 1,
            settle_at: 1,
            ..Policy::default()
        },
        None,
    );
    let proxy = system_tests::proxy::SlowProxy::start(
        &world.served.runtime,
        world.served.addr,
        Duration::from_secs(2),
    );
    let slow = {
        let _in_runtime = world.served.runtime.enter();
        tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect_lazy()
    };
    world.start_executor_with(slow, None);
    let mut ids = Vec::new();
    let mut expected = Vec::new();
    for round in 0..2 {
        let destination = world.node.new_address("bech32");
        let amount = 1_000_000 + round;
        let mut updates = world.store.updates();
        let id = world
            .submit(request(
                &format!("race-{round}"),
                &destination,
                amount,
                2.0,
                20_000,
            ))
            .id;
        let signed = loop {
            let w = updates.blocking_recv().unwrap();
            if w.id == id && w.state == State::Signed {
                break w;
            }
        };
        let txid = signed.current().unwrap().txid;
        let started = Instant::now();
        while world
            .node
            .try_call("getrawtransaction", json!([txid.to_string()]))
            .is_err()
        {
            assert!(started.elapsed() < WAIT, "{txid} never reached the node");
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = world.cancel(id).unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains(&txid.to_string()), "{status:?}");
        ids.push(id);
        expected.push((destination, amount));
    }
    let paid = settle_all(&world, &ids);
    for (destination, amount) in expected {
        assert_eq!(
            paid.get(&script_of(&destination)),
            Some(&vec![amount]),
            "{destination}"
        );
    }
}

/// The hot wallet's workflow grants a coin to one withdrawal only: asks for overlapping
/// coins sent at once (as two workers on two machines would) get one grant and one
/// refusal naming what is held; a repeated ask gets what its withdrawal holds; a release
/// frees the coins for the other.
#[test]
fn on_temporal_a_hot_wallet_grants_each_coin_to_one_withdrawal() {
    use orchestrator::saga::Coin;
    use orchestrator::temporal::hot_wallet::{HotWalletStart, ReserveAsk, ReserveReply};
    let world = World::on(Engine::Temporal, 1, 0.1, Policy::default());
    let t = world.temporal.as_ref().unwrap();
    let coin = |n: u8| Coin {
        outpoint: bitcoin::OutPoint::new(
            bitcoin::hashes::Hash::from_byte_array([n; 32]),
            u32::from(n),
        ),
        value: Amount::from_sat(50_000),
        script: world.hot.script_pubkey(),
    };
    let ask = |request_id: &str, coins: Vec<Coin>| {
        let options = temporalio_client::WorkflowUpdateWithStartOptions::new(
            "withdrawals",
            orchestrator::temporal::hot_wallet_workflow_id("hot"),
            temporalio_client::WorkflowIdConflictPolicy::UseExisting,
        )
        .build();
        t.client.execute_update_with_start_workflow(
            HotWalletWorkflow::run,
            HotWalletStart::default(),
            HotWalletWorkflow::reserve,
            ReserveAsk {
                request_id: request_id.into(),
                coins,
            },
            options,
        )
    };
    let (a, b) = world.served.runtime.block_on(async {
        tokio::join!(
            ask("a", vec![coin(1), coin(2)]),
            ask("b", vec![coin(2), coin(3)])
        )
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    let granted = [&a, &b]
        .iter()
        .filter(|r| matches!(r, ReserveReply::Granted(_)))
        .count();
    assert_eq!(granted, 1, "{a:?} {b:?}");
    let (winner, loser) = match &a {
        ReserveReply::Granted(_) => ("a", "b"),
        ReserveReply::Taken(_) => ("b", "a"),
    };
    match if winner == "a" { &b } else { &a } {
        ReserveReply::Taken(held) => assert!(held.contains(&coin(2).outpoint), "{held:?}"),
        other => panic!("{other:?}"),
    }
    let again = world
        .served
        .runtime
        .block_on(ask(winner, vec![coin(9)]))
        .unwrap();
    assert!(
        matches!(&again, ReserveReply::Granted(c) if c.iter().any(|c| c.outpoint == coin(2).outpoint)),
        "a repeated ask gets what it holds: {again:?}"
    );
    let wallet = t.client.get_workflow_handle::<HotWalletWorkflow>(
        orchestrator::temporal::hot_wallet_workflow_id("hot"),
    );
    world
        .served
        .runtime
        .block_on(wallet.signal(
            HotWalletWorkflow::release,
            winner.to_owned(),
            temporalio_client::WorkflowSignalOptions::default(),
        ))
        .unwrap();
    let after = world
        .served
        .runtime
        .block_on(ask(loser, vec![coin(2), coin(3)]))
        .unwrap();
    assert!(matches!(after, ReserveReply::Granted(_)), "{after:?}");
}

/// The Temporal server killed (-9) and restarted on its database while withdrawals are
/// on their way: the workers reconnect, and every workflow resumes where it was and
/// completes, each destination paid once.
#[test]
fn on_temporal_withdrawals_resume_after_the_temporal_server_restarts() {
    let mut world = World::on(
        Engine::Temporal,
        4,
        0.2,
        Policy {
            confirmations: 2,
            settle_at: 3,
            ..Policy::default()
        },
    );
    let (sent, sent_to) = broadcast(&world, "before-restart", 1_100_000, 2.0);
    world.node.mine_to(1, &world.miner);
    world.wait_for(sent, |w| w.state == State::Confirming);
    world.temporal.as_mut().unwrap().server.restart();
    let later_to = world.node.new_address("bech32");
    let later = world
        .submit(request("after-restart", &later_to, 1_200_000, 2.0, 20_000))
        .id;
    let paid = settle_all(&world, &[sent, later]);
    assert_eq!(paid.get(&script_of(&sent_to)), Some(&vec![1_100_000]));
    assert_eq!(paid.get(&script_of(&later_to)), Some(&vec![1_200_000]));
    assert!(world.reserved().is_empty());
}

/// The cancel rules on the Temporal engine, with the indexer two seconds slow (so the
/// reservation is still running when the first cancel comes):
/// 1. A cancel before anything was signed: CANCELLED, the coins given back, nothing of it
///    on the node; a retry under a new request_id pays.
/// 2. A cancel once the payment was sent: FAILED_PRECONDITION naming the txid, and the
///    payment completes. 3. A cancel of a completed one: refused.
/// 4. Each destination is paid exactly once, its amount.
#[test]
fn on_temporal_a_cancel_is_taken_before_the_send_and_refused_after() {
    let mut world = World::on(
        Engine::Temporal,
        3,
        0.2,
        Policy {
            confirmations: 1,
            settle_at: 1,
            ..Policy::default()
        },
    );
    world.stop_workers();
    let proxy = system_tests::proxy::SlowProxy::start(
        &world.served.runtime,
        world.served.addr,
        Duration::from_secs(2),
    );
    let slow = {
        let _in_runtime = world.served.runtime.enter();
        tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect_lazy()
    };
    world.start_worker_with(slow);
    let early_to = world.node.new_address("bech32");
    let early = world.submit(request("early", &early_to, 1_500_000, 2.0, 20_000));
    let cancelled = world.cancel(early.id).unwrap();
    assert_eq!(cancelled.state, State::Cancelled, "{cancelled:?}");
    let started = Instant::now();
    while !world.workflow_ended(early.id) || !world.reserved().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(60), "coins kept");
        std::thread::sleep(Duration::from_millis(100));
    }
    let retry = world.submit(request("early-retry", &early_to, 1_500_000, 2.0, 20_000));
    let late_to = world.node.new_address("bech32");
    let late = world.submit(request("late", &late_to, 1_600_000, 2.0, 20_000));
    let sent = world.wait_for_long(late.id, |w| w.state == State::Broadcast);
    let refused = world.cancel(late.id).unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let txid = sent.current().unwrap().txid.to_string();
    assert!(refused.message().contains(&txid), "{refused:?}");
    let paid = settle_all(&world, &[retry.id, late.id, early.id]);
    let done = world.cancel(late.id).unwrap_err();
    assert_eq!(done.code(), tonic::Code::FailedPrecondition, "{done:?}");
    assert_eq!(paid.get(&script_of(&early_to)), Some(&vec![1_500_000]));
    assert_eq!(paid.get(&script_of(&late_to)), Some(&vec![1_600_000]));
    let early = world.get(early.id);
    assert_nothing_can_confirm(&world, &early, &[]);
}

/// A cancel made at a boundary: the request id, the boundary, the answer (the state after
/// it, or the refusal) and the txids signed by then.
type CancelAnswer = (
    String,
    Boundary,
    Result<State, tonic::Status>,
    Vec<bitcoin::Txid>,
);

/// Cancels the withdrawal of a request id when it reaches a chosen step boundary, from
/// inside the executor (so the cancel lands exactly there), and keeps the answer.
#[derive(Default)]
struct CancelAt {
    targets: std::sync::Mutex<std::collections::HashMap<String, Boundary>>,
    answers: std::sync::Mutex<Vec<CancelAnswer>>,
    store: std::sync::OnceLock<Arc<SagaStore>>,
}

impl Boundaries for CancelAt {
    fn reached(&self, at: Boundary, w: &Withdrawal) {
        let request_id = w.request.request_id.clone();
        if self.targets.lock().unwrap().get(&request_id) != Some(&at) {
            return;
        }
        self.targets.lock().unwrap().remove(&request_id);
        let store = self.store.get().unwrap().clone();
        let id = w.id;
        let signed: Vec<bitcoin::Txid> = w.attempts.iter().map(|a| a.txid).collect();
        // The gRPC handler, on a runtime of its own: the executor waits here meanwhile.
        let answer = std::thread::spawn(move || {
            use proto::orchestrator::v1::withdrawals_server::Withdrawals;
            let service =
                orchestrator::grpc::WithdrawalService::new(store.clone(), Network::Regtest);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let req = tonic::Request::new(proto::orchestrator::v1::CancelWithdrawalRequest { id });
            runtime
                .block_on(service.cancel_withdrawal(req))
                .map(|_| store.get(id).unwrap().unwrap().state)
        })
        .join()
        .unwrap();
        self.answers
            .lock()
            .unwrap()
            .push((request_id, at, answer, signed));
    }
}

/// 1. One withdrawal per step boundary: reserved, signed, about to send, sent but not
///    recorded, broadcast, confirmed. The executor stops at that boundary while the
///    client's cancel runs through the gRPC handler.
/// 2. Before the send: CANCELLED, the coins released, the signed transaction discarded and
///    never on the node; a retry under a new request_id pays.
/// 3. From the send on: FAILED_PRECONDITION naming the txid; the payment completes.
/// 4. Each destination is paid exactly once, its amount; no coin is spent twice.
#[test]
fn a_cancel_at_every_step_boundary_pays_each_destination_at_most_once() {
    let mut world = World::idle(
        8,
        0.2,
        Policy {
            confirmations: 1,
            settle_at: 2,
            ..Policy::default()
        },
        None,
    );
    let hook = Arc::new(CancelAt::default());
    let _ = hook.store.set(world.store.clone());
    world.start_executor_with(world.served.channel.clone(), Some(hook.clone()));
    let boundaries = [
        Boundary::Reserved,
        Boundary::Signed,
        Boundary::Sending,
        Boundary::Sent,
        Boundary::Broadcast,
        Boundary::Confirmed,
    ];
    let mut ids = Vec::new();
    let mut destinations = std::collections::HashMap::new();
    for (i, at) in boundaries.iter().enumerate() {
        let name = format!("cancel-at-{}", at.name());
        hook.targets.lock().unwrap().insert(name.clone(), *at);
        let destination = world.node.new_address("bech32");
        let amount = 2_000_000 + i as u64;
        let id = world
            .submit(request(&name, &destination, amount, 2.0, 20_000))
            .id;
        destinations.insert(name, (destination, amount, id));
        ids.push(id);
    }
    // Blocks for the confirmed boundary; every hook has run once all are final.
    let started = Instant::now();
    while !hook.targets.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < WAIT,
            "boundaries never reached: {:?}",
            hook.targets.lock().unwrap()
        );
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    }
    let answers = std::mem::take(&mut *hook.answers.lock().unwrap());
    assert_eq!(answers.len(), boundaries.len());
    let mut retried = Vec::new();
    for (name, at, answer, signed) in answers {
        let (destination, amount, id) = destinations[&name].clone();
        let before_send = matches!(at, Boundary::Reserved | Boundary::Signed);
        match answer {
            Ok(state) => {
                assert!(before_send, "{name}: cancelled after the send began");
                assert_eq!(state, State::Cancelled);
                let w = world.get(id);
                assert_nothing_can_confirm(&world, &w, &signed);
                let retry = world
                    .submit(request(
                        &format!("{name}-retry"),
                        &destination,
                        amount,
                        2.0,
                        20_000,
                    ))
                    .id;
                retried.push(retry);
            }
            Err(status) => {
                assert!(!before_send, "{name}: refused before the send: {status:?}");
                assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{name}");
                let txid = signed.last().unwrap().to_string();
                assert!(status.message().contains(&txid), "{name}: {status:?}");
            }
        }
    }
    assert_eq!(
        retried.len(),
        2,
        "the two cancels before the send were accepted"
    );
    ids.extend(retried);
    let paid = settle_all(&world, &ids);
    for (name, (destination, amount, _)) in &destinations {
        assert_eq!(
            paid.get(&script_of(destination)),
            Some(&vec![*amount]),
            "{name}"
        );
    }
    assert!(world.reserved().is_empty());
}

/// On Kafka events, stored read positions past the topic's end (a topic recreated by a
/// broker that lost its data, being filled again) are not resumed from, which would skip
/// what lands below them: the present state is read again, and positions with it.
#[test]
fn on_kafka_events_positions_past_the_topics_end_are_replaced_by_the_present_state() {
    let mut world = World::start_on_kafka(
        2,
        0.5,
        Policy {
            confirmations: 2,
            settle_at: 3,
            ..Policy::default()
        },
    );
    let (id, _) = broadcast(&world, "past-the-end", 10_000_000, 3.0);
    let w = mine_until(&world, id, |w| w.confirmed.is_some());
    world.stop_executor();
    let cursor = world.store.cursor().unwrap().unwrap();
    let gone = orchestrator::store::Observation {
        cursor,
        kafka: Some((0..3).map(|p| (p, 1_000_000_000)).collect()),
        ..Default::default()
    };
    world.store.observe(&gone).unwrap();
    world.start_executor();
    let done = mine_until(&world, id, |w| w.settled);
    assert_eq!(
        (done.state, done.confirmed),
        (State::Completed, w.confirmed)
    );
    // The planted positions go with the present state read again; the next events
    // applied write real ones (the withdrawal may settle before that: the executor reads
    // the tip itself too), so more blocks: one a second, since a block mined before the
    // monitor read the present state again is in that state, not in new events. Kept,
    // the planted positions would stay for good.
    let started = Instant::now();
    let mut mined = started - Duration::from_secs(1);
    loop {
        if mined.elapsed() >= Duration::from_secs(1) {
            world.node.mine_to(1, &world.miner);
            mined = Instant::now();
        }
        let positions = world.store.kafka_positions().unwrap();
        if positions
            .as_ref()
            .is_some_and(|p| p.values().all(|o| *o < 1_000_000_000))
        {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "never read again from real positions: {positions:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The values `tx` pays to `destination`.
fn outputs_to(tx: &Transaction, destination: &str) -> Vec<u64> {
    let script = script_of(destination);
    tx.output
        .iter()
        .filter(|o| o.script_pubkey == script)
        .map(|o| o.value.to_sat())
        .collect()
}

/// Cancels one withdrawal the first time a batch holding it is signed: the moment a
/// member leaves a batch whose signed bytes never left the orchestrator.
struct CancelAtBatchSigned {
    store: Arc<SagaStore>,
    member: u64,
    done: std::sync::atomic::AtomicBool,
}

impl Boundaries for CancelAtBatchSigned {
    fn reached(&self, at: Boundary, w: &Withdrawal) {
        let holds = w
            .members
            .as_ref()
            .is_some_and(|ms| ms.iter().any(|m| m.id == self.member));
        if at == Boundary::Signed && holds && !self.done.swap(true, Ordering::SeqCst) {
            let member = self.store.get(self.member).unwrap().unwrap();
            let left = self
                .store
                .record(&member, orchestrator::saga::Outcome::Cancelled, 0)
                .unwrap();
            assert_eq!(left.state, State::Cancelled);
        }
    }
}

/// Withdrawals of one wallet and fee policy arriving within the batch window are paid by
/// one transaction, each keeping its own id and state: a member cancelled after the batch
/// was signed (not sent) leaves it and the batch is signed again without it; one of
/// another fee policy is paid alone; a reorg sends every member back to CONFIRMING and
/// the same transaction completes them all again. Each destination is paid its amount
/// once; the wallet drops by the amounts and one fee per transaction.
#[test]
fn withdrawals_in_one_window_are_paid_by_one_transaction_through_a_leave_and_a_reorg() {
    let mut world = World::idle(4, 0.5, two_second_window(), None);
    let start_balance = world.balance();
    let now = orchestrator::saga::now_ms();
    let mut submitted = Vec::new();
    for (i, rate) in [2.0, 2.0, 2.0, 2.0, 3.0].into_iter().enumerate() {
        let destination = world.node.new_address("bech32");
        let amount = 1_000_000 + i as u64 * 1_000;
        let req = request(&format!("q-{i}"), &destination, amount, rate, 20_000);
        let id = world.store.submit(req, now).unwrap().withdrawal.id;
        submitted.push((id, destination, amount));
    }
    let ids: Vec<u64> = submitted.iter().map(|s| s.0).collect();
    let leaving = ids[2];
    let hook = Arc::new(CancelAtBatchSigned {
        store: world.store.clone(),
        member: leaving,
        done: Default::default(),
    });
    world.start_executor_with(world.served.channel.clone(), Some(hook.clone()));
    world.wait_for(ids[0], |w| w.state == State::Broadcast);
    assert!(
        hook.done.load(Ordering::SeqCst),
        "the member left at signing"
    );
    one_batch_through_a_reorg(&mut world, &submitted, leaving, start_balance);
}

/// Holds the answer of the first signature until the test lets it go: a member is
/// cancelled while its batch's version paying it is being signed.
#[derive(Default)]
struct HoldFirstSignature {
    reached: std::sync::atomic::AtomicBool,
    released: std::sync::atomic::AtomicBool,
}

impl orchestrator::temporal::worker::ActivityHook for HoldFirstSignature {
    fn finished(&self, activity_type: &str) {
        if activity_type != "withdrawal.sign" || self.reached.swap(true, Ordering::SeqCst) {
            return;
        }
        let started = Instant::now();
        while !self.released.load(Ordering::SeqCst) && started.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The same on Temporal, two workers: four withdrawals queue in the wallet's workflow
/// and one batch claims them; a member is cancelled while the batch's version paying it
/// is being signed (the signature's answer held back): it leaves, that version is never
/// recorded, and the batch is signed again without it. One of another fee policy is
/// paid alone; a reorg sends every member back to CONFIRMING and the same transaction
/// completes them again. Each destination is paid its amount once.
#[test]
fn on_temporal_withdrawals_in_one_window_are_paid_by_one_transaction_through_a_leave_and_a_reorg() {
    let mut world = World::on_temporal(World::idle(4, 0.5, two_second_window(), None));
    let hook = Arc::new(HoldFirstSignature::default());
    world.stop_workers();
    for _ in 0..2 {
        world.start_worker_hooked(world.served.channel.clone(), Some(hook.clone()));
    }
    let start_balance = world.balance();
    let mut submitted: Vec<(u64, String, u64)> = Vec::new();
    for (i, rate) in [2.0, 2.0, 2.0, 2.0, 3.0].into_iter().enumerate() {
        if i == 4 {
            // The batch's signature is held: the member leaves now.
            let started = Instant::now();
            while !hook.reached.load(Ordering::SeqCst) {
                assert!(started.elapsed() < WAIT, "the batch was never signed");
                std::thread::sleep(Duration::from_millis(20));
            }
            let leaving = submitted[2].0;
            let left = world
                .cancel(leaving)
                .expect("a member leaves before its batch is sent");
            assert_eq!(left.state, State::Cancelled, "{left:?}");
            hook.released.store(true, Ordering::SeqCst);
        }
        let destination = world.node.new_address("bech32");
        let amount = 1_000_000 + i as u64 * 1_000;
        let req = request(&format!("q-{i}"), &destination, amount, rate, 20_000);
        let id = world.submit(req).id;
        submitted.push((id, destination, amount));
    }
    let leaving = submitted[2].0;
    one_batch_through_a_reorg(&mut world, &submitted, leaving, start_balance);
}

/// Two confirmations complete, six settle; payout queues of a two-second window.
fn two_second_window() -> Policy {
    Policy {
        confirmations: 2,
        settle_at: 6,
        batch: Some(orchestrator::executor::Batching {
            window_ms: 2_000,
            max_outputs: 10,
        }),
        ..Policy::default()
    }
}

/// Four withdrawals of `submitted` (the fifth of another fee policy) paid by one batch
/// that `leaving` left before it was sent: each member shows the batch's transaction,
/// the fifth is paid alone; completed, reorged out (every member back to CONFIRMING) and
/// completed again by the same transaction after a restart of the engine. Each
/// destination is paid its amount once; the wallet drops by the amounts and one fee per
/// transaction; nothing stays reserved.
fn one_batch_through_a_reorg(
    world: &mut World,
    submitted: &[(u64, String, u64)],
    leaving: u64,
    start_balance: u64,
) {
    let ids: Vec<u64> = submitted.iter().map(|s| s.0).collect();
    let first = world.wait_for(ids[0], |w| w.state == State::Broadcast);
    let batch_id = first.batch.expect("paid by a batch");
    let batch = world.batch(batch_id);
    let txid = first.current().unwrap().txid;
    for id in [ids[0], ids[1], ids[3]] {
        let w = world.wait_for(id, |w| w.state == State::Broadcast);
        assert_eq!((w.batch, w.attempts.len()), (Some(batch_id), 1), "{w:?}");
        assert_eq!(w.current().unwrap().txid, txid);
    }
    let left = world.get(leaving);
    assert_eq!((left.state, left.attempts.len()), (State::Cancelled, 0));
    let mut members: Vec<u64> = batch.members.unwrap().iter().map(|m| m.id).collect();
    let mut expected = vec![ids[0], ids[1], ids[3]];
    members.sort_unstable();
    expected.sort_unstable();
    assert_eq!(members, expected);
    let alone = world.wait_for(ids[4], |w| w.state == State::Broadcast);
    assert_eq!(alone.batch, None, "another fee policy: paid alone");
    // One transaction pays the three members, one output each.
    let tx = world.tx(txid);
    for (id, destination, amount) in submitted {
        let to = outputs_to(&tx, destination);
        let expected = if [ids[0], ids[1], ids[3]].contains(id) {
            vec![*amount]
        } else {
            vec![]
        };
        assert_eq!(to, expected, "withdrawal {id}");
    }
    // Confirmed, completed, then reorged out: every member goes back.
    let done = mine_until(world, ids[0], |w| w.state == State::Completed);
    let (height, _) = world.node.best();
    let block = world.node.hash_at(height + 1 - done.confirmations);
    world
        .node
        .call("invalidateblock", json!([block.to_string()]));
    for id in [ids[0], ids[1], ids[3]] {
        world.wait_for(id, |w| w.state == State::Confirming && w.confirmations == 0);
    }
    world.restart_engine();
    let paid = settle_all(world, &ids);
    let mut fees = 0;
    for (id, destination, amount) in submitted {
        let w = world.get(*id);
        if *id == leaving {
            assert_eq!(paid.get(&script_of(destination)), None);
            continue;
        }
        assert_eq!(w.state, State::Completed, "{w:?}");
        assert_eq!(paid.get(&script_of(destination)), Some(&vec![*amount]));
        if *id == ids[4] || *id == ids[0] {
            fees += w.current().unwrap().fee.to_sat();
        }
    }
    assert_eq!(
        world.get(ids[1]).confirmed,
        Some(txid),
        "the same transaction"
    );
    let amounts: u64 = submitted
        .iter()
        .filter(|s| s.0 != leaving)
        .map(|s| s.2)
        .sum();
    assert_eq!(world.balance(), start_balance - amounts - fees);
    assert!(world.reserved().is_empty());
}

/// A stuck batch is replaced by fee and withdrawals waiting in its queue join the
/// replacement (paid from its change). Then the earlier version, which does not pay them,
/// confirms after all (a miner had it): the first members complete by it, the joiners
/// wait until it is settled and are then paid by a new transaction. Each destination is
/// paid exactly its amount once.
#[test]
fn a_stuck_batch_gains_members_when_replaced_and_an_earlier_version_pays_only_its_own() {
    gains_members_when_stuck(Engine::Embedded);
}

/// The same on Temporal: the joiners are taken from the wallet's queue and claimed by
/// the batch's workflow; each member's workflow shows its own versions.
#[test]
fn on_temporal_a_stuck_batch_gains_members_and_an_earlier_version_pays_only_its_own() {
    gains_members_when_stuck(Engine::Temporal);
}

fn gains_members_when_stuck(engine: Engine) {
    use orchestrator::executor::Batching;
    let policy = Policy {
        confirmations: 1,
        settle_at: 2,
        bump_after_blocks: 1,
        batch: Some(Batching {
            window_ms: 600_000,
            max_outputs: 10,
        }),
        ..Policy::default()
    };
    let mut world = World::idle(2, 0.5, policy.clone(), None);
    // The node mines nothing below 6 sat/vB: a payment at 2 stays in its mempool.
    world.node.call("devnet_setminingfeerate", json!([6]));
    // On Temporal the first two are submitted under a one-second window (a workflow
    // keeps the policy it started with), the late ones under ten minutes.
    let quick = engine == Engine::Temporal;
    if quick {
        let mut short = policy.clone();
        short.batch = Some(Batching {
            window_ms: 1_000,
            max_outputs: 10,
        });
        world.policy = short;
        world = World::on_temporal(world);
    }
    let mut submitted = Vec::new();
    let mut submit = |world: &World, i: usize, created_ms: u64| {
        let destination = world.node.new_address("bech32");
        let amount = 2_000_000 + i as u64;
        let req = request(&format!("grow-{i}"), &destination, amount, 2.0, 20_000);
        let id = match engine {
            Engine::Embedded => world.store.submit(req, created_ms).unwrap().withdrawal.id,
            Engine::Temporal => world.submit(req).id,
        };
        submitted.push((id, destination, amount));
        id
    };
    // Two that waited their window out: batched at once.
    let first = [submit(&world, 0, 0), submit(&world, 1, 0)];
    if engine == Engine::Embedded {
        world.start_executor();
    }
    let sent = world.wait_for(first[0], |w| w.state == State::Broadcast);
    let batch_id = sent.batch.unwrap();
    if let Some(t) = &mut world.temporal {
        t.api = t.api.clone().with_policy(WorkflowPolicy {
            poll_secs: 5,
            ..WorkflowPolicy::of(&policy)
        });
    }
    // Two more: they would wait ten minutes for a batch of their own.
    let late = [
        submit(&world, 2, orchestrator::saga::now_ms()),
        submit(&world, 3, orchestrator::saga::now_ms()),
    ];
    world.node.mine_to(1, &world.miner);
    let started = Instant::now();
    let grown = loop {
        let b = world.batch(batch_id);
        if b.attempts.len() == 2 && !b.needs_broadcast {
            break b;
        }
        assert!(started.elapsed() < WAIT, "never grew: {b:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(grown.members.as_ref().unwrap().len(), 4);
    let (v0, v1) = (&grown.attempts[0], &grown.attempts[1]);
    assert!(v1.fee > v0.fee && v1.fee_rate > v0.fee_rate);
    let tx = world.tx(v1.txid);
    for (id, destination, amount) in &submitted {
        let to = outputs_to(&tx, destination);
        assert_eq!(to, vec![*amount], "withdrawal {id}");
        // (On Temporal a member shows its batch's change once told of it.)
        let versions = if late.contains(id) { 1 } else { 2 };
        let w = world.wait_for(*id, |w| w.attempts.len() == versions);
        assert_eq!(w.batch, Some(batch_id));
    }
    // A miner had the first version: it confirms instead of the replacement.
    world
        .node
        .call("devnet_evict", json!([v1.txid.to_string()]));
    let raw = bitcoin::hex::DisplayHex::to_lower_hex_string(&v0.raw[..]);
    world.node.call("sendrawtransaction", json!([raw]));
    world.node.call("devnet_setminingfeerate", json!([1]));
    let ids: Vec<u64> = submitted.iter().map(|s| s.0).collect();
    let paid = settle_all(&world, &ids);
    for (id, destination, amount) in &submitted {
        let w = world.get(*id);
        assert_eq!((w.state, w.settled), (State::Completed, true), "{w:?}");
        assert_eq!(
            paid.get(&script_of(destination)),
            Some(&vec![*amount]),
            "{id}"
        );
        if late.contains(id) {
            assert_ne!(w.confirmed, Some(v0.txid));
            assert_eq!(w.attempts[0].txid, v1.txid, "its history keeps the batch's");
        } else {
            assert_eq!(w.confirmed, Some(v0.txid));
        }
    }
    assert!(world.reserved().is_empty());
}

/// Wallet balancing, high-water side: a hot wallet of 5 BTC with a mark of 3 BTC and 1 BTC
/// to keep sweeps the excess to a fresh address of the cold wallet's descriptor, as a
/// saga of its own (alone even with payout queues on, embedded), beside a client's
/// withdrawal (no coin spent twice, each paid once); below the mark afterwards, nothing
/// more is swept.
#[test]
fn above_the_high_water_mark_the_excess_is_swept_to_the_cold_wallet_once() {
    swept_once(Engine::Embedded);
}

#[test]
fn on_temporal_above_the_high_water_mark_the_excess_is_swept_to_the_cold_wallet_once() {
    swept_once(Engine::Temporal);
}

fn swept_once(engine: Engine) {
    use orchestrator::balancing::{HighWater, Kind};
    use orchestrator::descriptor_wallet::DescriptorWallet;
    use system_tests::harness::xpub;
    let cold = DescriptorWallet::parse(&format!("wpkh({}/0/*)", xpub(5)), Network::Regtest, 20);
    let cold = Arc::new(cold.unwrap());
    let sweep = HighWater {
        above: Amount::from_btc(3.0).unwrap(),
        keep: Amount::from_btc(1.0).unwrap(),
    };
    let policy = Policy {
        // Queues on too (embedded): a sweep is paid alone, at once, not queued.
        batch: (engine == Engine::Embedded).then_some(orchestrator::executor::Batching {
            window_ms: 600_000,
            max_outputs: 10,
        }),
        ..balancing_policy(Some(cold.clone()), Some(sweep), None)
    };
    // Embedded: the client's withdrawal waits before the executor starts, so the first
    // decision sees it. On Temporal it is submitted through the running engine.
    let mut world = World::idle(10, 0.5, policy, None);
    if engine == Engine::Temporal {
        world = World::on_temporal(world);
    }
    let destination = world.node.new_address("bech32");
    let paid_out = world
        .submit(request("client-1", &destination, 30_000_000, 2.0, 20_000))
        .id;
    if engine == Engine::Embedded {
        world.start_executor();
    }
    let started = Instant::now();
    let sweep = loop {
        if let Some(s) = world.runs(Kind::Sweep).pop() {
            break s;
        }
        assert!(started.elapsed() < WAIT, "no sweep");
        std::thread::sleep(Duration::from_millis(50));
    };
    // 5 BTC spendable, less what the waiting client's withdrawal needs (0.3 BTC and its
    // fee cap) or less its coin once reserved (0.5 BTC), 1 BTC kept: 99% of the excess
    // swept, 1% its fee cap; on Temporal also 4 BTC, when the sweep was decided before
    // the search index showed the withdrawal.
    let amount = sweep.request.amount;
    let seen = match engine {
        Engine::Embedded => &[3.6998, 3.5][..],
        Engine::Temporal => &[3.6998, 3.5, 4.0][..],
    };
    let excess: Vec<Amount> = seen
        .iter()
        .map(|btc| Amount::from_btc(*btc).unwrap())
        .collect();
    assert!(
        excess.contains(&(amount + sweep.request.max_fee)),
        "{sweep:?}"
    );
    let paid = settle_all(&world, &[sweep.id, paid_out]);
    let to_cold = script_of(&sweep.request.destination);
    assert_eq!(paid.get(&to_cold), Some(&vec![amount.to_sat()]));
    assert_eq!(
        to_cold,
        cold.script_at(1).unwrap(),
        "the first sweep pays index 1"
    );
    assert_eq!(paid.get(&script_of(&destination)), Some(&vec![30_000_000]));
    // Below the mark now: blocks come and nothing more is swept.
    world.node.mine_to(3, &world.miner);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(world.runs(Kind::Sweep).len(), 1);
    // What is left: the level kept and 1% of the excess, less the fees (plus the client's
    // change when its coin was held at the decision): below the mark.
    let left = world.balance();
    assert!(left < Amount::from_btc(3.0).unwrap().to_sat(), "{left}");
    // (On Temporal a sweep decided before the client's withdrawal showed left it to be
    // paid from the level kept: 0.74 BTC then.)
    let floor = match engine {
        Engine::Embedded => 0.99,
        Engine::Temporal => 0.7,
    };
    assert!(left > Amount::from_btc(floor).unwrap().to_sat(), "{left}");
    assert!(world.reserved().is_empty());
}

/// One confirmation completes, two settle; hot wallet `hot` balanced by these.
fn balancing_policy(
    cold: Option<Arc<orchestrator::descriptor_wallet::DescriptorWallet>>,
    sweep: Option<orchestrator::balancing::HighWater>,
    consolidate: Option<orchestrator::balancing::Consolidation>,
) -> Policy {
    Policy {
        confirmations: 1,
        settle_at: 2,
        balancing: Some(orchestrator::balancing::Balancing {
            hot_wallet: "hot".into(),
            cold_wallet: "cold".into(),
            cold,
            sweep,
            top_up: None,
            consolidate,
        }),
        ..Policy::default()
    }
}

/// Consolidation on Temporal: 24 small coins, fees low (2 sat/vB, the threshold 5): the
/// balancing workflow starts one consolidation of 15 of them into one coin back to the hot
/// wallet, once; its coins are reserved by the wallet's workflow like a withdrawal's.
#[test]
fn on_temporal_small_coins_are_consolidated_once_while_fees_are_low() {
    use orchestrator::balancing::{Consolidation, Kind};
    let consolidate = Consolidation {
        max_rate: 5.0,
        coins_below: Amount::from_sat(1_000_000),
        min_coins: 10,
        max_coins: 15,
    };
    let policy = balancing_policy(None, None, Some(consolidate));
    let world = World::idle(24, 0.001, policy, None);
    world.node.call("devnet_setfeeestimate", json!([0.00002]));
    let world = World::on_temporal(world);
    let started = Instant::now();
    let run = loop {
        if let Some(r) = world.runs(Kind::Consolidation).pop() {
            break r;
        }
        assert!(started.elapsed() < WAIT, "no consolidation");
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(300));
    };
    let paid = settle_all(&world, &[run.id]);
    let done = world.get(run.id);
    assert_eq!(done.state, State::Completed, "{done:?}");
    let attempt = done.current().unwrap();
    let tx: Transaction = deserialize(&attempt.raw).unwrap();
    assert_eq!((tx.input.len(), tx.output.len()), (15, 1));
    assert_eq!(tx.output[0].script_pubkey, world.hot.script_pubkey());
    assert_eq!(
        tx.output[0].value,
        Amount::from_btc(0.015).unwrap() - attempt.fee
    );
    assert_eq!(
        paid.get(&world.hot.script_pubkey()),
        Some(&vec![tx.output[0].value.to_sat()])
    );
    world.node.mine_to(3, &world.miner);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(world.runs(Kind::Consolidation).len(), 1);
    assert!(world.reserved().is_empty());
}

/// An operator ends the balancing workflow while its sweep runs (`temporal workflow
/// terminate`), and the next process starts it again knowing nothing: its first decision
/// recovers the unfinished sweep from the withdrawal workflows (no second sweep beside
/// it) and the sweeps made, so the next sweep pays the cold descriptor's index 2, not 1
/// again.
#[test]
fn on_temporal_a_balancing_workflow_ended_by_an_operator_recovers_its_runs() {
    use orchestrator::balancing::{HighWater, Kind};
    use orchestrator::descriptor_wallet::DescriptorWallet;
    use system_tests::harness::xpub;
    let cold = DescriptorWallet::parse(&format!("wpkh({}/0/*)", xpub(5)), Network::Regtest, 20);
    let cold = Arc::new(cold.unwrap());
    let sweep = HighWater {
        above: Amount::from_btc(3.0).unwrap(),
        keep: Amount::from_btc(1.0).unwrap(),
    };
    let policy = balancing_policy(Some(cold.clone()), Some(sweep), None);
    let mut world = World::on_temporal(World::idle(10, 0.5, policy, None));
    let first_sweep = |world: &World| {
        let started = Instant::now();
        loop {
            if let Some(s) = world.runs(Kind::Sweep).pop() {
                return s;
            }
            assert!(started.elapsed() < WAIT, "no sweep");
            world.node.mine_to(1, &world.miner);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = first_sweep(&world);
    world.stop_workers();
    let t = world.temporal.as_ref().unwrap();
    let ended = t.server.cli(&[
        "workflow",
        "terminate",
        "--workflow-id",
        &orchestrator::temporal::balancing_workflow_id("hot"),
        "--reason",
        "test: an operator ends it",
    ]);
    assert!(ended.status.success(), "{ended:?}");
    world.start_worker();
    // Blocks come while the first sweep is unfinished or just done: never a second one
    // until the hot wallet is above its mark again.
    settle_all(&world, &[first.id]);
    world.node.mine_to(2, &world.miner);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(world.runs(Kind::Sweep).len(), 1);
    // 3 BTC more: above the mark again.
    world
        .node
        .call("sendtoaddress", json!([world.hot.to_string(), 3.0]));
    let started = Instant::now();
    let second = loop {
        let runs = world.runs(Kind::Sweep);
        if let Some(s) = runs.into_iter().find(|s| s.id != first.id) {
            break s;
        }
        assert!(started.elapsed() < WAIT, "no second sweep");
        world.node.mine_to(1, &world.miner);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        script_of(&first.request.destination),
        cold.script_at(1).unwrap()
    );
    assert_eq!(
        script_of(&second.request.destination),
        cold.script_at(2).unwrap(),
        "the recovered count of sweeps gives the next cold address"
    );
    settle_all(&world, &[second.id]);
    assert!(world.reserved().is_empty());
}
