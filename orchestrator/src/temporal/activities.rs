//! The withdrawal workflow's side effects, run by whichever worker of the task queue picks
//! them up (keys stay on the workers that hold the key file): choose and reserve coins,
//! sign the first version or a replacement, send it, and look at the chain. Each returns
//! its final answers as values for the workflow to record; a passing failure (indexer or
//! bitcoind away) is an error Temporal retries. Every activity may run twice (a worker
//! killed after the effect, before the answer reached the server), so each is safe to
//! repeat: a reservation is keyed by request id, a signature is deterministic (RFC 6979),
//! and sending the same bytes again is harmless.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bitcoin::{OutPoint, Txid};
use serde::{Deserialize, Serialize};
use temporalio_client::{
    Client, WorkflowIdConflictPolicy, WorkflowQueryOptions, WorkflowUpdateWithStartOptions,
};
use temporalio_macros::activities;
use temporalio_sdk::activities::{ActivityContext, ActivityError};
use temporalio_sdk::ApplicationFailure;

use super::balancing::{BalancingState, Decide};
use super::batching::{Batched, ClaimAsk, JoinersAsk, Joining, LeaveAsk, Queued};
use super::hot_wallet::{HotWalletStart, HotWalletWorkflow, ReserveAsk, ReserveReply};
use super::service::{start_withdrawal, start_workflow};
use super::withdrawal::WithdrawalWorkflow;
use crate::balancing::{Balancing, Kind, MayStart};
use crate::indexer_client::{self, Indexer};
use crate::payment::{Built, Payments, StepError};
use crate::saga::{Attempt, Coin, Pending, Priority, Step, Withdrawal};
use proto::indexer::v1 as ipb;

/// Rounds of choosing again (after coins were taken by a concurrent withdrawal, or while
/// this worker's other asks are answered), before the activity fails and is retried by
/// Temporal.
const RESERVE_ROUNDS: usize = 500;

/// Longest wait for a workflow to answer a query or an update: an activity never hangs
/// on one (a workflow no worker runs now, e.g. while workers shut down), it fails and
/// Temporal retries it.
const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `call`'s answer, or a retryable failure naming `what` when none came in time.
async fn bounded<T>(
    what: impl std::fmt::Display,
    call: impl std::future::Future<Output = Result<T, ActivityError>>,
) -> Result<T, ActivityError> {
    tokio::time::timeout(QUERY_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(retry(format!("{what}: no answer within {QUERY_TIMEOUT:?}"))))
}

/// What reserving gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reservation {
    /// These coins are held for the withdrawal.
    Reserved(Vec<Coin>),
    /// It cannot be paid (insufficient funds, fee cap, unknown wallet...): final.
    Refused(String),
}

/// What signing gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Signing {
    /// A signed version.
    Signed(Attempt),
    /// A version built as a PSBT for the external signers (the hot keys sign last).
    Pending(Pending),
    /// None can be made (final for a first version; for a replacement: not now).
    Refused(String),
}

/// What sending gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Sending {
    /// bitcoind accepted it (or had it) at this indexer tip.
    Accepted {
        /// The tip then.
        height: u32,
    },
    /// Refused because a version is already in a block (sent before): it was sent.
    InBlock {
        /// The tip then.
        height: u32,
    },
    /// Its inputs are spent and the index does not show by what yet: wait, then again.
    WaitForIndex(String),
    /// bitcoind refused it for good. `repeated`: this activity had run before (a worker
    /// died mid-send), so an earlier send may have gone through.
    Refused {
        /// bitcoind's answer.
        reason: String,
        /// Whether an earlier attempt of this activity may have sent it.
        repeated: bool,
    },
}

/// The chain as the indexer shows it, for one withdrawal's versions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The indexed tip.
    pub tip: u32,
    /// The newest version in a block, with that block's height.
    pub confirmed: Option<(Txid, u32)>,
}

/// What the activities work with.
pub struct Activities {
    payments: Payments,
    indexer: Indexer,
    client: Client,
    /// The task queue the hot wallets' workflows run on (this worker's).
    task_queue: String,
    /// Coins this worker has asked a wallet's workflow for and not heard back about:
    /// its concurrent reservations choose around them instead of all choosing the same
    /// coins (across workers the wallet's workflow still decides), and their asks reach
    /// the workflow together.
    asking: std::sync::Mutex<HashMap<String, BTreeSet<OutPoint>>>,
}

fn retry(e: impl std::fmt::Display) -> ActivityError {
    ActivityError::application(ApplicationFailure::new(e.to_string()))
}

impl Activities {
    /// Activities paying with `payments`, reading the chain from `indexer`, and reaching
    /// the hot wallets' workflows through `client` on `task_queue`.
    pub fn new(
        payments: Payments,
        indexer: Indexer,
        client: Client,
        task_queue: String,
    ) -> Activities {
        Activities {
            payments,
            indexer,
            client,
            task_queue,
            asking: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Chooses coins for `w` among `listed` that nobody holds (`held`) and no other
    /// reservation of this worker is asking for, and marks them as asked for. `Err(None)`:
    /// none now, but others' asks are pending (some may come back refused): try again.
    fn choose_around(
        &self,
        w: &Withdrawal,
        listed: &[crate::select::Candidate],
        held: &BTreeSet<OutPoint>,
        rate: f64,
    ) -> Result<Vec<Coin>, Option<String>> {
        let mut asking = self.asking.lock().unwrap_or_else(|p| p.into_inner());
        let mine = asking.entry(w.request.wallet.clone()).or_default();
        let free: Vec<_> = listed
            .iter()
            .filter(|c| !held.contains(&c.outpoint) && !mine.contains(&c.outpoint))
            .cloned()
            .collect();
        let coins = match self.payments.of(w).choose(w, &free, rate) {
            Ok(coins) => coins,
            Err(_) if !mine.is_empty() => return Err(None),
            Err(why) => return Err(Some(why)),
        };
        mine.extend(coins.iter().map(|c| c.outpoint));
        Ok(coins)
    }

    /// The answer about `coins` came back: others may choose them again.
    fn answered(&self, wallet: &str, coins: &[Coin]) {
        let mut asking = self.asking.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mine) = asking.get_mut(wallet) {
            for c in coins {
                mine.remove(&c.outpoint);
            }
        }
    }

    /// What the wallet's workflow holds now, by request id (nothing when it was never
    /// started).
    async fn held_by(&self, wallet: &str) -> Result<BTreeMap<String, Vec<Coin>>, ActivityError> {
        let handle = self
            .client
            .get_workflow_handle::<HotWalletWorkflow>(super::hot_wallet_workflow_id(wallet));
        let asked = handle.query(HotWalletWorkflow::held, (), WorkflowQueryOptions::default());
        match tokio::time::timeout(QUERY_TIMEOUT, asked).await {
            Ok(Ok(held)) => Ok(held),
            Ok(Err(temporalio_client::errors::WorkflowQueryError::NotFound(_))) => {
                Ok(BTreeMap::new())
            }
            Ok(Err(e)) => Err(retry(format!(
                "reading wallet {wallet}'s reservations: {e}"
            ))),
            Err(_) => Err(retry(format!(
                "reading wallet {wallet}'s reservations: no answer within {QUERY_TIMEOUT:?}"
            ))),
        }
    }

    /// Run `request_id`'s withdrawal as its workflow shows it (`None`: never started).
    async fn run_status(&self, request_id: &str) -> Result<Option<Withdrawal>, ActivityError> {
        let handle = self
            .client
            .get_workflow_handle::<WithdrawalWorkflow>(request_id.to_owned());
        let asked = handle.query(
            WithdrawalWorkflow::status,
            (),
            WorkflowQueryOptions::default(),
        );
        match tokio::time::timeout(QUERY_TIMEOUT, asked).await {
            Ok(Ok(w)) => Ok(Some(w)),
            Ok(Err(temporalio_client::errors::WorkflowQueryError::NotFound(_))) => Ok(None),
            Ok(Err(e)) => Err(retry(format!("reading run {request_id}: {e}"))),
            Err(_) => Err(retry(format!(
                "reading run {request_id}: no answer within {QUERY_TIMEOUT:?}"
            ))),
        }
    }

    /// What the withdrawals of `wallet` waiting for coins (RECEIVED, as the search index
    /// shows them: one submitted a moment ago may not be there yet) will need. One that
    /// cannot be read now is left out (logged) rather than hold up every decision; the
    /// activity heartbeats as it reads them.
    async fn owed(
        &self,
        ctx: &ActivityContext,
        wallet: &str,
    ) -> Result<bitcoin::Amount, ActivityError> {
        use futures::StreamExt;
        let query = format!(
            "WorkflowType = 'withdrawal' AND ExecutionStatus = 'Running' \
             AND WithdrawalState = 'RECEIVED' AND WithdrawalWallet = '{wallet}'"
        );
        let mut waiting = self
            .client
            .list_workflows(query, temporalio_client::WorkflowListOptions::default());
        let mut owed = bitcoin::Amount::ZERO;
        let mut read = 0u64;
        while let Some(found) = waiting.next().await {
            let found = found.map_err(|e| retry(format!("listing withdrawals: {e}")))?;
            read += 1;
            ctx.record_heartbeat(read).await?;
            match self.run_status(found.id()).await {
                // A batch in RECEIVED owes what its members (RECEIVED too) owe.
                Ok(Some(w)) if w.state == crate::saga::State::Received && !w.is_batch() => {
                    owed += w.request.amount + w.request.max_fee;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(run = found.id(), error = ?e, "a waiting withdrawal could not be read: left out of this decision")
                }
            }
        }
        Ok(owed)
    }

    /// A top-up when the hot wallet (`spendable`: its coins no withdrawal holds, less what
    /// waiting withdrawals need), counting the change its unfinished payments will bring
    /// back, is below the low-water mark and the cold wallet can cover it.
    async fn top_up(
        &self,
        ctx: &ActivityContext,
        balancing: &Balancing,
        spendable: bitcoin::Amount,
        height: u32,
    ) -> Result<Option<crate::saga::Request>, ActivityError> {
        let below = balancing.top_up.map_or(bitcoin::Amount::ZERO, |m| m.below);
        if spendable >= below {
            return Ok(None);
        }
        // Read only when it may be needed: one query per payment holding hot coins.
        let mut coming_back = bitcoin::Amount::ZERO;
        for request_id in self.held_by(&balancing.hot_wallet).await?.keys() {
            ctx.record_heartbeat(request_id.clone()).await?;
            if let Some(w) = self.run_status(request_id).await? {
                coming_back += self.payments.coming_back(&w);
            }
        }
        let hot_address = self.payments.change_address().unwrap_or_default();
        let Some(request) = balancing.top_up(spendable + coming_back, height, &hot_address) else {
            return Ok(None);
        };
        let cold_wallet = &balancing.cold_wallet;
        let held = self.held(cold_wallet).await?;
        let mut indexer = self.indexer.clone();
        let cold: bitcoin::Amount = self
            .payments
            .for_wallet(cold_wallet)
            .spendable(&mut indexer, cold_wallet)
            .await
            .map_err(retry)?
            .iter()
            .filter(|c| !held.contains(&c.outpoint))
            .map(|c| c.value)
            .sum();
        if cold <= request.amount {
            tracing::warn!(%spendable, %coming_back, %cold, wanted = %request.amount, "the hot wallet is below its low-water mark and the cold wallet cannot top it up");
            return Ok(None);
        }
        Ok(Some(request))
    }

    /// What a balancing workflow knew, rebuilt from the withdrawal workflows (the search
    /// index, then each run's own state): the unfinished run of each kind, and the sweeps
    /// that got as far as signing (each used a cold address). Sweeps past the namespace's
    /// retention are no longer counted: their addresses may be used again (harmless).
    async fn recovered(
        &self,
        ctx: &ActivityContext,
        balancing: &Balancing,
    ) -> Result<BalancingState, ActivityError> {
        use futures::StreamExt;
        let mut state = BalancingState::default();
        for wallet in [&balancing.hot_wallet, &balancing.cold_wallet] {
            let query = format!("WorkflowType = 'withdrawal' AND WithdrawalWallet = '{wallet}'");
            let mut found = self
                .client
                .list_workflows(query, temporalio_client::WorkflowListOptions::default());
            while let Some(run) = found.next().await {
                let run = run.map_err(|e| retry(format!("listing withdrawals: {e}")))?;
                let Some(kind) = Kind::ALL
                    .into_iter()
                    .find(|k| run.id().starts_with(k.prefix()))
                else {
                    continue;
                };
                ctx.record_heartbeat(run.id().to_owned()).await?;
                let Some(w) = self.run_status(run.id()).await? else {
                    continue;
                };
                // As when it started one: counted while it runs (given back if it ends
                // before signing), and once it signed.
                let unfinished = w.next_step() != Step::Rest;
                let signed = !w.attempts.is_empty() || w.pending.is_some();
                if kind == Kind::Sweep && (unfinished || signed) {
                    state.sweeps += 1;
                }
                if unfinished {
                    state
                        .running
                        .insert(kind.prefix().into(), w.request.request_id.clone());
                }
            }
        }
        if state != BalancingState::default() {
            tracing::info!(running = ?state.running, sweeps = state.sweeps, "balancing recovered from the withdrawal workflows");
        }
        Ok(state)
    }

    /// Every coin the wallet's workflow holds now.
    async fn held(&self, wallet: &str) -> Result<BTreeSet<OutPoint>, ActivityError> {
        let held = self.held_by(wallet).await?;
        Ok(held.values().flatten().map(|c| c.outpoint).collect())
    }

    /// Asks each of `ask.members` to join the batch: the workflow ids of those that did
    /// (an ended or refusing one did not).
    async fn claimed(&self, ask: &ClaimAsk) -> Result<Vec<String>, ActivityError> {
        use temporalio_client::errors::WorkflowUpdateError;
        let joining = Joining {
            batch_workflow: ask.batch_workflow.clone(),
            batch_id: ask.batch_id,
        };
        let asks = ask.members.iter().map(|member| {
            let handle = self
                .client
                .get_workflow_handle::<WithdrawalWorkflow>(member.clone());
            let joining = joining.clone();
            async move {
                handle
                    .execute_update(
                        WithdrawalWorkflow::join,
                        joining,
                        temporalio_client::WorkflowExecuteUpdateOptions::default(),
                    )
                    .await
            }
        });
        let answers = bounded("asking members to join", async {
            Ok(futures::future::join_all(asks).await)
        })
        .await?;
        let mut joined = Vec::new();
        for (member, answer) in ask.members.iter().zip(answers) {
            match answer {
                Ok(true) => joined.push(member.clone()),
                Ok(false) | Err(WorkflowUpdateError::NotFound(_)) => {}
                Err(e) => return Err(retry(format!("asking {member} to join: {e}"))),
            }
        }
        Ok(joined)
    }

    /// Options reaching the wallet's workflow, started if it is not running.
    fn on_wallet(&self, wallet: &str) -> WorkflowUpdateWithStartOptions {
        WorkflowUpdateWithStartOptions::new(
            self.task_queue.clone(),
            super::hot_wallet_workflow_id(wallet),
            WorkflowIdConflictPolicy::UseExisting,
        )
        .build()
    }

    /// Asks the wallet's workflow (started if it is not running) for `coins`.
    async fn ask(
        &self,
        wallet: &str,
        request_id: &str,
        coins: Vec<Coin>,
    ) -> Result<ReserveReply, ActivityError> {
        let options = self.on_wallet(wallet);
        let asked = self.client.execute_update_with_start_workflow(
            HotWalletWorkflow::run,
            HotWalletStart::default(),
            HotWalletWorkflow::reserve,
            ReserveAsk {
                request_id: request_id.to_owned(),
                coins,
            },
            options,
        );
        bounded(format!("reserving in wallet {wallet}"), async {
            asked
                .await
                .map_err(|e| retry(format!("reserving in wallet {wallet}: {e}")))
        })
        .await
    }
}

#[activities]
impl Activities {
    /// Chooses coins for the withdrawal and has its wallet's workflow grant them.
    #[activity(name = "withdrawal.reserve")]
    pub async fn reserve(
        self: Arc<Self>,
        ctx: ActivityContext,
        w: Withdrawal,
    ) -> Result<Reservation, ActivityError> {
        if self.payments.outputs(&w).is_none() {
            return Ok(Reservation::Refused("invalid destination".into()));
        }
        let wallet = w.request.wallet.clone();
        // Only top-ups spend the cold wallet.
        if self.payments.is_cold(&wallet) && crate::balancing::kind(&w) != Some(Kind::TopUp) {
            return Ok(Reservation::Refused(format!(
                "wallet {wallet} is the cold wallet: only top-ups signed offline spend it"
            )));
        }
        // Granted to an earlier run of this activity (its worker died before answering):
        // those coins, not others; asked first, before any estimate or listing.
        let held_by = self.held_by(&wallet).await?;
        if let Some(coins) = held_by.get(&w.request.request_id) {
            return Ok(Reservation::Reserved(coins.clone()));
        }
        let rate = self
            .payments
            .fee_rate(w.request.fee_rate)
            .await
            .map_err(retry)?
            .rate;
        let mut indexer = self.indexer.clone();
        let listed = match self
            .payments
            .for_wallet(&wallet)
            .spendable(&mut indexer, &wallet)
            .await
        {
            Ok(listed) => listed,
            Err(StepError::Indexer(s)) if s.code() == tonic::Code::NotFound => {
                return Ok(Reservation::Refused(format!(
                    "wallet {wallet} is not one the indexer watches"
                )))
            }
            Err(e) => return Err(retry(e)),
        };
        let mut held: BTreeSet<OutPoint> = held_by.values().flatten().map(|c| c.outpoint).collect();
        for _ in 0..RESERVE_ROUNDS {
            ctx.record_heartbeat(held.len()).await?;
            let coins = match self.choose_around(&w, &listed, &held, rate) {
                Ok(coins) => coins,
                Err(Some(why)) => return Ok(Reservation::Refused(why)),
                Err(None) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    held = self.held(&wallet).await?;
                    continue;
                }
            };
            let reply = self
                .ask(&wallet, &w.request.request_id, coins.clone())
                .await;
            self.answered(&wallet, &coins);
            match reply? {
                ReserveReply::Granted(coins) => return Ok(Reservation::Reserved(coins)),
                ReserveReply::Taken(now) => held = now,
            }
        }
        Err(retry(format!(
            "coins of wallet {wallet} kept being taken by concurrent withdrawals"
        )))
    }

    /// Signs the first version of the payment over the reserved coins.
    #[activity(name = "withdrawal.sign")]
    pub async fn sign(
        self: Arc<Self>,
        _ctx: ActivityContext,
        w: Withdrawal,
    ) -> Result<Signing, ActivityError> {
        Ok(
            match self
                .payments
                .of(&w)
                .first_version(&w)
                .await
                .map_err(retry)?
            {
                Ok(Built::Signed(attempt)) => Signing::Signed(attempt),
                Ok(Built::Unsigned(pending)) => Signing::Pending(pending),
                Err(why) => Signing::Refused(why),
            },
        )
    }

    /// Signs a replacement of a payment stuck unconfirmed, at a higher rate.
    #[activity(name = "withdrawal.replace")]
    pub async fn replace(
        self: Arc<Self>,
        _ctx: ActivityContext,
        w: Withdrawal,
    ) -> Result<Signing, ActivityError> {
        Ok(match self.payments.of(&w).replacement(&w).map_err(retry)? {
            Ok(Built::Signed(attempt)) => Signing::Signed(attempt),
            Ok(Built::Unsigned(pending)) => Signing::Pending(pending),
            Err(why) => Signing::Refused(why),
        })
    }

    /// The version waiting for external signatures, signed: by the hot keys once the
    /// signatures gathered are enough, or by the signers themselves when they completed
    /// it and bitcoind has it (in a block the index recorded, or in its mempool).
    /// `None`: it still waits.
    #[activity(name = "withdrawal.complete")]
    pub async fn complete(
        self: Arc<Self>,
        _ctx: ActivityContext,
        w: Withdrawal,
    ) -> Result<Option<Attempt>, ActivityError> {
        let Some(pending) = &w.pending else {
            return Ok(None);
        };
        if let Some(attempt) = self.payments.of(&w).complete(pending).map_err(retry)? {
            return Ok(Some(attempt));
        }
        // The indexer away: bitcoind's mempool only, this time (this activity must not
        // hold the run back from a version its update completed meanwhile).
        let mut indexer = self.indexer.clone();
        let height = match indexer_client::confirmed_height(&mut indexer, &pending.txid).await {
            Ok(height) => height,
            Err(e) => {
                tracing::warn!(id = w.id, error = %e, "the indexer is away: looking in the mempool only");
                None
            }
        };
        let sent = self
            .payments
            .completed_elsewhere(pending, height)
            .await
            .map_err(retry)?;
        if let Some(attempt) = &sent {
            tracing::warn!(id = w.id, txid = %attempt.txid, "the external signers completed and sent the transaction themselves: following it");
        }
        Ok(sent)
    }

    /// Puts the withdrawal in its wallet's payout queue.
    #[activity(name = "withdrawal.queue")]
    pub async fn queue(
        self: Arc<Self>,
        _ctx: ActivityContext,
        q: Queued,
    ) -> Result<(), ActivityError> {
        let wallet = q.withdrawal.request.wallet.clone();
        let asked = self.client.execute_update_with_start_workflow(
            HotWalletWorkflow::run,
            HotWalletStart::default(),
            HotWalletWorkflow::queue,
            q,
            self.on_wallet(&wallet),
        );
        bounded(format!("queueing in wallet {wallet}"), async {
            asked
                .await
                .map_err(|e| retry(format!("queueing in wallet {wallet}: {e}")))
        })
        .await
    }

    /// Starts the batch paying `members` (due in their wallet's queue): its workflow id
    /// follows from the first, so a repeated start finds the same batch.
    #[activity(name = "withdrawal.start_batch")]
    pub async fn start_batch(
        self: Arc<Self>,
        _ctx: ActivityContext,
        members: Vec<Queued>,
    ) -> Result<(), ActivityError> {
        let Some(first) = members.first() else {
            return Ok(());
        };
        let workflow = super::batch_workflow_id(first.workflow());
        let id = super::withdrawal_id(&workflow);
        let withdrawals: Vec<Withdrawal> = members.iter().map(|q| q.withdrawal.clone()).collect();
        let mut batch = Withdrawal::new_batch(id, &withdrawals, crate::saga::now_ms());
        batch.request.request_id = workflow.clone();
        let batched = Batched {
            members: members
                .iter()
                .map(|q| (q.withdrawal.id, q.workflow().to_owned()))
                .collect(),
            ..Batched::default()
        };
        tracing::info!(batch = id, members = ?batched.members.keys().collect::<Vec<_>>(), "withdrawals batched");
        start_workflow(
            &self.client,
            &self.task_queue,
            &first.policy,
            batch,
            batched,
        )
        .await
        .map_err(retry)
    }

    /// Asks each proposed member to join the batch: the workflow ids of those that did.
    #[activity(name = "withdrawal.claim")]
    pub async fn claim(
        self: Arc<Self>,
        _ctx: ActivityContext,
        ask: ClaimAsk,
    ) -> Result<Vec<String>, ActivityError> {
        self.claimed(&ask).await
    }

    /// Takes withdrawals waiting in the batch's queue that may join its replacement and
    /// claims them: those that joined.
    #[activity(name = "withdrawal.joiners")]
    pub async fn joiners(
        self: Arc<Self>,
        _ctx: ActivityContext,
        ask: JoinersAsk,
    ) -> Result<Vec<Queued>, ActivityError> {
        let wallet = ask.wallet.clone();
        let asked = self.client.execute_update_with_start_workflow(
            HotWalletWorkflow::run,
            HotWalletStart::default(),
            HotWalletWorkflow::joiners,
            ask.clone(),
            self.on_wallet(&wallet),
        );
        let taken = bounded(format!("taking joiners from wallet {wallet}"), async {
            asked
                .await
                .map_err(|e| retry(format!("taking joiners from wallet {wallet}: {e}")))
        })
        .await?;
        if taken.is_empty() {
            return Ok(taken);
        }
        let claim = ClaimAsk {
            batch_workflow: ask.batch_workflow,
            batch_id: ask.batch_id,
            members: taken.iter().map(|q| q.workflow().to_owned()).collect(),
        };
        let joined = self.claimed(&claim).await?;
        Ok(taken
            .into_iter()
            .filter(|q| joined.iter().any(|j| j == q.workflow()))
            .collect())
    }

    /// Asks the member's batch to let it leave: the batch as it is then, or why it
    /// refused (it may have left).
    #[activity(name = "withdrawal.leave")]
    pub async fn leave(
        self: Arc<Self>,
        _ctx: ActivityContext,
        ask: LeaveAsk,
    ) -> Result<Result<Withdrawal, String>, ActivityError> {
        use temporalio_client::errors::WorkflowUpdateError;
        let handle = self
            .client
            .get_workflow_handle::<WithdrawalWorkflow>(ask.batch_workflow.clone());
        let asked = handle.execute_update(
            WithdrawalWorkflow::leave,
            ask.member,
            temporalio_client::WorkflowExecuteUpdateOptions::default(),
        );
        let Ok(answer) = tokio::time::timeout(QUERY_TIMEOUT, asked).await else {
            return Err(retry(format!(
                "asking batch {} to let it leave: no answer within {QUERY_TIMEOUT:?}",
                ask.batch_workflow
            )));
        };
        match answer {
            Ok(batch) => Ok(Ok(batch)),
            Err(WorkflowUpdateError::Failed(failure)) => Ok(Err(failure.message.clone())),
            Err(WorkflowUpdateError::NotFound(_)) => {
                Ok(Err(format!("its batch {} has ended", ask.batch_workflow)))
            }
            Err(e) => Err(retry(format!(
                "asking batch {} to let it leave: {e}",
                ask.batch_workflow
            ))),
        }
    }

    /// Sends the current version to bitcoind.
    #[activity(name = "withdrawal.broadcast")]
    pub async fn broadcast(
        self: Arc<Self>,
        ctx: ActivityContext,
        w: Withdrawal,
    ) -> Result<Sending, ActivityError> {
        let Some(attempt) = w.current() else {
            return Err(ApplicationFailure::non_retryable("nothing signed to send").into());
        };
        let mut indexer = self.indexer.clone();
        let sent = self.payments.send(attempt).await.map_err(retry)?;
        let tip = |mut indexer: Indexer| async move {
            indexer
                .get_tip(ipb::GetTipRequest {})
                .await
                .map(|t| t.into_inner().height)
                .map_err(retry)
        };
        match sent {
            Ok(_) => Ok(Sending::Accepted {
                height: tip(indexer).await?,
            }),
            Err(e) if e.is_transient() => Err(retry(e)),
            Err(e) => {
                for a in w.attempts.iter().rev() {
                    if indexer_client::confirmed_height(&mut indexer, &a.txid)
                        .await
                        .map_err(retry)?
                        .is_some()
                    {
                        return Ok(Sending::InBlock {
                            height: tip(indexer).await?,
                        });
                    }
                }
                if e.to_string().contains("missingorspent") {
                    return Ok(Sending::WaitForIndex(e.to_string()));
                }
                Ok(Sending::Refused {
                    reason: e.to_string(),
                    repeated: ctx.info().attempt > 1,
                })
            }
        }
    }

    /// The tip and the newest of `txids` in a block, from the indexer.
    #[activity(name = "withdrawal.observe")]
    pub async fn observe(
        self: Arc<Self>,
        _ctx: ActivityContext,
        txids: Vec<Txid>,
    ) -> Result<Observed, ActivityError> {
        let mut indexer = self.indexer.clone();
        let tip = indexer
            .get_tip(ipb::GetTipRequest {})
            .await
            .map_err(retry)?
            .into_inner()
            .height;
        for txid in txids.iter().rev() {
            if let Some(height) = indexer_client::confirmed_height(&mut indexer, txid)
                .await
                .map_err(retry)?
            {
                return Ok(Observed {
                    tip: tip.max(height),
                    confirmed: Some((*txid, height)),
                });
            }
        }
        Ok(Observed {
            tip,
            confirmed: None,
        })
    }

    /// Decides the balancing runs at tip `ask.height` (see [`crate::balancing`]): runs that
    /// ended are forgotten; a sweep when the hot wallet's coins that no withdrawal holds
    /// exceed the mark, a top-up below the low-water mark, a consolidation while fees are
    /// low; each started as a withdrawal workflow. Safe to repeat: a run already started
    /// at this height (by an earlier attempt whose worker died) is found by its request id,
    /// not started again. A workflow that knows nothing yet (its first decision, or one
    /// started again after an operator ended it) first recovers the unfinished runs and
    /// the sweeps made from the workflows themselves.
    #[activity(name = "balancing.decide")]
    pub async fn decide(
        self: Arc<Self>,
        ctx: ActivityContext,
        ask: Decide,
    ) -> Result<BalancingState, ActivityError> {
        let mut state = ask.state;
        let Some(balancing) = self.payments.policy().balancing.clone() else {
            state.decided_at = Some(ask.height);
            return Ok(state);
        };
        if state.decided_at.is_none() && state.running.is_empty() && state.sweeps == 0 {
            state = self.recovered(&ctx, &balancing).await?;
        }
        state.decided_at = Some(ask.height);
        // The unfinished runs: each one's kind and whether it holds its coins yet.
        let mut runs = Vec::new();
        let mut running = BTreeMap::new();
        for (prefix, request_id) in std::mem::take(&mut state.running) {
            match self.run_status(&request_id).await? {
                Some(w) if w.next_step() != Step::Rest => {
                    runs.extend(crate::balancing::kind(&w).map(|k| (k, w.holds_coins())));
                    running.insert(prefix, request_id);
                }
                // A sweep that ended before signing used no cold address.
                Some(w) if crate::balancing::is_sweep(&w) && w.attempts.is_empty() => {
                    state.sweeps = state.sweeps.saturating_sub(1);
                }
                _ => {}
            }
        }
        state.running = running;
        // Started by an earlier attempt at this height.
        for kind in Kind::ALL {
            let id = kind.request_id(ask.height);
            if state.running.contains_key(kind.prefix()) {
                continue;
            }
            if let Some(w) = self.run_status(&id).await? {
                if kind == Kind::Sweep {
                    state.sweeps += 1;
                }
                runs.push((kind, w.holds_coins()));
                state.running.insert(kind.prefix().into(), id);
            }
        }
        let held = self.held(&balancing.hot_wallet).await?;
        let mut indexer = self.indexer.clone();
        let hot: Vec<_> = self
            .payments
            .spendable(&mut indexer, &balancing.hot_wallet)
            .await
            .map_err(retry)?
            .into_iter()
            .filter(|c| !held.contains(&c.outpoint))
            .collect();
        let spendable: bitcoin::Amount = hot.iter().map(|c| c.value).sum();
        let owed = self.owed(&ctx, &balancing.hot_wallet).await?;
        let spendable = spendable.checked_sub(owed).unwrap_or_default();
        let hot_address = self.payments.change_address().unwrap_or_default();
        let may = MayStart::given(&runs, false);
        let mut starts = Vec::new();
        if may.sweep {
            let index = state.sweeps + 1;
            starts.extend(
                balancing
                    .sweep(spendable, ask.height, index, self.payments.network())
                    .map(|r| (Kind::Sweep, r)),
            );
        }
        if balancing.top_up.is_some() && may.top_up {
            // Its own failure (the cold wallet not watched) holds up no other kind.
            match self.top_up(&ctx, &balancing, spendable, ask.height).await {
                Ok(request) => starts.extend(request.map(|r| (Kind::TopUp, r))),
                Err(e) => tracing::warn!(error = ?e, "no top-up decided at this block"),
            }
        }
        let swept_now = starts.iter().any(|(k, _)| *k == Kind::Sweep);
        if let Some(policy) = balancing.consolidate {
            let weight = self.payments.input_weight();
            if MayStart::given(&runs, swept_now).consolidation
                && policy.small(&hot, 0.0, weight).len() >= policy.min_coins
            {
                let target = self.payments.policy().target_of(Priority::Low);
                let estimate = self.payments.estimate(target).await.map_err(retry)?;
                starts.extend(
                    balancing
                        .consolidation(&hot, estimate, weight, ask.height, &hot_address)
                        .map(|r| (Kind::Consolidation, r)),
                );
            }
        }
        for (kind, request) in starts {
            let policy = super::WorkflowPolicy::of(self.payments.policy());
            start_withdrawal(&self.client, &self.task_queue, &policy, &request)
                .await
                .map_err(retry)?;
            tracing::info!(run = %request.request_id, amount = %request.amount, to = %request.destination, "balancing run started");
            if kind == Kind::Sweep {
                state.sweeps += 1;
            }
            state
                .running
                .insert(kind.prefix().into(), request.request_id);
        }
        Ok(state)
    }
}
