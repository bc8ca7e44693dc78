//! Wallets in the database: adding descriptors under a wallet name, listing them, and
//! loading the watch set into the filter stage's bloom filter.

use std::collections::BTreeSet;

use rayon::prelude::*;

use bitcoin::{Network, ScriptBuf};

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

/// [`add`], and the scripts it makes the wallet watch inserted into `filter` (in place:
/// the pipeline reading it sees them from its next block on).
pub fn add_into(
    store: &Store,
    network: Network,
    wallet: &str,
    descriptors: &[String],
    birth_height: Option<u32>,
    gap_limit: u32,
    filter: &ScriptFilter,
) -> Result<Added, WalletError> {
    let prepared = prepare(store, network, wallet, descriptors, birth_height, gap_limit)?;
    store.commit(prepared.batch, true)?;
    for script in &prepared.watched {
        filter.insert(script.as_bytes());
    }
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
    /// The scripts the wallet watches once they are committed that it did not before.
    pub watched: Vec<ScriptBuf>,
}

/// Prepares an [`add`] for a caller that commits more in the same batch.
///
/// The work is proportional to the descriptors given, never to what the wallet or the
/// index already holds: descriptors are expanded and hashed in parallel, the scripts'
/// existing records read in one batched lookup, and the writes sorted by key.
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
        .par_iter()
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
    // Key-derived descriptors are listed one by one; scripts given as such (addresses,
    // raw scripts: an exchange's millions of deposit scripts) as one line per call.
    let mut seq = match store.last_with_prefix(Cf::Descriptors, &schema::wallet_key(id))? {
        Some((k, _)) => schema::decode_descriptor_seq(&k).map_err(StoreError::from)? + 1,
        None => 0,
    };
    let birth = birth_height.unwrap_or(u32::MAX).to_be_bytes();
    let mut describe = |batch: &mut Batch, text: &str| {
        let mut value = birth.to_vec();
        value.extend_from_slice(text.as_bytes());
        batch.put(store, Cf::Descriptors, &schema::descriptor_key(id, seq), &value);
        seq += 1;
    };
    let singles = expanded.iter().filter(|e| e.single).count();
    for e in expanded.iter().filter(|e| !e.single) {
        describe(&mut batch, &e.descriptor);
    }
    if singles > 0 {
        describe(&mut batch, &format!("{singles} scripts given as addresses or raw()"));
    }
    // Every script once, by id.
    let mut scripts: Vec<(ScriptId, &ScriptBuf)> = expanded
        .par_iter()
        .flat_map_iter(|e| e.scripts.iter().map(|s| (ScriptId::of(s), s)))
        .collect();
    scripts.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    scripts.dedup_by(|a, b| a.0 == b.0);
    let keys: Vec<&[u8]> = scripts.iter().map(|(sid, _)| &sid.0[..]).collect();
    let existing = store.multi_get(Cf::Watch, &keys)?;

    let mut wallet_balance = store.wallet_balance(id)?;
    let (mut new_scripts, mut known_scripts) = (0, 0);
    // Scripts other wallets already watch: their indexed history now belongs here too.
    let mut joined = BTreeSet::new();
    let mut watch_puts = Vec::with_capacity(scripts.len());
    for ((sid, script), old) in scripts.iter().zip(existing) {
        let mut rec = match old {
            Some(v) => schema::decode_watch(&v).map_err(StoreError::from)?,
            None => WatchRecord {
                wallets: Vec::new(),
                script: (*script).clone(),
            },
        };
        if rec.wallets.is_empty() {
            new_scripts += 1;
        } else {
            known_scripts += 1;
        }
        let Err(pos) = rec.wallets.binary_search(&id) else {
            continue; // this wallet watches it already
        };
        if !rec.wallets.is_empty() {
            joined.insert(*sid);
            // Already watched by another wallet: its coins now count for this one too.
            let b = store.script_balance(sid)?;
            wallet_balance.confirmed += b.confirmed;
            wallet_balance.immature += b.immature;
            wallet_balance.utxo_count += b.utxo_count;
        }
        rec.wallets.insert(pos, id);
        watch_puts.push((*sid, schema::encode_watch(&rec), rec.script));
    }
    for (sid, value, _) in &watch_puts {
        batch.put(store, Cf::Watch, &sid.0, value);
    }
    for (sid, _, _) in &watch_puts {
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
        watched: watch_puts.into_iter().map(|(_, _, script)| script).collect(),
    })
}

/// Descriptors read per committed chunk by [`add_lines`].
pub const CHUNK: usize = 100_000;

/// Watches the descriptors of `lines` (one per line; blank lines and `#` comments
/// skipped) under `wallet`, [`CHUNK`] lines per committed batch, so that millions of
/// scripts stream through in bounded memory. Each chunk is atomic; a run cut short is
/// completed by running it again (scripts the wallet watches already are skipped). The
/// new entries are flushed to disk at the end, so the next process to open the database
/// does not replay them from the log. `on_chunk` hears the running totals.
pub fn add_lines(
    store: &Store,
    network: Network,
    wallet: &str,
    lines: impl Iterator<Item = std::io::Result<String>>,
    birth_height: Option<u32>,
    gap_limit: u32,
    on_chunk: &dyn Fn(&Added),
) -> Result<Added, AddLinesError> {
    let mut total: Option<Added> = None;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut lines = lines.peekable();
    while lines.peek().is_some() {
        chunk.clear();
        for line in lines.by_ref() {
            let line = line.map_err(AddLinesError::Read)?;
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                chunk.push(line.to_owned());
                if chunk.len() == CHUNK {
                    break;
                }
            }
        }
        if chunk.is_empty() {
            break;
        }
        let prepared = prepare(store, network, wallet, &chunk, birth_height, gap_limit)?;
        store.commit(prepared.batch, true).map_err(WalletError::from)?;
        let t = total.get_or_insert(Added {
            wallet: prepared.added.wallet,
            new_scripts: 0,
            known_scripts: 0,
        });
        t.new_scripts += prepared.added.new_scripts;
        t.known_scripts += prepared.added.known_scripts;
        on_chunk(t);
    }
    let total = total.ok_or(AddLinesError::Wallet(WalletError::Empty))?;
    for cf in [Cf::Watch, Cf::WalletScripts, Cf::Descriptors] {
        store.flush(cf).map_err(WalletError::from)?;
    }
    Ok(total)
}

/// Why [`add_lines`] stopped (the chunks before it are committed).
#[derive(Debug, thiserror::Error)]
pub enum AddLinesError {
    /// The input could not be read.
    #[error("reading the descriptors: {0}")]
    Read(std::io::Error),
    /// A descriptor or the database failed.
    #[error(transparent)]
    Wallet(#[from] WalletError),
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
    for w in &mut wallets {
        let mut n = 0;
        store.for_each_prefix(Cf::WalletScripts, &schema::wallet_key(w.id), |_, _| {
            n += 1;
            Ok::<_, StoreError>(())
        })?;
        w.scripts = n;
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
    // An estimate is enough to size it: it takes twice as many before it is outgrown.
    let count = usize::try_from(store.estimate_keys(Cf::Watch)).unwrap_or(usize::MAX);
    let filter = ScriptFilter::new(min_capacity.max(count.saturating_mul(2)), fp_rate);
    // Script ids are uniform hashes: 16 ranges of the first byte load in parallel.
    (0u8..16)
        .into_par_iter()
        .try_for_each(|part| {
            let from = [part << 4];
            let to = (part < 15).then(|| [(part + 1) << 4]);
            store.for_each_range(Cf::Watch, &from, to.as_ref().map(|t| &t[..]), |_, v| {
                filter.insert(schema::watch_script(v)?);
                Ok::<_, StoreError>(())
            })
        })?;
    Ok(filter)
}
