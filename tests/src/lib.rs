//! Support for the end-to-end tests: where the shared fixtures are, a plain reference model
//! of the watched UTXO set (written apart from the pipeline, slow and obviously right), a
//! generator of valid regtest chains, a writer of bitcoind-format block files, and a reader
//! of the metrics endpoints.

// Test support: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

pub mod chaingen;
pub mod fixtures;
pub mod harness;
pub mod live;
pub mod reference;
pub mod scrape;
