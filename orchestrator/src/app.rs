//! The wiring of `orchestrator run`, as one function the binary and the tests' builds of it
//! call: open the saga store, check the signer, wait for bitcoind and the indexer, then run
//! the executor and serve `orchestrator.v1.Withdrawals` until `shutdown` completes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bitcoind::{Daemon, DaemonError};
use service::auth::{BearerToken, TokenError};
use service::grpc_latency::GrpcLatency;

use crate::config::Config;
use crate::executor::{Boundaries, Executor};
use crate::grpc::WithdrawalService;
use crate::grpc_balancing::BalancingService;
use crate::grpc_signatures::SignatureService;
use crate::indexer_client::{self, LinkError};
use crate::metrics::OrchestratorProbe;
use crate::payment::Payments;
use crate::signer::{KeyFileSigner, SignError, Signer};
use crate::store::{SagaStore, SagaStoreError};

/// Why the service could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The gRPC token file cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The key file cannot be used.
    #[error("the signer's key_file (`orchestrator keygen` creates one)")]
    KeyFile(#[source] SignError),
    /// Change would go to an address the signer cannot spend.
    #[error("change_address {address} is not paid to a key of key_file {key_file}: change sent there would be out of the wallet's reach; give an address of those keys")]
    ChangeOutOfReach {
        /// The change address.
        address: String,
        /// The key file.
        key_file: String,
    },
    /// The saga store failed.
    #[error(transparent)]
    Store(#[from] SagaStoreError),
    /// bitcoind is for another network.
    #[error(transparent)]
    WrongNetwork(DaemonError),
    /// bitcoind did not answer at start.
    #[error("{error} (after {waited}s: check bitcoind_rpc_url and bitcoind_cookie_file or bitcoind_rpc_user, and that bitcoind runs with server=1; startup_wait_secs waits longer)")]
    BitcoindUnreachable {
        /// What it said last.
        error: DaemonError,
        /// How long it was given.
        waited: u64,
    },
    /// The indexer's endpoint or token cannot be used.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The indexer did not answer at start.
    #[error("indexer at {url}: {message} (after {waited}s: check indexer, and that `indexer run` serves gRPC there; startup_wait_secs waits longer)")]
    IndexerUnreachable {
        /// Its endpoint.
        url: String,
        /// What it said last.
        message: String,
        /// How long it was given.
        waited: u64,
    },
    /// A socket or the runtime could not be set up.
    #[error("{what}")]
    Io {
        /// What was being set up.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// gRPC serving failed.
    #[error("serving gRPC")]
    Serve(#[from] tonic::transport::Error),
    /// The Temporal engine failed.
    #[error(transparent)]
    Temporal(#[from] crate::temporal::worker::TemporalError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AppError {
    let what = what.into();
    move |source| AppError::Io { what, source }
}

/// What a caller may add to the service: the executor's step-boundary hook (tests).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called at every step boundary of every saga (the embedded engine).
    pub boundaries: Option<Arc<dyn Boundaries>>,
    /// Called after every activity (the Temporal engine).
    pub activities: Option<Arc<dyn crate::temporal::worker::ActivityHook>>,
}

/// Runs the service until `shutdown` completes, then stops after the step in hand. Prints
/// `listening<TAB>ADDR` once it accepts calls (after `metrics<TAB>ADDR` when
/// `metrics_listen` is set).
pub fn run(
    config: Config,
    hooks: Hooks,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let token = BearerToken::from_file(&config.token_file)?;
    let signer =
        KeyFileSigner::open(&config.key_file, config.network).map_err(AppError::KeyFile)?;
    if !signer.scripts().contains(&config.change) {
        let address = bitcoin::Address::from_script(&config.change, config.network)
            .map_or_else(|_| config.change.to_hex_string(), |a| a.to_string());
        return Err(AppError::ChangeOutOfReach {
            address,
            key_file: config.key_file.display().to_string(),
        });
    }
    // The embedded engine's database, opened first: a second process on it is refused
    // before anything else is tried.
    let sagas = match config.temporal.clone() {
        None => Sagas::Embedded(Arc::new(SagaStore::open(&config.db)?)),
        Some(target) => Sagas::Temporal(target),
    };
    let daemon = Arc::new(Daemon::new(
        &config.bitcoind_rpc_url,
        config.bitcoind_auth.clone(),
        false,
        Duration::from_secs(30),
    ));
    // Unreachable at start means misconfigured: one line with what to check, not an
    // endless retry. (Once running, outages are retried for as long as they last.)
    match daemon.wait_ready(config.network, config.startup_wait) {
        Ok(_) => {}
        Err(e @ DaemonError::WrongNetwork { .. }) => return Err(AppError::WrongNetwork(e)),
        Err(error) => {
            return Err(AppError::BitcoindUnreachable {
                error,
                waited: config.startup_wait.as_secs(),
            })
        }
    }
    let runtime = tokio::runtime::Runtime::new().map_err(io("starting the async runtime"))?;
    runtime.block_on(async {
        let channel = indexer_client::channel(&config.indexer, config.indexer_ca_file.as_deref())?;
        let indexer = indexer_client::client(channel, config.indexer_token_file.as_deref())?;
        wait_for_indexer(indexer.clone(), &config.indexer, config.startup_wait).await?;
        let mut payments = Payments::new(
            daemon,
            Arc::new(signer),
            config.network,
            config.change.clone(),
            config.policy.clone(),
        );
        if let Some(wallet) = &config.wallet {
            payments = payments.with_descriptor_wallet(wallet.clone());
        }
        let store = match sagas {
            Sagas::Embedded(store) => store,
            Sagas::Temporal(target) => {
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .map_err(io(format!("listening on {}", config.listen)))?;
            let engine = crate::temporal::worker::Engine {
                target,
                network: config.network,
                payments,
                indexer,
                events: config.kafka_events.clone(),
                hook: hooks.activities.clone(),
            };
            let latency = GrpcLatency::default();
            crate::temporal::worker::run(engine, listener, token, &latency, shutdown).await?;
            return Ok(());
            }
        };
        let signatures = SignatureService::new(store.clone(), payments.clone());
        let balancing = BalancingService::new(store.clone(), indexer.clone(), payments.clone());
        let mut executor = Executor::new(store.clone(), indexer, payments);
        if let Some(boundaries) = hooks.boundaries {
            executor = executor.with_boundaries(boundaries);
        }
        if let Some(kafka) = config.kafka_events.clone() {
            executor = executor.with_kafka_events(kafka);
        }
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(io(format!("listening on {}", config.listen)))?;
        let local = listener
            .local_addr()
            .map_err(io("reading the bound address"))?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut stop_exec = stop_rx.clone();
        let running = Arc::new(AtomicBool::new(true));
        let executing = tokio::spawn({
            // Cleared when the executor ends, however it ends (a panic included), so
            // /health stops saying it runs.
            let alive = Alive(running.clone());
            async move {
                executor
                    .run(async move {
                        let _ = stop_exec.wait_for(|s| *s).await;
                    })
                    .await;
                drop(alive);
            }
        });
        let latency = GrpcLatency::default();
        if let Some(addr) = config.metrics_listen {
            let probe = OrchestratorProbe::new(store.clone(), &latency, running);
            let local = service::metrics_http::start(addr, Arc::new(probe))
                .map_err(io(format!("serving metrics on {addr}")))?;
            println!("metrics\t{local}");
        }
        tracing::info!(%local, unfinished = store.unfinished()?.len(), "serving orchestrator.v1.Withdrawals");
        println!("listening\t{local}");
        let mut stop_serve = stop_rx;
        let serving_ends = async move {
            let _ = stop_serve.wait_for(|s| *s).await;
        };
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
        tonic::transport::Server::builder()
            .layer(latency.layer())
            .add_service(
                WithdrawalService::new(store.clone(), config.network).into_server(token.clone()),
            )
            .add_service(signatures.into_server(token.clone()))
            .add_service(balancing.into_server(token))
            .serve_with_incoming_shutdown(service::listener::no_delay(listener), serving_ends)
            .await?;
        let _ = executing.await;
        Ok(())
    })
}

/// Completes on Ctrl-C or SIGTERM (what service managers send): the `shutdown` of
/// [`run`] for a process that runs the service.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "no SIGTERM handler: stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Waits at start until the indexer answers GetTip; one that never does is misconfigured.
async fn wait_for_indexer(
    mut client: indexer_client::Indexer,
    url: &str,
    wait: Duration,
) -> Result<(), AppError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = match client.get_tip(proto::indexer::v1::GetTipRequest {}).await {
            Ok(_) => return Ok(()),
            // An index with no block yet answered too: it is there.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => return Ok(()),
            Err(s) => s,
        };
        let waiting = status.code() == tonic::Code::Unavailable;
        if !waiting || tokio::time::Instant::now() >= deadline {
            return Err(AppError::IndexerUnreachable {
                url: url.to_owned(),
                message: status.message().to_owned(),
                waited: wait.as_secs(),
            });
        }
        tracing::warn!(%url, error = status.message(), "the indexer is not answering yet; will keep trying");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where the sagas run.
enum Sagas {
    /// In this process, on its database.
    Embedded(Arc<SagaStore>),
    /// On a Temporal cluster.
    Temporal(crate::config::TemporalTarget),
}

/// Clears its flag when dropped.
struct Alive(Arc<AtomicBool>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}
