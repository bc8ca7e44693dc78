//! The metrics endpoint over plain HTTP, for the indexer and the orchestrator alike:
//! `GET /metrics` (Prometheus text format), `GET /health` (the process works) and
//! `GET /ready` (it is ready for traffic). It has no authentication: it shows counts and
//! heights, never wallets or tokens, and belongs on loopback or a monitoring network.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// What the endpoint answers from.
pub trait Probe: Send + Sync + 'static {
    /// Every series in the Prometheus text format. May block (it runs off the async
    /// threads): a scrape may read a database.
    fn render(&self) -> Result<String, std::fmt::Error>;
    /// Whether the process does its job (`/health`).
    fn healthy(&self) -> bool;
    /// Whether it is ready for traffic (`/ready`).
    fn ready(&self) -> bool;
}

/// Binds `addr` and serves `probe` there for the rest of the process's life, from a thread
/// of its own at the calling thread's priority (call it from the main thread, not from a
/// gRPC thread): health probes then answer even while the gRPC threads yield the CPU to a
/// catch-up. Returns the bound address (`addr` may name port 0).
pub fn start(addr: SocketAddr, probe: Arc<dyn Probe>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(probe);
    let (started, result) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            // Timers too: axum waits a moment after a failed accept (out of descriptors).
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name("metrics-render")
                .build();
            let (runtime, listener) = match runtime.and_then(|r| {
                let _entered = r.enter();
                let listener = tokio::net::TcpListener::from_std(listener)?;
                Ok((r, listener))
            }) {
                Ok(ready) => ready,
                Err(e) => {
                    let _ = started.send(Err(e));
                    return;
                }
            };
            let _ = started.send(Ok(()));
            if let Err(e) = runtime.block_on(async { axum::serve(listener, app).await }) {
                tracing::error!(error = %e, "the metrics endpoint stopped");
            }
        })?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the metrics thread ended while starting"))??;
    tracing::info!(%local, "serving metrics on /metrics, /health and /ready");
    Ok(local)
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> Response {
    match tokio::task::spawn_blocking(move || probe.render()).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        // Whatever failed logged why.
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be read\n",
        )
            .into_response(),
    }
}

fn answer(yes: bool, no: &'static str) -> (StatusCode, &'static str) {
    if yes {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, no)
    }
}

async fn health(State(probe): State<Arc<dyn Probe>>) -> (StatusCode, &'static str) {
    answer(probe.healthy(), "down\n")
}

async fn ready(State(probe): State<Arc<dyn Probe>>) -> (StatusCode, &'static str) {
    answer(probe.ready(), "not ready\n")
}
