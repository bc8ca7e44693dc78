//! What the indexer and the orchestrator share as services, and nothing of either's domain:
//!
//! - [`auth`]: bearer tokens on gRPC calls, and secret files only their owner may read;
//! - [`config`]: the config error type, TOML parsing, network names, URL checks;
//! - [`logs`]: text or JSON logging on stderr;
//! - [`metrics_http`]: `/metrics`, `/health` and `/ready` over HTTP;
//! - [`grpc_latency`]: a tower layer timing every gRPC call;
//! - [`listener`]: accepting gRPC connections with Nagle's algorithm off.

pub mod auth;
pub mod config;
pub mod grpc_latency;
pub mod listener;
pub mod logs;
pub mod metrics_http;
