//! Where a previous export stopped, read back from the topic itself.
//!
//! Each chunk ends with a marker record in every partition (`exported_to`: every event
//! below it is on the topic). The position is the lowest last marker over the partitions:
//! a chunk cut short by a crash left its marker in some partitions at most, so it is
//! exported again rather than skipped. That holds on a broker that delivers aborted
//! transactions too (Tansu does); consumers drop the repeats by the dedup rule.
//!
//! Brokers do not all answer "latest" alike (Tansu answers the base offset of the last
//! batch plus one, not the end), so the last marker of a partition is found by reading from
//! just below that answer to the partition's end, stepping further back when the tail
//! holds none (transaction markers, another log's records).

use std::time::{Duration, Instant};

use rdkafka::client::{Client, ClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::record::{header_of, EXPORTED_TO};
use super::ExportError;

/// How long one metadata or watermark request may take.
const REQUEST: Duration = Duration::from_secs(10);
/// How long reading one partition's tail may take.
const TAIL: Duration = Duration::from_secs(30);

/// The partitions of `topic` (none when it does not exist yet).
pub fn partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
) -> Result<Vec<i32>, ExportError> {
    let metadata = client.fetch_metadata(Some(topic), REQUEST)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// The offset below which every event of log `log_id` is on `topic`, given the position
/// the exporter last saved beside the log (`saved`).
///
/// The lowest last marker over the partitions. A partition without one (the topic gained
/// partitions, or Kafka's retention emptied an idle one) does not send it back to 0: it
/// counts as `saved`, which is never ahead of what was committed. A topic with no marker
/// in any partition is new, or was lost (a broker that kept nothing): filled from 0.
pub fn next_offset(
    consumer: &BaseConsumer,
    topic: &str,
    log_id: &str,
    saved: Option<u64>,
) -> Result<u64, ExportError> {
    let mut lasts = Vec::new();
    for p in partitions(consumer.client(), topic)? {
        lasts.push(last_marker(consumer, topic, p, log_id)?);
    }
    Ok(lowest(&lasts, saved))
}

/// The position rule of [`next_offset`] over each partition's last marker.
fn lowest(lasts: &[Option<u64>], saved: Option<u64>) -> u64 {
    if lasts.iter().all(Option::is_none) {
        return 0;
    }
    lasts
        .iter()
        .map(|last| last.unwrap_or(saved.unwrap_or(0)))
        .min()
        .unwrap_or(0)
}

/// The last `exported_to` of log `log_id` in partition `p`.
fn last_marker(
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
        if let Some(found) = last_from(consumer, topic, p, start, log_id)? {
            return Ok(Some(found));
        }
        if start == low {
            return Ok(None);
        }
        back = back.saturating_mul(4);
    }
}

/// The last `exported_to` of log `log_id` from `start` to the partition's end.
fn last_from(
    consumer: &BaseConsumer,
    topic: &str,
    p: i32,
    start: i64,
    log_id: &str,
) -> Result<Option<u64>, ExportError> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let mut last = None;
    let until = Instant::now() + TAIL;
    let result = loop {
        if Instant::now() > until {
            break Err(ExportError::TailTimeout { partition: p });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break Ok(last),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(m)) => {
                let found = m.headers().and_then(|h| {
                    header_of(
                        log_id,
                        EXPORTED_TO,
                        h.iter().map(|h| (h.key, h.value.unwrap_or_default())),
                    )
                });
                if found.is_some() {
                    last = found;
                }
            }
        }
    };
    consumer.unassign()?;
    result
}

#[cfg(test)]
mod tests {
    use super::lowest;

    #[test]
    fn the_position_is_the_lowest_marker_and_a_partition_without_one_counts_as_saved() {
        // A new or lost topic: from the start, whatever was saved.
        assert_eq!(lowest(&[], Some(50)), 0);
        assert_eq!(lowest(&[None, None], Some(50)), 0);
        // A chunk cut short: its marker reached one partition only.
        assert_eq!(lowest(&[Some(30), Some(20)], Some(20)), 20);
        // A partition added since (or emptied by retention): the saved position, not 0.
        assert_eq!(lowest(&[Some(30), None], Some(30)), 30);
        // The first chunk cut short before anything was saved: from 0.
        assert_eq!(lowest(&[Some(10), None], None), 0);
        // A saved position behind the topic's (a crash before saving): the older one.
        assert_eq!(lowest(&[Some(30), None], Some(20)), 20);
    }
}
