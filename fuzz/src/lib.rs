//! The fuzz targets' bodies: one function per parser of input the system does not control
//! (block files, block bodies, ZMQ frames, JSON-RPC answers, descriptors and addresses,
//! page tokens, config files). Each must return for any input, never panic or allocate
//! from a count the input claims; where a second implementation exists, they must agree.
//!
//! `fuzz_targets/*.rs` hand them to libFuzzer (`cargo fuzz run TARGET`, or
//! `scripts/fuzz.sh`); `tests/smoke.rs` runs each target binary briefly over its corpus
//! in the test suite, so a regression fails CI.

pub mod replay;
pub mod seeds;
pub mod targets;

pub use replay::{replay_args, shake, Failure};
pub use seeds::{fixture_seeds, TARGETS};
pub use targets::{
    blk_records, block_parse, config_toml, descriptors, page_tokens, rpc_answers, zmq_frames,
};
