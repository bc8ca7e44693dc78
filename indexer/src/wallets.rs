//! Wallets in the database: adding descriptors under a wallet name, listing them, and
//! loading the watch set into the filter stage's bloom filter.

use std::collections::{BTreeMap, BTreeSet};

use bitcoin::Network;

use crate::store::schema::{self, Cf, WatchRecord};
use crate::store::{Batch, Reader, Store, StoreError};
use crate::types::{Balance, ScriptId, WalletId};
use crate::watchlist::{self, ScriptFilter, WatchError};

/// Why a watch could not be added.
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    /// A descriptor is invalid; nothing was added.
    #[error(transparent)]
    Descriptor(#[from] WatchError),
    /// The wallet name is unusable.
    #[error("invalid wallet name {0:?}: use 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    /// No descriptor was given.
    #[error("no descriptor given")]
    Empty,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `add` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Added {
    /// The wallet's id.
    pub wallet: WalletId,
    /// Scripts newly watched.
    pub new_scripts: usize,
    /// Scripts that were already watched (by this or another wallet).
    pub known_scripts: usize,
}

/// A wallet as listed.
#[derive(Clone, Debug)]
pub struct WalletInfo {
    /// Name.
    pub name: String,
    /// Id.
    pub id: WalletId,
    /// Descriptors with their birth heights.
    pub descriptors: Vec<(String, Option<u32>)>,
    /// Number of scripts watched.
    pub scripts: usize,
    /// Current balance.
    pub balance: Balance,
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Watches every script of `descriptors` under `wallet`, atomically: all or nothing.
pub fn add(
    store: &Store,
    network: Network,
    wallet: &str,
    descriptors: &[String],
    birth_height: Option<u32>,
    gap_limit: u32,
) -> Result<Added, WalletError> {
    let prepared = prepare(store, network, wallet, descriptors, birth_height, gap_limit)?;
    store.commit(prepared.batch, true)?;
    Ok(prepared.added)
}

/// The writes of an [`add`], not yet committed.
pub struct Prepared {
    /// The writes.
    pub batch: Batch,
    /// What they do.
    pub added: Added,
    /// The wallet's balance they write (its old one plus scripts other wallets watched).
    pub wallet_balance: Balance,
}

/// Prepares an [`add`] for a caller that commits more in the same batch.
pub fn prepare(
    store: &Store,
    network: Network,
    wallet: &str,
    descriptors: &[String],
    birth_height: Option<u32>,
    gap_limit: u32,
) -> Result<Prepared, WalletError> {
    if !valid_name(wallet) {
        return Err(WalletError::Name(wallet.to_string()));
    }
    if descriptors.is_empty() {
        return Err(WalletError::Empty);
    }
    let expanded = descriptors
        .iter()
        .map(|d| watchlist::expand(d, network, gap_limit))
        .collect::<Result<Vec<_>, _>>()?;

    let mut batch = Batch::default();
    let id = match store.wallet_id(wallet)? {
        Some(id) => id,
        None => {
            let next = match store.get(Cf::Meta, schema::META_NEXT_WALLET)? {
                Some(v) => schema::decode_wallet(&v).map_err(StoreError::from)?,
                None => WalletId(0),
            };
            batch.put(
                store,
                Cf::Wallets,
                wallet.as_bytes(),
                &schema::wallet_key(next),
            );
            batch.put(
                store,
                Cf::Meta,
                schema::META_NEXT_WALLET,
                &schema::wallet_key(WalletId(next.0 + 1)),
            );
            next
        }
    };
    let mut seq = 0u32;
    store.for_each_prefix(Cf::Descriptors, &schema::wallet_key(id), |_, _| {
        seq += 1;
        Ok::<_, StoreError>(())
    })?;
    let mut wallet_balance = store.wallet_balance(id)?;
    let mut records: BTreeMap<ScriptId, WatchRecord> = BTreeMap::new();
    let (mut new_scripts, mut known_scripts) = (0, 0);
    // Scripts other wallets already watch: their indexed history now belongs here too.
    let mut joined = BTreeSet::new();
    for e in &expanded {
        let mut value = birth_height.unwrap_or(u32::MAX).to_be_bytes().to_vec();
        value.extend_from_slice(e.descriptor.as_bytes());
        batch.put(
            store,
            Cf::Descriptors,
            &schema::descriptor_key(id, seq),
            &value,
        );
        seq += 1;
        for script in &e.scripts {
            let sid = ScriptId::of(script);
            let rec = match records.remove(&sid) {
                Some(r) => r,
                None => store.watch(&sid)?.unwrap_or(WatchRecord {
                    wallets: Vec::new(),
                    script: script.clone(),
                }),
            };
            let mut rec = rec;
            if rec.wallets.is_empty() {
                new_scripts += 1;
            } else {
                known_scripts += 1;
            }
            if let Err(pos) = rec.wallets.binary_search(&id) {
                if !rec.wallets.is_empty() {
                    joined.insert(sid);
                }
                rec.wallets.insert(pos, id);
                // Already watched by another wallet: its coins now count for this one too.
                let b = store.script_balance(&sid)?;
                wallet_balance.confirmed += b.confirmed;
                wallet_balance.immature += b.immature;
                wallet_balance.utxo_count += b.utxo_count;
            }
            records.insert(sid, rec);
        }
    }
    for (sid, rec) in &records {
        batch.put(store, Cf::Watch, &sid.0, &schema::encode_watch(rec));
        batch.put(
            store,
            Cf::WalletScripts,
            &schema::wallet_script_key(id, sid),
            &[],
        );
    }
    if !joined.is_empty() {
        store.for_each(Cf::Transfers, |k, v| {
            let t = schema::decode_transfer(k, v)?;
            if t.script_ids().iter().any(|s| joined.contains(s)) {
                batch.put(
                    store,
                    Cf::WalletHistory,
                    &schema::history_key(id, t.height, &t.txid),
                    &[],
                );
            }
            Ok::<_, StoreError>(())
        })?;
    }
    if !wallet_balance.is_empty() {
        batch.put(
            store,
            Cf::WalletBalance,
            &schema::wallet_key(id),
            &schema::encode_balance(&wallet_balance),
        );
    }
    Ok(Prepared {
        batch,
        added: Added {
            wallet: id,
            new_scripts,
            known_scripts,
        },
        wallet_balance,
    })
}

/// Every wallet with its descriptors, script count and balance, by name.
pub fn list(store: &Store) -> Result<Vec<WalletInfo>, StoreError> {
    let mut wallets = Vec::new();
    store.for_each(Cf::Wallets, |k, v| {
        let id = schema::decode_wallet(v)?;
        wallets.push(WalletInfo {
            name: String::from_utf8_lossy(k).into_owned(),
            id,
            descriptors: Vec::new(),
            scripts: 0,
            balance: store.wallet_balance(id)?,
        });
        Ok::<_, StoreError>(())
    })?;
    for w in &mut wallets {
        store.for_each_prefix(Cf::Descriptors, &schema::wallet_key(w.id), |_, v| {
            let (birth, text) = v.split_at(4.min(v.len()));
            let birth = u32::from_be_bytes(birth.try_into().unwrap_or([0xff; 4]));
            w.descriptors.push((
                String::from_utf8_lossy(text).into_owned(),
                (birth != u32::MAX).then_some(birth),
            ));
            Ok::<_, StoreError>(())
        })?;
    }
    let mut counts: BTreeMap<WalletId, usize> = BTreeMap::new();
    store.for_each(Cf::Watch, |_, v| {
        for w in schema::decode_watch(v)?.wallets {
            *counts.entry(w).or_default() += 1;
        }
        Ok::<_, StoreError>(())
    })?;
    for w in &mut wallets {
        w.scripts = counts.get(&w.id).copied().unwrap_or(0);
    }
    Ok(wallets)
}

/// A bloom filter holding every watched script, sized for twice their number and at least
/// `min_capacity`: big enough to take new scripts, small enough to stay in cache (the
/// filter is probed for every output of every block).
pub fn load_filter(
    store: &Store,
    min_capacity: usize,
    fp_rate: f64,
) -> Result<ScriptFilter, StoreError> {
    let count = usize::try_from(store.count(Cf::Watch)?).unwrap_or(usize::MAX);
    let mut filter = ScriptFilter::new(min_capacity.max(count.saturating_mul(2)), fp_rate);
    store.for_each(Cf::Watch, |_, v| {
        filter.insert(schema::decode_watch(v)?.script.as_bytes());
        Ok::<_, StoreError>(())
    })?;
    Ok(filter)
}
