//! The withdrawal workflow: the saga of [`crate::saga`] driven by Temporal. Its state is
//! the saga's `Withdrawal`; each step is an activity whose answer is applied with the
//! saga's own transition rules, so both engines obey the same rules (a signed transaction
//! never goes back to unpaid, a cancel is refused once a send may have begun, coins stay
//! reserved until settled). The chain reaches it as `chain` signals from the adapter, with
//! a timer as a fallback; the API reads it with the `status` query and cancels it with the
//! `cancel` update, whose validator refuses (before anything is recorded) what the saga
//! refuses. A version built for external signers waits for their `signatures` update
//! (verified by its validator, so a bad PSBT changes nothing), which answers once the hot
//! keys signed last (the `complete` activity) or more signatures are needed; the run
//! also looks once a block for a version the signers completed and sent themselves.
//!
//! Determinism: everything here depends only on the history (activity answers, signals,
//! workflow time). Activity and signal names are fixed, so renaming a Rust method does not
//! break running workflows; the replay test (tests/temporal_replay.rs) replays recorded
//! histories on every change.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::time::Duration;

use serde::{Deserialize, Serialize};
use temporalio_common::{ActivityCloseTimeouts, RetryPolicy};
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityOptions, ContinueAsNewOptions, SignalWorkflowOptions, SyncWorkflowContext,
    WorkflowContext, WorkflowContextView, WorkflowResult,
};

use super::activities::{Activities, Observed, Reservation, Sending, Signing};
use super::batching::{self, Batched, Joining, LeaveAsk, Mirror};
use super::hot_wallet::HotWalletWorkflow;
use super::{WorkflowPolicy, WITHDRAWAL_AWAITS_SIGNATURES, WITHDRAWAL_STATE};
use crate::saga::{Outcome, State, Step, Withdrawal};

/// Events after which the workflow continues as new with its state.
const HISTORY_LIMIT: u32 = 2_000;

/// What a withdrawal workflow starts (or continues) with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WithdrawalStart {
    /// The withdrawal (RECEIVED when submitted; wherever it was when continued).
    pub withdrawal: Withdrawal,
    /// The policy it was submitted under.
    pub policy: WorkflowPolicy,
    /// Whether it ever asked its wallet for coins (so they are given back at the end).
    #[serde(default)]
    pub asked_coins: bool,
    /// The number of the withdrawal's change it starts at (0 when submitted; carried on
    /// continue-as-new so a watcher's place stays valid).
    #[serde(default)]
    pub change: u64,
    /// What it knows of batching, as a member or a batch (nothing when batching is off:
    /// left out, so older histories replay unchanged).
    #[serde(default, skip_serializing_if = "Batched::is_default")]
    pub batched: Batched,
}

/// Changes kept for watchers: a watcher further behind than this resumes at the oldest
/// kept (a withdrawal changes a handful of times; this bounds a stuck one's query).
const CHANGES_KEPT: usize = 256;

/// Changes of a withdrawal from a watcher's place on: what the `changes` query answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changes {
    /// The number of the first change in `withdrawals`.
    pub first: u64,
    /// Each state the withdrawal had from `first` on, oldest first; the last is now.
    pub withdrawals: Vec<Withdrawal>,
}

/// One withdrawal, from submission to settlement.
#[workflow]
pub struct WithdrawalWorkflow {
    pub(super) w: Withdrawal,
    pub(super) policy: WorkflowPolicy,
    asked_coins: bool,
    /// The number of the oldest change in `changes`.
    pub(super) first_change: u64,
    /// The withdrawal after each of its recent changes, oldest first; the last is `w`.
    /// Rebuilt by replay (it is not in the history): WatchWithdrawal reads it so that no
    /// state is missed between two of its polls.
    pub(super) changes: std::collections::VecDeque<Withdrawal>,
    /// `chain` signals received: the watch waits for this to move.
    chain_signals: u64,
    /// The tip at which a replacement could not be made (not tried again before the
    /// chain moves).
    bump_failed_at: Option<u32>,
    /// Batching: as a member or as a batch.
    pub(super) batched: Batched,
    /// As a batch: joiners claimed for the replacement being built (one that leaves
    /// meanwhile is taken out, and the replacement built again).
    pub(super) joining: Vec<Withdrawal>,
    /// As a batch: joiners are being taken from the queue and claimed (one may leave
    /// before it is known to be joining).
    pub(super) growing: bool,
}

/// Milliseconds since 1970 of a workflow clock reading (which replays the same).
pub(super) fn millis(time: Option<std::time::SystemTime>) -> u64 {
    time.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Options of the short activities: retried for as long as the cause lasts (an indexer
/// or bitcoind away), at most every 10 s; a worker that died in one is given up on
/// after 10 s (each call inside is bounded well below that).
pub(super) fn short() -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(10))
        .retry_policy(retries())
        .build()
}

/// Options of the reservation: longer (it may wait for other withdrawals of the wallet),
/// with heartbeats so a dead worker's reservation moves to another in seconds.
fn reserving() -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(120))
        .heartbeat_timeout(Duration::from_secs(10))
        .retry_policy(retries())
        .build()
}

/// Options of the hot keys' signature inside a `signatures` update: bounded, so the signer
/// gets an answer; what did not finish is done by the run at its next look.
fn completing() -> ActivityOptions {
    ActivityOptions::with_close_timeouts(ActivityCloseTimeouts::ScheduleAndStartToClose {
        start_to_close: Duration::from_secs(10),
        schedule_to_close: Duration::from_secs(30),
    })
    .retry_policy(retries())
    .build()
}

fn retries() -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(500))
        .backoff_coefficient(2.0)
        .maximum_interval(Duration::from_secs(10))
        .build()
}

impl WithdrawalWorkflow {
    /// Applies `outcome`; a refused one (e.g. a result arriving after a cancel) is
    /// logged and changes nothing.
    fn apply(&mut self, outcome: Outcome, now_ms: u64) -> bool {
        match self.w.apply(outcome, now_ms) {
            Ok(next) => {
                self.set(next);
                true
            }
            Err(e) => {
                tracing::info!(id = self.w.id, error = %e, "an outcome came too late");
                false
            }
        }
    }

    /// Makes `next` the withdrawal, kept as a change when it differs.
    pub(super) fn set(&mut self, next: Withdrawal) {
        if next != self.w {
            self.changes.push_back(next.clone());
            if self.changes.len() > CHANGES_KEPT {
                self.changes.pop_front();
                self.first_change += 1;
            }
        }
        self.w = next;
    }

    /// The pending PSBT with the verified signatures of `submitted` added (what a
    /// `signatures` update records), or why they are refused.
    fn gathered(&self, submitted: &[u8]) -> Result<Vec<u8>, String> {
        let Some(pending) = &self.w.pending else {
            return Err(crate::grpc_signatures::nothing_to_sign(&self.w));
        };
        crate::cosign::add_signatures(&pending.psbt, submitted)
            .map(|(psbt, _)| psbt)
            .map_err(|e| format!("withdrawal {}: {e}", self.w.id))
    }
}

/// How a `signatures` update that kept the signatures but could not have the hot keys
/// sign yet begins its failure (the API answers it UNAVAILABLE).
pub const COMPLETION_PENDING: &str =
    "the signatures are kept; signing with the hot keys did not finish and is retried at the next block";

/// What a completed version of `pending` is: the first version, or a replacement.
fn signed(pending: &crate::saga::Pending, attempt: crate::saga::Attempt) -> Outcome {
    if pending.replacing {
        Outcome::Replaced(attempt)
    } else {
        Outcome::Signed(attempt)
    }
}

/// Applies `outcome` in the workflow, with the state shown to searches kept up to date.
pub(super) fn record(ctx: &mut WorkflowContext<WithdrawalWorkflow>, outcome: Outcome) -> bool {
    let at = millis(ctx.workflow_time());
    let before = ctx.state(|s| (s.w.state, s.w.pending.is_some()));
    let applied = ctx.state_mut(|s| s.apply(outcome, at));
    publish_state(ctx, before);
    applied
}

/// Upserts the search attributes that changed since `before` (the state, and whether a
/// version waits for signatures).
fn publish_state(ctx: &mut WorkflowContext<WithdrawalWorkflow>, before: (State, bool)) {
    let after = ctx.state(|s| (s.w.state, s.w.pending.is_some()));
    if after.0 != before.0 {
        ctx.upsert_search_attributes([WITHDRAWAL_STATE.value_set(state_name(after.0))]);
    }
    // Only when it changes: histories of payments without external signers never carry
    // this attribute (a command they replay without).
    if after.1 != before.1 {
        ctx.upsert_search_attributes([WITHDRAWAL_AWAITS_SIGNATURES.value_set(after.1)]);
    }
}

/// The API's name of a state (`BROADCAST`...), as searches filter on it.
pub fn state_name(s: State) -> String {
    crate::grpc::state(s)
        .as_str_name()
        .trim_start_matches("WITHDRAWAL_STATE_")
        .to_owned()
}

#[workflow_methods]
impl WithdrawalWorkflow {
    /// Starts from the submitted (or carried) withdrawal.
    #[init]
    pub fn new(_ctx: &WorkflowContextView, start: WithdrawalStart) -> Self {
        WithdrawalWorkflow {
            changes: [start.withdrawal.clone()].into(),
            first_change: start.change,
            w: start.withdrawal,
            policy: start.policy,
            asked_coins: start.asked_coins,
            chain_signals: 0,
            bump_failed_at: None,
            batched: start.batched,
            joining: Vec::new(),
            growing: false,
        }
    }

    /// Runs the saga to its end: settled, failed, cancelled or waiting for an operator.
    #[run(name = "withdrawal")]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<Withdrawal> {
        let state = ctx.state(|s| s.w.state);
        ctx.upsert_search_attributes([WITHDRAWAL_STATE.value_set(state_name(state))]);
        loop {
            if ctx.continue_as_new_suggested() || ctx.history_length() > HISTORY_LIMIT {
                let view = ctx.clone();
                ctx.wait_condition(move |_: &Self| view.all_handlers_finished())
                    .await?;
                let start = ctx.state(|s| WithdrawalStart {
                    withdrawal: s.w.clone(),
                    policy: s.policy.clone(),
                    asked_coins: s.asked_coins,
                    change: s.first_change + s.changes.len() as u64 - 1,
                    batched: s.batched.clone(),
                });
                ctx.continue_as_new(start, ContinueAsNewOptions::default())?;
            }
            // A batch tells its members of its changes before its next step.
            Self::tell_members(ctx).await?;
            let (w, policy, batched) =
                ctx.state(|s| (s.w.clone(), s.policy.clone(), s.batched.clone()));
            if w.batch.is_some() {
                // A member: its batch runs the steps.
                if batching::at_rest(&w) {
                    break;
                }
                Self::follow_batch(ctx).await?;
                continue;
            }
            if w.is_batch() && !batched.claimed {
                Self::claim(ctx, w).await?;
                continue;
            }
            if batching::queues(&w, &policy, &batched) {
                Self::wait_in_queue(ctx, w).await?;
                continue;
            }
            match w.next_step() {
                Step::Reserve => {
                    ctx.state_mut(|s| s.asked_coins = true);
                    let outcome = match ctx
                        .execute_activity(Activities::reserve, w, reserving())
                        .await?
                    {
                        Reservation::Reserved(coins) => Outcome::Reserved(coins),
                        Reservation::Refused(why) => Outcome::Failed(why),
                    };
                    record(ctx, outcome);
                }
                Step::Sign => {
                    let members = w.members.clone();
                    let signing = ctx.execute_activity(Activities::sign, w, short()).await?;
                    // A member left the batch meanwhile: a version paying it is never
                    // recorded; the batch is signed again without it.
                    if ctx.state(|s| s.w.members != members) {
                        continue;
                    }
                    let outcome = match signing {
                        Signing::Signed(attempt) => Outcome::Signed(attempt),
                        Signing::Pending(pending) => Outcome::AwaitingSignatures(pending),
                        Signing::Refused(why) => Outcome::Failed(why),
                    };
                    record(ctx, outcome);
                }
                Step::Broadcast => Self::broadcast(ctx, w).await?,
                Step::Watch => Self::watch(ctx, w).await?,
                Step::AwaitSignatures => Self::await_signatures(ctx, w).await?,
                Step::Rest => break,
            }
        }
        Self::tell_members(ctx).await?;
        Self::leave_queue(ctx).await;
        let (w, asked) = ctx.state(|s| (s.w.clone(), s.asked_coins));
        if asked && !w.holds_coins() {
            let wallet = super::hot_wallet_workflow_id(&w.request.wallet);
            let released = ctx
                .external_workflow(wallet, None)
                .signal(
                    HotWalletWorkflow::release,
                    w.request.request_id.clone(),
                    SignalWorkflowOptions::default(),
                )
                .await;
            // Not found: the wallet's workflow never started, so it holds nothing of ours.
            if let Err(e) = released {
                tracing::info!(id = w.id, error = %e, "no reservation to release");
            }
        }
        // A handler still running (a member's cancel answered by its batch) answers its
        // caller before the workflow ends.
        let view = ctx.clone();
        ctx.wait_condition(move |_: &Self| view.all_handlers_finished())
            .await?;
        Ok(ctx.state(|s| s.w.clone()))
    }

    /// Sends the current version; the intent of a first send is recorded before, so a
    /// cancel is refused from then on.
    async fn broadcast(ctx: &mut WorkflowContext<Self>, w: Withdrawal) -> WorkflowResult<()> {
        if w.state == State::Signed && !record(ctx, Outcome::Sending) {
            return Ok(());
        }
        let w = ctx.state(|s| s.w.clone());
        let outcome = match ctx
            .execute_activity(Activities::broadcast, w.clone(), short())
            .await?
        {
            Sending::Accepted { height } | Sending::InBlock { height } => {
                Outcome::Broadcast { height }
            }
            Sending::WaitForIndex(why) => {
                tracing::warn!(id = w.id, %why, "inputs already spent; waiting for the index to show the spending transaction");
                ctx.timer(Duration::from_secs(2)).await;
                return Ok(());
            }
            // Refused for good at its first send: nothing is on the network.
            Sending::Refused { reason, repeated }
                if w.state == State::Signed && w.sends == 1 && !repeated =>
            {
                Outcome::Failed(format!("bitcoind refused it: {reason}"))
            }
            // An earlier send may have gone through: an operator decides.
            Sending::Refused { reason, .. } if w.state == State::Signed => {
                Outcome::Unclear(format!("send refused after an earlier send: {reason}"))
            }
            Sending::Refused { reason, .. } => {
                Outcome::Unclear(format!("rebroadcast refused: {reason}"))
            }
        };
        record(ctx, outcome);
        Ok(())
    }

    /// Looks at the chain once, acts on what it shows (confirmed deeper, reorged out,
    /// stuck), and when nothing moved waits for the next `chain` signal or the poll timer.
    async fn watch(ctx: &mut WorkflowContext<Self>, w: Withdrawal) -> WorkflowResult<()> {
        let seen = ctx.state(|s| s.chain_signals);
        let txids = w.attempts.iter().map(|a| a.txid).collect::<Vec<_>>();
        let Observed { tip, confirmed } = ctx
            .execute_activity(Activities::observe, txids, short())
            .await?;
        let policy = ctx.state(|s| s.policy.clone());
        if let Some((txid, height)) = confirmed {
            let confirmations = tip.saturating_sub(height).saturating_add(1);
            if w.confirmed != Some(txid) || w.confirmations != confirmations {
                record(
                    ctx,
                    Outcome::Confirmed {
                        txid,
                        confirmations,
                        required: policy.confirmations,
                        settle_at: policy.settle_at,
                    },
                );
                return Ok(());
            }
        } else if w.confirmed.is_some() {
            record(ctx, Outcome::ReorgedOut);
            return Ok(());
        } else if w.pending.is_some() {
            // A replacement waiting for signatures is not replaced again meanwhile.
            return Self::await_signatures(ctx, w).await;
        } else if w.state == State::Broadcast
            && w.broadcast_height
                .is_some_and(|h| tip >= h.saturating_add(policy.bump_after_blocks))
            && ctx.state(|s| s.bump_failed_at) != Some(tip)
        {
            if Self::grow(ctx, &w, tip).await? {
                ctx.state_mut(|s| s.bump_failed_at = None);
                return Ok(());
            }
            match ctx
                .execute_activity(Activities::replace, w.clone(), short())
                .await?
            {
                Signing::Signed(attempt) => {
                    tracing::info!(id = w.id, new = %attempt.txid, rate = attempt.fee_rate, "bumping a stuck withdrawal");
                    if record(ctx, Outcome::Replaced(attempt)) {
                        ctx.state_mut(|s| s.bump_failed_at = None);
                    }
                }
                Signing::Pending(pending) => {
                    tracing::info!(id = w.id, txid = %pending.txid, "a replacement waits for external signatures");
                    if record(ctx, Outcome::AwaitingSignatures(pending)) {
                        ctx.state_mut(|s| s.bump_failed_at = None);
                    }
                }
                Signing::Refused(why) => {
                    tracing::warn!(id = w.id, %why, "a stuck withdrawal cannot be bumped further");
                    ctx.state_mut(|s| s.bump_failed_at = Some(tip));
                }
            }
            return Ok(());
        }
        let poll = Duration::from_secs(policy.poll_secs.max(1));
        temporalio_sdk::workflows::select! {
            moved = ctx.wait_condition(move |s: &Self| s.chain_signals > seen) => { moved?; }
            _ = ctx.timer(poll) => {}
        };
        Ok(())
    }

    /// A version waiting for external signatures: signed once they are enough (the hot keys
    /// last) or once the signers sent it themselves; else waits for more signatures, the
    /// chain to move, or the poll timer.
    async fn await_signatures(
        ctx: &mut WorkflowContext<Self>,
        w: Withdrawal,
    ) -> WorkflowResult<()> {
        let Some(pending) = w.pending.clone() else {
            return Ok(());
        };
        let seen = ctx.state(|s| s.chain_signals);
        if let Some(attempt) = ctx
            .execute_activity(Activities::complete, w, short())
            .await?
        {
            record(ctx, signed(&pending, attempt));
            return Ok(());
        }
        // Signatures arriving meanwhile are completed by their update.
        let poll = Duration::from_secs(ctx.state(|s| s.policy.poll_secs).max(1));
        temporalio_sdk::workflows::select! {
            moved = ctx.wait_condition(move |s: &Self| {
                s.chain_signals > seen || s.w.pending.is_none()
            }) => { moved?; }
            _ = ctx.timer(poll) => {}
        };
        Ok(())
    }

    /// The chain moved (a block connected or disconnected): look again.
    #[signal(name = "chain")]
    pub fn chain(&mut self, _ctx: &mut SyncWorkflowContext<Self>, _tip: u32) {
        self.chain_signals += 1;
    }

    /// The withdrawal as it is now.
    #[query(name = "status")]
    pub fn status(&self, _ctx: &WorkflowContextView) -> Withdrawal {
        self.w.clone()
    }

    /// The withdrawal after each change numbered `from` on (from the oldest kept when
    /// `from` is older; only the present when `from` is past it).
    #[query(name = "changes")]
    pub fn changes(&self, _ctx: &WorkflowContextView, from: u64) -> Changes {
        let last = self.first_change + self.changes.len() as u64 - 1;
        let first = from.clamp(self.first_change, last);
        Changes {
            first,
            withdrawals: self
                .changes
                .iter()
                .skip((first - self.first_change) as usize)
                .cloned()
                .collect(),
        }
    }

    /// Refuses signatures that do not verify for the pending version (or when none waits),
    /// before anything is recorded.
    #[update_validator(signatures)]
    #[allow(clippy::ptr_arg)] // the SDK hands a validator its update's input type
    fn validate_signatures(
        &self,
        _ctx: &WorkflowContextView,
        psbt: &Vec<u8>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.gathered(psbt).map(|_| ()).map_err(Into::into)
    }

    /// Adds an external signer's verified signatures (a serialized PSBT) to the pending
    /// version and, once they are enough, has the hot keys sign it: the withdrawal then.
    #[update(name = "signatures")]
    pub async fn signatures(
        ctx: &mut WorkflowContext<Self>,
        psbt: Vec<u8>,
    ) -> Result<Withdrawal, Box<dyn std::error::Error + Send + Sync>> {
        let gathered = ctx.state(|s| s.gathered(&psbt))?;
        record(ctx, Outcome::SignaturesAdded(gathered));
        let w = ctx.state(|s| s.w.clone());
        let Some(pending) = w.pending.clone() else {
            return Ok(w);
        };
        match ctx
            .execute_activity(Activities::complete, w, completing())
            .await
        {
            Ok(Some(attempt)) => {
                record(ctx, signed(&pending, attempt));
            }
            Ok(None) => {}
            // The signatures are kept: the run completes it at its next look. The signer
            // is told (UNAVAILABLE), not shown a success it could take for "more needed".
            Err(e) => {
                tracing::warn!(txid = %pending.txid, error = %e, "signing with the hot keys did not finish; retried at the next block");
                return Err(format!("{COMPLETION_PENDING}: {e}").into());
            }
        }
        Ok(ctx.state(|s| s.w.clone()))
    }

    /// Refuses a cancel the saga refuses, before anything is recorded.
    #[update_validator(cancel)]
    fn validate_cancel(
        &self,
        _ctx: &WorkflowContextView,
        _why: &String,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.w.is_batch() {
            return Err(format!(
                "batch {}: a batch is cancelled by cancelling its members",
                self.w.id
            )
            .into());
        }
        // (The time only stamps the result, which is dropped.)
        self.w
            .apply(Outcome::Cancelled, 0)
            .map_err(|e| e.to_string())?;
        // A member's cancel is its batch's to take (`cancel_member`).
        match self.w.batch {
            Some(batch) => Err(format!("{} (batch {batch})", batching::IN_A_BATCH).into()),
            None => Ok(()),
        }
    }

    /// Cancels it (before any send began): its coins are given back when it ends.
    #[update(name = "cancel")]
    pub fn cancel(&mut self, ctx: &mut SyncWorkflowContext<Self>, _why: String) -> Withdrawal {
        let before = self.w.state;
        let at = millis(ctx.workflow_time());
        self.apply(Outcome::Cancelled, at);
        if self.w.state != before {
            ctx.upsert_search_attributes([WITHDRAWAL_STATE.value_set(state_name(self.w.state))]);
        }
        self.w.clone()
    }

    /// Refuses a member's cancel the saga refuses (its batch may have left), or of a
    /// withdrawal in no batch, before anything is recorded.
    #[update_validator(cancel_member)]
    fn validate_cancel_member(
        &self,
        _ctx: &WorkflowContextView,
        _why: &String,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.w.batch.is_none() || self.batched.batch_workflow.is_none() {
            return Err(format!("withdrawal {} is paid by no batch", self.w.id).into());
        }
        self.w
            .apply(Outcome::Cancelled, 0)
            .map(|_| ())
            .map_err(|e| e.to_string().into())
    }

    /// Cancels a batch member: its batch lets it leave (and signs again without it) only
    /// while it cannot have left; the batch's refusal is the answer.
    #[update(name = "cancel_member")]
    pub async fn cancel_member(
        ctx: &mut WorkflowContext<Self>,
        _why: String,
    ) -> Result<Withdrawal, Box<dyn std::error::Error + Send + Sync>> {
        let (member, batch_workflow) = ctx.state(|s| (s.w.id, s.batched.batch_workflow.clone()));
        let Some(batch_workflow) = batch_workflow else {
            return Err(format!("withdrawal {member} is paid by no batch").into());
        };
        let ask = LeaveAsk {
            batch_workflow,
            member,
        };
        match ctx.execute_activity(Activities::leave, ask, short()).await {
            Ok(Ok(_batch)) => {}
            Ok(Err(refused)) => return Err(refused.into()),
            Err(e) => return Err(format!("asking its batch to let it leave: {e}").into()),
        }
        let at = Self::clock(ctx);
        let before = ctx.state(|s| (s.w.state, s.w.pending.is_some()));
        ctx.state_mut(|s| s.left_batch(at));
        publish_state(ctx, before);
        Ok(ctx.state(|s| s.w.clone()))
    }

    /// Joins batch `j` when it is still unpaid, not cancelled, in no other batch and not
    /// sent off alone: its own workflow answers this one at a time with its cancel, so it
    /// is paid by one batch at most and never after a cancel. True when it is a member
    /// (again, for a repeated ask).
    #[update(name = "join")]
    pub fn join(&mut self, _ctx: &mut SyncWorkflowContext<Self>, j: Joining) -> bool {
        if self.w.batch == Some(j.batch_id) {
            return true;
        }
        let free = self.w.state == State::Received
            && self.w.batch.is_none()
            && !self.w.is_batch()
            && self.w.attempts.is_empty()
            && !self.batched.alone;
        if !free {
            return false;
        }
        let mut next = self.w.clone();
        next.batch = Some(j.batch_id);
        self.batched.batch_workflow = Some(j.batch_workflow);
        self.set(next);
        true
    }

    /// Its batch changed: the member shows it.
    #[signal(name = "mirror")]
    pub fn mirror(&mut self, ctx: &mut SyncWorkflowContext<Self>, m: Mirror) {
        let before = self.w.state;
        self.mirror_batch(&m, millis(ctx.workflow_time()));
        if self.w.state != before {
            ctx.upsert_search_attributes([WITHDRAWAL_STATE.value_set(state_name(self.w.state))]);
        }
    }

    /// Go on alone: told by its queue (`None`: no batch came within the window) or by the
    /// batch that claimed it as a joiner and could not pay it (`Some(batch)`).
    #[signal(name = "alone")]
    pub fn alone(&mut self, _ctx: &mut SyncWorkflowContext<Self>, batch: Option<u64>) {
        if self.w.state != State::Received || !self.w.attempts.is_empty() || self.batched.listed {
            return;
        }
        if batch.is_some() && self.w.batch == batch {
            let mut next = self.w.clone();
            next.batch = None;
            self.batched.batch_workflow = None;
            self.set(next);
        }
        if self.w.batch.is_none() {
            self.batched.alone = true;
        }
    }

    /// Refuses, before anything is recorded, a member leaving a batch that may have left
    /// (or whom it does not pay).
    #[update_validator(leave)]
    fn validate_leave(
        &self,
        _ctx: &WorkflowContextView,
        member: &u64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.joining.iter().any(|j| j.id == *member)
            || self.batched.left.contains(member)
            || (self.growing && !self.batched.members.contains_key(member))
        {
            return Ok(());
        }
        self.w
            .apply(Outcome::MemberLeft(*member), 0)
            .map(|_| ())
            .map_err(|e| e.to_string().into())
    }

    /// Member `member` was cancelled: it leaves the batch (a signed version not yet sent
    /// is discarded and signed again without it), or the replacement it was joining.
    #[update(name = "leave")]
    pub fn leave(&mut self, ctx: &mut SyncWorkflowContext<Self>, member: u64) -> Withdrawal {
        if !self.batched.left.insert(member) || self.joining.iter().any(|j| j.id == member) {
            // Left already (a repeated ask), or joining the replacement being built.
            self.joining.retain(|j| j.id != member);
            return self.w.clone();
        }
        if self.growing && !self.w.members.iter().flatten().any(|m| m.id == member) {
            // Being claimed as a joiner right now: it will not join.
            return self.w.clone();
        }
        let before = self.w.state;
        self.apply(Outcome::MemberLeft(member), millis(ctx.workflow_time()));
        if self.w.state != before {
            ctx.upsert_search_attributes([WITHDRAWAL_STATE.value_set(state_name(self.w.state))]);
        }
        self.w.clone()
    }
}
