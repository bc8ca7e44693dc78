//! The Kafka client this workspace builds (rdkafka, bundled librdkafka) against the broker
//! the tests start (Tansu): what the event exporter will rely on. A librdkafka too old
//! for the broker (Debian's 2.0.2 fails at ApiVersions) or a broker that drops headers
//! fails here first. See docs/kafka.md.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;
use system_tests::kafka::Broker;

#[test]
fn keys_values_and_headers_round_trip_through_an_idempotent_producer() {
    let broker = Broker::start();
    broker.create_topic("events", 3);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .unwrap();
    for offset in 0u64..20 {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "log_offset",
                value: Some(offset.to_string().as_bytes()),
            })
            .insert(Header {
                key: "kind",
                value: Some("3".as_bytes()),
            });
        let value = vec![offset as u8; 64];
        producer
            .send(
                BaseRecord::to("events")
                    .key("wallet-a")
                    .payload(&value)
                    .headers(headers),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(20)).unwrap();

    // All of one key went to one partition, in order: read every partition from the start.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "check")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut partitions = TopicPartitionList::new();
    for p in 0..3 {
        partitions
            .add_partition_offset("events", p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    while got.len() < 20 && Instant::now() < until {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.unwrap();
        assert_eq!(m.key(), Some("wallet-a".as_bytes()));
        let headers = m.headers().expect("headers kept");
        let offset: u64 = std::str::from_utf8(headers.get(0).value.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(headers.get(0).key, "log_offset");
        assert_eq!(headers.get(1).key, "kind");
        assert_eq!(m.payload(), Some(&vec![offset as u8; 64][..]));
        got.push(offset);
    }
    assert_eq!(
        got,
        (0..20).collect::<Vec<_>>(),
        "every record once, in order; broker log: {}",
        broker.log_text()
    );
}

/// A chunk cut short by a crash left its end marker in some partitions only: the exporter
/// resumes from the lowest last marker, so that chunk is exported again, never skipped,
/// even on a broker that delivers aborted transactions. Another log's markers do not count.
#[test]
fn the_export_position_is_the_lowest_last_marker_over_the_partitions() {
    let broker = Broker::start();
    broker.create_topic("events", 3);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .create()
        .unwrap();
    let mark = |p: i32, log: &str, to: u64| {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "log_id",
                value: Some(log.as_bytes()),
            })
            .insert(Header {
                key: "exported_to",
                value: Some(to.to_string().as_bytes()),
            });
        producer
            .send(
                BaseRecord::<(), [u8]>::to("events")
                    .partition(p)
                    .payload(&[][..])
                    .headers(headers),
            )
            .unwrap();
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("group.id", "position")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let position_saved =
        |saved| indexer::kafka::position::next_offset(&consumer, "events", "ours", saved).unwrap();
    let position = || position_saved(Some(5));
    assert_eq!(position(), 0, "nothing exported yet");
    // The first chunk reached partition 0 only, before any position was saved.
    mark(0, "ours", 5);
    producer.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(position_saved(None), 0, "the first chunk is exported again");
    // A partition without a marker counts as the saved position, not as 0.
    assert_eq!(position_saved(Some(5)), 5);
    for p in 0..3 {
        mark(p, "ours", 5);
    }
    producer.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(position(), 5);
    // The next chunk reached partitions 0 and 2 only; another log wrote later.
    mark(0, "ours", 10);
    mark(2, "ours", 10);
    mark(1, "theirs", 50);
    producer.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(position(), 5, "the chunk cut short is exported again");
    mark(1, "ours", 10);
    producer.flush(Duration::from_secs(20)).unwrap();
    assert_eq!(position(), 10);
}
