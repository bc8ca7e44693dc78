//! The block pipeline: named threads joined by small bounded channels.
//!
//! ```text
//! source ──chunks──▶ parse (rayon) ──chunks──▶ filter ──blocks──▶ apply ──changes──▶ write
//!  (blk files,        txids, merkle,      exact lookup      sequential,       one RocksDB
//!   bitcoind)         bloom pass          of bloom hits     in height order   batch per group
//! ```
//!
//! End of stream is a dropped sender. A failing stage returns its error and drops its
//! channels; the stages before it stop at their next send, the ones after it drain what
//! they already have, so every block before the failure is committed and none after it.

pub mod apply;
pub mod disconnect;
pub mod filter;
pub mod parse;
pub mod write;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;

use crate::metrics::{QueueDepths, Stage};
use crate::script_filter::ScriptFilter;
use crate::store::{Store, StoreError};
use crate::types::Event;
use apply::{ApplyError, ApplyState, BlockChanges};
use filter::{Filter, FilteredBlock};
use parse::{ParseError, ParsedBlock, RawBlock};
pub use write::WriteOptions;

/// Boxed error of a block source (blk files, bitcoind).
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Why the pipeline stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source could not deliver a block.
    #[error("reading blocks: {0}")]
    Source(SourceError),
    /// A block is damaged.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A block does not connect.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The filter stage failed.
    #[error(transparent)]
    Filter(#[from] filter::FilterError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Pipeline tuning.
#[derive(Clone, Copy, Debug)]
pub struct PipelineOptions {
    /// Bytes of raw blocks handed to the parser at once (parsed in parallel).
    pub chunk_bytes: usize,
    /// Writer grouping and undo depth.
    pub write: WriteOptions,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            chunk_bytes: 8 << 20,
            write: WriteOptions::default(),
        }
    }
}

/// Totals of what was committed, reported after each commit and at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Height of the last committed block.
    pub height: u32,
    /// Blocks committed.
    pub blocks: u64,
    /// Bytes of block data committed.
    pub bytes: u64,
    /// Transactions committed.
    pub txs: u64,
}

/// Runs `source`'s blocks (consecutive, starting at the tip + 1) through the pipeline into
/// `store`; `on_commit` sees the totals after every committed group.
pub fn run<I>(
    store: &Store,
    scripts: &ScriptFilter,
    source: I,
    opts: &PipelineOptions,
    on_commit: &(dyn Fn(&Progress) + Sync),
) -> Result<Progress, PipelineError>
where
    I: Iterator<Item = Result<RawBlock, SourceError>> + Send,
{
    let (queues, failed, events) = (
        QueueDepths::default(),
        AtomicBool::new(false),
        crossbeam_channel::never(),
    );
    let hooks = Hooks {
        queues: &queues,
        failed: &failed,
        events: &events,
    };
    run_observed(store, scripts, source, opts, on_commit, hooks)
}

/// What a long-running caller watches and feeds while the pipeline runs.
#[derive(Clone, Copy)]
pub struct Hooks<'a> {
    /// Where each stage records how full its input queue is.
    pub queues: &'a QueueDepths,
    /// Set as soon as a stage fails: a source that waits for blocks (the live feed) must
    /// end then, for the pipeline to end.
    pub failed: &'a AtomicBool,
    /// Events that come with no block (mempool changes): the write stage is the event log's
    /// one writer while the pipeline runs, and appends them between blocks.
    pub events: &'a Receiver<Vec<Event>>,
}

/// [`run`], with `hooks`.
pub fn run_observed<I>(
    store: &Store,
    scripts: &ScriptFilter,
    source: I,
    opts: &PipelineOptions,
    on_commit: &(dyn Fn(&Progress) + Sync),
    hooks: Hooks<'_>,
) -> Result<Progress, PipelineError>
where
    I: Iterator<Item = Result<RawBlock, SourceError>> + Send,
{
    let Hooks {
        queues,
        failed,
        events,
    } = hooks;
    let state = ApplyState::load(store)?;
    let (raw_tx, raw_rx) = bounded::<Vec<RawBlock>>(2);
    let (parsed_tx, parsed_rx) = bounded::<Vec<ParsedBlock>>(2);
    let (filtered_tx, filtered_rx) = bounded::<FilteredBlock>(64);
    let (changes_tx, changes_rx) = bounded::<BlockChanges>(64);
    let filter = Filter::new(store, scripts)?;
    // A stage's result, noted in `failed` when it is an error.
    let noted = |r: Result<(), PipelineError>| {
        if r.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        r
    };
    thread::scope(|s| {
        let spawn = |name: &str| thread::Builder::new().name(name.to_string());
        let read = spawn("read")
            .spawn_scoped(s, move || {
                noted(read_stage(source, opts.chunk_bytes, raw_tx))
            })
            .expect("spawn read thread");
        let parse = spawn("parse")
            .spawn_scoped(s, move || {
                noted(parse_stage(scripts, raw_rx, parsed_tx, queues))
            })
            .expect("spawn parse thread");
        let filter = spawn("filter")
            .spawn_scoped(s, move || {
                noted(filter_stage(filter, parsed_rx, filtered_tx, queues))
            })
            .expect("spawn filter thread");
        let apply = spawn("apply")
            .spawn_scoped(s, move || {
                noted(apply_stage(state, filtered_rx, changes_tx, queues))
            })
            .expect("spawn apply thread");
        let write = spawn("write")
            .spawn_scoped(s, move || {
                let r = write_stage(store, &opts.write, changes_rx, events, on_commit, queues);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                r
            })
            .expect("spawn write thread");
        // The earliest stage's error is the cause; later ones only saw their input end.
        let results = [
            read.join().expect("read stage panicked"),
            parse.join().expect("parse stage panicked"),
            filter.join().expect("filter stage panicked"),
            apply.join().expect("apply stage panicked"),
        ];
        let progress = write.join().expect("write stage panicked");
        // Nothing waits in a pipeline that ended.
        for stage in [Stage::Parse, Stage::Filter, Stage::Apply, Stage::Write] {
            queues.set(stage, 0);
        }
        for r in results {
            r?;
        }
        progress
    })
}

fn read_stage<I>(
    source: I,
    chunk_bytes: usize,
    out: Sender<Vec<RawBlock>>,
) -> Result<(), PipelineError>
where
    I: Iterator<Item = Result<RawBlock, SourceError>>,
{
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for raw in source {
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                // Hand on what was read before the failure so it still commits.
                let _ = out.send(chunk);
                return Err(PipelineError::Source(e));
            }
        };
        bytes += raw.bytes.len();
        chunk.push(raw);
        if bytes >= chunk_bytes {
            if out.send(std::mem::take(&mut chunk)).is_err() {
                return Ok(()); // a later stage failed and reports why
            }
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        let _ = out.send(chunk);
    }
    Ok(())
}

fn parse_stage(
    scripts: &ScriptFilter,
    input: Receiver<Vec<RawBlock>>,
    out: Sender<Vec<ParsedBlock>>,
    queues: &QueueDepths,
) -> Result<(), PipelineError> {
    for chunk in input.iter() {
        queues.set(Stage::Parse, input.len());
        let results: Vec<Result<ParsedBlock, ParseError>> = chunk
            .into_par_iter()
            .map(|raw| parse::parse_block(raw, scripts))
            .collect();
        let mut good = Vec::with_capacity(results.len());
        let mut failure = None;
        for r in results {
            match r {
                Ok(b) => good.push(b),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if out.send(good).is_err() {
            return Ok(());
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
    Ok(())
}

fn filter_stage(
    mut filter: Filter<'_>,
    input: Receiver<Vec<ParsedBlock>>,
    out: Sender<FilteredBlock>,
    queues: &QueueDepths,
) -> Result<(), PipelineError> {
    for chunk in input.iter() {
        queues.set(Stage::Filter, input.len());
        for block in chunk {
            if out.send(filter.filter_block(block)?).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn apply_stage(
    mut state: ApplyState<'_>,
    input: Receiver<FilteredBlock>,
    out: Sender<BlockChanges>,
    queues: &QueueDepths,
) -> Result<(), PipelineError> {
    for block in input.iter() {
        queues.set(Stage::Apply, input.len());
        if out.send(state.apply(block)?).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn write_stage(
    store: &Store,
    opts: &WriteOptions,
    input: Receiver<BlockChanges>,
    events: &Receiver<Vec<Event>>,
    on_commit: &(dyn Fn(&Progress) + Sync),
    queues: &QueueDepths,
) -> Result<Progress, PipelineError> {
    let mut progress = Progress::default();
    let mut group: Vec<BlockChanges> = Vec::new();
    let never = crossbeam_channel::never();
    let mut events = events;
    loop {
        let first = crossbeam_channel::select! {
            recv(input) -> block => match block {
                Ok(block) => block,
                Err(_) => break,
            },
            recv(events) -> logged => {
                match logged {
                    Ok(logged) => write::commit_events(store, &logged, opts)?,
                    // Nothing more comes that way.
                    Err(_) => events = &never,
                }
                continue;
            },
        };
        queues.set(Stage::Write, input.len());
        let mut pending = first.writes.len() * 64;
        group.push(first);
        // Take what is already queued, up to the limits: big batches when behind,
        // a batch per block when following the tip.
        while group.len() < opts.max_blocks && pending < opts.max_bytes {
            match input.try_recv() {
                Ok(ch) => {
                    pending += ch.writes.len() * 64;
                    group.push(ch);
                }
                Err(_) => break,
            }
        }
        write::commit_group(store, &mut group, opts)?;
        for ch in group.drain(..) {
            progress.height = ch.height;
            progress.blocks += 1;
            progress.bytes += ch.size as u64;
            progress.txs += ch.tx_count as u64;
        }
        on_commit(&progress);
    }
    // What was sent before the blocks ended; the sender writes again only after the
    // pipeline has ended.
    while let Ok(logged) = events.try_recv() {
        write::commit_events(store, &logged, opts)?;
    }
    store.sync_wal()?;
    Ok(progress)
}
