//! The earlier history of scripts added while the indexer runs (`AddWatch` with a birth
//! height at or below the tip), indexed in the background without stopping the follower.
//!
//! The new scripts are indexed on their own into a scratch database beside the main one,
//! from their birth height to the tip of the moment, with the same pipeline as everything
//! else; the follower keeps following meanwhile. Then, between two blocks, the follower
//! brings the scratch database onto its own chain (disconnecting what a reorg replaced,
//! connecting the blocks that came since) and merges it in one batch: the scripts' UTXOs
//! and balances, their transfers (joined with what other scripts did in the same
//! transactions), the wallet's history and balance, and their entries in the undo records
//! still kept, so a later reorg undoes them like everything else. Only scripts no wallet
//! watched before are backfilled: the others already have their history.
//!
//! A job is recorded in the main database when accepted and deleted in the merge batch, so
//! a job cut short by a crash starts over at the next start.

mod coordinator;

pub use coordinator::Coordinator;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bitcoin::consensus::deserialize;
use bitcoin::{block, BlockHash, Network, ScriptBuf};
use serde::{Deserialize, Serialize};

use crate::descriptors;
use crate::fetch::{FetchOptions, Prefetch};
use crate::pipeline::apply::ApplyError;
use crate::pipeline::parse::RawBlock;
use crate::pipeline::{self, PipelineError, PipelineOptions, Progress};
use crate::store::schema::{self, Cf};
use crate::store::{Profile, Reader, Store, StoreError};
use crate::types::{Balance, ScriptId};
use crate::wallets::{self, Added, WalletError};
use bitcoind::{Daemon, DaemonError};

/// One accepted backfill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its id (also its key in the main database).
    pub id: u64,
    /// Wallet name.
    pub wallet: String,
    /// Descriptors as given.
    pub descriptors: Vec<String>,
    /// First height that may pay the scripts.
    pub birth: u32,
    /// Scripts derived from each ranged descriptor.
    pub gap_limit: u32,
    /// The scripts it backfills (those no wallet watched when it was accepted), as hex.
    pub scripts: Vec<String>,
}

impl Job {
    /// The scripts it backfills.
    pub fn scripts(&self) -> Vec<ScriptBuf> {
        self.scripts
            .iter()
            .filter_map(|h| ScriptBuf::from_hex(h).ok())
            .collect()
    }
}

/// Where a job is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Indexing the scripts' history in the scratch database.
    Indexing,
    /// Waiting for the follower to merge it between two blocks.
    Merging,
    /// Merged: the scripts are watched with their history.
    Done,
    /// Given up, with why (nothing was added).
    Failed(String),
}

/// A job and its progress, as the gRPC server shows it.
#[derive(Clone, Debug)]
pub struct Status {
    /// The job.
    pub job: Job,
    /// The height the scratch database reached.
    pub height: u32,
    /// The tip it is indexing up to.
    pub target: u32,
    /// Where it is.
    pub state: State,
}

/// Every job of this process, by id, shared by the follower and the gRPC server.
pub type Registry = Arc<Mutex<BTreeMap<u64, Status>>>;

/// Why a backfill failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    /// A database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The pipeline failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// bitcoind failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The descriptors or the wallet.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The scratch database does not end on the main database's tip.
    #[error("the scratch database ends at {found:?}, the index at {expected:?}")]
    Misaligned {
        /// Scratch tip.
        found: Option<(u32, BlockHash)>,
        /// Main tip.
        expected: Option<(u32, BlockHash)>,
    },
    /// The scratch directory could not be cleared.
    #[error("backfill scratch database {dir}: {source}")]
    Scratch {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Asked to stop.
    #[error("stopped")]
    Stopped,
}

impl BackfillError {
    /// Whether trying again later may succeed (bitcoind unavailable, the chain moving).
    pub fn is_transient(&self) -> bool {
        match self {
            BackfillError::Daemon(e) => e.worth_retrying(),
            BackfillError::Pipeline(PipelineError::Source(e)) => {
                if let Some(d) = e.downcast_ref::<DaemonError>() {
                    d.worth_retrying()
                } else if let Some(b) = e.downcast_ref::<BackfillError>() {
                    b.is_transient()
                } else {
                    false
                }
            }
            // The blocks fetched straddle a reorg, or the index moved below the birth
            // height: aligning again later resolves it.
            // A block that failed its checks is fetched again.
            BackfillError::Pipeline(PipelineError::Apply(ApplyError::NotConnecting { .. }))
            | BackfillError::Pipeline(PipelineError::Parse(_))
            | BackfillError::Misaligned { .. } => true,
            _ => false,
        }
    }
}

fn job_key(id: u64) -> Vec<u8> {
    let mut k = schema::META_BACKFILL_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Records `job` in the main database (so a crash does not lose it) and returns it with
/// its id.
pub fn record(
    main: &Store,
    wallet: &str,
    descriptors: &[String],
    birth: u32,
    gap_limit: u32,
    scripts: &[ScriptBuf],
) -> Result<Job, StoreError> {
    // Microseconds since 1970: unique across restarts without a counter to keep.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let id = pending(main)?.last().map_or(now, |j| now.max(j.id + 1));
    let job = Job {
        id,
        wallet: wallet.to_owned(),
        descriptors: descriptors.to_vec(),
        birth,
        gap_limit,
        scripts: scripts.iter().map(|s| s.to_hex_string()).collect(),
    };
    let mut batch = crate::store::Batch::default();
    let value = serde_json::to_vec(&job).expect("a job serializes");
    batch.put(main, Cf::Meta, &job_key(id), &value);
    main.commit(batch, true)?;
    Ok(job)
}

/// Jobs recorded and not merged yet, by id.
pub fn pending(main: &Store) -> Result<Vec<Job>, StoreError> {
    let mut jobs = Vec::new();
    main.for_each_prefix(Cf::Meta, schema::META_BACKFILL_PREFIX, |_, v| {
        match serde_json::from_slice::<Job>(v) {
            Ok(job) => jobs.push(job),
            Err(e) => tracing::error!(error = %e, "an unreadable backfill job is skipped"),
        }
        Ok::<_, StoreError>(())
    })?;
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}

/// The scripts of `descriptors` that no wallet of `main` watches yet (those need their
/// history indexed; the others have it).
pub fn new_scripts(
    main: &Store,
    network: Network,
    descriptors: &[String],
    gap_limit: u32,
) -> Result<Vec<ScriptBuf>, BackfillError> {
    let mut out = Vec::new();
    for d in descriptors {
        let expanded =
            descriptors::expand(d, network, gap_limit).map_err(WalletError::Descriptor)?;
        for script in expanded.scripts {
            if main.watch(&ScriptId::of(&script))?.is_none() {
                out.push(script);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The scratch database of job `id` beside `main`.
pub fn scratch_dir(main: &Store, id: u64) -> PathBuf {
    let name = main
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    main.path().with_file_name(format!("{name}.backfill-{id}"))
}

/// Phase 1: indexes `scripts` from the job's birth height to `target` into a fresh scratch
/// database at `dir`, from bitcoind's chain. `on_height` sees the height reached.
#[allow(clippy::too_many_arguments)]
pub fn index(
    job: &Job,
    scripts: &[ScriptBuf],
    daemon: Arc<Daemon>,
    dir: &Path,
    network: Network,
    target: u32,
    stop: &Arc<AtomicBool>,
    on_height: &(dyn Fn(u32) + Sync),
) -> Result<Store, BackfillError> {
    if dir.exists() {
        // Left by a run that did not finish: start over.
        std::fs::remove_dir_all(dir).map_err(|source| BackfillError::Scratch {
            dir: dir.to_owned(),
            source,
        })?;
    }
    // Nothing but this rescan reads the scratch database until it is merged.
    let scratch = Store::open_as(dir, network, Profile::Indexing)?;
    let descriptors: Vec<String> = scripts
        .iter()
        .map(|s| format!("raw({})", s.to_hex_string()))
        .collect();
    wallets::add(&scratch, network, &job.wallet, &descriptors, None, 1)?;
    let filter = wallets::load_filter(&scratch, 1_000, 1e-6)?;
    let source = Prefetch::new(daemon, job.birth, target, FetchOptions::default());
    let stop_source = stop.clone();
    let source = source.take_while(move |_| !stop_source.load(Ordering::Relaxed));
    pipeline::run(
        &scratch,
        &filter,
        source,
        &PipelineOptions::default(),
        &|p: &Progress| on_height(p.height),
    )?;
    if stop.load(Ordering::Relaxed) {
        return Err(BackfillError::Stopped);
    }
    Ok(scratch)
}

fn header_at(store: &Store, height: u32) -> Result<Option<BlockHash>, StoreError> {
    Ok(store
        .get(Cf::Headers, &schema::height_key(height))?
        .and_then(|h| deserialize::<block::Header>(&h).ok())
        .map(|h| h.block_hash()))
}

/// Phase 2 (by the follower, between blocks): brings `scratch` onto `main`'s chain, up to
/// `main`'s tip, fetching blocks by the hashes `main` indexed.
pub fn align(
    scratch: &Store,
    main: &Store,
    daemon: &Daemon,
    job: &Job,
) -> Result<(), BackfillError> {
    let Some((main_tip, _)) = main.tip()? else {
        return Err(BackfillError::Misaligned {
            found: scratch.tip()?,
            expected: None,
        });
    };
    // The highest height both chains share, at or above the birth height.
    let mut common = scratch.tip()?.map(|(h, _)| h.min(main_tip));
    while let Some(h) = common {
        if h < job.birth {
            common = None;
            break;
        }
        if header_at(scratch, h)? == header_at(main, h)? {
            break;
        }
        common = h.checked_sub(1);
    }
    let keep = common.or(job.birth.checked_sub(1));
    pipeline::disconnect::disconnect_above(scratch, keep, false)?;
    let from = keep.map_or(0, |k| k + 1);
    if from <= main_tip {
        let filter = wallets::load_filter(scratch, 1_000, 1e-6)?;
        let source = (from..=main_tip).map(|height| {
            let hash = header_at(main, height)?.ok_or(StoreError::Empty)?;
            let bytes = daemon.block(&hash)?;
            Ok(RawBlock {
                height,
                hash,
                bytes,
                origin: format!("bitcoind block {hash}"),
            })
        });
        let source = source.map(|r: Result<RawBlock, BackfillError>| {
            r.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        });
        pipeline::run(
            scratch,
            &filter,
            source,
            &PipelineOptions::default(),
            &|_| {},
        )?;
    }
    let (found, expected) = (scratch.tip()?, main.tip()?);
    if found != expected {
        return Err(BackfillError::Misaligned { found, expected });
    }
    Ok(())
}

/// Phase 3 (by the follower, right after [`align`]): watches the job's descriptors in
/// `main` with the scratch database's history, and forgets the job, in one batch.
pub fn merge(
    main: &Store,
    scratch: &Store,
    job: &Job,
    network: Network,
) -> Result<Added, BackfillError> {
    // Scripts another backfill merged since this one started are watched already: their
    // state is in the index, and the add below joins their balance and history.
    let mut merged_since = HashSet::new();
    scratch.for_each(Cf::ScriptBalance, |k, _| {
        let id = schema::decode_script_id(k)?;
        if main.watch(&id)?.is_some() {
            merged_since.insert(id);
        }
        Ok::<_, StoreError>(())
    })?;
    let prepared = wallets::prepare(
        main,
        network,
        &job.wallet,
        &job.descriptors,
        Some(job.birth),
        job.gap_limit,
    )?;
    let (mut batch, added) = (prepared.batch, prepared.added);
    let mut wallet_balance = prepared.wallet_balance;
    // Scripts others watched bring outputs by creation height; the new scripts add theirs
    // to the same aggregates, written once below.
    let mut recent = prepared.recent;
    let id = added.wallet;
    // The new scripts' own state: no other script shares these keys.
    for cf in [Cf::Utxo, Cf::ScriptUtxo] {
        scratch.for_each(cf, |k, v| {
            batch.put(main, cf, k, v);
            Ok::<_, StoreError>(())
        })?;
    }
    // Their unspent outputs, by creation height, for the wallet (scripts merged since
    // joined it in the add above).
    scratch.for_each(Cf::ScriptUtxo, |k, v| {
        if merged_since.contains(&schema::decode_script_id(&k[..32])?) {
            return Ok(());
        }
        let (value, height, coinbase) = schema::decode_script_utxo(v)?;
        recent.add(id, height, value, coinbase, 1);
        Ok::<_, StoreError>(())
    })?;
    recent.write(main, &mut batch)?;
    scratch.for_each(Cf::ScriptBalance, |k, v| {
        if merged_since.contains(&schema::decode_script_id(k)?) {
            return Ok(());
        }
        batch.put(main, Cf::ScriptBalance, k, v);
        let b: Balance = schema::decode_balance(v)?;
        wallet_balance.confirmed += b.confirmed;
        wallet_balance.immature += b.immature;
        wallet_balance.utxo_count += b.utxo_count;
        Ok::<_, StoreError>(())
    })?;
    if !wallet_balance.is_empty() {
        batch.put(
            main,
            Cf::WalletBalance,
            &schema::wallet_key(id),
            &schema::encode_balance(&wallet_balance),
        );
    }
    // Transfers: joined with what already-watched scripts did in the same transaction.
    scratch.for_each(Cf::Transfers, |k, v| {
        let mut t = schema::decode_transfer(k, v)?;
        if let Some(existing) = main.get(Cf::Transfers, k)? {
            let other = schema::decode_transfer(k, &existing)?;
            t.received.extend(other.received);
            t.received.sort_by_key(|r| r.vout);
            t.received.dedup_by_key(|r| r.vout);
            t.spent.extend(other.spent);
            t.spent.sort_by_key(|s| s.input);
            t.spent.dedup_by_key(|s| s.input);
        }
        batch.put(main, Cf::Transfers, k, &schema::encode_transfer(&t));
        batch.put(
            main,
            Cf::WalletHistory,
            &schema::history_key(id, t.height, &t.txid),
            &[],
        );
        Ok::<_, StoreError>(())
    })?;
    // Undo records the main database still keeps learn the priors of the new keys.
    scratch.for_each(Cf::Undo, |k, v| {
        let Some(existing) = main.get(Cf::Undo, k)? else {
            return Ok::<_, StoreError>(());
        };
        let mut entries = schema::decode_undo(&existing)?;
        let known: HashSet<(u8, Vec<u8>)> = entries
            .iter()
            .map(|e| (e.cf as u8, e.key.clone()))
            .collect();
        for e in schema::decode_undo(v)? {
            if !known.contains(&(e.cf as u8, e.key.clone())) {
                entries.push(e);
            }
        }
        batch.put(main, Cf::Undo, k, &schema::encode_undo(&entries));
        Ok(())
    })?;
    batch.delete(main, Cf::Meta, &job_key(job.id));
    main.commit(batch, true)?;
    Ok(added)
}

/// Removes scratch databases of jobs no longer pending (a crash between a merge and the
/// removal of its scratch database leaves one behind).
pub fn remove_orphans(main: &Store, pending: &[Job]) {
    let Some(parent) = main.path().parent() else {
        return;
    };
    let prefix = scratch_dir(main, 0)
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches('0').to_owned())
        .unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix(&prefix)
            .and_then(|i| i.parse::<u64>().ok())
        else {
            continue;
        };
        if !pending.iter().any(|j| j.id == id) {
            remove_scratch(&entry.path());
        }
    }
}

/// Removes a scratch database.
pub fn remove_scratch(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove a backfill's scratch database");
    }
}
