//! The exporter thread: tails the committed event log and produces each event's records in
//! Kafka transactions, resuming from what the topic holds after every restart or failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitcoin::Network;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use tracing::{error, info, warn};

use super::record::{marker, records, Record};
use super::{position, ExportError};
use crate::config::KafkaConfig;
use crate::metrics::KafkaMetrics;
use crate::query::{Query, QueryError};
use crate::store::{Reader, Store};

/// Events read and produced in one transaction, at most.
const CHUNK: usize = 10_000;
/// How long a transaction's calls may take.
const REQUEST: Duration = Duration::from_secs(30);
/// How often the log is looked at when nothing new was exported (a fraction of a block's
/// commit -> consumer latency).
const IDLE: Duration = Duration::from_millis(5);
/// Longest wait between attempts when the broker fails.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Queues one record for `topic` (in `partition`, or where its key goes), waiting while
/// the client's queue is full.
fn send<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    topic: &str,
    partition: Option<i32>,
    r: &Record,
) -> Result<(), KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (key, value) in &r.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    let mut record = BaseRecord::to(topic).payload(&r.value).headers(headers);
    if !r.key.is_empty() {
        record = record.key(&r.key);
    }
    if let Some(p) = partition {
        record = record.partition(p);
    }
    // Bounded: a dead broker must not hold up shutdown (the session then starts over).
    let until = Instant::now() + REQUEST;
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < until =>
            {
                record = back;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until every queued record has its delivery report, serving reports in 1 ms steps.
/// Called before committing: rust-rdkafka's own flush, which `commit_transaction` runs
/// first, waits in whole 100 ms polls, and that was every transaction's latency.
fn drain<C: ProducerContext>(
    producer: &BaseProducer<C>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let until = Instant::now() + timeout;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= until {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        producer.poll(Duration::from_millis(1));
    }
    Ok(())
}

/// Counts the records the broker did not take (the default context drops those reports).
#[derive(Default)]
struct Deliveries {
    failed: std::sync::atomic::AtomicU64,
    first: std::sync::Mutex<Option<KafkaError>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.clone());
        }
    }
}

/// Re-publishes the events from `from` up to `to` (exclusive; `None`: the log's end) to
/// `topic`, in the exporter's format: to reconcile a consumer, or to fill a new topic.
/// Idempotent producer, no transaction (a transaction would fence the running exporter);
/// consumers deduplicate on the headers as always. Returns the records delivered; a
/// record the broker refused fails it.
pub fn replay(
    store: &Store,
    network: Network,
    config: &KafkaConfig,
    topic: &str,
    from: u64,
    to: Option<u64>,
) -> Result<u64, ExportError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", &config.client_id);
    for (k, v) in &config.properties {
        c.set(k, v);
    }
    let producer: BaseProducer<Deliveries> = c
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(Deliveries::default())?;
    let query = Query::new(store, network).map_err(ExportError::Query)?;
    let log_id = query.log_id().map_err(ExportError::Query)?;
    let names = query.wallet_names().map_err(ExportError::Query)?;
    let end = to.unwrap_or(u64::MAX);
    let (mut next, mut produced) = (from, 0u64);
    while next < end {
        let events = query.events(next, CHUNK).map_err(ExportError::Gap)?;
        let Some(last) = events.last().map(|(offset, _)| *offset) else {
            break;
        };
        for (offset, event) in events.into_iter().take_while(|(o, _)| *o < end) {
            for r in records(&log_id, network.to_core_arg(), offset, event, &names) {
                send(&producer, topic, None, &r)?;
                produced += 1;
            }
        }
        next = last + 1;
    }
    drain(&producer, REQUEST)?;
    producer.flush(REQUEST)?;
    let context = producer.context();
    let failed = context.failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = context
            .first
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        return Err(ExportError::Undelivered {
            failed,
            produced,
            first: first.map(|e| e.to_string()).unwrap_or_default(),
        });
    }
    Ok(produced)
}

/// Exports one store's event log to one topic.
pub struct Exporter {
    store: Arc<Store>,
    network: Network,
    config: KafkaConfig,
    metrics: KafkaMetrics,
    stop: Arc<AtomicBool>,
}

impl Exporter {
    /// An exporter of `store`'s log as `config` says, until `stop` is set.
    pub fn new(
        store: Arc<Store>,
        network: Network,
        config: KafkaConfig,
        metrics: KafkaMetrics,
        stop: Arc<AtomicBool>,
    ) -> Exporter {
        // Until the topic says how far it got, no event may be pruned.
        store.hold_events_from(0);
        Exporter {
            store,
            network,
            config,
            metrics,
            stop,
        }
    }

    /// Runs on a thread of its own.
    pub fn spawn(self) -> std::io::Result<JoinHandle<Result<(), ExportError>>> {
        std::thread::Builder::new()
            .name("kafka-export".into())
            .spawn(move || self.run())
    }

    /// Exports until stopped; retries what a broker's failure interrupted, from the
    /// position the topic shows; ends early only on a gap it cannot fill.
    pub fn run(&self) -> Result<(), ExportError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopping() {
                return Ok(());
            }
            match self.session() {
                Ok(()) => return Ok(()),
                Err(e) if e.is_final() => {
                    error!(error = %e, topic = %self.config.topic, "kafka export stopped");
                    self.metrics.errors.inc();
                    // Nothing will be exported: retention may prune again.
                    self.store.hold_events_from(u64::MAX);
                    return Err(e);
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "kafka export interrupted");
                    self.metrics.errors.inc();
                    self.pause(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps up to `d`, waking early when stopped.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopping() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.brokers)
            .set("client.id", &self.config.client_id);
        for (k, v) in &self.config.properties {
            c.set(k, v);
        }
        c
    }

    /// One connection: find the position, then export until stopped or a failure.
    fn session(&self) -> Result<(), ExportError> {
        let log_id = self.store.log_id()?;
        // One transactional id per log: a second exporter of this log fences the first.
        let producer: BaseProducer = self
            .client()
            .set("transactional.id", format!("indexer-{log_id}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        producer.init_transactions(REQUEST)?;
        // librdkafka's consumer needs a group even with partitions assigned by hand (no
        // group is joined, nothing is committed): without one, reading fails.
        let consumer: BaseConsumer = self
            .client()
            .set("group.id", format!("indexer-export-{log_id}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()?;
        let saved = self.store.kafka_exported(&self.config.topic)?;
        let mut next = position::next_offset(&consumer, &self.config.topic, &log_id, saved)?;
        drop(consumer);
        let end = self.store.next_event()?;
        if next > end {
            // The topic holds offsets this log never wrote (a database restored from an
            // older copy): exporting on would give new events offsets consumers have seen.
            return Err(ExportError::Gap(QueryError::FutureOffset {
                asked: next,
                next: end,
            }));
        }
        // What the topic shows now is the saved position from here on: a topic that lost
        // its data (a broker that kept nothing) must not be continued from the old one
        // once some partitions hold markers again.
        self.exported(next)?;
        info!(topic = %self.config.topic, from = next, "exporting the event log to kafka");
        let mut behind_since: Option<Instant> = None;
        while !self.stopping() {
            let end = self.store.next_event()?;
            self.metrics.lag_events.set(end.saturating_sub(next) as i64);
            if next >= end {
                behind_since = None;
                self.metrics.lag_seconds.set(0);
                std::thread::sleep(IDLE);
                continue;
            }
            let since = *behind_since.get_or_insert_with(Instant::now);
            self.metrics
                .lag_seconds
                .set(since.elapsed().as_secs() as i64);
            next = self.export_chunk(&producer, &log_id, next)?;
            self.exported(next)?;
        }
        Ok(())
    }

    /// Produces the events from `from` on (one chunk) in one transaction; returns the next.
    fn export_chunk(
        &self,
        producer: &BaseProducer,
        log_id: &str,
        from: u64,
    ) -> Result<u64, ExportError> {
        let query = Query::new(&self.store, self.network).map_err(ExportError::Query)?;
        let events = match query.events(from, CHUNK) {
            Ok(events) => events,
            Err(e @ (QueryError::Pruned { .. } | QueryError::FutureOffset { .. })) => {
                return Err(ExportError::Gap(e))
            }
            Err(e) => return Err(ExportError::Query(e)),
        };
        let names = query.wallet_names().map_err(ExportError::Query)?;
        let Some(next) = events.last().map(|(offset, _)| offset + 1) else {
            return Ok(from);
        };
        let network = self.network.to_core_arg();
        let topic = &self.config.topic;
        producer.begin_transaction()?;
        let sent = events
            .into_iter()
            .try_for_each(|(offset, event)| {
                records(log_id, network, offset, event, &names)
                    .iter()
                    .try_for_each(|r| send(producer, topic, None, r))
            })
            .and_then(|()| {
                // The chunk's end in every partition (after its records: the topic may
                // only now exist), where the next session reads its position.
                let partitions =
                    position::partitions(producer.client(), topic).map_err(|e| match e {
                        ExportError::Kafka(k) => k,
                        other => KafkaError::Subscription(other.to_string()),
                    })?;
                partitions
                    .into_iter()
                    .try_for_each(|p| send(producer, topic, Some(p), &marker(log_id, next)))
            });
        match sent
            .and_then(|()| drain(producer, REQUEST))
            .and_then(|()| producer.commit_transaction(REQUEST))
        {
            Ok(()) => Ok(next),
            Err(e) => {
                // The session starts over from what the topic holds, so nothing is lost
                // and, on a broker that hides aborted records, nothing is doubled.
                let _ = producer.abort_transaction(REQUEST);
                Err(e.into())
            }
        }
    }

    /// Notes that everything below `next` is on the topic: saved beside the log (a partition
    /// without a marker counts as that) and released to retention.
    fn exported(&self, next: u64) -> Result<(), ExportError> {
        self.store.set_kafka_exported(&self.config.topic, next)?;
        self.store.hold_events_from(next);
        self.metrics.exported_offset.set(next as i64);
        Ok(())
    }
}
