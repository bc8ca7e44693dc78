//! `orchestrator run --config FILE`: the withdrawal service. Serves
//! `orchestrator.v1.Withdrawals` (every call needs the bearer token) and runs every
//! unfinished saga against the indexer, bitcoind and the key-file signer, resuming them
//! after any restart. Prints `listening<TAB>ADDR` once it accepts calls (after
//! `metrics<TAB>ADDR` when `metrics_listen` is set); SIGTERM or Ctrl-C stop it after the
//! step in hand.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use orchestrator::config::FileConfig;
use orchestrator::executor::Executor;
use orchestrator::grpc::WithdrawalService;
use orchestrator::metrics::OrchestratorProbe;
use orchestrator::signer::{KeyFileSigner, Signer};
use orchestrator::store::SagaStore;
use orchestrator::upstream;
use service::grpc_latency::GrpcLatency;
use service::logs::{self, LogFormat};

/// The withdrawal orchestrator.
#[derive(Parser)]
#[command(name = "orchestrator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve withdrawals and run their sagas.
    Run(Box<RunArgs>),
    /// Create a key file holding one new key (mode 600) and print the address it pays.
    Keygen {
        /// The key file to create (never overwritten).
        #[arg(long)]
        key_file: PathBuf,
        /// mainnet, testnet3, testnet4, signet or regtest.
        #[arg(long, default_value = "mainnet")]
        network: String,
    },
}

/// Every setting of the config file, as a flag or `ORCHESTRATOR_<NAME>`.
#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    config: Option<PathBuf>,
    /// mainnet, testnet3, testnet4, signet or regtest.
    #[arg(long, env = "ORCHESTRATOR_NETWORK")]
    network: Option<String>,
    /// gRPC listen address (default 127.0.0.1:50061; port 0 picks one).
    #[arg(long, env = "ORCHESTRATOR_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The indexer's gRPC endpoint (default http://127.0.0.1:50051; https: TLS).
    #[arg(long, env = "ORCHESTRATOR_INDEXER")]
    indexer: Option<String>,
    /// The file holding the indexer's bearer token (when its reads are protected).
    #[arg(long, env = "ORCHESTRATOR_INDEXER_TOKEN_FILE")]
    indexer_token_file: Option<PathBuf>,
    /// PEM CA the indexer's TLS certificate must chain to.
    #[arg(long, env = "ORCHESTRATOR_INDEXER_CA_FILE")]
    indexer_ca_file: Option<PathBuf>,
    /// bitcoind's JSON-RPC URL.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_URL")]
    bitcoind_rpc_url: Option<String>,
    /// bitcoind's cookie file.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_COOKIE_FILE")]
    bitcoind_cookie_file: Option<PathBuf>,
    /// bitcoind's rpcuser, instead of the cookie (password: the file below, or
    /// ORCHESTRATOR_BITCOIND_RPC_PASSWORD).
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_USER")]
    bitcoind_rpc_user: Option<String>,
    /// File holding bitcoind's RPC password (mode 600).
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_PASSWORD_FILE")]
    bitcoind_rpc_password_file: Option<PathBuf>,
    /// At start, seconds bitcoind and the indexer may stay unreachable (default 60).
    #[arg(long, env = "ORCHESTRATOR_STARTUP_WAIT_SECS")]
    startup_wait_secs: Option<u64>,
    /// The saga database directory.
    #[arg(long, env = "ORCHESTRATOR_DB")]
    db: Option<PathBuf>,
    /// The signer's key file (WIF private keys, mode 600).
    #[arg(long, env = "ORCHESTRATOR_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// The file holding the bearer token.
    #[arg(long, env = "ORCHESTRATOR_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where change goes.
    #[arg(long, env = "ORCHESTRATOR_CHANGE_ADDRESS")]
    change_address: Option<String>,
    /// Confirmations that complete a withdrawal (default 3).
    #[arg(long, env = "ORCHESTRATOR_CONFIRMATIONS")]
    confirmations: Option<u32>,
    /// Confirmations after which its coins are released (default 6).
    #[arg(long, env = "ORCHESTRATOR_SETTLE_CONFIRMATIONS")]
    settle_confirmations: Option<u32>,
    /// Blocks a payment may stay unmined before it is replaced (default 3).
    #[arg(long, env = "ORCHESTRATOR_BUMP_AFTER_BLOCKS")]
    bump_after_blocks: Option<u32>,
    /// Lowest fee rate used, sat/vB (default 1).
    #[arg(long, env = "ORCHESTRATOR_FEE_FLOOR")]
    fee_floor: Option<f64>,
    /// Highest fee rate used, sat/vB (default 500).
    #[arg(long, env = "ORCHESTRATOR_FEE_CEILING")]
    fee_ceiling: Option<f64>,
    /// Serve Prometheus metrics, /health and /ready over HTTP here.
    #[arg(long, env = "ORCHESTRATOR_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or json.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() {
    let command = Cli::parse().command;
    let format = match &command {
        Command::Run(args) => args.log_format,
        Command::Keygen { .. } => logs::LogFormat::Text,
    };
    logs::init(format, "ORCHESTRATOR_LOG");
    let outcome = match command {
        Command::Run(args) => run(*args),
        Command::Keygen { key_file, network } => keygen(&key_file, &network),
    };
    if let Err(e) = outcome {
        logs::fatal(format, &e);
        std::process::exit(1);
    }
}

fn keygen(path: &std::path::Path, network: &str) -> Result<()> {
    let network = service::config::parse_network(network)?;
    let address = orchestrator::signer::generate_key_file(path, network)
        .with_context(|| format!("creating the key file {}", path.display()))?;
    println!("{address}");
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let flags = FileConfig {
        network: args.network,
        listen: args.listen,
        indexer: args.indexer,
        indexer_token_file: args.indexer_token_file,
        indexer_ca_file: args.indexer_ca_file,
        bitcoind_rpc_url: args.bitcoind_rpc_url,
        bitcoind_cookie_file: args.bitcoind_cookie_file,
        bitcoind_rpc_user: args.bitcoind_rpc_user,
        bitcoind_rpc_password_file: args.bitcoind_rpc_password_file,
        startup_wait_secs: args.startup_wait_secs,
        db: args.db,
        key_file: args.key_file,
        token_file: args.token_file,
        change_address: args.change_address,
        confirmations: args.confirmations,
        settle_confirmations: args.settle_confirmations,
        bump_after_blocks: args.bump_after_blocks,
        fee_floor: args.fee_floor,
        fee_ceiling: args.fee_ceiling,
        metrics_listen: args.metrics_listen,
    };
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let config = flags
        .or(file)
        .resolve_with(std::env::var("ORCHESTRATOR_BITCOIND_RPC_PASSWORD").ok())?;
    let token = service::auth::BearerToken::from_file(&config.token_file)?;
    let signer = KeyFileSigner::open(&config.key_file, config.network)
        .context("the signer's key_file (`orchestrator keygen` creates one)")?;
    if !signer.scripts().contains(&config.change) {
        let address = bitcoin::Address::from_script(&config.change, config.network)
            .map_or_else(|_| config.change.to_hex_string(), |a| a.to_string());
        anyhow::bail!(
            "change_address {address} is not paid to a key of key_file {}: change sent there \
             would be out of the wallet's reach; give an address of those keys",
            config.key_file.display()
        );
    }
    let store = Arc::new(SagaStore::open(&config.db)?);
    let daemon = Arc::new(bitcoind::Daemon::new(
        &config.bitcoind_rpc_url,
        config.bitcoind_auth.clone(),
        false,
        std::time::Duration::from_secs(30),
    ));
    // Unreachable at start means misconfigured: one line with what to check, not an
    // endless retry. (Once running, outages are retried for as long as they last.)
    match daemon.wait_ready(config.network, config.startup_wait) {
        Ok(_) => {}
        Err(e @ bitcoind::DaemonError::WrongNetwork { .. }) => return Err(e.into()),
        Err(e) => anyhow::bail!(
            "{e} (after {}s: check bitcoind_rpc_url and bitcoind_cookie_file or \
             bitcoind_rpc_user, and that bitcoind runs with server=1; startup_wait_secs waits \
             longer)",
            config.startup_wait.as_secs()
        ),
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let channel = upstream::channel(&config.indexer, config.indexer_ca_file.as_deref())?;
        let indexer = upstream::client(channel, config.indexer_token_file.as_deref())?;
        wait_for_indexer(indexer.clone(), &config.indexer, config.startup_wait).await?;
        let mut executor = Executor::new(
            store.clone(),
            indexer,
            daemon,
            Arc::new(signer),
            config.network,
            config.change.clone(),
            config.policy.clone(),
        );
        if let Ok(at) = std::env::var("ORCHESTRATOR_CRASH_AT") {
            executor = executor.with_boundaries(Arc::new(CrashAt(at)));
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let local = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_exec = stop_rx.clone();
        let running = Arc::new(AtomicBool::new(true));
        let executing = tokio::spawn({
            // Cleared when the executor ends, however it ends (a panic included), so
            // /health stops saying it runs.
            let alive = Alive(running.clone());
            async move {
                executor
                    .run(async move {
                        let _ = stop_exec.wait_for(|s| *s).await;
                    })
                    .await;
                drop(alive);
            }
        });
        let latency = GrpcLatency::default();
        if let Some(addr) = config.metrics_listen {
            let probe = OrchestratorProbe::new(store.clone(), &latency, running);
            let local = service::metrics_http::start(addr, Arc::new(probe))
                .with_context(|| format!("serving metrics on {addr}"))?;
            println!("metrics\t{local}");
        }
        tracing::info!(%local, unfinished = store.unfinished()?.len(), "serving orchestrator.v1.Withdrawals");
        println!("listening\t{local}");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut stop_serve = stop_rx;
        let shutdown = async move {
            let _ = stop_serve.wait_for(|s| *s).await;
        };
        let signals = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        };
        tokio::spawn(signals);
        tonic::transport::Server::builder()
            .layer(latency.layer())
            .add_service(WithdrawalService::new(store.clone(), config.network).into_server(token))
            .serve_with_incoming_shutdown(
                service::listener::no_delay(listener),
                shutdown,
            )
            .await?;
        let _ = executing.await;
        anyhow::Ok(())
    })
}

/// Waits at start until the indexer answers GetTip; one that never does is misconfigured.
async fn wait_for_indexer(
    mut client: upstream::Indexer,
    url: &str,
    wait: std::time::Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = match client.get_tip(proto::indexer::v1::GetTipRequest {}).await {
            Ok(_) => return Ok(()),
            // An index with no block yet answered too: it is there.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => return Ok(()),
            Err(s) => s,
        };
        let waiting = status.code() == tonic::Code::Unavailable;
        if !waiting || tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "indexer at {url}: {} (after {}s: check indexer, and that `indexer run` serves \
                 gRPC there; startup_wait_secs waits longer)",
                status.message(),
                wait.as_secs()
            );
        }
        tracing::warn!(%url, error = status.message(), "the indexer is not answering yet; will keep trying");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The crash tests' fault injection: dies at the named step boundary, as kill -9 would.
struct CrashAt(String);

impl orchestrator::executor::Boundaries for CrashAt {
    fn reached(&self, at: orchestrator::executor::Boundary, _: &orchestrator::saga::Withdrawal) {
        if at.name() == self.0 {
            eprintln!("ORCHESTRATOR_CRASH_AT={}: dying here", self.0);
            std::process::abort();
        }
    }
}

/// Clears its flag when dropped.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
