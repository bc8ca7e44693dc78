//! Apply stage: the one sequential stage. Connects filtered blocks in height order to the
//! watched UTXO set and balances, held in memory, and emits each block's writes together
//! with the undo entries that restore the state before it.

use std::collections::{BTreeMap, BTreeSet};

use bitcoin::hashes::Hash;
use bitcoin::{BlockHash, OutPoint};
// Keys are txids and script hashes, uniform already: a cryptographic hasher buys nothing.
use rustc_hash::FxHashMap as HashMap;

use super::filter::FilteredBlock;
use crate::store::schema::{self, Cf, Recent, UndoEntry};
use crate::store::{Reader, Store, StoreError};
use crate::types::{
    Balance, Event, EventKind, Received, ScriptId, Spent, Transfer, Utxo, WalletId,
    COINBASE_MATURITY,
};

/// A block that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The block does not extend the indexed tip.
    #[error("block {height} ({hash}) does not extend the indexed tip {tip}")]
    NotConnecting {
        /// Its height.
        height: u32,
        /// Its hash.
        hash: BlockHash,
        /// The indexed tip, as "height hash".
        tip: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything one block changes, and how to undo it.
pub struct BlockChanges {
    /// Height.
    pub height: u32,
    /// Hash.
    pub hash: BlockHash,
    /// Serialized block size.
    pub size: usize,
    /// Transactions in the block.
    pub tx_count: usize,
    /// Final value of every key the block touches (`None`: delete), in key order: RocksDB's
    /// memtable inserts sorted keys far faster than random ones.
    pub writes: BTreeMap<(Cf, Vec<u8>), Option<Vec<u8>>>,
    /// Value of each touched key before the block.
    pub undo: Vec<UndoEntry>,
    /// What the block adds to the event log (offsets are given by the writer).
    pub events: Vec<Event>,
}

impl BlockChanges {
    /// Records `prior` as the pre-block value of `key` unless the block already touched it.
    fn touch(&mut self, cf: Cf, key: &[u8], prior: impl FnOnce() -> Option<Vec<u8>>) {
        let k = (cf, key.to_vec());
        if !self.writes.contains_key(&k) {
            self.undo.push(UndoEntry {
                cf,
                key: key.to_vec(),
                prior: prior(),
            });
            self.writes.insert(k, None);
        }
    }

    fn set(
        &mut self,
        cf: Cf,
        key: &[u8],
        prior: impl FnOnce() -> Option<Vec<u8>>,
        value: Option<Vec<u8>>,
    ) {
        self.touch(cf, key, prior);
        self.writes.insert((cf, key.to_vec()), value);
    }
}

/// The watched state the apply stage keeps in memory, mirroring its column families.
pub struct ApplyState<'s> {
    store: &'s Store,
    tip: Option<(u32, BlockHash)>,
    utxos: HashMap<OutPoint, Utxo>,
    script_balances: HashMap<ScriptId, Balance>,
    wallet_balances: HashMap<WalletId, Balance>,
    wallets_of: HashMap<ScriptId, Vec<WalletId>>,
    // Coinbase outputs not yet mature, by creation height.
    immature: BTreeMap<u32, Vec<OutPoint>>,
    // Transfers kept as reorged out: confirming one again ends that record.
    reorged: std::collections::HashSet<bitcoin::Txid>,
    // Wallets' unspent outputs by creation height, as read or changed in this run.
    recent: HashMap<(WalletId, u32), Recent>,
}

fn encode_balance(b: &Balance) -> Option<Vec<u8>> {
    (!b.is_empty()).then(|| schema::encode_balance(b).to_vec())
}

impl<'s> ApplyState<'s> {
    /// Loads the watched UTXO set and balances from the database.
    pub fn load(store: &'s Store) -> Result<Self, StoreError> {
        let tip = store.tip()?;
        let utxos: HashMap<OutPoint, Utxo> = store.utxos()?.into_iter().collect();
        let mut script_balances = HashMap::default();
        store.for_each(Cf::ScriptBalance, |k, v| {
            let id = schema::decode_script_id(k)?;
            script_balances.insert(id, schema::decode_balance(v)?);
            Ok::<_, StoreError>(())
        })?;
        let mut wallet_balances = HashMap::default();
        store.for_each(Cf::WalletBalance, |k, v| {
            wallet_balances.insert(schema::decode_wallet(k)?, schema::decode_balance(v)?);
            Ok::<_, StoreError>(())
        })?;
        let mut immature: BTreeMap<u32, Vec<OutPoint>> = BTreeMap::new();
        if let Some((height, _)) = tip {
            for (op, u) in &utxos {
                if u.is_immature_at(height) {
                    immature.entry(u.height).or_default().push(*op);
                }
            }
        }
        let mut reorged = std::collections::HashSet::new();
        store.for_each(Cf::Reorged, |k, _| {
            let txid: [u8; 32] = k
                .try_into()
                .map_err(|_| schema::DecodeError::missing("reorged transfer's txid"))?;
            reorged.insert(bitcoin::Txid::from_byte_array(txid));
            Ok::<_, StoreError>(())
        })?;
        Ok(ApplyState {
            store,
            tip,
            utxos,
            script_balances,
            wallet_balances,
            wallets_of: HashMap::default(),
            immature,
            reorged,
            recent: HashMap::default(),
        })
    }

    /// The tip after the last applied block.
    pub fn tip(&self) -> Option<(u32, BlockHash)> {
        self.tip
    }

    fn wallets(&mut self, id: &ScriptId) -> Result<Vec<WalletId>, StoreError> {
        if let Some(w) = self.wallets_of.get(id) {
            return Ok(w.clone());
        }
        let wallets = self.store.watch(id)?.map(|r| r.wallets).unwrap_or_default();
        self.wallets_of.insert(*id, wallets.clone());
        Ok(wallets)
    }

    /// Changes the balances of `script_id` and its wallets with `f`, noting priors.
    fn update_balances(
        &mut self,
        ch: &mut BlockChanges,
        touched: &mut Touched,
        script_id: &ScriptId,
        f: impl Fn(&mut Balance),
    ) -> Result<(), StoreError> {
        let b = self.script_balances.entry(*script_id).or_default();
        ch.touch(Cf::ScriptBalance, &script_id.0, || encode_balance(b));
        f(b);
        touched.scripts.insert(*script_id);
        for w in self.wallets(script_id)? {
            // No undo entry: disconnecting moves wallet balances by their scripts' change.
            f(self.wallet_balances.entry(w).or_default());
            touched.wallets.insert(w);
        }
        Ok(())
    }

    /// An unspent output of `utxo`'s joins (`sign` 1) or leaves (-1) its wallets' outputs
    /// of its creation height.
    fn recent_change(
        &mut self,
        touched: &mut Touched,
        utxo: &Utxo,
        sign: i8,
    ) -> Result<(), StoreError> {
        for w in self.wallets(&utxo.script_id)? {
            let key = (w, utxo.height);
            let r = match self.recent.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let stored = match self
                        .store
                        .get(Cf::WalletRecent, &schema::wallet_recent_key(w, utxo.height))?
                    {
                        Some(v) => schema::decode_recent(&v)?,
                        None => Recent::default(),
                    };
                    e.insert(stored)
                }
            };
            let field = if utxo.coinbase {
                &mut r.coinbase
            } else {
                &mut r.plain
            };
            if sign > 0 {
                *field += utxo.value;
                r.count += 1;
            } else {
                *field = field.saturating_sub(utxo.value);
                r.count = r.count.saturating_sub(1);
            }
            touched.recent.insert(key);
        }
        Ok(())
    }

    /// Removes a watched UTXO (spent, or overwritten by a BIP30 duplicate).
    fn remove_utxo(
        &mut self,
        ch: &mut BlockChanges,
        touched: &mut Touched,
        op: &OutPoint,
        utxo: &Utxo,
        prev_tip: u32,
    ) -> Result<(), StoreError> {
        let encoded = schema::encode_utxo(utxo);
        ch.set(Cf::Utxo, &schema::outpoint_key(op), || Some(encoded), None);
        let su = schema::encode_script_utxo(utxo).to_vec();
        ch.set(
            Cf::ScriptUtxo,
            &schema::script_utxo_key(&utxo.script_id, op),
            || Some(su),
            None,
        );
        let immature = utxo.is_immature_at(prev_tip);
        self.recent_change(touched, utxo, -1)?;
        self.update_balances(ch, touched, &utxo.script_id, |b| {
            b.remove(utxo.value, immature)
        })
    }

    /// Connects `block` to the in-memory state and returns its writes and undo entries.
    pub fn apply(&mut self, block: FilteredBlock) -> Result<BlockChanges, ApplyError> {
        let height = block.height;
        if let Some((tip_height, tip_hash)) = self.tip {
            if height != tip_height + 1 || block.header.prev_blockhash != tip_hash {
                return Err(ApplyError::NotConnecting {
                    height,
                    hash: block.hash,
                    tip: format!("{tip_height} {tip_hash}"),
                });
            }
        }
        // Before this block the tip was height - 1; maturity is judged against it.
        let prev_tip = height.saturating_sub(1);
        let mut ch = BlockChanges {
            height,
            hash: block.hash,
            size: block.size,
            tx_count: block.txs.len(),
            writes: BTreeMap::new(),
            undo: Vec::new(),
            events: vec![Event {
                kind: EventKind::BlockConnected,
                height,
                block_hash: block.hash,
                txid: None,
                wallets: Vec::new(),
            }],
        };
        let mut touched = Touched::default();
        // The look-ahead's new scripts: no undo entry, a derived range never shrinks.
        for (cf, key, value) in block.writes {
            ch.writes.insert((cf, key), Some(value));
        }
        for (tx_index, tx) in block.txs.into_iter().enumerate() {
            let mut transfer = Transfer {
                txid: tx.txid,
                height,
                block_hash: block.hash,
                tx_index: tx_index as u32,
                received: Vec::new(),
                spent: Vec::new(),
            };
            for (input, op) in tx.inputs.iter().enumerate() {
                if let Some(utxo) = self.utxos.remove(op) {
                    self.remove_utxo(&mut ch, &mut touched, op, &utxo, prev_tip)?;
                    transfer.spent.push(Spent {
                        input: input as u32,
                        outpoint: *op,
                        script_id: utxo.script_id,
                        value: utxo.value,
                    });
                }
            }
            // The genesis coinbase is not spendable: it never enters the UTXO set.
            if height == 0 {
                continue;
            }
            for out in tx.watched {
                let op = OutPoint {
                    txid: tx.txid,
                    vout: out.vout,
                };
                // BIP30: a duplicate coinbase txid overwrites the earlier output for good.
                if let Some(old) = self.utxos.remove(&op) {
                    self.remove_utxo(&mut ch, &mut touched, &op, &old, prev_tip)?;
                }
                self.wallets_of.insert(out.script_id, out.wallets);
                let utxo = Utxo {
                    value: out.value,
                    height,
                    coinbase: tx.coinbase,
                    script_id: out.script_id,
                    script: out.script,
                };
                let immature = utxo.is_immature_at(height);
                ch.set(
                    Cf::Utxo,
                    &schema::outpoint_key(&op),
                    || None,
                    Some(schema::encode_utxo(&utxo)),
                );
                let su = schema::encode_script_utxo(&utxo).to_vec();
                ch.set(
                    Cf::ScriptUtxo,
                    &schema::script_utxo_key(&utxo.script_id, &op),
                    || None,
                    Some(su),
                );
                self.update_balances(&mut ch, &mut touched, &utxo.script_id, |b| {
                    b.add(utxo.value, immature)
                })?;
                self.recent_change(&mut touched, &utxo, 1)?;
                if immature {
                    self.immature.entry(height).or_default().push(op);
                }
                transfer.received.push(Received {
                    vout: out.vout,
                    script_id: utxo.script_id,
                    value: utxo.value,
                });
                self.utxos.insert(op, utxo);
            }
            if !transfer.received.is_empty() || !transfer.spent.is_empty() {
                self.record_transfer(&mut ch, &transfer)?;
            }
        }
        self.mature(&mut ch, &mut touched, height)?;
        for id in &touched.scripts {
            let value = self.script_balances.get(id).and_then(encode_balance);
            if value.is_none() {
                self.script_balances.remove(id);
            }
            ch.writes.insert((Cf::ScriptBalance, id.0.to_vec()), value);
        }
        // No undo entries: disconnecting derives them from the scripts' outputs, as it
        // does wallet balances.
        for key in &touched.recent {
            let value = self
                .recent
                .get(key)
                .filter(|r| !r.is_empty())
                .map(|r| schema::encode_recent(r).to_vec());
            ch.writes.insert(
                (
                    Cf::WalletRecent,
                    schema::wallet_recent_key(key.0, key.1).to_vec(),
                ),
                value,
            );
        }
        for w in &touched.wallets {
            let value = self.wallet_balances.get(w).and_then(encode_balance);
            if value.is_none() {
                self.wallet_balances.remove(w);
            }
            ch.writes
                .insert((Cf::WalletBalance, schema::wallet_key(*w).to_vec()), value);
        }
        // Keys at heights above the tip never exist, so a new header has no prior.
        ch.set(
            Cf::Headers,
            &schema::height_key(height),
            || None,
            Some(schema::encode_header(&block.header)),
        );
        let prior_tip = self.tip.map(|(h, hash)| schema::encode_tip(h, &hash));
        ch.set(
            Cf::Meta,
            schema::META_TIP,
            || prior_tip,
            Some(schema::encode_tip(height, &block.hash)),
        );
        self.tip = Some((height, block.hash));
        Ok(ch)
    }

    /// Moves coinbase outputs that mature at `height` from immature to confirmed.
    fn mature(
        &mut self,
        ch: &mut BlockChanges,
        touched: &mut Touched,
        height: u32,
    ) -> Result<(), StoreError> {
        let Some(created) = height.checked_sub(COINBASE_MATURITY) else {
            return Ok(());
        };
        let Some(ops) = self.immature.remove(&created) else {
            return Ok(());
        };
        for op in ops {
            let Some(u) = self
                .utxos
                .get(&op)
                .filter(|u| u.height == created && u.coinbase)
            else {
                continue; // spent, or overwritten by a BIP30 duplicate
            };
            let (id, value) = (u.script_id, u.value);
            self.update_balances(ch, touched, &id, |b| b.mature(value))?;
        }
        Ok(())
    }

    fn record_transfer(&mut self, ch: &mut BlockChanges, t: &Transfer) -> Result<(), StoreError> {
        let mut wallets = BTreeSet::new();
        for s in t.script_ids() {
            wallets.extend(self.wallets(&s)?);
        }
        ch.events.push(Event {
            kind: EventKind::TransferConfirmed,
            height: t.height,
            block_hash: t.block_hash,
            txid: Some(t.txid),
            wallets: wallets.iter().copied().collect(),
        });
        ch.set(
            Cf::Transfers,
            &schema::transfer_key(&t.txid, t.height),
            || None,
            Some(schema::encode_transfer(t)),
        );
        // No undo entry: disconnecting this block records it as reorged out again.
        if self.reorged.remove(&t.txid) {
            ch.writes
                .insert((Cf::Reorged, t.txid.as_byte_array().to_vec()), None);
        }
        // No undo entry: disconnecting deletes the history of the transfer's wallets.
        for w in wallets {
            let key = schema::history_key(w, t.height, &t.txid);
            ch.writes
                .insert((Cf::WalletHistory, key.to_vec()), Some(Vec::new()));
        }
        Ok(())
    }
}

/// Balances a block changed, written once at its end.
#[derive(Default)]
struct Touched {
    scripts: BTreeSet<ScriptId>,
    wallets: BTreeSet<WalletId>,
    recent: BTreeSet<(WalletId, u32)>,
}
