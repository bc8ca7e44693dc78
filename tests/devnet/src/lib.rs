//! A bitcoind-compatible regtest node for the project's tests and demo.
//!
//! It speaks the parts of Bitcoin Core's interface the indexer and the orchestrator use
//! (JSON-RPC, REST, ZMQ, `blk*.dat` files with `xor.dat`), mines real regtest blocks, and
//! validates transaction scripts with Bitcoin Core's own interpreter (`bitcoinconsensus`).
//! Tests run it in-process through [`Node::start`], or as a separate process through
//! [`binary_path`] when they need to kill it.

mod blkstore;
mod chain;
pub mod client;
mod config;
mod cookie;
mod error;
mod http;
mod json;
mod mempool;
mod miner;
mod node;
mod rpc;
mod spend;
mod validation;
mod wallet;
mod zmqpub;

pub use blkstore::{read_blocks_dir, read_xor_key, REGTEST_MAGIC};
pub use config::{Config, RpcAuth, Topic, ZmqBind};
pub use error::{Error, Result};
pub use node::{Node, NodeHandle};
pub use zmqpub::ZmqFaults;

use std::path::PathBuf;

/// Path of the built `devnet` binary, for tests that run the node as a separate process.
///
/// Test executables live in `target/<profile>/deps/`; the binaries of the workspace are one
/// directory up.
pub fn binary_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("."));
    let deps = exe.parent().map(PathBuf::from).unwrap_or_default();
    let profile_dir = if deps.ends_with("deps") {
        deps.parent().map(PathBuf::from).unwrap_or(deps)
    } else {
        deps
    };
    profile_dir.join("devnet")
}
