//! Export of the event log to a Kafka topic (docs/kafka.md): the scale-out path for teams
//! whose consumers outgrow gRPC Subscribe. The embedded log stays the source of truth; the
//! exporter tails it on its own thread, so a slow or absent broker only grows its lag.

pub mod exporter;
pub mod position;
pub mod record;

pub use exporter::{replay, Exporter};

/// Why exporting stopped or must start over.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The broker or the client failed (retried on a new connection).
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A partition's tail could not be read in time (retried).
    #[error("kafka: reading the end of partition {partition} timed out")]
    TailTimeout {
        /// The partition.
        partition: i32,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The log no longer holds what the topic lacks, or the topic holds offsets this log
    /// never wrote: exporting on would skip events, so it stops.
    #[error("the topic cannot be continued from this event log: {0}")]
    Gap(crate::query::QueryError),
    /// The broker refused records of a replay.
    #[error("kafka: {failed} of {produced} records were not delivered (first: {first})")]
    Undelivered {
        /// Records refused.
        failed: u64,
        /// Records produced.
        produced: u64,
        /// The first refusal.
        first: String,
    },
    /// Reading the log failed.
    #[error(transparent)]
    Query(crate::query::QueryError),
}

impl ExportError {
    /// Whether trying again cannot help (an operator must act).
    pub fn is_final(&self) -> bool {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        match self {
            ExportError::Gap(_) => true,
            // A setting librdkafka refuses: the same settings fail again.
            ExportError::Kafka(KafkaError::ClientCreation(_)) => true,
            // Another exporter of this log took over: retrying would fence it in turn,
            // and the two would take the topic from each other for good.
            ExportError::Kafka(KafkaError::Transaction(e)) => {
                e.code() == RDKafkaErrorCode::ProducerFenced
            }
            _ => false,
        }
    }
}
