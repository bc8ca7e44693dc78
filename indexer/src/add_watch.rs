//! Adding watched scripts while the indexer runs (gRPC `AddWatch`). The follower's
//! pipeline keeps the watched set in memory, so a change goes to whoever writes blocks:
//! the follower applies it between blocks and reloads its filter, and backfills the
//! earlier history of new scripts in the background ([`crate::backfill`]); without a
//! follower (`indexer serve`) nothing else writes and it is applied at once, for scripts
//! without earlier history.

use bitcoin::Network;
use crossbeam_channel::{Receiver, Sender};

use crate::backfill::Registry;
use crate::descriptors::Expanded;
use crate::script_filter::ScriptFilter;
use crate::store::{Reader, Store, StoreError};
use crate::wallets::{self, Added, WalletError};

/// One `AddWatch`, with where to send its outcome.
pub struct WatchRequest {
    /// Wallet name (created when new).
    pub wallet: String,
    /// Output descriptors or addresses.
    pub descriptors: Vec<String>,
    /// First height that may pay these scripts (`None`: from the next block on).
    pub birth_height: Option<u32>,
    /// Scripts derived from each ranged descriptor.
    pub gap_limit: u32,
    /// `descriptors` expanded already (by the gRPC handler, so that the follower's pause
    /// between two blocks is only the database's part); `None`: expanded when applied.
    pub expanded: Option<Vec<Expanded>>,
    /// Receives the outcome.
    pub reply: tokio::sync::oneshot::Sender<Result<Accepted, AddWatchError>>,
}

/// What an accepted `AddWatch` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Scripts no wallet watched before.
    pub new_scripts: usize,
    /// Scripts some wallet already watched.
    pub known_scripts: usize,
    /// The backfill indexing the new scripts' earlier history, when one was needed: the
    /// scripts are watched once it is merged.
    pub backfill: Option<u64>,
}

impl From<Added> for Accepted {
    fn from(a: Added) -> Self {
        Accepted {
            new_scripts: a.new_scripts,
            known_scripts: a.known_scripts,
            backfill: None,
        }
    }
}

/// Why an `AddWatch` was refused; nothing was added, except when the database failed
/// midway through a call of 10,000 or more new scripts, which commits in steps (sending
/// the call again completes it).
#[derive(Debug, thiserror::Error)]
pub enum AddWatchError {
    /// A descriptor, the wallet name or the database.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The scripts may have history below the tip, and there is no node to fetch it from.
    #[error(
        "birth height {birth} is at or below the indexed tip {tip}: indexing earlier history \
         needs bitcoind; add them through `indexer run`, or stop the server and run \
         `indexer watch add --birth-height {birth}` then `indexer rescan --from {birth}`"
    )]
    History {
        /// The birth height asked for.
        birth: u32,
        /// The tip.
        tip: u32,
    },
    /// Some of the scripts are being backfilled by another request: they are watched once
    /// it is merged, and adding them again meanwhile could merge their history twice.
    #[error(
        "{script} is being backfilled by job {job} (see ListBackfills): retry once it is done"
    )]
    Backfilling {
        /// The job.
        job: u64,
        /// One of the scripts, as hex.
        script: String,
    },
}

impl From<StoreError> for AddWatchError {
    fn from(e: StoreError) -> Self {
        AddWatchError::Wallet(WalletError::Store(e))
    }
}

/// Applies `req` to `store` (by the thread that writes blocks) and answers it; the new
/// scripts go into `filter` when one is given (the follower's, in place).
pub fn apply(
    store: &Store,
    network: Network,
    mut req: WatchRequest,
    filter: Option<&ScriptFilter>,
) {
    let started = std::time::Instant::now();
    let expanded = req.expanded.take();
    let outcome = add(store, network, &req, expanded, filter);
    match &outcome {
        Ok(added) => tracing::info!(
            wallet = %req.wallet,
            new = added.new_scripts,
            known = added.known_scripts,
            took_ms = started.elapsed().as_millis() as u64,
            "watching more scripts"
        ),
        Err(e) => tracing::warn!(wallet = %req.wallet, error = %e, "AddWatch refused"),
    }
    let _ = req.reply.send(outcome.map(Accepted::from));
}

fn add(
    store: &Store,
    network: Network,
    req: &WatchRequest,
    expanded: Option<Vec<Expanded>>,
    filter: Option<&ScriptFilter>,
) -> Result<Added, AddWatchError> {
    let (wallet, descriptors) = (req.wallet.as_str(), &req.descriptors[..]);
    let (birth_height, gap_limit) = (req.birth_height, req.gap_limit);
    if let (Some(birth), Some((tip, _))) = (birth_height, store.tip()?) {
        if birth <= tip {
            return Err(AddWatchError::History { birth, tip });
        }
    }
    let to = wallets::WatchTarget {
        network,
        wallet,
        birth_height,
        gap_limit,
    };
    Ok(match (filter, expanded) {
        (Some(f), Some(expanded)) => wallets::add_expanded_into(store, &to, expanded, f)?,
        (Some(f), None) => wallets::add_into(
            store,
            network,
            wallet,
            descriptors,
            birth_height,
            gap_limit,
            f,
        )?,
        (None, _) => wallets::add(store, network, wallet, descriptors, birth_height, gap_limit)?,
    })
}

/// Where the gRPC server sends `AddWatch`es.
#[derive(Clone, Default)]
pub enum WatchChanges {
    /// No writes: `AddWatch` is refused.
    #[default]
    Refused,
    /// Nothing else writes: apply them directly.
    Direct {
        /// Scripts derived from each ranged descriptor.
        gap_limit: u32,
    },
    /// The follower applies them between blocks.
    Follower {
        /// To the follower.
        requests: Sender<WatchRequest>,
        /// Scripts derived from each ranged descriptor.
        gap_limit: u32,
        /// The follower's backfills.
        backfills: Registry,
    },
}

/// A channel from the gRPC server to a follower
/// (`Follower::with_watch_requests`), and the registry of its backfills.
pub fn channel(gap_limit: u32) -> (WatchChanges, Receiver<WatchRequest>, Registry) {
    // The gRPC server lets a few calls in at once (`convert::MAX_ADDS_AT_ONCE`), each of
    // at most a million scripts; the bound is a second guard.
    let (requests, rx) = crossbeam_channel::bounded(16);
    let backfills = Registry::default();
    (
        WatchChanges::Follower {
            requests,
            gap_limit,
            backfills: backfills.clone(),
        },
        rx,
        backfills,
    )
}
