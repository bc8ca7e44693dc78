//! The unconfirmed transactions and their in-mempool dependencies.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bitcoin::{Amount, OutPoint, Transaction, Txid};

/// One mempool transaction.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The transaction.
    pub tx: Arc<Transaction>,
    /// Its txid.
    pub txid: Txid,
    /// Inputs minus outputs.
    pub fee: Amount,
    /// Virtual size in vbytes.
    pub vsize: u64,
    /// Weight units.
    pub weight: u64,
    /// Unix time it entered.
    pub time: u64,
    /// Chain height when it entered.
    pub height: u32,
    /// Entry order; parents always come before children.
    pub order: u64,
}

impl Entry {
    /// Whether this transaction itself signals BIP125 replaceability.
    pub(crate) fn signals_rbf(&self) -> bool {
        self.tx.input.iter().any(|i| i.sequence.0 < 0xffff_fffe)
    }
}

/// The mempool: entries, who spends what, and the ZMQ mempool sequence number.
#[derive(Debug)]
pub(crate) struct Mempool {
    entries: HashMap<Txid, Entry>,
    spends: HashMap<OutPoint, Txid>,
    next_order: u64,
    /// Next mempool sequence number for ZMQ `A`/`R` messages (starts at 1, like Core).
    sequence: u64,
}

impl Mempool {
    /// An empty mempool.
    pub(crate) fn new() -> Mempool {
        Mempool {
            entries: HashMap::new(),
            spends: HashMap::new(),
            next_order: 0,
            sequence: 1,
        }
    }

    /// Returns the current mempool sequence number and advances it.
    pub(crate) fn next_sequence(&mut self) -> u64 {
        let s = self.sequence;
        self.sequence += 1;
        s
    }

    /// One entry.
    pub(crate) fn get(&self, txid: &Txid) -> Option<&Entry> {
        self.entries.get(txid)
    }

    /// Whether a txid is in the mempool.
    pub(crate) fn contains(&self, txid: &Txid) -> bool {
        self.entries.contains_key(txid)
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The mempool transaction spending an outpoint.
    pub(crate) fn spender(&self, outpoint: &OutPoint) -> Option<Txid> {
        self.spends.get(outpoint).copied()
    }

    /// Adds an entry; its conflicts must have been removed.
    pub(crate) fn insert(&mut self, mut entry: Entry) {
        entry.order = self.next_order;
        self.next_order += 1;
        for input in &entry.tx.input {
            self.spends.insert(input.previous_output, entry.txid);
        }
        self.entries.insert(entry.txid, entry);
    }

    /// Removes one entry (not its descendants).
    pub(crate) fn remove(&mut self, txid: &Txid) -> Option<Entry> {
        let entry = self.entries.remove(txid)?;
        for input in &entry.tx.input {
            if self.spends.get(&input.previous_output) == Some(txid) {
                self.spends.remove(&input.previous_output);
            }
        }
        Some(entry)
    }

    /// Entries in entry order (parents first).
    pub(crate) fn sorted(&self) -> Vec<&Entry> {
        let mut all: Vec<&Entry> = self.entries.values().collect();
        all.sort_by_key(|e| e.order);
        all
    }

    /// In-mempool parents of a transaction.
    pub(crate) fn parents(&self, tx: &Transaction) -> BTreeSet<Txid> {
        tx.input
            .iter()
            .map(|i| i.previous_output.txid)
            .filter(|t| self.entries.contains_key(t))
            .collect()
    }

    /// In-mempool children of a transaction.
    pub(crate) fn children(&self, txid: &Txid) -> BTreeSet<Txid> {
        let Some(entry) = self.entries.get(txid) else {
            return BTreeSet::new();
        };
        (0..entry.tx.output.len() as u32)
            .filter_map(|vout| self.spends.get(&OutPoint { txid: *txid, vout }).copied())
            .collect()
    }

    /// All in-mempool ancestors, excluding the transaction itself.
    pub(crate) fn ancestors(&self, txid: &Txid) -> HashSet<Txid> {
        let mut seen = HashSet::new();
        let mut stack: Vec<Txid> = match self.entries.get(txid) {
            Some(e) => self.parents(&e.tx).into_iter().collect(),
            None => Vec::new(),
        };
        while let Some(t) = stack.pop() {
            if seen.insert(t) {
                if let Some(e) = self.entries.get(&t) {
                    stack.extend(self.parents(&e.tx));
                }
            }
        }
        seen
    }

    /// All in-mempool descendants, excluding the transaction itself.
    pub(crate) fn descendants(&self, txid: &Txid) -> HashSet<Txid> {
        let mut seen = HashSet::new();
        let mut stack: Vec<Txid> = self.children(txid).into_iter().collect();
        while let Some(t) = stack.pop() {
            if seen.insert(t) {
                stack.extend(self.children(&t));
            }
        }
        seen
    }

    /// Whether the transaction or an unconfirmed ancestor signals BIP125.
    pub(crate) fn bip125_replaceable(&self, txid: &Txid) -> bool {
        let own = self.entries.get(txid).is_some_and(Entry::signals_rbf);
        own || self
            .ancestors(txid)
            .iter()
            .any(|a| self.entries.get(a).is_some_and(Entry::signals_rbf))
    }

    /// Total virtual size.
    pub(crate) fn bytes(&self) -> u64 {
        self.entries.values().map(|e| e.vsize).sum()
    }

    /// Total fees.
    pub(crate) fn total_fee(&self) -> Amount {
        self.entries.values().map(|e| e.fee).sum()
    }
}
