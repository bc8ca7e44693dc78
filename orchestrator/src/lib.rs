//! Withdrawal orchestrator: durable withdrawal sagas over the indexer's gRPC API.
//!
//! Built so far: the saga as a pure state machine ([`saga`]), its durable store with
//! idempotent submission and coin reservations ([`store`]), and the gRPC service that
//! validates, records and shows withdrawals ([`grpc`]), and the key-file [`signer`] behind
//! the `Signer` trait. The executor (coin selection, PSBT building, broadcast, monitoring
//! through the indexer's event stream, RBF) and `orchestrator run` come next; see the
//! orchestrator issue.

pub mod config;
pub mod executor;
pub mod grpc;
pub mod metrics;
pub mod saga;
pub mod select;
pub mod signer;
pub mod store;
