//! Reorg time: how long the index takes to undo its last d blocks through the undo
//! journal (what the follower does when bitcoind's chain switches), against the time it
//! takes to connect a block, on the generated chain.
//!
//! The index is built by a rescan of the chain; then, for each depth, the last d blocks
//! are disconnected (synced batches, as the follower commits them) and connected again by
//! a resumed rescan (which reads the block files' headers again to find the best chain).
//!
//! `reorg_bench [--chain DIR] [--depths 1,6,20,100]`

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use indexer::script_filter::ScriptFilter;
use indexer::store::{Reader, Store};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Generated chain (from gen_chain).
    #[arg(long, default_value = "fixtures/generated/chain-typical")]
    chain: PathBuf,
    /// Reorg depths, in blocks.
    #[arg(long, value_delimiter = ',', default_value = "1,6,20,100")]
    depths: Vec<u32>,
}

/// Rescans (or resumes) `chain` into `store`: (blocks connected, seconds).
fn rescan(store: &Store, scripts: &ScriptFilter, chain: &Path) -> Result<(u64, f64)> {
    let (progress, secs) = benches::rescan(store, scripts, chain, &|_| {})?;
    Ok((progress.blocks, secs))
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let (_db, store, scripts) = benches::bench_store(&args.chain)?;
    let (blocks, secs) = rescan(&store, &scripts, &args.chain)?;
    let connect_ms = secs * 1e3 / blocks as f64;
    println!(
        "connect: {blocks} blocks in {secs:.1} s, {connect_ms:.2} ms a block (rescan, pipelined)"
    );
    println!(
        "| depth | disconnect | per block | per block / connect | reconnect (resumed rescan) |"
    );
    println!("|---|---|---|---|---|");
    for depth in args.depths {
        let Some((tip, _)) = store.tip()? else {
            bail!("empty index");
        };
        let Some(keep) = tip.checked_sub(depth) else {
            bail!("a reorg of {depth} blocks is deeper than the index ({tip} blocks)");
        };
        let started = Instant::now();
        let undone = indexer::pipeline::disconnect::disconnect_above(&store, Some(keep), true)?;
        let down = started.elapsed().as_secs_f64() * 1e3;
        if undone != depth || store.tip()?.map(|(h, _)| h) != Some(keep) {
            bail!("disconnected {undone} blocks, not {depth}");
        }
        let (again, up) = rescan(&store, &scripts, &args.chain)?;
        if again != u64::from(depth) || store.tip()?.map(|(h, _)| h) != Some(tip) {
            bail!("reconnected {again} blocks, not {depth}");
        }
        println!(
            "| {depth} | {down:.1} ms | {:.2} ms | {:.2} | {:.0} ms |",
            down / f64::from(depth),
            down / f64::from(depth) / connect_ms,
            up * 1e3
        );
    }
    Ok(())
}
