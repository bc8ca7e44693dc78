//! Benchmarks, run as examples so they build with the workspace's one cargo selection
//! (`bash scripts/bench.sh NAME [ARGS]`); each prints the ratios `BENCHMARKS.md` records:
//!
//! - `gen_chain`: writes a mainnet-like chain as bitcoind blk files, plus the descriptors
//!   of 100k watched scripts, under `fixtures/generated/` (kept out of git); with
//!   `--mainnet-gb`, a chain shaped like mainnet's eras.
//! - `rescan_bench`: SHA-256 on one and two cores, parse + filter on real large blocks,
//!   and the end-to-end rescan of the generated chain with its peak RSS, in one run.
//! - `sha_streams_bench`: double SHA-256 of transactions and merkle nodes one message at a
//!   time (as the indexer hashes) against multi-message kernels, on this CPU.
//! - `mainnet_run_bench`: `watch add` then `rescan --blocks-dir` of a mainnet-shaped chain
//!   as child processes, their resident memory sampled.
//! - `watch_scale_bench`: watched sets of 100k to 10M scripts, side by side.
//! - `reorg_bench`: undoing the last d blocks against connecting one.
//! - `follow_bench`: following the devnet, tip latency against the parse time of a block.
//! - `subscribe_bench`: a rescan with and without 100 live event subscribers.
//! - `query_bench`: gRPC queries under 64 clients against a health check.
//! - `withdraw_bench`: withdrawals end to end against synced RocksDB writes.
//! - `batch_fee_bench`: the block space and fee of a payout, batched and one by one.
//! - `kafka_export_bench`: the Kafka exporter against the log's writer, and commit ->
//!   consumer latency at the tip, on the broker the tests use.

pub mod mix;
pub mod payouts;
pub mod rss;

use std::path::Path;

use anyhow::{Context, Result};
use bitcoin::Network;
use indexer::pipeline::{PipelineOptions, Progress};
use indexer::rescan::{rescan_blocks_dir, RescanRequest};
use indexer::script_filter::ScriptFilter;
use indexer::store::{Profile, Store};
use indexer::wallets;

/// A fresh database in a temp dir watching `chain`'s `watched.txt` as wallet `bench`, and
/// the bloom filter over it: what the benchmarks that serve while indexing index into.
pub fn bench_store(chain: &Path) -> Result<(tempfile::TempDir, Store, ScriptFilter)> {
    bench_store_as(chain, Profile::Serving)
}

/// [`bench_store`] opened as `profile` (`Indexing`: as `indexer rescan --blocks-dir` opens it).
pub fn bench_store_as(
    chain: &Path,
    profile: Profile,
) -> Result<(tempfile::TempDir, Store, ScriptFilter)> {
    let db = tempfile::tempdir()?;
    let store = Store::open_as(db.path(), Network::Regtest, profile)?;
    let descriptors: Vec<String> = std::fs::read_to_string(chain.join("watched.txt"))
        .context("watched.txt: run gen_chain first")?
        .lines()
        .map(String::from)
        .collect();
    wallets::add(&store, Network::Regtest, "bench", &descriptors, None, 1)?;
    let scripts = wallets::load_filter(&store, 1_000_000, 1e-3)?;
    Ok((db, store, scripts))
}

/// The blocks of a blk-framed file (magic, length, block; repeated).
pub fn read_framed(path: &Path) -> Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut p = 0;
    while p + 8 <= data.len() {
        let len = u32::from_le_bytes(data[p + 4..p + 8].try_into()?) as usize;
        out.push(data[p + 8..p + 8 + len].to_vec());
        p += 8 + len;
    }
    Ok(out)
}

/// True when a test runner (cargo test, nextest) is listing or running this program as a
/// test binary: the benchmarks then do nothing.
pub fn invoked_as_test() -> bool {
    std::env::args()
        .skip(1)
        .any(|a| a == "--list" || a == "--test" || a == "--exact" || a == "--nocapture")
        || std::env::args().len() == 1 && std::env::var_os("NEXTEST").is_some()
}

/// Rescans (or resumes) the whole chain of the blk files in `dir` into `store` with the
/// default pipeline, calling `on_commit` after each commit, with this process's serving
/// threads yielding as in `indexer run`'s catch-up: what was committed and the seconds it
/// took.
pub fn rescan(
    store: &Store,
    scripts: &ScriptFilter,
    dir: &Path,
    on_commit: &(dyn Fn(&Progress) + Sync),
) -> Result<(Progress, f64)> {
    let req = RescanRequest {
        blocks_dir: dir.to_owned(),
        from: None,
        to: None,
    };
    // Flat out, as `indexer run`'s catch-up is: serving threads in this process yield.
    let _flat_out = indexer::serve_priority::FlatOut::begin();
    let started = std::time::Instant::now();
    let report = rescan_blocks_dir(
        store,
        Network::Regtest,
        scripts,
        &req,
        &PipelineOptions::default(),
        &|_| {},
        on_commit,
    )?;
    Ok((report.progress, started.elapsed().as_secs_f64()))
}
