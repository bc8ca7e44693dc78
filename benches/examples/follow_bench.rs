//! Following bitcoind, measured against the devnet (the project's bitcoind-compatible
//! node) on 127.0.0.1, with blocks full of signed wallet traffic:
//!
//! - tip latency: a block's `rawblock` ZMQ message arriving -> the block committed and
//!   visible to queries, p50/p99, against the time the parse stage takes for the same
//!   block (the target: p99 < 2x the parse time);
//! - catch-up throughput from an empty index over REST, over JSON-RPC hex, and as a ratio
//!   to `rescan --blocks-dir` of the node's own blk files, on the same blocks.
//!
//! - with `--subscribers N`: the tip latency again, side by side in the same run, while N
//!   gRPC subscribers follow the event log live.
//! - with `--add-watch N`: the tip latency while a client adds N new deposit addresses
//!   over gRPC `AddWatch` (calls of 100,000, one after the other), against the blocks
//!   before and after, and the calls' scripts/s.
//!
//! `follow_bench [--blocks N] [--fillers N] [--rounds N] [--subscribers N] [--watched-share F]
//! [--add-watch N]`

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::hex::FromHex;
use bitcoin::{block, Address, BlockHash, Network, ScriptBuf};
use clap::Parser;
use crossbeam_channel::RecvTimeoutError;
use indexer::follow::{FollowOptions, Follower};
use indexer::pipeline::parse::{parse_block, RawBlock};
use indexer::store::{Reader, Store};
use indexer::wallets;
use indexer::zmq_feed::{self as izmq, Notice, Topic, ZmqEndpoints};
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_client::IndexerClient;
use serde_json::json;
use system_tests::harness::{open_with_wallets, TestWallet};
use system_tests::live::{Devnet, Following};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Full blocks mined while the indexer follows live (each one a latency sample).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(1..))]
    blocks: u32,
    /// Wallet transactions the node packs into each block (the weight limit caps them).
    #[arg(long, default_value_t = 20_000)]
    fillers: u64,
    /// Follow without the `rawtx` topic (no mempool tracking), to see what it costs.
    #[arg(long)]
    no_rawtx: bool,
    /// Catch-up runs of each kind, interleaved (0: none).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// After the tip-latency blocks, mine as many again while this many gRPC subscribers
    /// follow the event log live, then as many again without them, and compare.
    #[arg(long, default_value_t = 0)]
    subscribers: usize,
    /// Also watch this share of the scripts the node's traffic pays (more events a block).
    #[arg(long, default_value_t = 0.0)]
    watched_share: f64,
    /// After the tip-latency blocks, add this many new addresses over gRPC `AddWatch`
    /// while blocks keep coming, then mine as many blocks again without.
    #[arg(long, default_value_t = 0)]
    add_watch: u32,
}

/// Descriptors an `AddWatch` call takes at most.
const PER_CALL: usize = 100_000;

/// The bench's gRPC token (the server refuses writes without one).
const TOKEN: &str = "bench-token-of-32-characters-xyz";

/// What the `--add-watch` phase measured.
#[derive(Default)]
struct Adds {
    /// Tip latencies (ms) of the blocks mined while the calls ran.
    latencies: Vec<f64>,
    /// Each call's time (s).
    calls: Vec<f64>,
    /// All the calls, first sent to last answered (s).
    total: f64,
    /// Scripts the calls added.
    added: u64,
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

/// Serves `store` over gRPC and starts `n` subscribers following its event log from
/// offset 0; returns the runtime (dropping it stops them) and their event counts.
fn start_subscribers(
    store: Arc<Store>,
    n: usize,
) -> Result<(tokio::runtime::Runtime, Arc<AtomicU64>)> {
    let runtime = indexer::serve_priority::runtime()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(indexer::grpc::serve(
        store,
        listener,
        indexer::grpc::ServeOptions::new(Network::Regtest),
        std::future::pending(),
    ));
    let received = Arc::new(AtomicU64::new(0));
    let channel = runtime
        .block_on(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect())?;
    for _ in 0..n {
        let (channel, received) = (channel.clone(), received.clone());
        runtime.spawn(async move {
            let mut client = IndexerClient::new(channel);
            let Ok(events) = client
                .subscribe(pb::SubscribeRequest {
                    from_offset: 0,
                    ..Default::default()
                })
                .await
            else {
                return;
            };
            let mut events = events.into_inner();
            while let Ok(Some(_)) = events.message().await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Ok((runtime, received))
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

/// `n` regtest P2WPKH addresses no wallet watches (deposit addresses of new customers).
fn deposit_addresses(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            let h = bitcoin::hashes::sha256::Hash::hash(
                &[b"deposit".as_slice(), &i.to_le_bytes()].concat(),
            );
            let mut program = [0u8; 20];
            program.copy_from_slice(&h.to_byte_array()[..20]);
            let script = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(program));
            Address::from_script(&script, Network::Regtest)
                .map(|a| a.to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// Serves `following` over gRPC with `AddWatch` going to its follower (token [`TOKEN`]);
/// returns the runtime (dropping it stops the server) and a client.
fn serve_adds(
    following: &Following,
) -> Result<(
    tokio::runtime::Runtime,
    IndexerClient<tonic::transport::Channel>,
)> {
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(indexer::grpc::serve(
        following.store.clone(),
        listener,
        indexer::grpc::ServeOptions {
            access: indexer::grpc::Access {
                token: Some(service::auth::BearerToken::new(TOKEN)),
                tls: None,
                watch: following.watch.clone(),
            },
            ..indexer::grpc::ServeOptions::new(Network::Regtest)
        },
        std::future::pending(),
    ));
    let channel = runtime
        .block_on(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect())?;
    Ok((runtime, IndexerClient::new(channel)))
}

/// Sends `addresses` as `AddWatch` calls of [`PER_CALL`], one after the other: each
/// call's time, and the scripts added.
fn add_in_calls(
    runtime: &tokio::runtime::Runtime,
    client: &IndexerClient<tonic::transport::Channel>,
    addresses: &[String],
) -> Result<(Vec<f64>, u64)> {
    let mut calls = Vec::new();
    let mut added = 0;
    for chunk in addresses.chunks(PER_CALL) {
        let mut req = tonic::Request::new(pb::AddWatchRequest {
            wallet: "deposits".into(),
            descriptors: chunk.to_vec(),
            birth_height: None,
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        let started = Instant::now();
        let answer = runtime
            .block_on(client.clone().add_watch(req))?
            .into_inner();
        calls.push(started.elapsed().as_secs_f64());
        added += u64::from(answer.new_scripts);
    }
    Ok((calls, added))
}

/// What [`tip_latency`] measured.
struct Measured {
    /// Tip latencies (ms) of the blocks without subscribers or adds.
    latencies: Vec<f64>,
    /// The parse time (ms) of each of those blocks, best of three.
    parses: Vec<f64>,
    /// Their sizes.
    sizes: Vec<usize>,
    /// Tip latencies (ms) with the subscribers following.
    with_subscribers: Vec<f64>,
    /// Events the subscribers received during their blocks.
    delivered: u64,
    /// The `--add-watch` phase.
    adds: Adds,
}

/// Tip latency over `blocks` blocks; with `subscribers`, then over as many again while
/// they follow the event log, then as many again without them (counted with the first);
/// with `add_watch`, then while that many addresses are added over gRPC, then over as
/// many blocks again without.
fn tip_latency(
    node: &Devnet,
    miner: &str,
    wallets: &[TestWallet],
    blocks: u32,
    rawtx: bool,
    subscribers: usize,
    add_watch: u32,
) -> Result<Measured> {
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

    let sample_while = |samples: &mut Vec<(BlockHash, Duration, Vec<u8>)>,
                        more: &dyn Fn(u32) -> bool|
     -> Result<()> {
        let mut i = 0;
        while more(i) {
            i += 1;
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
        Ok(())
    };
    let sample =
        |samples: &mut Vec<(BlockHash, Duration, Vec<u8>)>| sample_while(samples, &|i| i < blocks);
    let mut samples = Vec::new();
    sample(&mut samples)?;
    let mut with_subscribers = Vec::new();
    let mut delivered = 0;
    if subscribers > 0 {
        let (runtime, received) = start_subscribers(following.store.clone(), subscribers)?;
        // Let them replay the log so far and catch up before measuring.
        let total = following.store.next_event()? * subscribers as u64;
        let until = Instant::now() + Duration::from_secs(120);
        while received.load(Ordering::Relaxed) < total && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if received.load(Ordering::Relaxed) < total {
            bail!(
                "the {subscribers} subscribers did not all replay the log before the measurement"
            );
        }
        let before = received.load(Ordering::Relaxed);
        sample(&mut with_subscribers)?;
        // Every subscriber must have received every event: one that dropped out would
        // make the "with" side lighter than it claims.
        let total = following.store.next_event()? * subscribers as u64;
        let until = Instant::now() + Duration::from_secs(60);
        while received.load(Ordering::Relaxed) < total && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        if received.load(Ordering::Relaxed) != total {
            bail!(
                "the {subscribers} subscribers received {} of {total} events during the measurement",
                received.load(Ordering::Relaxed)
            );
        }
        delivered = total - before;
        drop(runtime);
        // And without them again, so neither side has the quieter moment to itself
        // (compactions after the catch-up fall on the first phase).
        let mut after = Vec::new();
        sample(&mut after)?;
        samples.extend(after);
    }
    let mut adds = Adds::default();
    if add_watch > 0 {
        let addresses = deposit_addresses(add_watch);
        let (runtime, client) = serve_adds(&following)?;
        let adding = AtomicBool::new(true);
        let mut during = Vec::new();
        let started = Instant::now();
        let outcome = std::thread::scope(|s| {
            let sender = s.spawn(|| {
                let outcome = add_in_calls(&runtime, &client, &addresses);
                adding.store(false, Ordering::Relaxed);
                outcome
            });
            let sampled = sample_while(&mut during, &|_| adding.load(Ordering::Relaxed));
            let sent = sender
                .join()
                .map_err(|_| anyhow::anyhow!("the adding thread panicked"));
            sampled.and(sent)
        });
        let (calls, added) = outcome??;
        adds = Adds {
            latencies: during
                .into_iter()
                .map(|(_, latency, _)| latency.as_secs_f64() * 1e3)
                .collect(),
            calls,
            total: started.elapsed().as_secs_f64(),
            added,
        };
        if adds.added != u64::from(add_watch) {
            bail!("AddWatch added {} of {add_watch} scripts", adds.added);
        }
        drop(runtime);
        let mut after = Vec::new();
        sample(&mut after)?;
        samples.extend(after);
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
    let with_subscribers = with_subscribers
        .into_iter()
        .map(|(_, latency, _)| latency.as_secs_f64() * 1e3)
        .collect();
    Ok(Measured {
        latencies,
        parses,
        sizes,
        with_subscribers,
        delivered,
        adds,
    })
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
            benches::rescan(&store, &scripts, &node.blocks_dir(), &|_| {})?
                .0
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
    let mut wallets = watched(&miner)?;
    if args.watched_share > 0.0 {
        // Sample the scripts the node's traffic pays from a few full blocks.
        node.mine_to(5, &miner);
        let (height, _) = node.best();
        for h in height - 4..=height {
            let hex = node.call("getblock", json!([node.hash_at(h).to_string(), 0]));
            let raw = Vec::<u8>::from_hex(hex.as_str().unwrap_or_default())?;
            let block: bitcoin::Block = deserialize(&raw)?;
            for out in block.txdata.iter().flat_map(|tx| &tx.output) {
                let bucket = bitcoin::hashes::sha256::Hash::hash(out.script_pubkey.as_bytes())
                    .to_byte_array()[0];
                if f64::from(bucket) < args.watched_share * 256.0
                    && !out.script_pubkey.is_op_return()
                {
                    wallets[0].scripts.insert(out.script_pubkey.clone());
                }
            }
        }
    }

    eprintln!("tip latency over {} full blocks...", args.blocks);
    let Measured {
        latencies,
        parses,
        sizes,
        with_subscribers,
        delivered,
        adds,
    } = tip_latency(
        &node,
        &miner,
        &wallets,
        args.blocks,
        !args.no_rawtx,
        args.subscribers,
        args.add_watch,
    )?;
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

    if args.subscribers > 0 {
        let with = sorted(with_subscribers);
        println!(
            "tip latency with {} subscribers following the event log ({delivered} events delivered during it): p50 {:.1} ms, p99 {:.1} ms; ratio to without: p50 {:.2}, p99 {:.2}",
            args.subscribers,
            percentile(&with, 0.5),
            percentile(&with, 0.99),
            percentile(&with, 0.5) / percentile(&latencies, 0.5),
            percentile(&with, 0.99) / percentile(&latencies, 0.99)
        );
    }
    if args.add_watch > 0 {
        let during = sorted(adds.latencies);
        let calls = sorted(adds.calls);
        println!(
            "AddWatch of {} new addresses in {} calls of up to {PER_CALL}, one after the other, while following: {:.1} s, {:.0} scripts/s; a call p50 {:.2} s, max {:.2} s",
            adds.added,
            calls.len(),
            adds.total,
            adds.added as f64 / adds.total,
            percentile(&calls, 0.5),
            percentile(&calls, 1.0),
        );
        if during.is_empty() {
            println!("no block was mined during the calls");
        } else {
            println!(
                "tip latency of the {} blocks mined during the calls: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; ratio to without (same run): p50 {:.2}, max {:.2}",
                during.len(),
                percentile(&during, 0.5),
                percentile(&during, 0.99),
                percentile(&during, 1.0),
                percentile(&during, 0.5) / percentile(&latencies, 0.5),
                percentile(&during, 1.0) / percentile(&latencies, 1.0),
            );
        }
    }
    if args.rounds == 0 {
        return Ok(());
    }
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
