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
    /// Reading the log failed.
    #[error(transparent)]
    Query(crate::query::QueryError),
}

impl ExportError {
    /// Whether trying again cannot help (an operator must act).
    pub fn is_final(&self) -> bool {
        matches!(self, ExportError::Gap(_))
    }
}
