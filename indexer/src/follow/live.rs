//! Following the tip live: from ZMQ notices, a block that extends the tip goes straight to
//! a long-lived pipeline, and anything ZMQ cannot vouch for hands back to reconciliation
//! over RPC (one handler per kind of notice); without ZMQ, polling bitcoind's tip.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::{block, BlockHash, Txid};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use tracing::{debug, warn};

use super::{FollowError, Follower};
use crate::pipeline::parse::RawBlock;
use crate::pipeline::{self, PipelineOptions, Progress};
use crate::store::Reader;
use crate::zmq_feed::{Feed, Notice, SequenceEvent, Topic};

/// Why the live loop handed back to reconciliation.
pub(super) enum LiveExit {
    Stop,
    Reconcile(&'static str),
}

/// Longest a live block holds up mempool notices while it is indexed.
const BLOCK_FIRST_LIMIT: Duration = Duration::from_secs(2);

/// What the notice loop knows between notices.
struct Live<'a> {
    /// The newest block handed to the pipeline.
    tip: (u32, BlockHash),
    /// A new tip announced by hash, and since when it waits for its block.
    announced: Option<(BlockHash, Instant)>,
    /// The last notice about blocks (their silence is checked against bitcoind).
    last_block_news: Instant,
    blocks: Sender<RawBlock>,
    committed: &'a Receiver<u32>,
}

/// What one notice asks of the loop.
type Step = Result<Option<LiveExit>, FollowError>;

/// Waits until `committed` reports `height` (or `limit` passes, or the pipeline ended:
/// the notice loop finds out about those on its own); whether it was committed.
fn await_commit(committed: &Receiver<u32>, height: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while let Ok(h) = committed.recv_deadline(deadline) {
        if h >= height {
            return true;
        }
    }
    false
}

impl Follower {
    /// Stays on the tip until something needs reconciling.
    pub(super) fn live(&self) -> Result<LiveExit, FollowError> {
        let Some(tip) = self.store.tip()? else {
            return Ok(LiveExit::Reconcile("the index is empty"));
        };
        let Some(notices) = &self.notices else {
            return self.poll(tip);
        };
        // A long-lived pipeline: each block from ZMQ is parsed, applied and committed on
        // its own, with the watched state kept in memory between blocks.
        let (blocks, source) = bounded::<RawBlock>(8);
        let opts = PipelineOptions {
            chunk_bytes: 0,
            ..self.opts.pipeline
        };
        // Heights as they commit, so the notice loop can wait for a block it handed over.
        let (committed_tx, committed) = bounded::<u32>(64);
        let scripts = self.scripts();
        // Set when a stage fails (a block that failed its checks): the feed below and the
        // notice loop must then end and reconcile, rather than wait for a next block.
        let failed = AtomicBool::new(false);
        let feed = std::iter::from_fn(|| loop {
            match source.recv_timeout(Duration::from_millis(50)) {
                Ok(block) => return Some(Ok(block)),
                Err(RecvTimeoutError::Timeout) if !failed.load(Ordering::Relaxed) => {}
                Err(_) => return None,
            }
        });
        // The pipeline's write stage is the event log's one writer while it runs: the
        // mempool's changes go to it, between blocks.
        let (events_tx, events) = bounded(64);
        self.mempool.log_through(Some(events_tx));
        std::thread::scope(|s| {
            let pipeline = std::thread::Builder::new()
                .name("live".into())
                .spawn_scoped(s, || {
                    let on_commit = self.counting();
                    pipeline::run_observed(
                        &self.store,
                        &scripts,
                        feed,
                        &opts,
                        &move |p: &Progress| {
                            on_commit(p);
                            let _ = committed_tx.try_send(p.height);
                        },
                        pipeline::Hooks {
                            queues: &self.metrics.queues,
                            failed: &failed,
                            events: &events,
                        },
                    )
                })
                .expect("spawn live pipeline");
            let exit = self.follow_notices(notices, blocks, &committed, &failed, tip);
            let ended = pipeline.join().expect("live pipeline panicked");
            // The pipeline is gone: this thread writes the log again, starting with what a
            // write stage that failed left unwritten.
            self.mempool.log_through(None);
            for left in events.try_iter() {
                self.mempool.append(&left)?;
            }
            match ended {
                // A block that failed its checks: bitcoind will tell the truth.
                Err(e) => {
                    warn!(error = %e, "a block from ZMQ failed; reconciling over RPC");
                    exit.map(|_| LiveExit::Reconcile("a block from ZMQ failed"))
                }
                Ok(_) => exit,
            }
        })
    }

    /// Without ZMQ: asks bitcoind for its tip every `poll_interval`.
    fn poll(&self, tip: (u32, BlockHash)) -> Result<LiveExit, FollowError> {
        loop {
            self.pause(self.opts.poll_interval);
            if self.stopping() {
                return Ok(LiveExit::Stop);
            }
            if self.between_blocks_waiting() {
                return Ok(LiveExit::Reconcile("watched scripts were added"));
            }
            if self.daemon.best_block_hash()? != tip.1 {
                return Ok(LiveExit::Reconcile("bitcoind's tip changed"));
            }
            self.mempool.resync(&self.scripts())?;
        }
    }

    /// Feeds blocks that extend the tip to the live pipeline (`blocks`, dropped on return).
    pub(super) fn follow_notices(
        &self,
        notices: &Feed,
        blocks: Sender<RawBlock>,
        committed: &Receiver<u32>,
        pipeline_failed: &AtomicBool,
        tip: (u32, BlockHash),
    ) -> Result<LiveExit, FollowError> {
        let mut live = Live {
            tip,
            announced: None,
            last_block_news: Instant::now(),
            blocks,
            committed,
        };
        loop {
            if self.stopping() {
                return Ok(LiveExit::Stop);
            }
            if pipeline_failed.load(Ordering::Relaxed) {
                return Ok(LiveExit::Reconcile("a block failed in the live pipeline"));
            }
            let step = match notices.recv_timeout(Duration::from_millis(100)) {
                Ok(notice) => self.on_notice(notice, notices, &mut live),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                // The ZMQ thread also ends when asked to stop.
                Err(RecvTimeoutError::Disconnected) if self.stopping() => Ok(Some(LiveExit::Stop)),
                Err(RecvTimeoutError::Disconnected) => Err(FollowError::ZmqStopped),
            };
            if let Some(exit) = step? {
                return Ok(exit);
            }
            if let Some(exit) = self.between_notices(&mut live)? {
                return Ok(exit);
            }
        }
    }

    /// Hands one notice to its handler.
    fn on_notice(&self, notice: Notice, notices: &Feed, live: &mut Live) -> Step {
        if matches!(
            notice,
            Notice::RawBlock(_)
                | Notice::HashBlock(_)
                | Notice::Sequence(SequenceEvent::Connected(_) | SequenceEvent::Disconnected(_))
        ) {
            live.last_block_news = Instant::now();
        }
        match notice {
            Notice::RawBlock(bytes) => self.on_raw_block(bytes, live),
            Notice::HashBlock(hash) | Notice::Sequence(SequenceEvent::Connected(hash)) => {
                if hash != live.tip.1 && live.announced.is_none() {
                    live.announced = Some((hash, Instant::now()));
                }
                Ok(None)
            }
            Notice::Sequence(SequenceEvent::Disconnected(_)) => {
                Ok(Some(LiveExit::Reconcile("bitcoind disconnected a block")))
            }
            Notice::Gap {
                topic,
                expected,
                got,
            } => Ok(self.on_gap(topic, expected, got)),
            Notice::Garbage { endpoint, reason } => {
                warn!(%endpoint, %reason, "malformed ZMQ message dropped");
                Ok(None)
            }
            Notice::RawTx(bytes) => {
                self.mempool.raw_tx(bytes)?;
                Ok(None)
            }
            Notice::Sequence(SequenceEvent::Added(txid, _)) => {
                self.on_mempool_entry(txid, notices)?;
                Ok(None)
            }
            Notice::Sequence(SequenceEvent::Removed(txid, _)) => {
                self.mempool.removed(txid);
                Ok(None)
            }
        }
    }

    /// A new block: to the pipeline when it extends the tip, else reconcile.
    fn on_raw_block(&self, bytes: Vec<u8>, live: &mut Live) -> Step {
        let taken = Instant::now();
        let Ok(header) = deserialize::<block::Header>(&bytes[..80]) else {
            warn!("ZMQ rawblock with an unreadable header dropped");
            return Ok(None);
        };
        let hash = header.block_hash();
        if hash == live.tip.1 {
            return Ok(None); // already have it
        }
        if header.prev_blockhash != live.tip.1 {
            return Ok(Some(LiveExit::Reconcile(
                "a block that does not extend the tip",
            )));
        }
        if header.validate_pow(header.target()).is_err() {
            warn!(%hash, "ZMQ rawblock without valid proof of work dropped");
            return Ok(None);
        }
        // The block goes to the pipeline first: the mempool's view of it is only needed
        // while watched transactions are pending.
        let kept = (!self.mempool.is_empty()).then(|| bytes.clone());
        let block = RawBlock {
            height: live.tip.0 + 1,
            hash,
            bytes,
            origin: format!("ZMQ rawblock {hash}"),
        };
        if live.blocks.send(block).is_err() {
            return Ok(Some(LiveExit::Reconcile("the live pipeline stopped")));
        }
        live.tip = (live.tip.0 + 1, hash);
        // bitcoind announces its new tip.
        self.metrics.bitcoind_height.set(i64::from(live.tip.0));
        // The block first: what it mined out of the mempool, and the transactions bitcoind
        // announced with it, wait until it is indexed (decoding and hashing thousands of
        // them alongside took the cores the block's parse needs).
        if await_commit(live.committed, live.tip.0, BLOCK_FIRST_LIMIT) {
            let latency = taken.elapsed().as_secs_f64();
            self.metrics.tip_latency.observe(latency);
        }
        if let Some(mined) = kept.and_then(|b| deserialize::<bitcoin::Block>(&b).ok()) {
            self.mempool.mined(&mined)?;
        }
        Ok(None)
    }

    /// Lost messages: on `rawtx` expected, else reconcile.
    fn on_gap(&self, topic: Topic, expected: u32, got: u32) -> Option<LiveExit> {
        self.metrics.zmq_gap(topic);
        if topic == Topic::RawTx {
            // Expected when a block's burst of transactions overflows a queue; `sequence`
            // still says what entered the mempool, and missing bodies are fetched over RPC.
            debug!(expected, got, "rawtx messages were lost");
            return None;
        }
        warn!(
            topic = topic.name(),
            expected, got, "ZMQ messages were lost"
        );
        Some(LiveExit::Reconcile("ZMQ messages were lost"))
    }

    /// `sequence` says `txid` entered the mempool.
    fn on_mempool_entry(&self, txid: Txid, notices: &Feed) -> Result<(), FollowError> {
        if !self.mempool.has_body(&txid) {
            // Its body travels on the other socket: take what came.
            while let Some(notice) = notices.try_recv_tx() {
                match notice {
                    Notice::RawTx(bytes) => self.mempool.raw_tx(bytes)?,
                    Notice::Garbage { endpoint, reason } => {
                        warn!(%endpoint, %reason, "malformed ZMQ message dropped")
                    }
                    _ => {} // rawtx gaps: see `on_gap`
                }
            }
        }
        Ok(self.mempool.entered(txid, &self.scripts())?)
    }

    /// Checks made after every notice or quiet spell: expired mempool removals, waiting
    /// `AddWatch`es, a tip announced without its block, and ZMQ silence.
    fn between_notices(&self, live: &mut Live) -> Step {
        self.mempool.expire()?;
        if self.between_blocks_waiting() {
            return Ok(Some(LiveExit::Reconcile("watched scripts were added")));
        }
        if let Some((hash, since)) = live.announced {
            if hash == live.tip.1 {
                live.announced = None;
            } else if since.elapsed() >= self.opts.announce_grace {
                return Ok(Some(LiveExit::Reconcile(
                    "a new tip was announced without its block",
                )));
            }
        }
        if live.last_block_news.elapsed() >= self.opts.zmq_silence {
            live.last_block_news = Instant::now();
            if self.daemon.best_block_hash()? != live.tip.1 {
                warn!("ZMQ was silent while bitcoind's tip moved; reconciling");
                return Ok(Some(LiveExit::Reconcile("ZMQ silence")));
            }
        }
        Ok(None)
    }
}
