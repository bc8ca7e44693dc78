//! Benchmarks (run as examples so they build with the workspace's one cargo selection):
//!
//! - `gen_chain`: writes a mainnet-like chain as bitcoind blk files, plus the descriptors
//!   of 100k watched scripts, under `fixtures/generated/` (kept out of git).
//! - `rescan_bench`: in one run, SHA-256 throughput on one and two cores, parse + filter
//!   throughput on the real large blocks, and the end-to-end rescan of the generated
//!   chain with its peak RSS; prints the ratios that go into `BENCHMARKS.md`.

pub mod mix;
pub mod rss;

/// True when a test runner (cargo test, nextest) is listing or running this program as a
/// test binary: the benchmarks then do nothing.
pub fn invoked_as_test() -> bool {
    std::env::args()
        .skip(1)
        .any(|a| a == "--list" || a == "--test" || a == "--exact" || a == "--nocapture")
        || std::env::args().len() == 1 && std::env::var_os("NEXTEST").is_some()
}
