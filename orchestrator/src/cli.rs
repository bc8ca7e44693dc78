//! The command line, for `orchestrator` and for builds of it made by tests: flags laid
//! over the config file, and `ORCHESTRATOR_*` variables.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use service::logs::LogFormat;

use crate::config::{Config, ConfigError, FileConfig};

/// The withdrawal orchestrator.
#[derive(Parser)]
#[command(name = "orchestrator", version)]
pub struct Cli {
    #[command(subcommand)]
    /// What to do.
    pub command: Command,
}

/// What to do.
#[derive(Subcommand)]
pub enum Command {
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
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// mainnet, testnet3, testnet4, signet or regtest.
    #[arg(long, env = "ORCHESTRATOR_NETWORK")]
    pub network: Option<String>,
    /// gRPC listen address (default 127.0.0.1:50061; port 0 picks one).
    #[arg(long, env = "ORCHESTRATOR_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// The indexer's gRPC endpoint (default http://127.0.0.1:50051; https: TLS).
    #[arg(long, env = "ORCHESTRATOR_INDEXER")]
    pub indexer: Option<String>,
    /// The file holding the indexer's bearer token (when its reads are protected).
    #[arg(long, env = "ORCHESTRATOR_INDEXER_TOKEN_FILE")]
    pub indexer_token_file: Option<PathBuf>,
    /// PEM CA the indexer's TLS certificate must chain to.
    #[arg(long, env = "ORCHESTRATOR_INDEXER_CA_FILE")]
    pub indexer_ca_file: Option<PathBuf>,
    /// bitcoind's JSON-RPC URL.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_URL")]
    pub bitcoind_rpc_url: Option<String>,
    /// bitcoind's cookie file.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_COOKIE_FILE")]
    pub bitcoind_cookie_file: Option<PathBuf>,
    /// bitcoind's rpcuser, instead of the cookie (password: the file below, or
    /// ORCHESTRATOR_BITCOIND_RPC_PASSWORD).
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_USER")]
    pub bitcoind_rpc_user: Option<String>,
    /// File holding bitcoind's RPC password (mode 600).
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_PASSWORD_FILE")]
    pub bitcoind_rpc_password_file: Option<PathBuf>,
    /// At start, seconds bitcoind and the indexer may stay unreachable (default 60).
    #[arg(long, env = "ORCHESTRATOR_STARTUP_WAIT_SECS")]
    pub startup_wait_secs: Option<u64>,
    /// The saga database directory.
    #[arg(long, env = "ORCHESTRATOR_DB")]
    pub db: Option<PathBuf>,
    /// The signer's key file (WIF private keys, mode 600).
    #[arg(long, env = "ORCHESTRATOR_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The file holding the bearer token.
    #[arg(long, env = "ORCHESTRATOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where change goes.
    #[arg(long, env = "ORCHESTRATOR_CHANGE_ADDRESS")]
    pub change_address: Option<String>,
    /// Confirmations that complete a withdrawal (default 3).
    #[arg(long, env = "ORCHESTRATOR_CONFIRMATIONS")]
    pub confirmations: Option<u32>,
    /// Confirmations after which its coins are released (default 6).
    #[arg(long, env = "ORCHESTRATOR_SETTLE_CONFIRMATIONS")]
    pub settle_confirmations: Option<u32>,
    /// Blocks a payment may stay unmined before it is replaced (default 3).
    #[arg(long, env = "ORCHESTRATOR_BUMP_AFTER_BLOCKS")]
    pub bump_after_blocks: Option<u32>,
    /// Lowest fee rate used, sat/vB (default 1).
    #[arg(long, env = "ORCHESTRATOR_FEE_FLOOR")]
    pub fee_floor: Option<f64>,
    /// Highest fee rate used, sat/vB (default 500).
    #[arg(long, env = "ORCHESTRATOR_FEE_CEILING")]
    pub fee_ceiling: Option<f64>,
    /// Serve Prometheus metrics, /health and /ready over HTTP here.
    #[arg(long, env = "ORCHESTRATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or json.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The settings: flags and variables first, then the config file, then defaults.
    pub fn config(self) -> Result<Config, ConfigError> {
        let flags = FileConfig {
            network: self.network,
            listen: self.listen,
            indexer: self.indexer,
            indexer_token_file: self.indexer_token_file,
            indexer_ca_file: self.indexer_ca_file,
            bitcoind_rpc_url: self.bitcoind_rpc_url,
            bitcoind_cookie_file: self.bitcoind_cookie_file,
            bitcoind_rpc_user: self.bitcoind_rpc_user,
            bitcoind_rpc_password_file: self.bitcoind_rpc_password_file,
            startup_wait_secs: self.startup_wait_secs,
            db: self.db,
            key_file: self.key_file,
            token_file: self.token_file,
            change_address: self.change_address,
            confirmations: self.confirmations,
            settle_confirmations: self.settle_confirmations,
            bump_after_blocks: self.bump_after_blocks,
            fee_floor: self.fee_floor,
            fee_ceiling: self.fee_ceiling,
            metrics_listen: self.metrics_listen,
        };
        let file = match &self.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        flags
            .or(file)
            .resolve_with(std::env::var("ORCHESTRATOR_BITCOIND_RPC_PASSWORD").ok())
    }
}
