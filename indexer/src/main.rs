//! `indexer`: the command line. Parses flags and config, then wires the library together.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bitcoind::{Daemon, DaemonError};
use indexer::config::{BitcoindFileConfig, Config, FileConfig};
use indexer::follow::{FollowOptions, Follower};
use indexer::metrics::IndexerMetrics;
use indexer::pipeline::{PipelineOptions, Progress, WriteOptions};
use indexer::rescan::{self, Plan, RescanRequest};
use indexer::store::schema::Cf;
use indexer::store::{Reader, Store};
use indexer::{grpc, wallets};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use service::auth::BearerToken;
use service::logs::{self, LogFormat};
use service::metrics_http::Probe;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

// Parsing allocates and frees many small objects across the pipeline's threads: mimalloc's
// thread-local heaps take that far better than glibc's arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "indexer", version, about = "Block indexer for watched wallets")]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command takes, before or after the subcommand.
#[derive(Args)]
struct CommonArgs {
    /// TOML config file.
    #[arg(long, global = true, env = "INDEXER_CONFIG")]
    config: Option<PathBuf>,
    /// Database directory.
    #[arg(long, global = true, env = "INDEXER_DB")]
    db: Option<PathBuf>,
    /// mainnet, testnet3, testnet4, signet or regtest.
    #[arg(long, global = true, env = "INDEXER_NETWORK")]
    network: Option<String>,
    /// Least scripts the bloom filter is sized for; it takes 2x the watched count when more (default 1,000,000).
    #[arg(long, global = true, env = "INDEXER_BLOOM_CAPACITY")]
    bloom_capacity: Option<usize>,
    /// Bloom filter false-positive rate (default 0.001).
    #[arg(long, global = true, env = "INDEXER_BLOOM_FP_RATE")]
    bloom_fp_rate: Option<f64>,
    /// Blocks of undo journal to keep (default: all).
    #[arg(long, global = true, env = "INDEXER_UNDO_DEPTH")]
    undo_depth: Option<u32>,
    /// Scripts derived from each ranged descriptor (default 1000).
    #[arg(long, global = true, env = "INDEXER_GAP_LIMIT")]
    gap_limit: Option<u32>,
    /// File holding the bearer token gRPC calls must present (required off loopback).
    #[arg(long, global = true, env = "INDEXER_GRPC_TOKEN_FILE")]
    grpc_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with --grpc-tls-key-file).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CERT_FILE")]
    grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_KEY_FILE")]
    grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CLIENT_CA_FILE")]
    grpc_tls_client_ca_file: Option<PathBuf>,
    /// Events kept in the event log; older offsets are pruned (default: all).
    #[arg(long, global = true, env = "INDEXER_EVENT_RETENTION")]
    event_retention: Option<u64>,
    /// bitcoind's JSON-RPC URL (default http://127.0.0.1:<rpcport>/).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_URL")]
    bitcoind_rpc_url: Option<String>,
    /// bitcoind's .cookie file (default ~/.bitcoin/[<network>/].cookie).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_COOKIE_FILE")]
    bitcoind_cookie_file: Option<PathBuf>,
    /// rpcuser, instead of the cookie (password from --bitcoind-rpc-password-file or INDEXER_BITCOIND_RPC_PASSWORD).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_USER")]
    bitcoind_rpc_user: Option<String>,
    /// File holding the RPC password.
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_PASSWORD_FILE")]
    bitcoind_rpc_password_file: Option<PathBuf>,
    /// Fetch blocks over REST (bitcoind rest=1).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_REST")]
    bitcoind_rest: Option<bool>,
    /// zmqpubrawblock endpoint, e.g. tcp://127.0.0.1:28332.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWBLOCK")]
    zmq_rawblock: Option<String>,
    /// zmqpubhashblock endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_HASHBLOCK")]
    zmq_hashblock: Option<String>,
    /// zmqpubsequence endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_SEQUENCE")]
    zmq_sequence: Option<String>,
    /// zmqpubrawtx endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWTX")]
    zmq_rawtx: Option<String>,
    /// Tip polling interval without ZMQ, milliseconds (default 1000).
    #[arg(long, global = true, env = "INDEXER_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// With ZMQ, check bitcoind's tip after this many seconds of silence (default 30).
    #[arg(long, global = true, env = "INDEXER_ZMQ_SILENCE_SECS")]
    zmq_silence_secs: Option<u64>,
    /// At start, seconds bitcoind may stay unreachable before `run` exits (default 60).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_STARTUP_WAIT_SECS")]
    bitcoind_startup_wait_secs: Option<u64>,
    /// Serve Prometheus metrics, /health and /ready over HTTP here (run and serve).
    #[arg(long, global = true, env = "INDEXER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or json.
    #[arg(
        long,
        global = true,
        env = "INDEXER_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Manage watched wallets.
    Watch {
        #[command(subcommand)]
        command: WatchCommand,
    },
    /// (Re)index a range of blocks.
    Rescan(RescanArgs),
    /// Tip, watched counts, database size and state digest.
    Status,
    /// Serve gRPC queries (indexer.v1.Indexer, health, reflection) from the database.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "INDEXER_GRPC", default_value = "127.0.0.1:50051")]
        grpc: std::net::SocketAddr,
    },
    /// Follow bitcoind (RPC/REST + ZMQ) and serve gRPC while doing it.
    Run {
        /// Address to listen on.
        #[arg(long, env = "INDEXER_GRPC", default_value = "127.0.0.1:50051")]
        grpc: std::net::SocketAddr,
    },
}

#[derive(Subcommand)]
enum WatchCommand {
    /// Watch the scripts of descriptors (or addresses) under a wallet name.
    Add {
        /// Wallet name.
        #[arg(long)]
        wallet: String,
        /// Height before which the scripts cannot have been used.
        #[arg(long)]
        birth_height: Option<u32>,
        /// Read descriptors from a file, one per line ('#' starts a comment line).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Descriptors or addresses.
        descriptors: Vec<String>,
    },
    /// List wallets and what they watch.
    List,
}

#[derive(Args)]
struct RescanArgs {
    /// Read bitcoind's blk*.dat files from this directory (no node needed).
    #[arg(long, env = "INDEXER_BLOCKS_DIR")]
    blocks_dir: Option<PathBuf>,
    /// First height to (re)index (default: after the indexed tip).
    #[arg(long)]
    from: Option<u32>,
    /// Last height (default: the best chain's tip).
    #[arg(long)]
    to: Option<u32>,
    /// Forget the indexed chain state first (wallets are kept) and index from scratch.
    #[arg(long)]
    reset: bool,
}

fn main() {
    let cli = Cli::parse();
    let format = cli.common.log_format;
    logs::init(format, "INDEXER_LOG");
    if let Err(e) = run(cli) {
        logs::fatal(format, &e);
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = load_config(&cli.common)?;
    let creates = matches!(
        cli.command,
        Command::Rescan(_)
            | Command::Run { .. }
            | Command::Watch {
                command: WatchCommand::Add { .. }
            }
    );
    if !creates && !config.db.exists() {
        bail!(
            "no database at {}: create one with `indexer watch add` (or point --db at it)",
            config.db.display()
        );
    }
    let store = Store::open(&config.db, config.network).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        let hint = if cause.contains("LOCK") {
            " (another indexer process has it open: one process at a time)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("opening database {}{hint}", config.db.display()))
    })?;
    match cli.command {
        Command::Watch {
            command:
                WatchCommand::Add {
                    wallet,
                    birth_height,
                    file,
                    descriptors,
                },
        } => {
            // Streamed in chunks: a file of millions of scripts never sits in memory whole.
            let file_bytes = file
                .as_ref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map_or(0, |m| m.len());
            // Room in the watched set's filter for what is there and what comes (a line
            // is 30 bytes or more), so that it is saved ready for the next start.
            let expected = store.estimate_keys(indexer::store::schema::Cf::Watch)
                + file_bytes / 30
                + descriptors.len() as u64 * u64::from(config.gap_limit);
            let filter = wallets::load_filter(
                &store,
                config
                    .bloom_capacity
                    .max(usize::try_from(expected).unwrap_or(usize::MAX)),
                config.bloom_fp_rate,
            )?;
            let given = descriptors.into_iter().map(Ok);
            let added = match &file {
                Some(path) => {
                    let reader = std::fs::File::open(path)
                        .with_context(|| format!("reading descriptors from {}", path.display()))?;
                    let lines =
                        std::io::BufRead::lines(std::io::BufReader::with_capacity(1 << 20, reader));
                    add_watched(
                        &store,
                        &config,
                        &wallet,
                        given.chain(lines),
                        birth_height,
                        &filter,
                    )?
                }
                None => add_watched(&store, &config, &wallet, given, birth_height, &filter)?,
            };
            if !filter.outgrown() {
                wallets::save_filter(&store, &filter)?;
            }
            println!(
                "wallet {wallet}: {} new scripts, {} already watched",
                added.new_scripts, added.known_scripts
            );
            if let Some((tip, _)) = store.tip()? {
                if birth_height.is_none_or(|b| b <= tip) {
                    println!(
                        "the index is at height {tip}: run `indexer rescan --from {}` to find their earlier history",
                        birth_height.unwrap_or(0)
                    );
                }
            }
        }
        Command::Watch {
            command: WatchCommand::List,
        } => {
            for w in wallets::list(&store)? {
                println!(
                    "{}\tscripts={}\tconfirmed_sat={}\timmature_sat={}\tutxos={}",
                    w.name,
                    w.scripts,
                    w.balance.confirmed,
                    w.balance.immature,
                    w.balance.utxo_count
                );
                for (d, birth) in &w.descriptors {
                    match birth {
                        Some(b) => println!("\t{d}\tbirth_height={b}"),
                        None => println!("\t{d}"),
                    }
                }
            }
        }
        Command::Rescan(args) => rescan_cmd(store, &config, args)?,
        Command::Serve { grpc } => serve_cmd(store, &config, grpc)?,
        Command::Run { grpc } => run_cmd(store, &config, grpc)?,
        Command::Status => {
            match store.tip()? {
                Some((h, hash)) => println!("tip\t{h}\t{hash}"),
                None => println!("tip\tnone"),
            }
            let wallets = wallets::list(&store)?;
            let scripts = store.count(Cf::Watch)?;
            println!("network\t{}", config.network.to_core_arg());
            println!("wallets\t{}", wallets.len());
            println!("scripts\t{scripts}");
            println!("utxos\t{}", store.count(Cf::Utxo)?);
            println!("db_bytes\t{}", store.size_on_disk());
            println!("digest\t{}", store.digest()?);
        }
    }
    Ok(())
}

/// The token and TLS the gRPC server on `addr` uses: off loopback a token is required.
fn grpc_access(config: &Config, addr: std::net::SocketAddr) -> Result<grpc::Access> {
    let token = match &config.grpc_token_file {
        Some(path) => Some(BearerToken::from_file(path)?),
        None if addr.ip().is_loopback() => None,
        None => bail!("serving on {addr}, off loopback, needs a token: set grpc_token_file"),
    };
    let tls = match &config.grpc_tls {
        None => None,
        Some(files) => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))
            };
            let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
            let mut tls = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &files.client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
            }
            Some(tls)
        }
    };
    Ok(grpc::Access {
        token,
        tls,
        watch: indexer::add_watch::WatchChanges::Refused,
    })
}

fn pipeline_options(config: &Config) -> PipelineOptions {
    PipelineOptions {
        write: WriteOptions {
            undo_depth: config.undo_depth,
            event_retention: config.event_retention,
            ..WriteOptions::default()
        },
        ..PipelineOptions::default()
    }
}

/// The follower of the configured bitcoind (with its ZMQ feed when configured).
/// The follower, and bitcoind's height when it answered.
fn follower(store: Arc<Store>, config: &Config, stop: Arc<AtomicBool>) -> Result<(Follower, u32)> {
    let bitcoind = config
        .bitcoind
        .resolve(
            config.network,
            std::env::var("INDEXER_BITCOIND_RPC_PASSWORD").ok(),
        )
        .context("bitcoind settings")?;
    let scripts = wallets::load_filter(&store, config.bloom_capacity, config.bloom_fp_rate)?;
    if scripts.is_empty() {
        tracing::warn!("no scripts are watched: add some with `indexer watch add`");
    }
    let daemon = Daemon::new(
        &bitcoind.rpc_url,
        bitcoind.auth.clone(),
        bitcoind.rest,
        bitcoind.rpc_timeout,
    );
    // A wrong network or a node that never answers at start is a configuration error:
    // said in one line with what to check, rather than retried forever.
    let info = match daemon.wait_ready(config.network, bitcoind.startup_wait) {
        Ok(info) => info,
        Err(e @ DaemonError::WrongNetwork { .. }) => return Err(e.into()),
        Err(e) => bail!(
            "{e} (after {}s: check bitcoind.rpc_url, cookie_file or rpc_user, and that \
             bitcoind runs with server=1; bitcoind.startup_wait_secs waits longer)",
            bitcoind.startup_wait.as_secs()
        ),
    };
    daemon.probe_rest();
    tracing::info!(
        url = %bitcoind.rpc_url,
        height = info.blocks,
        blocks_over = if daemon.rest_in_use() { "rest" } else { "rpc getblock" },
        zmq = bitcoind.zmq.topics.len(),
        "connected to bitcoind"
    );
    let notices = if bitcoind.zmq.is_empty() {
        tracing::info!(interval = ?bitcoind.poll_interval, "no ZMQ endpoints configured: polling bitcoind");
        None
    } else {
        Some(indexer::zmq_feed::spawn(&bitcoind.zmq, stop.clone())?)
    };
    let opts = FollowOptions {
        poll_interval: bitcoind.poll_interval,
        zmq_silence: bitcoind.zmq_silence,
        pipeline: pipeline_options(config),
        bloom_capacity: config.bloom_capacity,
        bloom_fp_rate: config.bloom_fp_rate,
        ..FollowOptions::default()
    };
    let follower = Follower::new(
        store,
        Arc::new(daemon),
        Arc::new(scripts),
        config.network,
        opts,
        stop,
        notices,
    );
    Ok((follower, info.blocks))
}

fn run_cmd(store: Store, config: &Config, addr: std::net::SocketAddr) -> Result<()> {
    let mut access = grpc_access(config, addr)?;
    let store = Arc::new(store);
    let stop = Arc::new(AtomicBool::new(false));
    let (watch, watch_requests, backfills) = indexer::add_watch::channel(config.gap_limit);
    access.watch = watch;
    let metrics = IndexerMetrics::default();
    let (follower, node_height) = follower(store.clone(), config, stop.clone())?;
    let start = store.tip()?.map_or(0, |(h, _)| h + 1);
    let reporter = Arc::new(Reporter::new());
    reporter.catch_up(start, node_height);
    let sink = reporter.clone();
    let follower = follower
        .with_watch_requests(watch_requests, backfills)
        .with_metrics(metrics.clone())
        .on_commit(move |p| sink.caught_up_to(p));
    let mempool = follower.mempool();
    let runtime = indexer::serve_priority::runtime().context("starting the async runtime")?;
    let (follower_done, follower_ended) = tokio::sync::oneshot::channel::<()>();
    // Before the thread starts, so /health never answers "down" while it is starting.
    metrics.set_follower_alive(true);
    let follow = std::thread::Builder::new()
        .name("follow".into())
        .spawn(move || {
            let result = follower.run();
            let _ = follower_done.send(());
            result
        })
        .context("starting the follower thread")?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        serve_metrics(config, Arc::new(metrics.probe(true)))?;
        tracing::info!(%local, "following bitcoind; serving indexer.v1.Indexer, grpc.health.v1 and reflection");
        println!("listening\t{local}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let stop_following = stop.clone();
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("shutting down"),
                _ = term.recv() => tracing::info!("shutting down"),
                _ = follower_ended => {}
            }
            // Before the server drains: a catch-up ends with its block in hand, so the
            // drain does not run yielding to it.
            stop_following.store(true, Ordering::Relaxed);
        };
        grpc::serve_observed(
            store.clone(),
            config.network,
            Some(mempool),
            listener,
            access,
            metrics,
            shutdown,
        )
        .await?;
        anyhow::Ok(())
    });
    // Also when serving failed: finish the block in hand, then stop.
    stop.store(true, Ordering::Relaxed);
    let followed = follow.join().expect("follower thread panicked");
    served?;
    followed.context("following bitcoind failed")?;
    Ok(())
}

fn serve_cmd(store: Store, config: &Config, addr: std::net::SocketAddr) -> Result<()> {
    let mut access = grpc_access(config, addr)?;
    // Nothing else writes to the database here: AddWatch applies directly.
    access.watch = indexer::add_watch::WatchChanges::Direct {
        gap_limit: config.gap_limit,
    };
    let metrics = IndexerMetrics::default();
    if let Some((height, _)) = store.tip()? {
        // Nothing here moves the tip.
        metrics.indexed_height.set(i64::from(height));
    }
    let runtime = indexer::serve_priority::runtime().context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr().context("reading the bound address")?;
        serve_metrics(config, Arc::new(metrics.probe(false)))?;
        tracing::info!(%local, "serving indexer.v1.Indexer, grpc.health.v1 and reflection");
        println!("listening\t{local}");
        // Stop on Ctrl-C or SIGTERM (what service managers send), finishing open calls.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
        };
        grpc::serve_observed(
            Arc::new(store),
            config.network,
            None,
            listener,
            access,
            metrics,
            shutdown,
        )
        .await?;
        Ok(())
    })
}

/// Starts the metrics endpoint when `metrics_listen` is set, and prints `metrics<TAB>ADDR`.
fn serve_metrics(config: &Config, probe: Arc<dyn Probe>) -> Result<()> {
    let Some(addr) = config.metrics_listen else {
        return Ok(());
    };
    let local = service::metrics_http::start(addr, probe)
        .with_context(|| format!("serving metrics on {addr}"))?;
    println!("metrics\t{local}");
    Ok(())
}

fn load_config(args: &CommonArgs) -> Result<Config> {
    let flags = FileConfig {
        db: args.db.clone(),
        network: args.network.clone(),
        bloom_capacity: args.bloom_capacity,
        bloom_fp_rate: args.bloom_fp_rate,
        undo_depth: args.undo_depth,
        gap_limit: args.gap_limit,
        grpc_token_file: args.grpc_token_file.clone(),
        grpc_tls_cert_file: args.grpc_tls_cert_file.clone(),
        grpc_tls_key_file: args.grpc_tls_key_file.clone(),
        grpc_tls_client_ca_file: args.grpc_tls_client_ca_file.clone(),
        event_retention: args.event_retention,
        metrics_listen: args.metrics_listen,
        bitcoind: BitcoindFileConfig {
            rpc_url: args.bitcoind_rpc_url.clone(),
            cookie_file: args.bitcoind_cookie_file.clone(),
            rpc_user: args.bitcoind_rpc_user.clone(),
            rpc_password_file: args.bitcoind_rpc_password_file.clone(),
            rest: args.bitcoind_rest,
            zmq_rawblock: args.zmq_rawblock.clone(),
            zmq_hashblock: args.zmq_hashblock.clone(),
            zmq_sequence: args.zmq_sequence.clone(),
            zmq_rawtx: args.zmq_rawtx.clone(),
            poll_interval_ms: args.poll_interval_ms,
            zmq_silence_secs: args.zmq_silence_secs,
            startup_wait_secs: args.bitcoind_startup_wait_secs,
            rpc_timeout_secs: None,
        },
    };
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    Ok(Config::resolve(flags.or(file))?)
}

/// `watch add`: the descriptors of `lines` under `wallet`, with progress on stderr for
/// large sets.
fn add_watched(
    store: &Store,
    config: &Config,
    wallet: &str,
    lines: impl Iterator<Item = std::io::Result<String>>,
    birth_height: Option<u32>,
    filter: &indexer::script_filter::ScriptFilter,
) -> Result<wallets::Added> {
    let started = Instant::now();
    let target = wallets::WatchTarget {
        network: config.network,
        wallet,
        birth_height,
        gap_limit: config.gap_limit,
    };
    let added = wallets::add_lines(store, &target, lines, Some(filter), &|so_far| {
        if started.elapsed() > std::time::Duration::from_secs(2) {
            eprintln!(
                "{} scripts so far ({:.0}/s)",
                so_far.new_scripts + so_far.known_scripts,
                (so_far.new_scripts + so_far.known_scripts) as f64
                    / started.elapsed().as_secs_f64()
            );
        }
    })?;
    Ok(added)
}

fn rescan_cmd(store: Store, config: &Config, args: RescanArgs) -> Result<()> {
    if args.reset {
        store.reset_chain_state()?;
        tracing::info!("chain state reset; wallets kept");
    }
    let Some(blocks_dir) = args.blocks_dir else {
        return rescan_from_bitcoind(store, config, args.from, args.to);
    };
    let scripts = wallets::load_filter(&store, config.bloom_capacity, config.bloom_fp_rate)?;
    if scripts.is_empty() {
        tracing::warn!("no scripts are watched: add some with `indexer watch add`");
    }
    let req = RescanRequest {
        blocks_dir,
        from: args.from,
        to: args.to,
    };
    let reporter = Reporter::new();
    let report = rescan::rescan_blocks_dir(
        &store,
        config.network,
        &scripts,
        &req,
        &pipeline_options(config),
        &|plan| reporter.plan(plan),
        &|p| reporter.commit(p),
    )
    .context("rescan failed; every block before the failure is committed and a rerun resumes")?;
    // The look-ahead may have watched more: the next start loads this filter, not a scan.
    wallets::save_filter(&store, &scripts)?;
    reporter.finish(&report.progress);
    print_outcome(report.tip, &report.progress, report.disconnected);
    Ok(())
}

/// `rescan` without `--blocks-dir`: the catch-up path of `indexer run`, once.
fn rescan_from_bitcoind(
    store: Store,
    config: &Config,
    from: Option<u32>,
    to: Option<u32>,
) -> Result<()> {
    let store = Arc::new(store);
    let mut disconnected = 0;
    if let Some(from) = from {
        if store.tip()?.is_some_and(|(h, _)| h >= from) {
            disconnected = store.disconnect_above(from.checked_sub(1), true)?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reporter = Arc::new(Reporter::new());
    let sink = reporter.clone();
    let (follower, _) = follower(store.clone(), config, stop)?;
    let follower = follower.on_commit(move |p| sink.commit(p));
    let report = follower
        .sync(to)
        .context("rescan from bitcoind failed; every block before the failure is committed and a rerun resumes")?;
    reporter.finish(&report.progress);
    print_outcome(
        report.tip,
        &report.progress,
        disconnected + report.disconnected,
    );
    Ok(())
}

fn print_outcome(tip: Option<(u32, bitcoin::BlockHash)>, progress: &Progress, disconnected: u32) {
    match tip {
        Some((h, hash)) => println!("tip\t{h}\t{hash}"),
        None => println!("tip\tnone"),
    }
    println!(
        "connected\t{} blocks, {} txs, {} bytes",
        progress.blocks, progress.txs, progress.bytes
    );
    println!("disconnected\t{disconnected}");
}

/// Progress on stderr: a bar with blocks/s, MB/s and ETA on a terminal, log lines otherwise.
struct Reporter {
    bar: ProgressBar,
    started: Instant,
    last_log: Mutex<Instant>,
    tty: bool,
    /// For `run`'s catch-up: its first and last height (then the bar goes away).
    catch_up: Mutex<Option<(u32, u32)>>,
}

impl Reporter {
    fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if !tty {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} blocks  {msg}  ETA {eta}")
                .expect("static template is valid"),
        );
        Reporter {
            bar,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
            tty,
            catch_up: Mutex::new(None),
        }
    }

    /// Shows `run`'s catch-up of the blocks from height `start` to bitcoind's `to`, when
    /// there are any.
    fn catch_up(&self, start: u32, to: u32) {
        if to < start {
            self.bar.finish_and_clear();
            return;
        }
        self.bar.set_length(u64::from(to + 1 - start));
        *self
            .catch_up
            .lock()
            .expect("progress lock is never poisoned") = Some((start, to));
    }

    /// A commit while following: moves the catch-up bar until bitcoind's height at start.
    fn caught_up_to(&self, p: &Progress) {
        let mut range = self
            .catch_up
            .lock()
            .expect("progress lock is never poisoned");
        let Some((start, to)) = *range else { return };
        if p.height >= to {
            *range = None;
            self.bar.finish_and_clear();
            tracing::info!("caught up: {}", self.rates(p));
            return;
        }
        drop(range);
        let done = (p.height + 1).saturating_sub(start);
        let p = Progress {
            blocks: u64::from(done),
            ..*p
        };
        self.commit(&p);
    }

    fn plan(&self, plan: &Plan) {
        let total = plan.end.map_or(0, |end| u64::from(end - plan.start + 1));
        self.bar.set_length(total);
        tracing::info!(start = plan.start, end = ?plan.end, "rescan range");
    }

    fn rates(&self, p: &Progress) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "height {}  {:.0} blocks/s  {:.1} MB/s  {:.0} tx/s",
            p.height,
            p.blocks as f64 / secs,
            p.bytes as f64 / secs / 1e6,
            p.txs as f64 / secs
        )
    }

    fn commit(&self, p: &Progress) {
        self.bar.set_position(p.blocks);
        self.bar.set_message(self.rates(p));
        if !self.tty {
            let mut last = self
                .last_log
                .lock()
                .expect("progress lock is never poisoned");
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                let eta = self.bar.eta().as_secs();
                tracing::info!(blocks = p.blocks, eta_s = eta, "{}", self.rates(p));
            }
        }
    }

    fn finish(&self, p: &Progress) {
        self.bar.finish_and_clear();
        tracing::info!("done: {}", self.rates(p));
    }
}
