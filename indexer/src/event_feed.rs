//! `Subscribe`'s plumbing: one reader of the event log for every live subscriber.
//!
//! After each commit, a single tail task reads the new events once, converts them once,
//! and broadcasts them as shared chunks. A subscriber first replays the log from its offset
//! out of the database on its own, then takes the shared chunks; one that falls so far
//! behind that the broadcast ring dropped chunks it had not read goes back to the
//! database from its own offset. Memory is bounded either way: the ring holds at most
//! `RING` chunks of at most `CHUNK` events, and each subscriber's queue `QUEUE` chunks,
//! so a slow consumer holds back only itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bitcoin::Network;
use proto::indexer::v1 as pb;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;

use crate::convert;
use crate::query::{Query, QueryError};
use crate::store::{Reader, Store};

/// Events in one chunk, at most.
const CHUNK: usize = 1024;
/// Chunks the broadcast ring keeps for subscribers that are behind.
const RING: usize = 64;
/// Chunks queued for one subscriber's connection.
const QUEUE: usize = 4;
/// How often the tail looks for new events when no commit wakes it (commits through this
/// process's store wake it at once; this covers another writer of the same database).
const POLL: Duration = Duration::from_secs(1);

/// Consecutive events of the log, converted for the wire.
type Chunk = Arc<Vec<pb::Event>>;

/// The shared tail of one database's event log.
pub struct EventFeed {
    store: Arc<Store>,
    network: Network,
    chunks: broadcast::Sender<Chunk>,
    stopping: watch::Receiver<bool>,
    /// Events per chunk, at most.
    chunk: usize,
}

impl EventFeed {
    /// Starts the tail task on the current runtime; it ends when `stopping` turns true.
    pub fn start(
        store: Arc<Store>,
        network: Network,
        stopping: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Self::start_sized(store, network, stopping, CHUNK, RING, true)
    }

    fn start_sized(
        store: Arc<Store>,
        network: Network,
        stopping: watch::Receiver<bool>,
        chunk: usize,
        ring: usize,
        with_tail: bool,
    ) -> Arc<Self> {
        // Where the log ends now, read before any subscriber can replay past it. Should it
        // fail, 0 only makes the tail's first broadcast long: subscribers skip what they
        // already have.
        let next = store.next_event().unwrap_or(0);
        let (chunks, _) = broadcast::channel(ring);
        let feed = Arc::new(EventFeed {
            store,
            network,
            chunks,
            stopping,
            chunk,
        });
        if with_tail {
            tokio::spawn(feed.clone().tail(next));
        }
        feed
    }

    async fn tail(self: Arc<Self>, mut next: u64) {
        let mut commits = self.store.commits();
        let mut stopping = self.stopping.clone();
        loop {
            loop {
                let chunk = match self.read_events(next, self.chunk).await {
                    Ok(c) => c,
                    // Pruned under it (a tiny retention): subscribers that need the gap
                    // read it themselves and get the error.
                    Err(ReadError::Query(QueryError::Pruned { first, .. })) => {
                        next = first;
                        continue;
                    }
                    // Retried after the pause below; subscribers meanwhile read the
                    // database themselves when no chunk comes.
                    Err(e) => {
                        tracing::warn!(error = %e, next, "the event feed cannot read the log; retrying");
                        break;
                    }
                };
                let Some(last) = chunk.last() else { break };
                next = last.offset + 1;
                // No receiver is fine: nobody is subscribed right now.
                let _ = self.chunks.send(Arc::new(chunk));
            }
            tokio::select! {
                _ = commits.changed() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    }

    /// Up to `max` events from `from`, converted, as a status on failure.
    async fn read(&self, from: u64, max: usize) -> Result<Vec<pb::Event>, Status> {
        match self.read_events(from, max).await {
            Ok(events) => Ok(events),
            Err(ReadError::Query(e)) => Err(e.into()),
            Err(ReadError::Task(e)) => Err(Status::internal(format!("event task failed: {e}"))),
        }
    }

    /// Up to `max` events from `from`, converted, read off the async threads.
    async fn read_events(&self, from: u64, max: usize) -> Result<Vec<pb::Event>, ReadError> {
        let (store, network) = (self.store.clone(), self.network);
        let (events, names) = tokio::task::spawn_blocking(move || {
            let query = Query::new(&store, network)?;
            Ok((query.events(from, max)?, query.wallet_names()?))
        })
        .await
        .map_err(ReadError::Task)?
        .map_err(ReadError::Query)?;
        Ok(events
            .into_iter()
            .map(|(offset, e)| convert::event(offset, e, &names))
            .collect())
    }

    /// The log from `from` on, then live. A pruned or future offset is refused here, as a
    /// status, rather than as a stream that breaks later.
    /// `open` lives as long as the subscription (a metrics guard, for one).
    pub async fn subscribe<G: Send + 'static>(
        self: &Arc<Self>,
        from: u64,
        open: G,
    ) -> Result<EventStream, Status> {
        // Listen before replaying, so nothing committed meanwhile falls between the two.
        let live = self.chunks.subscribe();
        let first = self.read(from, self.chunk).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let feed = self.clone();
        tokio::spawn(async move {
            feed.serve(from, first, live, tx).await;
            drop(open);
        });
        Ok(EventStream { rx, current: None })
    }

    /// Feeds one subscriber: replay, then shared chunks, back to the database when lagging.
    async fn serve(
        self: Arc<Self>,
        mut next: u64,
        mut first: Vec<pb::Event>,
        mut live: broadcast::Receiver<Chunk>,
        tx: mpsc::Sender<Item>,
    ) {
        let mut stopping = self.stopping.clone();
        let send = |item: Item| deliver(&tx, &self.stopping, item);
        // Replay from the database until it has nothing newer.
        while let Some(last) = first.last() {
            next = last.offset + 1;
            if !send(Ok((Arc::new(first), 0))).await {
                return;
            }
            first = match self.read(next, self.chunk).await {
                Ok(c) => c,
                Err(s) => {
                    let _ = send(Err(s)).await;
                    return;
                }
            };
        }
        loop {
            let received = tokio::select! {
                r = live.recv() => Wake::Chunk(r),
                _ = stopping.wait_for(|s| *s) => Wake::Stop,
                _ = tx.closed() => return, // the consumer left
                _ = tokio::time::sleep(POLL) => Wake::Quiet,
            };
            let received = match received {
                Wake::Chunk(r) => r,
                Wake::Stop => {
                    // Not `send`: it would race the stop flag, already set, and lose. A
                    // consumer whose queue is full is not reading and needs no status.
                    let _ = tx.try_send(Err(Status::unavailable("the server is shutting down")));
                    return;
                }
                // Quiet for a while: should the tail have stopped broadcasting, read what
                // the log has beyond `next` directly, so no subscriber waits for good.
                Wake::Quiet => {
                    // One point read when nothing was committed (the usual case between
                    // blocks), not a snapshot and a seek per subscriber.
                    if self.store.next_event().is_ok_and(|end| end <= next) {
                        continue;
                    }
                    if !self.replay(&mut next, u64::MAX, &tx).await {
                        return;
                    }
                    continue;
                }
            };
            match received {
                Ok(chunk) => {
                    let Some(first_offset) = chunk.first().map(|e| e.offset) else {
                        continue;
                    };
                    if first_offset > next {
                        // Missed a stretch (never expected): fill it from the database.
                        if !self.replay(&mut next, first_offset, &tx).await {
                            return;
                        }
                    }
                    let skip = chunk.iter().take_while(|e| e.offset < next).count();
                    if skip == chunk.len() {
                        continue;
                    }
                    next = chunk.last().map_or(next, |e| e.offset + 1);
                    if !send(Ok((chunk, skip))).await {
                        return;
                    }
                }
                // Too slow for the ring: catch up from the database, then rejoin.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if !self.replay(&mut next, u64::MAX, &tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Sends the database's events from `*next` up to `until` (exclusive) or the log's end;
    /// false when the subscription is over.
    async fn replay(&self, next: &mut u64, until: u64, tx: &mpsc::Sender<Item>) -> bool {
        loop {
            let max = (until.saturating_sub(*next)).min(self.chunk as u64) as usize;
            if max == 0 {
                return true;
            }
            let chunk = match self.read(*next, max).await {
                Ok(c) => c,
                Err(s) => {
                    let _ = deliver(tx, &self.stopping, Err(s)).await;
                    return false;
                }
            };
            let Some(last) = chunk.last() else {
                return true;
            };
            *next = last.offset + 1;
            if !deliver(tx, &self.stopping, Ok((Arc::new(chunk), 0))).await {
                return false;
            }
        }
    }
}

/// Queues `item` for a subscriber; false when it left or the server is stopping (a
/// consumer that stopped reading must not hold up shutdown).
async fn deliver(tx: &mpsc::Sender<Item>, stopping: &watch::Receiver<bool>, item: Item) -> bool {
    let mut stopping = stopping.clone();
    tokio::select! {
        sent = tx.send(item) => sent.is_ok(),
        _ = stopping.wait_for(|s| *s) => false,
    }
}

/// What woke a subscriber's task.
enum Wake {
    /// The tail broadcast a chunk (or the ring moved past this subscriber).
    Chunk(Result<Chunk, broadcast::error::RecvError>),
    /// The server is stopping.
    Stop,
    /// Nothing came for `POLL`.
    Quiet,
}

/// Why reading the log failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The query failed (a pruned or future offset, the database).
    #[error(transparent)]
    Query(QueryError),
    /// The blocking task died.
    #[error("event task failed: {0}")]
    Task(tokio::task::JoinError),
}

/// A chunk and the index of its first event not yet sent, or the status that ends the
/// subscription.
type Item = Result<(Chunk, usize), Status>;

/// The events of one subscription, one at a time, from queued chunks.
pub struct EventStream {
    rx: mpsc::Receiver<Item>,
    current: Option<(Chunk, usize)>,
}

impl tokio_stream::Stream for EventStream {
    type Item = Result<pb::Event, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some((chunk, i)) = &mut self.current {
                if let Some(e) = chunk.get(*i) {
                    *i += 1;
                    return Poll::Ready(Some(Ok(e.clone())));
                }
                self.current = None;
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(chunk))) => self.current = Some(chunk),
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Batch;
    use crate::types::{Event, EventKind};
    use bitcoin::hashes::Hash;
    use tokio_stream::StreamExt;

    /// Commits `n` block events at heights from `height` on.
    fn commit(store: &Store, height: u32, n: u32) {
        let events: Vec<Event> = (height..height + n)
            .map(|h| Event {
                wallets: Vec::new(),
                kind: EventKind::BlockConnected,
                height: h,
                block_hash: bitcoin::BlockHash::from_byte_array([h as u8; 32]),
                txid: None,
            })
            .collect();
        store
            .commit_with_events(Batch::default(), &events, None, false)
            .unwrap();
    }

    async fn take(stream: &mut EventStream, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("events keep coming")
                .unwrap()
                .unwrap();
            out.push(e.offset);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_and_lagging_subscribers_get_every_event_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Network::Regtest).unwrap());
        commit(&store, 0, 10);
        let (stop, stopping) = watch::channel(false);
        // Tiny chunks and ring, so a subscriber that does not read falls off the ring.
        let feed = EventFeed::start_sized(store.clone(), Network::Regtest, stopping, 3, 2, true);
        let mut fast = feed.subscribe(0, ()).await.unwrap();
        let mut slow = feed.subscribe(4, ()).await.unwrap();
        assert_eq!(take(&mut fast, 10).await, (0..10).collect::<Vec<_>>());
        for i in 0..50u64 {
            commit(&store, 10 + i as u32 * 4, 4);
            // The fast one keeps up as the log grows; the slow one reads nothing yet.
            let got = take(&mut fast, 4).await;
            assert_eq!(got, (10 + i * 4..14 + i * 4).collect::<Vec<_>>());
        }
        assert_eq!(take(&mut slow, 206).await, (4..210).collect::<Vec<_>>());
        commit(&store, 210, 2);
        assert_eq!(take(&mut slow, 2).await, vec![210, 211]);
        assert_eq!(take(&mut fast, 2).await, vec![210, 211]);
        // A future offset is refused at once.
        assert_eq!(
            feed.subscribe(500, ()).await.err().unwrap().code(),
            tonic::Code::InvalidArgument
        );
        // Stopping the server ends open subscriptions.
        stop.send(true).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(item) = fast.next().await {
                if let Err(status) = item {
                    return Some(status.code());
                }
            }
            None
        })
        .await;
        assert_eq!(
            ended.expect("the subscription ended"),
            Some(tonic::Code::Unavailable),
            "it ends with a status saying why"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_tail_subscribers_still_get_new_events_from_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Network::Regtest).unwrap());
        commit(&store, 0, 3);
        let (_stop, stopping) = watch::channel(false);
        // As if the tail task had died: nothing is ever broadcast.
        let feed = EventFeed::start_sized(store.clone(), Network::Regtest, stopping, 4, 2, false);
        let mut stream = feed.subscribe(1, ()).await.unwrap();
        assert_eq!(take(&mut stream, 2).await, vec![1, 2]);
        commit(&store, 3, 5);
        assert_eq!(take(&mut stream, 5).await, vec![3, 4, 5, 6, 7]);
    }
}
