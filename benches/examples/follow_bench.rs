//! Following bitcoind, measured against the devnet (the project's bitcoind-compatible
//! node) on 127.0.0.1, with blocks full of signed wallet traffic:
//!
//! - tip latency: a block's `rawblock` ZMQ message arriving -> the block committed and
//!   visible to queries, p50/p99, against the time the parse stage takes for the same
//!   block (the target: p99 < 2x the parse time);
//! - catch-up throughput from an empty index over REST, over JSON-RPC hex, and as a ratio
//!   to `rescan --blocks-dir` of the node's own blk files, on the same blocks.
//!
//! `follow_bench [--blocks N] [--fillers N] [--rounds N]`

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{block, Address, BlockHash, Network, ScriptBuf};
use clap::Parser;
use crossbeam_channel::RecvTimeoutError;
use indexer::daemon::zmq::{self as izmq, Notice, Topic, ZmqEndpoints};
use indexer::follow::{FollowOptions, Follower};
use indexer::pipeline::parse::{parse_block, RawBlock};
use indexer::pipeline::PipelineOptions;
use indexer::rescan::{rescan_blocks_dir, RescanRequest};
use indexer::store::{Reader, Store};
use indexer::wallets;
use serde_json::json;
use system_tests::harness::{open_with_wallets, TestWallet};
use system_tests::live::{Devnet, Following};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Full blocks mined while the indexer follows live (each one a latency sample).
    #[arg(long, default_value_t = 60)]
    blocks: u32,
    /// Wallet transactions the node packs into each block (the weight limit caps them).
    #[arg(long, default_value_t = 20_000)]
    fillers: u64,
    /// Follow without the `rawtx` topic (no mempool tracking), to see what it costs.
    #[arg(long)]
    no_rawtx: bool,
    /// Catch-up runs of each kind, interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// When each block's `rawblock` arrived (and its bytes), and when it became visible.
#[derive(Default)]
struct Timeline {
    arrived: HashMap<BlockHash, (Instant, Vec<u8>)>,
    visible: HashMap<BlockHash, Instant>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The watched wallet: the miner's address (its coinbases) and 10,000 scripts that never
/// appear, so blocks are parsed and filtered in full but few outputs are applied, as for
/// a custody wallet on mainnet.
fn watched(miner: &str) -> Result<Vec<TestWallet>> {
    let mut scripts = BTreeSet::new();
    scripts.insert(
        miner
            .parse::<Address<_>>()?
            .require_network(Network::Regtest)?
            .script_pubkey(),
    );
    for i in 0u32..10_000 {
        let program = bitcoin::hashes::sha256::Hash::hash(&i.to_le_bytes());
        scripts.insert(ScriptBuf::new_p2wsh(
            &bitcoin::WScriptHash::from_byte_array(program.to_byte_array()),
        ));
    }
    Ok(vec![TestWallet {
        name: "bench".into(),
        scripts,
    }])
}

/// Records when every `rawblock` reaches a subscriber of its own (what the indexer's
/// subscriber sees at the same moment).
fn watch_arrivals(
    node: &Devnet,
    timeline: Arc<Mutex<Timeline>>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let endpoint = node
        .zmq()
        .topics
        .into_iter()
        .find(|(t, _)| *t == Topic::RawBlock)
        .context("the node publishes no rawblock")?;
    let endpoints = ZmqEndpoints {
        topics: vec![endpoint],
    };
    let feed = izmq::spawn(&endpoints, stop)?;
    std::thread::spawn(move || loop {
        let notice = match feed.recv_timeout(Duration::from_secs(1)) {
            Ok(notice) => notice,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        {
            if let Notice::RawBlock(raw) = notice {
                let at = Instant::now();
                if let Ok(header) = deserialize::<block::Header>(&raw[..80.min(raw.len())]) {
                    let mut t = timeline.lock().unwrap_or_else(|e| e.into_inner());
                    t.arrived.insert(header.block_hash(), (at, raw));
                }
            }
        }
    });
    Ok(())
}

/// Records when each new tip becomes readable in `store`, woken by its commit signal.
fn watch_commits(
    store: Arc<Store>,
    timeline: Arc<Mutex<Timeline>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let mut commits = store.commits();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            while !stop.load(Ordering::Relaxed) {
                let woken = tokio::time::timeout(Duration::from_millis(100), commits.changed());
                match woken.await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => continue,
                }
                let at = Instant::now();
                if let Ok(Some((_, hash))) = store.tip() {
                    let mut t = timeline.lock().unwrap_or_else(|e| e.into_inner());
                    t.visible.entry(hash).or_insert(at);
                }
            }
        });
    })
}

/// Tip latency over `blocks` freshly mined blocks: (latencies ms, parse ms, sizes).
fn tip_latency(
    node: &Devnet,
    miner: &str,
    wallets: &[TestWallet],
    blocks: u32,
    rawtx: bool,
) -> Result<(Vec<f64>, Vec<f64>, Vec<usize>)> {
    let db = tempfile::tempdir()?;
    let mut zmq = node.zmq();
    zmq.topics.retain(|(t, _)| rawtx || *t != Topic::RawTx);
    let following = Following::start(
        node.daemon(true),
        Some(&zmq),
        db.path(),
        wallets,
        FollowOptions::default(),
    );
    if !following.wait_for(node.best().1, Duration::from_secs(300)) {
        bail!("the follower did not catch up");
    }
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let stop = Arc::new(AtomicBool::new(false));
    watch_arrivals(node, timeline.clone(), stop.clone())?;
    let committing = watch_commits(following.store.clone(), timeline.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300)); // let the subscriber connect

    let mut samples = Vec::new();
    for i in 0..blocks {
        let hash = node.mine_to(1, miner)[0];
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let t = timeline.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some((arrived, raw)), Some(visible)) =
                (t.arrived.get(&hash), t.visible.get(&hash))
            {
                samples.push((hash, *visible - *arrived, raw.clone()));
                break;
            }
            drop(t);
            if Instant::now() > until {
                bail!("block {i} ({hash}) never became visible");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = committing.join();
    // The parse stage on the same bytes, with the same filter, on the same rayon pool.
    let scripts = wallets::load_filter(&following.store, 100_000, 1e-4)?;
    following.stop()?;

    let mut latencies = Vec::new();
    let mut parses = Vec::new();
    let mut sizes = Vec::new();
    for (hash, latency, bytes) in samples {
        let size = bytes.len();
        let best = (0..3)
            .map(|_| {
                let raw = RawBlock {
                    height: 0,
                    hash,
                    bytes: bytes.clone(),
                    origin: "bench".into(),
                };
                let started = Instant::now();
                let parsed = parse_block(raw, &scripts).expect("parse");
                let took = started.elapsed();
                drop(parsed);
                took
            })
            .min()
            .unwrap_or_default();
        latencies.push(latency.as_secs_f64() * 1e3);
        parses.push(best.as_secs_f64() * 1e3);
        sizes.push(size);
    }
    Ok((latencies, parses, sizes))
}

/// How one catch-up read its blocks.
#[derive(Clone, Copy, Debug)]
enum Path {
    Rest,
    RpcHex,
    BlocksDir,
}

/// One catch-up of the whole chain into an empty index: (MB/s, MB, digest).
fn catch_up(node: &Devnet, wallets: &[TestWallet], path: Path) -> Result<(f64, f64, String)> {
    let db = tempfile::tempdir()?;
    let store = Arc::new(open_with_wallets(db.path(), Network::Regtest, wallets));
    let scripts = Arc::new(wallets::load_filter(&store, 100_000, 1e-4)?);
    let started = Instant::now();
    let bytes = match path {
        Path::Rest | Path::RpcHex => {
            let follower = Follower::new(
                store.clone(),
                Arc::new(node.daemon(matches!(path, Path::Rest))),
                scripts,
                Network::Regtest,
                FollowOptions::default(),
                Arc::new(AtomicBool::new(false)),
                None,
            );
            follower.sync(None)?.progress.bytes
        }
        Path::BlocksDir => {
            let req = RescanRequest {
                blocks_dir: node.blocks_dir(),
                from: None,
                to: None,
            };
            rescan_blocks_dir(
                &store,
                Network::Regtest,
                &scripts,
                &req,
                &PipelineOptions::default(),
                &|_| {},
                &|_| {},
            )?
            .progress
            .bytes
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let mb = bytes as f64 / 1e6;
    Ok((mb / secs, mb, store.digest()?.to_string()))
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    // The follower's warnings (lost ZMQ messages, reconciliations) explain outliers.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BENCH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(110, &miner);
    node.call("devnet_setfiller", json!([args.fillers]));
    let wallets = watched(&miner)?;

    eprintln!("tip latency over {} full blocks...", args.blocks);
    let (latencies, parses, sizes) =
        tip_latency(&node, &miner, &wallets, args.blocks, !args.no_rawtx)?;
    eprintln!(
        "latencies (ms): {:?}",
        latencies.iter().map(|l| l.round()).collect::<Vec<_>>()
    );
    let ratios = sorted(latencies.iter().zip(&parses).map(|(l, p)| l / p).collect());
    let latencies = sorted(latencies);
    let parses = sorted(parses);
    let mean_size = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64 / 1e6;
    println!(
        "blocks: {} of {:.2} MB on average ({:.2}-{:.2} MB)",
        sizes.len(),
        mean_size,
        *sizes.iter().min().unwrap_or(&0) as f64 / 1e6,
        *sizes.iter().max().unwrap_or(&0) as f64 / 1e6
    );
    println!(
        "tip latency (rawblock arrival -> visible): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    println!(
        "parse stage, same blocks: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&parses, 0.5),
        percentile(&parses, 0.99)
    );
    println!(
        "latency / parse time of the same block: p50 {:.2}, p99 {:.2}; p99 latency / p50 parse {:.2}",
        percentile(&ratios, 0.5),
        percentile(&ratios, 0.99),
        percentile(&latencies, 0.99) / percentile(&parses, 0.5)
    );

    eprintln!("catch-up, {} rounds...", args.rounds);
    let mut runs: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut digests = BTreeSet::new();
    let mut total_mb = 0.0;
    for _ in 0..args.rounds {
        for (name, path) in [
            ("rest", Path::Rest),
            ("rpc", Path::RpcHex),
            ("files", Path::BlocksDir),
        ] {
            let (rate, mb, digest) = catch_up(&node, &wallets, path)?;
            runs.entry(name).or_default().push(rate);
            digests.insert(digest);
            total_mb = mb;
        }
    }
    if digests.len() != 1 {
        bail!("catch-up paths disagree: {digests:?}");
    }
    let median = |name: &str| {
        let v = sorted(runs[name].clone());
        percentile(&v, 0.5)
    };
    let (rest, rpc, files) = (median("rest"), median("rpc"), median("files"));
    println!(
        "catch-up of {total_mb:.0} MB ({} blocks), median of {} runs: REST {rest:.0} MB/s ({:.2} of files), RPC hex {rpc:.0} MB/s ({:.2} of files), rescan --blocks-dir {files:.0} MB/s; same digest on all paths",
        node.best().0 + 1,
        args.rounds,
        rest / files,
        rpc / files
    );
    Ok(())
}
