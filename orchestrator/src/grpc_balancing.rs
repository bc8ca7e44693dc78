//! The gRPC service `orchestrator.v1.Balancing`: the balancing policy and the wallets'
//! balances as it sees them, the runs it started, and a stream of their changes (the
//! event a top-up waiting for the cold wallet's signers is surfaced by).

use std::sync::Arc;

use base64::Engine as _;
use bitcoin::Amount;
use proto::orchestrator::v1 as pb;
use proto::orchestrator::v1::balancing_server::{Balancing, BalancingServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::balancing::{self, Kind};
use crate::grpc::{on_store, withdrawal};
use crate::indexer_client::Indexer;
use crate::payment::{Payments, StepError};
use crate::saga::Withdrawal;
use crate::store::SagaStore;

/// Most runs one ListBalancingRuns returns.
const MAX_RUNS: usize = 1000;

/// The service over one saga database, the indexer and the means of paying.
pub struct BalancingService {
    store: Arc<SagaStore>,
    indexer: Indexer,
    payments: Payments,
}

fn kind_of(k: Kind) -> pb::BalancingKind {
    match k {
        Kind::Sweep => pb::BalancingKind::Sweep,
        Kind::TopUp => pb::BalancingKind::TopUp,
        Kind::Consolidation => pb::BalancingKind::Consolidation,
    }
}

/// `w` as a run, when it is one.
fn run(w: &Withdrawal) -> Option<pb::BalancingRun> {
    let kind = balancing::kind(w)?;
    Some(pb::BalancingRun {
        kind: kind_of(kind).into(),
        run: Some(withdrawal(w)),
        psbt_base64: w.pending.as_ref().map_or_else(String::new, |p| {
            base64::engine::general_purpose::STANDARD.encode(&p.psbt)
        }),
    })
}

fn unavailable(e: StepError) -> Status {
    match e {
        StepError::Indexer(status) => status,
        other => Status::unavailable(other.to_string()),
    }
}

impl BalancingService {
    /// A service reading balances through `indexer` with `payments`' wallets.
    pub fn new(store: Arc<SagaStore>, indexer: Indexer, payments: Payments) -> Self {
        BalancingService {
            store,
            indexer,
            payments,
        }
    }

    /// The tonic server for it, every call checked against `token`.
    pub fn into_server(
        self,
        token: service::auth::BearerToken,
    ) -> tonic::service::interceptor::InterceptedService<
        BalancingServer<Self>,
        impl tonic::service::Interceptor + Clone,
    > {
        BalancingServer::with_interceptor(self, move |req| token.check(req))
    }

    /// Wallet `name`'s spendable coins that no withdrawal holds.
    async fn spendable(
        &self,
        name: &str,
        reserved: &std::collections::HashSet<bitcoin::OutPoint>,
    ) -> Result<Vec<crate::select::Candidate>, Status> {
        let mut indexer = self.indexer.clone();
        Ok(self
            .payments
            .for_wallet(name)
            .spendable(&mut indexer, name)
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter(|c| !reserved.contains(&c.outpoint))
            .collect())
    }
}

#[tonic::async_trait]
impl Balancing for BalancingService {
    async fn get_balancing(
        &self,
        _req: Request<pb::GetBalancingRequest>,
    ) -> Result<Response<pb::BalancingStatus>, Status> {
        let Some(policy) = self.payments.policy().balancing.clone() else {
            return Err(Status::failed_precondition(
                "no balancing is configured (sweep_above_sat, top_up_below_sat, consolidate_below_sat_vb)",
            ));
        };
        let (reserved, unfinished) =
            on_store(&self.store, |s| Ok((s.reserved()?, s.unfinished()?))).await?;
        let hot = self.spendable(&policy.hot_wallet, &reserved).await?;
        let (cold_wallet, cold_spendable) = match policy.cold {
            Some(_) => {
                let cold = self.spendable(&policy.cold_wallet, &reserved).await?;
                let total: Amount = cold.iter().map(|c| c.value).sum();
                (policy.cold_wallet.clone(), total.to_sat())
            }
            None => (String::new(), 0),
        };
        let sat = |a: Option<Amount>| a.map_or(0, Amount::to_sat);
        let small = policy.consolidate.map_or(0, |c| {
            hot.iter().filter(|coin| coin.value < c.coins_below).count() as u32
        });
        Ok(Response::new(pb::BalancingStatus {
            hot_wallet: policy.hot_wallet.clone(),
            hot_spendable_sat: hot.iter().map(|c| c.value).sum::<Amount>().to_sat(),
            cold_wallet,
            cold_spendable_sat: cold_spendable,
            sweep_above_sat: sat(policy.sweep.map(|s| s.above)),
            sweep_keep_sat: sat(policy.sweep.map(|s| s.keep)),
            top_up_below_sat: sat(policy.top_up.map(|t| t.below)),
            top_up_to_sat: sat(policy.top_up.map(|t| t.to)),
            consolidate_below_sat_vb: policy.consolidate.map_or(0.0, |c| c.max_rate),
            consolidate_coins_below_sat: sat(policy.consolidate.map(|c| c.coins_below)),
            small_coins: small,
            unfinished: unfinished.iter().filter_map(run).collect(),
        }))
    }

    async fn list_balancing_runs(
        &self,
        req: Request<pb::ListBalancingRunsRequest>,
    ) -> Result<Response<pb::ListBalancingRunsResponse>, Status> {
        let req = req.into_inner();
        let kinds: Vec<Kind> = match pb::BalancingKind::try_from(req.kind) {
            Ok(pb::BalancingKind::Unspecified) => Kind::ALL.to_vec(),
            Ok(k) => Kind::ALL.into_iter().filter(|x| kind_of(*x) == k).collect(),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "kind {} is not a BalancingKind",
                    req.kind
                )))
            }
        };
        let limit = match req.limit as usize {
            0 => MAX_RUNS,
            n => n.min(MAX_RUNS),
        };
        let mut runs = on_store(&self.store, all_runs).await?;
        runs.retain(|w| balancing::kind(w).is_some_and(|k| kinds.contains(&k)));
        // Ids grow with submission: newest first.
        runs.sort_by_key(|w| std::cmp::Reverse(w.id));
        runs.truncate(limit);
        Ok(Response::new(pb::ListBalancingRunsResponse {
            runs: runs.iter().filter_map(run).collect(),
        }))
    }

    type WatchBalancingRunsStream = ReceiverStream<Result<pb::BalancingRun, Status>>;

    async fn watch_balancing_runs(
        &self,
        _req: Request<pb::WatchBalancingRunsRequest>,
    ) -> Result<Response<Self::WatchBalancingRunsStream>, Status> {
        // Subscribe first, then read: no change falls between the two.
        let mut updates = self.store.updates();
        let unfinished = on_store(&self.store, |s| s.unfinished()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let store = self.store.clone();
        tokio::spawn(async move {
            // When each run's newest state sent changed: a change read before the snapshot
            // but received after it is not sent over a newer one (one of the same
            // millisecond is: a repeat is harmless, a loss is not).
            let mut sent: std::collections::HashMap<u64, u64> = Default::default();
            let mut send = |w: &Withdrawal| {
                let newer = sent.get(&w.id).is_none_or(|at| w.updated_ms >= *at);
                let r = run(w).filter(|_| newer)?;
                sent.insert(w.id, w.updated_ms);
                Some(r)
            };
            for r in unfinished.iter().filter_map(&mut send) {
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            loop {
                let changed = match updates.recv().await {
                    Ok(w) => vec![w],
                    // Missed some: every run as its durable record says it is now.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        match on_store(&store, all_runs).await {
                            Ok(all) => all,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                for r in changed.iter().filter_map(&mut send) {
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Every balancing run the store holds.
fn all_runs(s: &SagaStore) -> Result<Vec<Withdrawal>, crate::store::SagaStoreError> {
    let mut all = Vec::new();
    for k in Kind::ALL {
        all.extend(s.by_request_prefix(k.prefix())?);
    }
    Ok(all)
}
