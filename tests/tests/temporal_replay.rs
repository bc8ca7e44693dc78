//! The withdrawal and hot wallet workflows replay the histories recorded from the
//! Temporal scenario tests (`fixtures/temporal-histories`): a change to the workflow code
//! that would break workflows running in production (a step added, removed or reordered,
//! an activity or signal renamed) fails here, in CI, not on the first worker deployed.
//! Recorded with `TEMPORAL_HISTORIES_OUT=fixtures/temporal-histories cargo nextest run
//! --workspace --all-targets -E 'test(/on_temporal/)'` (see fixtures/README.md).

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use orchestrator::saga::Withdrawal;
use orchestrator::temporal::activities::Activities;
use orchestrator::temporal::hot_wallet::HotWalletWorkflow;
use orchestrator::temporal::withdrawal::{WithdrawalStart, WithdrawalWorkflow};
use temporalio_client::WorkflowHistory;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::workflow_replayer::{WorkflowReplayer, WorkflowReplayerOptions};
use temporalio_sdk::{ActivityOptions, WorkflowContext, WorkflowContextView, WorkflowResult};

fn histories() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/temporal-histories");
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    found.sort();
    found
}

fn is_withdrawal(name: &str) -> bool {
    !name.contains(orchestrator::temporal::RESERVED_PREFIX)
}

#[tokio::test]
async fn recorded_histories_replay_on_todays_workflow_code() {
    let all = histories();
    let withdrawals = all.iter().filter(|(n, _)| is_withdrawal(n)).count();
    assert!(
        withdrawals >= 5 && all.len() > withdrawals,
        "recorded histories of both workflows are in fixtures/temporal-histories ({withdrawals} of {})",
        all.len()
    );
    let replayer = WorkflowReplayer::new(
        WorkflowReplayerOptions::new()
            .register_workflow::<WithdrawalWorkflow>()
            .unwrap()
            .register_workflow::<HotWalletWorkflow>()
            .unwrap()
            .build(),
    )
    .unwrap();
    for (name, bytes) in all {
        let history = WorkflowHistory::from_json(&bytes).unwrap();
        if let Err(e) = replayer.replay_workflow(history).await {
            panic!("{name} no longer replays: {e:?}");
        }
    }
}

/// Today's withdrawal workflow with its first step left out: what a careless change
/// looks like to a running workflow.
#[workflow]
struct SignsWithoutReserving {
    w: Withdrawal,
}

#[workflow_methods]
impl SignsWithoutReserving {
    #[init]
    fn new(_ctx: &WorkflowContextView, start: WithdrawalStart) -> Self {
        SignsWithoutReserving {
            w: start.withdrawal,
        }
    }

    #[run(name = "withdrawal")]
    async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<Withdrawal> {
        let w = ctx.state(|s| s.w.clone());
        ctx.execute_activity(
            Activities::sign,
            w.clone(),
            ActivityOptions::start_to_close_timeout(Duration::from_secs(20)),
        )
        .await?;
        Ok(w)
    }
}

#[tokio::test]
async fn a_workflow_that_steps_differently_is_refused_by_the_replayer() {
    let replayer = WorkflowReplayer::new(
        WorkflowReplayerOptions::new()
            .register_workflow::<SignsWithoutReserving>()
            .unwrap()
            .build(),
    )
    .unwrap();
    let mut checked = 0;
    for (name, bytes) in histories().into_iter().filter(|(n, _)| is_withdrawal(n)) {
        let history = WorkflowHistory::from_json(&bytes).unwrap();
        let replayed = replayer.replay_workflow(history).await;
        let e = replayed.expect_err(&name);
        assert!(format!("{e:?}").contains("ondeterminism"), "{name}: {e:?}");
        checked += 1;
    }
    assert!(checked >= 5);
}
