//! Watched transactions in bitcoind's mempool: those paying to or spending watched scripts.
//! Kept in memory (bitcoind's mempool is the truth and is re-read after any doubt), shown as
//! unconfirmed balances and transfers, and logged as events: seen, and, when a transaction
//! leaves the mempool without being mined, replaced (a conflicting transaction took its
//! inputs) or evicted.

mod tracker;

pub use tracker::{SharedMempool, TrackError, Tracker};

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bitcoin::{OutPoint, Transaction, Txid};

use crate::script_filter::ScriptFilter;
use crate::store::{Reader, Store, StoreError};
use crate::types::{Received, ScriptId, Spent, WalletId};

/// What became of a transaction that left the mempool unmined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// A conflicting transaction (in the mempool or a block) spent its inputs.
    Replaced {
        /// The conflicting transaction.
        by: Txid,
    },
    /// Dropped without a known conflict (expiry, size limit, `devnet_evict`...).
    Evicted,
}

/// A watched transaction waiting in the mempool.
#[derive(Clone, Debug)]
pub struct PendingTx {
    /// Its txid.
    pub txid: Txid,
    /// Watched outputs it creates, with the wallets of their scripts.
    pub received: Vec<(Received, Vec<WalletId>)>,
    /// Watched outputs it spends, with the wallets of their scripts.
    pub spent: Vec<(Spent, Vec<WalletId>)>,
    /// Every outpoint it spends (to see conflicts).
    pub inputs: Vec<OutPoint>,
    /// When it was first seen.
    pub seen: std::time::SystemTime,
    /// The tracker's count of added transactions when it was added (see
    /// [`Mempool::reconcile`]).
    pub added: u64,
}

impl PendingTx {
    /// The wallets it pays or spends from, in id order.
    pub fn wallets(&self) -> Vec<WalletId> {
        let all = self.received.iter().map(|(_, w)| w);
        let mut wallets: Vec<WalletId> = all
            .chain(self.spent.iter().map(|(_, w)| w))
            .flatten()
            .copied()
            .collect();
        wallets.sort_unstable();
        wallets.dedup();
        wallets
    }
}

/// A change to report in the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A watched transaction entered the mempool; the wallets it pays or spends from.
    Seen(Txid, Vec<WalletId>),
    /// It left the mempool unmined; the wallets it paid or spent from.
    Gone(Txid, Gone, Vec<WalletId>),
}

/// Transactions that left the mempool, remembered for queries (bounded).
const GONE_KEPT: usize = 10_000;
/// How long a removed transaction waits for the conflicting transaction that explains it
/// (bitcoind announces the removal of the replaced transaction before the replacement).
const REMOVAL_GRACE: Duration = Duration::from_secs(1);

/// The watched part of the mempool.
#[derive(Default)]
pub struct Mempool {
    txs: HashMap<Txid, PendingTx>,
    /// Inputs of tracked transactions: who spends what.
    spenders: HashMap<OutPoint, Txid>,
    /// Removed by bitcoind, waiting to learn whether it was replaced.
    removing: HashMap<Txid, Instant>,
    gone: HashMap<Txid, Gone>,
    gone_order: VecDeque<Txid>,
    /// Mempool transactions already looked at (watched or not), so a resync fetches only
    /// what is new.
    checked: HashSet<Txid>,
    /// Watched transactions added so far, to tell a resync's snapshot from what came after.
    adds: u64,
}

impl Mempool {
    /// Forgets which mempool transactions were already looked at: after the watched
    /// scripts change, the next resync looks at every one again (one may pay a script
    /// watched only now).
    pub fn forget_checked(&mut self) {
        self.checked.clear();
    }

    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracked transaction.
    pub fn get(&self, txid: &Txid) -> Option<&PendingTx> {
        self.txs.get(txid)
    }

    /// What became of a transaction that left the mempool unmined, if known.
    pub fn gone(&self, txid: &Txid) -> Option<Gone> {
        self.gone.get(txid).copied()
    }

    /// Tracked txids.
    pub fn txids(&self) -> HashSet<Txid> {
        self.txs.keys().copied().collect()
    }

    /// Number of tracked transactions.
    pub fn len(&self) -> usize {
        self.txs.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }

    /// Satoshis unconfirmed transactions pay to `script` or to `wallet`'s scripts, not yet
    /// spent by another unconfirmed transaction. Transactions `indexed` says are in the
    /// reader's snapshot already count as confirmed there: a block is committed a moment
    /// before the tracker hears it mined them, and they must not count twice meanwhile.
    pub fn unconfirmed(
        &self,
        wallet: Option<WalletId>,
        script: Option<&ScriptId>,
        indexed: impl Fn(&Txid) -> bool,
    ) -> u64 {
        let mut total = 0;
        for tx in self.txs.values().filter(|tx| !indexed(&tx.txid)) {
            for (r, wallets) in &tx.received {
                let ours = wallet.is_some_and(|w| wallets.contains(&w))
                    || script.is_some_and(|s| *s == r.script_id);
                let outpoint = OutPoint::new(tx.txid, r.vout);
                if ours && !self.spenders.contains_key(&outpoint) {
                    total += r.value;
                }
            }
        }
        total
    }

    /// Satoshis of confirmed outputs of `script` / `wallet` that unconfirmed transactions spend.
    pub fn pending_spends(&self, wallet: Option<WalletId>, script: Option<&ScriptId>) -> u64 {
        let mut total = 0;
        for tx in self.txs.values() {
            for (s, wallets) in &tx.spent {
                let ours = wallet.is_some_and(|w| wallets.contains(&w))
                    || script.is_some_and(|id| *id == s.script_id);
                if ours && !self.txs.contains_key(&s.outpoint.txid) {
                    total += s.value;
                }
            }
        }
        total
    }

    fn forget(&mut self, txid: &Txid) -> Option<PendingTx> {
        let tx = self.txs.remove(txid)?;
        for input in &tx.inputs {
            if self.spenders.get(input) == Some(txid) {
                self.spenders.remove(input);
            }
        }
        self.removing.remove(txid);
        Some(tx)
    }

    fn remember_gone(&mut self, txid: Txid, how: Gone) {
        if self.gone.insert(txid, how).is_none() {
            self.gone_order.push_back(txid);
            if self.gone_order.len() > GONE_KEPT {
                if let Some(old) = self.gone_order.pop_front() {
                    self.gone.remove(&old);
                }
            }
        }
    }

    /// Drops `txid` and every tracked transaction spending its outputs, as `how`.
    fn drop_with_descendants(&mut self, txid: Txid, how: Gone, changes: &mut Vec<Change>) {
        let mut stack = vec![txid];
        while let Some(t) = stack.pop() {
            let Some(tx) = self.forget(&t) else { continue };
            self.remember_gone(t, how);
            changes.push(Change::Gone(t, how, tx.wallets()));
            let children: Vec<Txid> = self
                .txs
                .values()
                .filter(|c| c.inputs.iter().any(|i| i.txid == tx.txid))
                .map(|c| c.txid)
                .collect();
            stack.extend(children);
        }
    }

    /// A transaction seen in the mempool or in a block: any tracked transaction it conflicts
    /// with (spends one of the same outpoints) was replaced by it.
    pub fn conflicts(&mut self, tx: &Transaction) -> Vec<Change> {
        let txid = tx.compute_txid();
        let mut changes = Vec::new();
        for input in &tx.input {
            if let Some(&other) = self.spenders.get(&input.previous_output) {
                if other != txid {
                    self.drop_with_descendants(other, Gone::Replaced { by: txid }, &mut changes);
                }
            }
        }
        changes
    }

    /// A transaction entered the mempool: tracks it when it touches watched scripts.
    pub fn added(
        &mut self,
        store: &Store,
        scripts: &ScriptFilter,
        tx: &Transaction,
    ) -> Result<Vec<Change>, StoreError> {
        let mut changes = self.conflicts(tx);
        let txid = tx.compute_txid();
        self.checked.insert(txid);
        if self.txs.contains_key(&txid) {
            return Ok(changes);
        }
        let mut received = Vec::new();
        for (vout, out) in tx.output.iter().enumerate() {
            if !scripts.may_contain(out.script_pubkey.as_bytes()) {
                continue;
            }
            let id = ScriptId::of(&out.script_pubkey);
            if let Some(rec) = store.watch(&id)? {
                received.push((
                    Received {
                        vout: vout as u32,
                        script_id: id,
                        value: out.value.to_sat(),
                    },
                    rec.wallets,
                ));
            }
        }
        let mut spent = Vec::new();
        for (i, input) in tx.input.iter().enumerate() {
            let op = input.previous_output;
            let found = match store.utxo(&op)? {
                Some(u) => Some((u.script_id, u.value)),
                None => self.txs.get(&op.txid).and_then(|parent| {
                    parent
                        .received
                        .iter()
                        .find(|(r, _)| r.vout == op.vout)
                        .map(|(r, _)| (r.script_id, r.value))
                }),
            };
            if let Some((script_id, value)) = found {
                let wallets = store
                    .watch(&script_id)?
                    .map(|r| r.wallets)
                    .unwrap_or_default();
                spent.push((
                    Spent {
                        input: i as u32,
                        outpoint: op,
                        script_id,
                        value,
                    },
                    wallets,
                ));
            }
        }
        if received.is_empty() && spent.is_empty() {
            return Ok(changes);
        }
        let inputs: Vec<OutPoint> = tx.input.iter().map(|i| i.previous_output).collect();
        for op in &inputs {
            self.spenders.insert(*op, txid);
        }
        self.gone.remove(&txid);
        self.adds += 1;
        let pending = PendingTx {
            txid,
            received,
            spent,
            inputs,
            seen: std::time::SystemTime::now(),
            added: self.adds,
        };
        changes.push(Change::Seen(txid, pending.wallets()));
        self.txs.insert(txid, pending);
        Ok(changes)
    }

    /// bitcoind removed `txid` other than by mining it: wait briefly for the conflicting
    /// transaction that would explain it.
    pub fn removed(&mut self, txid: Txid) {
        if self.txs.contains_key(&txid) {
            self.removing.entry(txid).or_insert_with(Instant::now);
        }
    }

    /// `txids` were mined: they leave the mempool without an event of their own (the block's
    /// TRANSFER_CONFIRMED tells it).
    pub fn mined(&mut self, txids: impl IntoIterator<Item = Txid>) {
        for t in txids {
            self.forget(&t);
        }
    }

    /// Removals whose grace ran out without a conflict: evicted.
    pub fn expire(&mut self, now: Instant) -> Vec<Change> {
        let due: Vec<Txid> = self
            .removing
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= REMOVAL_GRACE)
            .map(|(t, _)| *t)
            .collect();
        let mut changes = Vec::new();
        for t in due {
            self.drop_with_descendants(t, Gone::Evicted, &mut changes);
        }
        changes
    }

    /// Watched transactions added so far: read before asking bitcoind for its mempool, and
    /// given to [`Mempool::reconcile`] with the answer.
    pub fn adds(&self) -> u64 {
        self.adds
    }

    /// Brings the tracker in line with bitcoind's whole mempool (`in_mempool`, asked for
    /// when [`Mempool::adds`] was `asked_at`), after a gap or a reorg: tracked
    /// transactions bitcoind no longer has were mined (when the store has them confirmed)
    /// or are gone. A transaction added after the question is newer than the answer, not
    /// gone (a ZMQ notice handled meanwhile). Returns the txids to look at as new.
    pub fn reconcile(
        &mut self,
        store: &Store,
        in_mempool: &HashSet<Txid>,
        asked_at: u64,
        confirmed: impl Fn(&Store, &Txid) -> Result<bool, StoreError>,
    ) -> Result<(Vec<Change>, Vec<Txid>), StoreError> {
        let mut changes = Vec::new();
        for txid in self.txids() {
            if in_mempool.contains(&txid) {
                continue;
            }
            if self.txs.get(&txid).is_some_and(|t| t.added > asked_at) {
                continue;
            }
            if confirmed(store, &txid)? {
                self.forget(&txid);
            } else if self.txs.contains_key(&txid) {
                // Its conflict, if any, came while we were not listening.
                self.drop_with_descendants(txid, Gone::Evicted, &mut changes);
            }
        }
        self.checked.retain(|t| in_mempool.contains(t));
        let new = in_mempool
            .iter()
            .filter(|t| !self.txs.contains_key(*t) && !self.checked.contains(*t))
            .copied()
            .collect();
        Ok((changes, new))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bitcoin::hashes::Hash;
    use bitcoin::{absolute, transaction, Amount, ScriptBuf, TxIn, TxOut};

    fn paying(script: &ScriptBuf, n: u8) -> Transaction {
        Transaction {
            version: transaction::Version::TWO,
            lock_time: absolute::LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::new(Txid::from_byte_array([n; 32]), 0),
                ..TxIn::default()
            }],
            output: vec![TxOut {
                value: Amount::from_sat(1000 + u64::from(n)),
                script_pubkey: script.clone(),
            }],
        }
    }

    #[test]
    fn a_resync_does_not_take_a_transaction_added_after_its_question_for_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), bitcoin::Network::Regtest).unwrap();
        let script = ScriptBuf::from_hex("0014751e76e8199196d454941c45d1b3a323f1433bd6").unwrap();
        let descriptor = format!("raw({})", script.to_hex_string());
        crate::wallets::add(
            &store,
            bitcoin::Network::Regtest,
            "w",
            &[descriptor],
            None,
            1,
        )
        .unwrap();
        let scripts = ScriptFilter::new(10, 1e-3);
        scripts.insert(script.as_bytes());
        let mut pool = Mempool::new();
        let (before, after) = (paying(&script, 1), paying(&script, 2));
        pool.added(&store, &scripts, &before).unwrap();
        // bitcoind is asked here; its answer holds neither (the first left meanwhile, the
        // second is announced by ZMQ while it answers).
        let asked_at = pool.adds();
        pool.added(&store, &scripts, &after).unwrap();
        let (changes, _) = pool
            .reconcile(&store, &HashSet::new(), asked_at, |_, _| Ok(false))
            .unwrap();
        assert!(
            pool.get(&after.compute_txid()).is_some(),
            "kept: newer than the answer"
        );
        assert!(pool.get(&before.compute_txid()).is_none());
        assert!(
            matches!(&changes[..], [Change::Gone(t, Gone::Evicted, _)] if *t == before.compute_txid())
        );
    }
}
