//! The gRPC service `orchestrator.v1.Withdrawals`: validates and records submissions, and
//! answers from each saga's own durable record (never a secondary index that could lag).

use std::sync::Arc;

use bitcoin::{Address, Amount, Network};
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::withdrawals_server::{Withdrawals, WithdrawalsServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::saga::{now_ms, FeeRate, Outcome, Priority, State, Withdrawal};
use crate::store::{SagaStore, SagaStoreError};

/// The service over one saga database.
pub struct WithdrawalService {
    store: Arc<SagaStore>,
    network: Network,
}

impl WithdrawalService {
    /// A service for withdrawals on `network`.
    pub fn new(store: Arc<SagaStore>, network: Network) -> Self {
        WithdrawalService { store, network }
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
}

/// Runs a store call off the async threads (RocksDB blocks, and syncs to disk).
pub async fn on_store<T: Send + 'static>(
    store: &Arc<SagaStore>,
    f: impl FnOnce(&SagaStore) -> Result<T, SagaStoreError> + Send + 'static,
) -> Result<T, Status> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Status::internal(format!("store task failed: {e}")))?
        .map_err(status)
}

/// A store error as the API answers it.
pub fn status(e: SagaStoreError) -> Status {
    match e {
        SagaStoreError::Conflict(_) => Status::already_exists(e.to_string()),
        SagaStoreError::Unknown(_) => Status::not_found(e.to_string()),
        SagaStoreError::Transition(_) => Status::failed_precondition(e.to_string()),
        SagaStoreError::CoinTaken { .. } | SagaStoreError::Stale(_) => {
            Status::aborted(e.to_string())
        }
        SagaStoreError::Rocks(_) | SagaStoreError::InUse(_) | SagaStoreError::Corrupt { .. } => {
            Status::internal(e.to_string())
        }
    }
}

/// Longest request id.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest wallet name (the indexer's limit).
pub const MAX_WALLET: usize = 64;
/// Longest destination (bech32 addresses are at most 90 characters).
pub const MAX_DESTINATION: usize = 100;

/// Checks a submission and turns it into the saga's request.
pub fn validate(
    req: pb::SubmitWithdrawalRequest,
    network: Network,
) -> Result<crate::saga::Request, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    if req.request_id.is_empty() || req.request_id.len() > MAX_REQUEST_ID {
        return bad(format!(
            "request_id must be 1 to {MAX_REQUEST_ID} bytes (it is {})",
            req.request_id.len()
        ));
    }
    if req.request_id.starts_with(crate::temporal::RESERVED_PREFIX) {
        return bad(format!(
            "request_id may not start with {:?} (the orchestrator's own sagas, such as sweeps)",
            crate::temporal::RESERVED_PREFIX
        ));
    }
    let wallet_ok = (1..=MAX_WALLET).contains(&req.wallet.len())
        && req
            .wallet
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !wallet_ok {
        return bad(format!(
            "wallet must be 1 to {MAX_WALLET} letters, digits, '-', '_' or '.' (as the indexer names wallets)"
        ));
    }
    if req.destination.len() > MAX_DESTINATION {
        return bad(format!(
            "destination is {} bytes long; an address is at most {MAX_DESTINATION}",
            req.destination.len()
        ));
    }
    let unchecked: Address<_> = match req.destination.parse() {
        Ok(a) => a,
        Err(e) => return bad(format!("destination {:?}: {e}", req.destination)),
    };
    let destination = match unchecked.require_network(network) {
        Ok(a) => a,
        Err(_) => {
            return bad(format!(
                "destination {} is not an address of {network}",
                req.destination
            ))
        }
    };
    let dust = destination.script_pubkey().minimal_non_dust();
    if req.amount_sat < dust.to_sat() {
        return bad(format!(
            "amount {} sat is below the dust limit of {} sat for this destination",
            req.amount_sat,
            dust.to_sat()
        ));
    }
    if req.amount_sat > Amount::MAX_MONEY.to_sat() {
        return bad(format!(
            "amount {} sat is more than all bitcoin",
            req.amount_sat
        ));
    }
    let fee_rate = match req.fee_rate {
        Some(pb::submit_withdrawal_request::FeeRate::TargetBlocks(t))
            if (1..=1008).contains(&t) =>
        {
            FeeRate::TargetBlocks(t as u16)
        }
        Some(pb::submit_withdrawal_request::FeeRate::SatPerVb(r))
            if r.is_finite() && (1.0..=10_000.0).contains(&r) =>
        {
            FeeRate::SatPerVb(r)
        }
        Some(pb::submit_withdrawal_request::FeeRate::Priority(p)) => {
            match pb::Priority::try_from(p) {
                Ok(pb::Priority::Low) => FeeRate::Priority(Priority::Low),
                Ok(pb::Priority::Normal) => FeeRate::Priority(Priority::Normal),
                Ok(pb::Priority::High) => FeeRate::Priority(Priority::High),
                _ => {
                    return bad(format!(
                        "priority {p} is not PRIORITY_LOW, PRIORITY_NORMAL or PRIORITY_HIGH"
                    ))
                }
            }
        }
        Some(_) => return bad("target_blocks must be 1..=1008 and sat_per_vb 1..=10000".into()),
        None => return bad("a fee rate is required: target_blocks, sat_per_vb or priority".into()),
    };
    if req.max_fee_sat == 0 {
        return bad("max_fee_sat is required and must be above zero".into());
    }
    Ok(crate::saga::Request {
        request_id: req.request_id,
        wallet: req.wallet,
        destination: req.destination,
        amount: Amount::from_sat(req.amount_sat),
        fee_rate,
        max_fee: Amount::from_sat(req.max_fee_sat),
    })
}

/// A ListWithdrawals request's page size and state filter, its wallet filter checked.
pub fn list_filters(
    req: &pb::ListWithdrawalsRequest,
) -> Result<(usize, pb::WithdrawalState), Status> {
    let limit = match req.limit {
        0 => 100,
        n if n <= 1_000 => n as usize,
        n => return Err(Status::invalid_argument(format!("limit {n} is above 1000"))),
    };
    let only_state = pb::WithdrawalState::try_from(req.state)
        .map_err(|_| Status::invalid_argument(format!("unknown state {}", req.state)))?;
    let wallet_ok = req.wallet.len() <= MAX_WALLET
        && req
            .wallet
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !wallet_ok {
        return Err(Status::invalid_argument(format!(
            "wallet must be at most {MAX_WALLET} letters, digits, '-', '_' or '.' (it is {} bytes)",
            req.wallet.len()
        )));
    }
    Ok((limit, only_state))
}

/// Refuses a request id looked up that no submission could have used.
pub fn check_request_id_length(request_id: &str) -> Result<(), Status> {
    if request_id.len() > MAX_REQUEST_ID {
        return Err(Status::invalid_argument(format!(
            "request_id is {} bytes long; at most {MAX_REQUEST_ID}",
            request_id.len()
        )));
    }
    Ok(())
}

/// The answer to a page token that is not one the service gave.
pub fn bad_page_token() -> Status {
    Status::invalid_argument("bad page_token: give back a next_page_token as it came")
}

/// A saga's state as the API names it.
pub fn state(s: State) -> pb::WithdrawalState {
    match s {
        State::Received => pb::WithdrawalState::Received,
        State::Reserved => pb::WithdrawalState::Reserved,
        State::AwaitingSignatures => pb::WithdrawalState::AwaitingSignatures,
        State::Signed => pb::WithdrawalState::Signed,
        State::Broadcast => pb::WithdrawalState::Broadcast,
        State::Confirming => pb::WithdrawalState::Confirming,
        State::Completed => pb::WithdrawalState::Completed,
        State::Failed => pb::WithdrawalState::Failed,
        State::Cancelled => pb::WithdrawalState::Cancelled,
        State::NeedsReview => pb::WithdrawalState::NeedsReview,
    }
}

/// A withdrawal as the API shows it.
pub fn withdrawal(w: &Withdrawal) -> pb::Withdrawal {
    let current = w.current();
    pb::Withdrawal {
        id: w.id,
        request_id: w.request.request_id.clone(),
        state: state(w.state).into(),
        wallet: w.request.wallet.clone(),
        destination: w.request.destination.clone(),
        amount_sat: w.request.amount.to_sat(),
        txid: current.map(|a| a.txid.to_string()).unwrap_or_default(),
        txids: w.attempts.iter().map(|a| a.txid.to_string()).collect(),
        fee_sat: current.map_or(0, |a| a.fee.to_sat()),
        feerate_sat_vb: current.map_or(0.0, |a| a.fee_rate),
        confirmations: w.confirmations,
        confirmed_txid: w.confirmed.map(|t| t.to_string()).unwrap_or_default(),
        failure_reason: w.failure_reason.clone().unwrap_or_default(),
        max_fee_sat: w.request.max_fee.to_sat(),
        created_at_ms: w.created_ms,
        updated_at_ms: w.updated_ms,
        fee_choice: current.map(|a| a.fee_choice.clone()).unwrap_or_default(),
        batch_id: w.batch.unwrap_or(0),
    }
}

impl WithdrawalService {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SagaStore) -> Result<T, SagaStoreError> + Send + 'static,
    ) -> Result<T, Status> {
        on_store(&self.store, f).await
    }

    async fn find(&self, id: u64) -> Result<Withdrawal, Status> {
        self.blocking(move |s| s.get(id))
            .await?
            .ok_or_else(|| Status::not_found(format!("no withdrawal {id}")))
    }
}

#[tonic::async_trait]
impl Withdrawals for WithdrawalService {
    async fn submit_withdrawal(
        &self,
        req: Request<pb::SubmitWithdrawalRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let request = validate(req.into_inner(), self.network)?;
        let submitted = self.blocking(move |s| s.submit(request, now_ms())).await?;
        if submitted.created {
            tracing::info!(id = submitted.withdrawal.id, request_id = %submitted.withdrawal.request.request_id, "withdrawal received");
        }
        Ok(Response::new(withdrawal(&submitted.withdrawal)))
    }

    async fn get_withdrawal(
        &self,
        req: Request<pb::GetWithdrawalRequest>,
    ) -> Result<Response<pb::Withdrawal>, Status> {
        let found = match req.into_inner().key {
            Some(pb::get_withdrawal_request::Key::Id(id)) => self.find(id).await?,
            Some(pb::get_withdrawal_request::Key::RequestId(r)) => {
                check_request_id_length(&r)?;
                let shown = r.clone();
                self.blocking(move |s| s.by_request(&r))
                    .await?
                    .ok_or_else(|| {
                        Status::not_found(format!("no withdrawal for request_id {shown:?}"))
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
        let mut after = match req.page_token.as_str() {
            "" => 0,
            t => t.parse::<u64>().map_err(|_| bad_page_token())?,
        };
        let mut out = Vec::new();
        // Filtered pages are filled from as many stored pages as it takes.
        loop {
            let page = self.blocking(move |s| s.list(after, 1_000)).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = last.id;
            for w in page {
                let state_ok =
                    only_state == pb::WithdrawalState::Unspecified || state(w.state) == only_state;
                let wallet_ok = req.wallet.is_empty() || w.request.wallet == req.wallet;
                if state_ok && wallet_ok {
                    out.push(withdrawal(&w));
                    if out.len() == limit {
                        let token = w.id.to_string();
                        return Ok(Response::new(pb::ListWithdrawalsResponse {
                            withdrawals: out,
                            next_page_token: token,
                        }));
                    }
                }
            }
        }
        Ok(Response::new(pb::ListWithdrawalsResponse {
            withdrawals: out,
            next_page_token: String::new(),
        }))
    }

    type WatchWithdrawalStream = ReceiverStream<Result<pb::Withdrawal, Status>>;

    async fn watch_withdrawal(
        &self,
        req: Request<pb::WatchWithdrawalRequest>,
    ) -> Result<Response<Self::WatchWithdrawalStream>, Status> {
        let id = req.into_inner().id;
        // Subscribe first, then read: no change falls between the two.
        let mut updates = self.store.updates();
        let now = self.find(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut last = now;
            if tx.send(Ok(withdrawal(&last))).await.is_err() {
                return;
            }
            while !last.state.is_final() {
                match updates.recv().await {
                    Ok(w) if w.id == id && w != last => {
                        last = w;
                        if tx.send(Ok(withdrawal(&last))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Missed some: the durable record says where it is now.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let current = match store.get(id) {
                            Ok(Some(w)) => w,
                            _ => return,
                        };
                        if current != last {
                            last = current;
                            if tx.send(Ok(withdrawal(&last))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
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
        // The executor may move it concurrently: retry on a stale read.
        for _ in 0..10 {
            let current = self.find(id).await?;
            let result = self
                .blocking(
                    move |s| match s.record(&current, Outcome::Cancelled, now_ms()) {
                        Err(SagaStoreError::Stale(_)) => Ok(None),
                        other => other.map(Some),
                    },
                )
                .await?;
            if let Some(w) = result {
                tracing::info!(id, "withdrawal cancelled");
                return Ok(Response::new(withdrawal(&w)));
            }
        }
        Err(Status::aborted(format!(
            "withdrawal {id} kept changing; try again"
        )))
    }
}
