//! Watched sets of exchange size, side by side in one run: for each N, `indexer watch add
//! --file` of N random P2WPKH scripts plus the chain's own real scripts, all in ONE wallet
//! (one huge deposits wallet is how exchanges work), then `indexer rescan --blocks-dir` of
//! a chain of real blocks once RocksDB has compacted the new entries; time, MB/s, the ratio to this machine's 2-core SHA-256 limit
//! measured in the same run, and each process's peak RSS.
//!
//! `watch_scale_bench [--scripts 100000,1000000,5000000,10000000] [--chain-bytes N]
//! [--real-scripts 1258]`. The chain: the 30 real large blocks of
//! `../shared/fixtures/large-blocks`, re-headered into a regtest chain and repeated to
//! `--chain-bytes` (default 1 GiB), written once under `fixtures/generated/real-repeated`.
//! The `indexer` binary of the same build (beside this program's directory) runs as a child
//! process; its peak RSS is read from `/proc` while it runs. Prints a markdown table.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::{sha256, Hash};
use bitcoin::{block, Block, CompactTarget, Network};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

#[derive(Parser)]
struct Args {
    /// Watched-set sizes (random scripts), comma-separated.
    #[arg(
        long,
        default_value = "100000,1000000,5000000,10000000",
        value_delimiter = ','
    )]
    scripts: Vec<u64>,
    /// Size of the chain of repeated real blocks.
    #[arg(long, default_value_t = 1 << 30)]
    chain_bytes: u64,
    /// Real output scripts of the chain added to the wallet (the matches).
    #[arg(long, default_value_t = 1258)]
    real_scripts: usize,
    /// The real large blocks.
    #[arg(long, default_value = "../shared/fixtures/large-blocks")]
    large: PathBuf,
    /// Where the chain is written (reused when present).
    #[arg(long, default_value = "fixtures/generated/real-repeated")]
    chain: PathBuf,
}

/// The real blocks, re-headered into one regtest chain from genesis and repeated to
/// `bytes`, as blk files of at most 128 MiB in `dir`.
fn write_chain(real: &[Block], bytes: u64, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let magic = Network::Regtest.magic().to_bytes();
    let genesis = bitcoin::blockdata::constants::genesis_block(Network::Regtest);
    let mut prev = genesis.header;
    let mut file_no = 0;
    let mut file = BufWriter::new(std::fs::File::create(dir.join("blk00000.dat"))?);
    let mut in_file = 0u64;
    let mut total = 0u64;
    let put = |bytes: &[u8], file: &mut BufWriter<std::fs::File>| -> Result<()> {
        file.write_all(&magic)?;
        file.write_all(&(bytes.len() as u32).to_le_bytes())?;
        file.write_all(bytes)?;
        Ok(())
    };
    put(&serialize(&genesis), &mut file)?;
    'outer: loop {
        for b in real {
            let mut header = block::Header {
                version: b.header.version,
                prev_blockhash: prev.block_hash(),
                merkle_root: b.header.merkle_root,
                time: prev.time + 600,
                bits: CompactTarget::from_consensus(0x207f_ffff),
                nonce: 0,
            };
            while header.validate_pow(header.target()).is_err() {
                header.nonce += 1;
            }
            let block = Block {
                header,
                txdata: b.txdata.clone(),
            };
            let raw = serialize(&block);
            if in_file + raw.len() as u64 > 128 << 20 {
                file.flush()?;
                file_no += 1;
                file = BufWriter::new(std::fs::File::create(
                    dir.join(format!("blk{file_no:05}.dat")),
                )?);
                in_file = 0;
            }
            put(&raw, &mut file)?;
            in_file += raw.len() as u64 + 8;
            total += raw.len() as u64;
            prev = header;
            if total >= bytes {
                break 'outer;
            }
        }
    }
    file.flush()?;
    std::fs::write(dir.join("bytes"), total.to_string())?;
    Ok(())
}

/// SHA-256 throughput over 1 MiB messages on 2 threads, MB/s.
fn sha256_limit() -> f64 {
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| i.wrapping_mul(2_654_435_761) as u8)
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("pool");
    let started = Instant::now();
    pool.install(|| {
        for _ in 0..4 {
            let acc: u8 = data
                .par_chunks(1 << 20)
                .map(|c| sha256::Hash::hash(c).to_byte_array()[0])
                .reduce(|| 0, |a, b| a ^ b);
            std::hint::black_box(acc);
        }
    });
    data.len() as f64 * 4.0 / started.elapsed().as_secs_f64() / 1e6
}

/// Peak RSS of `pid` so far (VmHWM), bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Runs `cmd`, returning its seconds, its stdout and its peak RSS.
fn measured(cmd: &mut Command) -> Result<(f64, String, u64)> {
    let started = Instant::now();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the indexer")?;
    let pid = child.id();
    let mut peak = 0;
    let out = std::thread::scope(|s| {
        let waiter = s.spawn(|| child.wait_with_output());
        while !waiter.is_finished() {
            peak = peak.max(peak_rss(pid).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(10));
        }
        waiter.join().expect("waiter")
    })?;
    let secs = started.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((
        secs,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        peak,
    ))
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let indexer = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("indexer"))
        .context("the build directory")?;
    if !indexer.exists() {
        bail!(
            "{} is missing: build the workspace first",
            indexer.display()
        );
    }
    let real: Vec<Block> = ["mainnet_large_blocks.blk", "testnet3_large_blocks.blk"]
        .iter()
        .map(|f| benches::read_framed(&args.large.join(f)))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .map(|b| deserialize(&b))
        .collect::<Result<_, _>>()?;
    if !args.chain.join("bytes").exists() {
        eprintln!("writing the chain to {}", args.chain.display());
        write_chain(&real, args.chain_bytes, &args.chain)?;
    }
    let chain_bytes: u64 = std::fs::read_to_string(args.chain.join("bytes"))?
        .trim()
        .parse()?;
    // The matches: the first distinct spendable output scripts of the real blocks.
    let mut seen = std::collections::HashSet::new();
    let matches: Vec<String> = real
        .iter()
        .flat_map(|b| b.txdata.iter().flat_map(|t| t.output.iter()))
        .filter(|o| !o.script_pubkey.is_op_return() && seen.insert(o.script_pubkey.clone()))
        .take(args.real_scripts)
        .map(|o| format!("raw({})", o.script_pubkey.to_hex_string()))
        .collect();
    let limit = sha256_limit();
    println!(
        "chain: {} MB of real blocks repeated; 2-core SHA-256 limit {limit:.0} MB/s\n",
        chain_bytes / 1_000_000
    );
    println!("| watched scripts | `watch add --file` | scripts/s | watch add peak RSS | compaction after it | rescan | MB/s | ratio to 2-core SHA-256 | rescan peak RSS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let work = tempfile::tempdir_in("fixtures/generated").or_else(|_| tempfile::tempdir())?;
    for &n in &args.scripts {
        let list = work.path().join(format!("watch-{n}.txt"));
        {
            let mut f = BufWriter::new(std::fs::File::create(&list)?);
            let mut rng = rand::rngs::StdRng::seed_from_u64(n);
            for _ in 0..n {
                let program: [u8; 20] = rng.gen();
                writeln!(
                    f,
                    "raw(0014{})",
                    bitcoin::hex::DisplayHex::to_lower_hex_string(&program[..])
                )?;
            }
            for m in &matches {
                writeln!(f, "{m}")?;
            }
            f.flush()?;
        }
        let db = work.path().join(format!("db-{n}"));
        let base = |c: &mut Command| {
            c.arg("--db").arg(&db).args(["--network", "regtest"]);
        };
        let mut add = Command::new(&indexer);
        base(&mut add);
        add.args(["watch", "add", "--wallet", "deposits", "--file"])
            .arg(&list);
        let (add_s, _, add_rss) = measured(&mut add)?;
        // RocksDB compacts the new entries in the background, once: the time that takes
        // is reported, and the rescan runs on the settled database (started at once, it
        // shares the two cores with the compaction).
        let settle_s = {
            let started = Instant::now();
            let store = indexer::store::Store::open(&db, Network::Regtest)?;
            while store.background_work_pending() {
                std::thread::sleep(Duration::from_millis(100));
            }
            started.elapsed().as_secs_f64()
        };
        let mut rescan = Command::new(&indexer);
        base(&mut rescan);
        rescan
            .args(["rescan", "--reset", "--blocks-dir"])
            .arg(&args.chain);
        let (rescan_s, out, rescan_rss) = measured(&mut rescan)?;
        if !out.contains("connected") {
            bail!("rescan printed no outcome: {out}");
        }
        let total = n + matches.len() as u64;
        let mbs = chain_bytes as f64 / rescan_s / 1e6;
        println!(
            "| {total} | {add_s:.1} s | {:.0}k | {} MiB | {settle_s:.1} s | {rescan_s:.2} s | {mbs:.0} | {:.2} | {} MiB |",
            total as f64 / add_s / 1e3,
            add_rss >> 20,
            mbs / limit,
            rescan_rss >> 20
        );
        std::fs::remove_dir_all(&db)?;
        std::fs::remove_file(&list)?;
    }
    Ok(())
}
