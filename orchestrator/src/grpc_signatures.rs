//! The gRPC service `orchestrator.v1.Signatures`: external signers list the versions that
//! wait for them (as PSBTs) and send their signatures back; once there are enough, the hot
//! keys sign last and the version is recorded as signed, to be sent by the executor.

use std::sync::Arc;

use base64::Engine as _;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::signatures_server::{Signatures, SignaturesServer};
use tonic::{Request, Response, Status};

use crate::cosign;
use crate::grpc::{on_store, withdrawal};
use crate::payment::Payments;
use crate::saga::{now_ms, Outcome, Pending};
use crate::store::{SagaStore, SagaStoreError};

/// The service over one saga database and the means of signing.
pub struct SignatureService {
    store: Arc<SagaStore>,
    payments: Payments,
}

impl SignatureService {
    /// A service completing versions with `payments`' hot keys.
    pub fn new(store: Arc<SagaStore>, payments: Payments) -> Self {
        SignatureService { store, payments }
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

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SagaStore) -> Result<T, SagaStoreError> + Send + 'static,
    ) -> Result<T, Status> {
        on_store(&self.store, f).await
    }
}

/// Why withdrawal `w` takes no signature: no version of it waits (a batch member's points
/// at its batch, whose PSBT the signers sign).
pub fn nothing_to_sign(w: &crate::saga::Withdrawal) -> String {
    let batch = w.batch.map_or_else(String::new, |b| {
        format!(" (it is paid by batch {b}: sign the batch's PSBT, withdrawal_id {b})")
    });
    format!(
        "withdrawal {} is {:?}: no version of it waits for signatures{batch}",
        w.id, w.state
    )
}

/// What a signer is shown of `w`'s version waiting for signatures, if one waits.
pub fn pending_signature(w: crate::saga::Withdrawal) -> Option<pb::PendingSignature> {
    let p = w.pending?;
    Some(pb::PendingSignature {
        withdrawal_id: w.id,
        request_id: w.request.request_id,
        psbt_base64: base64::engine::general_purpose::STANDARD.encode(&p.psbt),
        txid: p.txid.to_string(),
        fee_sat: p.fee.to_sat(),
        feerate_sat_vb: p.fee_rate,
        replacing: p.replacing,
    })
}

/// The withdrawal id and the PSBT's bytes of a SubmitSignature request.
pub fn submitted(req: pb::SubmitSignatureRequest) -> Result<(u64, Vec<u8>), Status> {
    let psbt = base64::engine::general_purpose::STANDARD
        .decode(req.psbt_base64.trim())
        .map_err(|e| Status::invalid_argument(format!("psbt_base64 is not base64: {e}")))?;
    Ok((req.withdrawal_id, psbt))
}

#[tonic::async_trait]
impl Signatures for SignatureService {
    async fn list_pending_signatures(
        &self,
        _req: Request<pb::ListPendingSignaturesRequest>,
    ) -> Result<Response<pb::ListPendingSignaturesResponse>, Status> {
        // Batches wait for signatures as one transaction: listed under the batch's id.
        let unfinished = self
            .blocking(|s| Ok([s.unfinished()?, s.unfinished_batches()?].concat()))
            .await?;
        let pending = unfinished
            .into_iter()
            .filter_map(pending_signature)
            .collect();
        Ok(Response::new(pb::ListPendingSignaturesResponse { pending }))
    }

    async fn submit_signature(
        &self,
        req: Request<pb::SubmitSignatureRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let (id, submitted) = submitted(req.into_inner())?;
        // The executor may move it concurrently (a confirmation): retry on a stale read.
        for _ in 0..10 {
            let w = self
                .blocking(move |s| Ok(s.get(id)?.or(s.batch(id)?)))
                .await?
                .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))?;
            let Some(pending) = w.pending.clone() else {
                return Err(Status::failed_precondition(nothing_to_sign(&w)));
            };
            let (psbt, added) = cosign::add_signatures(&pending.psbt, &submitted)
                .map_err(|e| Status::invalid_argument(format!("withdrawal {id}: {e}")))?;
            let gathered = Pending { psbt, ..pending };
            let outcome = match self.payments.of(&w).complete(&gathered).map_err(|e| {
                Status::unavailable(format!("signing withdrawal {id} with the hot keys: {e}"))
            })? {
                Some(attempt) if gathered.replacing => Outcome::Replaced(attempt),
                Some(attempt) => Outcome::Signed(attempt),
                None => Outcome::SignaturesAdded(gathered.psbt),
            };
            let complete = !matches!(outcome, Outcome::SignaturesAdded(_));
            let recorded = self
                .blocking(move |s| match s.record(&w, outcome, now_ms()) {
                    Err(SagaStoreError::Stale(_)) => Ok(None),
                    other => other.map(Some),
                })
                .await?;
            if let Some(after) = recorded {
                tracing::info!(id, added, complete, "external signatures taken");
                return Ok(Response::new(withdrawal(&after)));
            }
        }
        Err(Status::aborted(format!(
            "withdrawal {id} kept changing; try again"
        )))
    }
}
