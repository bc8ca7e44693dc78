//! The gRPC server of `indexer.v1.Indexer`: thin handlers that run a [`Query`] on the
//! blocking pool (RocksDB reads block), plus gRPC health checking and server reflection.

use std::future::Future;
use std::sync::Arc;

use bitcoin::Network;
use proto::indexer::v1 as pb;
use proto::indexer::v1::indexer_server::{Indexer, IndexerServer};
use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status};

use crate::add_watch::{self, AddWatchError, WatchChanges, WatchRequest};
use crate::convert;
use crate::event_feed::{EventFeed, EventStream};
use crate::mempool::{Gone, SharedMempool};
use crate::metrics::IndexerMetrics;
use crate::query::{Query, QueryError};
use crate::store::Store;
use crate::wallets::{self, WalletError};
use service::auth::BearerToken;

/// The query service over one database.
pub struct IndexerService {
    store: Arc<Store>,
    network: Network,
    /// Turns true when the server stops, so open subscriptions end and shutdown completes.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Watched mempool transactions, when following bitcoind.
    mempool: Option<SharedMempool>,
    /// Where `AddWatch` goes.
    watch: WatchChanges,
    /// The event log's shared tail, started by the first subscription.
    events: std::sync::OnceLock<Arc<EventFeed>>,
    /// Permits for `AddWatch` calls being expanded or applied (each may hold a million
    /// scripts in memory).
    adding: Arc<tokio::sync::Semaphore>,
    metrics: IndexerMetrics,
}

impl IndexerService {
    /// A service answering from `store`; its subscriptions end when `stopping` turns true.
    pub fn new(
        store: Arc<Store>,
        network: Network,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        IndexerService {
            store,
            network,
            stopping,
            mempool: None,
            watch: WatchChanges::Refused,
            events: std::sync::OnceLock::new(),
            adding: Arc::new(tokio::sync::Semaphore::new(convert::MAX_ADDS_AT_ONCE)),
            metrics: IndexerMetrics::default(),
        }
    }

    /// Counts its subscribers into `metrics`.
    pub fn with_metrics(mut self, metrics: IndexerMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Accepts `AddWatch` and sends it to `watch`.
    pub fn with_watch(mut self, watch: WatchChanges) -> Self {
        self.watch = watch;
        self
    }

    /// Also answers from the follower's mempool tracker (unconfirmed balances and transfers).
    pub fn with_mempool(mut self, mempool: Option<SharedMempool>) -> Self {
        self.mempool = mempool;
        self
    }

    /// Runs `f` on a fresh snapshot, off the async threads.
    async fn query<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Query<'_>) -> Result<T, QueryError> + Send + 'static,
    ) -> Result<T, Status> {
        let (store, network) = (self.store.clone(), self.network);
        tokio::task::spawn_blocking(move || f(&Query::new(&store, network)?))
            .await
            .map_err(|e| Status::internal(format!("query task failed: {e}")))?
            .map_err(Status::from)
    }
}

impl IndexerService {
    /// Runs `f` on a fresh snapshot right here: for answers of a few point reads (a
    /// stored aggregate), which take less time than a hop to the blocking pool.
    fn quick<T>(&self, f: impl FnOnce(&Query<'_>) -> Result<T, QueryError>) -> Result<T, Status> {
        f(&Query::new(&self.store, self.network)?).map_err(Status::from)
    }

    /// `txid` as the mempool tracker knows it: waiting, replaced or evicted.
    /// `txid` as the mempool tracker knows it: pending, or gone (replaced or evicted).
    async fn mempool_transfer(
        &self,
        txid: &str,
    ) -> Result<(Option<pb::Transfer>, Option<pb::Transfer>), Status> {
        let Some(mempool) = self.mempool.clone() else {
            return Ok((None, None));
        };
        let Ok(parsed) = txid.parse::<bitcoin::Txid>() else {
            return Ok((None, None)); // the store query already refused a malformed txid
        };
        let (pending, gone) = {
            let m = mempool.read().expect("mempool lock is never poisoned");
            (m.get(&parsed).cloned(), m.gone(&parsed))
        };
        if let Some(tx) = pending {
            let entry = self.query(move |q| q.pending_transfer(&tx)).await?;
            let mut t = convert::transfer(entry);
            t.status = pb::TransferStatus::Mempool.into();
            t.block_hash = String::new();
            return Ok((Some(t), None));
        }
        Ok((
            None,
            gone.map(|g| {
                let (status, by) = match g {
                    Gone::Replaced { by } => (pb::TransferStatus::Replaced, by.to_string()),
                    Gone::Evicted => (pb::TransferStatus::Evicted, String::new()),
                };
                pb::Transfer {
                    txid: txid.to_owned(),
                    status: status.into(),
                    replaced_by: by,
                    ..Default::default()
                }
            }),
        ))
    }
}

#[tonic::async_trait]
impl Indexer for IndexerService {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        let from = req.from_offset;
        convert::bounded("log_id", &req.log_id, convert::MAX_ID)?;
        if !req.log_id.is_empty() {
            let ours = self.quick(|q| q.log_id())?;
            if req.log_id != ours {
                return Err(Status::failed_precondition(format!(
                    "offset {from} belongs to event log {}, and this index's log is {ours} (the \
                     index was rebuilt): read the present state and subscribe from GetTip's \
                     next_offset",
                    req.log_id
                )));
            }
        }
        let feed = self.events.get_or_init(|| {
            EventFeed::start(self.store.clone(), self.network, self.stopping.clone())
        });
        // Counted for as long as the stream lives.
        let open = self.metrics.subscribed();
        Ok(Response::new(feed.subscribe(from, open).await?))
    }

    async fn add_watch(
        &self,
        req: Request<pb::AddWatchRequest>,
    ) -> Result<Response<pb::AddWatchResponse>, Status> {
        let req = req.into_inner();
        convert::bounded("wallet", &req.wallet, convert::MAX_WALLET)?;
        if req.descriptors.len() > convert::MAX_DESCRIPTORS {
            return Err(Status::invalid_argument(format!(
                "{} descriptors in one call; at most {} (send larger sets in several calls)",
                req.descriptors.len(),
                convert::MAX_DESCRIPTORS
            )));
        }
        for d in &req.descriptors {
            convert::bounded("a descriptor", d, convert::MAX_DESCRIPTOR)?;
        }
        // Held until the answer: at most a few calls' scripts are in memory at once.
        let _permit = self
            .adding
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the indexer is shutting down"))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = |gap_limit: u32, expanded| WatchRequest {
            wallet: req.wallet.clone(),
            descriptors: req.descriptors.clone(),
            birth_height: req.birth_height,
            gap_limit,
            expanded,
            reply,
        };
        match &self.watch {
            WatchChanges::Refused => {
                return Err(Status::permission_denied(
                    "AddWatch changes what is watched: configure grpc_token_file on the server \
                     and present its token",
                ))
            }
            WatchChanges::Direct { gap_limit } => {
                let (store, network) = (self.store.clone(), self.network);
                let request = request(*gap_limit, None);
                tokio::task::spawn_blocking(move || {
                    add_watch::apply(&store, network, request, None)
                })
                .await
                .map_err(|e| Status::internal(format!("AddWatch task failed: {e}")))?;
            }
            WatchChanges::Follower {
                requests,
                gap_limit,
                ..
            } => {
                // Expanded here, on a blocking thread beside the follower: it then pauses
                // between two blocks only for the database's part. A bad descriptor, or
                // too many scripts, is refused at once.
                let (wallet, descriptors) = (req.wallet.clone(), req.descriptors.clone());
                let (network, gap) = (self.network, *gap_limit);
                let expanded = tokio::task::spawn_blocking(move || {
                    wallets::check_request(&wallet, &descriptors)?;
                    wallets::expand_bounded(
                        &descriptors,
                        network,
                        gap,
                        convert::MAX_SCRIPTS_PER_CALL,
                    )
                })
                .await
                .map_err(|e| Status::internal(format!("AddWatch task failed: {e}")))?
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
                requests
                    .try_send(request(*gap_limit, Some(expanded)))
                    .map_err(|e| match e {
                        crossbeam_channel::TrySendError::Full(_) => Status::resource_exhausted(
                            "too many AddWatch requests waiting: retry shortly",
                        ),
                        crossbeam_channel::TrySendError::Disconnected(_) => {
                            Status::unavailable("the indexer is shutting down")
                        }
                    })?;
            }
        }
        let accepted = answer
            .await
            .map_err(|_| Status::unavailable("the indexer is shutting down"))?
            .map_err(|e| match e {
                // A call of many new scripts commits in steps (see `wallets::add_lines`).
                AddWatchError::Wallet(WalletError::Store(e)) => Status::internal(format!(
                    "{e}; the call may have been applied in part: send it again to complete it"
                )),
                AddWatchError::Wallet(e) => Status::invalid_argument(e.to_string()),
                AddWatchError::History { .. } | AddWatchError::Backfilling { .. } => {
                    Status::failed_precondition(e.to_string())
                }
            })?;
        let height = self.quick(|q| Ok(q.tip()))?.map_or(0, |(h, _)| h);
        Ok(Response::new(pb::AddWatchResponse {
            wallet: req.wallet,
            new_scripts: accepted.new_scripts as u32,
            known_scripts: accepted.known_scripts as u32,
            height,
            backfill_id: accepted.backfill.unwrap_or(0),
        }))
    }

    async fn list_backfills(
        &self,
        _: Request<pb::ListBackfillsRequest>,
    ) -> Result<Response<pb::ListBackfillsResponse>, Status> {
        let backfills = match &self.watch {
            WatchChanges::Follower { backfills, .. } => backfills
                .lock()
                .expect("registry lock is never poisoned")
                .values()
                .map(convert::backfill)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Response::new(pb::ListBackfillsResponse { backfills }))
    }

    async fn get_tip(
        &self,
        _: Request<pb::GetTipRequest>,
    ) -> Result<Response<pb::GetTipResponse>, Status> {
        let (tip, next_offset, log_id) =
            self.quick(|q| Ok((q.tip(), q.next_offset()?, q.log_id()?)))?;
        let (height, hash) = tip.ok_or_else(|| {
            Status::failed_precondition("the index is empty: run `indexer rescan`")
        })?;
        Ok(Response::new(pb::GetTipResponse {
            height,
            hash: hash.to_string(),
            next_offset,
            log_id,
        }))
    }

    async fn get_balance(
        &self,
        req: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let req = req.into_inner();
        let target = convert::target(req.target)?;
        let mempool = self.mempool.as_ref();
        // One snapshot for both: a transaction the snapshot has confirmed is not also
        // counted from the mempool.
        let answer = move |q: &Query<'_>| {
            let b = q.balance(&target, req.min_conf)?;
            let unconfirmed = match mempool {
                Some(m) => {
                    let (wallet, script) = q.target_ids(&target)?;
                    let m = m.read().expect("mempool lock is never poisoned");
                    let mut indexed = std::collections::HashSet::new();
                    for txid in m.txids() {
                        if q.has_transfer(&txid)? {
                            indexed.insert(txid);
                        }
                    }
                    m.unconfirmed(wallet, script.as_ref(), |t| indexed.contains(t))
                }
                None => 0,
            };
            Ok((b, unconfirmed))
        };
        // Stored aggregates: the total, less the last `min_conf - 1` heights' outputs.
        let (b, unconfirmed) = self.quick(answer)?;
        let (height, tip_hash) = convert::tip(b.tip);
        Ok(Response::new(pb::GetBalanceResponse {
            confirmed_sat: b.confirmed,
            unconfirmed_sat: unconfirmed,
            immature_sat: b.immature,
            utxo_count: b.utxo_count,
            height,
            tip_hash,
        }))
    }

    async fn list_utxos(
        &self,
        req: Request<pb::ListUtxosRequest>,
    ) -> Result<Response<pb::ListUtxosResponse>, Status> {
        let req = req.into_inner();
        let target = convert::target(req.target)?;
        convert::page_token(&req.page_token)?;
        let (page, next, tip) = self
            .query(move |q| {
                let token = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
                let (page, next) = q.list_utxos(&target, req.min_conf, req.limit, token)?;
                Ok((page, next, q.tip()))
            })
            .await?;
        let (height, tip_hash) = convert::tip(tip);
        Ok(Response::new(pb::ListUtxosResponse {
            utxos: page.into_iter().map(convert::utxo).collect(),
            next_page_token: next.unwrap_or_default(),
            height,
            tip_hash,
        }))
    }

    async fn get_transfer(
        &self,
        req: Request<pb::GetTransferRequest>,
    ) -> Result<Response<pb::GetTransferResponse>, Status> {
        let txid = req.into_inner().txid;
        convert::bounded("txid", &txid, convert::MAX_ID)?;
        let asked = txid.clone();
        let (found, reorged, tip) = self
            .query(move |q| Ok((q.transfer(&txid)?, q.reorged_transfer(&txid)?, q.tip())))
            .await?;
        if found.is_empty() {
            // Confirmed first, then pending in the mempool, then reorged out (and not
            // back in the mempool), then replaced or evicted.
            let (pending, gone) = self.mempool_transfer(&asked).await?;
            let reorged = reorged.map(|entry| {
                let mut t = convert::transfer(entry);
                t.status = pb::TransferStatus::ReorgedOut.into();
                t
            });
            if let Some(t) = pending.or(reorged).or(gone) {
                let (height, tip_hash) = convert::tip(tip);
                return Ok(Response::new(pb::GetTransferResponse {
                    transfers: vec![t],
                    height,
                    tip_hash,
                }));
            }
            return Err(Status::not_found(format!(
                "transaction {asked} touched no watched script"
            )));
        }
        let (height, tip_hash) = convert::tip(tip);
        Ok(Response::new(pb::GetTransferResponse {
            transfers: found.into_iter().map(convert::transfer).collect(),
            height,
            tip_hash,
        }))
    }

    async fn list_transfers(
        &self,
        req: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        let req = req.into_inner();
        let to = (req.to_height != 0).then_some(req.to_height);
        convert::bounded("wallet", &req.wallet, convert::MAX_WALLET)?;
        convert::page_token(&req.page_token)?;
        let (page, next, tip) = self
            .query(move |q| {
                let token = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
                let (page, next) =
                    q.list_transfers(&req.wallet, req.from_height, to, req.limit, token)?;
                Ok((page, next, q.tip()))
            })
            .await?;
        let (height, tip_hash) = convert::tip(tip);
        Ok(Response::new(pb::ListTransfersResponse {
            transfers: page.into_iter().map(convert::transfer).collect(),
            next_page_token: next.unwrap_or_default(),
            height,
            tip_hash,
        }))
    }
}

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not load the descriptors.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Who may call, over what, and where writes go.
#[derive(Clone, Default)]
pub struct Access {
    /// The bearer token every indexer call must present (`None`: open, and no writes).
    pub token: Option<BearerToken>,
    /// TLS (rustls) for every connection (`None`: plaintext).
    pub tls: Option<ServerTlsConfig>,
    /// Where `AddWatch` goes.
    pub watch: WatchChanges,
}

/// What the server answers from besides the database, and who may call.
#[derive(Clone)]
pub struct ServeOptions {
    /// The network of the database's addresses.
    pub network: Network,
    /// The follower's mempool tracker (`None`: no unconfirmed transactions, as in
    /// `indexer serve`).
    pub mempool: Option<SharedMempool>,
    /// Token, TLS and where `AddWatch` goes.
    pub access: Access,
    /// Where calls are timed and subscribers counted.
    pub metrics: IndexerMetrics,
}

impl ServeOptions {
    /// Open on loopback, no mempool, no writes, metrics of its own.
    pub fn new(network: Network) -> Self {
        ServeOptions {
            network,
            mempool: None,
            access: Access::default(),
            metrics: IndexerMetrics::default(),
        }
    }
}

/// Serves the indexer service, health checking and reflection on `listener` until
/// `shutdown` completes. With a token, every indexer call must present it; health and
/// reflection stay open (they reveal nothing about wallets). Writes need a token.
pub async fn serve(
    store: Arc<Store>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let ServeOptions {
        network,
        mempool,
        access,
        metrics,
    } = opts;
    let Access { token, tls, watch } = access;
    // Writes need a token: without one, the server is open to anyone on loopback.
    let watch = if token.is_some() {
        watch
    } else {
        WatchChanges::Refused
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("indexer.v1.Indexer", tonic_health::ServingStatus::Serving)
        .await;
    let (stop_subscriptions, stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        // Graceful shutdown waits for open streams: end the subscriptions first.
        let _ = stop_subscriptions.send(true);
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .layer(metrics.grpc.layer())
        .add_service(health)
        .add_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            IndexerServer::new(
                IndexerService::new(store, network, stopping)
                    .with_mempool(mempool)
                    .with_watch(watch)
                    .with_metrics(metrics),
            )
            .max_decoding_message_size(convert::MAX_REQUEST_BYTES),
            move |req| match &token {
                Some(t) => t.check(req),
                None => Ok(req),
            },
        ))
        .serve_with_incoming_shutdown(service::listener::no_delay(listener), shutdown)
        .await?;
    Ok(())
}
