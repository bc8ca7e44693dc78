//! Wallet balancing on the Temporal engine: one long-lived workflow per hot wallet
//! (`orchestrator.balancing.<wallet>`) that, once a block (the adapter's `chain` signal),
//! has an activity decide the runs of [`crate::balancing`] (a sweep of the excess above the
//! high-water mark, a consolidation of small coins while fees are low) and start each as a
//! withdrawal workflow of its own, under the same request ids as the embedded engine's.
//! It remembers the unfinished run of each kind (one at a time) and how many sweeps it
//! started (the cold index of the next), carried across continue-as-new.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ContinueAsNewOptions, SyncWorkflowContext, WorkflowContext,
    WorkflowContextView, WorkflowResult,
};

use super::activities::Activities;

/// Events after which the workflow continues as new (its state carried).
const HISTORY_LIMIT: u32 = 2_000;

/// What the workflow starts (or continues) with; also what a decision is asked with and
/// answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalancingState {
    /// The unfinished run of each kind: the kind's request id prefix -> the run's id.
    pub running: BTreeMap<String, String>,
    /// Sweeps started so far: the next pays the cold descriptor's index one further.
    pub sweeps: u32,
    /// The tip the runs were last decided at.
    pub decided_at: Option<u32>,
    /// The highest tip signalled and not decided yet when it continued as new (so that
    /// block's decision is not lost with the signal).
    #[serde(default)]
    pub signalled: Option<u32>,
}

/// A decision to make at tip `height` from `state`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decide {
    /// The tip.
    pub height: u32,
    /// What the workflow knows.
    pub state: BalancingState,
}

/// The balancing of one hot wallet.
#[workflow]
pub struct BalancingWorkflow {
    state: BalancingState,
    /// The highest tip signalled.
    tip: Option<u32>,
}

/// Retried for as long as the cause lasts (an indexer or bitcoind away), at most every
/// 10 s; a decision lists the wallet's coins, reads the withdrawals waiting for coins
/// (heartbeating: many of them take long, a dead worker's is given up on in 10 s) and may
/// start a few workflows.
fn deciding() -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(300))
        .heartbeat_timeout(Duration::from_secs(10))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(500))
                .backoff_coefficient(2.0)
                .maximum_interval(Duration::from_secs(10))
                .build(),
        )
        .build()
}

#[workflow_methods]
impl BalancingWorkflow {
    /// Starts with what it knew before continuing as new.
    #[init]
    pub fn new(_ctx: &WorkflowContextView, mut start: BalancingState) -> Self {
        BalancingWorkflow {
            tip: start.signalled.take(),
            state: start,
        }
    }

    /// Lives for ever: decides once for each new tip signalled, continuing as new (with
    /// what it knows) as its history grows.
    #[run(name = "balancing")]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        loop {
            if ctx.continue_as_new_suggested() || ctx.history_length() > HISTORY_LIMIT {
                let view = ctx.clone();
                ctx.wait_condition(move |_: &Self| view.all_handlers_finished())
                    .await?;
                let state = ctx.state(|s| BalancingState {
                    signalled: s.tip.filter(|t| Some(*t) > s.state.decided_at),
                    ..s.state.clone()
                });
                ctx.continue_as_new(state, ContinueAsNewOptions::default())?;
            }
            ctx.wait_condition(|s: &Self| s.tip.is_some() && s.tip > s.state.decided_at)
                .await?;
            let ask = ctx.state(|s| Decide {
                height: s.tip.unwrap_or(0),
                state: s.state.clone(),
            });
            let decided = ctx
                .execute_activity(Activities::decide, ask, deciding())
                .await?;
            ctx.state_mut(|s| s.state = decided);
        }
    }

    /// The chain moved to `tip`: decide again (a lower tip, a reorg, waits for the next).
    #[signal(name = "chain")]
    pub fn chain(&mut self, _ctx: &mut SyncWorkflowContext<Self>, tip: u32) {
        self.tip = Some(self.tip.map_or(tip, |t| t.max(tip)));
    }

    /// What it knows: the unfinished runs, the sweeps started, the last decision's tip.
    #[query(name = "state")]
    pub fn state(&self, _ctx: &WorkflowContextView) -> BalancingState {
        self.state.clone()
    }
}
