//! `orchestrator.v1.Withdrawals` on the Temporal engine: the same API, validation and
//! answers as the embedded engine's (`crate::grpc`), from workflows. A submission starts
//! the workflow whose id is the request id (a repeat, on any API server, finds the same
//! one); status is the workflow's `status` query; a cancel is its `cancel` update, refused
//! by the workflow itself when the saga refuses it. The numeric id is found through the
//! `WithdrawalId` search attribute.

use std::time::Duration;

use base64::Engine as _;
use bitcoin::Network;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_server::{Withdrawals, WithdrawalsServer};
use temporalio_client::errors::{WorkflowQueryError, WorkflowStartError, WorkflowUpdateError};
use temporalio_client::{
    Client, WorkflowExecuteUpdateOptions, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowQueryOptions, WorkflowStartOptions,
};
use temporalio_common::protos::temporal::api::workflowservice::v1::ListWorkflowExecutionsRequest;
use temporalio_common::search_attributes::SearchAttributes;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::batching::{Batched, IN_A_BATCH};
use super::withdrawal::{state_name, Changes, WithdrawalStart, WithdrawalWorkflow};
use super::{WorkflowPolicy, RESERVED_PREFIX, WITHDRAWAL_ID, WITHDRAWAL_STATE, WITHDRAWAL_WALLET};
use crate::grpc::{bad_page_token, check_request_id_length, list_filters, validate, withdrawal};
use crate::saga::{now_ms, Withdrawal};

/// How long a lookup by numeric id waits for the search index to show a new withdrawal.
const VISIBILITY_WAIT: Duration = Duration::from_secs(3);
/// How often WatchWithdrawal asks the workflow for its changes.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// The service over a Temporal namespace.
#[derive(Clone)]
pub struct TemporalWithdrawals {
    client: Client,
    namespace: String,
    task_queue: String,
    network: Network,
    policy: WorkflowPolicy,
}

impl TemporalWithdrawals {
    /// A service starting workflows on `task_queue` under `policy`.
    pub fn new(
        client: Client,
        namespace: String,
        task_queue: String,
        network: Network,
        policy: WorkflowPolicy,
    ) -> Self {
        TemporalWithdrawals {
            client,
            namespace,
            task_queue,
            network,
            policy,
        }
    }

    /// The tonic server for it, every call checked against `token`.
    pub fn into_server(
        self,
        token: service::auth::BearerToken,
    ) -> tonic::service::interceptor::InterceptedService<
        WithdrawalsServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        WithdrawalsServer::with_interceptor(self, move |req| token.check(req))
    }

    /// The same service submitting under `policy` from now on.
    pub fn with_policy(mut self, policy: WorkflowPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The Temporal client it works through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The withdrawal of workflow `workflow_id`, `None` when there is none.
    pub async fn status(&self, workflow_id: &str) -> Result<Option<Withdrawal>, Status> {
        // The last kept change is the present (one query type for the API's reads).
        Ok(self
            .changes(workflow_id, u64::MAX)
            .await?
            .and_then(|mut c| c.withdrawals.pop()))
    }

    /// The changes of a withdrawal from number `from` on (`None` when there is no such
    /// workflow).
    async fn changes(&self, workflow_id: &str, from: u64) -> Result<Option<Changes>, Status> {
        let handle = self
            .client
            .get_workflow_handle::<WithdrawalWorkflow>(workflow_id.to_owned());
        match handle
            .query(
                WithdrawalWorkflow::changes,
                from,
                WorkflowQueryOptions::default(),
            )
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(WorkflowQueryError::NotFound(_)) => Ok(None),
            Err(e) => Err(Status::unavailable(format!(
                "temporal: querying withdrawal {workflow_id}: {e}"
            ))),
        }
    }

    /// The workflow ids matching a visibility query, one page.
    pub(crate) async fn search(
        &self,
        query: String,
        page_size: i32,
        token: Vec<u8>,
    ) -> Result<(Vec<String>, Vec<u8>), Status> {
        let mut raw = self.client.clone();
        let page = temporalio_client::grpc::WorkflowService::list_workflow_executions(
            &mut raw,
            tonic::Request::new(ListWorkflowExecutionsRequest {
                namespace: self.namespace.clone(),
                page_size,
                next_page_token: token,
                query,
            }),
        )
        .await
        .map_err(|s| Status::unavailable(format!("temporal: listing withdrawals: {s}")))?
        .into_inner();
        let ids = page
            .executions
            .into_iter()
            .filter_map(|e| e.execution.map(|x| x.workflow_id))
            .collect();
        Ok((ids, page.next_page_token))
    }

    /// The request id (workflow id) of withdrawal `id`, waiting briefly for the search
    /// index to catch up with a submission just made.
    pub async fn workflow_of(&self, id: u64) -> Result<String, Status> {
        let query = format!("WorkflowType = 'withdrawal' AND WithdrawalId = {id}");
        let started = tokio::time::Instant::now();
        loop {
            let (ids, _) = self.search(query.clone(), 1, Vec::new()).await?;
            if let Some(first) = ids.into_iter().next() {
                return Ok(first);
            }
            if started.elapsed() > VISIBILITY_WAIT {
                return Err(Status::not_found(format!("no withdrawal {id}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The request id of withdrawal `id` (a batch is no withdrawal of the API's: its
    /// members are).
    async fn withdrawal_of(&self, id: u64) -> Result<String, Status> {
        let workflow = self.workflow_of(id).await?;
        if workflow.starts_with(&super::batch_workflow_id("")) {
            return Err(Status::not_found(format!(
                "no withdrawal {id} (it is a batch: its members are the withdrawals)"
            )));
        }
        Ok(workflow)
    }

    async fn find(&self, id: u64) -> Result<(String, Withdrawal), Status> {
        let workflow = self.withdrawal_of(id).await?;
        let w = self
            .status(&workflow)
            .await?
            .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))?;
        Ok((workflow, w))
    }
}

/// Starts the workflow of `request` on `task_queue` (its id is the request id): started
/// now, or running already, or finished; in every case the workflow of this request id
/// says what it is (a different request under it is the caller's to notice).
pub async fn start_withdrawal(
    client: &Client,
    task_queue: &str,
    policy: &WorkflowPolicy,
    request: &crate::saga::Request,
) -> Result<(), String> {
    let id = super::withdrawal_id(&request.request_id);
    let w = Withdrawal::new(id, request.clone(), now_ms());
    start_workflow(client, task_queue, policy, w, Batched::default()).await
}

/// Starts the workflow of withdrawal (or batch) `w`, whose id is its request id, as
/// [`start_withdrawal`] does.
pub async fn start_workflow(
    client: &Client,
    task_queue: &str,
    policy: &WorkflowPolicy,
    w: Withdrawal,
    batched: Batched,
) -> Result<(), String> {
    let workflow_id = w.request.request_id.clone();
    let options = WorkflowStartOptions::new(task_queue.to_owned(), workflow_id.clone())
        .id_reuse_policy(WorkflowIdReusePolicy::RejectDuplicate)
        .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
        .search_attributes(SearchAttributes::new([
            WITHDRAWAL_ID.value_set(w.id as i64),
            WITHDRAWAL_WALLET.value_set(w.request.wallet.clone()),
            WITHDRAWAL_STATE.value_set(state_name(w.state)),
        ]))
        .build();
    let start = WithdrawalStart {
        withdrawal: w,
        policy: policy.clone(),
        asked_coins: false,
        change: 0,
        batched,
    };
    match client
        .start_workflow(WithdrawalWorkflow::run, start, options)
        .await
    {
        Ok(_) | Err(WorkflowStartError::AlreadyStarted { .. }) => Ok(()),
        Err(e) => Err(format!("temporal: starting withdrawal {workflow_id}: {e}")),
    }
}

#[tonic::async_trait]
impl Withdrawals for TemporalWithdrawals {
    async fn submit_withdrawal(
        &self,
        req: Request<pb::SubmitWithdrawalRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let request = validate(req.into_inner(), self.network)?;
        if request.request_id.starts_with(RESERVED_PREFIX) {
            return Err(Status::invalid_argument(format!(
                "request_id may not start with {RESERVED_PREFIX:?} (the orchestrator's own workflows)"
            )));
        }
        let workflow_id = request.request_id.clone();
        start_withdrawal(&self.client, &self.task_queue, &self.policy, &request)
            .await
            .map_err(Status::unavailable)?;
        let existing = self.status(&workflow_id).await?.ok_or_else(|| {
            Status::unavailable(format!("temporal: withdrawal {workflow_id} vanished"))
        })?;
        if existing.request != request {
            return Err(Status::already_exists(format!(
                "request_id {workflow_id:?} was already used for a different withdrawal"
            )));
        }
        Ok(Response::new(withdrawal(&existing)))
    }

    async fn get_withdrawal(
        &self,
        req: Request<pb::GetWithdrawalRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let found = match req.into_inner().key {
            Some(pb::get_withdrawal_request::Key::Id(id)) => self.find(id).await?.1,
            Some(pb::get_withdrawal_request::Key::RequestId(r)) => {
                check_request_id_length(&r)?;
                let found = if r.is_empty() || r.starts_with(RESERVED_PREFIX) {
                    None
                } else {
                    self.status(&r).await?
                };
                found.ok_or_else(|| {
                    Status::not_found(format!("no withdrawal for request_id {r:?}"))
                })?
            }
            None => return Err(Status::invalid_argument("give id or request_id")),
        };
        Ok(Response::new(withdrawal(&found)))
    }

    async fn list_withdrawals(
        &self,
        req: Request<pb::ListWithdrawalsRequest>,
    ) -> Result<Response<pb::ListWithdrawalsResponse>, Status> {
        let req = req.into_inner();
        let (limit, only_state) = list_filters(&req)?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&req.page_token)
            .map_err(|_| bad_page_token())?;
        let mut query = "WorkflowType = 'withdrawal'".to_owned();
        if only_state != pb::WithdrawalState::Unspecified {
            let name = only_state
                .as_str_name()
                .trim_start_matches("WITHDRAWAL_STATE_");
            query.push_str(&format!(" AND WithdrawalState = '{name}'"));
        }
        if !req.wallet.is_empty() {
            query.push_str(&format!(" AND WithdrawalWallet = '{}'", req.wallet));
        }
        let (ids, next) = self.search(query, limit as i32, token).await?;
        let found =
            futures::future::try_join_all(ids.iter().map(|workflow| self.status(workflow))).await?;
        Ok(Response::new(pb::ListWithdrawalsResponse {
            withdrawals: found
                .iter()
                .flatten()
                .filter(|w| !w.is_batch())
                .map(withdrawal)
                .collect(),
            next_page_token: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(next),
        }))
    }

    type WatchWithdrawalStream = ReceiverStream<Result<pb::Withdrawal, Status>>;

    async fn watch_withdrawal(
        &self,
        req: Request<pb::WatchWithdrawalRequest>,
    ) -> Result<Response<Self::WatchWithdrawalStream>, Status> {
        let id = req.into_inner().id;
        let workflow = self.withdrawal_of(id).await?;
        // The present first, then every change after it: the workflow keeps its recent
        // changes, so a state shorter than a poll (CONFIRMING between two quick blocks,
        // or a slow answer under load) is still streamed, in order.
        let now = self
            .changes(&workflow, u64::MAX)
            .await?
            .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            let mut next = now.first;
            let mut last: Option<Withdrawal> = None;
            let mut batch = now.withdrawals;
            loop {
                for w in batch.drain(..) {
                    next += 1;
                    if last.as_ref() == Some(&w) {
                        continue;
                    }
                    if tx.send(Ok(withdrawal(&w))).await.is_err() {
                        return;
                    }
                    last = Some(w);
                }
                if last.as_ref().is_some_and(|w| w.state.is_final()) {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                }
                match service.changes(&workflow, next).await {
                    Ok(Some(c)) => {
                        // Only the present is returned when `next` is past it: nothing new.
                        next = c.first;
                        batch = c.withdrawals;
                    }
                    Ok(None) => {}
                    // Temporal away for a moment: ask again on the next tick.
                    Err(e) => tracing::warn!(id, error = %e, "watching a withdrawal"),
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_withdrawal(
        &self,
        req: Request<pb::CancelWithdrawalRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let id = req.into_inner().id;
        let workflow = self.withdrawal_of(id).await?;
        let handle = self
            .client
            .get_workflow_handle::<WithdrawalWorkflow>(workflow.clone());
        let why = "cancelled over gRPC".to_owned();
        let mut answer = handle
            .execute_update(
                WithdrawalWorkflow::cancel,
                why.clone(),
                WorkflowExecuteUpdateOptions::default(),
            )
            .await;
        // A batch member: its batch decides.
        if let Err(WorkflowUpdateError::Failed(failure)) = &answer {
            if failure.message.starts_with(IN_A_BATCH) {
                answer = handle
                    .execute_update(
                        WithdrawalWorkflow::cancel_member,
                        why,
                        WorkflowExecuteUpdateOptions::default(),
                    )
                    .await;
            }
        }
        match answer {
            Ok(w) => {
                tracing::info!(id, "withdrawal cancelled");
                Ok(Response::new(withdrawal(&w)))
            }
            // The workflow's validator refused it, saying why (as the saga words it).
            Err(WorkflowUpdateError::Failed(failure)) => {
                Err(Status::failed_precondition(failure.message.clone()))
            }
            // A finished workflow takes no update: what it ended as decides.
            Err(WorkflowUpdateError::NotFound(_)) => {
                let w = self
                    .status(&workflow)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))?;
                Err(Status::failed_precondition(
                    w.apply(crate::saga::Outcome::Cancelled, now_ms())
                        .err()
                        .map_or_else(
                            || format!("withdrawal {id} has ended as {:?}", w.state),
                            |e| e.to_string(),
                        ),
                ))
            }
            Err(e) => Err(Status::unavailable(format!(
                "temporal: cancelling withdrawal {id}: {e}"
            ))),
        }
    }
}
