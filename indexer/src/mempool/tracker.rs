//! The follower's side of the mempool: what bitcoind's notices and its `getrawmempool` say
//! goes into the shared [`Mempool`], and every change it reports goes to the event log's
//! one writer: the live pipeline's write stage while one runs, else the follower's thread.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::Instant;

use bitcoin::consensus::deserialize;
use bitcoin::{Transaction, Txid};
use bitcoind::{Daemon, DaemonError};
use crossbeam_channel::Sender;
use tracing::{info, warn};

use super::{Change, Gone, Mempool};
use crate::pipeline::parse::txid_of;
use crate::script_filter::ScriptFilter;
use crate::store::{Batch, Reader, Store, StoreError};
use crate::types::{Event, EventKind};

/// The mempool tracker as the follower and the gRPC server share it.
pub type SharedMempool = Arc<RwLock<Mempool>>;

/// Transaction bodies from `rawtx` kept for `sequence` to claim; a miss costs one RPC call.
const RAW_TXS_KEPT: usize = 50_000;

/// Why tracking the mempool failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// bitcoind did not answer.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The event log could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Keeps the shared mempool in step with bitcoind's, and logs what changes.
pub struct Tracker {
    mempool: SharedMempool,
    store: Arc<Store>,
    daemon: Arc<Daemon>,
    /// Events kept in the event log (`None`: all).
    retention: Option<u64>,
    /// Transactions from `rawtx`, kept until `sequence` says which entered the mempool.
    raw_txs: std::sync::Mutex<HashMap<Txid, Vec<u8>>>,
    /// Where events go while a live pipeline owns the event log (`None`: written here).
    writer: std::sync::Mutex<Option<Sender<Vec<Event>>>>,
}

impl Tracker {
    /// A tracker of an empty mempool, logging into `store`'s event log.
    pub fn new(store: Arc<Store>, daemon: Arc<Daemon>, retention: Option<u64>) -> Self {
        Tracker {
            mempool: SharedMempool::default(),
            store,
            daemon,
            retention,
            raw_txs: std::sync::Mutex::default(),
            writer: std::sync::Mutex::default(),
        }
    }

    /// Sends events to `writer` (the live pipeline's write stage) from now on; `None`
    /// writes them on the calling thread again, once that pipeline has ended.
    pub fn log_through(&self, writer: Option<Sender<Vec<Event>>>) {
        *self.writer.lock().expect("writer lock is never poisoned") = writer;
    }

    /// The mempool it keeps, to share with the gRPC server.
    pub fn shared(&self) -> SharedMempool {
        self.mempool.clone()
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Mempool> {
        self.mempool
            .write()
            .expect("mempool lock is never poisoned")
    }

    /// Whether no watched transaction is pending.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The watched set grew: every transaction is looked at again.
    pub fn forget_checked(&self) {
        self.lock().forget_checked();
    }

    /// `sequence` says `txid` left the mempool (why is known a moment later, or never).
    pub fn removed(&self, txid: Txid) {
        self.lock().removed(txid);
    }

    /// Logs the removals that waited long enough for a conflict to explain them.
    pub fn expire(&self) -> Result<(), StoreError> {
        let expired = self.lock().expire(Instant::now());
        self.log(expired)
    }

    /// `block` was connected: what it mined leaves the mempool, and what it conflicts
    /// with was replaced.
    pub fn mined(&self, block: &bitcoin::Block) -> Result<(), StoreError> {
        let mut m = self.lock();
        m.mined(block.txdata.iter().map(|t| t.compute_txid()));
        let changes: Vec<Change> = block.txdata.iter().flat_map(|t| m.conflicts(t)).collect();
        drop(m);
        self.log(changes)
    }

    /// Tracks `tx`, which just entered bitcoind's mempool.
    pub fn added(&self, tx: &Transaction, scripts: &ScriptFilter) -> Result<(), StoreError> {
        let changes = self.lock().added(&self.store, scripts, tx)?;
        self.log(changes)
    }

    /// A transaction from `rawtx` (entering the mempool, or in a block: bitcoind announces
    /// every transaction of every block before the block itself): replaces any pending
    /// watched transaction it conflicts with, and is kept until `sequence` tells where it
    /// went. Only its txid is computed while nothing is pending, so a block's thousands of
    /// announcements do not hold up the block behind them.
    pub fn raw_tx(&self, bytes: Vec<u8>) -> Result<(), StoreError> {
        let txid = match txid_of(&bytes) {
            Ok(txid) => txid,
            Err(e) => {
                warn!(error = %e, "ZMQ rawtx that does not decode dropped");
                return Ok(());
            }
        };
        if !self.is_empty() {
            if let Ok(tx) = deserialize::<Transaction>(&bytes) {
                let changes = self.lock().conflicts(&tx);
                self.log(changes)?;
            }
        }
        let mut raw_txs = self.raw_txs.lock().expect("raw tx lock is never poisoned");
        if raw_txs.len() >= RAW_TXS_KEPT {
            raw_txs.clear();
        }
        raw_txs.insert(txid, bytes);
        Ok(())
    }

    /// Whether `rawtx` brought the body of `txid`.
    pub fn has_body(&self, txid: &Txid) -> bool {
        self.raw_txs
            .lock()
            .expect("raw tx lock is never poisoned")
            .contains_key(txid)
    }

    /// `sequence` says `txid` entered the mempool: its body from `rawtx`, else from
    /// bitcoind (gone already: nothing to track).
    pub fn entered(&self, txid: Txid, scripts: &ScriptFilter) -> Result<(), TrackError> {
        let kept = self
            .raw_txs
            .lock()
            .expect("raw tx lock is never poisoned")
            .remove(&txid);
        let raw = match kept {
            Some(raw) => Some(raw),
            None => self.daemon.mempool_transaction(&txid)?,
        };
        match raw.map(|r| deserialize::<Transaction>(&r)) {
            Some(Ok(tx)) => self.added(&tx, scripts)?,
            Some(Err(e)) => warn!(%txid, error = %e, "mempool transaction does not decode"),
            None => {}
        }
        Ok(())
    }

    /// Re-reads bitcoind's whole mempool: at start, after lost messages and after reorgs.
    pub fn resync(&self, scripts: &ScriptFilter) -> Result<(), TrackError> {
        // Bodies announced before the doubt: bitcoind's answer below replaces them.
        self.raw_txs
            .lock()
            .expect("raw tx lock is never poisoned")
            .clear();
        // Read before asking: a transaction a ZMQ notice adds while bitcoind answers is not
        // in the answer, and must not be taken for gone.
        let asked_at = self.lock().adds();
        let in_mempool: HashSet<Txid> = self.daemon.raw_mempool()?.into_iter().collect();
        let (changes, new) =
            self.lock()
                .reconcile(&self.store, &in_mempool, asked_at, |s, t| s.has_transfer(t))?;
        self.log(changes)?;
        for chunk in new.chunks(500) {
            for raw in self
                .daemon
                .mempool_transactions(chunk)?
                .into_iter()
                .flatten()
            {
                match deserialize::<Transaction>(&raw) {
                    Ok(tx) => self.added(&tx, scripts)?,
                    Err(e) => warn!(error = %e, "bitcoind sent an unreadable mempool transaction"),
                }
            }
        }
        Ok(())
    }

    /// Appends mempool changes to the event log (at the current tip).
    fn log(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let Some((height, block_hash)) = self.store.tip()? else {
            return Ok(());
        };
        let events: Vec<Event> = changes
            .iter()
            .map(|c| {
                let (kind, txid, wallets) = match c {
                    Change::Seen(t, w) => (EventKind::TransferSeen, *t, w),
                    Change::Gone(t, Gone::Replaced { by }, w) => {
                        info!(txid = %t, by = %by, "a watched mempool transaction was replaced");
                        (EventKind::TransferReplaced, *t, w)
                    }
                    Change::Gone(t, Gone::Evicted, w) => {
                        info!(txid = %t, "a watched mempool transaction was evicted");
                        (EventKind::TransferEvicted, *t, w)
                    }
                };
                Event {
                    kind,
                    height,
                    block_hash,
                    txid: Some(txid),
                    wallets: wallets.clone(),
                }
            })
            .collect();
        let writer = self.writer.lock().expect("writer lock is never poisoned");
        match writer.as_ref() {
            // The receiver outlives the pipeline: what its write stage did not append, the
            // follower appends once the pipeline has ended (`append`).
            Some(w) => {
                let _ = w.send(events);
                Ok(())
            }
            None => self.append(&events),
        }
    }

    /// Appends `events` to the log on this thread (no live pipeline writes it now).
    pub fn append(&self, events: &[Event]) -> Result<(), StoreError> {
        self.store
            .commit_with_events(Batch::default(), events, self.retention, false)?;
        Ok(())
    }
}
