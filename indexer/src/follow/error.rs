//! Why following stopped, and which of those reasons waiting may cure.

use bitcoind::DaemonError;

use crate::backfill;
use crate::mempool::TrackError;
use crate::pipeline::apply::ApplyError;
use crate::pipeline::PipelineError;
use crate::store::StoreError;

/// Why following stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// bitcoind failed in a way waiting will not fix (or it was not retried).
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The database failed, or a reorg is deeper than the undo journal.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A block failed in the pipeline.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// The ZMQ thread ended.
    #[error("the ZMQ subscriber stopped")]
    ZmqStopped,
    /// Merging a backfill failed.
    #[error("backfill: {0}")]
    Backfill(#[from] backfill::BackfillError),
    /// bitcoind's chain is shorter than the index while it is still syncing.
    #[error("bitcoind is in initial block download at height {daemon}, below the index's {index}: waiting for it")]
    DaemonBehind {
        /// bitcoind's height.
        daemon: u32,
        /// The index's height.
        index: u32,
    },
}

impl From<TrackError> for FollowError {
    fn from(e: TrackError) -> Self {
        match e {
            TrackError::Daemon(e) => FollowError::Daemon(e),
            TrackError::Store(e) => FollowError::Store(e),
        }
    }
}

impl FollowError {
    /// Whether trying again later may succeed: bitcoind down or restarting, or its chain
    /// moved while we read it.
    pub fn is_transient(&self) -> bool {
        match self {
            // No answer of the node ends following (see `worth_retrying`).
            FollowError::Daemon(e) => e.worth_retrying(),
            FollowError::Pipeline(PipelineError::Source(e)) => e
                .downcast_ref::<DaemonError>()
                .is_none_or(DaemonError::worth_retrying),
            // The hashes listed and the blocks fetched straddle a reorg: look again.
            FollowError::Pipeline(PipelineError::Apply(ApplyError::NotConnecting { .. })) => true,
            // A block that fails its own hash or merkle root: fetch it again.
            FollowError::Pipeline(PipelineError::Parse(_)) => true,
            FollowError::DaemonBehind { .. } => true,
            FollowError::Backfill(e) => e.is_transient(),
            FollowError::Pipeline(_) | FollowError::Store(_) | FollowError::ZmqStopped => false,
        }
    }
}
