//! How the serving threads (the gRPC runtime and its blocking reads) share the CPU with
//! indexing. They always run below it (nice +10). While a long catch-up or a rescan runs
//! flat out, they go further and run only on CPU that indexing leaves idle (Linux's
//! `SCHED_IDLE`): a block's stages hand work to one another, and at nice +10 each
//! hand-over could still wait for a serving thread's time slice. Measured with 100
//! subscribers streaming the log during a rescan that saturates both cores: indexing ran at
//! 0.84 of its speed alone at nice +10, and at about 1.0 this way (BENCHMARKS.md). At the
//! tip, where a block takes milliseconds, queries keep nice +10 and are never starved by a
//! busy neighbour such as bitcoind.
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the serving
//! nice value (systemd: `LimitNICE=+10`, as in `indexer.service`). Without either, serving
//! never enters it and stays at nice +10 throughout.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How much lower than indexing the serving threads run (a nice increment).
const SERVE_NICENESS: i32 = 10;

/// Indexing runs in progress that want the CPU to themselves.
static FLAT_OUT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// On a serving thread: whether it runs as `SCHED_IDLE` now. `None` on other threads.
    static YIELDING: Cell<Option<bool>> = const { Cell::new(None) };
}

/// While one is held, the serving threads run only on CPU that indexing leaves idle.
#[must_use = "serving yields to indexing only while this is held"]
pub struct FlatOut(());

impl FlatOut {
    /// Starts yielding; they nest, and serving returns to nice +10 when the last one drops.
    pub fn begin() -> FlatOut {
        FLAT_OUT.fetch_add(1, Ordering::Relaxed);
        FlatOut(())
    }
}

impl Drop for FlatOut {
    fn drop(&mut self) {
        FLAT_OUT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether some indexing run holds a [`FlatOut`] now.
pub fn indexing_flat_out() -> bool {
    FLAT_OUT.load(Ordering::Relaxed) > 0
}

/// Makes the calling thread a serving thread: lowers its priority, then [`adjust`]s it.
pub fn enroll() {
    if let Err(e) = lower_nice() {
        tracing::debug!(error = %e, "could not lower a serving thread's priority");
    }
    YIELDING.set(Some(false));
    adjust();
}

/// Brings the calling serving thread in line with what indexing needs now. Costs one
/// atomic load when nothing changed; does nothing on other threads. A busy thread picks a
/// change up the next time it calls this (the runtime calls it whenever a thread wakes).
pub fn adjust() {
    let Some(yielding) = YIELDING.get() else {
        return;
    };
    let want = indexing_flat_out() && can_return();
    if want == yielding {
        return;
    }
    match set_policy(want) {
        Ok(()) => YIELDING.set(Some(want)),
        Err(e) => {
            tracing::warn!(error = %e, yielding = want, "could not change a serving thread's scheduling")
        }
    }
}

/// Whether a thread at the serving priority may leave `SCHED_IDLE` again; tried once, on
/// a thread of its own, so no serving thread can be left there for good.
fn can_return() -> bool {
    static CAN: OnceLock<bool> = OnceLock::new();
    *CAN.get_or_init(|| {
        let tried = std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(|| -> io::Result<()> {
                lower_nice()?;
                set_policy(true)?;
                set_policy(false)
            })
            .map_err(io::Error::other)
            .and_then(|t| t.join().unwrap_or_else(|_| Err(io::Error::other("panicked"))));
        match tried {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(error = %e, "serving threads stay at nice +10 during catch-ups: leaving SCHED_IDLE needs CAP_SYS_NICE or LimitNICE=+10");
                false
            }
        }
    })
}

/// Lowers the calling thread's priority by [`SERVE_NICENESS`].
fn lower_nice() -> io::Result<()> {
    // Linux applies a thread id's priority to that thread alone.
    let me = rustix::thread::gettid();
    let current = rustix::process::getpriority_process(Some(me))?;
    rustix::process::setpriority_process(Some(me), current + SERVE_NICENESS)?;
    Ok(())
}

/// Puts the calling thread under `SCHED_IDLE` (`idle`) or back under `SCHED_OTHER`,
/// keeping its nice value.
#[allow(unsafe_code)]
fn set_policy(idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, and pid 0 names the
    // calling thread; the call reads nothing else. (rustix has no sched_setscheduler.)
    let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's scheduling policy, read back from the kernel.
    fn policy() -> i32 {
        let stat = std::fs::read_to_string(format!(
            "/proc/self/task/{}/stat",
            rustix::thread::gettid().as_raw_nonzero()
        ))
        .unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        // Field 41 of stat is the policy; `after` starts at field 3.
        after.split_whitespace().nth(38).unwrap().parse().unwrap()
    }

    fn nice() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
    }

    // Each test has a process of its own under nextest, so no other test's run holds a
    // `FlatOut` meanwhile.
    #[test]
    fn serving_threads_yield_while_flat_out_and_return_after() {
        std::thread::spawn(|| {
            let before = nice();
            enroll();
            assert_eq!(nice(), before + SERVE_NICENESS);
            assert_eq!(policy(), libc::SCHED_OTHER);
            let run = FlatOut::begin();
            adjust();
            let returns = can_return();
            let expected = if returns {
                libc::SCHED_IDLE
            } else {
                libc::SCHED_OTHER
            };
            assert_eq!(policy(), expected);
            drop(run);
            adjust();
            assert_eq!(policy(), libc::SCHED_OTHER);
            assert_eq!(nice(), before + SERVE_NICENESS, "the nice value is kept");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn other_threads_are_left_alone() {
        std::thread::spawn(|| {
            let _run = FlatOut::begin();
            adjust();
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
