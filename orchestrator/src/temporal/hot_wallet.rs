//! One long-lived workflow per hot wallet owning its coin reservations: withdrawal
//! workflows (through their reserve activity, on any worker) ask it for coins by update,
//! and it grants them only when no other withdrawal holds any of them. Its updates run
//! one at a time in the workflow, so two workers on two machines can never hold the same
//! coin. A withdrawal gives its coins back by signal once failed, cancelled or settled.
//! With batching on it also keeps the wallet's payout queue ([`super::batching`]):
//! withdrawals queue themselves by update; a due queue starts a batch (or sends a lone
//! one on alone); a stuck batch takes joiners from it.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bitcoin::OutPoint;
use serde::{Deserialize, Serialize};
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ContinueAsNewOptions, SignalWorkflowOptions, SyncWorkflowContext, WorkflowContext,
    WorkflowContextView, WorkflowResult,
};

use super::activities::Activities;
use super::batching::{due, JoinersAsk, Queued};
use super::withdrawal::{millis, short, WithdrawalWorkflow};
use crate::saga::Coin;

/// Answers to joiner asks kept, so a repeated ask (its activity ran again) gets the same
/// withdrawals rather than strand the first ones.
const JOINER_ASKS_KEPT: usize = 64;

/// Withdrawals taken out of the queue remembered, so that a late repeat of an ask to be
/// queued (its activity ran again after its worker died) does not queue one again.
const TAKEN_OUT_KEPT: usize = 4_096;

/// Events after which the workflow continues as new (its state carried), well below the
/// server's limits.
const HISTORY_LIMIT: u32 = 5_000;

/// What the workflow starts (or continues) with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HotWalletStart {
    /// Coins held, by the request id holding them.
    pub held: BTreeMap<String, Vec<Coin>>,
    /// The payout queue, oldest first (left out when empty: older histories replay).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queue: Vec<Queued>,
    /// The latest joiner asks with what each was given.
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub taken: VecDeque<(String, Vec<Queued>)>,
    /// The latest withdrawals taken out of the queue (batched, joined, or sent alone).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub taken_out: VecDeque<String>,
}

/// A withdrawal asking for coins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReserveAsk {
    /// The withdrawal's request id.
    pub request_id: String,
    /// The coins it chose.
    pub coins: Vec<Coin>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ReserveReply {
    /// These coins are its own now (or were already: a repeated ask gets what it holds).
    Granted(Vec<Coin>),
    /// Some were held by others: every coin held now, to choose again without.
    Taken(BTreeSet<OutPoint>),
}

/// The reservations of one hot wallet.
#[workflow]
pub struct HotWalletWorkflow {
    held: BTreeMap<String, Vec<Coin>>,
    queue: Vec<Queued>,
    taken: VecDeque<(String, Vec<Queued>)>,
    taken_out: VecDeque<String>,
    /// Withdrawals queued so far (the run wakes when it moves).
    queued: u64,
}

impl HotWalletWorkflow {
    /// Takes the withdrawals `which` accepts out of the queue, remembered as taken out.
    fn take_out(&mut self, mut which: impl FnMut(&Queued) -> bool) -> Vec<Queued> {
        let mut out = Vec::new();
        self.queue.retain(|q| {
            let taken = which(q);
            if taken {
                out.push(q.clone());
            }
            !taken
        });
        for q in &out {
            self.taken_out.push_back(q.workflow().to_owned());
            if self.taken_out.len() > TAKEN_OUT_KEPT {
                self.taken_out.pop_front();
            }
        }
        out
    }
}

impl HotWalletWorkflow {
    fn held_outpoints(&self) -> BTreeSet<OutPoint> {
        self.held.values().flatten().map(|c| c.outpoint).collect()
    }
}

#[workflow_methods]
impl HotWalletWorkflow {
    /// Starts with what it held before continuing as new.
    #[init]
    pub fn new(_ctx: &WorkflowContextView, start: HotWalletStart) -> Self {
        HotWalletWorkflow {
            held: start.held,
            queue: start.queue,
            taken: start.taken,
            taken_out: start.taken_out,
            queued: 0,
        }
    }

    /// Lives for ever, paying its queue as it falls due, continuing as new (with its
    /// reservations and queue) when its history grows.
    #[run(name = "hot_wallet")]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        loop {
            let view = ctx.clone();
            let full =
                move || view.continue_as_new_suggested() || view.history_length() > HISTORY_LIMIT;
            let ready = full.clone();
            ctx.wait_condition(move |s: &Self| ready() || !s.queue.is_empty())
                .await?;
            if full() {
                break;
            }
            let now = millis(ctx.workflow_time());
            let (paid, next) = ctx.state(|s| due(&s.queue, now));
            if !paid.is_empty() {
                Self::pay(ctx, paid).await?;
                continue;
            }
            let seen = ctx.state(|s| s.queued);
            let wait =
                Duration::from_millis(next.map_or(60_000, |at| at.saturating_sub(now).max(1)));
            let woken = full.clone();
            temporalio_sdk::workflows::select! {
                moved = ctx.wait_condition(move |s: &Self| woken() || s.queued != seen) => { moved?; }
                _ = ctx.timer(wait) => {}
            };
        }
        let view = ctx.clone();
        ctx.wait_condition(move |_: &Self| view.all_handlers_finished())
            .await?;
        let start = ctx.state(|s| HotWalletStart {
            held: s.held.clone(),
            queue: s.queue.clone(),
            taken: s.taken.clone(),
            taken_out: s.taken_out.clone(),
        });
        ctx.continue_as_new(start, ContinueAsNewOptions::default())?;
        Ok(())
    }

    /// Grants `ask.coins` to its withdrawal unless another holds one of them.
    #[update(name = "reserve")]
    pub fn reserve(
        &mut self,
        _ctx: &mut SyncWorkflowContext<Self>,
        ask: ReserveAsk,
    ) -> ReserveReply {
        if let Some(coins) = self.held.get(&ask.request_id) {
            return ReserveReply::Granted(coins.clone());
        }
        let held = self.held_outpoints();
        if ask.coins.iter().any(|c| held.contains(&c.outpoint)) {
            return ReserveReply::Taken(held);
        }
        self.held.insert(ask.request_id, ask.coins.clone());
        ReserveReply::Granted(ask.coins)
    }

    /// Refuses an ask for no coins, or for one coin twice, before it reaches the history.
    #[update_validator(reserve)]
    fn validate_reserve(
        &self,
        _ctx: &WorkflowContextView,
        ask: &ReserveAsk,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let distinct: BTreeSet<OutPoint> = ask.coins.iter().map(|c| c.outpoint).collect();
        if ask.coins.is_empty() || distinct.len() != ask.coins.len() {
            return Err(
                format!("a reservation for {} needs distinct coins", ask.request_id).into(),
            );
        }
        Ok(())
    }

    /// Queues a withdrawal (once: a repeated ask changes nothing).
    #[update(name = "queue")]
    pub fn queue(&mut self, _ctx: &mut SyncWorkflowContext<Self>, q: Queued) {
        let known = self.queue.iter().any(|x| x.workflow() == q.workflow())
            || self.taken_out.iter().any(|x| x == q.workflow());
        if !known {
            self.queue.push(q);
            self.queued += 1;
        }
    }

    /// Withdrawal `request_id` was cancelled while it waited: out of the queue.
    #[signal(name = "dequeue")]
    pub fn dequeue(&mut self, _ctx: &mut SyncWorkflowContext<Self>, request_id: String) {
        self.take_out(|q| q.workflow() == request_id);
    }

    /// Refuses to queue what cannot be batched, before it reaches the history.
    #[update_validator(queue)]
    fn validate_queue(
        &self,
        _ctx: &WorkflowContextView,
        q: &Queued,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if q.policy.batch.is_none() || q.withdrawal.is_batch() || q.withdrawal.batch.is_some() {
            return Err(format!("withdrawal {} cannot be batched", q.withdrawal.id).into());
        }
        Ok(())
    }

    /// Takes up to `ask.room` withdrawals of the batch's fee policy out of the queue,
    /// oldest first, for its replacement (the same ones again for a repeated ask).
    #[update(name = "joiners")]
    pub fn joiners(
        &mut self,
        _ctx: &mut SyncWorkflowContext<Self>,
        ask: JoinersAsk,
    ) -> Vec<Queued> {
        if let Some((_, given)) = self.taken.iter().find(|(key, _)| *key == ask.key) {
            return given.clone();
        }
        let mut room = ask.room;
        let given = self.take_out(|q| {
            let joins = room > 0 && q.withdrawal.request.fee_rate == ask.fee_rate;
            if joins {
                room -= 1;
            }
            joins
        });
        self.taken.push_back((ask.key, given.clone()));
        if self.taken.len() > JOINER_ASKS_KEPT {
            self.taken.pop_front();
        }
        given
    }

    /// The withdrawal `request_id` no longer needs its coins.
    #[signal(name = "release")]
    pub fn release(&mut self, _ctx: &mut SyncWorkflowContext<Self>, request_id: String) {
        self.held.remove(&request_id);
    }

    /// The payout queue, oldest first.
    #[query(name = "queued")]
    pub fn waiting(&self, _ctx: &WorkflowContextView) -> Vec<Queued> {
        self.queue.clone()
    }

    /// Every coin held, by request id.
    #[query(name = "held")]
    pub fn held(&self, _ctx: &WorkflowContextView) -> BTreeMap<String, Vec<Coin>> {
        self.held.clone()
    }
}

impl HotWalletWorkflow {
    /// Pays the due groups (taken out of the queue): two or more start a batch, a lone
    /// one is told to go on alone.
    async fn pay(ctx: &mut WorkflowContext<Self>, paid: Vec<Vec<Queued>>) -> WorkflowResult<()> {
        ctx.state_mut(|s| {
            s.take_out(|q| paid.iter().flatten().any(|p| p.workflow() == q.workflow()))
        });
        for group in paid {
            if let [lone] = group.as_slice() {
                let told = ctx
                    .external_workflow(lone.workflow().to_owned(), None)
                    .signal(
                        WithdrawalWorkflow::alone,
                        None::<u64>,
                        SignalWorkflowOptions::default(),
                    )
                    .await;
                // Ended (cancelled meanwhile): nothing to pay.
                if let Err(e) = told {
                    tracing::info!(run = lone.workflow(), error = %e, "a queued withdrawal took no signal");
                }
                continue;
            }
            ctx.execute_activity(Activities::start_batch, group, short())
                .await?;
        }
        Ok(())
    }
}
