//! Withdrawal orchestrator: durable withdrawal sagas over the indexer's gRPC API.
//!
//! The saga as a pure state machine ([`saga`]); its durable store with idempotent
//! submission, coin reservations and the chain's record ([`store`]); the gRPC service that
//! validates, records and shows withdrawals ([`grpc`]); coin selection ([`select`]); the
//! key-file [`signer`] behind the `Signer` trait; paying (fees, coins, signing, sending:
//! [`payment`]); the event -> saga adapter following the indexer's `Subscribe` stream
//! ([`monitor`]) or its Kafka topic ([`kafka_events`]); and the [`executor`] that
//! reserves, signs, broadcasts, bumps and completes each withdrawal, and starts the
//! wallet [`balancing`] runs (served by [`grpc_balancing`]; external signers by
//! [`grpc_signatures`]). With
//! `engine = "temporal"` the same saga runs as Temporal workflows instead ([`temporal`]).
//! [`app`] wires them into the service `orchestrator run` is, from the flags of [`cli`]
//! and the settings of [`config`]; the bitcoind client and what both services share come
//! from the `bitcoind` and `service` crates, never from the indexer.

pub mod app;
pub mod balancing;
pub mod cli;
pub mod config;
pub mod cosign;
pub mod descriptor_wallet;
pub mod executor;
pub mod grpc;
pub mod grpc_balancing;
pub mod grpc_signatures;
pub mod indexer_client;
pub mod kafka_events;
pub mod metrics;
pub mod monitor;
pub mod payment;
pub mod saga;
pub mod select;
pub mod signer;
pub mod store;
pub mod temporal;
