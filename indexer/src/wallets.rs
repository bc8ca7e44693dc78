//! Wallets in the database: adding descriptors under a wallet name, listing them, and
//! loading the watch set into the filter stage's bloom filter.

use std::collections::BTreeSet;

use rayon::prelude::*;

use bitcoin::{Network, ScriptBuf};

use crate::descriptors::{self, Expanded, WatchError};
use crate::script_filter::ScriptFilter;
use crate::store::recent::RecentChanges;
use crate::store::schema::{self, Cf, WatchRecord};
use crate::store::{Batch, Reader, Store, StoreError};
use crate::types::{Balance, ScriptId, WalletId};

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
    /// The descriptors of one call expand to more scripts than a call may add.
    #[error("the descriptors expand to more than {most} scripts: send them in several calls")]
    TooMany {
        /// The most a call may add.
        most: usize,
    },
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
    let mut prepared = prepare(store, network, wallet, descriptors, birth_height, gap_limit)?;
    store.commit(prepared.writes(store)?, true)?;
    Ok(prepared.added)
}

/// [`add`], and the scripts it makes the wallet watch inserted into `filter` (in place:
/// the pipeline reading it sees them from its next block on). `filter` must hold every
/// watched script (the follower's does): only the scripts it may hold are looked up, and
/// many new ones are ingested as sorted tables, as [`add_lines`] does, so that a gRPC
/// `AddWatch` of 100,000 scripts holds the follower for a fraction of a block's time.
/// Durable when it returns.
pub fn add_into(
    store: &Store,
    network: Network,
    wallet: &str,
    descriptors: &[String],
    birth_height: Option<u32>,
    gap_limit: u32,
    filter: &ScriptFilter,
) -> Result<Added, WalletError> {
    let to = WatchTarget {
        network,
        wallet,
        birth_height,
        gap_limit,
    };
    check_request(wallet, descriptors)?;
    let expanded = expand_all(descriptors, network, gap_limit)?;
    add_expanded_into(store, &to, expanded, filter)
}

/// Expands `descriptors` into scripts one after the other, refusing more than `most`
/// scripts in all before deriving them: the part of an add that needs no database, which
/// a gRPC handler does on a thread of its own (not the rayon pool blocks are parsed on)
/// before handing the add to the follower.
pub fn expand_bounded(
    descriptors: &[String],
    network: Network,
    gap_limit: u32,
    most: usize,
) -> Result<Vec<Expanded>, WalletError> {
    let mut expanded = Vec::with_capacity(descriptors.len());
    let mut scripts = 0usize;
    for d in descriptors {
        let e = descriptors::expand(d, network, gap_limit)?;
        scripts += e.scripts.len();
        if scripts > most {
            return Err(WalletError::TooMany { most });
        }
        expanded.push(e);
    }
    Ok(expanded)
}

/// Expands `descriptors` into scripts, in parallel (see [`expand_bounded`]).
pub fn expand_all(
    descriptors: &[String],
    network: Network,
    gap_limit: u32,
) -> Result<Vec<Expanded>, WalletError> {
    Ok(descriptors
        .par_iter()
        .map(|d| descriptors::expand(d, network, gap_limit))
        .collect::<Result<Vec<_>, _>>()?)
}

/// [`add_into`] of descriptors already expanded (by [`expand_all`], with `to`'s network
/// and gap limit).
pub fn add_expanded_into(
    store: &Store,
    to: &WatchTarget<'_>,
    expanded: Vec<Expanded>,
    filter: &ScriptFilter,
) -> Result<Added, WalletError> {
    let started = std::time::Instant::now();
    let mut prepared = prepare_expanded(store, to, expanded, Some(filter))?;
    let prepared_in = started.elapsed();
    commit_chunk(store, &mut prepared, true)?;
    tracing::debug!(
        prepare_ms = prepared_in.as_millis() as u64,
        commit_ms = (started.elapsed() - prepared_in).as_millis() as u64,
        "scripts added"
    );
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
    /// The wallet's outputs by creation height that scripts other wallets watched bring,
    /// not yet in `batch`: a caller that adds outputs of its own (a merged backfill) adds
    /// them here, since two writes of one aggregate would keep only the last.
    pub recent: RecentChanges,
    /// Scripts no wallet watched before, with their `watch` records, ascending by id: left
    /// out of `batch` for a bulk load to ingest as sorted tables (empty otherwise).
    pub fresh: Vec<(ScriptId, Vec<u8>)>,
}

impl Prepared {
    /// The writes, with the outputs by creation height, to commit.
    pub fn writes(&mut self, store: &Store) -> Result<Batch, StoreError> {
        let mut batch = std::mem::take(&mut self.batch);
        std::mem::take(&mut self.recent).write(store, &mut batch)?;
        Ok(batch)
    }
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
    let to = WatchTarget {
        network,
        wallet,
        birth_height,
        gap_limit,
    };
    prepare_with(store, &to, descriptors, None)
}

/// [`prepare`]; with `bulk`, a filter holding every watched script, only the scripts it
/// may hold are looked up (a load of millions of new scripts reads almost nothing) and
/// the new ones are returned in [`Prepared::fresh`] instead of the batch.
fn prepare_with(
    store: &Store,
    to: &WatchTarget<'_>,
    descriptors: &[String],
    bulk: Option<&ScriptFilter>,
) -> Result<Prepared, WalletError> {
    check_request(to.wallet, descriptors)?;
    let expanded = expand_all(descriptors, to.network, to.gap_limit)?;
    prepare_expanded(store, to, expanded, bulk)
}

/// Refuses a bad wallet name or no descriptors, before any work.
pub fn check_request(wallet: &str, descriptors: &[String]) -> Result<(), WalletError> {
    if !valid_name(wallet) {
        return Err(WalletError::Name(wallet.to_string()));
    }
    if descriptors.is_empty() {
        return Err(WalletError::Empty);
    }
    Ok(())
}

/// [`prepare_with`] of descriptors already expanded.
fn prepare_expanded(
    store: &Store,
    to: &WatchTarget<'_>,
    expanded: Vec<Expanded>,
    bulk: Option<&ScriptFilter>,
) -> Result<Prepared, WalletError> {
    let WatchTarget {
        wallet,
        birth_height,
        gap_limit,
        ..
    } = *to;
    if !valid_name(wallet) {
        return Err(WalletError::Name(wallet.to_string()));
    }
    if expanded.is_empty() {
        return Err(WalletError::Empty);
    }

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
    let mut seq = match store.last_key_with_prefix(Cf::Descriptors, &schema::wallet_key(id))? {
        Some(k) => schema::decode_descriptor_seq(&k).map_err(StoreError::from)? + 1,
        None => 0,
    };
    let birth = birth_height.unwrap_or(u32::MAX).to_be_bytes();
    let mut describe = |batch: &mut Batch, text: &str| {
        let mut value = birth.to_vec();
        value.extend_from_slice(text.as_bytes());
        batch.put(
            store,
            Cf::Descriptors,
            &schema::descriptor_key(id, seq),
            &value,
        );
        seq += 1;
        seq - 1
    };
    let singles = expanded.iter().filter(|e| e.single).count();
    // Ranged descriptors: where each derived script comes from, and each branch's
    // look-ahead, which grows as its scripts are paid (the filter stage extends it).
    let mut derived: std::collections::BTreeMap<ScriptId, Vec<schema::Derivation>> =
        std::collections::BTreeMap::new();
    for e in expanded.iter().filter(|e| !e.single) {
        let this = describe(&mut batch, &e.descriptor);
        let mut branches = BTreeSet::new();
        for (script, &(branch, index)) in e.scripts.iter().zip(&e.derivations) {
            branches.insert(branch);
            derived
                .entry(ScriptId::of(script))
                .or_default()
                .push(schema::Derivation {
                    wallet: id,
                    seq: this,
                    branch,
                    index,
                });
        }
        for branch in branches {
            let range = schema::Range {
                next: gap_limit,
                gap: gap_limit,
            };
            batch.put(
                store,
                Cf::Ranges,
                &schema::range_key(id, this, branch),
                &schema::encode_range(&range),
            );
        }
    }
    if !derived.is_empty() {
        let keys: Vec<&[u8]> = derived.keys().map(|sid| &sid.0[..]).collect();
        let known = store.multi_get(Cf::Derived, &keys)?;
        for ((sid, new), old) in derived.iter().zip(known) {
            let mut all = match old {
                Some(v) => schema::decode_derived(&v).map_err(StoreError::from)?,
                None => Vec::new(),
            };
            all.extend_from_slice(new);
            all.sort();
            all.dedup();
            batch.put(store, Cf::Derived, &sid.0, &schema::encode_derived(&all));
        }
    }
    if singles > 0 {
        describe(
            &mut batch,
            &format!("{singles} scripts given as addresses or raw()"),
        );
    }
    // Every script once, by id.
    let mut scripts: Vec<(ScriptId, &ScriptBuf)> = expanded
        .par_iter()
        .flat_map_iter(|e| e.scripts.iter().map(|s| (ScriptId::of(s), s)))
        .collect();
    scripts.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    scripts.dedup_by(|a, b| a.0 == b.0);
    let existing = match bulk {
        None => {
            let keys: Vec<&[u8]> = scripts.iter().map(|(sid, _)| &sid.0[..]).collect();
            store.multi_get(Cf::Watch, &keys)?
        }
        Some(filter) => {
            let maybe: Vec<bool> = scripts
                .par_iter()
                .map(|(_, s)| filter.may_contain(s.as_bytes()))
                .collect();
            let keys: Vec<&[u8]> = scripts
                .iter()
                .zip(&maybe)
                .filter(|(_, m)| **m)
                .map(|((sid, _), _)| &sid.0[..])
                .collect();
            let mut found = store.multi_get(Cf::Watch, &keys)?.into_iter();
            maybe
                .iter()
                .map(|m| if *m { found.next().flatten() } else { None })
                .collect()
        }
    };

    let mut wallet_balance = store.wallet_balance(id)?;
    let (mut new_scripts, mut known_scripts) = (0, 0);
    // Scripts other wallets already watch: their indexed history now belongs here too.
    let mut joined = BTreeSet::new();
    let mut watch_puts = Vec::with_capacity(scripts.len());
    let mut fresh = Vec::new();
    let mut watched = Vec::with_capacity(scripts.len());
    for ((sid, script), old) in scripts.iter().zip(existing) {
        let is_new = old.is_none();
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
        if is_new && bulk.is_some() {
            fresh.push((*sid, schema::encode_watch(&rec)));
        } else {
            watch_puts.push((*sid, schema::encode_watch(&rec)));
        }
        watched.push(rec.script);
    }
    for (sid, value) in &watch_puts {
        batch.put(store, Cf::Watch, &sid.0, value);
    }
    for (sid, _) in &watch_puts {
        batch.put(
            store,
            Cf::WalletScripts,
            &schema::wallet_script_key(id, sid),
            &[],
        );
    }
    let mut recent = RecentChanges::default();
    if !joined.is_empty() {
        // Their unspent outputs now count for this wallet too, by creation height.
        for sid in &joined {
            store.for_each_prefix(Cf::ScriptUtxo, &sid.0, |_, v| {
                let (value, height, coinbase) = schema::decode_script_utxo(v)?;
                recent.add(id, height, value, coinbase, 1);
                Ok::<_, StoreError>(())
            })?;
        }
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
        watched,
        recent,
        fresh,
    })
}

/// Where [`add_lines`] adds scripts, and how.
#[derive(Clone, Copy, Debug)]
pub struct WatchTarget<'a> {
    /// The index's network.
    pub network: Network,
    /// The wallet (created when new).
    pub wallet: &'a str,
    /// First height that may pay them (`None`: from the next block on).
    pub birth_height: Option<u32>,
    /// Scripts derived from each ranged descriptor.
    pub gap_limit: u32,
}

/// Descriptors read per committed chunk by [`add_lines`].
pub const CHUNK: usize = 250_000;

/// New scripts in a chunk from which [`add_lines`] ingests them as sorted tables rather
/// than writing them through the memtable (a table file per family per chunk).
const MIN_INGEST: usize = 10_000;

/// Watches the descriptors of `lines` (one per line; blank lines and `#` comments
/// skipped) under `wallet`, [`CHUNK`] lines per committed chunk, so that millions of
/// scripts stream through in bounded memory; `filter` holds every watched script and gets
/// the new ones. `on_chunk` hears the running totals.
///
/// Built for millions of new scripts: only the scripts `filter` may hold are looked up,
/// and a chunk's new scripts are ingested as sorted table files instead of going through
/// the memtable. Each chunk is durable when the next starts: first its batch (the wallet,
/// the descriptor record, scripts other wallets watch, balances), synced, then its new
/// scripts' wallet listing, then their watch records, which make them watched. A run cut
/// short is completed by running it again (scripts the wallet watches already are
/// skipped). A large load is compacted at the end, so that the rescan that follows does
/// not pay for it.
pub fn add_lines(
    store: &Store,
    to: &WatchTarget<'_>,
    lines: impl Iterator<Item = std::io::Result<String>>,
    filter: &ScriptFilter,
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
        let mut prepared = prepare_with(store, to, &chunk, Some(filter))?;
        // Unsynced: every chunk is flushed at the end.
        commit_chunk(store, &mut prepared, false).map_err(WalletError::from)?;
        for script in &prepared.watched {
            filter.insert(script.as_bytes());
        }
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
    // The next process to open the database replays no log.
    store.flush_all().map_err(WalletError::from)?;
    if total.new_scripts + total.known_scripts >= CHUNK {
        // A bulk load of random script ids leaves a long compaction behind; done now, it
        // is not paid by the rescan that follows.
        // The two families side by side: one compaction is one thread.
        std::thread::scope(|s| {
            for cf in [Cf::Watch, Cf::WalletScripts] {
                s.spawn(move || store.compact(cf));
            }
        });
    }
    Ok(total)
}

/// Commits one chunk of [`add_lines`] in the order that keeps a crash between steps
/// harmless (see there); `sync`: durable when it returns, also when small.
fn commit_chunk(store: &Store, prepared: &mut Prepared, sync: bool) -> Result<(), StoreError> {
    let id = prepared.added.wallet;
    let fresh = std::mem::take(&mut prepared.fresh);
    let mut batch = prepared.writes(store)?;
    if fresh.len() < MIN_INGEST {
        for (sid, value) in &fresh {
            batch.put(store, Cf::Watch, &sid.0, value);
            batch.put(
                store,
                Cf::WalletScripts,
                &schema::wallet_script_key(id, sid),
                &[],
            );
        }
        return store.commit(batch, sync);
    }
    // Synced: the tables ingested next are durable at once, and must never outlive the
    // wallet they name.
    store.commit(batch, true)?;
    let listed: Vec<[u8; 36]> = fresh
        .iter()
        .map(|(sid, _)| schema::wallet_script_key(id, sid))
        .collect();
    store.ingest_sorted(Cf::WalletScripts, listed.iter().map(|k| (&k[..], &[][..])))?;
    store.ingest_sorted(
        Cf::Watch,
        fresh.iter().map(|(sid, value)| (&sid.0[..], &value[..])),
    )
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

/// Where the watched set's bloom filter is saved beside the database.
fn filter_file(store: &Store) -> std::path::PathBuf {
    store.path().join("watch-filter.bin")
}

/// A bloom filter holding every watched script, sized for twice their number and at least
/// `min_capacity`: big enough to take new scripts, small enough to stay in cache (the
/// filter is probed for every output of every block).
///
/// The filter saved beside the database is used when it was saved at the watched set's
/// current generation and is big enough (milliseconds, where scanning ten million scripts
/// takes seconds); otherwise it is built from the `watch` family and saved.
pub fn load_filter(
    store: &Store,
    min_capacity: usize,
    fp_rate: f64,
) -> Result<ScriptFilter, StoreError> {
    let generation = store.watch_generation()?;
    if let Ok(bytes) = std::fs::read(filter_file(store)) {
        match ScriptFilter::from_bytes(&bytes) {
            Some((filter, saved)) if saved == generation && filter.capacity() >= min_capacity => {
                return Ok(filter);
            }
            Some((filter, saved)) => tracing::info!(
                saved,
                generation,
                capacity = filter.capacity(),
                "the saved filter of the watched set is out of date: rebuilding it"
            ),
            None => {
                tracing::info!("the saved filter of the watched set is unreadable: rebuilding it")
            }
        }
    }
    let never = std::sync::atomic::AtomicBool::new(false);
    let filter = scan_filter(store, min_capacity, fp_rate, &never, true)?
        .expect("a scan that is never stopped completes");
    if store.watch_generation()? == generation {
        save_filter_at(store, &filter, generation);
    }
    Ok(filter)
}

/// Why [`scan_filter`] ended early.
enum Scan {
    Store(StoreError),
    Stopped,
}

impl From<StoreError> for Scan {
    fn from(e: StoreError) -> Self {
        Scan::Store(e)
    }
}

/// A bloom filter built from every script of the `watch` family, sized for twice their
/// number and at least `min_capacity` (see [`load_filter`]); `None` when `stop` was set
/// meanwhile. Reads the database only: a follower runs it beside its pipeline, and then
/// not `parallel` (on the rayon pool its long tasks would hold the workers the parse
/// stage waits for).
pub fn scan_filter(
    store: &Store,
    min_capacity: usize,
    fp_rate: f64,
    stop: &std::sync::atomic::AtomicBool,
    parallel: bool,
) -> Result<Option<ScriptFilter>, StoreError> {
    // An estimate is enough to size it: it takes twice as many before it is outgrown.
    let count = usize::try_from(store.estimate_keys(Cf::Watch)).unwrap_or(usize::MAX);
    let filter = ScriptFilter::new(min_capacity.max(count.saturating_mul(2)), fp_rate);
    // Script ids are uniform hashes: 16 ranges of the first byte load in parallel.
    let part = |part: u8| {
        let from = [part << 4];
        let to = (part < 15).then(|| [(part + 1) << 4]);
        store.for_each_range(Cf::Watch, &from, to.as_ref().map(|t| &t[..]), |_, v| {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Scan::Stopped);
            }
            filter.insert(schema::watch_script(v).map_err(StoreError::from)?);
            Ok(())
        })
    };
    let scanned = if parallel {
        (0u8..16).into_par_iter().try_for_each(part)
    } else {
        (0u8..16).try_for_each(part)
    };
    match scanned {
        Ok(()) => Ok(Some(filter)),
        Err(Scan::Stopped) => Ok(None),
        Err(Scan::Store(e)) => Err(e),
    }
}

/// Saves `filter` as holding the watched set at its current generation: only when no
/// other writer can add scripts meanwhile (the follower stopped, a command's own add done).
pub fn save_filter(store: &Store, filter: &ScriptFilter) -> Result<(), StoreError> {
    save_filter_at(store, filter, store.watch_generation()?);
    Ok(())
}

/// Writes the filter (to a temporary file renamed over the old one); a failure only costs
/// a rebuild at the next start, so it is logged, not returned.
fn save_filter_at(store: &Store, filter: &ScriptFilter, generation: u64) {
    let path = filter_file(store);
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, filter.to_bytes(generation))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not save the watched set's filter; it is rebuilt at the next start");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn raw(n: u32) -> String {
        format!("raw(0014{:040x})", n)
    }

    fn script(n: u32) -> Vec<u8> {
        let mut s = vec![0x00, 0x14];
        s.extend_from_slice(&[0; 16]);
        s.extend_from_slice(&n.to_be_bytes());
        s
    }

    #[test]
    fn a_call_expanding_to_more_scripts_than_allowed_is_refused_before_deriving_them_all() {
        let xpub = "xpub6ERApfZwUNrhLCkDtcHTcxd75RbzS1ed54G1LkBUHQVHQKqhMkhgbmJbZRkrgZw4koxb5JaHWkY4ALHY2grBGRjaDMzQLcgJvLJuZZvRcEL";
        let ranged = format!("wpkh({xpub}/0/*)");
        let three = vec![ranged.clone(), ranged.clone(), raw(1)];
        // 20 + 20 + 1 scripts at a gap limit of 20.
        let e = expand_bounded(&three, Network::Bitcoin, 20, 41).unwrap();
        assert_eq!(e.iter().map(|e| e.scripts.len()).sum::<usize>(), 41);
        let refused = expand_bounded(&three, Network::Bitcoin, 20, 40).unwrap_err();
        assert!(
            matches!(refused, WalletError::TooMany { most: 40 }),
            "{refused}"
        );
        // An invalid descriptor is still named as such.
        let bad = vec![raw(1), "wpkh(nonsense)".to_owned()];
        assert!(matches!(
            expand_bounded(&bad, Network::Bitcoin, 20, 100),
            Err(WalletError::Descriptor(_))
        ));
    }

    #[test]
    fn a_bulk_load_across_chunks_counts_repeats_and_shared_scripts_once_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let target = WatchTarget {
            network: Network::Regtest,
            wallet: "deposits",
            birth_height: None,
            gap_limit: 20,
        };
        let total = CHUNK as u32 + 50_000;
        {
            let store = Store::open(dir.path(), Network::Regtest).unwrap();
            // Another wallet watches 1,000 of them already (they are looked up, not
            // ingested), and the second chunk repeats five of the first.
            let shared: Vec<String> = (0..1000).map(|n| raw(n * 7)).collect();
            add(&store, Network::Regtest, "hot", &shared, None, 20).unwrap();
            let filter = load_filter(&store, 400_000, 1e-3).unwrap();
            let lines = (0..total)
                .map(raw)
                .chain((0..5).map(|n| raw(n * 11 + 1)))
                .map(Ok);
            let added = add_lines(&store, &target, lines, &filter, &|_| {}).unwrap();
            assert_eq!(
                (added.new_scripts, added.known_scripts),
                (total as usize - 1000, 1000 + 5)
            );
            assert!((0..total)
                .step_by(101)
                .all(|n| filter.may_contain(&script(n))));
        }
        // Reopened: the ingested tables are part of the database.
        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        let wallets = list(&store).unwrap();
        let scripts = |name: &str| wallets.iter().find(|w| w.name == name).unwrap().scripts;
        assert_eq!(
            (scripts("hot"), scripts("deposits")),
            (1000, total as usize)
        );
        let owners = |n: u32| {
            let v = store
                .get(Cf::Watch, &ScriptId::of(&ScriptBuf::from(script(n))).0)
                .unwrap()
                .unwrap();
            schema::decode_watch(&v).unwrap().wallets
        };
        let (hot, deposits) = (
            wallets[0].id.min(wallets[1].id),
            wallets[0].id.max(wallets[1].id),
        );
        assert_eq!(owners(7 * 999), vec![hot, deposits]);
        assert_eq!(owners(total - 1), vec![deposits]);
        assert_eq!(owners(1), vec![deposits]);
        // The saved filter is stale after the load; rebuilt, it has every script once.
        assert_eq!(
            load_filter(&store, 1000, 1e-3).unwrap().len(),
            total as usize
        );
        assert!(!dir.path().join("ingest").exists());
    }

    #[test]
    fn a_saved_filter_is_used_only_at_the_generation_it_was_saved_at() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        let lines = (0..250_000u32).map(|n| Ok(raw(n)));
        let target = WatchTarget {
            network: Network::Regtest,
            wallet: "deposits",
            birth_height: None,
            gap_limit: 20,
        };
        let filter = load_filter(&store, 300_000, 1e-3).unwrap();
        let added = add_lines(&store, &target, lines, &filter, &|_| {}).unwrap();
        assert_eq!((added.new_scripts, added.known_scripts), (250_000, 0));
        assert!((0..250_000)
            .step_by(997)
            .all(|n| filter.may_contain(&script(n))));
        save_filter(&store, &filter).unwrap();
        // Loaded back as saved (the same seed and bits), every script in it.
        let loaded = load_filter(&store, 1000, 1e-3).unwrap();
        assert_eq!(
            (loaded.len(), loaded.capacity()),
            (250_000, filter.capacity())
        );
        // A change of the watched set that skipped the filter: the saved one is stale.
        add(&store, Network::Regtest, "other", &[raw(900_000)], None, 20).unwrap();
        let rebuilt = load_filter(&store, 1000, 1e-3).unwrap();
        assert!(rebuilt.may_contain(&script(900_000)));
        assert_eq!(rebuilt.len(), 250_001);
        // A damaged file is rebuilt from the database, never trusted.
        let path = dir.path().join("watch-filter.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(load_filter(&store, 1000, 1e-3).unwrap().len(), 250_001);
        assert_eq!(list(&store).unwrap()[0].scripts, 250_000);
    }
}
