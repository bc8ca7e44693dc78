//! Block indexer for watched wallets.
//!
//! ```text
//!  blk*.dat ─▶ blkfile ─▶ chain (most work) ─┐
//!                                            ▼
//!        pipeline: read ─▶ parse ─▶ filter ─▶ apply ─▶ write ─▶ store (RocksDB)
//!                          rayon    bloom +   UTXOs,   one batch:
//!                                   exact     balances data + undo + tip
//! ```
//!
//! Modules, from the entry down to the pure core:
//! - [`auth`] checks bearer tokens on gRPC calls;
//! - [`grpc`] serves `indexer.v1.Indexer` (with [`convert`] between queries and messages,
//!   [`event_feed`] reading the event log once for every subscriber, and
//!   [`serve_priority`] keeping serving out of indexing's way);
//! - [`query`] answers balance and UTXO queries from one snapshot;
//! - [`follow`] keeps the index on bitcoind's best chain ([`daemon`] talks to bitcoind over
//!   RPC, REST and ZMQ; [`fetch`] prefetches blocks for catch-up);
//! - [`rescan`] drives a rescan from block files (chain choice, reorg, resume);
//! - [`pipeline`] is the staged block pipeline;
//! - [`wallets`] keeps wallets and watched scripts in the database;
//! - [`store`] is the only module that names RocksDB, and [`store::schema`] holds every layout;
//! - [`blkfile`] reads bitcoind's block files;
//! - [`config`] holds the settings;
//! - [`metrics`] counts what the others do and serves it over HTTP; [`logs`] sets up logging;
//! - the pure core: [`chain`] (best chain), [`watchlist`] (descriptors, bloom), [`types`].

pub mod auth;
pub mod backfill;
pub mod blkfile;
pub mod block_check;
pub mod buffers;
pub mod chain;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod event_feed;
pub mod fetch;
pub mod follow;
pub mod grpc;
pub mod logs;
pub mod mempool;
pub mod metrics;
pub mod pipeline;
pub mod query;
pub mod recent;
pub mod rescan;
pub mod serve_priority;
pub mod store;
pub mod types;
pub mod wallets;
pub mod watching;
pub mod watchlist;
