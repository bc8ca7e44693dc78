//! One long-lived workflow per hot wallet owning its coin reservations: withdrawal
//! workflows (through their reserve activity, on any worker) ask it for coins by update,
//! and it grants them only when no other withdrawal holds any of them. Its updates run
//! one at a time in the workflow, so two workers on two machines can never hold the same
//! coin. A withdrawal gives its coins back by signal once failed, cancelled or settled.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

use bitcoin::OutPoint;
use serde::{Deserialize, Serialize};
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ContinueAsNewOptions, SyncWorkflowContext, WorkflowContext, WorkflowContextView, WorkflowResult,
};

use crate::saga::Coin;

/// Events after which the workflow continues as new (its state carried), well below the
/// server's limits.
const HISTORY_LIMIT: u32 = 5_000;

/// What the workflow starts (or continues) with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HotWalletStart {
    /// Coins held, by the request id holding them.
    pub held: BTreeMap<String, Vec<Coin>>,
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
        HotWalletWorkflow { held: start.held }
    }

    /// Lives for ever, continuing as new (with its reservations) when its history grows.
    #[run(name = "hot_wallet")]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        let view = ctx.clone();
        ctx.wait_condition(move |_: &Self| {
            view.continue_as_new_suggested() || view.history_length() > HISTORY_LIMIT
        })
        .await?;
        let view = ctx.clone();
        ctx.wait_condition(move |_: &Self| view.all_handlers_finished())
            .await?;
        let held = ctx.state(|s| s.held.clone());
        ctx.continue_as_new(HotWalletStart { held }, ContinueAsNewOptions::default())?;
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

    /// The withdrawal `request_id` no longer needs its coins.
    #[signal(name = "release")]
    pub fn release(&mut self, _ctx: &mut SyncWorkflowContext<Self>, request_id: String) {
        self.held.remove(&request_id);
    }

    /// Every coin held, by request id.
    #[query(name = "held")]
    pub fn held(&self, _ctx: &WorkflowContextView) -> BTreeMap<String, Vec<Coin>> {
        self.held.clone()
    }
}
