//! Withdrawal orchestrator: durable withdrawal sagas over the indexer's gRPC API.
//!
//! Not built yet: the saga engine, coin selection, signing and broadcast arrive with the
//! orchestrator issue. The crate exists so the workspace has its final shape.
