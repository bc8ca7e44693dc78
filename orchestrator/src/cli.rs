//! The command line, for `orchestrator` and for builds of it made by tests: flags laid
//! over the config file, and `ORCHESTRATOR_*` variables.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use service::logs::LogFormat;

use crate::config::{Config, ConfigError, Settings};

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

/// `orchestrator run`: the config file, the settings as flags, the log format.
#[derive(clap::Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, env = "ORCHESTRATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Every setting of the config file, as a flag or variable.
    #[command(flatten)]
    pub settings: Settings,
    /// Log lines as text or json.
    #[arg(long, env = "ORCHESTRATOR_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The settings: flags over variables over the config file over defaults.
    pub fn config(&self) -> Result<Config, ConfigError> {
        Settings::load(self.config.as_deref(), &self.settings)
    }
}
