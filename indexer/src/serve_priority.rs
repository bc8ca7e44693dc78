//! How the serving threads (the gRPC runtime's workers and blocking threads) share the CPU
//! with indexing. They always run below it, at nice +10. While a long catch-up runs flat
//! out ([`FlatOut`]), they go further and run only on CPU that indexing leaves idle
//! (Linux's `SCHED_IDLE`): a block's stages hand work to one another, and at nice +10 each
//! hand-over could still wait for a serving thread's time slice. Measured with 100
//! subscribers streaming the log during a rescan that saturates both cores: indexing ran
//! at 0.84 of its speed alone at nice +10, and as fast as with nothing to serve this way
//! (BENCHMARKS.md). At the tip, where a block takes milliseconds, they are back at nice
//! +10, so queries are not starved by a busy neighbour such as bitcoind.
//!
//! The thread that starts or ends the flat-out run switches every serving thread itself,
//! so a busy thread cannot miss the change, and a thread the runtime starts later takes the
//! current policy whatever it inherited from the thread that spawned it.
//!
//! Leaving `SCHED_IDLE` needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows the serving
//! nice value (systemd: `LimitNICE=+10`, as in `indexer.service`). That is tried once, on
//! a thread of its own; without it, serving never enters `SCHED_IDLE` and stays at nice +10.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rustix::thread::Pid;

/// How much lower than indexing the serving threads run (a nice increment).
const SERVE_NICENESS: i32 = 10;

/// The lowest priority a nice value can give.
const NICE_MAX: i32 = 19;

/// The serving threads, and what indexing needs of them now.
struct Serving {
    /// Indexing runs holding a [`FlatOut`].
    flat_out: usize,
    /// Flat-out runs so far.
    runs: u64,
    /// Every live serving thread.
    threads: Vec<Pid>,
    /// Their nice value (from the first to enroll).
    nice: Option<i32>,
    /// Whether they run as `SCHED_IDLE` now.
    yielding: bool,
    /// Whether a thread at their nice value may leave `SCHED_IDLE` (tried when first needed).
    can_return: Option<bool>,
    /// CPU time of the serving threads that have ended.
    ended_cpu: Duration,
}

static SERVING: Mutex<Serving> = Mutex::new(Serving {
    flat_out: 0,
    runs: 0,
    threads: Vec::new(),
    nice: None,
    yielding: false,
    can_return: None,
    ended_cpu: Duration::ZERO,
});

fn serving() -> MutexGuard<'static, Serving> {
    // Nothing below panics while holding it; a poisoned lock still holds a valid state.
    SERVING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// While one is held, the serving threads run only on CPU that indexing leaves idle.
#[must_use = "serving yields to indexing only while this is held"]
pub struct FlatOut(());

impl FlatOut {
    /// Starts yielding; they nest, and serving returns to nice +10 when the last one drops.
    pub fn begin() -> FlatOut {
        let mut s = serving();
        s.flat_out += 1;
        s.runs += 1;
        s.update();
        FlatOut(())
    }
}

impl Drop for FlatOut {
    fn drop(&mut self) {
        let mut s = serving();
        s.flat_out -= 1;
        s.update();
    }
}

/// Whether some indexing run holds a [`FlatOut`] now.
pub fn indexing_flat_out() -> bool {
    serving().flat_out > 0
}

/// How many flat-out runs there have been in this process.
pub fn flat_out_runs() -> u64 {
    serving().runs
}

/// The nice value for serving threads started on behalf of the calling thread: 10 lower
/// in priority than it.
pub fn serve_nice() -> i32 {
    let current = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0);
    (current + SERVE_NICENESS).min(NICE_MAX)
}

/// Makes the calling thread a serving thread at `nice` (from [`serve_nice`]), under the
/// policy serving threads have now; [`leave`] must be called before it exits.
pub fn enroll(nice: i32) {
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), nice) {
        tracing::debug!(error = %e, "could not lower a serving thread's priority");
    }
    let mut s = serving();
    s.nice.get_or_insert(nice);
    // A new thread has its spawner's policy, which may be the one serving just left.
    if let Err(e) = set_policy(me, s.yielding) {
        tracing::warn!(error = %e, yielding = s.yielding, "could not set a new serving thread's scheduling");
    }
    s.threads.push(me);
    // The first thread brings the nice value a flat-out run already waiting needs.
    s.update();
}

/// Takes the calling thread off the serving threads (it is about to exit).
pub fn leave() {
    let me = rustix::thread::gettid();
    let used = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let used = Duration::new(
        u64::try_from(used.tv_sec).unwrap_or(0),
        u32::try_from(used.tv_nsec).unwrap_or(0),
    );
    let mut s = serving();
    s.threads.retain(|t| *t != me);
    s.ended_cpu += used;
}

/// CPU time used by serving threads that have ended (the live ones' is in `/proc`).
pub fn ended_serving_cpu() -> Duration {
    serving().ended_cpu
}

impl Serving {
    /// Moves every serving thread to the policy indexing needs now.
    fn update(&mut self) {
        let want = self.flat_out > 0 && self.can_return();
        if want == self.yielding {
            return;
        }
        let mut failed = 0;
        for &tid in &self.threads {
            match set_policy(tid, want) {
                Ok(()) => {}
                Err(e) => {
                    failed += 1;
                    tracing::debug!(error = %e, tid = tid.as_raw_nonzero(), "could not change a serving thread's scheduling");
                }
            }
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                threads = self.threads.len(),
                yielding = want,
                "some serving threads kept their scheduling"
            );
        }
        self.yielding = want;
    }

    /// Whether a thread at the serving nice value may leave `SCHED_IDLE` again; tried
    /// once, on a thread of its own, so no serving thread can be left there for good.
    fn can_return(&mut self) -> bool {
        let Some(nice) = self.nice else {
            // No serving thread yet: nothing to move.
            return false;
        };
        if let Some(known) = self.can_return {
            return known;
        }
        let probe = std::thread::Builder::new()
            .name("sched-probe".into())
            .spawn(move || -> io::Result<()> {
                let me = rustix::thread::gettid();
                rustix::process::setpriority_process(Some(me), nice)?;
                set_policy(me, true)?;
                set_policy(me, false)
            });
        let probe = match probe {
            Ok(probe) => probe,
            // Says nothing about the permission: tried again next time.
            Err(e) => {
                tracing::warn!(error = %e, "could not start the scheduling probe; serving stays at nice +10 for now");
                return false;
            }
        };
        let can = match probe.join() {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "serving threads stay at nice +10 during catch-ups: leaving SCHED_IDLE needs CAP_SYS_NICE or LimitNICE=+10");
                false
            }
            Err(_) => false,
        };
        self.can_return = Some(can);
        can
    }
}

/// Puts thread `tid` under `SCHED_IDLE` (`idle`) or back under `SCHED_OTHER`, keeping its
/// nice value.
#[allow(unsafe_code)]
fn set_policy(tid: Pid, idle: bool) -> io::Result<()> {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, and the call reads
    // nothing else; Linux takes a thread id as the pid. (rustix has no sched_setscheduler.)
    let rc = unsafe { libc::sched_setscheduler(tid.as_raw_nonzero().get(), policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The async runtime the gRPC server runs on. Its threads are serving threads
/// (this module): 10 nice steps below the thread that builds it, and on idle CPU
/// only while a long catch-up runs, so consumers do not slow it down: subscriptions are
/// back-pressured and catch up when indexing idles, and queries answer when a core is free.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let nice = serve_nice();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("grpc")
        .on_thread_start(move || enroll(nice))
        .on_thread_stop(leave)
        .build()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Policy and nice value of thread `tid` of this process, read back from the kernel.
    fn scheduling(tid: &str) -> (i32, i32) {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Fields from the third on: nice is field 19, the policy field 41.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        (fields[38].parse().unwrap(), fields[16].parse().unwrap())
    }

    /// Tells a busy task to end when dropped.
    #[derive(Default)]
    struct Stop(Arc<AtomicBool>);

    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    /// Thread ids of every thread named `grpc`.
    fn grpc_tids() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|t| t.unwrap().file_name().into_string().unwrap())
            .filter(|tid| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .is_ok_and(|c| c.trim() == "grpc")
            })
            .collect()
    }

    /// (policy, nice) of every thread named `grpc`, once each has enrolled: a thread the
    /// runtime just spawned shows its spawner's scheduling until it runs `enroll`.
    fn grpc_threads() -> Vec<(i32, i32)> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let tids = grpc_tids();
            let enrolled = serving().threads.clone();
            let all = tids.iter().all(|tid| {
                enrolled
                    .iter()
                    .any(|t| t.as_raw_nonzero().to_string() == *tid)
            });
            if all || std::time::Instant::now() > until {
                return tids.iter().map(|tid| scheduling(tid)).collect();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Starts `n` blocking tasks at once from a worker (so the pool grows to `n` threads,
    /// spawned by that worker) and waits for them.
    fn blocking(rt: &tokio::runtime::Runtime, n: usize) {
        let from_worker = rt.spawn(async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    tokio::task::spawn_blocking(|| {
                        std::thread::sleep(std::time::Duration::from_millis(50))
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        rt.block_on(from_worker).unwrap();
    }

    // The one test of this process-wide state: with a second one, `cargo test` would run
    // both in one process at once (nextest gives each test a process of its own).
    #[test]
    fn every_serving_thread_yields_while_flat_out_even_a_busy_one_and_returns_after() {
        let me = rustix::thread::gettid().as_raw_nonzero().to_string();
        let mine = scheduling(&me);
        let nice = serve_nice();
        let rt = runtime().unwrap();
        if rt.metrics().num_workers() < 2 {
            // One worker kept busy would leave none for the blocking tasks below.
            eprintln!("one CPU: a busy worker cannot be tested here");
            return;
        }
        // A worker that never waits for work: it must be switched all the same. Stopped
        // before the runtime drops, also when an assertion fails (or the drop would hang).
        let stop = Stop::default();
        let busy = rt.spawn({
            let stop = stop.0.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            }
        });
        blocking(&rt, 2);
        let before = grpc_threads();
        assert!(
            before.len() >= 3,
            "workers and blocking threads: {before:?}"
        );
        assert!(before.iter().all(|&t| t == (libc::SCHED_OTHER, nice)));

        let run = FlatOut::begin();
        assert_eq!(
            scheduling(&me),
            mine,
            "a thread that is not serving is left alone"
        );
        let idle = if serving().can_return() {
            libc::SCHED_IDLE
        } else {
            eprintln!("SCHED_IDLE cannot be left here (no CAP_SYS_NICE, no nice limit): only the fallback to nice +10 is checked");
            libc::SCHED_OTHER
        };
        // New blocking threads are spawned from yielding workers meanwhile.
        blocking(&rt, 4);
        let during = grpc_threads();
        assert!(during.len() > before.len(), "new threads: {during:?}");
        assert!(during.iter().all(|&t| t == (idle, nice)), "{during:?}");

        drop(run);
        let after = grpc_threads();
        assert!(
            after.iter().all(|&t| t == (libc::SCHED_OTHER, nice)),
            "{after:?}"
        );
        drop(stop);
        rt.block_on(busy).unwrap();
    }
}
