//! The command line: flags, subcommands, and the flags laid over the config file.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use indexer::config::{BitcoindFileConfig, Config, FileConfig};
use service::logs::LogFormat;

#[derive(Parser)]
#[command(name = "indexer", version, about = "Block indexer for watched wallets")]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes, before or after the subcommand.
#[derive(Args)]
pub struct CommonArgs {
    /// TOML config file.
    #[arg(long, global = true, env = "INDEXER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database directory.
    #[arg(long, global = true, env = "INDEXER_DB")]
    pub db: Option<PathBuf>,
    /// mainnet, testnet3, testnet4, signet or regtest.
    #[arg(long, global = true, env = "INDEXER_NETWORK")]
    pub network: Option<String>,
    /// Least scripts the bloom filter is sized for; it takes 2x the watched count when more (default 1,000,000).
    #[arg(long, global = true, env = "INDEXER_BLOOM_CAPACITY")]
    pub bloom_capacity: Option<usize>,
    /// Bloom filter false-positive rate (default 0.001).
    #[arg(long, global = true, env = "INDEXER_BLOOM_FP_RATE")]
    pub bloom_fp_rate: Option<f64>,
    /// Blocks of undo journal to keep (default: all).
    #[arg(long, global = true, env = "INDEXER_UNDO_DEPTH")]
    pub undo_depth: Option<u32>,
    /// Scripts derived from each ranged descriptor (default 1000).
    #[arg(long, global = true, env = "INDEXER_GAP_LIMIT")]
    pub gap_limit: Option<u32>,
    /// File holding the bearer token gRPC calls must present (required off loopback).
    #[arg(long, global = true, env = "INDEXER_GRPC_TOKEN_FILE")]
    pub grpc_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with --grpc-tls-key-file).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CERT_FILE")]
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_KEY_FILE")]
    pub grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CLIENT_CA_FILE")]
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    /// Events kept in the event log; older offsets are pruned (default: all).
    #[arg(long, global = true, env = "INDEXER_EVENT_RETENTION")]
    pub event_retention: Option<u64>,
    /// bitcoind's JSON-RPC URL (default http://127.0.0.1:<rpcport>/).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_URL")]
    pub bitcoind_rpc_url: Option<String>,
    /// bitcoind's .cookie file (default ~/.bitcoin/[<network>/].cookie).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_COOKIE_FILE")]
    pub bitcoind_cookie_file: Option<PathBuf>,
    /// rpcuser, instead of the cookie (password from --bitcoind-rpc-password-file or INDEXER_BITCOIND_RPC_PASSWORD).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_USER")]
    pub bitcoind_rpc_user: Option<String>,
    /// File holding the RPC password.
    #[arg(long, global = true, env = "INDEXER_BITCOIND_RPC_PASSWORD_FILE")]
    pub bitcoind_rpc_password_file: Option<PathBuf>,
    /// Fetch blocks over REST (bitcoind rest=1).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_REST")]
    pub bitcoind_rest: Option<bool>,
    /// zmqpubrawblock endpoint, e.g. tcp://127.0.0.1:28332.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWBLOCK")]
    pub zmq_rawblock: Option<String>,
    /// zmqpubhashblock endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_HASHBLOCK")]
    pub zmq_hashblock: Option<String>,
    /// zmqpubsequence endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_SEQUENCE")]
    pub zmq_sequence: Option<String>,
    /// zmqpubrawtx endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWTX")]
    pub zmq_rawtx: Option<String>,
    /// Tip polling interval without ZMQ, milliseconds (default 1000).
    #[arg(long, global = true, env = "INDEXER_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// With ZMQ, check bitcoind's tip after this many seconds of silence (default 30).
    #[arg(long, global = true, env = "INDEXER_ZMQ_SILENCE_SECS")]
    pub zmq_silence_secs: Option<u64>,
    /// At start, seconds bitcoind may stay unreachable before `run` exits (default 60).
    #[arg(long, global = true, env = "INDEXER_BITCOIND_STARTUP_WAIT_SECS")]
    pub bitcoind_startup_wait_secs: Option<u64>,
    /// Serve Prometheus metrics, /health and /ready over HTTP here (run and serve).
    #[arg(long, global = true, env = "INDEXER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log lines as text or json.
    #[arg(
        long,
        global = true,
        env = "INDEXER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Subcommand)]
pub enum Command {
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
pub enum WatchCommand {
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
pub struct RescanArgs {
    /// Read bitcoind's blk*.dat files from this directory (no node needed).
    #[arg(long, env = "INDEXER_BLOCKS_DIR")]
    pub blocks_dir: Option<PathBuf>,
    /// First height to (re)index (default: after the indexed tip).
    #[arg(long)]
    pub from: Option<u32>,
    /// Last height (default: the best chain's tip).
    #[arg(long)]
    pub to: Option<u32>,
    /// Forget the indexed chain state first (wallets are kept) and index from scratch.
    #[arg(long)]
    pub reset: bool,
}

/// The settings: flags and `INDEXER_*` variables first, then the config file, then defaults.
pub fn load_config(args: &CommonArgs) -> Result<Config> {
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
