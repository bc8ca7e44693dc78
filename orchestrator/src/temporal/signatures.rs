//! `orchestrator.v1.Signatures` on the Temporal engine: the same API and answers as the
//! embedded engine's (`crate::grpc_signatures`), from workflows. The versions waiting are
//! found through the `WithdrawalAwaitsSignatures` search attribute (the search index may
//! lag a version that began waiting a moment ago) and read from each workflow; a signer's
//! PSBT is the workflow's `signatures` update, whose validator checks every signature
//! before anything is recorded and which answers once the hot keys signed last.

use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::signatures_server::{Signatures, SignaturesServer};
use temporalio_client::errors::WorkflowUpdateError;
use temporalio_client::WorkflowExecuteUpdateOptions;
use tonic::{Request, Response, Status};

use super::service::TemporalWithdrawals;
use super::withdrawal::{WithdrawalWorkflow, COMPLETION_PENDING};
use super::WITHDRAWAL_AWAITS_SIGNATURES;
use crate::grpc::withdrawal;
use crate::grpc_signatures::{pending_signature, submitted};

/// Workflows read for one page of the search.
const PAGE: i32 = 100;

/// The service over the withdrawals' workflows.
#[derive(Clone)]
pub struct TemporalSignatures {
    withdrawals: TemporalWithdrawals,
}

impl TemporalSignatures {
    /// The service reading and updating the workflows `withdrawals` serves.
    pub fn new(withdrawals: TemporalWithdrawals) -> Self {
        TemporalSignatures { withdrawals }
    }

    /// The tonic server for it, every call checked against `token`.
    pub fn into_server(
        self,
        token: service::auth::BearerToken,
    ) -> tonic::service::interceptor::InterceptedService<
        SignaturesServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        SignaturesServer::with_interceptor(self, move |req| token.check(req))
    }
}

#[tonic::async_trait]
impl Signatures for TemporalSignatures {
    async fn list_pending_signatures(
        &self,
        _req: Request<pb::ListPendingSignaturesRequest>,
    ) -> Result<Response<pb::ListPendingSignaturesResponse>, Status> {
        let query = format!(
            "WorkflowType = 'withdrawal' AND ExecutionStatus = 'Running' AND {} = true",
            WITHDRAWAL_AWAITS_SIGNATURES.name()
        );
        let mut pending = Vec::new();
        let mut token = Vec::new();
        loop {
            let (ids, next) = self.withdrawals.search(query.clone(), PAGE, token).await?;
            for id in ids {
                // The index may be behind the workflow: what it holds now decides. One that
                // cannot be read now is left out (logged), not the whole list refused.
                let w = match self.withdrawals.status(&id).await {
                    Ok(Some(w)) => w,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(workflow = %id, error = %e, "a withdrawal waiting for signatures could not be read: not listed this time");
                        continue;
                    }
                };
                pending.extend(pending_signature(w));
            }
            if next.is_empty() {
                break;
            }
            token = next;
        }
        pending.sort_by_key(|p| p.withdrawal_id);
        Ok(Response::new(pb::ListPendingSignaturesResponse { pending }))
    }

    async fn submit_signature(
        &self,
        req: Request<pb::SubmitSignatureRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let (id, submitted) = submitted(req.into_inner())?;
        let workflow = self.withdrawals.workflow_of(id).await?;
        let handle = self
            .withdrawals
            .client()
            .get_workflow_handle::<WithdrawalWorkflow>(workflow.clone());
        let no_pending = |w: &crate::saga::Withdrawal| {
            Status::failed_precondition(crate::grpc_signatures::nothing_to_sign(w))
        };
        match handle
            .execute_update(
                WithdrawalWorkflow::signatures,
                submitted,
                WorkflowExecuteUpdateOptions::default(),
            )
            .await
        {
            Ok(w) => {
                tracing::info!(id, state = ?w.state, "external signatures taken");
                Ok(Response::new(withdrawal(&w)))
            }
            // Refused by the validator (nothing recorded) or not finished: the workflow
            // says which; a withdrawal with nothing pending is the caller's precondition.
            Err(WorkflowUpdateError::Failed(failure))
                if failure.message.starts_with(COMPLETION_PENDING) =>
            {
                Err(Status::unavailable(failure.message.clone()))
            }
            Err(WorkflowUpdateError::Failed(failure)) => {
                match self.withdrawals.status(&workflow).await? {
                    Some(w) if w.pending.is_none() => Err(no_pending(&w)),
                    Some(_) => Err(Status::invalid_argument(failure.message.clone())),
                    None => Err(Status::not_found(format!("no withdrawal {id}"))),
                }
            }
            // A finished workflow waits for nothing.
            Err(WorkflowUpdateError::NotFound(_)) => {
                let w = self
                    .withdrawals
                    .status(&workflow)
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))?;
                Err(no_pending(&w))
            }
            Err(e) => Err(Status::unavailable(format!(
                "temporal: signatures for withdrawal {id}: {e}"
            ))),
        }
    }
}
