//! What do payout queues save? The same withdrawals paid one by one and in batches, side
//! by side in one run, each on its own devnet, indexer and executor: the block space
//! (vbytes) and fee each payout costs, from the confirmed transactions themselves.
//!
//! `batch_fee_bench [--withdrawals N] [--max-batch-outputs M] [--sat-per-vb R]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use bitcoin::consensus::deserialize;
use bitcoin::{Amount, Transaction, Txid};
use clap::Parser;
use orchestrator::executor::{Batching, Policy};
use orchestrator::saga::{FeeRate, Request, State};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Withdrawals paid in each run.
    #[arg(long, default_value_t = 200)]
    withdrawals: usize,
    /// Most withdrawals a batch pays.
    #[arg(long, default_value_t = 50)]
    max_batch_outputs: usize,
    /// The fee rate every withdrawal asks for.
    #[arg(long, default_value_t = 5.0)]
    sat_per_vb: f64,
}

/// What one run's transactions took.
struct Cost {
    transactions: usize,
    vbytes: u64,
    fee: u64,
    seconds: f64,
}

/// Pays `n` withdrawals (to `n` fresh addresses of the node's, bech32 and bech32m in
/// turn) from a hot wallet of 0.05 BTC coins, with `batch` queues or one by one; waits
/// until all complete and sums the distinct confirmed transactions.
fn run(n: usize, rate: f64, batch: Option<Batching>) -> Result<Cost> {
    let policy = Policy {
        confirmations: 1,
        settle_at: 1,
        batch,
        ..Policy::default()
    };
    let rig = benches::payouts::PayoutRig::start(n + 10, 0.05, 41, policy)?;
    let (node, miner, store) = (&rig.node, &rig.miner, &rig.store);
    let started = Instant::now();
    let now = orchestrator::saga::now_ms();
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            let kind = if i % 2 == 0 { "bech32" } else { "bech32m" };
            let request = Request {
                request_id: format!("fee-{i}"),
                wallet: "hot".into(),
                destination: node.new_address(kind),
                amount: Amount::from_sat(200_000 + i as u64),
                fee_rate: FeeRate::SatPerVb(rate),
                max_fee: Amount::from_sat(50_000),
            };
            store.submit(request, now).map(|s| s.withdrawal.id)
        })
        .collect::<Result<_, _>>()?;
    // Each distinct confirmed transaction, and its fee as signed (inputs minus outputs).
    let mut confirmed: BTreeMap<Txid, (Vec<u8>, u64)> = BTreeMap::new();
    loop {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "too slow");
        let mut done = 0;
        for id in &ids {
            let w = store.get(*id)?.expect("submitted");
            anyhow::ensure!(w.state != State::Failed, "{w:?}");
            if let (State::Completed, Some(txid)) = (w.state, w.confirmed) {
                let attempt = w
                    .attempts
                    .iter()
                    .find(|a| a.txid == txid)
                    .expect("its version");
                confirmed.insert(txid, (attempt.raw.clone(), attempt.fee.to_sat()));
                done += 1;
            }
        }
        if done == n {
            break;
        }
        node.mine_to(1, miner);
        std::thread::sleep(Duration::from_millis(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut cost = Cost {
        transactions: confirmed.len(),
        vbytes: 0,
        fee: 0,
        seconds,
    };
    for (raw, fee) in confirmed.values() {
        let tx: Transaction = deserialize(raw)?;
        cost.vbytes += tx.vsize() as u64;
        cost.fee += fee;
    }
    Ok(cost)
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let n = args.withdrawals;
    let alone = run(n, args.sat_per_vb, None)?;
    let batched = run(
        n,
        args.sat_per_vb,
        Some(Batching {
            window_ms: 1_000,
            max_outputs: args.max_batch_outputs,
        }),
    )?;
    println!(
        "| measure | one by one | batched (1 s window, up to {} a batch) | batched / one by one |",
        args.max_batch_outputs
    );
    println!("|---|---|---|---|");
    println!(
        "| transactions for {n} withdrawals | {} | {} | {:.3} |",
        alone.transactions,
        batched.transactions,
        batched.transactions as f64 / alone.transactions as f64
    );
    let per = |x: u64| x as f64 / n as f64;
    println!(
        "| vbytes a payout | {:.1} | {:.1} | {:.3} |",
        per(alone.vbytes),
        per(batched.vbytes),
        batched.vbytes as f64 / alone.vbytes as f64
    );
    println!(
        "| fee a payout, sat (at {} sat/vB) | {:.1} | {:.1} | {:.3} |",
        args.sat_per_vb,
        per(alone.fee),
        per(batched.fee),
        batched.fee as f64 / alone.fee as f64
    );
    println!(
        "| submit -> all COMPLETED | {:.1} s | {:.1} s | {:.3} |",
        alone.seconds,
        batched.seconds,
        batched.seconds / alone.seconds
    );
    Ok(())
}
