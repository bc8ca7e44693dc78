//! The event -> saga adapter: follows the indexer's `Subscribe` stream and records, with
//! the offset read up to, what it shows about the withdrawals' transactions (the block
//! that confirmed each, the tip). The executor counts confirmations, spots reorgs and
//! stuck payments from that record, and is woken when it changes.
//!
//! The record and its offset are written together, so a crash resumes the stream exactly
//! where its effects end. When there is no offset yet, or the indexer pruned it, the
//! monitor reads the present state once (the tip and its log offset, then each watched
//! txid) and follows the stream from that offset: replaying the events since the tip was
//! read lands in the same state.

use std::sync::Arc;
use std::time::Duration;

use crate::indexer_client::{self, Indexer};
use bitcoin::Txid;
use proto::indexer::v1 as ipb;
use tonic::Code;

use crate::store::{Observation, SagaStore, SagaStoreError};

/// Events applied before their effect is written, at most (a burst is written in one
/// batch; a quiet stream is written event by event).
const BATCH: usize = 4096;
/// Wait before following again after the first failure; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait before following again after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why following stopped.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The indexer failed or is unreachable.
    #[error("indexer: {0}")]
    Indexer(#[from] tonic::Status),
    /// The saga database failed.
    #[error(transparent)]
    Store(#[from] SagaStoreError),
    /// The Kafka client failed (events = "kafka").
    #[error("kafka: {0}")]
    KafkaClient(#[from] rdkafka::error::KafkaError),
    /// The topic cannot be followed as it is (events = "kafka").
    #[error("kafka: {0}")]
    Kafka(String),
    /// A stored read position is past its partition's end (the topic was recreated or
    /// truncated): the present state is read again.
    #[error("kafka: the read position of partition {partition} is past its end (the topic was recreated?); reading the present state again")]
    PositionsLost {
        /// The partition.
        partition: i32,
    },
    /// An event the indexer sent does not make sense.
    #[error("indexer event {offset}: {what}")]
    BadEvent {
        /// Its offset.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

/// Applies one event to the observation being gathered.
pub fn apply(seen: &mut Observation, event: &ipb::Event) -> Result<(), MonitorError> {
    let bad = |what: &str| MonitorError::BadEvent {
        offset: event.offset,
        what: what.to_owned(),
    };
    if event.offset < seen.cursor {
        return Err(bad("offset went backwards"));
    }
    let txid = || event.txid.parse::<Txid>().map_err(|_| bad("invalid txid"));
    match ipb::EventKind::try_from(event.kind) {
        Ok(ipb::EventKind::BlockConnected) => seen.tip = Some(event.height),
        Ok(ipb::EventKind::BlockDisconnected) => {
            seen.tip = Some(
                event
                    .height
                    .checked_sub(1)
                    .ok_or_else(|| bad("the genesis block disconnected"))?,
            )
        }
        Ok(ipb::EventKind::TransferConfirmed) => {
            seen.txs.insert(txid()?, Some(event.height));
        }
        Ok(ipb::EventKind::TransferReorgedOut) => {
            seen.txs.insert(txid()?, None);
        }
        // Mempool news does not move a saga: a payment that never confirms is bumped
        // after its blocks have passed, whatever the mempool said.
        Ok(
            ipb::EventKind::TransferSeen
            | ipb::EventKind::TransferReplaced
            | ipb::EventKind::TransferEvicted,
        ) => {}
        // A kind newer than this build: nothing it knows to do.
        Ok(ipb::EventKind::Unspecified) | Err(_) => {}
    }
    seen.cursor = event
        .offset
        .checked_add(1)
        .ok_or_else(|| bad("offset at the end of the range"))?;
    Ok(())
}

/// Follows the indexer's events into the saga store.
pub struct Monitor {
    store: Arc<SagaStore>,
    indexer: Indexer,
    wake: Arc<tokio::sync::Notify>,
    /// Wait before the next attempt after a failure.
    backoff: Duration,
}

impl Monitor {
    /// A monitor waking `wake` whenever something a withdrawal watches changes.
    pub fn new(store: Arc<SagaStore>, indexer: Indexer, wake: Arc<tokio::sync::Notify>) -> Monitor {
        Monitor {
            store,
            indexer,
            wake,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Follows the stream for good, reconnecting with backoff after any failure.
    pub async fn run(mut self) {
        loop {
            match self.follow().await {
                Ok(()) => tracing::info!("the indexer ended the event stream; following again"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?self.backoff, "following the indexer's events")
                }
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Subscribes from the stored offset (or the present) and applies events until the
    /// stream ends or fails.
    pub async fn follow(&mut self) -> Result<(), MonitorError> {
        let from = match self.store.cursor()? {
            Some(from) => from,
            None => self.reconcile().await?,
        };
        let log_id = self.store.log_id()?;
        let (mut stream, from) = match self.subscribe(from, log_id).await {
            // Pruned, past the end of the log, or another log (a rebuilt index): start
            // again from the present.
            Err(s)
                if matches!(
                    s.code(),
                    Code::OutOfRange | Code::InvalidArgument | Code::FailedPrecondition
                ) =>
            {
                tracing::warn!(
                    from,
                    reason = s.message(),
                    "resuming the indexer's events from the present"
                );
                let from = self.reconcile().await?;
                let log_id = self.store.log_id()?;
                (self.subscribe(from, log_id).await?, from)
            }
            other => (other?, from),
        };
        let mut cursor = from;
        loop {
            let Some(first) = stream.message().await? else {
                return Ok(());
            };
            let mut seen = Observation {
                cursor,
                ..Observation::default()
            };
            apply(&mut seen, &first)?;
            // Take what has already arrived, then write it in one batch.
            let mut ended = None;
            for _ in 1..BATCH {
                match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(Ok(Some(e))) => apply(&mut seen, &e)?,
                    Ok(Ok(None)) => {
                        ended = Some(Ok(()));
                        break;
                    }
                    Ok(Err(s)) => {
                        ended = Some(Err(s.into()));
                        break;
                    }
                    Err(_) => break, // nothing more ready
                }
            }
            cursor = seen.cursor;
            let observed = self.store.observe(&seen)?;
            // Progress, not a mere connection, resets the backoff: a stream that fails at
            // once every time must not be retried every 200 ms for good.
            self.backoff = FIRST_BACKOFF;
            if observed {
                self.wake.notify_one();
            }
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// The stream from `from` in the log the store's cursor belongs to.
    async fn subscribe(
        &mut self,
        from: u64,
        log_id: String,
    ) -> Result<tonic::Streaming<ipb::Event>, tonic::Status> {
        Ok(self
            .indexer
            .subscribe(ipb::SubscribeRequest {
                from_offset: from,
                log_id,
            })
            .await?
            .into_inner())
    }

    async fn reconcile(&mut self) -> Result<u64, MonitorError> {
        reconcile(&self.store, &mut self.indexer, &self.wake).await
    }
}

/// Reads the present state of every watched txid and records it with the log offset read
/// with the tip (dropping any position in an older log); returns that offset. Replaying
/// the events from there lands in the same state.
pub async fn reconcile(
    store: &SagaStore,
    indexer: &mut Indexer,
    wake: &tokio::sync::Notify,
) -> Result<u64, MonitorError> {
    let tip = indexer.get_tip(ipb::GetTipRequest {}).await?.into_inner();
    let mut seen = Observation {
        cursor: tip.next_offset,
        log_id: Some(tip.log_id.clone()),
        tip: Some(tip.height),
        ..Observation::default()
    };
    for txid in store.watched_txids()? {
        let height = indexer_client::confirmed_height(indexer, &txid).await?;
        // Read after the tip: a block above it that confirms a watched txid means the
        // tip was at least there.
        if let Some(h) = height {
            seen.tip = seen.tip.max(Some(h));
        }
        seen.txs.insert(txid, height);
    }
    tracing::info!(
        tip = tip.height,
        offset = tip.next_offset,
        watched = seen.txs.len(),
        "read the chain's present state"
    );
    store.observe(&seen)?;
    wake.notify_one();
    Ok(seen.cursor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    fn event(offset: u64, kind: ipb::EventKind, height: u32, txid: Option<Txid>) -> ipb::Event {
        ipb::Event {
            offset,
            kind: kind.into(),
            height,
            block_hash: String::new(),
            txid: txid.map(|t| t.to_string()).unwrap_or_default(),
            wallets: Vec::new(),
        }
    }

    #[test]
    fn events_leave_the_latest_state_of_each_txid_and_the_tip() {
        let (a, b) = (
            Txid::from_byte_array([1; 32]),
            Txid::from_byte_array([2; 32]),
        );
        let mut seen = Observation {
            cursor: 10,
            ..Observation::default()
        };
        use ipb::EventKind::*;
        for e in [
            event(10, BlockConnected, 100, None),
            event(11, TransferConfirmed, 100, Some(a)),
            event(12, TransferConfirmed, 100, Some(b)),
            event(13, TransferSeen, 100, Some(b)),
            // A reorg of block 100: its transfers leave first, then the block.
            event(14, TransferReorgedOut, 100, Some(a)),
            event(15, TransferReorgedOut, 100, Some(b)),
            event(16, BlockDisconnected, 100, None),
            event(17, BlockConnected, 100, None),
            event(18, BlockConnected, 101, None),
            event(19, TransferConfirmed, 101, Some(a)),
        ] {
            apply(&mut seen, &e).unwrap();
        }
        assert_eq!(seen.cursor, 20);
        assert_eq!(seen.tip, Some(101));
        assert_eq!(seen.txs[&a], Some(101));
        assert_eq!(seen.txs[&b], None);
        let mut disconnected = Observation::default();
        apply(&mut disconnected, &event(0, BlockDisconnected, 7, None)).unwrap();
        assert_eq!(disconnected.tip, Some(6));
    }

    #[test]
    fn nonsense_events_are_refused() {
        let mut seen = Observation {
            cursor: 5,
            ..Observation::default()
        };
        let back = event(4, ipb::EventKind::BlockConnected, 1, None);
        assert!(matches!(
            apply(&mut seen, &back),
            Err(MonitorError::BadEvent { offset: 4, .. })
        ));
        let mut bad_txid = event(5, ipb::EventKind::TransferConfirmed, 1, None);
        bad_txid.txid = "xyz".into();
        assert!(apply(&mut seen, &bad_txid).is_err());
        let genesis_gone = event(5, ipb::EventKind::BlockDisconnected, 0, None);
        assert!(apply(&mut seen, &genesis_gone).is_err());
        assert_eq!(
            seen,
            Observation {
                cursor: 5,
                ..Observation::default()
            }
        );
    }
}
