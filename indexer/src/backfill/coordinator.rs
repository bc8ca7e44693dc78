//! `AddWatch` requests and backfills between two blocks: the follower hands its pauses to
//! a [`Coordinator`], which applies waiting requests, starts a background backfill for new
//! scripts with earlier history, and merges the backfills that finished. It says whether
//! the watched set changed; reloading the filter and the mempool is the follower's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bitcoin::Network;
use bitcoind::Daemon;
use crossbeam_channel::{Receiver, Sender};
use tracing::{error, info, warn};

use super::{BackfillError, Job, Registry, State, Status};
use crate::add_watch::{self, Accepted, AddWatchError, WatchRequest};
use crate::descriptors;
use crate::script_filter::ScriptFilter;
use crate::store::{Reader, Store};
use crate::wallets;

/// A backfill indexed in its scratch database, waiting to be merged.
type Ready = (Job, Store);

/// How long a backfill whose merge had to wait waits before the next try.
const MERGE_RETRY: Duration = Duration::from_secs(5);

/// Applies `AddWatch` requests and backfills between blocks, for one follower.
pub struct Coordinator {
    store: Arc<Store>,
    daemon: Arc<Daemon>,
    network: Network,
    stop: Arc<AtomicBool>,
    requests: Receiver<WatchRequest>,
    registry: Registry,
    /// Backfills indexed and waiting to be merged between two blocks.
    ready: (Sender<Ready>, Receiver<Ready>),
    /// Backfills whose merge must wait (bitcoind or the chain in the way), with when to
    /// try again.
    retry: Mutex<Vec<(Job, Store, Instant)>>,
}

impl Coordinator {
    /// A coordinator taking no requests (see [`Coordinator::with_requests`]).
    pub fn new(
        store: Arc<Store>,
        daemon: Arc<Daemon>,
        network: Network,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Coordinator {
            store,
            daemon,
            network,
            stop,
            requests: crossbeam_channel::never(),
            registry: Registry::default(),
            ready: crossbeam_channel::unbounded(),
            retry: Mutex::default(),
        }
    }

    /// Takes `AddWatch` requests from `requests`; backfills show in `registry`.
    pub fn with_requests(mut self, requests: Receiver<WatchRequest>, registry: Registry) -> Self {
        self.requests = requests;
        self.registry = registry;
        self
    }

    /// Whether a request or a finished backfill waits for a pause between blocks.
    pub fn waiting(&self) -> bool {
        let now = Instant::now();
        !self.requests.is_empty()
            || !self.ready.1.is_empty()
            || self
                .retry
                .lock()
                .expect("retry lock is never poisoned")
                .iter()
                .any(|(_, _, at)| *at <= now)
    }

    /// Applies the oldest waiting request and merges finished backfills (the pipeline is
    /// idle), setting `changed` when the watched set changed; what was applied before an
    /// error stays applied, and `changed` says so even then. One request a pause: the
    /// follower indexes the blocks that came meanwhile before it takes the next, so that
    /// a million scripts sent as ten calls delay a block by one call's work at most.
    pub fn apply(&self, filter: &ScriptFilter, changed: &mut bool) -> Result<(), BackfillError> {
        let mut outcome = Ok(());
        if let Ok(req) = self.requests.try_recv() {
            match self.accept(req, filter) {
                Ok(c) => *changed |= c,
                Err(e) => outcome = Err(e),
            }
        }
        let now = Instant::now();
        let mut due: Vec<Ready> = self.ready.1.try_iter().collect();
        {
            let mut retry = self.retry.lock().expect("retry lock is never poisoned");
            let (now_due, later): (Vec<_>, Vec<_>) =
                retry.drain(..).partition(|(_, _, at)| *at <= now);
            *retry = later;
            due.extend(now_due.into_iter().map(|(job, scratch, _)| (job, scratch)));
        }
        for (job, scratch) in due {
            if outcome.is_ok() {
                *changed |= self.merge(job, scratch, filter);
            } else {
                self.retry_merge(job, scratch);
            }
        }
        outcome
    }

    /// Restarts the backfills a previous run accepted and did not merge.
    pub fn resume(&self) -> Result<(), BackfillError> {
        let pending = super::pending(&self.store)?;
        super::remove_orphans(&self.store, &pending);
        for job in pending {
            let running = self
                .registry
                .lock()
                .expect("registry lock is never poisoned")
                .contains_key(&job.id);
            if !running {
                info!(id = job.id, wallet = %job.wallet, "resuming a backfill");
                self.spawn(job);
            }
        }
        Ok(())
    }

    /// Puts a backfill back for a later pause between blocks.
    fn retry_merge(&self, job: Job, scratch: Store) {
        self.retry
            .lock()
            .expect("retry lock is never poisoned")
            .push((job, scratch, Instant::now() + MERGE_RETRY));
    }

    /// One `AddWatch`: applied at once, or (new scripts with earlier history) recorded
    /// and backfilled in the background. True when the watched set changed.
    fn accept(&self, req: WatchRequest, filter: &ScriptFilter) -> Result<bool, BackfillError> {
        if let Some((job, script)) = self.backfilling(&req)? {
            let _ = req
                .reply
                .send(Err(AddWatchError::Backfilling { job, script }));
            return Ok(false);
        }
        let tip = self.store.tip()?.map(|(h, _)| h);
        let needs_history = matches!((req.birth_height, tip), (Some(b), Some(t)) if b <= t);
        if !needs_history {
            add_watch::apply(&self.store, self.network, req, Some(filter));
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
                filter,
            );
            let _ = req
                .reply
                .send(added.map(Accepted::from).map_err(AddWatchError::Wallet));
            return Ok(true);
        }
        // The dry run above accepted the descriptors: only the database can fail here.
        let scripts =
            match super::new_scripts(&self.store, self.network, &req.descriptors, req.gap_limit) {
                Ok(s) => s,
                Err(BackfillError::Wallet(e)) => {
                    let _ = req.reply.send(Err(AddWatchError::Wallet(e)));
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
        let job = super::record(
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
        self.spawn(job);
        Ok(false)
    }

    /// A pending backfill that already covers one of `req`'s scripts, if any.
    fn backfilling(&self, req: &WatchRequest) -> Result<Option<(u64, String)>, BackfillError> {
        let pending = super::pending(&self.store)?;
        if pending.is_empty() {
            return Ok(None);
        }
        // One lookup a script: a call may hold a million, and so may a pending job.
        let backfilled: std::collections::HashMap<&str, u64> = pending
            .iter()
            .flat_map(|j| j.scripts.iter().map(move |s| (s.as_str(), j.id)))
            .collect();
        let covered = |script: &bitcoin::ScriptBuf| {
            let hex = script.to_hex_string();
            backfilled.get(hex.as_str()).map(|job| (*job, hex))
        };
        // Expanded by the gRPC handler already, or here (invalid descriptors are reported
        // by the add itself).
        if let Some(expanded) = &req.expanded {
            return Ok(expanded.iter().flat_map(|e| &e.scripts).find_map(covered));
        }
        for d in &req.descriptors {
            let Ok(expanded) = descriptors::expand(d, self.network, req.gap_limit) else {
                continue;
            };
            if let Some(found) = expanded.scripts.iter().find_map(covered) {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Indexes a job's history in a thread of its own; the next pause merges it.
    fn spawn(&self, job: Job) {
        self.registry
            .lock()
            .expect("registry lock is never poisoned")
            .insert(
                job.id,
                Status {
                    job: job.clone(),
                    height: job.birth,
                    target: job.birth,
                    state: State::Indexing,
                },
            );
        let (store, daemon, network, stop) = (
            self.store.clone(),
            self.daemon.clone(),
            self.network,
            self.stop.clone(),
        );
        let (ready, registry) = (self.ready.0.clone(), self.registry.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("backfill-{}", job.id))
            .spawn(move || {
                let update = |height: Option<u32>, target: Option<u32>, state: Option<State>| {
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
                let mut backoff = Duration::from_millis(250);
                while !stop.load(Ordering::Relaxed) {
                    let attempt = (|| {
                        let scripts = job.scripts();
                        let target = store.tip()?.map_or(job.birth, |(h, _)| h);
                        update(None, Some(target), None);
                        let dir = super::scratch_dir(&store, job.id);
                        super::index(
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
                            update(None, None, Some(State::Merging));
                            let _ = ready.send((job.clone(), scratch));
                            return;
                        }
                        Err(BackfillError::Stopped) => return,
                        Err(e) if e.is_transient() => {
                            warn!(id = job.id, error = %e, retry_in = ?backoff, "backfill interrupted; retrying");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                        Err(e) => {
                            error!(id = job.id, error = %e, "backfill failed; it is retried at the next start");
                            update(None, None, Some(State::Failed(e.to_string())));
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
    fn merge(&self, job: Job, scratch: Store, filter: &ScriptFilter) -> bool {
        let aligned = super::align(&scratch, &self.store, &self.daemon, &job)
            .and_then(|()| super::merge(&self.store, &scratch, &job, self.network));
        let dir = scratch.path().to_owned();
        let set_state = |state: State| {
            if let Some(s) = self
                .registry
                .lock()
                .expect("registry lock is never poisoned")
                .get_mut(&job.id)
            {
                if state == State::Done {
                    s.height = s.target.max(s.height);
                }
                s.state = state;
            }
        };
        match aligned {
            Ok(added) => {
                for script in job.scripts() {
                    filter.insert(script.as_bytes());
                }
                info!(id = job.id, wallet = %job.wallet, new = added.new_scripts, "backfill merged: the scripts are watched with their history");
                set_state(State::Done);
                drop(scratch);
                super::remove_scratch(&dir);
                true
            }
            Err(e) if e.is_transient() => {
                warn!(id = job.id, error = %e, retry_in = ?MERGE_RETRY, "merging a backfill must wait");
                self.retry_merge(job, scratch);
                false
            }
            Err(e) => {
                error!(id = job.id, error = %e, "merging a backfill failed; it is retried at the next start");
                set_state(State::Failed(e.to_string()));
                drop(scratch);
                super::remove_scratch(&dir);
                false
            }
        }
    }
}
