//! How fast do withdrawals go through, end to end, against the raw rate of synced RocksDB
//! writes on the same machine (each saga step is one synced batch)? Runs the devnet, the
//! indexer following it and serving gRPC, and the orchestrator's executor, in one process.
//!
//! `withdraw_bench [--withdrawals N]`

use std::time::{Duration, Instant};

use anyhow::Result;
use bitcoin::Amount;
use clap::Parser;
use orchestrator::executor::Policy;
use orchestrator::saga::{FeeRate, Request, State};
use proto::indexer::v1::indexer_client::IndexerClient;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Withdrawals submitted at once.
    #[arg(long, default_value_t = 200)]
    withdrawals: usize,
}

/// Synced single-key batches a second into a fresh RocksDB (the saga store's write path).
fn synced_writes_per_sec(n: usize) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = rocksdb::DB::open(&opts, dir.path())?;
    let mut write = rocksdb::WriteOptions::default();
    write.set_sync(true);
    let started = Instant::now();
    for i in 0..n as u64 {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(i.to_be_bytes(), [7u8; 600]);
        db.write_opt(batch, &write)?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    if benches::invoked_as_test() {
        return Ok(());
    }
    let args = Args::parse();
    let n = args.withdrawals;
    let rig = benches::payouts::PayoutRig::start(
        n + 10,
        0.01,
        31,
        Policy {
            confirmations: 1,
            settle_at: 1,
            ..Policy::default()
        },
    )?;
    let (node, miner, store, served) = (&rig.node, &rig.miner, &rig.store, &rig.served);

    let destination = node.new_address("bech32");
    let started = Instant::now();
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            let request = Request {
                request_id: format!("bench-{i}"),
                wallet: "hot".into(),
                destination: destination.clone(),
                amount: Amount::from_sat(100_000 + i as u64),
                fee_rate: FeeRate::SatPerVb(2.0),
                max_fee: Amount::from_sat(20_000),
            };
            store.submit(request, 0).map(|s| s.withdrawal.id)
        })
        .collect::<Result<_, _>>()?;
    let submitted = started.elapsed();
    let all = |state: State| -> Result<bool> {
        Ok(ids
            .iter()
            .map(|id| store.get(*id))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .all(|w| w.is_some_and(|w| w.state == state)))
    };
    while !all(State::Broadcast)? {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let broadcast = started.elapsed();
    node.mine_to(1, miner);
    let mined = started.elapsed();
    while !all(State::Completed)? {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let completed = started.elapsed();
    // One GetTransfer from a client that waits for each answer (operators' scripts do), timed
    // alone: what a sequential call costs since TCP_NODELAY.
    let some_txid = store
        .get(ids[0])?
        .and_then(|w| w.confirmed)
        .map(|t| t.to_string());
    let mut client = IndexerClient::new(served.channel.clone());
    let probe = Instant::now();
    for _ in 0..50 {
        served
            .runtime
            .block_on(client.get_transfer(proto::indexer::v1::GetTransferRequest {
                txid: some_txid.clone().unwrap_or_default(),
            }))?;
    }
    let get_transfer_ms = probe.elapsed().as_secs_f64() * 1e3 / 50.0;

    // Four synced steps (submit, reserve, sign, broadcast) to reach the network.
    let steps = 4.0;
    let rate = n as f64 / broadcast.as_secs_f64();
    let step_ms = broadcast.as_secs_f64() * 1e3 / (n as f64 * steps);
    let synced = synced_writes_per_sec(500)?;
    println!("| measure | value |");
    println!("|---|---|");
    println!("| withdrawals | {n} from one wallet, 1 confirmation |");
    println!(
        "| submitted (synced RECEIVED records) | {:.0} /s |",
        n as f64 / submitted.as_secs_f64()
    );
    println!(
        "| submit -> BROADCAST, all | {:.2} s: {rate:.0} withdrawals/s |",
        broadcast.as_secs_f64()
    );
    println!("| saga step, mean | {step_ms:.2} ms |");
    println!(
        "| one block -> all COMPLETED | {:.2} s after broadcast ({:.2} s of it mining the block) |",
        (completed - broadcast).as_secs_f64(),
        (mined - broadcast).as_secs_f64()
    );
    println!("| GetTransfer of a confirmed withdrawal, alone | {get_transfer_ms:.2} ms |");
    println!(
        "| synced RocksDB writes, same machine | {synced:.0} /s ({:.2} ms each) |",
        1e3 / synced
    );
    println!(
        "| ratio: withdrawals/s to synced writes/s | {:.3} (ideal with {steps} synced steps each: {:.3}) |",
        rate / synced,
        1.0 / steps
    );
    Ok(())
}
