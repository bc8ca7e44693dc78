//! The wiring of `indexer run` and `indexer serve`, as one function both the binary and the
//! tests call: open what the config names, start the follower (for `run`), serve gRPC and
//! the metrics endpoint, and stop cleanly when `shutdown` completes or the follower ends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bitcoind::{Daemon, DaemonError};
use service::auth::{BearerToken, TokenError};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::{info, warn};

use crate::add_watch::{self, WatchChanges};
use crate::config::{Config, ConfigError};
use crate::follow::{FollowError, FollowOptions, Follower};
use crate::grpc::{self, Access, ServeError, ServeOptions};
use crate::kafka::Exporter;
use crate::metrics::IndexerMetrics;
use crate::pipeline::{PipelineOptions, Progress, WriteOptions};
use crate::store::{Reader, Store, StoreError};
use crate::wallets;

/// Why the service could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A setting cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The `[bitcoind]` settings cannot be used.
    #[error("bitcoind settings")]
    BitcoindSettings(#[source] ConfigError),
    /// The ZMQ endpoints cannot be subscribed to.
    #[error(transparent)]
    Zmq(#[from] crate::zmq_feed::ZmqError),
    /// The gRPC token file cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// Off loopback without a token.
    #[error("serving on {0}, off loopback, needs a token: set grpc_token_file")]
    TokenNeeded(SocketAddr),
    /// A TLS file cannot be read.
    #[error("reading {}", path.display())]
    Tls {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// bitcoind is for another network.
    #[error(transparent)]
    WrongNetwork(DaemonError),
    /// bitcoind did not answer at start.
    #[error("{error} (after {waited}s: check bitcoind.rpc_url, cookie_file or rpc_user, and that bitcoind runs with server=1; bitcoind.startup_wait_secs waits longer)")]
    Unreachable {
        /// What it said last.
        error: DaemonError,
        /// How long it was given.
        waited: u64,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A socket, a thread or the runtime could not be set up.
    #[error("{what}")]
    Io {
        /// What was being set up.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// gRPC serving failed.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Following bitcoind failed.
    #[error("following bitcoind failed")]
    Follow(#[from] FollowError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let what = what.into();
    move |source| AppError::Io { what, source }
}

/// What the binary sees of a running service (progress bars, the lines scripts read).
pub trait Observer: Send + Sync + 'static {
    /// Serving gRPC on `grpc`, and metrics on `metrics` when configured.
    fn listening(&self, grpc: SocketAddr, metrics: Option<SocketAddr>);
    /// `run` catches up from height `from` to bitcoind's `to` (`to < from`: nothing to do).
    fn catching_up(&self, from: u32, to: u32);
    /// A group of blocks was committed while following.
    fn committed(&self, progress: &Progress);
}

/// Whether to follow bitcoind (`indexer run`) or only serve the database (`indexer serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Follow bitcoind and serve; `AddWatch` goes to the follower.
    Run,
    /// Serve only; nothing else writes, so `AddWatch` applies at once.
    Serve,
}

/// Runs the service on `listener` until `shutdown` completes (or, in [`Mode::Run`], the
/// follower ends), then finishes open calls and the block in hand.
pub fn run(
    store: Arc<Store>,
    config: &Config,
    listener: std::net::TcpListener,
    mode: Mode,
    observer: Arc<dyn Observer>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AppError> {
    let local = listener
        .local_addr()
        .map_err(io("reading the bound address"))?;
    let mut access = grpc_access(config, local)?;
    let stop = Arc::new(AtomicBool::new(false));
    let metrics = IndexerMetrics::default();
    let mut mempool = None;
    let mut following = None;
    match mode {
        Mode::Serve => {
            access.watch = WatchChanges::Direct {
                gap_limit: config.gap_limit,
            };
            if let Some((height, _)) = store.tip()? {
                // Nothing here moves the tip.
                metrics.indexed_height.set(i64::from(height));
            }
        }
        Mode::Run => {
            let (watch, requests, backfills) = add_watch::channel(config.gap_limit);
            access.watch = watch;
            let (follower, node_height) = follower(store.clone(), config, stop.clone())?;
            observer.catching_up(store.tip()?.map_or(0, |(h, _)| h + 1), node_height);
            let sink = observer.clone();
            let follower = follower
                .with_watch_requests(requests, backfills)
                .with_metrics(metrics.clone())
                .on_commit(move |p| sink.committed(p));
            mempool = Some(follower.mempool());
            following = Some(follower);
        }
    }
    // The log's Kafka export, on its own thread: a slow or absent broker grows its lag,
    // never the follower's.
    let exporting = match (&config.kafka, mode) {
        (Some(kafka), Mode::Run) => Some(
            Exporter::new(
                store.clone(),
                config.network,
                kafka.clone(),
                metrics.kafka.clone(),
                stop.clone(),
            )
            .spawn()
            .map_err(io("starting the kafka exporter thread"))?,
        ),
        _ => None,
    };
    let runtime = crate::serve_priority::runtime().map_err(io("starting the async runtime"))?;
    let (follower_done, follower_ended) = tokio::sync::oneshot::channel::<()>();
    // Before the thread starts, so /health never answers "down" while it is starting.
    metrics.set_follower_alive(following.is_some());
    let follow = match following {
        Some(follower) => Some(
            std::thread::Builder::new()
                .name("follow".into())
                .spawn(move || {
                    let result = follower.run();
                    let _ = follower_done.send(());
                    result
                })
                .map_err(io("starting the follower thread"))?,
        ),
        None => None,
    };
    let served = runtime.block_on(async {
        listener
            .set_nonblocking(true)
            .map_err(io("setting up the listener"))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(io(format!("listening on {local}")))?;
        let metrics_at = match config.metrics_listen {
            Some(addr) => Some(
                service::metrics_http::start(addr, Arc::new(metrics.probe(follow.is_some())))
                    .map_err(io(format!("serving metrics on {addr}")))?,
            ),
            None => None,
        };
        match mode {
            Mode::Run => info!(%local, "following bitcoind; serving indexer.v1.Indexer, grpc.health.v1 and reflection"),
            Mode::Serve => info!(%local, "serving indexer.v1.Indexer, grpc.health.v1 and reflection"),
        }
        observer.listening(local, metrics_at);
        let stop_following = stop.clone();
        let with_follower = follow.is_some();
        let shutdown = async move {
            tokio::select! {
                _ = shutdown => info!("shutting down"),
                _ = follower_ended, if with_follower => {}
            }
            // Before the server drains: a catch-up ends with its block in hand, so the
            // drain does not run yielding to it.
            stop_following.store(true, Ordering::Relaxed);
        };
        let opts = ServeOptions {
            network: config.network,
            mempool,
            access,
            metrics,
        };
        grpc::serve(store.clone(), listener, opts, shutdown).await?;
        Ok::<_, AppError>(())
    });
    // Also when serving failed: finish the block in hand, then stop.
    stop.store(true, Ordering::Relaxed);
    if let Some(exporter) = exporting {
        // Its failure was logged and counted; it never stops the service.
        let _ = exporter.join().expect("kafka exporter panicked");
    }
    if let Some(follow) = follow {
        let followed = follow.join().expect("follower thread panicked");
        served?;
        followed?;
        return Ok(());
    }
    served
}

/// The token and TLS the gRPC server on `addr` uses: off loopback a token is required.
pub fn grpc_access(config: &Config, addr: SocketAddr) -> Result<Access, AppError> {
    let token = match &config.grpc_token_file {
        Some(path) => Some(BearerToken::from_file(path)?),
        None if addr.ip().is_loopback() => None,
        None => return Err(AppError::TokenNeeded(addr)),
    };
    let tls = match &config.grpc_tls {
        None => None,
        Some(files) => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|source| AppError::Tls {
                    path: path.to_owned(),
                    source,
                })
            };
            let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
            let mut tls = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = &files.client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
            }
            Some(tls)
        }
    };
    Ok(Access {
        token,
        tls,
        watch: WatchChanges::Refused,
    })
}

/// The pipeline settings the config asks for.
pub fn pipeline_options(config: &Config) -> PipelineOptions {
    PipelineOptions {
        write: WriteOptions {
            undo_depth: config.undo_depth,
            event_retention: config.event_retention,
            ..WriteOptions::default()
        },
        ..PipelineOptions::default()
    }
}

/// The follower of the configured bitcoind (with its ZMQ feed when configured), and
/// bitcoind's height when it answered.
pub fn follower(
    store: Arc<Store>,
    config: &Config,
    stop: Arc<AtomicBool>,
) -> Result<(Follower, u32), AppError> {
    let bitcoind = config
        .bitcoind
        .resolve(
            config.network,
            std::env::var("INDEXER_BITCOIND_RPC_PASSWORD").ok(),
        )
        .map_err(AppError::BitcoindSettings)?;
    let scripts = wallets::load_filter(&store, config.bloom_capacity, config.bloom_fp_rate)?;
    if scripts.is_empty() {
        warn!("no scripts are watched: add some with `indexer watch add`");
    }
    let daemon = Daemon::new(
        &bitcoind.rpc_url,
        bitcoind.auth.clone(),
        bitcoind.rest,
        bitcoind.rpc_timeout,
    );
    // A wrong network or a node that never answers at start is a configuration error:
    // said in one line with what to check, rather than retried forever.
    let info = match daemon.wait_ready(config.network, bitcoind.startup_wait) {
        Ok(info) => info,
        Err(e @ DaemonError::WrongNetwork { .. }) => return Err(AppError::WrongNetwork(e)),
        Err(error) => {
            return Err(AppError::Unreachable {
                error,
                waited: bitcoind.startup_wait.as_secs(),
            })
        }
    };
    daemon.probe_rest();
    info!(
        url = %bitcoind.rpc_url,
        height = info.blocks,
        blocks_over = if daemon.rest_in_use() { "rest" } else { "rpc getblock" },
        zmq = bitcoind.zmq.topics.len(),
        "connected to bitcoind"
    );
    let notices = if bitcoind.zmq.is_empty() {
        info!(interval = ?bitcoind.poll_interval, "no ZMQ endpoints configured: polling bitcoind");
        None
    } else {
        Some(crate::zmq_feed::spawn(&bitcoind.zmq, stop.clone())?)
    };
    let opts = FollowOptions {
        poll_interval: bitcoind.poll_interval,
        zmq_silence: bitcoind.zmq_silence,
        pipeline: pipeline_options(config),
        bloom_capacity: config.bloom_capacity,
        bloom_fp_rate: config.bloom_fp_rate,
        ..FollowOptions::default()
    };
    let follower = Follower::new(
        store,
        Arc::new(daemon),
        Arc::new(scripts),
        config.network,
        opts,
        stop,
        notices,
    );
    Ok((follower, info.blocks))
}
