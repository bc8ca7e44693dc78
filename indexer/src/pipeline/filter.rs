//! Filter stage: keep every input (spends are matched later against the watched UTXO set)
//! and only the outputs paying watched scripts. The bloom half of the filter runs inside
//! the parallel parse workers ([`super::parse`]), so unwatched outputs are never copied out
//! of the block; the exact lookup of the bloom hits runs in this stage.

use std::collections::{HashMap, HashSet};

use bitcoin::{block, BlockHash, OutPoint, ScriptBuf, Txid};

use super::parse::ParsedBlock;
use crate::descriptors;
use crate::script_filter::ScriptFilter;
use crate::store::schema::{self, Cf, Derivation, Range, WatchRecord};
use crate::store::{Reader, Store, StoreError};
use crate::types::{ScriptId, WalletId};

/// An output paying a watched script.
pub struct WatchedOutput {
    /// Output index.
    pub vout: u32,
    /// Value in satoshis.
    pub value: u64,
    /// The script.
    pub script: ScriptBuf,
    /// Its id.
    pub script_id: ScriptId,
    /// Wallets watching it.
    pub wallets: Vec<WalletId>,
}

/// A transaction after filtering.
pub struct FilteredTx {
    /// Its txid.
    pub txid: Txid,
    /// Whether it is the coinbase.
    pub coinbase: bool,
    /// Every outpoint it spends.
    pub inputs: Vec<OutPoint>,
    /// Its outputs that pay watched scripts.
    pub watched: Vec<WatchedOutput>,
}

/// A block after filtering.
pub struct FilteredBlock {
    /// Height.
    pub height: u32,
    /// Hash.
    pub hash: BlockHash,
    /// Header.
    pub header: block::Header,
    /// Serialized size.
    pub size: usize,
    /// Transactions in block order.
    pub txs: Vec<FilteredTx>,
    /// What the look-ahead watches from this block on: written with the block, and never
    /// undone (a derived range does not shrink).
    pub writes: Vec<(Cf, Vec<u8>, Vec<u8>)>,
}

/// The filter stage: exact lookups of the bloom pass's survivors, and the look-ahead of
/// ranged descriptors.
///
/// When an output pays a derived script within `gap` of the end of what its descriptor
/// branch has derived, the next scripts are derived (so that `gap` unused ones follow the
/// highest paid), watched in the same batch as the block, and added to the bloom filter in
/// place. The block is then looked through again for them, until nothing more is derived,
/// so a payment to index i + gap in the same block as one to i is found; so are payments
/// in blocks the parse workers already passed through the filter before it grew (each
/// block carries the filter generation it was parsed at). A derived range never shrinks,
/// through reorgs too.
pub struct Filter<'a> {
    /// The database.
    pub store: &'a Store,
    /// The bloom filter the parse workers probe.
    pub scripts: &'a ScriptFilter,
    lookahead: Option<Lookahead>,
}

/// What the look-ahead keeps between blocks of one pipeline run.
#[derive(Default)]
struct Lookahead {
    /// Ranges read or extended in this run (the store lags until the blocks commit).
    ranges: HashMap<(WalletId, u32, u32), Range>,
    /// Derivations of scripts added in this run.
    derived: HashMap<ScriptId, Vec<Derivation>>,
    /// Watch records of scripts added in this run.
    records: HashMap<ScriptId, WatchRecord>,
    /// Scripts added in this run, with the filter generation that holds them.
    added: Vec<(u64, ScriptBuf)>,
}

/// A script paid at a derived index near the end of its range: its branch must grow.
struct Growth {
    wallet: WalletId,
    seq: u32,
    branch: u32,
    to: u32,
}

impl<'a> Filter<'a> {
    /// The filter stage over `store` and the parse workers' `scripts`; the look-ahead runs
    /// when some wallet has a ranged descriptor.
    pub fn new(store: &'a Store, scripts: &'a ScriptFilter) -> Result<Self, StoreError> {
        let ranged = store.last_key_with_prefix(Cf::Ranges, &[])?.is_some();
        Ok(Filter {
            store,
            scripts,
            lookahead: ranged.then(Lookahead::default),
        })
    }

    /// Keeps the block's inputs and its outputs that pay watched scripts, growing the
    /// look-ahead where they call for it.
    pub fn filter_block(&mut self, mut block: ParsedBlock) -> Result<FilteredBlock, FilterError> {
        let mut txs = Vec::with_capacity(block.txs.len());
        let mut writes = Vec::new();
        let mut paid = Vec::new();
        for tx in std::mem::take(&mut block.txs) {
            let mut watched = Vec::new();
            for (vout, out) in tx.outputs {
                let script_id = ScriptId::of(&out.script_pubkey);
                let Some(rec) = self.record(&script_id)? else {
                    continue; // bloom false positive
                };
                paid.push(script_id);
                watched.push(WatchedOutput {
                    vout,
                    value: out.value.to_sat(),
                    script: out.script_pubkey,
                    script_id,
                    wallets: rec.wallets,
                });
            }
            txs.push(FilteredTx {
                txid: tx.txid,
                coinbase: tx.coinbase,
                inputs: tx.inputs,
                watched,
            });
        }
        if self.lookahead.is_some() {
            // Scripts added after this block's bloom pass (for an earlier block).
            let missed: HashSet<ScriptBuf> = self
                .lookahead
                .as_ref()
                .map(|l| {
                    l.added
                        .iter()
                        .filter(|(g, _)| *g > block.filter_generation)
                        .map(|(_, s)| s.clone())
                        .collect()
                })
                .unwrap_or_default();
            paid.extend(self.look_again(&block.bytes, &missed, &mut txs)?);
            // Grow until nothing more is derived: a payment the growth uncovers may be
            // near the new end too.
            while !paid.is_empty() {
                let new = self.grow(&paid, &mut writes)?;
                paid = self.look_again(&block.bytes, &new, &mut txs)?;
            }
        }
        crate::buffers::give(std::mem::take(&mut block.bytes));
        Ok(FilteredBlock {
            height: block.height,
            hash: block.hash,
            header: block.header,
            size: block.size,
            txs,
            writes,
        })
    }

    /// The watch record of `id`: this run's when it added it, else the store's.
    fn record(&self, id: &ScriptId) -> Result<Option<WatchRecord>, StoreError> {
        if let Some(rec) = self.lookahead.as_ref().and_then(|l| l.records.get(id)) {
            return Ok(Some(rec.clone()));
        }
        self.store.watch(id)
    }

    /// Adds the outputs of `bytes` paying `scripts` that `txs` does not hold yet; returns
    /// their script ids.
    fn look_again(
        &self,
        bytes: &[u8],
        scripts: &HashSet<ScriptBuf>,
        txs: &mut [FilteredTx],
    ) -> Result<Vec<ScriptId>, StoreError> {
        if scripts.is_empty() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for (tx, vout, out) in super::parse::outputs_paying(bytes, scripts) {
            let Some(t) = txs.get_mut(tx) else { continue };
            if t.watched.iter().any(|w| w.vout == vout) {
                continue; // the bloom pass had it already
            }
            let script_id = ScriptId::of(&out.script_pubkey);
            let Some(rec) = self.record(&script_id)? else {
                continue;
            };
            found.push(script_id);
            t.watched.push(WatchedOutput {
                vout,
                value: out.value.to_sat(),
                script: out.script_pubkey,
                script_id,
                wallets: rec.wallets,
            });
            t.watched.sort_by_key(|w| w.vout);
        }
        Ok(found)
    }

    /// Derives what the payments to `paid` call for; their writes go to `writes`, the new
    /// scripts into the bloom filter. Returns the new scripts.
    fn grow(
        &mut self,
        paid: &[ScriptId],
        writes: &mut Vec<(Cf, Vec<u8>, Vec<u8>)>,
    ) -> Result<HashSet<ScriptBuf>, FilterError> {
        let mut growths: Vec<Growth> = Vec::new();
        for id in paid {
            for d in self.derivations(id)? {
                let range = self.range(d.wallet, d.seq, d.branch)?;
                let to = d.index.saturating_add(range.gap).saturating_add(1);
                if to > range.next {
                    match growths
                        .iter_mut()
                        .find(|g| (g.wallet, g.seq, g.branch) == (d.wallet, d.seq, d.branch))
                    {
                        Some(g) => g.to = g.to.max(to),
                        None => growths.push(Growth {
                            wallet: d.wallet,
                            seq: d.seq,
                            branch: d.branch,
                            to,
                        }),
                    }
                }
            }
        }
        let mut new = HashSet::new();
        for g in growths {
            let range = self.range(g.wallet, g.seq, g.branch)?;
            let text = self.descriptor(g.wallet, g.seq)?;
            let scripts = descriptors::derive(&text, g.branch, range.next..g.to)?;
            for (index, script) in (range.next..g.to).zip(scripts) {
                self.watch_derived(g.wallet, g.seq, g.branch, index, &script, writes)?;
                new.insert(script);
            }
            let grown = Range {
                next: g.to,
                gap: range.gap,
            };
            writes.push((
                Cf::Ranges,
                schema::range_key(g.wallet, g.seq, g.branch).to_vec(),
                schema::encode_range(&grown).to_vec(),
            ));
            let l = self
                .lookahead
                .as_mut()
                .expect("growing means looking ahead");
            l.ranges.insert((g.wallet, g.seq, g.branch), grown);
        }
        if !new.is_empty() {
            for script in &new {
                self.scripts.insert(script.as_bytes());
            }
            // After the inserts: a worker that reads the new generation sees them.
            let generation = self.scripts.advance();
            let l = self
                .lookahead
                .as_mut()
                .expect("growing means looking ahead");
            l.added.extend(new.iter().map(|s| (generation, s.clone())));
        }
        Ok(new)
    }

    /// Records one newly derived script: watched by its wallet (and whoever watched it
    /// already), listed under the wallet, its derivation noted.
    fn watch_derived(
        &mut self,
        wallet: WalletId,
        seq: u32,
        branch: u32,
        index: u32,
        script: &ScriptBuf,
        writes: &mut Vec<(Cf, Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let id = ScriptId::of(script);
        let mut rec = self.record(&id)?.unwrap_or(WatchRecord {
            wallets: Vec::new(),
            script: script.clone(),
        });
        if let Err(pos) = rec.wallets.binary_search(&wallet) {
            rec.wallets.insert(pos, wallet);
        }
        let mut derived = self.derivations(&id)?;
        let d = Derivation {
            wallet,
            seq,
            branch,
            index,
        };
        if !derived.contains(&d) {
            derived.push(d);
            derived.sort();
        }
        writes.push((Cf::Watch, id.0.to_vec(), schema::encode_watch(&rec)));
        writes.push((
            Cf::WalletScripts,
            schema::wallet_script_key(wallet, &id).to_vec(),
            Vec::new(),
        ));
        writes.push((Cf::Derived, id.0.to_vec(), schema::encode_derived(&derived)));
        let l = self
            .lookahead
            .as_mut()
            .expect("growing means looking ahead");
        l.records.insert(id, rec);
        l.derived.insert(id, derived);
        Ok(())
    }

    fn derivations(&self, id: &ScriptId) -> Result<Vec<Derivation>, StoreError> {
        if let Some(d) = self.lookahead.as_ref().and_then(|l| l.derived.get(id)) {
            return Ok(d.clone());
        }
        match self.store.get(Cf::Derived, &id.0)? {
            Some(v) => Ok(schema::decode_derived(&v)?),
            None => Ok(Vec::new()),
        }
    }

    fn range(&mut self, wallet: WalletId, seq: u32, branch: u32) -> Result<Range, StoreError> {
        let l = self
            .lookahead
            .as_mut()
            .expect("growing means looking ahead");
        if let Some(r) = l.ranges.get(&(wallet, seq, branch)) {
            return Ok(*r);
        }
        let r = match self
            .store
            .get(Cf::Ranges, &schema::range_key(wallet, seq, branch))?
        {
            Some(v) => schema::decode_range(&v)?,
            // Derived, yet no range: nothing to grow (the range's own record is missing).
            None => Range { next: 0, gap: 0 },
        };
        l.ranges.insert((wallet, seq, branch), r);
        Ok(r)
    }

    fn descriptor(&self, wallet: WalletId, seq: u32) -> Result<String, StoreError> {
        let v = self
            .store
            .get(Cf::Descriptors, &schema::descriptor_key(wallet, seq))?
            .ok_or(StoreError::Decode(schema::DecodeError::missing(
                "descriptor of a derived script",
            )))?;
        Ok(String::from_utf8_lossy(v.get(4..).unwrap_or_default()).into_owned())
    }
}

/// Why the filter stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored descriptor no longer derives (it was checked when added).
    #[error(transparent)]
    Derive(#[from] crate::descriptors::WatchError),
}
