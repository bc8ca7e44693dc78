//! `orchestrator run` with `engine = "temporal"`: connects to the cluster, makes sure the
//! search attributes the API filters on exist, then runs, until shutdown, a worker of the
//! task queue (the withdrawal and hot wallet workflows, and the activities with this
//! process's keys), the chain event adapter, and the `orchestrator.v1.Withdrawals` API.
//! Any number of these processes may run against one task queue.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use temporalio_client::errors::WorkflowStartError;
use temporalio_client::{
    Client, ClientOptions, ClientTlsOptions, Connection, ConnectionOptions, TlsOptions,
    WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowStartOptions,
};
use temporalio_common::protos::temporal::api::enums::v1::IndexedValueType;
use temporalio_common::protos::temporal::api::operatorservice::v1::AddSearchAttributesRequest;
use temporalio_sdk::interceptors::{
    ActivityInboundInterceptor, ExecuteActivityInput, ExecuteActivityOutput, Next,
};
use temporalio_sdk::{Worker, WorkerOptions};

use super::activities::Activities;
use super::adapter::Adapter;
use super::balancing::{BalancingState, BalancingWorkflow};
use super::hot_wallet::HotWalletWorkflow;
use super::service::TemporalWithdrawals;
use super::signatures::TemporalSignatures;
use super::withdrawal::WithdrawalWorkflow;
use super::WorkflowPolicy;
use crate::config::TemporalTarget;
use crate::indexer_client::Indexer;
use crate::payment::Payments;

/// Why the Temporal engine could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TemporalError {
    /// The address or TLS files cannot be used.
    #[error("temporal: {0}")]
    Setup(String),
    /// The cluster did not answer.
    #[error("temporal at {address}: {message} (check temporal.address and that the cluster runs)")]
    Unreachable {
        /// Its address.
        address: String,
        /// What failed.
        message: String,
    },
    /// The worker failed.
    #[error("temporal worker: {0}")]
    Worker(String),
}

fn read(what: &str, path: &std::path::Path) -> Result<Vec<u8>, TemporalError> {
    std::fs::read(path)
        .map_err(|e| TemporalError::Setup(format!("reading {what} {}: {e}", path.display())))
}

/// A client of the cluster `target` names.
pub async fn connect(target: &TemporalTarget) -> Result<Client, TemporalError> {
    let url = temporalio_client::Url::parse(&target.address)
        .map_err(|e| TemporalError::Setup(format!("address {:?}: {e}", target.address)))?;
    let tls = match &target.tls {
        None => None,
        Some(tls) => {
            let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
                (Some(cert), Some(key)) => Some(
                    ClientTlsOptions::builder()
                        .client_cert(read("temporal.client_cert_file", cert)?)
                        .client_private_key(read("temporal.client_key_file", key)?)
                        .build(),
                ),
                _ => None,
            };
            let ca = tls
                .ca_file
                .as_ref()
                .map(|ca| read("temporal.ca_file", ca))
                .transpose()?;
            Some(
                TlsOptions::builder()
                    .maybe_server_root_ca_cert(ca)
                    .maybe_client_tls_options(client_tls)
                    .build(),
            )
        }
    };
    let options = ConnectionOptions::new(url)
        .identity(format!("orchestrator@{}", std::process::id()))
        .connect_timeout(Duration::from_secs(10))
        .maybe_api_key(target.api_key.clone())
        .maybe_tls_options(tls)
        .build();
    let connection =
        Connection::connect(options)
            .await
            .map_err(|e| TemporalError::Unreachable {
                address: target.address.clone(),
                message: e.to_string(),
            })?;
    Client::new(
        connection,
        ClientOptions::new(target.namespace.clone()).build(),
    )
    .map_err(|e| TemporalError::Setup(e.to_string()))
}

/// Registers the search attributes the API and the adapter filter on (once per
/// namespace; already there is fine). One request each: a namespace that has the older
/// ones still gets one added since.
pub async fn register_search_attributes(
    client: &Client,
    namespace: &str,
) -> Result<(), TemporalError> {
    let mut operator = client.connection().operator_service();
    let wanted = [
        (super::WITHDRAWAL_ID.name(), IndexedValueType::Int),
        (super::WITHDRAWAL_STATE.name(), IndexedValueType::Keyword),
        (super::WITHDRAWAL_WALLET.name(), IndexedValueType::Keyword),
        (
            super::WITHDRAWAL_AWAITS_SIGNATURES.name(),
            IndexedValueType::Bool,
        ),
    ];
    for (name, kind) in wanted {
        let request = AddSearchAttributesRequest {
            search_attributes: [(name.to_string(), kind as i32)].into(),
            namespace: namespace.to_owned(),
        };
        match operator
            .add_search_attributes(tonic::Request::new(request))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {}
            Err(s) => {
                return Err(TemporalError::Setup(format!(
                    "registering the search attribute {name} ({kind:?}) in namespace {namespace}: {s} (an operator can add it with `temporal operator search-attribute create --name {name} --type {kind:?}`)"
                )))
            }
        }
    }
    Ok(())
}

/// Told when an activity has done its work, before its answer goes back to the server:
/// the hook tests use to kill a worker exactly there. Production runs without one.
pub trait ActivityHook: Send + Sync {
    /// Activity `activity_type` finished on this worker (its answer not yet reported).
    fn finished(&self, activity_type: &str);
}

/// Calls the hook, when there is one, after each activity.
struct HookInterceptor(Option<Arc<dyn ActivityHook>>);

impl ActivityInboundInterceptor for HookInterceptor {
    fn execute_activity<'a>(
        &'a self,
        input: ExecuteActivityInput,
        next: Next<'a, ExecuteActivityInput, ExecuteActivityOutput<'a>>,
    ) -> ExecuteActivityOutput<'a> {
        async move {
            let activity_type = input.activity_info().activity_type.clone();
            let result = next.run(input).await;
            if let Some(hook) = &self.0 {
                hook.finished(&activity_type);
            }
            result
        }
        .boxed()
    }
}

/// What the engine runs with.
pub struct Engine {
    /// The cluster.
    pub target: TemporalTarget,
    /// The bitcoin network.
    pub network: bitcoin::Network,
    /// Paying.
    pub payments: Payments,
    /// The indexer.
    pub indexer: Indexer,
    /// The Kafka topic block events come from (`None`: the indexer's Subscribe).
    pub events: Option<crate::kafka_events::KafkaEvents>,
    /// Told after each activity (tests).
    pub hook: Option<Arc<dyn ActivityHook>>,
}

/// Starts hot wallet `hot_wallet`'s balancing workflow unless it runs: its workflow id.
async fn start_balancing(
    client: &Client,
    task_queue: &str,
    hot_wallet: &str,
) -> Result<String, TemporalError> {
    let id = super::balancing_workflow_id(hot_wallet);
    let options = WorkflowStartOptions::new(task_queue.to_owned(), id.clone())
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
        .build();
    match client
        .start_workflow(BalancingWorkflow::run, BalancingState::default(), options)
        .await
    {
        Ok(_) | Err(WorkflowStartError::AlreadyStarted { .. }) => Ok(id),
        Err(e) => Err(TemporalError::Setup(format!(
            "starting the balancing workflow {id}: {e}"
        ))),
    }
}

/// Serves the API on `listener` and works the task queue until `shutdown` completes.
/// Prints `listening<TAB>ADDR` once it accepts calls.
pub async fn run(
    engine: Engine,
    listener: tokio::net::TcpListener,
    token: service::auth::BearerToken,
    latency: &service::grpc_latency::GrpcLatency,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), TemporalError> {
    let client = connect(&engine.target).await?;
    register_search_attributes(&client, &engine.target.namespace).await?;
    let policy = WorkflowPolicy::of(engine.payments.policy());
    let balancing_policy = engine.payments.policy().balancing.clone();
    let runtime = temporalio_sdk::Runtime::from_current_tokio(Default::default())
        .map_err(|e| TemporalError::Worker(e.to_string()))?;
    let activities = Activities::new(
        engine.payments,
        engine.indexer.clone(),
        client.clone(),
        engine.target.task_queue.clone(),
    );
    let options = WorkerOptions::new(engine.target.task_queue.clone())
        .register_activities(activities)
        .register_workflow::<WithdrawalWorkflow>()
        .map_err(|e| TemporalError::Worker(e.to_string()))?
        .register_workflow::<HotWalletWorkflow>()
        .map_err(|e| TemporalError::Worker(e.to_string()))?
        .register_workflow::<BalancingWorkflow>()
        .map_err(|e| TemporalError::Worker(e.to_string()))?
        .activity_inbound_interceptor(HookInterceptor(engine.hook.clone()))
        .graceful_shutdown_period(Duration::from_secs(10))
        // A dead worker's cached workflows move to another within seconds.
        .sticky_queue_schedule_to_start_timeout(Duration::from_secs(3))
        .build();
    let mut worker = Worker::new(&runtime, client.clone(), options)
        .map_err(|e| TemporalError::Worker(e.to_string()))?;
    let stop_worker = worker.shutdown_handle();
    let balancing = match balancing_policy {
        Some(b) => Some(start_balancing(&client, &engine.target.task_queue, &b.hot_wallet).await?),
        None => None,
    };
    let adapting = tokio::spawn(
        Adapter::new(engine.indexer, client.clone(), engine.events)
            .with_balancing(balancing)
            .run(),
    );
    let api = TemporalWithdrawals::new(
        client,
        engine.target.namespace.clone(),
        engine.target.task_queue.clone(),
        engine.network,
        policy,
    );
    let signatures = TemporalSignatures::new(api.clone());
    let local = listener
        .local_addr()
        .map_err(|e| TemporalError::Setup(format!("reading the bound address: {e}")))?;
    tracing::info!(%local, task_queue = %engine.target.task_queue, "serving orchestrator.v1.Withdrawals on Temporal");
    println!("listening\t{local}");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        stop_worker();
    });
    let serving = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(latency.layer())
            .add_service(signatures.into_server(token.clone()))
            .add_service(api.into_server(token))
            .serve_with_incoming_shutdown(service::listener::no_delay(listener), async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            }),
    );
    // The worker is not Send: it runs on this task.
    let worked = worker.run().await;
    adapting.abort();
    let served = serving.await;
    worked.map_err(|e| TemporalError::Worker(e.to_string()))?;
    match served {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(TemporalError::Worker(format!("serving gRPC: {e}"))),
        Err(e) => Err(TemporalError::Worker(format!("serving gRPC: {e}"))),
    }
}
