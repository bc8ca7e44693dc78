//! Following bitcoind: catch up to its best chain (finding the fork point and disconnecting
//! with the undo journal when it reorganised), then stay on its tip, taking new blocks
//! straight from ZMQ `rawblock` when they extend the tip. Anything ZMQ cannot vouch for (a
//! gap in sequence numbers, a block that does not extend the tip, a disconnect, silence)
//! sends the follower back to reconciling over RPC, which is always right; ZMQ only makes it
//! fast. Without ZMQ it polls.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::{block, BlockHash, Network, Transaction, Txid};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use tracing::{debug, error, info, warn};

use crate::backfill;
use crate::daemon::zmq::{Feed, Notice, SequenceEvent, Topic};
use crate::daemon::{Daemon, DaemonError};
use crate::fetch::{FetchOptions, Prefetch};
use crate::grpc::SharedMempool;
use crate::mempool::{Change, Gone, Mempool};
use crate::metrics::IndexerMetrics;
use crate::pipeline::apply::ApplyError;
use crate::pipeline::parse::{txid_of, RawBlock};
use crate::pipeline::{self, PipelineError, PipelineOptions, Progress};
use crate::serve_priority::FlatOut;
use crate::store::{Batch, Reader, Store, StoreError};
use crate::types::{Event, EventKind};
use crate::wallets;
use crate::watching::{self, Accepted, AddWatchError, WatchRequest};
use crate::watchlist::ScriptFilter;

/// How the follower paces itself.
#[derive(Clone, Copy, Debug)]
pub struct FollowOptions {
    /// How often to ask bitcoind for its tip when ZMQ is not configured.
    pub poll_interval: Duration,
    /// With ZMQ: ask bitcoind for its tip after this long without news of a block (lost
    /// notifications cost at most this long, even while transactions keep arriving).
    pub zmq_silence: Duration,
    /// How long a block announced by hash may wait for its `rawblock` before fetching it.
    pub announce_grace: Duration,
    /// Catch-up prefetch.
    pub fetch: FetchOptions,
    /// Pipeline tuning for catch-up.
    pub pipeline: PipelineOptions,
    /// Longest wait between retries while bitcoind is unavailable.
    pub max_backoff: Duration,
    /// Least number of scripts the bloom filter is sized for, when it is rebuilt.
    pub bloom_capacity: usize,
    /// The bloom filter's false-positive rate, when it is rebuilt.
    pub bloom_fp_rate: f64,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions {
            poll_interval: Duration::from_secs(1),
            zmq_silence: Duration::from_secs(30),
            announce_grace: Duration::from_millis(500),
            fetch: FetchOptions::default(),
            pipeline: PipelineOptions::default(),
            max_backoff: Duration::from_secs(30),
            bloom_capacity: 100_000,
            bloom_fp_rate: 1e-4,
        }
    }
}

/// Why following stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// bitcoind failed in a way waiting will not fix (or it was not retried).
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The database failed, or a reorg is deeper than the undo journal.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A block failed in the pipeline.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The ZMQ thread ended.
    #[error("the ZMQ subscriber stopped")]
    ZmqStopped,
    /// Merging a backfill failed.
    #[error("backfill: {0}")]
    Backfill(#[from] backfill::BackfillError),
    /// bitcoind's chain is shorter than the index while it is still syncing.
    #[error("bitcoind is in initial block download at height {daemon}, below the index's {index}: waiting for it")]
    DaemonBehind {
        /// bitcoind's height.
        daemon: u32,
        /// The index's height.
        index: u32,
    },
}

impl FollowError {
    /// Whether trying again later may succeed: bitcoind down or restarting, or its chain
    /// moved while we read it.
    pub fn is_transient(&self) -> bool {
        match self {
            // No answer of the node ends following (see `worth_retrying`).
            FollowError::Daemon(e) => e.worth_retrying(),
            FollowError::Pipeline(PipelineError::Source(e)) => e
                .downcast_ref::<DaemonError>()
                .is_none_or(DaemonError::worth_retrying),
            // The hashes listed and the blocks fetched straddle a reorg: look again.
            FollowError::Pipeline(PipelineError::Apply(ApplyError::NotConnecting { .. })) => true,
            // A block that fails its own hash or merkle root: fetch it again.
            FollowError::Pipeline(PipelineError::Parse(_)) => true,
            FollowError::DaemonBehind { .. } => true,
            FollowError::Backfill(e) => e.is_transient(),
            FollowError::Pipeline(_) | FollowError::Store(_) | FollowError::ZmqStopped => false,
        }
    }
}

/// What one catch-up did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncReport {
    /// Blocks disconnected by reorgs.
    pub disconnected: u32,
    /// Deepest reorg seen (blocks).
    pub deepest_reorg: u32,
    /// What was connected.
    pub progress: Progress,
    /// The index's tip afterwards.
    pub tip: Option<(u32, BlockHash)>,
}

/// Follows one bitcoind into one database.
pub struct Follower {
    store: Arc<Store>,
    daemon: Arc<Daemon>,
    /// Replaced when watched scripts are added.
    scripts: RwLock<Arc<ScriptFilter>>,
    network: Network,
    opts: FollowOptions,
    stop: Arc<AtomicBool>,
    notices: Option<Feed>,
    on_commit: Arc<dyn Fn(&Progress) + Send + Sync>,
    mempool: SharedMempool,
    watch_requests: Receiver<WatchRequest>,
    backfills: backfill::Registry,
    /// Backfills indexed and waiting to be merged between two blocks.
    backfill_ready: (Sender<ReadyBackfill>, Receiver<ReadyBackfill>),
    /// Backfills whose merge must wait (bitcoind or the chain in the way), with when to
    /// try again.
    backfill_retry: std::sync::Mutex<Vec<(backfill::Job, Store, Instant)>>,
    metrics: IndexerMetrics,
}

/// A backfill indexed in its scratch database, waiting to be merged.
type ReadyBackfill = (backfill::Job, Store);

/// How long a backfill whose merge had to wait waits before the next try.
const MERGE_RETRY: Duration = Duration::from_secs(5);

/// Longest a live block holds up mempool notices while it is indexed.
const BLOCK_FIRST_LIMIT: Duration = Duration::from_secs(2);

/// A catch-up of more blocks than this runs with the serving threads yielding the CPU to
/// it ([`FlatOut`]): a few blocks take milliseconds and queries should not wait behind
/// them, while a long catch-up is where indexing speed counts.
const FLAT_OUT_BLOCKS: u32 = 10;

/// Waits until `committed` reports `height` (or `limit` passes, or the pipeline ended:
/// the notice loop finds out about those on its own).
fn await_commit(committed: &Receiver<u32>, height: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while let Ok(h) = committed.recv_deadline(deadline) {
        if h >= height {
            return;
        }
    }
}

/// Marks the follower gone when [`Follower::run`] returns or panics.
struct Alive<'a>(&'a IndexerMetrics);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.set_follower_alive(false);
    }
}

/// Why the live loop handed back to reconciliation.
enum LiveExit {
    Stop,
    Reconcile(&'static str),
}

impl Follower {
    /// A follower; `notices` is the ZMQ feed (`None`: poll), `stop` ends [`Follower::run`].
    pub fn new(
        store: Arc<Store>,
        daemon: Arc<Daemon>,
        scripts: Arc<ScriptFilter>,
        network: Network,
        opts: FollowOptions,
        stop: Arc<AtomicBool>,
        notices: Option<Feed>,
    ) -> Follower {
        Follower {
            store,
            daemon,
            scripts: RwLock::new(scripts),
            network,
            opts,
            stop,
            notices,
            on_commit: Arc::new(|_| {}),
            watch_requests: crossbeam_channel::never(),
            backfills: backfill::Registry::default(),
            backfill_ready: crossbeam_channel::unbounded(),
            backfill_retry: std::sync::Mutex::default(),
            mempool: SharedMempool::default(),
            metrics: IndexerMetrics::default(),
        }
    }

    /// Counts what it does into `metrics`.
    pub fn with_metrics(mut self, metrics: IndexerMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The commit callback of one pipeline run: the caller's, after the metrics (a run
    /// reports running totals, the counters take the increments).
    fn counting(&self) -> impl Fn(&Progress) + Send + Sync + 'static {
        let on_commit = self.on_commit.clone();
        let metrics = self.metrics.clone();
        let (blocks, txs) = (AtomicU64::new(0), AtomicU64::new(0));
        move |p: &Progress| {
            let m = &metrics;
            m.blocks_connected
                .inc_by(p.blocks - blocks.swap(p.blocks, Ordering::Relaxed));
            m.transactions
                .inc_by(p.txs - txs.swap(p.txs, Ordering::Relaxed));
            m.indexed_height.set(i64::from(p.height));
            on_commit(p);
        }
    }

    /// Takes `AddWatch` requests from `requests` and applies them between blocks; their
    /// backfills show in `backfills`.
    pub fn with_watch_requests(
        mut self,
        requests: Receiver<WatchRequest>,
        backfills: backfill::Registry,
    ) -> Self {
        self.watch_requests = requests;
        self.backfills = backfills;
        self
    }

    /// The bloom filter in force.
    fn scripts(&self) -> Arc<ScriptFilter> {
        self.scripts
            .read()
            .expect("filter lock is never poisoned")
            .clone()
    }

    /// Whether an `AddWatch` or a finished backfill waits for a pause between blocks.
    fn watch_changes_waiting(&self) -> bool {
        let now = Instant::now();
        !self.watch_requests.is_empty()
            || !self.backfill_ready.1.is_empty()
            || self
                .backfill_retry
                .lock()
                .expect("retry lock is never poisoned")
                .iter()
                .any(|(_, _, at)| *at <= now)
    }

    /// Rebuilds the bloom filter from the watched scripts.
    fn reload_filter(&self) -> Result<(), FollowError> {
        let filter = wallets::load_filter(
            &self.store,
            self.opts.bloom_capacity,
            self.opts.bloom_fp_rate,
        )?;
        *self.scripts.write().expect("filter lock is never poisoned") = Arc::new(filter);
        self.mempool_mut().forget_checked();
        Ok(())
    }

    /// Applies pending `AddWatch`es and merges finished backfills (the pipeline is idle),
    /// then reloads the filter (also when one of them failed: what was applied stays).
    fn apply_watch_changes(&self) -> Result<(), FollowError> {
        let mut changed = false;
        let mut outcome = Ok(());
        while let Ok(req) = self.watch_requests.try_recv() {
            match self.accept_watch(req) {
                Ok(c) => changed |= c,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let now = Instant::now();
        let mut due: Vec<ReadyBackfill> = self.backfill_ready.1.try_iter().collect();
        {
            let mut retry = self
                .backfill_retry
                .lock()
                .expect("retry lock is never poisoned");
            let (now_due, later): (Vec<_>, Vec<_>) =
                retry.drain(..).partition(|(_, _, at)| *at <= now);
            *retry = later;
            due.extend(now_due.into_iter().map(|(job, scratch, _)| (job, scratch)));
        }
        for (job, scratch) in due {
            if outcome.is_ok() {
                changed |= self.merge_backfill(job, scratch);
            } else {
                self.retry_merge(job, scratch);
            }
        }
        if changed {
            self.watched_more()?;
        }
        outcome
    }

    /// After scripts were added (into the filter in place): a filter that outgrew its size
    /// is rebuilt bigger, and the mempool looks at every transaction again.
    fn watched_more(&self) -> Result<(), FollowError> {
        if self.scripts().outgrown() {
            return self.reload_filter();
        }
        self.mempool_mut().forget_checked();
        Ok(())
    }

    /// Puts a backfill back for a later pause between blocks.
    fn retry_merge(&self, job: backfill::Job, scratch: Store) {
        self.backfill_retry
            .lock()
            .expect("retry lock is never poisoned")
            .push((job, scratch, Instant::now() + MERGE_RETRY));
    }

    /// One `AddWatch`: applied at once, or (new scripts with earlier history) recorded
    /// and backfilled in the background. True when the watched set changed.
    fn accept_watch(&self, req: WatchRequest) -> Result<bool, FollowError> {
        if let Some((job, script)) = self.backfilling(&req)? {
            let _ = req
                .reply
                .send(Err(AddWatchError::Backfilling { job, script }));
            return Ok(false);
        }
        let tip = self.store.tip()?.map(|(h, _)| h);
        let needs_history = matches!((req.birth_height, tip), (Some(b), Some(t)) if b <= t);
        if !needs_history {
            watching::apply(&self.store, self.network, req, Some(&self.scripts()));
            return Ok(true);
        }
        let birth = req.birth_height.unwrap_or(0);
        // A dry run checks the name and descriptors and counts the scripts.
        let dry = wallets::prepare(
            &self.store,
            self.network,
            &req.wallet,
            &req.descriptors,
            req.birth_height,
            req.gap_limit,
        );
        let counts = match dry {
            Ok(p) => p.added,
            Err(e) => {
                let _ = req.reply.send(Err(AddWatchError::Wallet(e)));
                return Ok(false);
            }
        };
        if counts.new_scripts == 0 {
            // Every script is watched already: their history is indexed, and joins.
            let added = wallets::add_into(
                &self.store,
                self.network,
                &req.wallet,
                &req.descriptors,
                req.birth_height,
                req.gap_limit,
                &self.scripts(),
            );
            let _ = req
                .reply
                .send(added.map(Accepted::from).map_err(AddWatchError::Wallet));
            return Ok(true);
        }
        // The dry run above accepted the descriptors: only the database can fail here.
        let scripts =
            match backfill::new_scripts(&self.store, self.network, &req.descriptors, req.gap_limit)
            {
                Ok(s) => s,
                Err(backfill::BackfillError::Wallet(e)) => {
                    let _ = req.reply.send(Err(AddWatchError::Wallet(e)));
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            };
        let job = backfill::record(
            &self.store,
            &req.wallet,
            &req.descriptors,
            birth,
            req.gap_limit,
            &scripts,
        )?;
        info!(id = job.id, wallet = %job.wallet, birth, new = counts.new_scripts, "backfilling the history of new scripts");
        let _ = req.reply.send(Ok(Accepted {
            new_scripts: counts.new_scripts,
            known_scripts: counts.known_scripts,
            backfill: Some(job.id),
        }));
        self.spawn_backfill(job);
        Ok(false)
    }

    /// A pending backfill that already covers one of `req`'s scripts, if any.
    fn backfilling(&self, req: &WatchRequest) -> Result<Option<(u64, String)>, FollowError> {
        let pending = backfill::pending(&self.store)?;
        if pending.is_empty() {
            return Ok(None);
        }
        for d in &req.descriptors {
            // Invalid descriptors are reported by the add itself.
            let Ok(expanded) = crate::watchlist::expand(d, self.network, req.gap_limit) else {
                continue;
            };
            for script in expanded.scripts {
                let hex = script.to_hex_string();
                if let Some(job) = pending.iter().find(|j| j.scripts.contains(&hex)) {
                    return Ok(Some((job.id, hex)));
                }
            }
        }
        Ok(None)
    }

    /// Restarts the backfills a previous run accepted and did not merge.
    fn resume_backfills(&self) -> Result<(), FollowError> {
        let pending = backfill::pending(&self.store)?;
        backfill::remove_orphans(&self.store, &pending);
        for job in pending {
            let running = self
                .backfills
                .lock()
                .expect("registry lock is never poisoned")
                .contains_key(&job.id);
            if !running {
                info!(id = job.id, wallet = %job.wallet, "resuming a backfill");
                self.spawn_backfill(job);
            }
        }
        Ok(())
    }

    /// Indexes a job's history in a thread of its own; the follower merges it when ready.
    fn spawn_backfill(&self, job: backfill::Job) {
        self.backfills
            .lock()
            .expect("registry lock is never poisoned")
            .insert(
                job.id,
                backfill::Status {
                    job: job.clone(),
                    height: job.birth,
                    target: job.birth,
                    state: backfill::State::Indexing,
                },
            );
        let (store, daemon, network, stop) = (
            self.store.clone(),
            self.daemon.clone(),
            self.network,
            self.stop.clone(),
        );
        let (ready, registry) = (self.backfill_ready.0.clone(), self.backfills.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("backfill-{}", job.id))
            .spawn(move || {
                let mut backoff = Duration::from_millis(250);
                let update = |height: Option<u32>, target: Option<u32>, state: Option<backfill::State>| {
                    let mut r = registry.lock().expect("registry lock is never poisoned");
                    if let Some(s) = r.get_mut(&job.id) {
                        if let Some(h) = height {
                            s.height = h;
                        }
                        if let Some(t) = target {
                            s.target = t;
                        }
                        if let Some(st) = state {
                            s.state = st;
                        }
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    let attempt = (|| {
                        let scripts = job.scripts();
                        let target = store.tip()?.map_or(job.birth, |(h, _)| h);
                        update(None, Some(target), None);
                        let dir = backfill::scratch_dir(&store, job.id);
                        backfill::index(
                            &job,
                            &scripts,
                            daemon.clone(),
                            &dir,
                            network,
                            target,
                            &stop,
                            &|h| update(Some(h), None, None),
                        )
                    })();
                    match attempt {
                        Ok(scratch) => {
                            update(None, None, Some(backfill::State::Merging));
                            let _ = ready.send((job.clone(), scratch));
                            return;
                        }
                        Err(backfill::BackfillError::Stopped) => return,
                        Err(e) if e.is_transient() => {
                            warn!(id = job.id, error = %e, retry_in = ?backoff, "backfill interrupted; retrying");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(e) => {
                            error!(id = job.id, error = %e, "backfill failed; it is retried at the next start");
                            update(None, None, Some(backfill::State::Failed(e.to_string())));
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            error!(error = %e, "could not start a backfill thread");
        }
    }

    /// Brings a finished backfill onto the index's chain and merges it. True when merged;
    /// when bitcoind or the chain got in the way, it is tried again at a later pause.
    fn merge_backfill(&self, job: backfill::Job, scratch: Store) -> bool {
        let aligned = backfill::align(&scratch, &self.store, &self.daemon, &job)
            .and_then(|()| backfill::merge(&self.store, &scratch, &job, self.network));
        let dir = scratch.path().to_owned();
        let set_state = |state: backfill::State| {
            if let Some(s) = self
                .backfills
                .lock()
                .expect("registry lock is never poisoned")
                .get_mut(&job.id)
            {
                if state == backfill::State::Done {
                    s.height = s.target.max(s.height);
                }
                s.state = state;
            }
        };
        match aligned {
            Ok(added) => {
                let filter = self.scripts();
                for script in job.scripts() {
                    filter.insert(script.as_bytes());
                }
                info!(id = job.id, wallet = %job.wallet, new = added.new_scripts, "backfill merged: the scripts are watched with their history");
                set_state(backfill::State::Done);
                drop(scratch);
                backfill::remove_scratch(&dir);
                true
            }
            Err(e) if e.is_transient() => {
                warn!(id = job.id, error = %e, retry_in = ?MERGE_RETRY, "merging a backfill must wait");
                self.retry_merge(job, scratch);
                false
            }
            Err(e) => {
                error!(id = job.id, error = %e, "merging a backfill failed; it is retried at the next start");
                set_state(backfill::State::Failed(e.to_string()));
                drop(scratch);
                backfill::remove_scratch(&dir);
                false
            }
        }
    }

    /// The mempool tracker this follower keeps (share it with the gRPC server).
    pub fn mempool(&self) -> SharedMempool {
        self.mempool.clone()
    }

    fn mempool_mut(&self) -> std::sync::RwLockWriteGuard<'_, Mempool> {
        self.mempool
            .write()
            .expect("mempool lock is never poisoned")
    }

    /// Appends mempool changes to the event log (at the current tip).
    fn log_changes(&self, changes: Vec<Change>) -> Result<(), FollowError> {
        if changes.is_empty() {
            return Ok(());
        }
        let Some((height, block_hash)) = self.store.tip()? else {
            return Ok(());
        };
        let events: Vec<Event> = changes
            .iter()
            .map(|c| {
                let (kind, txid) = match c {
                    Change::Seen(t) => (EventKind::TransferSeen, *t),
                    Change::Gone(t, Gone::Replaced { by }) => {
                        info!(txid = %t, by = %by, "a watched mempool transaction was replaced");
                        (EventKind::TransferReplaced, *t)
                    }
                    Change::Gone(t, Gone::Evicted) => {
                        info!(txid = %t, "a watched mempool transaction was evicted");
                        (EventKind::TransferEvicted, *t)
                    }
                };
                Event {
                    kind,
                    height,
                    block_hash,
                    txid: Some(txid),
                }
            })
            .collect();
        self.store.commit_with_events(
            Batch::default(),
            &events,
            self.opts.pipeline.write.event_retention,
            false,
        )?;
        Ok(())
    }

    /// Tracks `tx`, which just entered bitcoind's mempool.
    fn mempool_added(&self, tx: &Transaction) -> Result<(), FollowError> {
        let scripts = self.scripts();
        let changes = self.mempool_mut().added(&self.store, &scripts, tx)?;
        self.log_changes(changes)
    }

    /// A transaction from `rawtx` (entering the mempool, or in a block: bitcoind announces
    /// every transaction of every block before the block itself): replaces any pending
    /// watched transaction it conflicts with, and is kept until `sequence` tells where it
    /// went. Only its txid is computed while nothing is pending, so a block's thousands of
    /// announcements do not hold up the block behind them.
    fn on_raw_tx(
        &self,
        bytes: Vec<u8>,
        raw_txs: &mut HashMap<Txid, Vec<u8>>,
    ) -> Result<(), FollowError> {
        let txid = match txid_of(&bytes) {
            Ok(txid) => txid,
            Err(e) => {
                warn!(error = %e, "ZMQ rawtx that does not decode dropped");
                return Ok(());
            }
        };
        if !self.mempool_mut().is_empty() {
            if let Ok(tx) = deserialize::<Transaction>(&bytes) {
                let changes = self.mempool_mut().conflicts(&tx);
                self.log_changes(changes)?;
            }
        }
        if raw_txs.len() >= 50_000 {
            raw_txs.clear(); // bounded; a miss costs one RPC call
        }
        raw_txs.insert(txid, bytes);
        Ok(())
    }

    /// Re-reads bitcoind's whole mempool: at start, after lost messages and after reorgs.
    fn resync_mempool(&self) -> Result<(), FollowError> {
        let in_mempool: HashSet<Txid> = self.daemon.raw_mempool()?.into_iter().collect();
        let (changes, new) = self
            .mempool_mut()
            .reconcile(&self.store, &in_mempool, |s, t| s.has_transfer(t))?;
        self.log_changes(changes)?;
        for chunk in new.chunks(500) {
            for raw in self
                .daemon
                .mempool_transactions(chunk)?
                .into_iter()
                .flatten()
            {
                match deserialize::<Transaction>(&raw) {
                    Ok(tx) => self.mempool_added(&tx)?,
                    Err(e) => warn!(error = %e, "bitcoind sent an unreadable mempool transaction"),
                }
            }
        }
        Ok(())
    }

    /// Calls `f` after every committed group of blocks (progress bars, metrics).
    pub fn on_commit(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        self.on_commit = Arc::new(f);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, waking early when asked to stop.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopping() && Instant::now() < until && !self.watch_changes_waiting() {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }

    /// Brings the index onto bitcoind's best chain, up to height `to` when given: finds the
    /// fork point, disconnects what bitcoind no longer has, fetches and connects the rest.
    pub fn sync(&self, to: Option<u32>) -> Result<SyncReport, FollowError> {
        let mut report = SyncReport::default();
        loop {
            let info = self.daemon.chain_info(self.network)?;
            self.metrics.bitcoind_height.set(i64::from(info.blocks));
            self.metrics
                .blocks_over_rest
                .set(i64::from(self.daemon.rest_in_use()));
            let tip = self.store.tip()?;
            let at_tip =
                tip.is_some_and(|(h, hash)| h == info.blocks && hash == info.bestblockhash);
            if at_tip {
                self.metrics.set_caught_up();
            }
            if at_tip || tip.is_some_and(|(h, _)| to.is_some_and(|t| h >= t)) || self.stopping() {
                report.tip = tip;
                return Ok(report);
            }
            if let Some((height, _)) = tip {
                if info.initialblockdownload && height > info.blocks {
                    return Err(FollowError::DaemonBehind {
                        daemon: info.blocks,
                        index: height,
                    });
                }
            }
            let fork = self.find_fork(tip, info.blocks)?;
            if let Some((height, hash)) = tip {
                if fork.is_none_or(|f| f < height) {
                    let depth = height - fork.map_or(0, |f| f + 1) + 1;
                    warn!(depth, from = %hash, fork = ?fork, "bitcoind's chain no longer has our tip: disconnecting to the fork point");
                    let disconnected = self.store.disconnect_above(fork, true)?;
                    report.disconnected += disconnected;
                    report.deepest_reorg = report.deepest_reorg.max(depth);
                    let m = &self.metrics;
                    m.reorgs.inc();
                    m.reorg_depth.observe(f64::from(depth));
                    m.blocks_disconnected.inc_by(u64::from(disconnected));
                    m.indexed_height.set(fork.map_or(0, i64::from));
                }
            }
            let from = fork.map_or(0, |f| f + 1);
            let target = to.map_or(info.blocks, |t| t.min(info.blocks));
            if from > target {
                report.tip = self.store.tip()?;
                return Ok(report);
            }
            info!(from, to = target, "catching up from bitcoind");
            let _flat_out = (target - from >= FLAT_OUT_BLOCKS).then(FlatOut::begin);
            let source = Prefetch::new(self.daemon.clone(), from, target, self.opts.fetch);
            let stop = self.stop.clone();
            // Stopping ends the source; the pipeline commits what it already has.
            let source = source.take_while(move |_| !stop.load(Ordering::Relaxed));
            let scripts = self.scripts();
            let progress = pipeline::run_observed(
                &self.store,
                &scripts,
                source,
                &self.opts.pipeline,
                &self.counting(),
                &self.metrics.queues,
                &AtomicBool::new(false),
            )?;
            report.progress.blocks += progress.blocks;
            report.progress.bytes += progress.bytes;
            report.progress.txs += progress.txs;
            report.progress.height = progress.height;
            self.metrics
                .blocks_over_rest
                .set(i64::from(self.daemon.rest_in_use()));
        }
    }

    /// The highest height where the index and bitcoind's active chain agree (`None`: none).
    fn find_fork(
        &self,
        tip: Option<(u32, BlockHash)>,
        daemon_height: u32,
    ) -> Result<Option<u32>, FollowError> {
        let Some((tip_height, _)) = tip else {
            return Ok(None);
        };
        let mut top = tip_height.min(daemon_height);
        loop {
            let low = top.saturating_sub(31);
            let heights: Vec<u32> = (low..=top).rev().collect();
            let hashes = self.daemon.block_hashes(&heights)?;
            for (height, hash) in heights.into_iter().zip(hashes) {
                match self.store.header(height)? {
                    Some(h) if h.block_hash() == hash => return Ok(Some(height)),
                    Some(_) => {}
                    // Below the first indexed block: no common block.
                    None => return Ok(None),
                }
            }
            if low == 0 {
                return Ok(None);
            }
            top = low - 1;
        }
    }

    /// Follows bitcoind until asked to stop: reconcile, then follow the tip live; errors
    /// bitcoind may recover from are logged and retried with backoff.
    pub fn run(&self) -> Result<(), FollowError> {
        self.metrics.set_follower_alive(true);
        let _alive = Alive(&self.metrics);
        if let Some((height, _)) = self.store.tip()? {
            self.metrics.indexed_height.set(i64::from(height));
        }
        let mut backoff = Duration::from_millis(250);
        self.resume_backfills()?;
        while !self.stopping() {
            let step = self
                .apply_watch_changes()
                .and_then(|()| self.sync(None))
                .and_then(|report| {
                    if report.progress.blocks > 0 || report.disconnected > 0 {
                        info!(
                            connected = report.progress.blocks,
                            disconnected = report.disconnected,
                            tip = ?report.tip,
                            "in step with bitcoind"
                        );
                    }
                    self.resync_mempool()?;
                    self.live()
                });
            match step {
                Ok(LiveExit::Stop) => break,
                Ok(LiveExit::Reconcile(why)) => {
                    debug!(why, "reconciling with bitcoind");
                    self.metrics.reconciles.inc();
                    backoff = Duration::from_millis(250);
                }
                Err(e) if e.is_transient() => {
                    warn!(error = %e, retry_in = ?backoff, "bitcoind unavailable or changing; retrying");
                    self.pause(backoff);
                    backoff = (backoff * 2).min(self.opts.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
        // Stopped: nothing adds scripts any more, so the filter in memory is the watched
        // set at its current generation, and the next start loads it instead of a scan.
        wallets::save_filter(&self.store, &self.scripts())?;
        Ok(())
    }

    /// Stays on the tip until something needs reconciling.
    fn live(&self) -> Result<LiveExit, FollowError> {
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
                        &self.metrics.queues,
                        &failed,
                    )
                })
                .expect("spawn live pipeline");
            let exit = self.follow_notices(notices, blocks, &committed, &failed, tip);
            match pipeline.join().expect("live pipeline panicked") {
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
            if self.watch_changes_waiting() {
                return Ok(LiveExit::Reconcile("watched scripts were added"));
            }
            if self.daemon.best_block_hash()? != tip.1 {
                return Ok(LiveExit::Reconcile("bitcoind's tip changed"));
            }
            self.resync_mempool()?;
        }
    }

    /// Feeds blocks that extend the tip to the live pipeline (`blocks`, dropped on return).
    fn follow_notices(
        &self,
        notices: &Feed,
        blocks: Sender<RawBlock>,
        committed: &Receiver<u32>,
        pipeline_failed: &AtomicBool,
        mut tip: (u32, BlockHash),
    ) -> Result<LiveExit, FollowError> {
        let mut announced: Option<(BlockHash, Instant)> = None;
        let mut last_block_news = Instant::now();
        // Transactions from `rawtx`, kept until `sequence` says which entered the mempool.
        let mut raw_txs: HashMap<Txid, Vec<u8>> = HashMap::new();
        loop {
            if self.stopping() {
                return Ok(LiveExit::Stop);
            }
            if pipeline_failed.load(Ordering::Relaxed) {
                return Ok(LiveExit::Reconcile("a block failed in the live pipeline"));
            }
            match notices.recv_timeout(Duration::from_millis(100)) {
                Ok(notice) => {
                    if matches!(
                        notice,
                        Notice::RawBlock(_)
                            | Notice::HashBlock(_)
                            | Notice::Sequence(
                                SequenceEvent::Connected(_) | SequenceEvent::Disconnected(_)
                            )
                    ) {
                        last_block_news = Instant::now();
                    }
                    match notice {
                        Notice::RawBlock(bytes) => {
                            let Ok(header) = deserialize::<block::Header>(&bytes[..80]) else {
                                warn!("ZMQ rawblock with an unreadable header dropped");
                                continue;
                            };
                            let hash = header.block_hash();
                            if hash == tip.1 {
                                continue; // already have it
                            }
                            if header.prev_blockhash != tip.1 {
                                return Ok(LiveExit::Reconcile(
                                    "a block that does not extend the tip",
                                ));
                            }
                            if header.validate_pow(header.target()).is_err() {
                                warn!(%hash, "ZMQ rawblock without valid proof of work dropped");
                                continue;
                            }
                            // The block goes to the pipeline first: the mempool's view
                            // of it is only needed while watched transactions are pending.
                            let pending = !self.mempool_mut().is_empty();
                            let kept = pending.then(|| bytes.clone());
                            let block = RawBlock {
                                height: tip.0 + 1,
                                hash,
                                bytes,
                                origin: format!("ZMQ rawblock {hash}"),
                            };
                            if blocks.send(block).is_err() {
                                return Ok(LiveExit::Reconcile("the live pipeline stopped"));
                            }
                            tip = (tip.0 + 1, hash);
                            // bitcoind announces its new tip.
                            self.metrics.bitcoind_height.set(i64::from(tip.0));
                            // The block first: what it mined out of the mempool, and the
                            // transactions bitcoind announced with it, wait until it is
                            // indexed (decoding and hashing thousands of them alongside
                            // took the cores the block's parse needs).
                            await_commit(committed, tip.0, BLOCK_FIRST_LIMIT);
                            if let Some(mined) =
                                kept.and_then(|b| deserialize::<bitcoin::Block>(&b).ok())
                            {
                                let mut m = self.mempool_mut();
                                m.mined(mined.txdata.iter().map(|t| t.compute_txid()));
                                let changes: Vec<Change> =
                                    mined.txdata.iter().flat_map(|t| m.conflicts(t)).collect();
                                drop(m);
                                self.log_changes(changes)?;
                            }
                        }
                        Notice::HashBlock(hash)
                        | Notice::Sequence(SequenceEvent::Connected(hash)) => {
                            if hash != tip.1 && announced.is_none() {
                                announced = Some((hash, Instant::now()));
                            }
                        }
                        Notice::Sequence(SequenceEvent::Disconnected(_)) => {
                            return Ok(LiveExit::Reconcile("bitcoind disconnected a block"));
                        }
                        Notice::Gap {
                            topic,
                            expected,
                            got,
                        } => {
                            self.metrics.zmq_gap(topic);
                            if topic == Topic::RawTx {
                                // Expected when a block's burst of transactions overflows
                                // a queue; `sequence` still says what entered the mempool,
                                // and missing bodies are fetched over RPC.
                                debug!(expected, got, "rawtx messages were lost");
                            } else {
                                warn!(
                                    topic = topic.name(),
                                    expected, got, "ZMQ messages were lost"
                                );
                                return Ok(LiveExit::Reconcile("ZMQ messages were lost"));
                            }
                        }
                        Notice::Garbage { endpoint, reason } => {
                            warn!(%endpoint, %reason, "malformed ZMQ message dropped");
                        }
                        Notice::RawTx(bytes) => self.on_raw_tx(bytes, &mut raw_txs)?,
                        Notice::Sequence(SequenceEvent::Added(txid, _)) => {
                            if !raw_txs.contains_key(&txid) {
                                // Its body travels on the other socket: take what came.
                                while let Some(notice) = notices.try_recv_tx() {
                                    match notice {
                                        Notice::RawTx(bytes) => {
                                            self.on_raw_tx(bytes, &mut raw_txs)?
                                        }
                                        Notice::Garbage { endpoint, reason } => {
                                            warn!(%endpoint, %reason, "malformed ZMQ message dropped")
                                        }
                                        _ => {} // rawtx gaps: see above
                                    }
                                }
                            }
                            let raw = match raw_txs.remove(&txid) {
                                Some(raw) => Some(raw),
                                None => self.daemon.mempool_transaction(&txid)?,
                            };
                            match raw.map(|r| deserialize::<Transaction>(&r)) {
                                Some(Ok(tx)) => self.mempool_added(&tx)?,
                                Some(Err(e)) => {
                                    warn!(%txid, error = %e, "mempool transaction does not decode")
                                }
                                None => {} // already gone from the mempool
                            }
                        }
                        Notice::Sequence(SequenceEvent::Removed(txid, _)) => {
                            self.mempool_mut().removed(txid);
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The ZMQ thread also ends when asked to stop.
                Err(RecvTimeoutError::Disconnected) if self.stopping() => {
                    return Ok(LiveExit::Stop)
                }
                Err(RecvTimeoutError::Disconnected) => return Err(FollowError::ZmqStopped),
            }
            let expired = self.mempool_mut().expire(Instant::now());
            self.log_changes(expired)?;
            if self.watch_changes_waiting() {
                return Ok(LiveExit::Reconcile("watched scripts were added"));
            }
            if let Some((hash, since)) = announced {
                if hash == tip.1 {
                    announced = None;
                } else if since.elapsed() >= self.opts.announce_grace {
                    return Ok(LiveExit::Reconcile(
                        "a new tip was announced without its block",
                    ));
                }
            }
            if last_block_news.elapsed() >= self.opts.zmq_silence {
                last_block_news = Instant::now();
                if self.daemon.best_block_hash()? != tip.1 {
                    warn!("ZMQ was silent while bitcoind's tip moved; reconciling");
                    return Ok(LiveExit::Reconcile("ZMQ silence"));
                }
            }
        }
    }
}
