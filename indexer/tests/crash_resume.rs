//! Killing a real `indexer rescan` process with SIGKILL at random moments.
//!
//! Scenario: watch scripts of mainnet blocks 0..4312 (from `../shared/fixtures`), run
//! `indexer rescan --from 0` and kill it at a random moment, again and again, until a run
//! finishes; the final `indexer status` digest equals that of an uninterrupted run.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bitcoin::consensus::deserialize;
use bitcoin::Block;
use rand::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_indexer");

fn fixture_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/mainnet-0-4312");
    assert!(
        dir.join("blk00000.dat").is_file(),
        "the shared block fixtures are missing: expected {} (a checkout with `shared/` beside it)",
        dir.display()
    );
    dir
}

/// `raw()` descriptors for the outputs of every other block.
fn descriptor_file(dir: &Path, out: &Path) {
    let data = std::fs::read(dir.join("blk00000.dat")).unwrap();
    let mut lines = String::new();
    let mut p = 0;
    let mut n = 0;
    while p + 8 <= data.len() {
        let len = u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap()) as usize;
        let block: Block = deserialize(&data[p + 8..p + 8 + len]).unwrap();
        if n % 2 == 0 {
            for tx in &block.txdata {
                for o in &tx.output {
                    lines.push_str(&format!("raw({})\n", o.script_pubkey.to_hex_string()));
                }
            }
        }
        p += 8 + len;
        n += 1;
    }
    std::fs::write(out, lines).unwrap();
}

fn indexer(db: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--db")
        .arg(db)
        .args(args)
        .env("INDEXER_LOG", "warn");
    cmd
}

fn run_ok(db: &Path, args: &[&str]) -> String {
    let out = indexer(db, args).output().expect("run indexer");
    assert!(
        out.status.success(),
        "indexer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn digest(db: &Path) -> String {
    let status = run_ok(db, &["status"]);
    status
        .lines()
        .find_map(|l| l.strip_prefix("digest\t"))
        .expect("status prints a digest")
        .to_string()
}

#[test]
fn sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run() {
    let blocks = fixture_dir();
    let tmp = tempfile::tempdir().unwrap();
    let descriptors = tmp.path().join("descriptors.txt");
    descriptor_file(&blocks, &descriptors);
    let blocks_arg = blocks.to_str().unwrap();
    let desc_arg = descriptors.to_str().unwrap();

    let clean = tmp.path().join("clean");
    run_ok(
        &clean,
        &["watch", "add", "--wallet", "w", "--file", desc_arg],
    );
    let started = std::time::Instant::now();
    run_ok(&clean, &["rescan", "--blocks-dir", blocks_arg]);
    // Kill moments are drawn from the span of a whole run, so they land in every phase.
    let span_ms = started.elapsed().as_millis().max(50) as u64;
    let expected = digest(&clean);

    let killed = tmp.path().join("killed");
    run_ok(
        &killed,
        &["watch", "add", "--wallet", "w", "--file", desc_arg],
    );
    let mut rng = rand::thread_rng();
    let mut kills = 0;
    for _ in 0..10 {
        let mut child = indexer(
            &killed,
            &["rescan", "--blocks-dir", blocks_arg, "--from", "0"],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn indexer");
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..span_ms)));
        // SIGKILL only the child we started; it may have finished already.
        let _ = child.kill();
        if !child.wait().expect("reap indexer").success() {
            kills += 1;
        }
    }
    run_ok(
        &killed,
        &["rescan", "--blocks-dir", blocks_arg, "--from", "0"],
    );
    eprintln!("killed {kills} of 10 runs before they finished");
    assert_eq!(digest(&killed), expected);
    let tip = run_ok(&killed, &["status"]);
    assert!(tip.contains("tip\t4312\t"), "{tip}");
}
