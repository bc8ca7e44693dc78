//! Progress on stderr while indexing, and the outcome lines scripts read on stdout.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indexer::app::Observer;
use indexer::pipeline::Progress;
use indexer::rescan::Plan;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints the tip and what a rescan connected and disconnected.
pub fn print_outcome(
    tip: Option<(u32, bitcoin::BlockHash)>,
    progress: &Progress,
    disconnected: u32,
) {
    match tip {
        Some((h, hash)) => println!("tip\t{h}\t{hash}"),
        None => println!("tip\tnone"),
    }
    println!(
        "connected\t{} blocks, {} txs, {} bytes",
        progress.blocks, progress.txs, progress.bytes
    );
    println!("disconnected\t{disconnected}");
}

/// Progress on stderr: a bar with blocks/s, MB/s and ETA on a terminal, log lines otherwise.
pub struct Reporter {
    bar: ProgressBar,
    started: Instant,
    last_log: Mutex<Instant>,
    tty: bool,
    /// For `run`'s catch-up: its first and last height (then the bar goes away).
    catch_up: Mutex<Option<(u32, u32)>>,
}

impl Reporter {
    /// A reporter drawing a bar on a terminal, logging lines otherwise.
    pub fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if !tty {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} blocks  {msg}  ETA {eta}")
                .expect("static template is valid"),
        );
        Reporter {
            bar,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
            tty,
            catch_up: Mutex::new(None),
        }
    }

    /// Shows `run`'s catch-up of the blocks from height `start` to bitcoind's `to`, when
    /// there are any.
    fn catch_up(&self, start: u32, to: u32) {
        if to < start {
            self.bar.finish_and_clear();
            return;
        }
        self.bar.set_length(u64::from(to + 1 - start));
        *self
            .catch_up
            .lock()
            .expect("progress lock is never poisoned") = Some((start, to));
    }

    /// A commit while following: moves the catch-up bar until bitcoind's height at start.
    fn caught_up_to(&self, p: &Progress) {
        let mut range = self
            .catch_up
            .lock()
            .expect("progress lock is never poisoned");
        let Some((start, to)) = *range else { return };
        if p.height >= to {
            *range = None;
            self.bar.finish_and_clear();
            tracing::info!("caught up: {}", self.rates(p));
            return;
        }
        drop(range);
        let done = (p.height + 1).saturating_sub(start);
        let p = Progress {
            blocks: u64::from(done),
            ..*p
        };
        self.commit(&p);
    }

    /// The range a rescan will index.
    pub fn plan(&self, plan: &Plan) {
        let total = plan.end.map_or(0, |end| u64::from(end - plan.start + 1));
        self.bar.set_length(total);
        tracing::info!(start = plan.start, end = ?plan.end, "rescan range");
    }

    fn rates(&self, p: &Progress) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "height {}  {:.0} blocks/s  {:.1} MB/s  {:.0} tx/s",
            p.height,
            p.blocks as f64 / secs,
            p.bytes as f64 / secs / 1e6,
            p.txs as f64 / secs
        )
    }

    /// A group of blocks was committed.
    pub fn commit(&self, p: &Progress) {
        self.bar.set_position(p.blocks);
        self.bar.set_message(self.rates(p));
        if !self.tty {
            let mut last = self
                .last_log
                .lock()
                .expect("progress lock is never poisoned");
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                let eta = self.bar.eta().as_secs();
                tracing::info!(blocks = p.blocks, eta_s = eta, "{}", self.rates(p));
            }
        }
    }

    /// The run ended.
    pub fn finish(&self, p: &Progress) {
        self.bar.finish_and_clear();
        tracing::info!("done: {}", self.rates(p));
    }
}

impl Observer for Reporter {
    fn listening(&self, grpc: SocketAddr, metrics: Option<SocketAddr>) {
        if let Some(metrics) = metrics {
            println!("metrics\t{metrics}");
        }
        println!("listening\t{grpc}");
    }

    fn catching_up(&self, from: u32, to: u32) {
        self.catch_up(from, to);
    }

    fn committed(&self, progress: &Progress) {
        self.caught_up_to(progress);
    }
}
