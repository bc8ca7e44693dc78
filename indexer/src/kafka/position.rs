//! Where a previous export stopped, read back from the topic itself: the highest
//! `log_offset` of this log's committed records, over every partition.
//!
//! Brokers do not all answer "latest" alike (Tansu answers the base offset of the last
//! batch plus one, not the end), so the last record of a partition is found by reading from
//! just below that answer to the partition's end, stepping further back when the tail holds
//! no record of this log (transaction markers, another log's records).

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::record::log_offset;
use super::ExportError;

/// How long one metadata or watermark request may take.
const REQUEST: Duration = Duration::from_secs(10);
/// How long reading one partition's tail may take.
const TAIL: Duration = Duration::from_secs(30);

/// The offset after the last event of log `log_id` on `topic` (`0`: none there).
pub fn next_offset(consumer: &BaseConsumer, topic: &str, log_id: &str) -> Result<u64, ExportError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut next = 0;
    for p in partitions {
        if let Some(last) = last_in_partition(consumer, topic, p, log_id)? {
            next = next.max(last + 1);
        }
    }
    Ok(next)
}

/// The highest `log_offset` of log `log_id` in partition `p`.
fn last_in_partition(
    consumer: &BaseConsumer,
    topic: &str,
    p: i32,
    log_id: &str,
) -> Result<Option<u64>, ExportError> {
    let (low, high) = consumer.fetch_watermarks(topic, p, REQUEST)?;
    let mut back = 1;
    loop {
        let start = (high - back).max(low);
        if start >= high {
            return Ok(None);
        }
        if let Some(found) = highest_from(consumer, topic, p, start, log_id)? {
            return Ok(Some(found));
        }
        if start == low {
            return Ok(None);
        }
        back = back.saturating_mul(4);
    }
}

/// The highest `log_offset` of log `log_id` from `start` to the partition's end.
fn highest_from(
    consumer: &BaseConsumer,
    topic: &str,
    p: i32,
    start: i64,
    log_id: &str,
) -> Result<Option<u64>, ExportError> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let mut highest = None;
    let until = Instant::now() + TAIL;
    let result = loop {
        if Instant::now() > until {
            break Err(ExportError::TailTimeout { partition: p });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break Ok(highest),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(m)) => {
                let found = m.headers().and_then(|h| {
                    log_offset(
                        log_id,
                        h.iter().map(|h| (h.key, h.value.unwrap_or_default())),
                    )
                });
                if found > highest {
                    highest = found;
                }
            }
        }
    };
    consumer.unassign()?;
    result
}
