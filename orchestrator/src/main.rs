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
use indexer::logs::{self, LogFormat};
use indexer::metrics::GrpcLatency;
use orchestrator::config::FileConfig;
use orchestrator::executor::Executor;
use orchestrator::grpc::WithdrawalService;
use orchestrator::metrics::OrchestratorProbe;
use orchestrator::signer::KeyFileSigner;
use orchestrator::store::SagaStore;

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
    Run(RunArgs),
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
    /// The indexer's gRPC endpoint (default http://127.0.0.1:50051).
    #[arg(long, env = "ORCHESTRATOR_INDEXER")]
    indexer: Option<String>,
    /// bitcoind's JSON-RPC URL.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_URL")]
    bitcoind_rpc_url: Option<String>,
    /// bitcoind's cookie file.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_COOKIE_FILE")]
    bitcoind_cookie_file: Option<PathBuf>,
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
    /// Serve Prometheus metrics, /health and /ready over HTTP here.
    #[arg(long, env = "ORCHESTRATOR_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or json.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

fn main() {
    let Command::Run(args) = Cli::parse().command;
    let format = args.log_format;
    logs::init(format, "ORCHESTRATOR_LOG");
    if let Err(e) = run(args) {
        logs::fatal(format, &e);
        std::process::exit(1);
    }
}

fn run(args: RunArgs) -> Result<()> {
    let flags = FileConfig {
        network: args.network,
        listen: args.listen,
        indexer: args.indexer,
        bitcoind_rpc_url: args.bitcoind_rpc_url,
        bitcoind_cookie_file: args.bitcoind_cookie_file,
        db: args.db,
        key_file: args.key_file,
        token_file: args.token_file,
        change_address: args.change_address,
        confirmations: args.confirmations,
        settle_confirmations: args.settle_confirmations,
        bump_after_blocks: args.bump_after_blocks,
        fee_floor: None,
        fee_ceiling: None,
        metrics_listen: args.metrics_listen,
    };
    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let config = flags.or(file).resolve()?;
    let token = indexer::auth::BearerToken::from_file(&config.token_file)?;
    let signer = KeyFileSigner::open(&config.key_file, config.network)?;
    let store = Arc::new(
        SagaStore::open(&config.db)
            .with_context(|| format!("opening the saga database {}", config.db.display()))?,
    );
    let daemon = Arc::new(indexer::daemon::Daemon::new(
        &config.bitcoind_rpc_url,
        indexer::daemon::Auth::Cookie(config.bitcoind_cookie_file.clone()),
        false,
        std::time::Duration::from_secs(30),
    ));
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(config.indexer.clone())
            .with_context(|| format!("indexer endpoint {:?}", config.indexer))?
            .connect_lazy();
        let executor = Executor::new(
            store.clone(),
            proto::indexer::v1::indexer_client::IndexerClient::new(channel),
            daemon,
            Arc::new(signer),
            config.network,
            config.change.clone(),
            config.policy.clone(),
        );
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let local = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_exec = stop_rx.clone();
        let running = Arc::new(AtomicBool::new(true));
        let executing = tokio::spawn({
            let running = running.clone();
            async move {
                executor
                    .run(async move {
                        let _ = stop_exec.wait_for(|s| *s).await;
                    })
                    .await;
                running.store(false, Ordering::Relaxed);
            }
        });
        let latency = GrpcLatency::default();
        if let Some(addr) = config.metrics_listen {
            let probe = OrchestratorProbe::new(store.clone(), &latency, running);
            let local = indexer::metrics::http::start(addr, Arc::new(probe))
                .await
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
                indexer::grpc::no_delay(listener),
                shutdown,
            )
            .await?;
        let _ = executing.await;
        anyhow::Ok(())
    })
}
