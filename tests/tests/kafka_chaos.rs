//! The Kafka export through crashes: `indexer run` (a child process) follows the devnet
//! through payments and 50 reorgs while it is killed -9 at 20 random moments and the
//! broker (Tansu, memory engine: a restart is a new, empty cluster) is killed and started
//! again twice. At the end a `read_committed` consumer applying the documented dedup rule
//! gets every (log offset, wallet) of the log exactly once, in log order within each key,
//! each record equal to the event the log holds.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use indexer::config::{KafkaSettings, Settings};
use prost::Message;
use proto::indexer::v1 as pb;
use rand::{Rng, SeedableRng};
use serde_json::json;
use system_tests::harness::open_with_wallets;
use system_tests::kafka::{events_of, expected_once, hot_and_cold, Broker, Received};
use system_tests::live::{Devnet, Indexer};

const TOPIC: &str = "indexer.events";
const WAIT: Duration = Duration::from_secs(120);

/// `indexer run` on `config`, serving gRPC on `grpc`, its output appended to `log`.
fn spawn_indexer(config: &Path, grpc: &str, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(system_tests::harness::workspace_binary("indexer"))
        .arg("--config")
        .arg(config)
        .args(["run", "--grpc", grpc])
        .env("INDEXER_LOG", "warn,indexer::kafka=info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

/// Mines one block paying `to`, then replaces the last `depth` blocks with `depth + 1`
/// others (their payments go back to the mempool and are mined again).
fn pay_and_reorg(node: &Devnet, miner: &str, to: &str, depth: u32) {
    node.call("sendtoaddress", json!([to, 0.01]));
    node.mine_to(1, miner);
    let (height, _) = node.best();
    let first = node.hash_at(height + 1 - depth);
    node.call("invalidateblock", json!([first.to_string()]));
    node.mine_to(depth + 1, miner);
}

/// The records a consumer applies under the dedup rule (docs/kafka.md): per key, a record
/// whose log offset is not above the last one applied is skipped.
fn applied_by_the_dedup_rule(records: &[Received]) -> Vec<&Received> {
    let mut last: BTreeMap<(&str, Option<&str>), u64> = BTreeMap::new();
    records
        .iter()
        .filter(|r| {
            let offset: u64 = r.header("log_offset").unwrap().parse().unwrap();
            let key = (r.key.as_str(), r.header("wallet"));
            match last.get(&key) {
                Some(l) if *l >= offset => false,
                _ => {
                    last.insert(key, offset);
                    true
                }
            }
        })
        .collect()
}

#[test]
fn every_offset_reaches_a_consumer_once_through_kill_9_reorgs_and_broker_restarts() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut broker = Broker::start();
    broker.create_topic(TOPIC, 3);
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let (hot, cold) = (node.new_address("bech32"), node.new_address("bech32"));
    let wallets = hot_and_cold(&hot, &cold);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    drop(open_with_wallets(&db, bitcoin::Network::Regtest, &wallets));
    let settings = Settings {
        kafka: KafkaSettings {
            brokers: Some(broker.bootstrap()),
            topic: Some(TOPIC.into()),
            ..KafkaSettings::default()
        },
        ..Indexer::settings(&node, &db)
    };
    let config = dir.path().join("indexer.toml");
    std::fs::write(&config, toml::to_string(&settings).unwrap()).unwrap();
    let grpc = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let log = dir.path().join("indexer.log");

    // 20 runs killed -9 at a random moment each; 50 reorgs; the broker lost twice.
    let mut reorgs = 0;
    for round in 0..20 {
        let mut child = spawn_indexer(&config, &grpc, &log);
        if round == 7 || round == 14 {
            broker.restart();
            // The exporter may create it first, with the broker's default partitions.
            let _ = broker.try_create_topic(TOPIC, 3);
        }
        for _ in 0..(if round < 10 { 3 } else { 2 }) {
            let to = if rng.gen_bool(0.5) { &hot } else { &cold };
            pay_and_reorg(&node, &miner, to, rng.gen_range(1..=2));
            reorgs += 1;
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..300)));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..500)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(reorgs, 50);

    // The last run catches up and exports everything; the log is then read in one go.
    let mut child = spawn_indexer(&config, &grpc, &log);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let channel = rt.block_on(async {
        let until = Instant::now() + WAIT;
        loop {
            match tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(e) => assert!(Instant::now() < until, "indexer never served: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut client = pb::indexer_client::IndexerClient::new(channel);
    let (best, _) = node.best();
    let until = Instant::now() + WAIT;
    let (records, tip) = loop {
        let tip = rt
            .block_on(client.get_tip(pb::GetTipRequest {}))
            .unwrap()
            .into_inner();
        let records = events_of(broker.read_all(TOPIC));
        let offsets: BTreeSet<u64> = records
            .iter()
            .map(|r| r.header("log_offset").unwrap().parse().unwrap())
            .collect();
        if tip.height == best && offsets == (0..tip.next_offset).collect() {
            break (records, tip);
        }
        let missing: Vec<u64> = (0..tip.next_offset)
            .filter(|o| !offsets.contains(o))
            .collect();
        assert!(
            Instant::now() < until,
            "tip {} of {best}; the topic lacks {missing:?} of {} offsets; kafka lines of the indexer's log: {}",
            tip.height,
            tip.next_offset,
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("kafka"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut stream = rt
        .block_on(client.subscribe(pb::SubscribeRequest {
            from_offset: 0,
            log_id: tip.log_id.clone(),
        }))
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while (events.len() as u64) < tip.next_offset {
        events.push(rt.block_on(stream.message()).unwrap().unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        events
            .iter()
            .filter(|e| e.kind == pb::EventKind::TransferReorgedOut as i32)
            .count()
            > 10,
        "payments were reorged out"
    );

    let applied = applied_by_the_dedup_rule(&records);
    eprintln!(
        "{} records read, {} applied, {} repeats dropped by the dedup rule; {} events",
        records.len(),
        applied.len(),
        records.len() - applied.len(),
        events.len()
    );
    let once: BTreeSet<(u64, Option<String>)> = applied
        .iter()
        .map(|r| {
            (
                r.header("log_offset").unwrap().parse().unwrap(),
                r.header("wallet").map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(
        applied.len(),
        once.len(),
        "an (offset, wallet) applied twice"
    );
    assert_eq!(once, expected_once(&events), "every offset once per wallet");
    for r in applied {
        let offset: usize = r.header("log_offset").unwrap().parse().unwrap();
        assert_eq!(r.header("log_id"), Some(tip.log_id.as_str()));
        assert_eq!(
            pb::Event::decode(&r.value[..]).unwrap(),
            events[offset],
            "record of offset {offset}"
        );
    }
}
