//! `indexer run` with a `[kafka]` section against a real Kafka-protocol broker (Tansu,
//! started by the test): every event of the log reaches the topic once per wallet, as
//! Subscribe serves it, in order within each key, and a restart of the indexer resumes from
//! what the topic holds without repeating anything.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use indexer::config::{KafkaSettings, Settings};
use indexer::store::{Reader, Store};
use prost::Message;
use proto::indexer::v1 as pb;
use serde_json::json;
use system_tests::kafka::{events_of, expected_once, hot_and_cold, Broker, Received};
use system_tests::live::{Devnet, Indexer};

const TOPIC: &str = "indexer.events";
const WAIT: Duration = Duration::from_secs(60);

/// The first `end` events of the log as Subscribe serves them.
fn subscribed(f: &Indexer, end: u64) -> Vec<pb::Event> {
    let mut client = pb::indexer_client::IndexerClient::new(f.channel.clone());
    let mut stream = f
        .runtime
        .block_on(client.subscribe(pb::SubscribeRequest {
            from_offset: 0,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while (events.len() as u64) < end {
        let e = f
            .runtime
            .block_on(async { tokio::time::timeout(WAIT, stream.message()).await })
            .expect("Subscribe went quiet")
            .unwrap()
            .unwrap();
        events.push(e);
    }
    events
}

/// Reads the topic until it holds every offset of the log, the log having stopped growing
/// meanwhile (mempool notices may still be logged after a block); the records, and the
/// log's end.
fn exported(broker: &Broker, store: &Store) -> (Vec<Received>, u64) {
    let until = Instant::now() + WAIT;
    loop {
        let end = store.next_event().unwrap();
        let records = events_of(broker.read_all(TOPIC));
        let offsets: BTreeSet<u64> = records
            .iter()
            .map(|r| r.header("log_offset").unwrap().parse().unwrap())
            .collect();
        if offsets == (0..end).collect() && store.next_event().unwrap() == end {
            return (records, end);
        }
        assert!(
            Instant::now() < until,
            "the topic holds {} offsets, the log {end}; broker log: {}",
            offsets.len(),
            broker.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts the records are the log, once each per wallet, keyed and ordered as designed.
fn assert_is_the_log(records: &[Received], log: &[pb::Event], log_id: &str, network: &str) {
    // Once per (offset, wallet).
    let mut seen = BTreeSet::new();
    for r in records {
        let offset: u64 = r.header("log_offset").unwrap().parse().unwrap();
        let wallet = r.header("wallet").map(str::to_owned);
        assert!(
            seen.insert((offset, wallet.clone())),
            "offset {offset} for {wallet:?} twice"
        );
        assert_eq!(r.header("log_id"), Some(log_id));
        let event = pb::Event::decode(&r.value[..]).unwrap();
        let logged = &log[offset as usize];
        assert_eq!(&event, logged, "record of offset {offset}");
        assert_eq!(r.header("kind"), Some(&*logged.kind.to_string()));
        assert_eq!(r.header("height"), Some(&*logged.height.to_string()));
        assert_eq!(r.header("block_hash"), Some(&*logged.block_hash));
        match &wallet {
            Some(w) => {
                assert_eq!(&r.key, w);
                assert!(logged.wallets.contains(w));
            }
            None => {
                assert_eq!(r.key, network);
                assert!(logged.wallets.is_empty());
            }
        }
    }
    assert_eq!(seen, expected_once(log));
    // In log order within each key: each key lives in one partition.
    let mut by_key: BTreeMap<&str, Vec<(i32, i64, u64)>> = BTreeMap::new();
    for r in records {
        let offset = r.header("log_offset").unwrap().parse().unwrap();
        by_key
            .entry(&r.key)
            .or_default()
            .push((r.partition, r.offset, offset));
    }
    for (key, mut rs) in by_key {
        rs.sort();
        assert!(
            rs.windows(2).all(|w| w[0].0 == w[1].0 && w[0].2 < w[1].2),
            "key {key}: {rs:?}"
        );
    }
}

#[test]
fn every_event_reaches_the_topic_once_per_wallet_through_a_reorg_and_a_restart() {
    let broker = Broker::start();
    broker.create_topic(TOPIC, 3);
    let node = Devnet::start(|c| c.filler_txs = 0);
    let miner = node.new_address("bech32");
    node.mine_to(101, &miner);
    let (hot, cold) = (node.new_address("bech32"), node.new_address("bech32m"));
    let wallets = hot_and_cold(&hot, &cold);
    let db = tempfile::tempdir().unwrap();
    let settings = Settings {
        kafka: KafkaSettings {
            brokers: Some(broker.bootstrap()),
            topic: Some(TOPIC.into()),
            ..KafkaSettings::default()
        },
        ..Indexer::settings(&node, db.path())
    };
    let f = Indexer::start(settings.clone(), &wallets);
    // Payments to each wallet (hot's belong to both), seen in the mempool then mined;
    // then a reorg takes the last block away and mines its payment again.
    node.call("sendtoaddress", json!([hot, 1.0]));
    node.call("sendtoaddress", json!([cold, 2.0]));
    node.mine_to(1, &miner);
    node.call("sendtoaddress", json!([hot, 0.1]));
    let last = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(last, WAIT));
    node.call("invalidateblock", json!([last.to_string()]));
    let tip = node.mine_to(2, &miner)[1];
    assert!(f.wait_for(tip, WAIT));

    let log_id = f.store.log_id().unwrap();
    let (records, end) = exported(&broker, &f.store);
    let log = subscribed(&f, end);
    assert!(
        log.iter()
            .any(|e| e.kind == pb::EventKind::TransferReorgedOut as i32),
        "the run had a reorg"
    );
    assert!(
        log.iter().any(|e| e.wallets.len() == 2),
        "a payment to both"
    );
    assert_is_the_log(&records, &log, &log_id, "regtest");

    // A restart resumes from what the topic holds: more events, nothing twice.
    f.stop().unwrap();
    let store = std::sync::Arc::new(Store::open(db.path(), bitcoin::Network::Regtest).unwrap());
    let f = Indexer::resume(settings, store);
    node.call("sendtoaddress", json!([cold, 0.3]));
    let tip = node.mine_to(1, &miner)[0];
    assert!(f.wait_for(tip, WAIT));
    let (records, end) = exported(&broker, &f.store);
    let log = subscribed(&f, end);
    assert_is_the_log(&records, &log, &log_id, "regtest");

    // `indexer kafka export` re-publishes a range to another topic: the same records.
    f.stop().unwrap();
    let (from, to) = (2u64, log.len() as u64 - 1);
    let (from_arg, to_arg) = (from.to_string(), to.to_string());
    let stdout = kafka_export(
        db.path(),
        &broker,
        &["--topic", "replayed", "--from", &from_arg, "--to", &to_arg],
    );
    let in_range = |r: &&Received| {
        let o: u64 = r.header("log_offset").unwrap().parse().unwrap();
        (from..to).contains(&o)
    };
    let summary = |rs: Vec<&Received>| {
        let mut v: Vec<_> = rs
            .into_iter()
            .map(|r| (r.key.clone(), r.value.clone(), r.headers.clone()))
            .collect();
        v.sort();
        v
    };
    let replayed = events_of(broker.read_all("replayed"));
    assert_eq!(
        stdout.trim(),
        format!("exported\t{}\treplayed", replayed.len())
    );
    assert_eq!(
        summary(replayed.iter().collect()),
        summary(records.iter().filter(in_range).collect())
    );

    // Replayed into the topic itself, every record arrives twice; the Python example
    // consumer's dedup rule applies each (offset, wallet) once.
    kafka_export(db.path(), &broker, &[]);
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/python/kafka_consumer.py");
    let out = stdout_of(
        std::process::Command::new(system_tests::kafka::venv_python())
            .arg(example)
            .args(["--brokers", &broker.bootstrap(), "--topic", TOPIC])
            .args(["--idle-secs", "5"]),
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, applied) = lines.split_last().unwrap();
    let applied: BTreeSet<(u64, Option<String>)> = applied
        .iter()
        .map(|e| {
            (
                e["log_offset"].as_u64().unwrap(),
                e["wallet"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(applied, expected_once(&log));
    assert_eq!(summary["applied"].as_u64(), Some(records.len() as u64));
    assert_eq!(summary["skipped"].as_u64(), Some(records.len() as u64));
}

/// `indexer kafka export ARGS` on the database at `db` to `broker`: its standard output.
fn kafka_export(db: &std::path::Path, broker: &Broker, args: &[&str]) -> String {
    stdout_of(
        std::process::Command::new(system_tests::harness::workspace_binary("indexer"))
            .args(["--db", db.to_str().unwrap(), "--network", "regtest"])
            .args(["--kafka-brokers", &broker.bootstrap(), "kafka", "export"])
            .args(args),
    )
}

/// Runs `command`; its standard output, after asserting it succeeded.
fn stdout_of(command: &mut std::process::Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
