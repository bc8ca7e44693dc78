//! Does streaming the event log to many subscribers slow indexing? One process indexes the
//! generated chain while N gRPC subscribers follow its event log live (the server and the
//! rescan share the database), against the same rescan with no subscribers.
//!
//! `subscribe_bench [--chain DIR] [--subscribers N]`

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bitcoin::Network;
use clap::Parser;
use indexer::store::{Reader, Store};
use indexer::watchlist::ScriptFilter;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;

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
}

/// CPU seconds this process's threads have used, split into the gRPC runtime's threads
/// (named `grpc`) and all the others (the rescan's; the main thread only waits).
fn cpu_seconds() -> Result<(f64, f64)> {
    let tick = 100.0; // USER_HZ on Linux
    let (mut grpc, mut rest) = (0.0, 0.0);
    for task in std::fs::read_dir("/proc/self/task")? {
        let stat = std::fs::read_to_string(task?.path().join("stat"))?;
        // "tid (comm) state ppid ..." : utime and stime are fields 14 and 15.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
        if comm == "grpc" {
            grpc += ticks / tick;
        } else {
            rest += ticks / tick;
        }
    }
    Ok((grpc, rest))
}

/// Rescans `chain` into `store`: (MB/s, seconds).
fn rescan(store: &Store, scripts: &ScriptFilter, chain: &std::path::Path) -> Result<(f64, f64)> {
    let (progress, secs) = benches::rescan(store, scripts, chain, &|_| {})?;
    Ok((progress.bytes as f64 / secs / 1e6, secs))
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();

    let (_quiet_db, quiet, quiet_scripts) = benches::bench_store(&args.chain)?;
    let (_, cpu_before) = cpu_seconds()?;
    let (alone, _) = rescan(&quiet, &quiet_scripts, &args.chain)?;
    let indexing_alone = cpu_seconds()?.1 - cpu_before;
    drop(quiet);

    let (_db, store, scripts) = benches::bench_store(&args.chain)?;
    let store = Arc::new(store);
    // The server's runtime as `indexer serve`/`run` build it (below indexing's priority).
    let runtime = indexer::grpc::runtime()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let server = runtime.spawn(indexer::grpc::serve(
        store.clone(),
        Network::Regtest,
        listener,
        None,
        async {
            let _ = stopped.await;
        },
    ));
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.subscribers).map(|_| AtomicU64::new(0)).collect());
    let channel = runtime.block_on(async {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
    })?;
    for i in 0..args.subscribers {
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
        });
    }
    let (grpc_before, cpu_before) = cpu_seconds()?;
    let (followed, secs) = rescan(&store, &scripts, &args.chain)?;
    let (grpc_after, cpu_after) = cpu_seconds()?;
    let indexing_with = cpu_after - cpu_before;
    let serving = grpc_after - grpc_before;
    let total = store.next_event()?;
    // Let every subscriber reach the end of the log (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.iter().any(|r| r.load(Ordering::Relaxed) < total) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let caught_up = received
        .iter()
        .filter(|r| r.load(Ordering::Relaxed) == total)
        .count();
    let _ = stop.send(());
    drop(runtime.block_on(server));

    println!("| measure | value |");
    println!("|---|---|");
    println!("| rescan alone | {alone:.0} MB/s |");
    println!("| rescan while {} subscribers follow its event log over gRPC | {followed:.0} MB/s ({secs:.1} s) |", args.subscribers);
    println!("| ratio (with / without) | {:.2} |", followed / alone);
    println!(
        "| CPU of the rescan's threads: alone / with subscribers | {indexing_alone:.1} s / {indexing_with:.1} s (ratio {:.2}) |",
        indexing_alone / indexing_with
    );
    println!(
        "| CPU of the gRPC threads (server and these clients) during the rescan | {serving:.1} s |"
    );
    println!("| events in the log | {total} |");
    println!(
        "| subscribers that received every event, in order | {caught_up} of {} |",
        args.subscribers
    );
    Ok(())
}
