//! `indexer`: the command line. Parses flags and config, then hands over to the library:
//! [`indexer::app::run`] for `run` and `serve`, [`commands`] for what indexes once.

mod cli;
mod commands;
mod progress;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indexer::app::{self, Mode};
use indexer::config::Config;
use indexer::store::schema::Cf;
use indexer::store::{Reader, Store};
use indexer::wallets;
use service::logs;

use crate::cli::{Cli, Command, KafkaCommand, WatchCommand};
use crate::progress::Reporter;

// Parsing allocates and frees many small objects across the pipeline's threads: mimalloc's
// thread-local heaps take that far better than glibc's arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let config = cli::load_config(&cli.common)?;
    let creates = matches!(
        cli.command,
        Command::Rescan(_)
            | Command::Run { .. }
            | Command::Watch {
                command: WatchCommand::Add { .. }
            }
    );
    let store = open(&config, creates)?;
    match cli.command {
        Command::Watch {
            command:
                WatchCommand::Add {
                    wallet,
                    birth_height,
                    file,
                    descriptors,
                },
        } => commands::watch_add(
            &store,
            &config,
            &wallet,
            birth_height,
            file.as_deref(),
            descriptors,
        )?,
        Command::Watch {
            command: WatchCommand::List,
        } => list_wallets(&store)?,
        Command::Rescan(args) => commands::rescan_cmd(store, &config, args)?,
        Command::Serve { grpc } => serve(store, &config, grpc, Mode::Serve)?,
        Command::Run { grpc } => serve(store, &config, grpc, Mode::Run)?,
        Command::Status => status(&store, &config)?,
        Command::Kafka {
            command: KafkaCommand::Export { from, to, topic },
        } => commands::kafka_export(&store, &config, from, to, topic)?,
    }
    Ok(())
}

/// Opens the database (`creates`: one may be made here), saying what to do when it cannot.
fn open(config: &Config, creates: bool) -> Result<Store> {
    if !creates && !config.db.exists() {
        bail!(
            "no database at {}: create one with `indexer watch add` (or point --db at it)",
            config.db.display()
        );
    }
    Store::open(&config.db, config.network).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default();
        let hint = if cause.contains("LOCK") {
            " (another indexer process has it open: one process at a time)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("opening database {}{hint}", config.db.display()))
    })
}

/// `run` and `serve`: until Ctrl-C or SIGTERM (what service managers send).
fn serve(store: Store, config: &Config, addr: std::net::SocketAddr, mode: Mode) -> Result<()> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(e) => {
                    tracing::error!(error = %e, "no SIGTERM handler: stop with Ctrl-C");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    app::run(
        Arc::new(store),
        config,
        listener,
        mode,
        Arc::new(Reporter::new()),
        shutdown,
    )?;
    Ok(())
}

/// `watch list`: each wallet with its counts, balance and descriptors.
fn list_wallets(store: &Store) -> Result<()> {
    for w in wallets::list(store)? {
        println!(
            "{}\tscripts={}\tconfirmed_sat={}\timmature_sat={}\tutxos={}",
            w.name, w.scripts, w.balance.confirmed, w.balance.immature, w.balance.utxo_count
        );
        for (d, birth) in &w.descriptors {
            match birth {
                Some(b) => println!("\t{d}\tbirth_height={b}"),
                None => println!("\t{d}"),
            }
        }
    }
    Ok(())
}

/// `status`: tip, watched counts, database size and state digest.
fn status(store: &Store, config: &Config) -> Result<()> {
    match store.tip()? {
        Some((h, hash)) => println!("tip\t{h}\t{hash}"),
        None => println!("tip\tnone"),
    }
    let wallets = wallets::list(store)?;
    let scripts = store.count(Cf::Watch)?;
    println!("network\t{}", config.network.to_core_arg());
    println!("wallets\t{}", wallets.len());
    println!("scripts\t{scripts}");
    println!("utxos\t{}", store.count(Cf::Utxo)?);
    println!("db_bytes\t{}", store.size_on_disk());
    println!("digest\t{}", store.digest()?);
    Ok(())
}
