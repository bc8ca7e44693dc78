//! Changes to the `wallet_recent` aggregates (a wallet's unspent outputs by creation
//! height), gathered and then written over what the database holds. The apply stage keeps
//! its own running copy; a disconnect, a wallet joining scripts others watch, a merged
//! backfill and the one-time build of an older database use this.

use std::collections::BTreeMap;

use super::schema::{self, Cf, Recent};
use super::{Batch, Reader, Store, StoreError, Writes};
use crate::types::WalletId;

/// Signed changes per (wallet, height).
#[derive(Default)]
pub struct RecentChanges {
    changes: BTreeMap<(WalletId, u32), (i128, i128, i128)>,
}

impl RecentChanges {
    /// An unspent output of `value` created at `height` joins (`+1`) or leaves (`-1`)
    /// `wallet`'s aggregates.
    pub fn add(&mut self, wallet: WalletId, height: u32, value: u64, coinbase: bool, sign: i128) {
        let c = self.changes.entry((wallet, height)).or_default();
        let v = i128::from(value) * sign;
        if coinbase {
            c.1 += v;
        } else {
            c.0 += v;
        }
        c.2 += sign;
    }

    /// Applies the changes to the stored aggregates, writing them into `batch`.
    pub fn write(&self, store: &Store, batch: &mut Batch) -> Result<(), StoreError> {
        let mut writes = Writes::new();
        self.add_writes(store, &mut writes)?;
        for ((cf, key), value) in &writes {
            batch.set(store, *cf, key, value.as_deref());
        }
        Ok(())
    }

    /// Applies the changes to the aggregates `reader` holds, adding the new values to
    /// `writes`.
    pub fn add_writes(&self, reader: &impl Reader, writes: &mut Writes) -> Result<(), StoreError> {
        for (&(wallet, height), &(plain, coinbase, count)) in &self.changes {
            let key = schema::wallet_recent_key(wallet, height);
            let now = match reader.get(Cf::WalletRecent, &key)? {
                Some(v) => schema::decode_recent(&v)?,
                None => Recent::default(),
            };
            let moved = |old: u64, by: i128| {
                u64::try_from(i128::from(old) + by).map_err(|_| StoreError::Inconsistent {
                    wallet: wallet.0,
                    height,
                })
            };
            let after = Recent {
                plain: moved(now.plain, plain)?,
                coinbase: moved(now.coinbase, coinbase)?,
                count: moved(now.count, count)?,
            };
            let value = (!after.is_empty()).then(|| schema::encode_recent(&after).to_vec());
            writes.insert((Cf::WalletRecent, key.to_vec()), value);
        }
        Ok(())
    }
}

/// Builds the aggregates of a database from before they existed, from its per-script
/// unspent outputs and each script's wallets; a no-op once built.
pub fn build_once(store: &Store) -> Result<(), StoreError> {
    if store.get(Cf::Meta, schema::META_RECENT_BUILT)?.is_some() {
        return Ok(());
    }
    let mut changes = RecentChanges::default();
    let mut last: Option<(crate::types::ScriptId, Vec<WalletId>)> = None;
    store.for_each(Cf::ScriptUtxo, |k, v| {
        let id = schema::decode_script_id(&k[..32])?;
        if last.as_ref().is_none_or(|(l, _)| *l != id) {
            let wallets = store.watch(&id)?.map(|r| r.wallets).unwrap_or_default();
            last = Some((id, wallets));
        }
        let (value, height, coinbase) = schema::decode_script_utxo(v)?;
        for w in &last.as_ref().expect("set above").1 {
            changes.add(*w, height, value, coinbase, 1);
        }
        Ok::<_, StoreError>(())
    })?;
    let mut batch = Batch::default();
    changes.write(store, &mut batch)?;
    batch.put(store, Cf::Meta, schema::META_RECENT_BUILT, &[]);
    store.commit(batch, true)
}
