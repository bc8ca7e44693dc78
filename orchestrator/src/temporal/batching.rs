//! Payout queues on Temporal (`batch_window_secs`): the same batches as the embedded
//! engine's, each member keeping its own workflow, id, state and txids.
//!
//! - A withdrawal that may be batched asks its wallet's workflow to queue it (the
//!   `withdrawal.queue` activity) and waits. The wallet's workflow pays a queue of one
//!   fee policy once it is full or its oldest waited the window out: a lone withdrawal is
//!   told to go on alone (`alone` signal), two or more are proposed to a new batch, a
//!   withdrawal workflow holding `Withdrawal::new_batch` started by the
//!   `withdrawal.start_batch` activity.
//! - The batch first claims its members: each is asked by its `join` update, which its
//!   own workflow answers one at a time with its cancel, so a withdrawal joins only while
//!   it is unpaid and not cancelled, and never two batches. Those that did not join leave
//!   the batch's members before it reserves.
//! - The batch runs the saga; after each of its changes it signals every member
//!   (`mirror`), who shows it as the embedded engine shows a member
//!   (`Withdrawal::mirrored`); one sent back by a settled earlier version pays alone.
//! - A member's cancel asks its batch to let it leave (the batch's `leave` update, which
//!   the saga refuses once the batch may have left); a signed version paying a member
//!   that left meanwhile is never recorded, it is signed again without it.
//! - A stuck batch's replacement takes joiners from the queue (claimed the same way),
//!   paid from its change (`Outcome::Grown`); joiners it cannot pay are told to go on
//!   alone.

// The SDK's macros add an undocumented public marker constant for each workflow method
// and activity (named after the method, whose doc says what it is): missing_docs cannot
// be met for those, so it is allowed in this file; every item written here has its doc.
#![allow(missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use temporalio_sdk::{SignalWorkflowOptions, WorkflowContext, WorkflowResult};

use super::activities::{Activities, Signing};
use super::hot_wallet::HotWalletWorkflow;
use super::withdrawal::{millis, record, short, WithdrawalWorkflow};
use super::WorkflowPolicy;
use crate::saga::{FeeRate, Outcome, State, Withdrawal};

/// How a refused `cancel` of a batch member begins: the API then asks the member's
/// `cancel_member` update, which asks its batch.
pub const IN_A_BATCH: &str = "paid by a batch: its batch decides whether it may leave";

/// How long a queued withdrawal waits past its window before asking to be queued again
/// (its wallet's workflow lost its queue, e.g. ended by an operator).
const QUEUE_AGAIN_AFTER: Duration = Duration::from_secs(300);

/// A withdrawal waiting in its wallet's payout queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    /// The withdrawal as it asked (RECEIVED).
    pub withdrawal: Withdrawal,
    /// The policy it was submitted under (its batching: window and most outputs).
    pub policy: WorkflowPolicy,
}

impl Queued {
    /// Its workflow id (its request id).
    pub fn workflow(&self) -> &str {
        &self.withdrawal.request.request_id
    }
}

/// A stuck batch asking its wallet's queue for withdrawals that may join its replacement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JoinersAsk {
    /// The batch's workflow id.
    pub batch_workflow: String,
    /// The batch's id.
    pub batch_id: u64,
    /// Its wallet.
    pub wallet: String,
    /// Its fee policy: only withdrawals of the same one join.
    pub fee_rate: FeeRate,
    /// Most that may join.
    pub room: usize,
    /// The ask's key (batch and version): a repeated ask gets the same withdrawals.
    pub key: String,
}

/// A batch claiming withdrawals as its members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimAsk {
    /// The batch's workflow id.
    pub batch_workflow: String,
    /// The batch's id.
    pub batch_id: u64,
    /// The withdrawals' workflow ids.
    pub members: Vec<String>,
}

/// What a withdrawal is asked to join.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Joining {
    /// The batch's workflow id.
    pub batch_workflow: String,
    /// The batch's id.
    pub batch_id: u64,
}

/// A member asking its batch to let it leave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaveAsk {
    /// The batch's workflow id.
    pub batch_workflow: String,
    /// The member's id.
    pub member: u64,
}

/// A batch's change, as it tells one member.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mirror {
    /// The batch's change number (members ignore one older than they saw).
    pub change: u64,
    /// The batch after it, as the member needs it.
    pub batch: Withdrawal,
}

impl Mirror {
    /// Change `change` of `batch` for member `member`: without the transactions' bytes,
    /// the PSBT, the coins and the other members (a member shows only its own output and
    /// the versions' ids and fees), so a batch's history grows by a small signal per
    /// member and change, not by the batch each time.
    pub fn of(change: u64, batch: &Withdrawal, member: u64) -> Mirror {
        let mut shown = batch.clone();
        for attempt in &mut shown.attempts {
            attempt.raw = Vec::new();
        }
        shown.pending = None;
        shown.coins = Vec::new();
        if let Some(members) = &mut shown.members {
            members.retain(|m| m.id == member);
        }
        Mirror {
            change,
            batch: shown,
        }
    }
}

/// What a withdrawal workflow knows of batching, as a member or as a batch (carried on
/// continue-as-new).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batched {
    /// As a member: it asked its wallet's queue to hold it.
    #[serde(default)]
    pub queued: bool,
    /// As a member: it is paid alone (told so by its queue or by a batch it could not
    /// join after all).
    #[serde(default)]
    pub alone: bool,
    /// As a member: its batch's workflow id.
    #[serde(default)]
    pub batch_workflow: Option<String>,
    /// As a member: its batch listed it (a joiner is claimed before it is listed).
    #[serde(default)]
    pub listed: bool,
    /// As a member: the newest of its batch's changes it showed.
    #[serde(default)]
    pub mirror_seen: Option<u64>,
    /// As a batch: the workflow id of every withdrawal it claimed, by id.
    #[serde(default)]
    pub members: BTreeMap<u64, String>,
    /// As a batch: its proposed members were asked to join.
    #[serde(default)]
    pub claimed: bool,
    /// As a batch: the newest of its changes its members were told.
    #[serde(default)]
    pub notified: Option<u64>,
    /// As a batch: its members when they were last told (one that left is told too).
    #[serde(default)]
    pub listed_before: BTreeSet<u64>,
    /// As a batch: members (and joiners) that left: a repeated `leave` (its activity ran
    /// again) is answered as the first was, and a joiner leaving while it was being
    /// claimed never joins.
    #[serde(default)]
    pub left: BTreeSet<u64>,
}

impl Batched {
    /// Nothing about batching (left out of a start payload: older histories replay).
    pub fn is_default(&self) -> bool {
        *self == Batched::default()
    }
}

/// Whether `w` waits in its wallet's payout queue rather than reserving coins: a plain
/// withdrawal in RECEIVED under a batching policy, never paid before (one sent back by
/// a batch pays alone), not a balancing run, not told to go alone.
pub fn queues(w: &Withdrawal, policy: &WorkflowPolicy, batched: &Batched) -> bool {
    policy.batch.is_some()
        && w.state == State::Received
        && w.batch.is_none()
        && !w.is_batch()
        && w.attempts.is_empty()
        && crate::balancing::kind(w).is_none()
        && !batched.alone
}

/// Whether a member has nothing more to follow: settled, failed, cancelled, or waiting
/// for an operator.
pub fn at_rest(w: &Withdrawal) -> bool {
    w.settled
        || matches!(
            w.state,
            State::Failed | State::Cancelled | State::NeedsReview
        )
}

/// What the queue has due at `now_ms`: groups of one fee policy, oldest first, each as
/// long as the most outputs or whose oldest waited the window out (the rest stays), and
/// when the next group falls due.
pub fn due(queue: &[Queued], now_ms: u64) -> (Vec<Vec<Queued>>, Option<u64>) {
    let mut groups: Vec<Vec<Queued>> = Vec::new();
    for q in queue {
        match groups
            .iter_mut()
            .find(|g| g[0].withdrawal.request.fee_rate == q.withdrawal.request.fee_rate)
        {
            Some(g) => g.push(q.clone()),
            None => groups.push(vec![q.clone()]),
        }
    }
    let mut paid = Vec::new();
    let mut next: Option<u64> = None;
    for group in groups {
        let Some(batching) = group[0].policy.batch else {
            paid.extend(group.into_iter().map(|q| vec![q]));
            continue;
        };
        for chunk in group.chunks(batching.max_outputs.max(1)) {
            let at = chunk[0]
                .withdrawal
                .created_ms
                .saturating_add(batching.window_ms);
            if chunk.len() >= batching.max_outputs || at <= now_ms {
                paid.push(chunk.to_vec());
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
    }
    (paid, next)
}

/// A member's record after its batch's change `m` (`None`: nothing changes): the batch as
/// it pays it; sent back to the queue when the batch settled by a version that does not
/// pay it; cancelled when it left. A joiner not yet listed waits.
pub fn follow(w: &Withdrawal, part: &mut Batched, m: &Mirror, now_ms: u64) -> Option<Withdrawal> {
    if w.batch != Some(m.batch.id) || at_rest(w) || part.mirror_seen.is_some_and(|s| m.change <= s)
    {
        return None;
    }
    part.mirror_seen = Some(m.change);
    let listed = m.batch.members.iter().flatten().any(|x| x.id == w.id);
    if listed {
        part.listed = true;
        return Some(w.mirrored(&m.batch));
    }
    if !part.listed {
        return None;
    }
    if m.batch.settled {
        *part = Batched::default();
        return Some(w.requeued(now_ms));
    }
    w.apply(Outcome::Cancelled, now_ms).ok()
}

impl WithdrawalWorkflow {
    /// A member asks its wallet's queue to hold it (once), then waits to be claimed by a
    /// batch or told to go on alone (or cancelled); asks again if nothing came long
    /// after its window.
    pub(super) async fn wait_in_queue(
        ctx: &mut WorkflowContext<Self>,
        w: Withdrawal,
    ) -> WorkflowResult<()> {
        let policy = ctx.state(|s| s.policy.clone());
        if !ctx.state(|s| s.batched.queued) {
            let queued = Queued {
                withdrawal: w,
                policy: policy.clone(),
            };
            ctx.execute_activity(Activities::queue, queued, short())
                .await?;
            ctx.state_mut(|s| s.batched.queued = true);
        }
        let window = policy.batch.map_or(0, |b| b.window_ms);
        let patience = Duration::from_millis(window) + QUEUE_AGAIN_AFTER;
        temporalio_sdk::workflows::select! {
            moved = ctx.wait_condition(|s: &Self| {
                s.w.batch.is_some() || s.batched.alone || s.w.state != State::Received
            }) => { moved?; }
            _ = ctx.timer(patience) => {
                tracing::warn!(id = ctx.state(|s| s.w.id), "no batch took a queued withdrawal: queueing it again");
                ctx.state_mut(|s| s.batched.queued = false);
            }
        };
        Ok(())
    }

    /// A withdrawal cancelled while it waited in its wallet's queue takes itself out of it
    /// (else a batch would be proposed with it and claim it in vain).
    pub(super) async fn leave_queue(ctx: &mut WorkflowContext<Self>) {
        let Some((wallet, request_id)) = ctx.state(|s| {
            let queued = s.batched.queued && s.w.batch.is_none() && s.w.state == State::Cancelled;
            queued.then(|| (s.w.request.wallet.clone(), s.w.request.request_id.clone()))
        }) else {
            return;
        };
        let told = ctx
            .external_workflow(super::hot_wallet_workflow_id(&wallet), None)
            .signal(
                HotWalletWorkflow::dequeue,
                request_id,
                SignalWorkflowOptions::default(),
            )
            .await;
        if let Err(e) = told {
            tracing::info!(wallet, error = %e, "the wallet's workflow took no signal");
        }
    }

    /// A member waits for its batch's next change (or to be sent off alone).
    pub(super) async fn follow_batch(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        let seen = ctx.state(|s| (s.batched.mirror_seen, s.w.clone()));
        ctx.wait_condition(move |s: &Self| s.batched.mirror_seen != seen.0 || s.w != seen.1)
            .await?;
        Ok(())
    }

    /// A batch asks its proposed members to join; those that did not (cancelled, or
    /// paid otherwise) leave it before it reserves.
    pub(super) async fn claim(
        ctx: &mut WorkflowContext<Self>,
        w: Withdrawal,
    ) -> WorkflowResult<()> {
        let ask = ctx.state(|s| ClaimAsk {
            batch_workflow: w.request.request_id.clone(),
            batch_id: w.id,
            members: s.batched.members.values().cloned().collect(),
        });
        let joined: BTreeSet<String> = ctx
            .execute_activity(Activities::claim, ask, short())
            .await?
            .into_iter()
            .collect();
        let refused: Vec<u64> = ctx.state(|s| {
            s.batched
                .members
                .iter()
                .filter(|(_, workflow)| !joined.contains(*workflow))
                .map(|(id, _)| *id)
                .collect()
        });
        for id in refused {
            tracing::info!(batch = w.id, member = id, "a proposed member did not join");
            record(ctx, Outcome::MemberLeft(id));
        }
        ctx.state_mut(|s| s.batched.claimed = true);
        Ok(())
    }

    /// A batch tells every member (and those that just left) of its changes since it
    /// last did. A member whose workflow ended takes no signal and needs none.
    pub(super) async fn tell_members(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<()> {
        let Some((change, targets, now)) = ctx.state(|s| {
            let change = s.first_change + s.changes.len() as u64 - 1;
            if !s.w.is_batch() || s.batched.notified == Some(change) {
                return None;
            }
            let now: BTreeSet<u64> = s.w.members.iter().flatten().map(|m| m.id).collect();
            let targets: Vec<(String, Mirror)> = now
                .union(&s.batched.listed_before)
                .filter_map(|id| {
                    let workflow = s.batched.members.get(id)?.clone();
                    Some((workflow, Mirror::of(change, &s.w, *id)))
                })
                .collect();
            Some((change, targets, now))
        }) else {
            return Ok(());
        };
        let handles: Vec<_> = targets
            .iter()
            .map(|(workflow, _)| ctx.external_workflow(workflow.clone(), None))
            .collect();
        let signals = handles.iter().zip(&targets).map(|(member, (_, mirror))| {
            member.signal(
                WithdrawalWorkflow::mirror,
                mirror.clone(),
                SignalWorkflowOptions::default(),
            )
        });
        for ((workflow, _), sent) in targets.iter().zip(futures::future::join_all(signals).await) {
            if let Err(e) = sent {
                tracing::info!(change, member = %workflow, error = %e, "a member took no signal (its workflow ended)");
            }
        }
        ctx.state_mut(|s| {
            s.batched.notified = Some(change);
            s.batched.listed_before = now;
        });
        Ok(())
    }

    /// A stuck batch (at tip `tip`) replaced by a version also paying withdrawals waiting
    /// in its queue (claimed as joiners, paid from its change). False when none joined or
    /// the change cannot pay them (those are told to go on alone, where the embedded
    /// engine leaves them queued): a plain replacement follows.
    pub(super) async fn grow(
        ctx: &mut WorkflowContext<Self>,
        w: &Withdrawal,
        tip: u32,
    ) -> WorkflowResult<bool> {
        let Some(batching) = ctx.state(|s| s.policy.batch) else {
            return Ok(false);
        };
        let room = batching
            .max_outputs
            .saturating_sub(w.members.as_ref().map_or(0, Vec::len));
        if !w.is_batch() || room == 0 || w.pending.is_some() {
            return Ok(false);
        }
        let ask = JoinersAsk {
            batch_workflow: w.request.request_id.clone(),
            batch_id: w.id,
            wallet: w.request.wallet.clone(),
            fee_rate: w.request.fee_rate,
            room,
            // One ask per version and tip: a retried activity gets the same joiners, a
            // later look at the queue new ones.
            key: format!("{}#{}@{tip}", w.request.request_id, w.attempts.len()),
        };
        ctx.state_mut(|s| s.growing = true);
        let claimed = ctx
            .execute_activity(Activities::joiners, ask, short())
            .await;
        ctx.state_mut(|s| s.growing = false);
        // One cancelled while it was being claimed never joins.
        let left = ctx.state(|s| s.batched.left.clone());
        let joined: Vec<Queued> = claimed?
            .into_iter()
            .filter(|q| !left.contains(&q.withdrawal.id))
            .collect();
        if joined.is_empty() {
            return Ok(false);
        }
        ctx.state_mut(|s| {
            for q in &joined {
                s.batched
                    .members
                    .insert(q.withdrawal.id, q.workflow().to_owned());
            }
            s.joining = joined.iter().map(|q| q.withdrawal.clone()).collect();
        });
        loop {
            let joining = ctx.state(|s| s.joining.clone());
            if joining.is_empty() {
                return Ok(false);
            }
            let built = ctx
                .execute_activity(Activities::replace, w.with_joiners(&joining), short())
                .await?;
            // One left meanwhile: built again without it.
            if ctx.state(|s| s.joining != joining) {
                continue;
            }
            if let Signing::Signed(attempt) = built {
                let ids: Vec<u64> = joining.iter().map(|j| j.id).collect();
                tracing::info!(batch = w.id, joiners = ?ids, new = %attempt.txid, rate = attempt.fee_rate, "bumping a stuck batch; waiting withdrawals join it");
                if record(ctx, Outcome::Grown(attempt, joining)) {
                    ctx.state_mut(|s| s.joining.clear());
                    return Ok(true);
                }
            }
            break;
        }
        // Not paid from its change (or its signers are external): alone.
        let joining = ctx.state_mut(|s| std::mem::take(&mut s.joining));
        let batch = Some(w.id);
        for j in joining {
            let Some(workflow) = ctx.state(|s| s.batched.members.get(&j.id).cloned()) else {
                continue;
            };
            let told = ctx
                .external_workflow(workflow.clone(), None)
                .signal(
                    WithdrawalWorkflow::alone,
                    batch,
                    SignalWorkflowOptions::default(),
                )
                .await;
            if let Err(e) = told {
                tracing::info!(batch = w.id, member = %workflow, error = %e, "a joiner took no signal");
            }
        }
        Ok(false)
    }

    /// Applies the change `m` of the member's batch.
    pub(super) fn mirror_batch(&mut self, m: &Mirror, at_ms: u64) {
        if let Some(next) = follow(&self.w, &mut self.batched, m, at_ms) {
            self.set(next);
        }
    }

    /// Leaves the batch as a cancelled member (its batch let it go).
    pub(super) fn left_batch(&mut self, at_ms: u64) {
        if let Ok(next) = self.w.apply(Outcome::Cancelled, at_ms) {
            self.set(next);
        }
    }

    /// The time of the workflow's clock now, for a handler without its context.
    pub(super) fn clock(ctx: &WorkflowContext<Self>) -> u64 {
        millis(ctx.workflow_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::Batching;
    use crate::saga::Request;
    use bitcoin::hashes::Hash;
    use bitcoin::Amount;

    fn policy(window_ms: u64, max_outputs: usize) -> WorkflowPolicy {
        WorkflowPolicy {
            confirmations: 1,
            settle_at: 2,
            bump_after_blocks: 3,
            poll_secs: 30,
            batch: Some(Batching {
                window_ms,
                max_outputs,
            }),
        }
    }

    fn queued(i: u64, rate: f64, created_ms: u64, p: &WorkflowPolicy) -> Queued {
        let request = Request {
            request_id: format!("q-{i}"),
            wallet: "hot".into(),
            destination: "bcrt1qdest".into(),
            amount: Amount::from_sat(10_000 + i),
            fee_rate: FeeRate::SatPerVb(rate),
            max_fee: Amount::from_sat(5_000),
        };
        Queued {
            withdrawal: Withdrawal::new(i, request, created_ms),
            policy: p.clone(),
        }
    }

    #[test]
    fn a_queue_is_due_when_full_or_when_its_oldest_waited_the_window_out() {
        let p = policy(1_000, 3);
        let queue: Vec<Queued> = vec![
            queued(1, 2.0, 100, &p),
            queued(2, 2.0, 200, &p),
            queued(3, 5.0, 300, &p),
            queued(4, 2.0, 400, &p),
            queued(5, 2.0, 900, &p),
        ];
        // At 500: the first three of rate 2 fill a batch; 5 waits (due at 1900), and so
        // does the lone one of rate 5 (due at 1300).
        let (paid, next) = due(&queue, 500);
        let ids: Vec<Vec<u64>> = paid
            .iter()
            .map(|g| g.iter().map(|q| q.withdrawal.id).collect())
            .collect();
        assert_eq!(ids, vec![vec![1, 2, 4]]);
        assert_eq!(next, Some(1_300));
        // At 1300 the lone one is due too (paid alone by its caller); at 1900 all are.
        let (paid, next) = due(&queue, 1_300);
        assert_eq!(paid.len(), 2);
        assert_eq!(next, Some(1_900));
        assert_eq!(due(&queue, 1_900).0.len(), 3);
        assert_eq!(due(&[], 0), (Vec::new(), None));
    }

    fn batch_of(members: &[Withdrawal]) -> Withdrawal {
        Withdrawal::new_batch(100, members, 1)
    }

    #[test]
    fn a_member_shows_its_batch_ignores_older_changes_and_leaves_or_goes_back() {
        let p = policy(1_000, 3);
        let members: Vec<Withdrawal> = (1..=2).map(|i| queued(i, 2.0, 0, &p).withdrawal).collect();
        let batch = batch_of(&members);
        let mut w = members[0].clone();
        w.batch = Some(100);
        let mut part = Batched::default();
        let reserved = batch
            .apply(
                Outcome::Reserved(vec![crate::saga::Coin {
                    outpoint: bitcoin::OutPoint::null(),
                    value: Amount::from_sat(1_000_000),
                    script: bitcoin::ScriptBuf::new(),
                }]),
                2,
            )
            .unwrap();
        let shown = follow(
            &w,
            &mut part,
            &Mirror {
                change: 1,
                batch: reserved,
            },
            3,
        )
        .unwrap();
        assert_eq!(
            (shown.state, shown.batch, part.listed),
            (State::Reserved, Some(100), true)
        );
        // An older change (a signal delivered late) changes nothing.
        assert_eq!(
            follow(
                &shown,
                &mut part,
                &Mirror {
                    change: 0,
                    batch: batch.clone()
                },
                4
            ),
            None
        );
        // Another batch's change is not its own.
        let mut other = batch.clone();
        other.id = 101;
        assert_eq!(
            follow(
                &shown,
                &mut part,
                &Mirror {
                    change: 2,
                    batch: other
                },
                4
            ),
            None
        );
        // It left (the batch no longer lists it, unsettled): cancelled.
        let left = batch.apply(Outcome::MemberLeft(1), 5).unwrap();
        let gone = follow(
            &shown,
            &mut part,
            &Mirror {
                change: 3,
                batch: left,
            },
            6,
        )
        .unwrap();
        assert_eq!(gone.state, State::Cancelled);
        // A joiner not yet listed waits; once listed and then left out of a settled
        // batch it goes back to the queue, paid alone.
        let mut joiner = queued(9, 2.0, 0, &p).withdrawal;
        joiner.batch = Some(100);
        let mut part = Batched::default();
        assert_eq!(
            follow(
                &joiner,
                &mut part,
                &Mirror {
                    change: 4,
                    batch: batch.clone()
                },
                7
            ),
            None
        );
        let grown = batch.with_joiners(std::slice::from_ref(&joiner));
        let shown = follow(
            &joiner,
            &mut part,
            &Mirror {
                change: 5,
                batch: grown,
            },
            8,
        )
        .unwrap();
        let mut settled = batch.clone();
        settled.settled = true;
        let back = follow(
            &shown,
            &mut part,
            &Mirror {
                change: 6,
                batch: settled,
            },
            9,
        )
        .unwrap();
        assert_eq!((back.state, back.batch), (State::Received, None));
        assert!(part.is_default());
    }

    #[test]
    fn a_member_is_told_only_its_own_output_and_no_transaction_bytes() {
        let p = policy(1_000, 3);
        let members: Vec<Withdrawal> = (1..=3).map(|i| queued(i, 2.0, 0, &p).withdrawal).collect();
        let mut batch = batch_of(&members);
        batch.attempts.push(crate::saga::Attempt {
            txid: bitcoin::Txid::from_byte_array([7; 32]),
            raw: vec![1; 500],
            fee: Amount::from_sat(900),
            fee_rate: 2.0,
            fee_choice: String::new(),
        });
        let told = Mirror::of(4, &batch, 2);
        let listed: Vec<u64> = told.batch.members.iter().flatten().map(|m| m.id).collect();
        assert_eq!((told.change, listed), (4, vec![2]));
        assert!(told.batch.attempts[0].raw.is_empty());
        assert_eq!(told.batch.attempts[0].txid, batch.attempts[0].txid);
        // What the member shows is the same as from the whole batch, bytes aside.
        let mut w = members[1].clone();
        w.batch = Some(100);
        let mut whole = w.mirrored(&batch);
        whole.attempts[0].raw = Vec::new();
        assert_eq!(w.mirrored(&told.batch), whole);
    }

    #[test]
    fn only_plain_unpaid_withdrawals_under_a_batching_policy_queue() {
        let p = policy(1_000, 3);
        let w = queued(1, 2.0, 0, &p).withdrawal;
        assert!(queues(&w, &p, &Batched::default()));
        let off = WorkflowPolicy {
            batch: None,
            ..p.clone()
        };
        assert!(!queues(&w, &off, &Batched::default()));
        let alone = Batched {
            alone: true,
            ..Batched::default()
        };
        assert!(!queues(&w, &p, &alone));
        let mut sweep = w.clone();
        sweep.request.request_id = crate::balancing::Kind::Sweep.request_id(7);
        assert!(!queues(&sweep, &p, &Batched::default()));
        let batch = batch_of(&[w.clone(), queued(2, 2.0, 0, &p).withdrawal]);
        assert!(!queues(&batch, &p, &Batched::default()));
    }
}
