//! The indexer's metrics: one struct of handles ([`IndexerMetrics`]) handed to the follower,
//! the pipeline and the gRPC server, each handle an atomic so the hot path only increments;
//! the registry that names them for Prometheus; and what `/health` and `/ready` answer.
//! `service::metrics_http` serves them and `service::grpc_latency` times gRPC calls (both
//! shared with the orchestrator).
//!
//! Only this module and its children name `prometheus-client`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::zmq_feed::Topic;
use service::grpc_latency::GrpcLatency;
use service::metrics_http::Probe;

/// A label set of one static pair (no allocation to look one up).
type StaticLabel = [(&'static str, &'static str); 1];

/// Tip latencies worth telling apart, in seconds: a full block is milliseconds here,
/// seconds on a busy or slow machine.
const TIP_LATENCY_BUCKETS: [f64; 12] = [
    0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// Reorg depths worth telling apart, in blocks.
const REORG_DEPTH_BUCKETS: [f64; 8] = [1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0];

/// Handles to every indexer series. Clones share the same series.
#[derive(Clone, Debug)]
pub struct IndexerMetrics {
    /// Height of the index's tip.
    pub indexed_height: Gauge,
    /// bitcoind's tip height, as last learned (RPC at each catch-up, or a ZMQ block).
    pub bitcoind_height: Gauge,
    /// Blocks connected to the index.
    pub blocks_connected: Counter,
    /// Blocks disconnected by reorgs.
    pub blocks_disconnected: Counter,
    /// Transactions in the blocks connected.
    pub transactions: Counter,
    /// Reorgs: times the index left a chain bitcoind no longer has.
    pub reorgs: Counter,
    /// How many blocks each reorg disconnected.
    pub reorg_depth: Histogram,
    /// Seconds from taking a ZMQ `rawblock` that extends the tip to its block committed.
    pub tip_latency: Histogram,
    /// Times following went back to reconciling with bitcoind over RPC.
    pub reconciles: Counter,
    /// 1 while blocks are fetched over bitcoind's REST interface, 0 over RPC `getblock`.
    pub blocks_over_rest: Gauge,
    /// Gaps in ZMQ sequence numbers (lost messages), by topic.
    zmq_gaps: Family<StaticLabel, Counter>,
    /// Stage input queues.
    pub queues: QueueDepths,
    /// Open `Subscribe` streams.
    subscribers: Gauge,
    /// gRPC latency by method.
    pub grpc: GrpcLatency,
    /// Read at scrape time: bitcoind's height minus the index's.
    tip_lag: Gauge,
    follower: Arc<FollowerState>,
    /// The Kafka exporter's progress.
    pub kafka: KafkaMetrics,
}

/// How far the Kafka exporter got.
#[derive(Clone, Debug, Default)]
pub struct KafkaMetrics {
    /// The log offset below which every event is on the topic.
    pub exported_offset: Gauge,
    /// Events committed to the log and not yet on the topic.
    pub lag_events: Gauge,
    /// Seconds the exporter has been behind the log (0 when caught up).
    pub lag_seconds: Gauge,
    /// Failures (broker unreachable, transactions aborted); each is retried.
    pub errors: Counter,
}

/// What `/health` and `/ready` read.
#[derive(Debug, Default)]
struct FollowerState {
    alive: AtomicBool,
    caught_up: AtomicBool,
}

impl Default for IndexerMetrics {
    fn default() -> Self {
        IndexerMetrics {
            indexed_height: Gauge::default(),
            bitcoind_height: Gauge::default(),
            blocks_connected: Counter::default(),
            blocks_disconnected: Counter::default(),
            transactions: Counter::default(),
            reorgs: Counter::default(),
            reorg_depth: Histogram::new(REORG_DEPTH_BUCKETS),
            tip_latency: Histogram::new(TIP_LATENCY_BUCKETS),
            reconciles: Counter::default(),
            blocks_over_rest: Gauge::default(),
            zmq_gaps: zmq_gaps(),
            queues: QueueDepths::default(),
            subscribers: Gauge::default(),
            grpc: GrpcLatency::default(),
            tip_lag: Gauge::default(),
            follower: Arc::default(),
            kafka: KafkaMetrics::default(),
        }
    }
}

/// Gap counters for every topic, at zero until a gap: a series that exists from the start
/// is one `rate()` and alerts can use.
fn zmq_gaps() -> Family<StaticLabel, Counter> {
    let gaps = Family::default();
    for topic in [
        Topic::RawBlock,
        Topic::HashBlock,
        Topic::Sequence,
        Topic::RawTx,
    ] {
        gaps.get_or_create_owned(&[("topic", topic.name())]);
    }
    gaps
}

impl IndexerMetrics {
    /// Counts a gap in `topic`'s ZMQ sequence numbers.
    pub fn zmq_gap(&self, topic: Topic) {
        self.zmq_gaps
            .get_or_create(&[("topic", topic.name())])
            .inc();
    }

    /// Counts an open `Subscribe` stream until the returned guard drops.
    pub fn subscribed(&self) -> Subscribed {
        self.subscribers.inc();
        Subscribed(self.subscribers.clone())
    }

    /// Notes that the follower thread started (`true`) or ended (`false`).
    pub fn set_follower_alive(&self, alive: bool) {
        self.follower.alive.store(alive, Ordering::Relaxed);
    }

    /// Notes that the index reached bitcoind's tip.
    pub fn set_caught_up(&self) {
        self.follower.caught_up.store(true, Ordering::Relaxed);
    }

    /// The probe of `indexer run` (following bitcoind) or of `indexer serve` (not).
    pub fn probe(&self, following: bool) -> IndexerProbe {
        let mut registry = Registry::with_prefix("indexer");
        let r = &mut registry;
        r.register(
            "indexed_height",
            "Height of the index's tip",
            self.indexed_height.clone(),
        );
        r.register(
            "blocks_connected",
            "Blocks connected to the index (rate() gives blocks per second)",
            self.blocks_connected.clone(),
        );
        r.register(
            "transactions",
            "Transactions in the blocks connected",
            self.transactions.clone(),
        );
        r.register(
            "subscribers",
            "Open Subscribe streams",
            self.subscribers.clone(),
        );
        self.grpc.register(r);
        r.register(
            "kafka_exported_offset",
            "Log offset below which every event is on the Kafka topic",
            self.kafka.exported_offset.clone(),
        );
        r.register(
            "kafka_lag_events",
            "Events in the log not yet on the Kafka topic",
            self.kafka.lag_events.clone(),
        );
        r.register(
            "kafka_lag_seconds",
            "Seconds the Kafka exporter has been behind the log",
            self.kafka.lag_seconds.clone(),
        );
        r.register(
            "kafka_errors",
            "Kafka export failures, each retried",
            self.kafka.errors.clone(),
        );
        if following {
            r.register(
                "bitcoind_height",
                "bitcoind's tip height as last learned",
                self.bitcoind_height.clone(),
            );
            r.register(
                "tip_lag_blocks",
                "Blocks the index is behind bitcoind's tip",
                self.tip_lag.clone(),
            );
            r.register(
                "blocks_disconnected",
                "Blocks disconnected by reorgs",
                self.blocks_disconnected.clone(),
            );
            r.register("reorgs", "Reorgs the index followed", self.reorgs.clone());
            r.register(
                "reorg_depth",
                "Blocks each reorg disconnected",
                self.reorg_depth.clone(),
            );
            r.register(
                "tip_latency_seconds",
                "Seconds from a ZMQ rawblock that extends the tip to its block committed and readable",
                self.tip_latency.clone(),
            );
            r.register(
                "reconciles",
                "Times following went back to asking bitcoind for its best chain",
                self.reconciles.clone(),
            );
            r.register(
                "blocks_over_rest",
                "1 while blocks come over bitcoind's REST interface, 0 over RPC getblock (REST off or refused)",
                self.blocks_over_rest.clone(),
            );
            r.register(
                "zmq_gaps",
                "Lost ZMQ messages detected from sequence numbers, by topic",
                self.zmq_gaps.clone(),
            );
            self.queues.register(r);
        }
        IndexerProbe {
            registry,
            metrics: self.clone(),
            following,
        }
    }
}

/// An open `Subscribe` stream, counted until dropped.
#[derive(Debug)]
pub struct Subscribed(Gauge);

impl Drop for Subscribed {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The pipeline stages whose input queue is measured.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    /// Chunks of raw blocks waiting to be parsed.
    Parse,
    /// Chunks of parsed blocks waiting for the exact filter.
    Filter,
    /// Blocks waiting to be applied.
    Apply,
    /// Blocks' changes waiting to be written.
    Write,
}

/// Items waiting in each stage's input queue, as that stage last saw it: one atomic store
/// per item taken.
#[derive(Clone, Debug)]
pub struct QueueDepths {
    depth: Family<StaticLabel, Gauge>,
    /// The family's gauges (clones share their atomic), resolved once so that setting a
    /// depth takes no lock.
    gauges: Arc<[Gauge; 4]>,
}

impl Default for QueueDepths {
    fn default() -> Self {
        let depth = Family::<StaticLabel, Gauge>::default();
        let gauge = |stage: &'static str| depth.get_or_create_owned(&[("stage", stage)]);
        let gauges = Arc::new([
            gauge("parse"),
            gauge("filter"),
            gauge("apply"),
            gauge("write"),
        ]);
        QueueDepths { depth, gauges }
    }
}

impl QueueDepths {
    /// Records that `stage`'s input queue holds `len` items.
    pub fn set(&self, stage: Stage, len: usize) {
        self.gauges[stage as usize].set(len as i64);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "pipeline_queue_depth",
            "Items waiting in a pipeline stage's input queue (chunks for parse and filter, \
             blocks for apply and write)",
            self.depth.clone(),
        );
    }
}

/// What the endpoint of `indexer run` or `indexer serve` answers from.
#[derive(Debug)]
pub struct IndexerProbe {
    registry: Registry,
    metrics: IndexerMetrics,
    following: bool,
}

impl Probe for IndexerProbe {
    fn render(&self) -> Result<String, std::fmt::Error> {
        let m = &self.metrics;
        m.tip_lag
            .set((m.bitcoind_height.get() - m.indexed_height.get()).max(0));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    fn healthy(&self) -> bool {
        !self.following || self.metrics.follower.alive.load(Ordering::Relaxed)
    }

    fn ready(&self) -> bool {
        let state = &self.metrics.follower;
        !self.following
            || (state.alive.load(Ordering::Relaxed) && state.caught_up.load(Ordering::Relaxed))
    }
}
