//! The orchestrator's own RocksDB: withdrawals, the request-id index, coin reservations,
//! and what the chain showed about the withdrawals' transactions. Every change is one
//! synced batch: a withdrawal's new state, the reservations it takes or releases, the
//! txids it watches, and (on submission) its request id, so a crash leaves each saga at a
//! step it really reached and no coin held by two sagas. The chain's side (the indexer's
//! event offset read up to, its tip, the heights that confirmed watched txids) is written
//! in one batch too, so after a crash the event stream resumes exactly where its effects
//! end.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{OutPoint, Txid};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::saga::{Outcome, Request, Step, TransitionError, Withdrawal};

const WITHDRAWALS: &str = "withdrawals";
/// Batches: saga records of their own (id from the withdrawals' counter) that pay their
/// members' withdrawals with one transaction.
const BATCHES: &str = "batches";
const REQUESTS: &str = "requests";
const RESERVATIONS: &str = "reservations";
const META: &str = "meta";
/// Txid of every version of an unfinished withdrawal -> the withdrawal's id.
const ATTEMPTS: &str = "attempts";
/// The chain as the indexer's events showed it: `CURSOR`, `TIP`, and txid -> the height
/// of the block that confirmed it (only txids in `ATTEMPTS`).
const CHAIN: &str = "chain";
const NEXT_ID: &[u8] = b"next_id";
const CURSOR: &[u8] = b"cursor";
const TIP: &[u8] = b"tip";
const LOG_ID: &[u8] = b"log_id";
/// Where the Kafka event source reads on from, per partition (see `Observation::kafka`).
const KAFKA_POSITIONS: &[u8] = b"kafka_positions";
/// Set once the attempts of withdrawals stored before `ATTEMPTS` existed are indexed.
const ATTEMPTS_INDEXED: &[u8] = b"attempts_indexed";

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SagaStoreError {
    /// RocksDB failed.
    #[error("saga database: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// Another process has the database open.
    #[error("the saga database {0} is open in another orchestrator process: one process at a time (stop the other first)")]
    InUse(std::path::PathBuf),
    /// A stored record does not decode.
    #[error("saga database: corrupt {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// The request id is taken by a different request.
    #[error("request_id {0:?} was already used for a different withdrawal")]
    Conflict(String),
    /// A coin is reserved by another withdrawal.
    #[error("coin {outpoint} is reserved by withdrawal {holder}")]
    CoinTaken {
        /// The coin.
        outpoint: OutPoint,
        /// The withdrawal holding it.
        holder: u64,
    },
    /// The withdrawal changed since it was read (another writer got there first).
    #[error("withdrawal {0} changed since it was read")]
    Stale(u64),
    /// No such withdrawal.
    #[error("no withdrawal {0}")]
    Unknown(u64),
    /// The outcome cannot happen in the withdrawal's state.
    #[error(transparent)]
    Transition(#[from] TransitionError),
}

/// What the indexer's events showed, up to an offset: applied in one batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observation {
    /// The offset to read from next.
    pub cursor: u64,
    /// The indexer's event log the cursor belongs to, when it is (re)chosen.
    pub log_id: Option<String>,
    /// The indexed tip height, when it changed.
    pub tip: Option<u32>,
    /// Transactions' latest known state: the height that confirmed them, or `None` when
    /// not (or no longer) in a block. Txids no withdrawal watches are ignored.
    pub txs: BTreeMap<Txid, Option<u32>>,
    /// With events from Kafka: the offset to read on from in each partition, written with
    /// the cursor so that a restart re-reads exactly what was not applied.
    pub kafka: Option<BTreeMap<i32, i64>>,
}

/// A submission's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    /// The withdrawal (the existing one for a repeated request).
    pub withdrawal: Withdrawal,
    /// False when the request id was known: nothing new was created.
    pub created: bool,
}

/// The saga database.
pub struct SagaStore {
    db: DB,
    /// Serializes read-check-write sequences (ids, request ids, reservations).
    write: Mutex<()>,
    updates: tokio::sync::broadcast::Sender<Withdrawal>,
}

fn corrupt(what: &'static str, detail: impl ToString) -> SagaStoreError {
    SagaStoreError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

fn decode(bytes: &[u8]) -> Result<Withdrawal, SagaStoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("withdrawal", e))
}

fn id_of(bytes: &[u8]) -> Result<u64, SagaStoreError> {
    Ok(u64::from_be_bytes(
        bytes.try_into().map_err(|_| corrupt("id", "not 8 bytes"))?,
    ))
}

impl SagaStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<SagaStore, SagaStoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = [
            WITHDRAWALS,
            BATCHES,
            REQUESTS,
            RESERVATIONS,
            META,
            ATTEMPTS,
            CHAIN,
        ]
        .into_iter()
        .map(|name| {
            let mut cf = Options::default();
            cf.set_compression_type(rocksdb::DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(|e| {
            // RocksDB's only sign of a second process is the error of locking its LOCK
            // file: EAGAIN from another process, or its own message within one process.
            let text = e.to_string();
            if text.contains("LOCK")
                && (text.contains("Resource temporarily unavailable")
                    || text.contains("lock hold by current process"))
            {
                SagaStoreError::InUse(path.to_owned())
            } else {
                SagaStoreError::Rocks(e)
            }
        })?;
        let (updates, _) = tokio::sync::broadcast::channel(1024);
        let store = SagaStore {
            db,
            write: Mutex::new(()),
            updates,
        };
        store.index_attempts()?;
        Ok(store)
    }

    /// Indexes the versions of unfinished withdrawals written before the index existed.
    fn index_attempts(&self) -> Result<(), SagaStoreError> {
        if self.db.get_cf(self.cf(META), ATTEMPTS_INDEXED)?.is_some() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for w in self
            .unfinished()?
            .into_iter()
            .chain(self.unfinished_batches()?)
        {
            for a in &w.attempts {
                batch.put_cf(
                    self.cf(ATTEMPTS),
                    a.txid.as_byte_array(),
                    w.id.to_be_bytes(),
                );
            }
        }
        batch.put_cf(self.cf(META), ATTEMPTS_INDEXED, []);
        self.commit(batch)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("every column family is opened")
    }

    /// Every key of column family `name`, in order.
    fn keys(&self, name: &str) -> impl Iterator<Item = Result<Box<[u8]>, SagaStoreError>> + '_ {
        self.db
            .iterator_cf(self.cf(name), rocksdb::IteratorMode::Start)
            .map(|item| Ok(item?.0))
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), SagaStoreError> {
        let mut opts = WriteOptions::default();
        // The outcome must be on disk before the next side effect.
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every change to any withdrawal, as it is committed.
    pub fn updates(&self) -> tokio::sync::broadcast::Receiver<Withdrawal> {
        self.updates.subscribe()
    }

    /// Accepts `request`: a new withdrawal in RECEIVED, or the existing one when its
    /// request id was seen with the same request; a different request under a known id
    /// is a conflict.
    pub fn submit(&self, request: Request, now_ms: u64) -> Result<Submitted, SagaStoreError> {
        let _guard = self.lock();
        let key = request.request_id.clone().into_bytes();
        if let Some(id) = self.db.get_cf(self.cf(REQUESTS), &key)? {
            let existing = self
                .get(id_of(&id)?)?
                .ok_or_else(|| corrupt("request index", "names a missing withdrawal"))?;
            if existing.request != request {
                return Err(SagaStoreError::Conflict(request.request_id));
            }
            return Ok(Submitted {
                withdrawal: existing,
                created: false,
            });
        }
        let id = self.next_id()?;
        let w = Withdrawal::new(id, request, now_ms);
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(META), NEXT_ID, (id + 1).to_be_bytes());
        batch.put_cf(self.cf(REQUESTS), &key, id.to_be_bytes());
        batch.put_cf(
            self.cf(WITHDRAWALS),
            id.to_be_bytes(),
            serde_json::to_vec(&w).expect("a withdrawal serializes"),
        );
        self.commit(batch)?;
        let _ = self.updates.send(w.clone());
        Ok(Submitted {
            withdrawal: w,
            created: true,
        })
    }

    /// The withdrawal `id`.
    pub fn get(&self, id: u64) -> Result<Option<Withdrawal>, SagaStoreError> {
        self.db
            .get_cf(self.cf(WITHDRAWALS), id.to_be_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// The withdrawal submitted under `request_id`.
    pub fn by_request(&self, request_id: &str) -> Result<Option<Withdrawal>, SagaStoreError> {
        match self.db.get_cf(self.cf(REQUESTS), request_id.as_bytes())? {
            Some(id) => self.get(id_of(&id)?),
            None => Ok(None),
        }
    }

    /// Every withdrawal whose request id starts with `prefix` (the orchestrator's own
    /// runs of one kind), in request id order.
    pub fn by_request_prefix(&self, prefix: &str) -> Result<Vec<Withdrawal>, SagaStoreError> {
        let mut found = Vec::new();
        let from = rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(REQUESTS), from) {
            let (key, id) = item?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            let w = self
                .get(id_of(&id)?)?
                .ok_or_else(|| corrupt("request index", "names a missing withdrawal"))?;
            found.push(w);
        }
        Ok(found)
    }

    /// Applies `outcome` to withdrawal (or batch) `before` (as the caller read it) and
    /// commits the result with the reservations it takes or releases, in one synced batch;
    /// a batch's members are rewritten to mirror it in the same batch. Refuses when the
    /// stored record changed since, or when a coin to reserve is held by another saga. A
    /// batch member's cancel is its batch's `MemberLeft`.
    pub fn record(
        &self,
        before: &Withdrawal,
        outcome: Outcome,
        now_ms: u64,
    ) -> Result<Withdrawal, SagaStoreError> {
        let _guard = self.lock();
        self.check_current(before)?;
        if let (Some(batch_id), Outcome::Cancelled) = (before.batch, &outcome) {
            return self.leave_batch(before, batch_id, now_ms);
        }
        let mut batch = WriteBatch::default();
        let (after, members) = self.prepare(&mut batch, before, outcome, now_ms)?;
        self.commit(batch)?;
        let _ = self.updates.send(after.clone());
        for m in members {
            let _ = self.updates.send(m);
        }
        Ok(after)
    }

    /// Refuses when the stored record of `before` is missing or differs from it.
    fn check_current(&self, before: &Withdrawal) -> Result<(), SagaStoreError> {
        let stored = if before.is_batch() {
            self.batch(before.id)?
        } else {
            self.get(before.id)?
        };
        match stored {
            None => Err(SagaStoreError::Unknown(before.id)),
            Some(stored) if &stored != before => Err(SagaStoreError::Stale(before.id)),
            Some(_) => Ok(()),
        }
    }

    /// Adds to `batch` the writes of `outcome` on `before` (checked current): the record,
    /// its reservations and watched txids, and for a batch its members mirrored. Returns
    /// the record after and the members as rewritten.
    fn prepare(
        &self,
        batch: &mut WriteBatch,
        before: &Withdrawal,
        outcome: Outcome,
        now_ms: u64,
    ) -> Result<(Withdrawal, Vec<Withdrawal>), SagaStoreError> {
        let after = before.apply(outcome, now_ms)?;
        let reservations = self.cf(RESERVATIONS);
        if !before.holds_coins() && after.holds_coins() {
            for coin in &after.coins {
                let key = serialize(&coin.outpoint);
                if let Some(holder) = self.db.get_cf(reservations, &key)? {
                    let holder = id_of(&holder)?;
                    if holder != after.id {
                        return Err(SagaStoreError::CoinTaken {
                            outpoint: coin.outpoint,
                            holder,
                        });
                    }
                }
                batch.put_cf(reservations, key, after.id.to_be_bytes());
            }
        }
        if before.holds_coins() && !after.holds_coins() {
            for coin in &before.coins {
                batch.delete_cf(reservations, serialize(&coin.outpoint));
            }
        }
        let attempts = self.cf(ATTEMPTS);
        // Its versions are watched, and a version waiting for signatures too (the
        // signers may complete and send it themselves).
        let txids = |w: &Withdrawal| -> Vec<Txid> {
            w.attempts
                .iter()
                .map(|a| a.txid)
                .chain(w.pending.as_ref().map(|p| p.txid))
                .collect()
        };
        let (was, now) = (txids(before), txids(&after));
        let kept: HashSet<Txid> = if after.next_step() == Step::Rest {
            HashSet::new()
        } else {
            now.iter().copied().collect()
        };
        // Nothing watches the versions it no longer has (finished, or discarded unsent).
        for txid in was.iter().chain(&now) {
            if !kept.contains(txid) {
                batch.delete_cf(attempts, txid.as_byte_array());
                batch.delete_cf(self.cf(CHAIN), txid.as_byte_array());
            }
        }
        let watched: HashSet<&Txid> = was.iter().collect();
        for txid in &now {
            if kept.contains(txid) && !watched.contains(txid) {
                batch.put_cf(attempts, txid.as_byte_array(), after.id.to_be_bytes());
            }
        }
        let mut mirrored = Vec::new();
        let member = |id: u64| {
            self.get(id)?
                .ok_or_else(|| corrupt("batch", format!("names a missing member {id}")))
        };
        for m in after.members.iter().flatten() {
            let stored = member(m.id)?;
            // A joiner must still be waiting in the queue (not cancelled meanwhile).
            let joins = stored.batch.is_none()
                && stored.state == crate::saga::State::Received
                && stored.attempts.is_empty();
            if stored.batch != Some(after.id) && !joins {
                return Err(SagaStoreError::Stale(m.id));
            }
            let shown = stored.mirrored(&after);
            self.put(batch, WITHDRAWALS, &shown);
            mirrored.push(shown);
        }
        if after.settled && !before.settled {
            // Members the settled version does not pay go back to the queue.
            let stayed: HashSet<u64> = after.members.iter().flatten().map(|m| m.id).collect();
            for m in before.members.iter().flatten() {
                if !stayed.contains(&m.id) {
                    let back = member(m.id)?.requeued(now_ms);
                    self.put(batch, WITHDRAWALS, &back);
                    mirrored.push(back);
                }
            }
        }
        self.put(
            batch,
            if after.is_batch() {
                BATCHES
            } else {
                WITHDRAWALS
            },
            &after,
        );
        Ok((after, mirrored))
    }

    fn put(&self, batch: &mut WriteBatch, cf: &str, w: &Withdrawal) {
        batch.put_cf(
            self.cf(cf),
            w.id.to_be_bytes(),
            serde_json::to_vec(w).expect("a withdrawal serializes"),
        );
    }

    /// Cancels `member` (checked current) of batch `batch_id`: it leaves the batch, which
    /// is rewritten without it (and without its signed bytes, if it had unsent ones), in
    /// one synced batch; refused once the batch may have been sent.
    fn leave_batch(
        &self,
        member: &Withdrawal,
        batch_id: u64,
        now_ms: u64,
    ) -> Result<Withdrawal, SagaStoreError> {
        let batch_record = self
            .batch(batch_id)?
            .ok_or_else(|| corrupt("withdrawal", format!("names a missing batch {batch_id}")))?;
        let mut writes = WriteBatch::default();
        let (_, members) = self.prepare(
            &mut writes,
            &batch_record,
            Outcome::MemberLeft(member.id),
            now_ms,
        )?;
        let left = member.apply(Outcome::Cancelled, now_ms)?;
        self.put(&mut writes, WITHDRAWALS, &left);
        self.commit(writes)?;
        let _ = self.updates.send(left.clone());
        for m in members {
            let _ = self.updates.send(m);
        }
        Ok(left)
    }

    /// Puts `members` (withdrawals of one wallet and fee policy, in RECEIVED, as the
    /// caller read them) into a new batch, in one synced batch: the batch's record in
    /// RECEIVED, each member mirroring it. Refuses when one changed since.
    pub fn form_batch(
        &self,
        members: &[Withdrawal],
        now_ms: u64,
    ) -> Result<Withdrawal, SagaStoreError> {
        let _guard = self.lock();
        let Some(first) = members.first() else {
            return Err(corrupt("batch", "no members"));
        };
        for m in members {
            self.check_current(m)?;
            let fits = m.state == crate::saga::State::Received
                && m.batch.is_none()
                && m.attempts.is_empty()
                && !m.is_batch()
                && m.request.wallet == first.request.wallet
                && m.request.fee_rate == first.request.fee_rate;
            if !fits {
                return Err(SagaStoreError::Stale(m.id));
            }
        }
        let id = self.next_id()?;
        let b = Withdrawal::new_batch(id, members, now_ms);
        let mut writes = WriteBatch::default();
        writes.put_cf(self.cf(META), NEXT_ID, (id + 1).to_be_bytes());
        self.put(&mut writes, BATCHES, &b);
        let mirrored: Vec<Withdrawal> = members.iter().map(|m| m.mirrored(&b)).collect();
        for m in &mirrored {
            self.put(&mut writes, WITHDRAWALS, m);
        }
        self.commit(writes)?;
        for m in mirrored {
            let _ = self.updates.send(m);
        }
        Ok(b)
    }

    fn next_id(&self) -> Result<u64, SagaStoreError> {
        match self.db.get_cf(self.cf(META), NEXT_ID)? {
            Some(v) => id_of(&v),
            None => Ok(1),
        }
    }

    /// The batch `id`.
    pub fn batch(&self, id: u64) -> Result<Option<Withdrawal>, SagaStoreError> {
        self.db
            .get_cf(self.cf(BATCHES), id.to_be_bytes())?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Batches with a step still to run (to resume at start).
    pub fn unfinished_batches(&self) -> Result<Vec<Withdrawal>, SagaStoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(BATCHES), rocksdb::IteratorMode::Start)
        {
            let b = decode(&item?.1)?;
            if b.next_step() != Step::Rest {
                out.push(b);
            }
        }
        Ok(out)
    }

    /// Applies what the indexer's events showed, up to `seen.cursor`. Synced when it
    /// changes what a withdrawal watches; a cursor that only skipped other events may be
    /// lost in a crash (they are read again, to the same effect). True when something a
    /// withdrawal watches changed.
    pub fn observe(&self, seen: &Observation) -> Result<bool, SagaStoreError> {
        let _guard = self.lock();
        let (chain, attempts) = (self.cf(CHAIN), self.cf(ATTEMPTS));
        let mut batch = WriteBatch::default();
        let mut changed = false;
        if let Some(tip) = seen.tip {
            batch.put_cf(chain, TIP, tip.to_be_bytes());
            changed = true;
        }
        for (txid, height) in &seen.txs {
            let key = txid.as_byte_array();
            if self.db.get_pinned_cf(attempts, key)?.is_none() {
                continue;
            }
            match height {
                Some(h) => batch.put_cf(chain, key, h.to_be_bytes()),
                None => batch.delete_cf(chain, key),
            }
            changed = true;
        }
        if let Some(log_id) = &seen.log_id {
            batch.put_cf(chain, LOG_ID, log_id.as_bytes());
            // Positions in a topic belong to the log they were read for.
            batch.delete_cf(chain, KAFKA_POSITIONS);
        }
        if let Some(positions) = &seen.kafka {
            let mut v = Vec::with_capacity(positions.len() * 12);
            for (p, offset) in positions {
                v.extend_from_slice(&p.to_be_bytes());
                v.extend_from_slice(&offset.to_be_bytes());
            }
            batch.put_cf(chain, KAFKA_POSITIONS, v);
        }
        batch.put_cf(chain, CURSOR, seen.cursor.to_be_bytes());
        let mut opts = WriteOptions::default();
        opts.set_sync(changed);
        self.db.write_opt(batch, &opts)?;
        Ok(changed)
    }

    /// The indexer's event offset to read from next; `None` before the first
    /// observation.
    pub fn cursor(&self) -> Result<Option<u64>, SagaStoreError> {
        match self.db.get_pinned_cf(self.cf(CHAIN), CURSOR)? {
            Some(v) => Ok(Some(id_of(&v)?)),
            None => Ok(None),
        }
    }

    /// Where the Kafka event source reads on from in each partition (`None`: it never
    /// read since the cursor's log was chosen).
    pub fn kafka_positions(&self) -> Result<Option<BTreeMap<i32, i64>>, SagaStoreError> {
        let Some(v) = self.db.get_pinned_cf(self.cf(CHAIN), KAFKA_POSITIONS)? else {
            return Ok(None);
        };
        if v.len() % 12 != 0 {
            return Err(corrupt("kafka positions", "not 12-byte entries"));
        }
        Ok(Some(
            v.chunks_exact(12)
                .map(|c| {
                    let p = i32::from_be_bytes(c[..4].try_into().expect("4 bytes"));
                    let o = i64::from_be_bytes(c[4..].try_into().expect("8 bytes"));
                    (p, o)
                })
                .collect(),
        ))
    }

    /// The indexer's event log the cursor belongs to (empty before the first reconcile).
    pub fn log_id(&self) -> Result<String, SagaStoreError> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CHAIN), LOG_ID)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default())
    }

    /// The indexer's tip height as last observed.
    pub fn chain_tip(&self) -> Result<Option<u32>, SagaStoreError> {
        self.height(TIP)
    }

    /// The height of the block that confirmed `txid` (a version of an unfinished
    /// withdrawal), as last observed.
    pub fn confirmed_height(&self, txid: &Txid) -> Result<Option<u32>, SagaStoreError> {
        self.height(txid.as_byte_array())
    }

    fn height(&self, key: &[u8]) -> Result<Option<u32>, SagaStoreError> {
        match self.db.get_pinned_cf(self.cf(CHAIN), key)? {
            Some(v) => Ok(Some(u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| corrupt("height", "not 4 bytes"))?,
            ))),
            None => Ok(None),
        }
    }

    /// Every txid unfinished withdrawals watch.
    pub fn watched_txids(&self) -> Result<Vec<Txid>, SagaStoreError> {
        self.keys(ATTEMPTS)
            .map(|k| {
                let bytes: [u8; 32] = k?
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("attempt", "txid not 32 bytes"))?;
                Ok(Txid::from_byte_array(bytes))
            })
            .collect()
    }

    /// Every coin some withdrawal holds (coin selection must not pick them).
    pub fn reserved(&self) -> Result<HashSet<OutPoint>, SagaStoreError> {
        self.keys(RESERVATIONS)
            .map(|k| deserialize(&k?).map_err(|e| corrupt("reservation", e)))
            .collect()
    }

    /// Withdrawals by id from `after` on (exclusive), at most `limit`.
    pub fn list(&self, after: u64, limit: usize) -> Result<Vec<Withdrawal>, SagaStoreError> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new()); // nothing comes after the last id
        };
        let start = first.to_be_bytes();
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(WITHDRAWALS), mode) {
            if out.len() >= limit {
                break;
            }
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }

    /// Withdrawals with a step still to run (to resume at start).
    pub fn unfinished(&self) -> Result<Vec<Withdrawal>, SagaStoreError> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.list(after, 1_000)?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = last.id;
            out.extend(page.into_iter().filter(|w| w.next_step() != Step::Rest));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::{Attempt, Coin, FeeRate, State};
    use bitcoin::hashes::Hash;
    use bitcoin::{Amount, Txid};

    fn request(id: &str, sat: u64) -> Request {
        Request {
            request_id: id.into(),
            wallet: "hot".into(),
            destination: "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into(),
            amount: Amount::from_sat(sat),
            fee_rate: FeeRate::SatPerVb(2.0),
            max_fee: Amount::from_sat(5_000),
        }
    }

    fn coin(n: u8) -> Coin {
        Coin {
            outpoint: OutPoint::new(Txid::from_byte_array([n; 32]), u32::from(n)),
            value: Amount::from_sat(100_000),
            script: bitcoin::ScriptBuf::new(),
        }
    }

    #[test]
    fn a_request_id_runs_once_and_cannot_be_reused_for_another_payment() {
        let dir = tempfile::tempdir().unwrap();
        let store = SagaStore::open(dir.path()).unwrap();
        let first = store.submit(request("pay-1", 10_000), 1).unwrap();
        assert!(first.created);
        let again = store.submit(request("pay-1", 10_000), 2).unwrap();
        assert_eq!(
            (again.created, again.withdrawal.id),
            (false, first.withdrawal.id)
        );
        assert!(matches!(
            store.submit(request("pay-1", 10_001), 3),
            Err(SagaStoreError::Conflict(_))
        ));
        let other = store.submit(request("pay-2", 10_000), 4).unwrap();
        assert_ne!(other.withdrawal.id, first.withdrawal.id);
        assert_eq!(
            store.by_request("pay-1").unwrap().unwrap().id,
            first.withdrawal.id
        );
    }

    #[test]
    fn a_coin_is_held_by_one_withdrawal_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = SagaStore::open(dir.path()).unwrap();
        let a = store.submit(request("a", 10_000), 1).unwrap().withdrawal;
        let b = store.submit(request("b", 10_000), 1).unwrap().withdrawal;
        let a = store
            .record(&a, Outcome::Reserved(vec![coin(1), coin(2)]), 2)
            .unwrap();
        let taken = store.record(&b, Outcome::Reserved(vec![coin(3), coin(2)]), 2);
        assert!(
            matches!(taken, Err(SagaStoreError::CoinTaken { holder, .. }) if holder == a.id),
            "{taken:?}"
        );
        // Nothing of the refused reservation was written.
        assert_eq!(
            store.reserved().unwrap(),
            HashSet::from([coin(1).outpoint, coin(2).outpoint])
        );
        assert_eq!(store.get(b.id).unwrap().unwrap().state, State::Received);
        let a = store.record(&a, Outcome::Cancelled, 3).unwrap();
        assert_eq!(a.state, State::Cancelled);
        assert!(store.reserved().unwrap().is_empty());
        let b = store
            .record(&b, Outcome::Reserved(vec![coin(3), coin(2)]), 4)
            .unwrap();
        assert_eq!(b.state, State::Reserved);
    }

    #[test]
    fn outcomes_are_durable_stale_writers_are_refused_and_unfinished_sagas_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (done_id, open_id) = {
            let store = SagaStore::open(dir.path()).unwrap();
            let mut updates = store.updates();
            let w = store.submit(request("x", 10_000), 1).unwrap().withdrawal;
            let reserved = store
                .record(&w, Outcome::Reserved(vec![coin(1)]), 2)
                .unwrap();
            assert!(matches!(
                store.record(&w, Outcome::Cancelled, 3),
                Err(SagaStoreError::Stale(_))
            ));
            let signed = store
                .record(
                    &reserved,
                    Outcome::Signed(Attempt {
                        txid: Txid::from_byte_array([5; 32]),
                        raw: vec![1, 2, 3],
                        fee: Amount::from_sat(300),
                        fee_rate: 2.0,
                        fee_choice: String::new(),
                    }),
                    3,
                )
                .unwrap();
            assert_eq!(updates.try_recv().unwrap().state, State::Received);
            assert_eq!(updates.try_recv().unwrap().state, State::Reserved);
            assert_eq!(updates.try_recv().unwrap().state, State::Signed);
            let done = store.submit(request("y", 10_000), 4).unwrap().withdrawal;
            let done = store
                .record(&done, Outcome::Failed("insufficient funds".into()), 5)
                .unwrap();
            (done.id, signed.id)
        };
        let store = SagaStore::open(dir.path()).unwrap();
        let open = store.get(open_id).unwrap().unwrap();
        assert_eq!(
            (open.state, open.next_step()),
            (State::Signed, Step::Broadcast)
        );
        assert_eq!(open.attempts[0].raw, vec![1, 2, 3]);
        let unfinished: Vec<u64> = store.unfinished().unwrap().iter().map(|w| w.id).collect();
        assert_eq!(unfinished, vec![open_id]);
        assert_eq!(store.get(done_id).unwrap().unwrap().state, State::Failed);
        assert_eq!(store.reserved().unwrap(), HashSet::from([coin(1).outpoint]));
        assert_eq!(store.list(0, 10).unwrap().len(), 2);
    }

    #[test]
    fn the_chain_record_keeps_only_watched_txids_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let attempt = attempt(5);
        let stranger = Txid::from_byte_array([6; 32]);
        let watched = {
            let store = SagaStore::open(dir.path()).unwrap();
            assert_eq!(store.cursor().unwrap(), None);
            let w = store.submit(request("x", 10_000), 1).unwrap().withdrawal;
            let w = store
                .record(&w, Outcome::Reserved(vec![coin(1)]), 2)
                .unwrap();
            let w = store
                .record(&w, Outcome::Signed(attempt.clone()), 3)
                .unwrap();
            assert_eq!(store.watched_txids().unwrap(), vec![attempt.txid]);
            let seen = Observation {
                cursor: 42,
                log_id: Some("log-a".into()),
                tip: Some(120),
                txs: BTreeMap::from([(attempt.txid, Some(118)), (stranger, Some(119))]),
                kafka: None,
            };
            assert!(store.observe(&seen).unwrap());
            // Only the cursor moves: nothing a withdrawal watches changed.
            let skipped = Observation {
                cursor: 50,
                txs: BTreeMap::from([(stranger, None)]),
                kafka: Some(BTreeMap::from([(0, 7), (2, 9)])),
                ..Observation::default()
            };
            assert!(!store.observe(&skipped).unwrap());
            w
        };
        let store = SagaStore::open(dir.path()).unwrap();
        assert_eq!(store.cursor().unwrap(), Some(50));
        // The log the cursor belongs to stays until a reconcile chooses another.
        assert_eq!(store.log_id().unwrap(), "log-a");
        assert_eq!(store.chain_tip().unwrap(), Some(120));
        assert_eq!(store.confirmed_height(&attempt.txid).unwrap(), Some(118));
        assert_eq!(store.confirmed_height(&stranger).unwrap(), None);
        // The topic's positions came back with the cursor they were written with...
        assert_eq!(
            store.kafka_positions().unwrap(),
            Some(BTreeMap::from([(0, 7), (2, 9)]))
        );
        // ...and go when another log is chosen: they belong to the old one.
        let rechosen = Observation {
            cursor: 50,
            log_id: Some("log-a".into()),
            ..Observation::default()
        };
        store.observe(&rechosen).unwrap();
        assert_eq!(store.kafka_positions().unwrap(), None);
        // Reorged out, then a finished withdrawal stops being watched.
        let out = Observation {
            cursor: 51,
            txs: BTreeMap::from([(attempt.txid, None)]),
            ..Observation::default()
        };
        assert!(store.observe(&out).unwrap());
        assert_eq!(store.confirmed_height(&attempt.txid).unwrap(), None);
        let w = store.record(&watched, Outcome::Sending, 4).unwrap();
        let w = store
            .record(&w, Outcome::Broadcast { height: 120 }, 4)
            .unwrap();
        store
            .record(&w, Outcome::Unclear("operator".into()), 5)
            .unwrap();
        assert!(store.watched_txids().unwrap().is_empty());
    }

    /// `n` withdrawals submitted as `prefix0`, `prefix1`...
    fn queued(store: &SagaStore, prefix: &str, n: usize) -> Vec<Withdrawal> {
        (0..n)
            .map(|i| {
                let r = request(&format!("{prefix}{i}"), 10_000);
                store.submit(r, 1).unwrap().withdrawal
            })
            .collect()
    }

    fn attempt(n: u8) -> Attempt {
        Attempt {
            txid: Txid::from_byte_array([n; 32]),
            raw: vec![1],
            fee: Amount::from_sat(300),
            fee_rate: 2.0,
            fee_choice: String::new(),
        }
    }

    #[test]
    fn a_batch_is_written_with_its_members_and_a_cancelled_member_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SagaStore::open(dir.path()).unwrap();
        let ws = queued(&store, "b", 3);
        let mut updates = store.updates();
        let b = store.form_batch(&ws, 2).unwrap();
        assert!(b.id > ws[2].id, "ids are shared with withdrawals");
        // A member is batched once: the stored record moved on.
        assert!(matches!(
            store.form_batch(&ws[..2], 2),
            Err(SagaStoreError::Stale(_))
        ));
        assert_eq!(
            store.unfinished().unwrap(),
            Vec::new(),
            "members wait on the batch"
        );
        assert_eq!(store.unfinished_batches().unwrap(), vec![b.clone()]);
        assert_eq!(updates.try_recv().unwrap().batch, Some(b.id));
        let b = store
            .record(&b, Outcome::Reserved(vec![coin(1)]), 3)
            .unwrap();
        let attempt = attempt(5);
        let b = store
            .record(&b, Outcome::Signed(attempt.clone()), 4)
            .unwrap();
        for w in &ws {
            let m = store.get(w.id).unwrap().unwrap();
            assert_eq!((m.state, m.batch), (State::Signed, Some(b.id)));
            assert_eq!(m.attempts, vec![attempt.clone()]);
        }
        assert_eq!(store.reserved().unwrap(), HashSet::from([coin(1).outpoint]));
        // A member cancelled before the send: it leaves, the unsent bytes go.
        let m0 = store.get(ws[0].id).unwrap().unwrap();
        let left = store.record(&m0, Outcome::Cancelled, 5).unwrap();
        assert_eq!(left.state, State::Cancelled);
        let b = store.batch(b.id).unwrap().unwrap();
        assert_eq!(
            (b.state, b.request.amount),
            (State::Reserved, Amount::from_sat(20_000))
        );
        assert_eq!(b.members.as_ref().unwrap().len(), 2);
        assert!(
            store.watched_txids().unwrap().is_empty(),
            "the discarded version"
        );
        assert_eq!(store.get(ws[1].id).unwrap().unwrap().state, State::Reserved);
        // The last two leave: the batch is cancelled and its coin released.
        for w in &ws[1..] {
            let m = store.get(w.id).unwrap().unwrap();
            store.record(&m, Outcome::Cancelled, 6).unwrap();
        }
        assert_eq!(store.batch(b.id).unwrap().unwrap().state, State::Cancelled);
        assert!(store.reserved().unwrap().is_empty());
        assert!(store.unfinished_batches().unwrap().is_empty());
        // And it all survives a restart.
        drop(store);
        let store = SagaStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get(ws[2].id).unwrap().unwrap().state,
            State::Cancelled
        );
    }

    #[test]
    fn once_a_batch_may_have_been_sent_its_members_cannot_be_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let store = SagaStore::open(dir.path()).unwrap();
        let ws = queued(&store, "s", 2);
        let b = store.form_batch(&ws, 2).unwrap();
        let b = store
            .record(&b, Outcome::Reserved(vec![coin(1)]), 3)
            .unwrap();
        let attempt = attempt(6);
        let b = store.record(&b, Outcome::Signed(attempt), 4).unwrap();
        let b = store.record(&b, Outcome::Sending, 5).unwrap();
        let m = store.get(ws[0].id).unwrap().unwrap();
        let refused = store.record(&m, Outcome::Cancelled, 6).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("may already be on the network"),
            "{refused}"
        );
        // Nothing changed.
        assert_eq!(store.batch(b.id).unwrap().unwrap(), b);
        assert_eq!(store.get(ws[0].id).unwrap().unwrap(), m);
    }
}
