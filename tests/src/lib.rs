//! Support for the end-to-end tests: where the shared fixtures are, a plain reference model
//! of the watched UTXO set (written apart from the pipeline, slow and obviously right), a
//! generator of valid regtest chains, a writer of bitcoind-format block files, what a
//! running binary shows (metrics, announced addresses, JSON logs), and a proxy that makes a
//! server slow; the Kafka broker and the Temporal dev server the tests start.

// Test support: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used)]

pub mod chaingen;
pub mod fixtures;
pub mod harness;
pub mod kafka;
pub mod live;
pub mod observe;
pub mod proxy;
pub mod reference;
pub mod temporal;
