//! Kafka export against the event log's writer, on the broker the tests use (Tansu, memory
//! engine, started here on a free port):
//!
//! 1. Catch-up: a writer appends `--events` events as fast as it can (in commits of 100, a
//!    busy block's worth: one block event and 99 transfer events of one wallet) while the
//!    exporter runs; events written per second against events on the topic per second
//!    (from the first commit until the exporter has delivered the last).
//! 2. At the tip: one commit of 10 events every 10 ms; the time from each commit to a
//!    consumer's receipt of its records (p50, p99).
//! 3. With `--chain DIR` (from gen_chain): a real catch-up, the rescan of that chain
//!    writing the log as `indexer run` does while the exporter runs; the rescan's events
//!    per second against the exporter's.
//!
//! `kafka_export_bench [--events 200000] [--tip-commits 300] [--chain DIR]`

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bitcoin::hashes::Hash;
use bitcoin::Network;
use clap::Parser;
use indexer::config::KafkaConfig;
use indexer::kafka::Exporter;
use indexer::metrics::KafkaMetrics;
use indexer::store::{Reader, Store, Writes};
use indexer::types::{Event, EventKind, WalletId};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use system_tests::kafka::Broker;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench.events";

#[derive(Parser)]
struct Args {
    /// Events the catch-up writes.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Commits at the tip, 10 ms apart.
    #[arg(long, default_value_t = 300)]
    tip_commits: u64,
    /// A generated chain (gen_chain) to measure a real catch-up on as well.
    #[arg(long)]
    chain: Option<std::path::PathBuf>,
}

/// A running exporter: its metrics, stop flag and thread.
type Running = (
    KafkaMetrics,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<(), indexer::kafka::ExportError>>,
);

/// Runs an exporter of `store` to `topic` on `broker`.
fn export(broker: &Broker, store: &Arc<Store>, topic: &str) -> Result<Running> {
    let metrics = KafkaMetrics::default();
    let stop = Arc::new(AtomicBool::new(false));
    let config = KafkaConfig {
        brokers: broker.bootstrap(),
        topic: topic.into(),
        client_id: "bench".into(),
        properties: Default::default(),
    };
    let exporter = Exporter::new(
        store.clone(),
        Network::Regtest,
        config,
        metrics.clone(),
        stop.clone(),
    )
    .spawn()?;
    Ok((metrics, stop, exporter))
}

/// 3. The rescan of `chain` writes the log while the exporter runs.
fn real_catch_up(broker: &Broker, chain: &std::path::Path) -> Result<()> {
    const REAL: &str = "bench.rescan";
    broker.create_topic(REAL, 3);
    // The same rescan without an exporter first: what exporting costs indexing.
    let alone = {
        let (_db, store, scripts) = benches::bench_store(chain)?;
        let started = Instant::now();
        benches::rescan(&store, &scripts, chain, &|_| {})?;
        started.elapsed().as_secs_f64()
    };
    let (_db, store, scripts) = benches::bench_store(chain)?;
    let store = Arc::new(store);
    let (metrics, stop, exporter) = export(broker, &store, REAL)?;
    // Connected and positioned before the clock starts (it finds nothing to export).
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let (progress, _) = benches::rescan(&store, &scripts, chain, &|_| {})?;
    let written = started.elapsed().as_secs_f64();
    let end = store.next_event()?;
    delivered(&metrics, end);
    let exported = started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = exporter.join();
    println!(
        "real catch-up: rescan of {} blocks ({} MB) wrote {end} events in {written:.2} s ({:.0}/s), all on the topic after {exported:.2} s: ratio {:.2}; the rescan alone {alone:.2} s (with the exporter / alone: {:.2})",
        progress.blocks,
        progress.bytes / 1_000_000,
        end as f64 / written,
        written / exported,
        alone / written
    );
    Ok(())
}

/// `n` events as one commit: a block event, then transfer events of `wallet`.
fn commit(store: &Store, height: u32, n: usize, wallet: WalletId) -> Result<u64> {
    let hash = bitcoin::BlockHash::from_byte_array([height as u8; 32]);
    let mut events = vec![Event {
        kind: EventKind::BlockConnected,
        height,
        block_hash: hash,
        txid: None,
        wallets: Vec::new(),
    }];
    for i in 1..n {
        let mut txid = [0u8; 32];
        txid[..4].copy_from_slice(&height.to_be_bytes());
        txid[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        events.push(Event {
            kind: EventKind::TransferConfirmed,
            height,
            block_hash: hash,
            txid: Some(bitcoin::Txid::from_byte_array(txid)),
            wallets: vec![wallet],
        });
    }
    Ok(store.commit_writes(&Writes::new(), &events, None, false)?)
}

/// Waits until the exporter has delivered everything below `offset`.
fn delivered(metrics: &KafkaMetrics, offset: u64) {
    while (metrics.exported_offset.get() as u64) < offset {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let broker = Broker::start();
    broker.create_topic(TOPIC, 3);
    let db = tempfile::tempdir()?;
    let store = Arc::new(Store::open(db.path(), Network::Regtest)?);
    let wallet = indexer::wallets::add(
        &store,
        Network::Regtest,
        "bench",
        &["raw(0014751e76e8199196d454941c45d1b3a323f1433bd6)".to_owned()],
        None,
        1,
    )?
    .wallet;
    let (metrics, stop, exporter) = export(&broker, &store, TOPIC)?;
    // The exporter has connected and found its position (0) before the clock starts.
    commit(&store, 0, 1, wallet)?;
    delivered(&metrics, 1);

    // 1. Catch-up.
    let started = Instant::now();
    let mut next = 1;
    let mut height = 1;
    while next < 1 + args.events {
        next = commit(&store, height, 100, wallet)?;
        height += 1;
    }
    let written = started.elapsed().as_secs_f64();
    delivered(&metrics, next);
    let exported = started.elapsed().as_secs_f64();
    let n = (next - 1) as f64;
    println!(
        "catch-up: {} events written in {written:.2} s ({:.0}/s), on the topic after {exported:.2} s ({:.0}/s): ratio {:.2}",
        next - 1,
        n / written,
        n / exported,
        written / exported
    );

    // 2. At the tip: commit -> consumer receipt.
    let consumer: BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "bench-latency")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..3 {
        let (_, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(10))?;
        assignment.add_partition_offset(TOPIC, p, rdkafka::Offset::Offset(high))?;
    }
    consumer.assign(&assignment)?;
    let mut committed_at: HashMap<u64, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut last_commit = Instant::now();
    let mut commits = 0;
    let deadline = Instant::now() + Duration::from_secs(60 + args.tip_commits / 10);
    while (commits < args.tip_commits || !committed_at.is_empty()) && Instant::now() < deadline {
        if commits < args.tip_commits && last_commit.elapsed() >= Duration::from_millis(10) {
            let first = next;
            next = commit(&store, height, 10, wallet)?;
            height += 1;
            commits += 1;
            last_commit = Instant::now();
            for o in first..next {
                committed_at.insert(o, last_commit);
            }
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(1)) {
            let offset = m.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "log_offset")
                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<u64>().ok())
            });
            if let Some(at) = offset.and_then(|o| committed_at.remove(&o)) {
                latencies.push(at.elapsed());
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = exporter.join();
    latencies.sort();
    anyhow::ensure!(!latencies.is_empty(), "no record reached the consumer");
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "at the tip: {} events received of {} committed; commit -> consumer p50 {:?}, p99 {:?}",
        latencies.len(),
        latencies.len() + committed_at.len(),
        pct(0.5),
        pct(0.99)
    );
    if let Some(chain) = &args.chain {
        real_catch_up(&broker, chain)?;
    }
    Ok(())
}
