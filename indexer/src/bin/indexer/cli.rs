//! The command line: subcommands, and the settings' flags laid over the config file.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use indexer::config::{Config, Settings};
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
    /// Every setting of the config file, as a flag or variable.
    #[command(flatten)]
    pub settings: Settings,
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
    /// The event log on Kafka (the `[kafka]` settings say where).
    Kafka {
        #[command(subcommand)]
        command: KafkaCommand,
    },
}

#[derive(Subcommand)]
pub enum KafkaCommand {
    /// Re-publish a range of the event log (to reconcile a consumer, or fill a new topic).
    Export {
        /// First log offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Offset to stop before (default: the log's end).
        #[arg(long)]
        to: Option<u64>,
        /// Topic (default: kafka.topic).
        #[arg(long)]
        topic: Option<String>,
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

/// The settings: flags over `INDEXER_*` variables over the config file over defaults.
pub fn load_config(args: &CommonArgs) -> Result<Config> {
    Ok(Settings::load(args.config.as_deref(), &args.settings)?)
}
