//! Following bitcoind: catch up to its best chain (finding the fork point and disconnecting
//! with the undo journal when it reorganised), then stay on its tip, taking new blocks
//! straight from ZMQ `rawblock` when they extend the tip. Anything ZMQ cannot vouch for (a
//! gap in sequence numbers, a block that does not extend the tip, a disconnect, silence)
//! sends the follower back to reconciling over RPC, which is always right; ZMQ only makes it
//! fast. Without ZMQ it polls.

mod error;
mod fork_point;
mod live;

pub use error::FollowError;
pub use fork_point::{find_fork_point, BlockSource};
use live::LiveExit;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitcoin::{BlockHash, Network};
use bitcoind::Daemon;
use crossbeam_channel::Receiver;
use tracing::{debug, info, warn};

use crate::add_watch::WatchRequest;
use crate::backfill::{self, Coordinator};
use crate::fetch::{FetchOptions, Prefetch};
use crate::mempool::{SharedMempool, Tracker};
use crate::metrics::IndexerMetrics;
use crate::pipeline::{self, PipelineOptions, Progress};
use crate::script_filter::ScriptFilter;
use crate::serve_priority::FlatOut;
use crate::store::{Reader, Store};
use crate::wallets;
use crate::zmq_feed::Feed;

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
    /// The watched part of bitcoind's mempool.
    mempool: Tracker,
    /// `AddWatch` requests and backfills, handled between blocks.
    watch: Coordinator,
    /// A bigger bloom filter being built in the background (see
    /// [`Follower::start_regrow`]).
    regrow: Mutex<Option<Regrow>>,
    metrics: IndexerMetrics,
}

/// A bigger bloom filter being built from the database beside the pipeline.
struct Regrow {
    thread: JoinHandle<Result<Option<ScriptFilter>, crate::store::StoreError>>,
    /// Ends the scan early (the follower stops).
    stop: Arc<AtomicBool>,
}

/// A catch-up of more blocks than this runs with the serving threads yielding the CPU to
/// it ([`FlatOut`]): a few blocks take milliseconds and queries should not wait behind
/// them, while a long catch-up is where indexing speed counts.
const FLAT_OUT_BLOCKS: u32 = 10;

/// Marks the follower gone when [`Follower::run`] returns or panics.
struct Alive<'a>(&'a IndexerMetrics);

impl Drop for Alive<'_> {
    fn drop(&mut self) {
        self.0.set_follower_alive(false);
    }
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
        let retention = opts.pipeline.write.event_retention;
        Follower {
            mempool: Tracker::new(store.clone(), daemon.clone(), retention),
            watch: Coordinator::new(store.clone(), daemon.clone(), network, stop.clone()),
            store,
            daemon,
            scripts: RwLock::new(scripts),
            network,
            opts,
            stop,
            notices,
            on_commit: Arc::new(|_| {}),
            regrow: Mutex::new(None),
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
        self.watch = self.watch.with_requests(requests, backfills);
        self
    }

    /// The bloom filter in force.
    fn scripts(&self) -> Arc<ScriptFilter> {
        self.scripts
            .read()
            .expect("filter lock is never poisoned")
            .clone()
    }

    /// Starts building a bigger bloom filter from the database in a thread of its own,
    /// unless one is being built. Scanning millions of scripts takes seconds, which the
    /// follower must not spend between two blocks; meanwhile the outgrown filter stays in
    /// force (still right: an overfull bloom filter only lets more outputs through to the
    /// exact lookup) and journals what is inserted into it, for the bigger one to take
    /// over ([`Follower::swap_regrown`]). Called with the pipeline idle, so every script
    /// inserted before the journal starts is committed, and seen by the scan.
    fn start_regrow(&self) {
        let mut regrow = self.regrow.lock().unwrap_or_else(|e| e.into_inner());
        if regrow.is_some() {
            return;
        }
        let current = self.scripts();
        current.start_journal();
        let store = self.store.clone();
        // Twice what it holds now (inserts, an upper bound): the estimate of the keys
        // the scan sizes by may fall short.
        let capacity = self
            .opts
            .bloom_capacity
            .max(current.len().saturating_mul(2));
        let fp_rate = self.opts.bloom_fp_rate;
        let stop = Arc::new(AtomicBool::new(false));
        let scan_stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("filter-regrow".into())
            .spawn(move || wallets::scan_filter(&store, capacity, fp_rate, &scan_stop, false));
        match spawned {
            Ok(thread) => {
                info!(
                    scripts = current.len(),
                    capacity = current.capacity(),
                    "the bloom filter outgrew its size: building a bigger one beside the pipeline"
                );
                *regrow = Some(Regrow { thread, stop });
            }
            Err(e) => {
                current.take_journal();
                warn!(error = %e, "could not start building a bigger bloom filter; tried again at the next add");
            }
        }
    }

    /// Whether a bigger bloom filter is built and waits to replace the current one.
    fn regrown(&self) -> bool {
        self.regrow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|r| r.thread.is_finished())
    }

    /// Puts a finished bigger filter in force (the pipeline is idle), with the scripts
    /// inserted into the current one while it was built.
    fn swap_regrown(&self) {
        let finished = {
            let mut regrow = self.regrow.lock().unwrap_or_else(|e| e.into_inner());
            match regrow.as_ref() {
                Some(r) if r.thread.is_finished() => regrow.take(),
                _ => None,
            }
        };
        let Some(regrow) = finished else {
            return;
        };
        let current = self.scripts();
        let journal = current.take_journal();
        match regrow.thread.join() {
            Ok(Ok(Some(bigger))) => {
                for script in &journal {
                    bigger.insert(script);
                }
                info!(
                    scripts = bigger.len(),
                    capacity = bigger.capacity(),
                    added_meanwhile = journal.len(),
                    "a bigger bloom filter is in force"
                );
                *self.scripts.write().expect("filter lock is never poisoned") = Arc::new(bigger);
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!(
                error = %e,
                "building a bigger bloom filter failed; the current one stays (more false positives) and it is tried again at the next add"
            ),
            Err(_) => warn!("building a bigger bloom filter panicked; the current one stays"),
        }
    }

    /// Ends a regrow in flight and waits for its thread (the follower stops).
    fn end_regrow(&self) {
        let regrow = self.regrow.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = regrow {
            r.stop.store(true, Ordering::Relaxed);
            let _ = r.thread.join();
            self.scripts().take_journal();
        }
    }

    /// Whether something waits for a pause between blocks: an `AddWatch`, a finished
    /// backfill or a bigger bloom filter.
    fn between_blocks_waiting(&self) -> bool {
        self.watch.waiting() || self.regrown()
    }

    /// Applies the oldest pending `AddWatch`, merges finished backfills and puts a bigger
    /// bloom filter in force (the pipeline is idle); also when one of them failed, what
    /// was applied stays.
    fn apply_watch_changes(&self) -> Result<(), FollowError> {
        self.swap_regrown();
        let mut changed = false;
        let outcome = self.watch.apply(&self.scripts(), &mut changed);
        if changed {
            self.watched_more();
        }
        Ok(outcome?)
    }

    /// After scripts were added (into the filter in place): a filter that outgrew its size
    /// gets a bigger one built, and the mempool looks at every transaction again.
    fn watched_more(&self) {
        if self.scripts().outgrown() {
            self.start_regrow();
        }
        self.mempool.forget_checked();
    }

    /// The mempool tracker this follower keeps (share it with the gRPC server).
    pub fn mempool(&self) -> SharedMempool {
        self.mempool.shared()
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
        while !self.stopping() && Instant::now() < until && !self.between_blocks_waiting() {
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
            let fork = match tip {
                Some((height, _)) => find_fork_point(
                    &*self.daemon,
                    |h| Ok::<_, FollowError>(self.store.header(h)?.map(|h| h.block_hash())),
                    height,
                    info.blocks,
                )?,
                None => None,
            };
            if let Some((height, hash)) = tip {
                if fork.is_none_or(|f| f < height) {
                    let depth = height - fork.map_or(0, |f| f + 1) + 1;
                    warn!(depth, from = %hash, fork = ?fork, "bitcoind's chain no longer has our tip: disconnecting to the fork point");
                    let disconnected =
                        pipeline::disconnect::disconnect_above(&self.store, fork, true)?;
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
                pipeline::Hooks {
                    queues: &self.metrics.queues,
                    failed: &AtomicBool::new(false),
                    // Nothing else writes the log while the follower waits for this pipeline.
                    events: &crossbeam_channel::never(),
                },
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

    /// Follows bitcoind until asked to stop: reconcile, then follow the tip live; errors
    /// bitcoind may recover from are logged and retried with backoff.
    pub fn run(&self) -> Result<(), FollowError> {
        self.metrics.set_follower_alive(true);
        let _alive = Alive(&self.metrics);
        if let Some((height, _)) = self.store.tip()? {
            self.metrics.indexed_height.set(i64::from(height));
        }
        let mut backoff = Duration::from_millis(250);
        self.watch.resume()?;
        // A filter saved overfull (the last run stopped while a bigger one was built).
        if self.scripts().outgrown() {
            self.start_regrow();
        }
        let outcome = self.follow_until_stopped(&mut backoff);
        // A bigger filter built already is kept (saved below), not built again next start.
        self.swap_regrown();
        self.end_regrow();
        outcome?;
        // Stopped: nothing adds scripts any more, so the filter in memory is the watched
        // set at its current generation, and the next start loads it instead of a scan.
        wallets::save_filter(&self.store, &self.scripts())?;
        Ok(())
    }

    /// The loop of [`Follower::run`].
    fn follow_until_stopped(&self, backoff: &mut Duration) -> Result<(), FollowError> {
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
                    self.mempool.resync(&self.scripts())?;
                    self.live()
                });
            match step {
                Ok(LiveExit::Stop) => break,
                Ok(LiveExit::Reconcile(why)) => {
                    debug!(why, "reconciling with bitcoind");
                    self.metrics.reconciles.inc();
                    *backoff = Duration::from_millis(250);
                }
                Err(e) if e.is_transient() => {
                    warn!(error = %e, retry_in = ?backoff, "bitcoind unavailable or changing; retrying");
                    self.pause(*backoff);
                    *backoff = (*backoff * 2).min(self.opts.max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
