//! The one module that names RocksDB: opening with a checked format, reads, atomic batches,
//! undo application and the state digest.

pub mod recent;
pub mod schema;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bitcoin::hashes::{sha256, Hash, HashEngine};
use bitcoin::{block, BlockHash, Network};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch,
    WriteOptions, DB,
};

use crate::types::{Balance, Event, ScriptId, Utxo, WalletId};
use schema::{Cf, DecodeError, WatchRecord};

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB itself failed (I/O, disk full, corruption it detected).
    #[error("database {path}")]
    Rocks {
        /// Database directory.
        path: PathBuf,
        /// The RocksDB error.
        source: rocksdb::Error,
    },
    /// A file beside the database (a table being built for ingestion) failed.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A stored record does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The database was written by another format version.
    #[error("database format version {found}, this build reads version {expected}: re-index into a new --db directory")]
    Version {
        /// Version found on disk.
        found: u32,
        /// Version this build writes.
        expected: u32,
    },
    /// The database indexes another network.
    #[error("database indexes {found}, but {requested} was requested")]
    Network {
        /// Network recorded in the database.
        found: String,
        /// Network asked for.
        requested: String,
    },
    /// Two threads appended to the event log at once: it has one writer by design.
    #[error("two writers appended to the event log at once (a bug: it has one writer)")]
    SecondLogWriter,
    /// A disconnect needs an undo record the journal no longer keeps.
    #[error("no undo record for block {height}: the reorg is deeper than the kept undo journal; re-index with `indexer rescan --reset`")]
    UndoMissing {
        /// Height whose undo record is missing.
        height: u32,
    },
    /// Undoing a block would take a wallet's balance below zero: the stored state is damaged.
    #[error("disconnecting block {height} would take wallet {wallet}'s balance below zero; re-index with `indexer rescan --reset`")]
    Inconsistent {
        /// The wallet id.
        wallet: u32,
        /// The block being disconnected.
        height: u32,
    },
    /// A disconnect was asked of an empty index.
    #[error("nothing to disconnect: the index is empty")]
    Empty,
}

/// An atomic set of writes, committed with [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    inner: WriteBatch,
    /// Whether it changes the watched set (the committed set's generation then moves).
    watch: bool,
}

impl Batch {
    /// Sets `key` in `cf` to `value`.
    pub fn put(&mut self, store: &Store, cf: Cf, key: &[u8], value: &[u8]) {
        self.watch |= cf == Cf::Watch;
        self.inner.put_cf(store.cf(cf), key, value);
    }

    /// Deletes `key` from `cf`.
    pub fn delete(&mut self, store: &Store, cf: Cf, key: &[u8]) {
        self.watch |= cf == Cf::Watch;
        self.inner.delete_cf(store.cf(cf), key);
    }

    /// Deletes the keys of `cf` in `from..to`.
    pub fn delete_range(&mut self, store: &Store, cf: Cf, from: &[u8], to: &[u8]) {
        self.watch |= cf == Cf::Watch;
        self.inner.delete_range_cf(store.cf(cf), from, to);
    }

    /// Sets or deletes `key`.
    pub fn set(&mut self, store: &Store, cf: Cf, key: &[u8], value: Option<&[u8]>) {
        match value {
            Some(v) => self.put(store, cf, key, v),
            None => self.delete(store, cf, key),
        }
    }

    /// Bytes of the pending writes.
    pub fn size_in_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }
}

/// How a process uses the database; the families' options follow from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Indexing while serving queries (`run`, `serve`, every command but the one below):
    /// any family may be read at any time.
    Serving,
    /// Indexing with nothing else reading (`rescan --blocks-dir`, a backfill's scratch
    /// database): the families the pipeline only writes take their writes in arrival
    /// order and sort them once, when flushed.
    Indexing,
}

/// Families a rescan writes at random keys and never reads back while it runs: in the
/// [`Profile::Indexing`] profile their memtables are vectors. A skip list inserts each key
/// in order at a few cache misses a level (60% of the write thread of a rescan that
/// watches 2% of outputs); a vector appends it and sorts the whole memtable once when it
/// is flushed. Reading one unflushed costs a sort of a copy, so the store flushes a family
/// before a read finds it unflushed (see [`Store::settle`]).
fn appended_when_indexing(cf: Cf) -> bool {
    matches!(
        cf,
        Cf::Utxo | Cf::ScriptUtxo | Cf::ScriptBalance | Cf::Transfers
    )
}

/// The indexer's database.
pub struct Store {
    db: DB,
    profile: Profile,
    /// The block cache every family shares (and the tables [`Store::ingest_sorted`] writes
    /// are built for).
    cache: Cache,
    /// Names the table files [`Store::ingest_sorted`] writes.
    ingested: std::sync::atomic::AtomicU64,
    path: PathBuf,
    network: Network,
    /// Counts commits, so readers following the event log wake on new data instead of polling.
    commits: tokio::sync::watch::Sender<u64>,
    /// Set while events are appended. The log has one writer at a time (the pipeline's
    /// write stage while one runs, else the follower's thread), so this is never contended;
    /// it turns a second writer, which would give two events one offset, into an error.
    appending: std::sync::atomic::AtomicBool,
    /// The first event retention must keep: an exporter's position (`u64::MAX`: none).
    held_from: std::sync::atomic::AtomicU64,
    /// Held from reading the watch generation to committing its successor.
    watch_generation_lock: std::sync::Mutex<()>,
}

/// The options of family `cf`: those it is opened with, and those of the tables
/// [`Store::ingest_sorted`] builds for it.
fn family_options(cf: Cf, cache: &Cache, profile: Profile) -> Options {
    // Point lookups dominate (outpoints, script ids): every family gets a bloom
    // filter; `open_cf` would silently give them none.
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    // Filters and indexes in 4 KiB partitions under a pinned top level: a family of
    // millions of keys (the watched scripts) has a filter of megabytes, bigger than
    // one shard of the cache, which an LRU cache drops as soon as it is released;
    // every lookup then read and parsed the whole filter again (a rescan with 5M
    // watched scripts ran 27x slower than with 100k).
    table.set_partition_filters(true);
    table.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    table.set_metadata_block_size(4096);
    table.set_pin_top_level_index_and_filter(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut opts = Options::default();
    opts.set_block_based_table_factory(&table);
    // Script ids are hashes: LZ4 finds nothing in them and cost a sixth of the CPU of
    // loading millions of watched scripts.
    let compression = match cf {
        Cf::Watch | Cf::WalletScripts => rocksdb::DBCompressionType::None,
        _ => rocksdb::DBCompressionType::Lz4,
    };
    opts.set_compression_type(compression);
    if profile == Profile::Indexing && appended_when_indexing(cf) {
        opts.set_memtable_factory(rocksdb::MemtableFactory::Vector);
    }
    opts
}

impl Store {
    /// Opens (or creates) the database at `path` for `network`, checking its format version.
    pub fn open(path: &Path, network: Network) -> Result<Store, StoreError> {
        Store::open_as(path, network, Profile::Serving)
    }

    /// [`Store::open`] for a process that uses the database as `profile` says.
    pub fn open_as(path: &Path, network: Network, profile: Profile) -> Result<Store, StoreError> {
        let cache = Cache::new_lru_cache(128 << 20);
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(256);
        db_opts.increase_parallelism(2);
        // A compaction of one family may use both cores: after a bulk load of millions of
        // watched scripts, the larger family's compaction was one thread for seconds.
        db_opts.set_max_subcompactions(2);
        // One cap on all memtables together keeps memory flat however long a rescan runs.
        db_opts.set_db_write_buffer_size(256 << 20);
        // Families flushed together are flushed atomically (see `flush_all`).
        db_opts.set_atomic_flush(true);
        if profile == Profile::Indexing {
            // Vector memtables take one writer at a time (the pipeline has one).
            db_opts.set_allow_concurrent_memtable_write(false);
        }
        // Compactions run at a lower CPU priority: on two cores a compaction left over from
        // a bulk load took a fifth of a rescan's CPU; indexing comes first.
        let mut env = rocksdb::Env::new().map_err(|source| StoreError::Rocks {
            path: path.to_owned(),
            source,
        })?;
        env.lower_thread_pool_cpu_priority();
        db_opts.set_env(&env);
        let descriptors = Cf::ALL
            .iter()
            .map(|cf| ColumnFamilyDescriptor::new(cf.name(), family_options(*cf, &cache, profile)));
        let db = DB::open_cf_descriptors(&db_opts, path, descriptors).map_err(|source| {
            StoreError::Rocks {
                path: path.to_owned(),
                source,
            }
        })?;
        let store = Store {
            db,
            profile,
            cache,
            ingested: std::sync::atomic::AtomicU64::new(0),
            path: path.to_owned(),
            network,
            commits: tokio::sync::watch::Sender::new(0),
            appending: std::sync::atomic::AtomicBool::new(false),
            held_from: std::sync::atomic::AtomicU64::new(u64::MAX),
            watch_generation_lock: std::sync::Mutex::new(()),
        };
        store.check_format(network)?;
        recent::build_once(&store)?;
        if store.get(Cf::Meta, schema::META_LOG_ID)?.is_none() {
            // A new database (or one from before log ids): its log gets its identity now.
            let id: [u8; 16] = bitcoin::secp256k1::rand::random();
            let mut batch = Batch::default();
            batch.put(
                &store,
                Cf::Meta,
                schema::META_LOG_ID,
                hex::encode(id).as_bytes(),
            );
            store.commit(batch, true)?;
        }
        Ok(store)
    }

    fn check_format(&self, network: Network) -> Result<(), StoreError> {
        let requested = network.to_core_arg().to_string();
        match self.get(Cf::Meta, schema::META_VERSION)? {
            None => {
                let mut batch = Batch::default();
                batch.put(
                    self,
                    Cf::Meta,
                    schema::META_VERSION,
                    &schema::FORMAT_VERSION.to_be_bytes(),
                );
                batch.put(self, Cf::Meta, schema::META_NETWORK, requested.as_bytes());
                self.commit(batch, true)
            }
            Some(v) => {
                let found = schema::decode_height(&v)?;
                if found != schema::FORMAT_VERSION {
                    return Err(StoreError::Version {
                        found,
                        expected: schema::FORMAT_VERSION,
                    });
                }
                let stored = self
                    .get(Cf::Meta, schema::META_NETWORK)?
                    .unwrap_or_default();
                let found = String::from_utf8_lossy(&stored).into_owned();
                if found != requested {
                    return Err(StoreError::Network { found, requested });
                }
                Ok(())
            }
        }
    }

    /// Before a read of `cf`: in the indexing profile, flushes a vector memtable that holds
    /// writes, so that reads search sorted tables instead of sorting a copy of it each.
    /// Nothing reads those families while a rescan runs; what does before or after (a
    /// disconnect, a backfill's merge) pays one flush, not a sort a read.
    fn settle(&self, cf: Cf) -> Result<(), StoreError> {
        if self.profile != Profile::Indexing || !appended_when_indexing(cf) {
            return Ok(());
        }
        let unsorted = self
            .db
            .property_int_value_cf(self.cf(cf), "rocksdb.num-entries-active-mem-table")
            .map_err(|e| self.rocks(e))?
            .unwrap_or(0);
        if unsorted > 0 {
            self.flush_all()?;
        }
        Ok(())
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every family is created on open")
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            path: self.path.clone(),
            source,
        }
    }

    /// The network the database indexes.
    pub fn network(&self) -> Network {
        self.network
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A consistent view of the database as of now.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            store: self,
            snap: self.db.snapshot(),
        }
    }

    /// Commits a batch atomically; `sync` waits for the WAL to reach the disk.
    pub fn commit(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.write(batch, opts)
    }

    /// Adds `entries` to `cf` as one table file built beside the database and moved into
    /// it, bypassing the memtable (whose skip-list inserts of random keys were most of a
    /// bulk load's time). Keys must come strictly ascending. The file is durable once this
    /// returns; entries into `cf` of [`Cf::Watch`] first move the watched set's generation,
    /// logged, so that a crash between the two leaves a saved bloom filter distrusted,
    /// never trusted without these scripts.
    pub fn ingest_sorted<'a>(
        &self,
        cf: Cf,
        entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), StoreError> {
        let mut bump = WriteBatch::default();
        let _generation = self.move_generation(cf == Cf::Watch, &mut bump)?;
        if !bump.is_empty() {
            // Synced: an ingested table is durable at once, and a crash that kept it but
            // lost this bump would let a saved filter without its scripts be trusted.
            let mut synced = WriteOptions::default();
            synced.set_sync(true);
            self.db
                .write_opt(bump, &synced)
                .map_err(|e| self.rocks(e))?;
        }
        let dir = self.path.join("ingest");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let n = self
            .ingested
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.join(format!("{}-{}-{n}.sst", cf.name(), std::process::id()));
        let opts = family_options(cf, &self.cache, self.profile);
        let result = Self::write_table(&opts, &file, entries).and_then(|any| {
            if !any {
                return Ok(());
            }
            let mut ingest = rocksdb::IngestExternalFileOptions::default();
            ingest.set_move_files(true);
            self.db
                .ingest_external_file_cf_opts(self.cf(cf), &ingest, vec![&file])
        });
        // Moved into the database when ingested; a leftover otherwise.
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(&dir);
        result.map_err(|e| self.rocks(e))
    }

    /// Writes `entries` into a table file at `file`; false when there were none (no file).
    fn write_table<'a>(
        opts: &Options,
        file: &Path,
        entries: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<bool, rocksdb::Error> {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return Ok(false);
        }
        let mut writer = rocksdb::SstFileWriter::create(opts);
        writer.open(file)?;
        for (k, v) in entries {
            writer.put(k, v)?;
        }
        writer.finish()?;
        Ok(true)
    }

    /// Compacts `cf` whole: after a bulk load of random keys, so that the compaction it
    /// leaves behind does not share the cores with whatever runs next.
    pub fn compact(&self, cf: Cf) {
        self.db
            .compact_range_cf(self.cf(cf), None::<&[u8]>, None::<&[u8]>);
    }

    /// Writes every family's memtable to disk, all together (atomic flush: a crash never
    /// keeps some families' unlogged writes without the others').
    pub fn flush_all(&self) -> Result<(), StoreError> {
        let cfs: Vec<_> = Cf::ALL.iter().map(|cf| self.cf(*cf)).collect();
        self.db
            .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
            .map_err(|e| self.rocks(e))
    }

    fn write(&self, mut batch: Batch, opts: WriteOptions) -> Result<(), StoreError> {
        // Every change of the watched set moves its generation in the same batch: a saved
        // bloom filter is trusted only for the generation it was saved at.
        let _generation = self.move_generation(batch.watch, &mut batch.inner)?;
        self.db
            .write_opt(batch.inner, &opts)
            .map_err(|e| self.rocks(e))?;
        self.commits.send_modify(|n| *n += 1);
        Ok(())
    }

    /// When `watch` (the watched set changes), takes the generation lock and puts the next
    /// generation into `batch`; the guard is held until the change is committed.
    fn move_generation(
        &self,
        watch: bool,
        batch: &mut WriteBatch,
    ) -> Result<Option<std::sync::MutexGuard<'_, ()>>, StoreError> {
        if !watch {
            return Ok(None);
        }
        let guard = self
            .watch_generation_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let next = self.watch_generation()? + 1;
        batch.put_cf(
            self.cf(Cf::Meta),
            schema::META_WATCH_GENERATION,
            next.to_be_bytes(),
        );
        Ok(Some(guard))
    }

    /// How many commits changed the watched set (see `schema::META_WATCH_GENERATION`).
    pub fn watch_generation(&self) -> Result<u64, StoreError> {
        match self.get(Cf::Meta, schema::META_WATCH_GENERATION)? {
            Some(v) => Ok(schema::decode_offset(&v)?),
            None => Ok(0),
        }
    }

    /// Changes after every commit: wakes subscribers waiting for new events.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Visits every entry of `cf` in key order; stops at the first error `f` returns.
    pub fn for_each<E: From<StoreError>>(
        &self,
        cf: Cf,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.settle(cf)?;
        for item in self.db.iterator_cf(self.cf(cf), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Visits the entries of `cf` with keys in `from..to` (`to`: the end), in key order.
    pub fn for_each_range<E: From<StoreError>>(
        &self,
        cf: Cf,
        from: &[u8],
        to: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.settle(cf)?;
        let mode = IteratorMode::From(from, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if to.is_some_and(|to| &k[..] >= to) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Visits the entries of `cf` whose key starts with `prefix`, in key order.
    pub fn for_each_prefix<E: From<StoreError>>(
        &self,
        cf: Cf,
        prefix: &[u8],
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.settle(cf)?;
        let mode = IteratorMode::From(prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(self.cf(cf), mode) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            f(&k, &v)?;
        }
        Ok(())
    }

    /// Whether RocksDB still has compactions or flushes to run (after a bulk load).
    pub fn background_work_pending(&self) -> bool {
        let int = |cf: Cf, name: &str| {
            self.db
                .property_int_value_cf(self.cf(cf), name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        Cf::ALL.iter().any(|cf| {
            int(*cf, "rocksdb.compaction-pending") > 0
                || int(*cf, "rocksdb.num-running-compactions") > 0
                || int(*cf, "rocksdb.num-running-flushes") > 0
        })
    }

    /// RocksDB's estimate of the number of keys in `cf` (no scan: for sizing).
    pub fn estimate_keys(&self, cf: Cf) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// The values of `keys` in `cf`, in order, in one batched read (sorted keys read
    /// fastest).
    pub fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.settle(cf)?;
        let handle = self.cf(cf);
        self.db
            .batched_multi_get_cf(handle, keys, false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|v| v.to_vec())).map_err(|e| self.rocks(e)))
            .collect()
    }

    /// The last key of `cf` that starts with `prefix`, if any (one seek).
    pub fn last_key_with_prefix(
        &self,
        cf: Cf,
        prefix: &[u8],
    ) -> Result<Option<Box<[u8]>>, StoreError> {
        let mut end = prefix.to_vec();
        end.extend_from_slice(&[0xff; 16]);
        self.settle(cf)?;
        let mode = IteratorMode::From(&end, rocksdb::Direction::Reverse);
        match self.db.iterator_cf(self.cf(cf), mode).next() {
            Some(item) => {
                let (k, _) = item.map_err(|e| self.rocks(e))?;
                Ok(k.starts_with(prefix).then_some(k))
            }
            None => Ok(None),
        }
    }

    /// Number of entries in `cf` (a full scan: for status, not for hot paths).
    pub fn count(&self, cf: Cf) -> Result<u64, StoreError> {
        let mut n = 0;
        self.for_each(cf, |_, _| {
            n += 1;
            Ok::<_, StoreError>(())
        })?;
        Ok(n)
    }

    /// Every watched unspent output, in outpoint order.
    pub fn utxos(&self) -> Result<Vec<(bitcoin::OutPoint, Utxo)>, StoreError> {
        let mut out = Vec::new();
        self.for_each(Cf::Utxo, |k, v| {
            out.push((schema::decode_outpoint(k)?, schema::decode_utxo(v)?));
            Ok::<_, StoreError>(())
        })?;
        Ok(out)
    }

    /// Forgets the indexed chain (UTXOs, balances, history, headers, undo, tip) and keeps
    /// the wallets and watched scripts, so the next rescan starts from scratch.
    pub fn reset_chain_state(&self) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let end = [0xffu8; 80];
        for cf in [Cf::Headers, Cf::Undo, Cf::Reorged]
            .into_iter()
            .chain(Cf::STATE)
        {
            batch.inner.delete_range_cf(self.cf(cf), &[][..], &end[..]);
        }
        batch.delete(self, Cf::Meta, schema::META_TIP);
        batch.delete(self, Cf::Meta, schema::META_RESCAN);
        // Consumers cannot follow a reset block by block: their offsets become pruned, and
        // they resynchronize. The offset counter goes on, so no offset is ever reused.
        let next = self.next_event()?;
        batch.delete_range(
            self,
            Cf::Events,
            &schema::event_key(0),
            &schema::event_key(next),
        );
        self.commit(batch, true)
    }

    /// Whether `txid` is a confirmed watched transfer on the indexed chain.
    pub fn has_transfer(&self, txid: &bitcoin::Txid) -> Result<bool, StoreError> {
        let mut found = false;
        self.snapshot()
            .scan(Cf::Transfers, txid.as_byte_array(), None, |_, _| {
                found = true;
                Ok::<_, StoreError>(false)
            })?;
        Ok(found)
    }

    /// Keeps every event from `offset` on through retention's pruning (an exporter's
    /// position: what it has not delivered yet).
    pub fn hold_events_from(&self, offset: u64) {
        self.held_from
            .store(offset, std::sync::atomic::Ordering::Release);
    }

    /// The position the Kafka export to `topic` last committed (`None`: never).
    pub fn kafka_exported(&self, topic: &str) -> Result<Option<u64>, StoreError> {
        let key = [schema::META_KAFKA_EXPORTED_PREFIX, topic.as_bytes()].concat();
        match self.get(Cf::Meta, &key)? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_offset(&v)?)),
        }
    }

    /// Records that every event below `next` is on `topic` (after the broker committed it).
    pub fn set_kafka_exported(&self, topic: &str, next: u64) -> Result<(), StoreError> {
        let key = [schema::META_KAFKA_EXPORTED_PREFIX, topic.as_bytes()].concat();
        self.db
            .put_cf(self.cf(Cf::Meta), key, next.to_be_bytes())
            .map_err(|e| self.rocks(e))
    }

    /// Commits `writes` with `events` appended to the event log, in one atomic write;
    /// returns the next free offset.
    pub fn commit_writes(
        &self,
        writes: &Writes,
        events: &[Event],
        retention: Option<u64>,
        sync: bool,
    ) -> Result<u64, StoreError> {
        let mut batch = Batch::default();
        for ((cf, key), value) in writes {
            batch.set(self, *cf, key, value.as_deref());
        }
        self.commit_with_events(batch, events, retention, sync)
    }

    /// Commits `batch` with `events` appended to the event log in the same write, keeping
    /// the last `retention` events when given; returns the next free offset.
    pub fn commit_with_events(
        &self,
        mut batch: Batch,
        events: &[Event],
        retention: Option<u64>,
        sync: bool,
    ) -> Result<u64, StoreError> {
        let _appending = Appending::claim(&self.appending)?;
        let mut next = self.next_event()?;
        for e in events {
            batch.put(
                self,
                Cf::Events,
                &schema::event_key(next),
                &schema::encode_event(e),
            );
            next += 1;
        }
        batch.put(self, Cf::Meta, schema::META_NEXT_EVENT, &next.to_be_bytes());
        if let Some(keep) = retention {
            // Never what an exporter has yet to deliver.
            let held = self.held_from.load(std::sync::atomic::Ordering::Acquire);
            let below = next.saturating_sub(keep).min(held);
            batch.delete_range(
                self,
                Cf::Events,
                &schema::event_key(0),
                &schema::event_key(below),
            );
        }
        self.commit(batch, sync)?;
        Ok(next)
    }

    /// SHA-256 over the indexed state (every state family in key order, and the tip):
    /// equal digests mean equal UTXO sets, balances and history.
    pub fn digest(&self) -> Result<sha256::Hash, StoreError> {
        let mut engine = sha256::Hash::engine();
        let mut feed = |bytes: &[u8]| {
            engine.input(&(bytes.len() as u64).to_be_bytes());
            engine.input(bytes);
        };
        for cf in Cf::STATE {
            feed(cf.name().as_bytes());
            self.for_each(cf, |k, v| {
                feed(k);
                feed(v);
                Ok::<_, StoreError>(())
            })?;
        }
        feed(&self.get(Cf::Meta, schema::META_TIP)?.unwrap_or_default());
        Ok(sha256::Hash::from_engine(engine))
    }

    /// Flushes the write-ahead log to disk.
    pub fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(|e| self.rocks(e))
    }

    /// Approximate bytes on disk.
    pub fn size_on_disk(&self) -> u64 {
        Cf::ALL
            .iter()
            .filter_map(|cf| {
                self.db
                    .property_int_value_cf(self.cf(*cf), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
            })
            .sum()
    }
}

/// The event log's writer for as long as it lives: a second one at the same time is a
/// wiring bug, refused before it could give two events one offset.
struct Appending<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Appending<'a> {
    fn claim(flag: &'a std::sync::atomic::AtomicBool) -> Result<Self, StoreError> {
        use std::sync::atomic::Ordering;
        if flag.swap(true, Ordering::Acquire) {
            return Err(StoreError::SecondLogWriter);
        }
        Ok(Appending(flag))
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Writes to make, by column family and key, each to its final value (`None`: delete).
/// In key order, which RocksDB's memtable takes fastest.
pub type Writes = BTreeMap<(Cf, Vec<u8>), Option<Vec<u8>>>;

/// Typed reads, the same over the live database and over a [`Snapshot`].
pub trait Reader {
    /// Reads one raw value.
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The event log's identity (see `schema::META_LOG_ID`).
    fn log_id(&self) -> Result<String, StoreError> {
        Ok(self
            .get(Cf::Meta, schema::META_LOG_ID)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default())
    }

    /// The offset the next event will get.
    fn next_event(&self) -> Result<u64, StoreError> {
        match self.get(Cf::Meta, schema::META_NEXT_EVENT)? {
            None => Ok(0),
            Some(v) => Ok(schema::decode_offset(&v)?),
        }
    }

    /// The indexed tip, or `None` for an empty index.
    fn tip(&self) -> Result<Option<(u32, BlockHash)>, StoreError> {
        match self.get(Cf::Meta, schema::META_TIP)? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_tip(&v)?)),
        }
    }

    /// The indexed header at `height`.
    fn header(&self, height: u32) -> Result<Option<block::Header>, StoreError> {
        match self.get(Cf::Headers, &schema::height_key(height))? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_header(&v)?)),
        }
    }

    /// The watch record of a script, if watched.
    fn watch(&self, id: &ScriptId) -> Result<Option<WatchRecord>, StoreError> {
        match self.get(Cf::Watch, &id.0)? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_watch(&v)?)),
        }
    }

    /// The unspent output at `outpoint`, if watched and unspent.
    fn utxo(&self, outpoint: &bitcoin::OutPoint) -> Result<Option<Utxo>, StoreError> {
        match self.get(Cf::Utxo, &schema::outpoint_key(outpoint))? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_utxo(&v)?)),
        }
    }

    /// A script's balance (empty when it holds nothing).
    fn script_balance(&self, id: &ScriptId) -> Result<Balance, StoreError> {
        match self.get(Cf::ScriptBalance, &id.0)? {
            None => Ok(Balance::default()),
            Some(v) => Ok(schema::decode_balance(&v)?),
        }
    }

    /// A wallet's balance (empty when it holds nothing).
    fn wallet_balance(&self, id: WalletId) -> Result<Balance, StoreError> {
        match self.get(Cf::WalletBalance, &schema::wallet_key(id))? {
            None => Ok(Balance::default()),
            Some(v) => Ok(schema::decode_balance(&v)?),
        }
    }

    /// The id of the wallet called `name`.
    fn wallet_id(&self, name: &str) -> Result<Option<WalletId>, StoreError> {
        match self.get(Cf::Wallets, name.as_bytes())? {
            None => Ok(None),
            Some(v) => Ok(Some(schema::decode_wallet(&v)?)),
        }
    }
}

impl Reader for Store {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.settle(cf)?;
        self.db.get_cf(self.cf(cf), key).map_err(|e| self.rocks(e))
    }
}

/// The database as of one moment: a query reading through it sees one tip, never half a
/// block, however many blocks commit meanwhile.
pub struct Snapshot<'a> {
    store: &'a Store,
    snap: rocksdb::Snapshot<'a>,
}

impl Reader for Snapshot<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.settle(cf)?;
        self.snap
            .get_cf(self.store.cf(cf), key)
            .map_err(|e| self.store.rocks(e))
    }
}

impl Snapshot<'_> {
    /// Visits the entries of `cf` under `prefix` in key order from `seek` (inclusive; the
    /// start of the prefix when `None`); stops when `f` returns `false`.
    pub fn scan<E: From<StoreError>>(
        &self,
        cf: Cf,
        prefix: &[u8],
        seek: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        self.store.settle(cf)?;
        let mode = IteratorMode::From(seek.unwrap_or(prefix), rocksdb::Direction::Forward);
        for item in self.snap.iterator_cf(self.store.cf(cf), mode) {
            let (k, v) = item.map_err(|e| self.store.rocks(e))?;
            if !k.starts_with(prefix) {
                break;
            }
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_what_an_exporter_has_not_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        let event = |height| Event {
            kind: crate::types::EventKind::BlockConnected,
            height,
            block_hash: bitcoin::BlockHash::all_zeros(),
            txid: None,
            wallets: Vec::new(),
        };
        let first = |s: &Store| {
            let mut first = None;
            s.for_each(Cf::Events, |k, _| {
                first.get_or_insert(schema::decode_offset(k)?);
                Ok::<_, StoreError>(())
            })
            .unwrap();
            first
        };
        store.hold_events_from(3);
        for h in 0..10 {
            store
                .commit_writes(&Writes::new(), &[event(h)], Some(2), false)
                .unwrap();
        }
        assert_eq!(first(&store), Some(3), "held from the exporter's position");
        store.hold_events_from(9);
        store
            .commit_writes(&Writes::new(), &[event(10)], Some(2), false)
            .unwrap();
        assert_eq!(first(&store), Some(9), "retention applies once delivered");
    }

    #[test]
    fn a_second_writer_of_the_event_log_is_refused_while_the_first_appends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        let first = Appending::claim(&store.appending).unwrap();
        let event = Event {
            wallets: Vec::new(),
            kind: crate::types::EventKind::BlockConnected,
            height: 0,
            block_hash: bitcoin::BlockHash::all_zeros(),
            txid: None,
        };
        let err = store
            .commit_writes(&Writes::new(), std::slice::from_ref(&event), None, false)
            .unwrap_err();
        assert!(matches!(err, StoreError::SecondLogWriter), "{err}");
        assert_eq!(store.next_event().unwrap(), 0, "nothing was appended");
        drop(first);
        assert_eq!(
            store
                .commit_writes(&Writes::new(), &[event], None, false)
                .unwrap(),
            1
        );
    }

    #[test]
    fn the_indexing_profile_reads_and_reopens_as_the_serving_one() {
        let unsorted = |s: &Store, cf: Cf| {
            s.db.property_int_value_cf(s.cf(cf), "rocksdb.num-entries-active-mem-table")
                .unwrap()
                .unwrap()
        };
        // Random keys, overwritten and deleted across commits, in both profiles alike.
        let commits: Vec<Writes> = (0u8..6)
            .map(|round| {
                (0u8..200)
                    .map(|i| {
                        let key = sha256::Hash::hash(&[i]).to_byte_array().to_vec();
                        let value = (round % 3 != 2 || i % 2 == 0).then(|| vec![round, i]);
                        ((Cf::Utxo, key.clone()), value.clone())
                    })
                    .chain([((Cf::Transfers, vec![round]), Some(vec![round]))])
                    .collect()
            })
            .collect();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let serving = Store::open(dirs[0].path(), Network::Regtest).unwrap();
        let indexing = Store::open_as(dirs[1].path(), Network::Regtest, Profile::Indexing).unwrap();
        for writes in &commits {
            for s in [&serving, &indexing] {
                s.commit_writes(writes, &[], None, false).unwrap();
            }
        }
        assert_eq!(unsorted(&indexing, Cf::Utxo), 1200, "nothing flushed yet");
        let key = |i: u8| sha256::Hash::hash(&[i]).to_byte_array();
        assert_eq!(
            indexing.get(Cf::Utxo, &key(7)).unwrap(),
            None,
            "deleted last"
        );
        assert_eq!(indexing.get(Cf::Utxo, &key(8)).unwrap(), Some(vec![5, 8]));
        assert_eq!(unsorted(&indexing, Cf::Utxo), 0, "a read flushed first");
        assert_eq!(indexing.digest().unwrap(), serving.digest().unwrap());

        // Unflushed writes of the indexing profile come back from the log when the next
        // process opens the database for serving.
        indexing
            .commit_writes(&commits[2], &[], None, false)
            .unwrap();
        serving
            .commit_writes(&commits[2], &[], None, false)
            .unwrap();
        assert!(unsorted(&indexing, Cf::Utxo) > 0);
        drop(indexing);
        let reopened = Store::open(dirs[1].path(), Network::Regtest).unwrap();
        assert_eq!(reopened.digest().unwrap(), serving.digest().unwrap());
        assert_eq!(reopened.get(Cf::Utxo, &key(8)).unwrap(), Some(vec![2, 8]));
    }

    #[test]
    fn a_database_of_another_network_or_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Network::Regtest).unwrap());
        let err = Store::open(dir.path(), Network::Bitcoin).err().unwrap();
        assert!(matches!(err, StoreError::Network { .. }), "{err}");

        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        let mut batch = Batch::default();
        batch.put(&store, Cf::Meta, schema::META_VERSION, &99u32.to_be_bytes());
        store.commit(batch, true).unwrap();
        drop(store);
        let err = Store::open(dir.path(), Network::Regtest).err().unwrap();
        assert!(
            matches!(err, StoreError::Version { found: 99, .. }),
            "{err}"
        );
    }
}
