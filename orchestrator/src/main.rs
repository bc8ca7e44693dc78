//! `orchestrator run --config FILE`: the withdrawal service. Serves
//! `orchestrator.v1.Withdrawals` (every call needs the bearer token) and runs every
//! unfinished saga against the indexer, bitcoind and the key-file signer, resuming them
//! after any restart. Prints `listening<TAB>ADDR` once it accepts calls (after
//! `metrics<TAB>ADDR` when `metrics_listen` is set); SIGTERM or Ctrl-C stop it after the
//! step in hand.

use anyhow::{Context, Result};
use clap::Parser;
use orchestrator::app::{self, Hooks};
use orchestrator::cli::{Cli, Command};
use service::logs;

fn main() {
    let command = Cli::parse().command;
    let format = match &command {
        Command::Run(args) => args.log_format,
        Command::Keygen { .. } => logs::LogFormat::Text,
    };
    logs::init(format, "ORCHESTRATOR_LOG");
    let outcome = match command {
        Command::Run(args) => args
            .config()
            .map_err(anyhow::Error::from)
            .and_then(|config| Ok(app::run(config, Hooks::default(), app::terminated())?)),
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
