//! The commands that index: `watch add` and `rescan` (from block files or bitcoind).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use indexer::app::{follower, pipeline_options};
use indexer::config::Config;
use indexer::rescan::{self, RescanRequest};
use indexer::store::{Profile, Reader, Store};
use indexer::wallets;

use crate::cli::RescanArgs;
use crate::progress::{print_outcome, Reporter};

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
    let added = wallets::add_lines(store, &target, lines, filter, &|so_far| {
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

/// `rescan`: from block files with `--blocks-dir`, else from bitcoind.
pub fn rescan_cmd(store: Store, config: &Config, args: RescanArgs) -> Result<()> {
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
    let failed = "rescan failed; every block before the failure is committed and a rerun resumes";
    let prepared = rescan::prepare(&store, config.network, &req).context(failed)?;
    reporter.plan(&prepared.plan);
    // Connecting runs alone in this process: the database is opened again for indexing
    // (its disconnects, above, read what they undo and were done for serving).
    drop(store);
    let store = Store::open_as(&config.db, config.network, Profile::Indexing)
        .with_context(|| format!("opening database {} again to index", config.db.display()))?;
    let report = prepared
        .index(&store, &scripts, &pipeline_options(config), &|p| {
            reporter.commit(p)
        })
        .context(failed)?;
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
            disconnected =
                indexer::pipeline::disconnect::disconnect_above(&store, from.checked_sub(1), true)?;
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

/// `watch add`: descriptors from the command line and `file` under `wallet`.
pub fn watch_add(
    store: &Store,
    config: &Config,
    wallet: &str,
    birth_height: Option<u32>,
    file: Option<&Path>,
    descriptors: Vec<String>,
) -> Result<()> {
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
        store,
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
            let lines = std::io::BufRead::lines(std::io::BufReader::with_capacity(1 << 20, reader));
            add_watched(
                store,
                config,
                wallet,
                given.chain(lines),
                birth_height,
                &filter,
            )?
        }
        None => add_watched(store, config, wallet, given, birth_height, &filter)?,
    };
    if !filter.outgrown() {
        wallets::save_filter(store, &filter)?;
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
    Ok(())
}

/// `kafka export`: re-publishes a range of the event log.
pub fn kafka_export(
    store: &Store,
    config: &Config,
    from: u64,
    to: Option<u64>,
    topic: Option<String>,
) -> Result<()> {
    let Some(kafka) = &config.kafka else {
        anyhow::bail!("no Kafka to export to: set kafka.brokers (or --kafka-brokers)");
    };
    let topic = topic.unwrap_or_else(|| kafka.topic.clone());
    let produced = indexer::kafka::replay(store, config.network, kafka, &topic, from, to)
        .with_context(|| format!("exporting the event log to {topic}"))?;
    println!("exported\t{produced}\t{topic}");
    Ok(())
}
