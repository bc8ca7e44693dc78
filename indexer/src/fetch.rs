//! Parallel block prefetch from bitcoind for catch-up: a few worker threads fetch blocks by
//! hash (REST or RPC) within a bounded window ahead of the pipeline, and the blocks come out
//! in height order. Hashes are listed lazily with batched `getblockhash`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bitcoin::BlockHash;
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::pipeline::parse::RawBlock;
use crate::pipeline::SourceError;
use bitcoind::{Daemon, DaemonError};

/// Heights listed per `getblockhash` batch.
const HASH_BATCH: u32 = 500;

/// Prefetch tuning.
#[derive(Clone, Copy, Debug)]
pub struct FetchOptions {
    /// Concurrent block requests.
    pub workers: usize,
    /// Blocks fetched ahead of the pipeline at most (bounds memory).
    pub window: usize,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            workers: 4,
            window: 32,
        }
    }
}

type Job = (u32, BlockHash);
type Fetched = (u32, BlockHash, Result<Vec<u8>, DaemonError>);

/// Blocks `from..=to` of bitcoind's active chain, in order, as a pipeline source.
pub struct Prefetch {
    daemon: Arc<Daemon>,
    jobs: Sender<Job>,
    results: Receiver<Fetched>,
    window: u32,
    /// Hashes listed but not yet handed to a worker.
    listed: VecDeque<Job>,
    next_to_list: u32,
    next_to_issue: u32,
    next_to_yield: u32,
    to: u32,
    ready: BTreeMap<u32, (BlockHash, Result<Vec<u8>, DaemonError>)>,
    done: bool,
}

impl Prefetch {
    /// Starts fetching blocks `from..=to` (nothing when `from > to`).
    pub fn new(daemon: Arc<Daemon>, from: u32, to: u32, opts: FetchOptions) -> Prefetch {
        let window = opts.window.max(1);
        // Both channels hold a whole window, so no worker ever waits on the consumer
        // for longer than it takes to use what is ready.
        let (jobs, jobs_rx) = bounded::<Job>(window);
        let (results_tx, results) = bounded::<Fetched>(window);
        for i in 0..opts.workers.max(1) {
            let (daemon, jobs_rx, results_tx) =
                (daemon.clone(), jobs_rx.clone(), results_tx.clone());
            std::thread::Builder::new()
                .name(format!("fetch-{i}"))
                .spawn(move || {
                    for (height, hash) in jobs_rx {
                        let block = daemon.block(&hash);
                        if results_tx.send((height, hash, block)).is_err() {
                            return; // the consumer is gone
                        }
                    }
                })
                .expect("spawn fetch thread");
        }
        Prefetch {
            daemon,
            jobs,
            results,
            window: window as u32,
            listed: VecDeque::new(),
            next_to_list: from,
            next_to_issue: from,
            next_to_yield: from,
            to,
            ready: BTreeMap::new(),
            done: from > to,
        }
    }

    /// Hands workers jobs until the window is full.
    fn issue(&mut self) -> Result<(), DaemonError> {
        while self.next_to_issue <= self.to && self.next_to_issue < self.next_to_yield + self.window
        {
            if self.listed.is_empty() {
                let last = self
                    .to
                    .min(self.next_to_list.saturating_add(HASH_BATCH - 1));
                let heights: Vec<u32> = (self.next_to_list..=last).collect();
                let hashes = self.daemon.block_hashes(&heights)?;
                self.listed.extend(heights.into_iter().zip(hashes));
                self.next_to_list = last + 1;
            }
            let job = self.listed.pop_front().expect("listed above");
            // Cannot block for long: at most `window` jobs are in flight.
            if self.jobs.send(job).is_err() {
                unreachable!("workers live as long as the job sender");
            }
            self.next_to_issue += 1;
        }
        Ok(())
    }

    fn next_block(&mut self) -> Result<RawBlock, DaemonError> {
        self.issue()?;
        loop {
            if let Some((hash, block)) = self.ready.remove(&self.next_to_yield) {
                let height = self.next_to_yield;
                self.next_to_yield += 1;
                return Ok(RawBlock {
                    height,
                    hash,
                    bytes: block?,
                    origin: format!("bitcoind block {hash}"),
                });
            }
            let (height, hash, block) = self
                .results
                .recv()
                .expect("workers live as long as the job sender");
            self.ready.insert(height, (hash, block));
        }
    }
}

impl Iterator for Prefetch {
    type Item = Result<RawBlock, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.next_to_yield > self.to {
            return None;
        }
        let block = self.next_block();
        // After an error the source ends: the pipeline commits what came before it.
        self.done = block.is_err();
        Some(block.map_err(|e| Box::new(e) as SourceError))
    }
}
