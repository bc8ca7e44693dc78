//! The event -> saga adapter on Kafka (`events = "kafka"`): the same observations as the
//! Subscribe [`monitor`](crate::monitor), read from the topic the indexer exports its log to.
//!
//! The topic keeps order per key only (block events in the network's partition, transfers
//! in their wallets'), and a saga needs the log's order: a reorg's `TransferReorgedOut`
//! before the `BlockConnected` that follows it. Every chunk the exporter commits ends with
//! a marker in every partition (`exported_to`: all events below it are before it), so
//! the [`Barrier`] holds records until every partition has passed a marker, then applies
//! the events below the lowest one in log order, each offset once (a transfer of two
//! wallets is two records; a broker that shows aborted records repeats some). The cursor,
//! the partitions' read positions and the effects are written in one batch, so a restart
//! re-reads exactly what was not applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message as _;
use proto::indexer::v1 as ipb;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::indexer_client::Indexer;
use crate::monitor::{apply, reconcile, MonitorError};
use crate::store::{Observation, SagaStore};

/// How long a metadata or offset request may take.
const REQUEST: Duration = Duration::from_secs(10);
/// After reading the present state, the topic is read from this long before it: records
/// of the events that followed were produced later (by a clock that may be a little off).
const CLOCK_MARGIN: Duration = Duration::from_secs(300);
/// Records taken before the released events are written, at most.
const BATCH: usize = 4096;
/// Wait before following again after the first failure; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before following again after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where the events come from on Kafka.
#[derive(Clone, Debug, PartialEq)]
pub struct KafkaEvents {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic the indexer exports to.
    pub topic: String,
    /// The consumer group the read positions are also committed to (for lag tools; the
    /// saga database holds the ones that count).
    pub group_id: String,
    /// librdkafka settings passed through (TLS, SASL).
    pub properties: BTreeMap<String, String>,
}

impl KafkaEvents {
    /// A consumer of the topic, committing nothing itself, reading committed records only.
    pub fn consumer(&self) -> Result<StreamConsumer, MonitorError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id);
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        Ok(c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A position Kafka's retention deleted is an error, never a silent jump to the
            // end (which would skip events) or the start.
            .set("auto.offset.reset", "error")
            .set("isolation.level", "read_committed")
            // A block's records are waited for 10 ms at most, not the default 500.
            .set("fetch.wait.max.ms", "10")
            .create()?)
    }
}

/// Puts the records of all partitions back into the log's order.
#[derive(Debug)]
pub struct Barrier {
    log_id: String,
    /// Every event below it is applied.
    cursor: u64,
    /// The last marker of each partition.
    marks: BTreeMap<i32, u64>,
    /// Events read, not yet applied, by log offset.
    pending: BTreeMap<u64, ipb::Event>,
    /// Where each pending record sits: partition -> Kafka offset -> log offset.
    held: BTreeMap<i32, BTreeMap<i64, u64>>,
    /// The next Kafka offset of each partition.
    next: BTreeMap<i32, i64>,
}

impl Barrier {
    /// A barrier for log `log_id` from `cursor`, reading each partition on from
    /// `positions`. Every partition starts marked at the cursor: when the cursor was
    /// written, each had passed a marker at least that high.
    pub fn new(log_id: String, cursor: u64, positions: BTreeMap<i32, i64>) -> Barrier {
        Barrier {
            log_id,
            cursor,
            marks: positions.keys().map(|p| (*p, cursor)).collect(),
            pending: BTreeMap::new(),
            held: BTreeMap::new(),
            next: positions,
        }
    }

    /// Takes the record at `offset` of `partition`. Records of another log are skipped
    /// and reported (`Ok(Some(log id))`): the indexer may have been rebuilt.
    pub fn take<'h>(
        &mut self,
        partition: i32,
        offset: i64,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
        payload: &[u8],
    ) -> Result<Option<String>, MonitorError> {
        self.next.insert(partition, offset + 1);
        let (mut log_id, mut log_offset, mut exported_to) = (None, None, None);
        for (key, value) in headers {
            match key {
                "log_id" => log_id = Some(value),
                "log_offset" => log_offset = Some(value),
                "exported_to" => exported_to = Some(value),
                _ => {}
            }
        }
        let number = |v: &[u8]| std::str::from_utf8(v).ok()?.parse::<u64>().ok();
        let bad = |what: &str| MonitorError::BadEvent {
            offset: log_offset.and_then(number).unwrap_or(u64::MAX),
            what: format!("{what} (partition {partition}, offset {offset})"),
        };
        match log_id {
            None => return Err(bad("a record without a log_id header")),
            Some(id) if id != self.log_id.as_bytes() => {
                return Ok(Some(String::from_utf8_lossy(id).into_owned()))
            }
            Some(_) => {}
        }
        if let Some(to) = exported_to {
            let to = number(to).ok_or_else(|| bad("an unreadable exported_to"))?;
            let mark = self.marks.entry(partition).or_insert(to);
            *mark = (*mark).max(to);
            return Ok(None);
        }
        let at = log_offset
            .and_then(number)
            .ok_or_else(|| bad("an event record without log_offset"))?;
        let event = ipb::Event::decode(payload).map_err(|e| bad(&format!("undecodable: {e}")))?;
        if event.offset != at {
            return Err(bad("log_offset differs from the event's offset"));
        }
        if at >= self.cursor {
            self.pending.entry(at).or_insert(event);
            self.held.entry(partition).or_default().insert(offset, at);
        }
        Ok(None)
    }

    /// The events every partition has passed, in log order, and the cursor after them;
    /// `None` while the lowest marker is where the cursor is.
    pub fn release(&mut self) -> Option<(Vec<ipb::Event>, u64)> {
        let to = *self.marks.values().min()?;
        if to <= self.cursor {
            return None;
        }
        let later = self.pending.split_off(&to);
        let events = std::mem::replace(&mut self.pending, later)
            .into_values()
            .collect();
        for held in self.held.values_mut() {
            held.retain(|_, at| *at >= to);
        }
        self.cursor = to;
        Some((events, to))
    }

    /// Where each partition must be read from again to see every event not yet released.
    pub fn positions(&self) -> BTreeMap<i32, i64> {
        self.next
            .iter()
            .map(|(p, next)| {
                let first_held = self.held.get(p).and_then(|h| h.keys().next().copied());
                (*p, first_held.unwrap_or(*next))
            })
            .collect()
    }
}

/// Follows the topic into the saga store.
pub struct KafkaMonitor {
    store: Arc<SagaStore>,
    indexer: Indexer,
    wake: Arc<tokio::sync::Notify>,
    config: KafkaEvents,
    backoff: Duration,
    /// Set when the stored positions are gone from the topic (Kafka's retention deleted
    /// them): the next attempt reads the present state instead of resuming.
    positions_lost: bool,
}

impl KafkaMonitor {
    /// A monitor of `config`'s topic waking `wake` when something a withdrawal watches
    /// changes; `indexer` reads the present state when there is no position to resume.
    pub fn new(
        store: Arc<SagaStore>,
        indexer: Indexer,
        wake: Arc<tokio::sync::Notify>,
        config: KafkaEvents,
    ) -> KafkaMonitor {
        KafkaMonitor {
            store,
            indexer,
            wake,
            config,
            backoff: FIRST_BACKOFF,
            positions_lost: false,
        }
    }

    /// Follows the topic for good, starting over with backoff after any failure.
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.follow().await {
                self.positions_lost = positions_lost(&e);
                tracing::warn!(error = %e, retry_in = ?self.backoff, topic = %self.config.topic, "following the indexer's events on kafka");
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Reads from the stored positions (or from the present state) until a failure.
    pub async fn follow(&mut self) -> Result<(), MonitorError> {
        let current = self
            .indexer
            .get_tip(ipb::GetTipRequest {})
            .await?
            .into_inner();
        let resume = match (self.store.cursor()?, self.store.kafka_positions()?) {
            (Some(cursor), Some(positions))
                if self.store.log_id()? == current.log_id && !self.positions_lost =>
            {
                Some((cursor, positions))
            }
            _ => None,
        };
        let consumer = Arc::new(self.config.consumer()?);
        let (cursor, positions) = match resume {
            Some(r) => r,
            None => {
                let since = SystemTime::now() - CLOCK_MARGIN;
                let cursor = reconcile(&self.store, &mut self.indexer, &self.wake).await?;
                let c = consumer.clone();
                let topic = self.config.topic.clone();
                let positions =
                    tokio::task::spawn_blocking(move || positions_at(&c, &topic, since))
                        .await
                        .map_err(|e| MonitorError::Kafka(e.to_string()))??;
                (cursor, positions)
            }
        };
        let (c, topic) = (consumer.clone(), self.config.topic.clone());
        let positions = tokio::task::spawn_blocking(move || assign(&c, &topic, positions))
            .await
            .map_err(|e| MonitorError::Kafka(e.to_string()))??;
        let log_id = self.store.log_id()?;
        tracing::info!(topic = %self.config.topic, cursor, partitions = positions.len(), "following the indexer's events on kafka");
        let mut barrier = Barrier::new(log_id.clone(), cursor, positions);
        let mut others_checked = std::collections::BTreeSet::new();
        loop {
            let mut taken = 0;
            let mut message = Some(consumer.recv().await?);
            while let Some(m) = message.take() {
                let headers = m.headers().map(|h| {
                    h.iter()
                        .map(|h| (h.key, h.value.unwrap_or_default()))
                        .collect::<Vec<_>>()
                });
                let other = barrier.take(
                    m.partition(),
                    m.offset(),
                    headers.unwrap_or_default(),
                    m.payload().unwrap_or_default(),
                )?;
                if let Some(other) = other {
                    if others_checked.insert(other.clone()) {
                        // Another log's records: an old one's are skipped; if the indexer
                        // now writes that log, the present state is read again.
                        let now = self.indexer.get_tip(ipb::GetTipRequest {}).await?;
                        if now.into_inner().log_id != log_id {
                            return Err(MonitorError::Kafka(format!(
                                "the topic now carries log {other}, not {log_id}: the indexer was rebuilt"
                            )));
                        }
                    }
                }
                taken += 1;
                if taken < BATCH {
                    message = match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                        Ok(m) => Some(m?),
                        Err(_) => None, // nothing more ready
                    };
                }
            }
            let Some((events, cursor)) = barrier.release() else {
                continue;
            };
            let mut seen = Observation {
                cursor: events.first().map_or(cursor, |e| e.offset),
                ..Observation::default()
            };
            for event in &events {
                apply(&mut seen, event)?;
            }
            seen.cursor = cursor;
            let positions = barrier.positions();
            seen.kafka = Some(positions.clone());
            let observed = self.store.observe(&seen)?;
            self.backoff = FIRST_BACKOFF;
            if observed {
                self.wake.notify_one();
            }
            // For lag tools only: the saga database holds the positions that count.
            let mut committed = TopicPartitionList::new();
            for (p, offset) in positions {
                committed.add_partition_offset(&self.config.topic, p, Offset::Offset(offset))?;
            }
            if let Err(e) = consumer.commit(&committed, CommitMode::Async) {
                tracing::debug!(error = %e, "committing the group's offsets");
            }
        }
    }
}

/// Whether `e` says a stored position is no longer in its partition (past a recreated
/// topic's end, or deleted by retention).
fn positions_lost(e: &MonitorError) -> bool {
    use rdkafka::error::RDKafkaErrorCode::{AutoOffsetReset, OffsetOutOfRange};
    match e {
        MonitorError::PositionsLost { .. } => true,
        MonitorError::KafkaClient(k) => matches!(
            k.rdkafka_error_code(),
            Some(AutoOffsetReset | OffsetOutOfRange)
        ),
        _ => false,
    }
}

/// The first offset of each partition of `topic` with records from `since` on.
pub(crate) fn positions_at(
    consumer: &StreamConsumer,
    topic: &str,
    since: SystemTime,
) -> Result<BTreeMap<i32, i64>, MonitorError> {
    let millis = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut asked = TopicPartitionList::new();
    for p in partitions(consumer, topic)? {
        asked.add_partition_offset(topic, p, Offset::Offset(millis))?;
    }
    let found = consumer.offsets_for_times(asked, REQUEST)?;
    let mut positions = BTreeMap::new();
    for e in found.elements() {
        let at = match e.offset() {
            Offset::Offset(o) => o,
            // No record that late: from the partition's end.
            _ => consumer.fetch_watermarks(topic, e.partition(), REQUEST)?.1,
        };
        positions.insert(e.partition(), at);
    }
    Ok(positions)
}

/// Assigns every partition of `topic`, each from its position (a partition added since
/// the positions were written: from its start); returns the positions assigned.
pub(crate) fn assign(
    consumer: &StreamConsumer,
    topic: &str,
    mut positions: BTreeMap<i32, i64>,
) -> Result<BTreeMap<i32, i64>, MonitorError> {
    let mut assignment = TopicPartitionList::new();
    for p in partitions(consumer, topic)? {
        let (low, high) = consumer.fetch_watermarks(topic, p, REQUEST)?;
        let at = match positions.get(&p) {
            // Past the partition's end: the topic was recreated or truncated (a broker
            // that lost its data) and the exporter is filling it again; resuming there
            // would skip what lands below.
            Some(at) if *at > high => return Err(MonitorError::PositionsLost { partition: p }),
            Some(at) => *at,
            None => low,
        };
        positions.insert(p, at);
        assignment.add_partition_offset(topic, p, Offset::Offset(at))?;
    }
    consumer.assign(&assignment)?;
    Ok(positions)
}

/// The partitions of `topic`; an error when it has none (not created yet).
fn partitions(consumer: &StreamConsumer, topic: &str) -> Result<Vec<i32>, MonitorError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST)?;
    let found: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if found.is_empty() {
        return Err(MonitorError::Kafka(format!(
            "topic {topic} has no partitions (does the indexer export to it yet?)"
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: u64, kind: ipb::EventKind) -> Vec<u8> {
        ipb::Event {
            offset,
            kind: kind.into(),
            height: 7,
            ..ipb::Event::default()
        }
        .encode_to_vec()
    }

    fn take_event(b: &mut Barrier, p: i32, ko: i64, log: &str, at: u64) {
        let at_text = at.to_string();
        let headers = [
            ("log_id", log.as_bytes()),
            ("log_offset", at_text.as_bytes()),
        ];
        b.take(p, ko, headers, &event(at, ipb::EventKind::BlockConnected))
            .unwrap();
    }

    fn take_mark(b: &mut Barrier, p: i32, ko: i64, to: u64) {
        let to = to.to_string();
        let headers = [("log_id", &b"L"[..]), ("exported_to", to.as_bytes())];
        b.take(p, ko, headers, &[]).unwrap();
    }

    fn offsets(released: Option<(Vec<ipb::Event>, u64)>) -> (Vec<u64>, u64) {
        let (events, cursor) = released.unwrap();
        (events.iter().map(|e| e.offset).collect(), cursor)
    }

    #[test]
    fn events_are_released_in_log_order_once_every_partition_passed_a_marker() {
        let mut b = Barrier::new("L".into(), 10, BTreeMap::from([(0, 100), (1, 200)]));
        // Partition 1 (a wallet's) runs ahead of partition 0 (the network's).
        take_event(&mut b, 1, 200, "L", 11);
        take_event(&mut b, 1, 201, "L", 12);
        take_event(&mut b, 1, 202, "L", 12); // the same transfer for a second wallet
        take_mark(&mut b, 1, 203, 14);
        assert!(b.release().is_none(), "partition 0 has not passed 14 yet");
        take_event(&mut b, 0, 100, "L", 10);
        take_event(&mut b, 0, 101, "L", 13);
        // Where a restart now reads from: the first record not yet applied.
        assert_eq!(b.positions(), BTreeMap::from([(0, 100), (1, 200)]));
        take_mark(&mut b, 0, 102, 14);
        assert_eq!(offsets(b.release()), (vec![10, 11, 12, 13], 14));
        assert_eq!(b.positions(), BTreeMap::from([(0, 103), (1, 204)]));
        // A repeat of an applied event (an aborted chunk shown again) is dropped.
        take_event(&mut b, 0, 103, "L", 12);
        take_event(&mut b, 0, 104, "L", 14);
        take_mark(&mut b, 0, 105, 15);
        take_mark(&mut b, 1, 204, 15);
        assert_eq!(offsets(b.release()), (vec![14], 15));
    }

    #[test]
    fn records_of_another_log_are_reported_and_bad_ones_refused() {
        let mut b = Barrier::new("L".into(), 0, BTreeMap::from([(0, 0)]));
        let other = b
            .take(
                0,
                0,
                [("log_id", &b"M"[..]), ("exported_to", &b"9"[..])],
                &[],
            )
            .unwrap();
        assert_eq!(other.as_deref(), Some("M"));
        assert!(b.release().is_none(), "another log's marker moves nothing");
        assert!(b.take(0, 1, [("log_offset", &b"1"[..])], &[]).is_err());
        let wrong = b.take(
            0,
            2,
            [("log_id", &b"L"[..]), ("log_offset", &b"5"[..])],
            &event(6, ipb::EventKind::BlockConnected),
        );
        assert!(wrong.is_err(), "header and event disagree");
        assert!(b
            .take(
                0,
                3,
                [("log_id", &b"L"[..]), ("log_offset", &b"1"[..])],
                b"\xff\xff"
            )
            .is_err());
    }
}
