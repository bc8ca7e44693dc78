//! Block indexer for watched wallets.
//!
//! ```text
//!  bitcoind ──RPC/REST──▶ fetch ─┐        (catch-up; ZMQ rawblock at the tip)
//!  blk*.dat ─▶ blkfile ─▶ chain ─┤
//!                                ▼
//!   pipeline: read ─▶ parse ─▶ filter ─▶ apply ─▶ write ─▶ store (RocksDB)
//!                     rayon    bloom +   UTXOs,   one batch:
//!                              exact     balances data + undo + tip + events
//!                                                           │
//!   gRPC (grpc, query, event_feed) ◀── reads snapshots ─────┤
//!   Kafka (kafka: exporter thread) ◀── tails the event log ─┘
//! ```
//!
//! Modules by layer; each imports only from the layers below it:
//! - serving: [`grpc`] serves `indexer.v1.Indexer` ([`convert`] between queries and
//!   messages, [`event_feed`] reading the event log once for every subscriber,
//!   [`serve_priority`] keeping serving out of indexing's way); [`query`] answers balance
//!   and UTXO queries from one snapshot; [`kafka`] exports the event log to a topic;
//! - driving: [`follow`] keeps the index on bitcoind's best chain (over the `bitcoind`
//!   crate, [`zmq_feed`] and [`fetch`]); [`rescan`] indexes bitcoind's block files;
//!   [`add_watch`] takes `AddWatch` requests and [`backfill`] indexes new scripts' history;
//!   [`mempool`] tracks watched transactions in bitcoind's mempool;
//! - the block path: [`pipeline`] (parse, filter, apply, write), [`wallets`] (wallets and
//!   watched scripts in the database);
//! - edges: [`store`] is the only module that names RocksDB ([`store::schema`] holds every
//!   layout); [`blkfile`] reads block files; [`zmq_feed`] reads bitcoind's notifications;
//!   [`metrics`] counts what the others do; [`config`] holds the settings;
//! - the pure core: [`chain`] (best chain of headers), [`descriptors`] (descriptors to
//!   scripts), [`script_filter`] (the bloom filter), [`block_check`] (a body against its
//!   header), [`sha256d`] (the hashes it checks), [`buffers`], [`types`].
//!
//! What both binaries share lives in crates of its own: `bitcoind` (the RPC/REST client)
//! and `service` (auth, logging, metrics HTTP, config helpers).

pub mod add_watch;
pub mod app;
pub mod backfill;
pub mod blkfile;
pub mod block_check;
pub mod buffers;
pub mod chain;
pub mod config;
pub mod convert;
pub mod descriptors;
pub mod event_feed;
pub mod fetch;
pub mod follow;
pub mod grpc;
pub mod kafka;
pub mod mempool;
pub mod metrics;
pub mod pipeline;
pub mod query;
pub mod rescan;
pub mod script_filter;
pub mod serve_priority;
pub mod sha256d;
pub mod store;
pub mod types;
pub mod wallets;
pub mod zmq_feed;
