//! Rescan throughput against this machine's SHA-256 limit, all in one run.
//!
//! `rescan_bench [--chain DIR] [--large DIR]`: the chain from `gen_chain` (default
//! fixtures/generated/chain) and the real large blocks (default
//! ../shared/fixtures/large-blocks). Prints a markdown table for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Result;
use benches::mix::{script, WATCHED};
use benches::rss::rss;
use bitcoin::block;
use bitcoin::consensus::deserialize;
use bitcoin::hashes::{sha256, Hash};
use clap::Parser;
use indexer::pipeline::parse::{parse_block, RawBlock};
use indexer::pipeline::Progress;
use indexer::script_filter::ScriptFilter;
use indexer::store::Profile;
use rayon::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Generated chain (from gen_chain).
    #[arg(long, default_value = "fixtures/generated/chain")]
    chain: PathBuf,
    /// Real large blocks.
    #[arg(long, default_value = "../shared/fixtures/large-blocks")]
    large: PathBuf,
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// SHA-256 throughput over 1 MiB messages with `threads` threads, MB/s.
fn sha256_limit(threads: usize) -> f64 {
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let rounds = 4;
    let started = Instant::now();
    pool.install(|| {
        for _ in 0..rounds {
            let acc: u8 = data
                .par_chunks(1 << 20)
                .map(|c| sha256::Hash::hash(c).to_byte_array()[0])
                .reduce(|| 0, |a, b| a ^ b);
            std::hint::black_box(acc);
        }
    });
    mb_s(data.len() as u64 * rounds, started.elapsed().as_secs_f64())
}

fn watched_filter() -> ScriptFilter {
    let f = ScriptFilter::new(1_000_000, 1e-3);
    for i in 0..WATCHED {
        f.insert(script(i).as_bytes());
    }
    f
}

/// Parse + bloom filter over the real large blocks, in parallel across blocks: MB/s.
fn parse_filter(large: &Path, filter: &ScriptFilter) -> Result<(f64, u64)> {
    let mut blocks = benches::read_framed(&large.join("mainnet_large_blocks.blk"))?;
    blocks.extend(benches::read_framed(
        &large.join("testnet3_large_blocks.blk"),
    )?);
    let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
    let rounds = 5;
    let started = Instant::now();
    let mut hits = 0u64;
    for _ in 0..rounds {
        hits += blocks
            .par_iter()
            .map(|b| {
                let header: block::Header = deserialize(&b[..80]).expect("header");
                let raw = RawBlock {
                    height: 0,
                    hash: header.block_hash(),
                    bytes: b.clone(),
                    origin: "large".into(),
                };
                let parsed = parse_block(raw, filter).expect("real block parses");
                parsed
                    .txs
                    .iter()
                    .map(|t| t.outputs.len() as u64)
                    .sum::<u64>()
            })
            .sum::<u64>();
    }
    Ok((mb_s(bytes * rounds, started.elapsed().as_secs_f64()), hits))
}

/// rust-bitcoin's allocating decode plus txids over the same blocks, for comparison: MB/s.
fn rust_bitcoin_decode(large: &Path) -> Result<f64> {
    let mut blocks = benches::read_framed(&large.join("mainnet_large_blocks.blk"))?;
    blocks.extend(benches::read_framed(
        &large.join("testnet3_large_blocks.blk"),
    )?);
    let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
    let rounds = 5;
    let started = Instant::now();
    for _ in 0..rounds {
        let n: usize = blocks
            .par_iter()
            .map(|b| {
                let block: bitcoin::Block = deserialize(b).expect("real block decodes");
                block
                    .txdata
                    .iter()
                    .map(|t| t.compute_txid().to_byte_array()[0] as usize)
                    .sum::<usize>()
            })
            .sum();
        std::hint::black_box(n);
    }
    Ok(mb_s(bytes * rounds, started.elapsed().as_secs_f64()))
}

/// Bytes SHA-256 compresses to check `chain` as the parser does (64 per compressed block):
/// each transaction's txid, the wtxid of each one with witness data, both merkle trees
/// (three blocks a node) and the witness commitment. Returns (chain bytes, hashed bytes).
fn hash_work(chain: &Path) -> Result<(u64, u64)> {
    let sha256d = |len: usize| (len + 9).div_ceil(64) as u64 + 1;
    let tree = |mut n: u64| {
        let mut nodes = 0;
        while n > 1 {
            n = n.div_ceil(2);
            nodes += n;
        }
        nodes * 3
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(chain)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|x| x == "dat"));
    let mut total = (0u64, 0u64);
    for file in files {
        let (bytes, blocks) = benches::read_framed(&file)?
            .par_iter()
            .map(|raw| {
                let block: bitcoin::Block = deserialize(raw).expect("generated block decodes");
                let n = block.txdata.len() as u64;
                let witness = block
                    .txdata
                    .iter()
                    .any(|t| t.input.iter().any(|i| !i.witness.is_empty()));
                let mut blocks = 3 + tree(n); // header, txid tree
                for (i, tx) in block.txdata.iter().enumerate() {
                    blocks += sha256d(tx.base_size());
                    // The coinbase's wtxid counts as zero: never hashed.
                    if witness && i > 0 && tx.input.iter().any(|input| !input.witness.is_empty()) {
                        blocks += sha256d(tx.total_size());
                    }
                }
                if witness {
                    blocks += tree(n) + 3; // wtxid tree, commitment
                }
                (raw.len() as u64, blocks)
            })
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        total = (total.0 + bytes, total.1 + blocks * 64);
    }
    Ok(total)
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let sha1 = sha256_limit(1);
    let sha2 = sha256_limit(2);
    let filter = watched_filter();
    let (pf, _) = parse_filter(&args.large, &filter)?;
    let rb = rust_bitcoin_decode(&args.large)?;

    // Opened as `indexer rescan --blocks-dir` opens it.
    let (_db, store, scripts) = benches::bench_store_as(&args.chain, Profile::Indexing)?;
    let samples: Mutex<Vec<(u32, u64)>> = Mutex::new(Vec::new());
    let (p, secs) = benches::rescan(&store, &scripts, &args.chain, &|p: &Progress| {
        samples
            .lock()
            .expect("not poisoned")
            .push((p.height, rss().0))
    })?;
    let (_, peak) = rss();
    let rescan = mb_s(p.bytes, secs);
    let watched_utxos = store.utxos()?.len();
    let digest = store.digest()?;
    // Closed first: its compactions must not run during the next rescan.
    drop(store);
    // The same rescan as a serving process indexes (`indexer run`'s catch-up): the same
    // state must come out.
    let (_db_serving, serving, serving_scripts) =
        benches::bench_store_as(&args.chain, Profile::Serving)?;
    let (ps, secs_serving) = benches::rescan(&serving, &serving_scripts, &args.chain, &|_| {})?;
    anyhow::ensure!(
        serving.digest()? == digest,
        "the two profiles indexed different states"
    );
    let rescan_serving = mb_s(ps.bytes, secs_serving);
    let (chain_bytes, hashed) = hash_work(&args.chain)?;
    let amplification = hashed as f64 / chain_bytes as f64;
    // The fastest a rescan could go if it did nothing but the hashing its checks need.
    let ceiling = sha2 / amplification;
    let samples = samples.into_inner().expect("not poisoned");
    let quartiles: Vec<String> = [1, 2, 3, 4]
        .iter()
        .map(|q| {
            let i = (samples.len() * q / 4).saturating_sub(1);
            let (h, r) = samples[i];
            format!("{} MiB at height {h}", r >> 20)
        })
        .collect();

    println!("| measure | value |");
    println!("|---|---|");
    println!("| SHA-256, 1 core (1 MiB messages) | {sha1:.0} MB/s |");
    println!("| SHA-256, 2 cores | {sha2:.0} MB/s |");
    println!("| parse + bloom filter, real large blocks, 2 cores | {pf:.0} MB/s ({:.2} of the 2-core SHA-256 limit) |", pf / sha2);
    println!("| rust-bitcoin decode + txids, same blocks, 2 cores | {rb:.0} MB/s (parse + filter is {:.1}x) |", pf / rb);
    println!("| rescan end to end, {} blocks, {} txs, {:.2} GB, {} watched scripts | {rescan:.0} MB/s, {:.0} blocks/s, {:.0} tx/s ({secs:.1} s) |",
        p.blocks, p.txs, p.bytes as f64 / 1e9, WATCHED, p.blocks as f64 / secs, p.txs as f64 / secs);
    println!("| the same rescan in the serving profile (`indexer run`'s catch-up), same state | {rescan_serving:.0} MB/s ({secs_serving:.1} s): rescan / serving {:.2} |", rescan / rescan_serving);
    println!(
        "| rescan / SHA-256 limit (2 cores) | {:.2} |",
        rescan / sha2
    );
    println!("| rescan / SHA-256 (1 core) | {:.2} |", rescan / sha1);
    println!("| SHA-256 work of the checks | {amplification:.2} bytes compressed a byte of chain: a hash-bound rescan would run at {ceiling:.0} MB/s ({:.2} of the 2-core limit) |", ceiling / sha2);
    println!(
        "| rescan / that hash-bound ceiling | {:.2} |",
        rescan / ceiling
    );
    println!("| watched UTXOs at the end | {watched_utxos} |");
    println!(
        "| RSS at 25/50/75/100% of the rescan | {} |",
        quartiles.join(", ")
    );
    println!("| peak RSS | {} MiB |", peak >> 20);
    Ok(())
}
