//! Does streaming the event log to many subscribers slow indexing? Rescans the generated
//! chain into a fresh database, alone and while N gRPC subscribers follow its event log
//! live (server and rescan share the database, as in `indexer run`), in rounds that
//! alternate which goes first. Run it also with `--subscribers 0` (the same comparison with
//! nothing to serve: how much two rescans differ on this machine anyway) and with
//! `--busy-loop` (a thread at the serving threads' priority that only spins: what any work
//! on the CPU indexing leaves idle costs it).
//!
//! The rescan holds a `FlatOut`, as `indexer run`'s catch-up does. The 100 clients run in
//! this process on the server's runtime, so they yield with it: real subscribers run in
//! other processes, usually on other machines, and what is measured is the server's cost.
//! A separate client of normal priority calls GetTip every 20 ms during the rescans with
//! subscribers, to show how long queries wait meanwhile.
//!
//! `subscribe_bench [--chain DIR] [--subscribers N | --busy-loop] [--rounds N]`

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitcoin::Network;
use clap::Parser;
use indexer::store::Reader;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use tokio::runtime::Runtime;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Generated chain (from gen_chain).
    #[arg(long, default_value = "fixtures/generated/chain-typical")]
    chain: PathBuf,
    /// Concurrent subscribers.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Rounds of one rescan alone and one with the subscribers (order alternating).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Instead of subscribers, one thread at the serving threads' priority that only
    /// spins: the least that any work on the CPU indexing leaves idle costs it here.
    #[arg(long, conflicts_with = "subscribers")]
    busy_loop: bool,
}

/// CPU seconds this process has used: (the serving threads, the server's and the
/// in-process clients', live or ended; everything else). The rescan's threads have ended by
/// the time it returns, so they are counted from the process total, which keeps ended
/// threads' time.
fn cpu_seconds() -> Result<(f64, f64)> {
    // "pid (comm) state ppid ...": utime and stime are fields 14 and 15.
    fn ticks(stat: &str) -> Option<(&str, f64)> {
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let user: f64 = fields.get(11)?.parse().ok()?;
        let system: f64 = fields.get(12)?.parse().ok()?;
        Some((&stat[open + 1..close], user + system))
    }
    let tick = 100.0; // USER_HZ on Linux
    let total = std::fs::read_to_string("/proc/self/stat")?;
    let (_, total) = ticks(&total).context("reading /proc/self/stat")?;
    let mut grpc = 0.0;
    for task in std::fs::read_dir("/proc/self/task")? {
        // A thread that ended meanwhile has no stat any more.
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            continue;
        };
        // The server's threads, and the clients' (`grpc-client`).
        if let Some((name, t)) = ticks(&stat) {
            if name.starts_with("grpc") {
                grpc += t;
            }
        }
    }
    let serving = grpc / tick + indexer::serve_priority::ended_serving_cpu().as_secs_f64();
    Ok((serving, total / tick - serving))
}

/// Calls GetTip on `addr` every 20 ms from a thread of normal priority until `stop`; the
/// latencies of the calls that succeeded, sorted.
fn probe_queries(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<Vec<Duration>>> {
    // Named, so its CPU is not counted as the rescan's.
    let named = std::thread::Builder::new().name("grpc-client".into());
    named.spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        let mut latencies = runtime.block_on(async {
            let mut latencies = Vec::new();
            let Ok(mut client) = IndexerClient::connect(format!("http://{addr}")).await else {
                return latencies;
            };
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                if client.get_tip(pb::GetTipRequest {}).await.is_ok() {
                    latencies.push(started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            latencies
        });
        latencies.sort();
        latencies
    })
}

/// One rescan of the chain into a fresh database.
struct Run {
    /// Indexing speed.
    mb_per_s: f64,
    /// CPU seconds of the rescan's threads.
    indexing_cpu: f64,
    /// CPU seconds of the gRPC threads (server and clients) during the rescan.
    serving_cpu: f64,
    /// Subscribers that received every event once, in order.
    complete: usize,
    /// GetTip latencies during the rescan, sorted (with subscribers only).
    queries: Vec<Duration>,
}

/// Rescans the chain with nobody subscribed.
fn alone(chain: &Path) -> Result<Run> {
    let (_db, store, scripts) = benches::bench_store(chain)?;
    let (_, before) = cpu_seconds()?;
    let (progress, secs) = benches::rescan(&store, &scripts, chain, &|_| {})?;
    let (_, after) = cpu_seconds()?;
    Ok(Run {
        mb_per_s: progress.bytes as f64 / secs / 1e6,
        indexing_cpu: after - before,
        serving_cpu: 0.0,
        complete: 0,
        queries: Vec::new(),
    })
}

/// Rescans the chain while `subscribers` gRPC clients follow its event log from offset 0,
/// served as `indexer serve`/`run` serve it (the server and the rescan share the database).
fn with_subscribers(chain: &Path, runtime: &Runtime, subscribers: usize) -> Result<Run> {
    let (_db, store, scripts) = benches::bench_store(chain)?;
    let store = Arc::new(store);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let server = runtime.spawn(indexer::grpc::serve(
        store.clone(),
        listener,
        indexer::grpc::ServeOptions::new(Network::Regtest),
        async {
            let _ = stopped.await;
        },
    ));
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
    let channel = runtime.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
    })?;
    let clients: Vec<_> = (0..subscribers)
        .map(|i| {
            let (channel, received) = (channel.clone(), received.clone());
            runtime.spawn(async move {
                let mut client = IndexerClient::new(channel);
                let mut events = client
                    .subscribe(pb::SubscribeRequest {
                        from_offset: 0,
                        ..Default::default()
                    })
                    .await
                    .expect("subscribe")
                    .into_inner();
                while let Ok(Some(e)) = events.message().await {
                    // Every offset once, in order; anything else marks the subscriber failed.
                    if e.offset != received[i].load(Ordering::Relaxed) {
                        received[i].store(u64::MAX, Ordering::Relaxed);
                        return;
                    }
                    received[i].store(e.offset + 1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let stop_probing = Arc::new(AtomicBool::new(false));
    let prober = probe_queries(addr, stop_probing.clone())?;
    let (grpc_before, before) = cpu_seconds()?;
    let (progress, secs) = benches::rescan(&store, &scripts, chain, &|_| {})?;
    let (grpc_after, after) = cpu_seconds()?;
    stop_probing.store(true, Ordering::Relaxed);
    let queries = prober.join().expect("the query prober does not panic");
    if queries.is_empty() {
        anyhow::bail!("GetTip never answered during the rescan");
    }
    let total = store.next_event()?;
    // Let every subscriber reach the end of the log (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.iter().any(|r| r.load(Ordering::Relaxed) < total) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let complete = received
        .iter()
        .filter(|r| r.load(Ordering::Relaxed) == total)
        .count();
    for client in clients {
        client.abort();
    }
    let _ = stop.send(());
    drop(runtime.block_on(server));
    Ok(Run {
        mb_per_s: progress.bytes as f64 / secs / 1e6,
        indexing_cpu: after - before,
        serving_cpu: grpc_after - grpc_before,
        complete,
        queries,
    })
}

/// Rescans the chain while one thread at the serving threads' priority spins.
fn with_busy_loop(chain: &Path) -> Result<Run> {
    let (_db, store, scripts) = benches::bench_store(chain)?;
    let stop = Arc::new(AtomicBool::new(false));
    let nice = indexer::serve_priority::serve_nice();
    // Named like the server's threads, so its CPU is counted as serving.
    let spinner = std::thread::Builder::new().name("grpc".into()).spawn({
        let stop = stop.clone();
        move || {
            indexer::serve_priority::enroll(nice);
            while !stop.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
            indexer::serve_priority::leave();
        }
    })?;
    let (grpc_before, before) = cpu_seconds()?;
    let (progress, secs) = benches::rescan(&store, &scripts, chain, &|_| {})?;
    let (grpc_after, after) = cpu_seconds()?;
    stop.store(true, Ordering::Relaxed);
    spinner.join().expect("the busy loop does not panic");
    Ok(Run {
        mb_per_s: progress.bytes as f64 / secs / 1e6,
        indexing_cpu: after - before,
        serving_cpu: grpc_after - grpc_before,
        complete: 0,
        queries: Vec::new(),
    })
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    // The server's runtime as `indexer serve`/`run` build it (below indexing's priority).
    let runtime = indexer::serve_priority::runtime()?;
    let (with, subscribers) = if args.busy_loop {
        ("with a busy loop at serving priority".to_string(), 0)
    } else {
        (
            format!("with {} subscribers", args.subscribers),
            args.subscribers,
        )
    };
    let other = |chain: &Path| {
        if args.busy_loop {
            with_busy_loop(chain)
        } else {
            with_subscribers(chain, &runtime, subscribers)
        }
    };
    // The first rescan of a run reads the block files cold: not counted.
    let warm_up = alone(&args.chain)?;
    println!(
        "warm-up rescan, not counted: {:.0} MB/s\n",
        warm_up.mb_per_s
    );
    println!(
        "| round | alone | {with} | ratio | CPU of the rescan: alone / with | CPU of the serving threads during the rescan | subscribers that received every event, in order | GetTip during the rescan: calls, p50 / max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut ratios = Vec::new();
    let mut queries = Vec::new();
    for round in 1..=args.rounds {
        // Alternating which goes first cancels a drift of the machine's speed.
        let (a, w) = if round % 2 == 1 {
            let a = alone(&args.chain)?;
            (a, other(&args.chain)?)
        } else {
            let w = other(&args.chain)?;
            (alone(&args.chain)?, w)
        };
        let ratio = w.mb_per_s / a.mb_per_s;
        ratios.push(ratio);
        println!(
            "| {round} | {:.0} MB/s | {:.0} MB/s | {ratio:.2} | {:.1} s / {:.1} s | {:.1} s | {} of {} | {} |",
            a.mb_per_s,
            w.mb_per_s,
            a.indexing_cpu,
            w.indexing_cpu,
            w.serving_cpu,
            w.complete,
            subscribers,
            latencies(&w.queries),
        );
        queries.extend(w.queries);
        if w.complete != subscribers {
            anyhow::bail!(
                "only {} of {subscribers} subscribers received every event",
                w.complete
            );
        }
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
    let mean = ratios.iter().sum::<f64>() / n as f64;
    println!(
        "\nratio (with / without): median {median:.2}, mean {mean:.2}, range {:.2}-{:.2} over {n} rounds",
        ratios[0],
        ratios[n - 1],
    );
    if !args.busy_loop {
        queries.sort();
        println!(
            "GetTip from a client of normal priority during the rescans: {}",
            latencies(&queries)
        );
    }
    Ok(())
}

/// "calls, p50 / max" of sorted latencies.
fn latencies(sorted: &[Duration]) -> String {
    match (sorted.get(sorted.len() / 2), sorted.last()) {
        (Some(p50), Some(max)) => format!(
            "{}, {:.1} / {:.1} ms",
            sorted.len(),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        ),
        _ => "-".into(),
    }
}
