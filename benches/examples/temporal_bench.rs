//! Withdrawals on the Temporal engine against the embedded one, in the same run on the
//! same machine: withdrawals/s and submit -> BROADCAST latency with the embedded executor,
//! with one Temporal worker and with two (each a whole `orchestrator run` worker: the
//! worker, the chain adapter and the API, on a thread and runtime of its own), each
//! against a Temporal dev server of its own started here; and where the time goes
//! (history events, so round trips, per workflow).
//!
//! `temporal_bench [--withdrawals N]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitcoin::Network;
use clap::Parser;
use orchestrator::config::TemporalTarget;
use orchestrator::executor::{Executor, Policy};
use orchestrator::payment::Payments;
use orchestrator::saga::{State, Withdrawal};
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;
use orchestrator::temporal::service::TemporalWithdrawals;
use orchestrator::temporal::withdrawal::WithdrawalWorkflow;
use orchestrator::temporal::WorkflowPolicy;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_server::Withdrawals;
use system_tests::live::{Devnet, Following, KeyedWallet, Served};
use system_tests::temporal::TemporalServer;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Withdrawals submitted at once, per engine.
    #[arg(long, default_value_t = 100)]
    withdrawals: usize,
}

/// What one engine did.
struct Run {
    name: String,
    /// Submit of the first -> all BROADCAST.
    all_broadcast: Duration,
    /// Each withdrawal's submit -> BROADCAST, sorted, ms.
    latencies: Vec<u64>,
    /// History events per withdrawal workflow (Temporal), mean.
    events: Option<f64>,
}

impl Run {
    fn row(&self, n: usize) -> String {
        let pct = |p: f64| self.latencies[((self.latencies.len() - 1) as f64 * p) as usize];
        format!(
            "| {} | {:.2} s | {:.0} | {} | {} | {} |",
            self.name,
            self.all_broadcast.as_secs_f64(),
            n as f64 / self.all_broadcast.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            self.events.map_or("-".into(), |e| format!("{e:.1}")),
        )
    }
}

struct Rig {
    node: Devnet,
    miner: String,
    keyed: KeyedWallet,
    served: Served,
    policy: Policy,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    _following: Following,
}

impl Rig {
    fn payments(&self) -> Result<Payments> {
        Ok(Payments::new(
            Arc::new(self.node.daemon(false)),
            Arc::new(KeyFileSigner::open(&self.keyed.key_file, Network::Regtest)?),
            Network::Regtest,
            self.keyed.address.script_pubkey(),
            self.policy.clone(),
        ))
    }

    fn request(&self, round: &str, i: usize, destination: &str) -> pb::SubmitWithdrawalRequest {
        pb::SubmitWithdrawalRequest {
            request_id: format!("{round}-{i}"),
            wallet: "hot".into(),
            destination: destination.into(),
            amount_sat: 100_000 + i as u64,
            fee_rate: Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(2.0)),
            max_fee_sat: 20_000,
        }
    }

    /// Mines a block and waits until every one of `ids` is settled (its coins free for
    /// the next engine).
    fn settle(&self, get: impl Fn() -> Result<Vec<Withdrawal>>) -> Result<()> {
        let started = Instant::now();
        self.node.mine_to(1, &self.miner);
        while !get()?.iter().all(|w| w.settled) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "not settled");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Each withdrawal's submit -> BROADCAST, read once all are broadcast (nothing moves them
/// on before a block): BROADCAST is their last change.
fn latencies(all: &[Withdrawal]) -> Vec<u64> {
    let mut l: Vec<u64> = all
        .iter()
        .map(|w| w.updated_ms.saturating_sub(w.created_ms))
        .collect();
    l.sort_unstable();
    l
}

fn embedded(rig: &Rig, n: usize, destination: &str) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SagaStore::open(&dir.path().join("sagas"))?);
    let executor = Executor::new(
        store.clone(),
        orchestrator::indexer_client::open_client(rig.served.channel.clone()),
        rig.payments()?,
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rig.served.runtime.spawn(executor.run(async {
        let _ = stopped.await;
    }));
    let api = orchestrator::grpc::WithdrawalService::new(store.clone(), Network::Regtest);
    let started = Instant::now();
    let ids: Vec<u64> = rig.served.runtime.block_on(async {
        let calls = (0..n).map(|i| {
            api.submit_withdrawal(tonic::Request::new(rig.request("embedded", i, destination)))
        });
        futures::future::try_join_all(calls)
            .await
            .map(|r| r.into_iter().map(|w| w.into_inner().id).collect())
    })?;
    let get = || -> Result<Vec<Withdrawal>> {
        ids.iter()
            .map(|id| store.get(*id)?.context("a withdrawal vanished"))
            .collect()
    };
    while !get()?.iter().all(|w| w.state == State::Broadcast) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_broadcast = started.elapsed();
    let run = Run {
        name: "embedded (RocksDB sagas)".into(),
        all_broadcast,
        latencies: latencies(&get()?),
        events: None,
    };
    rig.settle(get)?;
    let _ = stop.send(());
    Ok(run)
}

fn temporal(rig: &Rig, workers: usize, n: usize, destination: &str) -> Result<Run> {
    // A server of its own: nothing of the other runs in its history or its queues.
    let server = TemporalServer::start();
    let target = TemporalTarget {
        address: server.url(),
        namespace: "default".into(),
        task_queue: format!("bench-{workers}"),
        api_key: None,
        tls: None,
    };
    let mut running = Vec::new();
    for _ in 0..workers {
        let engine = orchestrator::temporal::worker::Engine {
            target: target.clone(),
            network: Network::Regtest,
            payments: rig.payments()?,
            indexer: orchestrator::indexer_client::open_client(rig.served.channel.clone()),
            events: None,
            hook: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let latency = service::grpc_latency::GrpcLatency::default();
                orchestrator::temporal::worker::run(
                    engine,
                    listener,
                    service::auth::BearerToken::new("bench"),
                    &latency,
                    async {
                        let _ = stopped.await;
                    },
                )
                .await?;
                Ok(())
            })
        });
        running.push((stop, thread));
    }
    let client = rig
        .served
        .runtime
        .block_on(orchestrator::temporal::worker::connect(&target))?;
    rig.served
        .runtime
        .block_on(orchestrator::temporal::worker::register_search_attributes(
            &client,
            &target.namespace,
        ))?;
    let api = TemporalWithdrawals::new(
        client.clone(),
        target.namespace.clone(),
        target.task_queue.clone(),
        Network::Regtest,
        WorkflowPolicy::of(&rig.policy),
    );
    let round = format!("temporal{workers}");
    let started = Instant::now();
    rig.served.runtime.block_on(async {
        let calls = (0..n).map(|i| {
            api.submit_withdrawal(tonic::Request::new(rig.request(&round, i, destination)))
        });
        futures::future::try_join_all(calls).await.map(|_| ())
    })?;
    let names: Vec<String> = (0..n).map(|i| format!("{round}-{i}")).collect();
    let get = || -> Result<Vec<Withdrawal>> {
        rig.served.runtime.block_on(async {
            let calls = names.iter().map(|name| api.status(name));
            let found = futures::future::try_join_all(calls).await?;
            found
                .into_iter()
                .map(|w| w.context("a withdrawal vanished"))
                .collect()
        })
    };
    while !get()?.iter().all(|w| w.state == State::Broadcast) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    let all_broadcast = started.elapsed();
    let done = get()?;
    // Where the time goes: events (each a server round trip or a write) per workflow.
    let events: f64 = rig.served.runtime.block_on(async {
        let mut total = 0u64;
        for i in 0..n {
            let handle = client.get_workflow_handle::<WithdrawalWorkflow>(format!("{round}-{i}"));
            let d = handle
                .describe(temporalio_client::WorkflowDescribeOptions::default())
                .await?;
            total += d.history_length() as u64;
        }
        anyhow::Ok(total as f64 / n as f64)
    })?;
    let run = Run {
        name: format!(
            "Temporal, {workers} worker{}",
            if workers == 1 { "" } else { "s" }
        ),
        all_broadcast,
        latencies: latencies(&done),
        events: Some(events),
    };
    rig.settle(get)?;
    for (stop, thread) in running {
        let _ = stop.send(());
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(run)
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let n = Args::parse().withdrawals;
    let coins = 3 * n + 10;
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101 + (coins as u32).div_ceil(25), &miner);
    let dir = tempfile::tempdir()?;
    let keyed = KeyedWallet::funded(&node, &miner, dir.path(), 41, coins, 0.01);
    let db = tempfile::tempdir()?;
    let following = Following::caught_up(&node, db.path(), &keyed.wallets);
    let served = Served::start(&following, indexer::grpc::Access::default());
    let rig = Rig {
        node,
        miner,
        keyed,
        served,
        policy: Policy {
            confirmations: 1,
            settle_at: 1,
            ..Policy::default()
        },
        _dirs: (dir, db),
        _following: following,
    };
    let destination = rig.node.new_address("bech32");
    let runs = [
        embedded(&rig, n, &destination)?,
        temporal(&rig, 1, n, &destination)?,
        temporal(&rig, 2, n, &destination)?,
    ];
    println!("{n} withdrawals from one wallet, submitted at once, per engine (same run):");
    println!("| engine | submit -> all BROADCAST | withdrawals/s | submit -> BROADCAST p50 ms | p99 ms | history events per workflow |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!("{}", r.row(n));
    }
    let base = runs[0].all_broadcast.as_secs_f64();
    for r in &runs[1..] {
        println!(
            "ratio {}: withdrawals/s {:.3} of embedded",
            r.name,
            base / r.all_broadcast.as_secs_f64()
        );
    }
    Ok(())
}
