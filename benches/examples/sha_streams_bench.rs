//! Hashing independent messages side by side against one at a time, on this CPU.
//!
//! `sha_streams_bench [--large DIR]`: the transactions of the real large blocks of
//! `../shared/fixtures/large-blocks` without their witnesses (what a txid hashes) and the
//! merkle nodes over their txids, double SHA-256'd on one thread (1) one message at a time,
//! as the indexer does (`indexer::sha256d`: SHA-NI through `sha2`), (2) by tape-sha256's
//! kernel for this CPU (many messages in the lanes of one SIMD register) and (3) its
//! SHA-NI kernel that keeps four messages in flight. Every kernel's digests are checked
//! against (1). Prints a table for BENCHMARKS.md.
//!
//! Interleaving messages pays where one message's rounds leave the SHA unit waiting on
//! their dependency chain; where the unit is busy every cycle anyway, it cannot.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Block, Transaction};
use clap::Parser;
use indexer::sha256d;
use tape_sha256::Message;

#[derive(Parser)]
struct Args {
    /// Real large blocks.
    #[arg(long, default_value = "../shared/fixtures/large-blocks")]
    large: PathBuf,
}

/// Messages handed to a multi-message kernel at once.
const BATCH: usize = 256;
/// Passes over the data per measurement.
const ROUNDS: usize = 5;

/// Double SHA-256 of each message with `first` (the kernel under test) for both rounds.
type Kernel = fn(&[Message<'_>], &mut [[u8; 32]]);

fn tape_auto(msgs: &[Message<'_>], out: &mut [[u8; 32]]) {
    tape_sha256::hash_messages(msgs, out);
}

#[cfg(target_arch = "x86_64")]
fn tape_shani_x4(msgs: &[Message<'_>], out: &mut [[u8; 32]]) {
    // SAFETY: only listed in `kernels` after the CPU was found to have SHA-NI, SSSE3 and
    // SSE4.1, which is all the kernel requires.
    #[allow(unsafe_code)]
    unsafe {
        tape_sha256::backends::shani_x4(msgs, out)
    }
}

/// The multi-message kernels this CPU runs, by name.
fn kernels() -> Vec<(String, Kernel)> {
    let mut k: Vec<(String, Kernel)> = vec![(
        format!(
            "tape-sha256 `{}` ({} messages a pass)",
            tape_sha256::backend(),
            tape_sha256::lane_width()
        ),
        tape_auto,
    )];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sha")
        && std::arch::is_x86_feature_detected!("ssse3")
        && std::arch::is_x86_feature_detected!("sse4.1")
    {
        k.push((
            "tape-sha256 SHA-NI, 4 messages in flight".into(),
            tape_shani_x4,
        ));
    }
    k
}

/// Double SHA-256 of `msgs` through `kernel`, `BATCH` at a time.
fn double_sha(kernel: Kernel, msgs: &[Message<'_>], out: &mut [[u8; 32]]) {
    let mut first = [[0u8; 32]; BATCH];
    for (m, o) in msgs.chunks(BATCH).zip(out.chunks_mut(BATCH)) {
        let first = &mut first[..m.len()];
        kernel(m, first);
        let second: Vec<Message<'_>> = first.iter().map(|d| Message::new(d)).collect();
        kernel(&second, o);
    }
}

/// Seconds per pass of `f`, the best of `ROUNDS`.
fn best(mut f: impl FnMut()) -> f64 {
    (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let mut stripped: Vec<Vec<u8>> = Vec::new();
    for file in ["mainnet_large_blocks.blk", "testnet3_large_blocks.blk"] {
        for raw in benches::read_framed(&args.large.join(file))? {
            let block: Block = deserialize(&raw)?;
            for tx in block.txdata {
                let bare = Transaction {
                    input: tx
                        .input
                        .into_iter()
                        .map(|mut i| {
                            i.witness.clear();
                            i
                        })
                        .collect(),
                    ..tx
                };
                stripped.push(serialize(&bare));
            }
        }
    }
    let bytes: usize = stripped.iter().map(Vec::len).sum();
    let txids: Vec<[u8; 32]> = stripped.iter().map(|t| sha256d::hash(t)).collect();
    let pairs: Vec<(&[u8; 32], &[u8; 32])> =
        txids.chunks_exact(2).map(|p| (&p[0], &p[1])).collect();
    let nodes: Vec<[u8; 32]> = pairs
        .iter()
        .map(|(l, r)| sha256d::merkle_node(l, r))
        .collect();

    let one_tx = best(|| {
        for t in &stripped {
            std::hint::black_box(sha256d::hash(t));
        }
    });
    let one_node = best(|| {
        for (l, r) in &pairs {
            std::hint::black_box(sha256d::merkle_node(l, r));
        }
    });
    let mb_s = |secs: f64| bytes as f64 / secs / 1e6;
    let ns = |secs: f64| secs * 1e9 / pairs.len() as f64;
    println!(
        "{} transactions, {:.1} MB without witnesses; {} merkle nodes; one thread",
        stripped.len(),
        bytes as f64 / 1e6,
        pairs.len()
    );
    println!();
    println!("| kernel | transactions | speed against one at a time | merkle nodes | speed against one at a time |");
    println!("|---|---|---|---|---|");
    println!(
        "| one message at a time (`indexer::sha256d`, SHA-NI) | {:.0} MB/s | 1.00 | {:.0} ns a node | 1.00 |",
        mb_s(one_tx),
        ns(one_node)
    );
    let tx_msgs: Vec<Message<'_>> = stripped.iter().map(|t| Message::new(t)).collect();
    let node_msgs: Vec<Message<'_>> = pairs
        .iter()
        .map(|(l, r)| Message::pair(&[], *l, *r))
        .collect();
    for (name, kernel) in kernels() {
        let mut out = vec![[0u8; 32]; tx_msgs.len()];
        double_sha(kernel, &tx_msgs, &mut out);
        ensure!(out == txids, "{name}: transactions hash differently");
        let tx = best(|| double_sha(kernel, &tx_msgs, &mut out));
        let mut out = vec![[0u8; 32]; node_msgs.len()];
        double_sha(kernel, &node_msgs, &mut out);
        ensure!(out == nodes, "{name}: merkle nodes hash differently");
        let node = best(|| double_sha(kernel, &node_msgs, &mut out));
        println!(
            "| {name} | {:.0} MB/s | {:.2} | {:.0} ns a node | {:.2} |",
            mb_s(tx),
            one_tx / tx,
            ns(node),
            one_node / node
        );
    }
    Ok(())
}
