//! Withdrawal orchestrator: durable withdrawal sagas over the indexer's gRPC API.
//!
//! Built so far: the saga as a pure state machine ([`saga`]) and its durable store with
//! idempotent submission and coin reservations ([`store`]). The executor (coin selection,
//! PSBT signing, broadcast, monitoring through the indexer's event stream, RBF) and the
//! gRPC service come next; see the orchestrator issue.

pub mod saga;
pub mod store;
