//! `indexer rescan --blocks-dir`: index straight from bitcoind's block files. Chooses the
//! most-work chain from the files' headers, brings the database onto it (disconnecting
//! blocks the chain no longer has), and runs the rest through the pipeline. A crash
//! resumes from the last committed block.

use std::path::PathBuf;

use bitcoin::{BlockHash, Network};
use tracing::{info, warn};

use crate::blkfile::BlockLocation;
use crate::blkfile::{BlkError, BlocksDir, PartialTail};
use crate::chain::{self, ChainEntry, ChainError, Rejected};
use crate::pipeline::parse::RawBlock;
use crate::pipeline::{self, PipelineError, PipelineOptions, Progress};
use crate::script_filter::ScriptFilter;
use crate::store::schema::{self, Cf};
use crate::store::{Batch, Reader, Store, StoreError};

/// What to rescan.
#[derive(Clone, Debug)]
pub struct RescanRequest {
    /// bitcoind's `blocks` directory.
    pub blocks_dir: PathBuf,
    /// First height to (re)index; default: the block after the indexed tip.
    pub from: Option<u32>,
    /// Last height; default: the best chain's tip in the files.
    pub to: Option<u32>,
}

/// Why a rescan stopped.
#[derive(Debug, thiserror::Error)]
pub enum RescanError {
    /// The block files are unreadable or damaged.
    #[error(transparent)]
    Blk(#[from] BlkError),
    /// No chain from genesis in the files.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A block failed in the pipeline; everything before it is committed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The best chain in the files ends below a height the index had or `--to` asked for;
    /// what it holds is indexed.
    #[error("the best chain in the block files ends at height {found}, below {wanted} ({why}){}; blocks up to {found} are indexed", notes_shown(.notes))]
    ShortChain {
        /// The files' best chain's tip.
        found: u32,
        /// The height expected.
        wanted: u32,
        /// Where `wanted` came from.
        why: &'static str,
        /// What in the files may have cut it.
        notes: Vec<String>,
    },
    /// `--from` would leave a hole above the indexed tip.
    #[error("--from {from} would leave blocks {next}..{from} unindexed (the index ends at {tip}); use --from {next} or less")]
    Gap {
        /// Requested start.
        from: u32,
        /// Indexed tip.
        tip: u32,
        /// The next height to index.
        next: u32,
    },
}

fn notes_shown(notes: &[String]) -> String {
    const SHOWN: usize = 10;
    match notes.len() {
        0 => String::new(),
        n if n <= SHOWN => format!("; possible cuts: {}", notes.join("; ")),
        n => format!(
            "; possible cuts: {}; and {} more (see the warnings)",
            notes[..SHOWN].join("; "),
            n - SHOWN
        ),
    }
}

/// What a rescan did.
#[derive(Clone, Debug)]
pub struct RescanReport {
    /// Blocks disconnected to reach the files' chain or `--from`.
    pub disconnected: u32,
    /// Totals of what was connected.
    pub progress: Progress,
    /// Height of the first block connected.
    pub start: u32,
    /// Height of the last block in the range.
    pub end: Option<u32>,
    /// The index's tip afterwards.
    pub tip: Option<(u32, BlockHash)>,
    /// Headers set aside while choosing the chain.
    pub rejected: Rejected,
    /// A partial record skipped at the end of the newest file.
    pub partial_tail: Option<PartialTail>,
}

/// The range a rescan will cover, known before it starts (for progress bars).
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// First height to connect.
    pub start: u32,
    /// Last height to connect (`None`: nothing to do).
    pub end: Option<u32>,
}

/// Rescans from `req.blocks_dir`; `on_plan` hears the range, `on_commit` each commit.
pub fn rescan_blocks_dir(
    store: &Store,
    network: Network,
    scripts: &ScriptFilter,
    req: &RescanRequest,
    opts: &PipelineOptions,
    on_plan: &dyn Fn(&Plan),
    on_commit: &(dyn Fn(&Progress) + Sync),
) -> Result<RescanReport, RescanError> {
    let prepared = prepare(store, network, req)?;
    on_plan(&prepared.plan);
    prepared.index(store, scripts, opts, on_commit)
}

/// A rescan whose chain is chosen and whose disconnects are done: what is left is to
/// connect its range, through [`Prepared::index`].
pub struct Prepared {
    dir: BlocksDir,
    chain: Vec<ChainEntry<BlockLocation>>,
    /// The range to connect.
    pub plan: Plan,
    disconnected: u32,
    indexed_before: Option<u32>,
    to: Option<u32>,
    notes: Vec<String>,
    rejected: Rejected,
    partial_tail: Option<PartialTail>,
}

/// The first half of a rescan: reads the files' headers, chooses the most-work chain and
/// disconnects what the index has off it (and what `--from` redoes). Disconnects read
/// what they undo, so this wants a store opened for serving; [`Prepared::index`] may then
/// run on one opened for indexing.
pub fn prepare(
    store: &Store,
    network: Network,
    req: &RescanRequest,
) -> Result<Prepared, RescanError> {
    let dir = BlocksDir::open(&req.blocks_dir, network)?;
    let scan = dir.scan_headers()?;
    let mut notes: Vec<String> = Vec::new();
    for note in &scan.notes {
        warn!(file = %note.path.display(), offset = note.offset, "{}", note.what);
        notes.push(note.to_string());
    }
    for (header, loc) in &scan.headers {
        if !chain::pow_ok(header, network) {
            let place = dir.describe(*loc);
            warn!(at = %place, hash = %header.block_hash(), "a block header without valid proof of work: skipped");
            notes.push(format!(
                "{place}: header {} without valid proof of work",
                header.block_hash()
            ));
        }
    }
    let indexed_before = store.tip()?.map(|(h, _)| h);
    info!(
        files = dir.files().len(),
        blocks = scan.headers.len(),
        mb = scan.block_bytes >> 20,
        "scanned block files"
    );
    let (chain, rejected) = chain::best_chain(network, scan.headers)?;
    let chain_tip = chain.len() as u32 - 1;
    info!(height = chain_tip, hash = %chain[chain_tip as usize].hash, ?rejected, "best chain in files");

    let mut disconnected = disconnect_to_fork(store, &chain)?;
    let (start, redone) = start_height(store, req)?;
    disconnected += redone;

    let end = req.to.unwrap_or(chain_tip).min(chain_tip);
    let plan = Plan {
        start,
        end: (start <= end).then_some(end),
    };
    Ok(Prepared {
        dir,
        chain,
        plan,
        disconnected,
        indexed_before,
        to: req.to,
        notes,
        rejected,
        partial_tail: scan.partial_tail,
    })
}

impl Prepared {
    /// Connects the planned range into `store` (the one prepared, or the same database
    /// opened again, for indexing alone) and ends the rescan.
    pub fn index(
        self,
        store: &Store,
        scripts: &ScriptFilter,
        opts: &PipelineOptions,
        on_commit: &(dyn Fn(&Progress) + Sync),
    ) -> Result<RescanReport, RescanError> {
        let Prepared {
            dir,
            chain,
            plan,
            disconnected,
            indexed_before,
            to,
            notes,
            rejected,
            partial_tail,
        } = self;
        let chain_tip = chain.len() as u32 - 1;
        let range: &[ChainEntry<BlockLocation>] = match plan.end {
            Some(end) => &chain[plan.start as usize..=end as usize],
            None => &[],
        };
        let source = range.iter().map(|e| read_good_copy(&dir, e));
        let progress = pipeline::run(store, scripts, source, opts, on_commit)?;
        let mut batch = Batch::default();
        batch.delete(store, Cf::Meta, schema::META_RESCAN);
        store.commit(batch, true)?;
        let wanted = match (to, indexed_before) {
            (Some(to), _) => Some((to, "asked for with --to")),
            (None, Some(tip)) => Some((tip, "the index's tip before the rescan")),
            (None, None) => None,
        };
        if let Some((wanted, why)) = wanted.filter(|(w, _)| *w > chain_tip) {
            return Err(RescanError::ShortChain {
                found: chain_tip,
                wanted,
                why,
                notes,
            });
        }
        Ok(RescanReport {
            disconnected,
            progress,
            start: plan.start,
            end: plan.end,
            tip: store.tip()?,
            rejected,
            partial_tail,
        })
    }
}

/// The block of `entry`: its first copy, or, when the files hold it more than once, the
/// first copy whose body checks out against the header (a damaged or mutated copy can sit
/// before the good one; each bad one is skipped with a warning). When none does, the first
/// copy goes on, for the parse stage to report.
fn read_good_copy(
    dir: &BlocksDir,
    entry: &ChainEntry<BlockLocation>,
) -> Result<RawBlock, crate::pipeline::SourceError> {
    let raw = |loc: BlockLocation| -> Result<RawBlock, BlkError> {
        Ok(RawBlock {
            height: entry.height,
            hash: entry.hash,
            bytes: dir.read_block(loc)?,
            origin: dir.describe(loc),
        })
    };
    let first = raw(entry.loc)?;
    if entry.copies.is_empty() {
        return Ok(first);
    }
    let nothing = ScriptFilter::new(1, 0.5);
    for loc in std::iter::once(entry.loc).chain(entry.copies.iter().copied()) {
        let copy = raw(loc)?;
        let origin = copy.origin.clone();
        match crate::pipeline::parse::parse_block(copy, &nothing) {
            Ok(_) => return Ok(raw(loc)?),
            Err(e) => {
                warn!(height = entry.height, %origin, error = %e, "a copy of the block is damaged or mutated; trying the next one")
            }
        }
    }
    Ok(first)
}

/// The first height to connect, after disconnecting what `--from` asks to redo (returns
/// how many blocks that disconnected). Records the rescan as in progress, so a restart of
/// the same command resumes rather than redoes.
fn start_height(store: &Store, req: &RescanRequest) -> Result<(u32, u32), RescanError> {
    let job = schema::rescan_job(req.from, req.to);
    let tip = store.tip()?.map(|(h, _)| h);
    let mut disconnected = 0;
    let start = match (req.from, tip) {
        (Some(from), Some(tip)) if from <= tip => {
            if store.get(Cf::Meta, schema::META_RESCAN)?.as_deref() == Some(&job[..]) {
                tip + 1 // the same rescan, interrupted: resume
            } else {
                disconnected = crate::pipeline::disconnect::disconnect_above(
                    store,
                    from.checked_sub(1),
                    false,
                )?;
                from
            }
        }
        (Some(from), Some(tip)) if from > tip + 1 => {
            return Err(RescanError::Gap {
                from,
                tip,
                next: tip + 1,
            })
        }
        (Some(from), _) => from,
        (None, Some(tip)) => tip + 1,
        (None, None) => 0,
    };
    // Recorded once the disconnects are done: a restart resumes rather than redoes.
    let mut batch = Batch::default();
    batch.put(store, Cf::Meta, schema::META_RESCAN, &job);
    store.commit(batch, true)?;
    Ok((start, disconnected))
}

/// Disconnects indexed blocks that are not on `chain`; returns how many. Refuses before
/// changing anything when the fork is deeper than the kept undo journal.
///
/// An index that is ahead of the files on the same chain is left alone.
fn disconnect_to_fork<L>(store: &Store, chain: &[ChainEntry<L>]) -> Result<u32, StoreError> {
    let Some((tip, _)) = store.tip()? else {
        return Ok(0);
    };
    let last = chain.last().expect("chain holds genesis");
    let mut height = tip.min(last.height);
    // The highest indexed height whose header is the chain's: the fork point.
    let fork = loop {
        match store.header(height)? {
            Some(h) if h.block_hash() == chain[height as usize].hash => break Some(height),
            // Below the first indexed block (indexing began above genesis): no common block.
            None => break None,
            Some(_) => {}
        }
        match height.checked_sub(1) {
            Some(h) => height = h,
            None => break None,
        }
    };
    if fork.is_some_and(|f| f >= last.height) {
        return Ok(0); // on the chain, possibly ahead of the files
    }
    let count = crate::pipeline::disconnect::disconnect_above(store, fork, false)?;
    if count > 0 {
        warn!(count, fork = ?fork, "disconnected blocks that are not on the files' best chain");
    }
    Ok(count)
}
