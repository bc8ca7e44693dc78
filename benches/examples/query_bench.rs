//! gRPC query throughput and latency under 64 concurrent clients, as ratios to a trivial
//! endpoint (gRPC health check) on the same server in the same run.
//!
//! `query_bench [--chain DIR] [--seconds N]`: indexes the generated chain (from gen_chain)
//! for its 100k watched scripts (one wallet), serves it on 127.0.0.1, and measures
//! Health/Check, GetBalance(wallet), GetBalance(wallet, min_conf 6) and ListUtxos(wallet,
//! 100 a page).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bitcoin::Network;
use clap::Parser;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Generated chain (from gen_chain).
    #[arg(long, default_value = "fixtures/generated/chain")]
    chain: PathBuf,
    /// Seconds per measured call.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
}

/// Calls `call` from `clients` tasks for `secs` seconds: (calls/s, p50, p99).
async fn measure<F, Fut>(clients: usize, secs: u64, call: F) -> (f64, Duration, Duration)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    call().await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let secs = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    (all.len() as f64 / secs, pct(0.5), pct(0.99))
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let (_db, store, scripts) = benches::bench_store(&args.chain)?;
    benches::rescan(&store, &scripts, &args.chain, &|_| {})?;
    let utxos = store.count(indexer::store::schema::Cf::Utxo)?;

    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(indexer::grpc::serve(Arc::new(store), listener, indexer::grpc::ServeOptions::new(Network::Regtest), async {
            let _ = stopped.await;
        }));
        let channel: Channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        let wallet = || Some(pb::Target { target: Some(pb::target::Target::Wallet("bench".into())) });

        let ch = channel.clone();
        let health = measure(args.clients, args.seconds, move || {
            let mut c = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            async move {
                c.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health");
            }
        })
        .await;
        let ch = channel.clone();
        let balance = measure(args.clients, args.seconds, move || {
            let mut c = IndexerClient::new(ch.clone());
            async move {
                c.get_balance(pb::GetBalanceRequest { target: wallet(), min_conf: 0 }).await.expect("balance");
            }
        })
        .await;
        let ch = channel.clone();
        let utxo_page = measure(args.clients, args.seconds, move || {
            let mut c = IndexerClient::new(ch.clone());
            async move {
                c.list_utxos(pb::ListUtxosRequest { target: wallet(), min_conf: 0, limit: 100, page_token: String::new() })
                    .await
                    .expect("utxos");
            }
        })
        .await;
        let ch = channel.clone();
        let deep = measure(args.clients, 1.max(args.seconds / 5), move || {
            let mut c = IndexerClient::new(ch.clone());
            async move {
                c.get_balance(pb::GetBalanceRequest { target: wallet(), min_conf: 6 }).await.expect("balance");
            }
        })
        .await;

        println!("| call ({} clients, wallet of {} UTXOs) | calls/s | p50 | p99 | ratio to health check |", args.clients, utxos);
        println!("|---|---|---|---|---|");
        for (name, (qps, p50, p99)) in [
            ("grpc.health.v1 Check (trivial)", health),
            ("GetBalance(wallet), stored aggregate", balance),
            ("ListUtxos(wallet, 100 a page)", utxo_page),
            ("GetBalance(wallet, min_conf 6): aggregate less the last 5 blocks", deep),
        ] {
            println!("| {name} | {qps:.0} | {:.2} ms | {:.2} ms | {:.2} |", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3, qps / health.0);
        }
        let _ = stop.send(());
        server.await??;
        Ok::<_, anyhow::Error>(())
    })
}
