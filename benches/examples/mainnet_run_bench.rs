//! A rescan of a mainnet-shaped chain (`gen_chain --mainnet-gb`) from its blk files, as an
//! operator runs it: `indexer watch add` of the chain's watched scripts, then `indexer
//! rescan --blocks-dir` as a child process, its resident memory sampled every second and its
//! progress read from its log. With `--cold` the page cache is dropped first (root only),
//! so the blocks come from disk. Prints MB/s and an RSS curve (time, height, RSS).
//!
//! `mainnet_run_bench [--chain fixtures/generated/mainnet-20g] [--cold]`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The chain, with its `watched.txt`.
    #[arg(long, default_value = "fixtures/generated/mainnet-20g")]
    chain: PathBuf,
    /// Drop the page cache before the rescan (needs root).
    #[arg(long)]
    cold: bool,
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
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
    let bytes: u64 = std::fs::read_dir(&args.chain)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("blk"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let work = tempfile::tempdir_in("fixtures/generated").or_else(|_| tempfile::tempdir())?;
    let db = work.path().join("db");
    let base = |c: &mut Command| {
        c.arg("--db").arg(&db).args(["--network", "regtest"]);
    };
    let mut add = Command::new(&indexer);
    base(&mut add);
    let added = add
        .args(["watch", "add", "--wallet", "deposits", "--file"])
        .arg(args.chain.join("watched.txt"))
        .output()?;
    if !added.status.success() {
        bail!("watch add: {}", String::from_utf8_lossy(&added.stderr));
    }
    if args.cold {
        std::fs::write("/proc/sys/vm/drop_caches", "3\n")
            .context("dropping the page cache (needs root)")?;
    }
    let mut rescan = Command::new(&indexer);
    base(&mut rescan);
    let started = Instant::now();
    let mut child = rescan
        .args(["rescan", "--blocks-dir"])
        .arg(&args.chain)
        .env("INDEXER_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let height = Arc::new(Mutex::new(0u64));
    let stderr = child.stderr.take().context("stderr")?;
    let reader = {
        let height = height.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(h) = line
                    .split("height ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|h| h.parse().ok())
                {
                    *height.lock().expect("height lock") = h;
                }
            }
        })
    };
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        if let Some(rss) = status_kb(pid, "VmRSS:") {
            peak = peak.max(status_kb(pid, "VmHWM:").unwrap_or(rss));
            let h = *height.lock().expect("height lock");
            samples.push((started.elapsed().as_secs_f64(), h, rss >> 10));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let secs = started.elapsed().as_secs_f64();
    let status = child.wait()?;
    reader.join().ok();
    if !status.success() {
        bail!("rescan failed: {status:?}");
    }
    println!(
        "{} MB of blocks, {}: {secs:.1} s, {:.0} MB/s, peak RSS {} MiB\n",
        bytes / 1_000_000,
        if args.cold {
            "cold page cache"
        } else {
            "warm page cache"
        },
        bytes as f64 / secs / 1e6,
        peak >> 10
    );
    println!("| elapsed | height reached | RSS |\n|---|---|---|");
    let step = (samples.len() / 10).max(1);
    for (t, h, rss) in samples.iter().step_by(step) {
        println!("| {t:.0} s | {h} | {rss} MiB |");
    }
    if let Some((t, h, rss)) = samples.last() {
        println!("| {t:.0} s | {h} | {rss} MiB |");
    }
    Ok(())
}
