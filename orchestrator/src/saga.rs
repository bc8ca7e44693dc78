//! The withdrawal saga as a pure state machine: a withdrawal and an outcome (of a step the
//! executor ran, or of something observed on the chain) give the next withdrawal, or an
//! error when that outcome cannot happen in that state. No I/O here: the executor persists
//! each result before it takes the next side effect, so replaying outcomes after a crash
//! lands in the same place.
//!
//! Rules from payouts that went wrong elsewhere (`withdrawal-lessons.md`): a signed
//! transaction is never returned to "unpaid"; an unclear outcome goes to NEEDS_REVIEW for
//! an operator; reserved coins stay reserved until the payment is settled deep enough
//! (`settled`), not merely until a transaction leaves the mempool; every replacement's txid
//! is kept and any of them confirming completes the saga.

use bitcoin::{Amount, OutPoint, Txid};
use serde::{Deserialize, Serialize};

/// Milliseconds since 1970: the saga's clock for its timestamps.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `sends` of a record written before the field existed: an earlier version sent without
/// recording it first, so a SIGNED one of those may be on the network.
fn possibly_sent() -> u32 {
    1
}

/// Where a withdrawal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Accepted and durable; nothing reserved yet.
    Received,
    /// Coins reserved for it.
    Reserved,
    /// Its unsigned transaction waits for external signers (an HSM, an offline or remote
    /// cosigner) to add their signatures; the hot key signs last.
    AwaitingSignatures,
    /// A signed transaction is stored (not broadcast yet).
    Signed,
    /// Sent to bitcoind; not in a block.
    Broadcast,
    /// In a block, fewer confirmations than required (or back here after a reorg).
    Confirming,
    /// Confirmed deep enough. Terminal for the client; the coins stay reserved until
    /// `settled` (a deeper depth), so a late reorg is still handled.
    Completed,
    /// Given up before anything was broadcast; its coins were released.
    Failed,
    /// Cancelled by the client before broadcast; its coins were released.
    Cancelled,
    /// Something happened that the saga cannot resolve safely on its own (a signed
    /// transaction whose fate is unclear): an operator decides. Coins stay reserved.
    NeedsReview,
}

impl State {
    /// Whether nothing more will happen to it (for the client).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            State::Completed | State::Failed | State::Cancelled | State::NeedsReview
        )
    }

    /// Whether a transaction for it was handed to bitcoind: from then on it can never go
    /// back to unpaid. (A SIGNED withdrawal whose send was begun may be on the network too:
    /// see [`Withdrawal::may_have_left`].)
    pub fn may_be_on_chain(self) -> bool {
        matches!(
            self,
            State::Broadcast | State::Confirming | State::Completed | State::NeedsReview
        )
    }
}

/// How the fee is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum FeeRate {
    /// bitcoind's estimate for confirmation within this many blocks.
    TargetBlocks(u16),
    /// A fixed rate, in sat/vB.
    SatPerVb(f64),
    /// bitcoind's estimate for the confirmation target the operator set for this
    /// priority (`priority_*_blocks`).
    Priority(Priority),
}

/// How soon a withdrawal should confirm, as the operator's policy translates it into a
/// confirmation target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Priority {
    /// Can wait: the cheapest target (default 144 blocks, about a day).
    Low,
    /// The usual (default 6 blocks, about an hour).
    Normal,
    /// Soon (default 2 blocks).
    High,
}

impl Priority {
    /// Its name as the status words it (`low`, `normal`, `high`).
    pub fn name(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// What a client asked for. Two submissions with the same `request_id` must carry equal
/// requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The client's idempotency key.
    pub request_id: String,
    /// The wallet paying.
    pub wallet: String,
    /// Destination address, as given (validated against the network on submission).
    pub destination: String,
    /// Amount paid to it.
    pub amount: Amount,
    /// Fee rate policy.
    pub fee_rate: FeeRate,
    /// Highest total fee the client accepts, replacements included.
    pub max_fee: Amount,
}

/// A coin held for a withdrawal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coin {
    /// The output.
    pub outpoint: OutPoint,
    /// Its value.
    pub value: Amount,
    /// Its script (what signing commits to).
    pub script: bitcoin::ScriptBuf,
}

/// A version of the payment waiting for external signatures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The PSBT as the signers get it, with the signatures gathered so far (never the
    /// hot key's: it signs last, when the rest are there), serialized.
    pub psbt: Vec<u8>,
    /// Its txid (it does not change with signatures: segwit).
    pub txid: Txid,
    /// Its absolute fee.
    pub fee: Amount,
    /// Its fee rate, sat/vB.
    pub fee_rate: f64,
    /// How that rate was chosen.
    pub fee_choice: String,
    /// Whether it replaces a broadcast version (RBF) rather than being the first.
    pub replacing: bool,
}

/// One signed version of the payment (the first, or an RBF replacement).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its txid.
    pub txid: Txid,
    /// The signed transaction, serialized (persisted before it is broadcast).
    pub raw: Vec<u8>,
    /// Its absolute fee.
    pub fee: Amount,
    /// Its fee rate, sat/vB.
    pub fee_rate: f64,
    /// How that rate was chosen (the estimate and its target, a fixed rate, the floor
    /// when bitcoind had no estimate, a clamp to the ceiling, a replacement's step), as
    /// the status shows it. Empty in records written before it existed.
    #[serde(default)]
    pub fee_choice: String,
}

/// A withdrawal paid by a batch: its own id and what it pays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// The withdrawal's id.
    pub id: u64,
    /// Its destination, as given.
    pub destination: String,
    /// Its amount.
    pub amount: Amount,
    /// Its fee cap (the batch's cap is the members' sum).
    pub max_fee: Amount,
    /// The first of the batch's versions that pays it (members that joined a
    /// replacement are not paid by the versions before it).
    #[serde(default)]
    pub joined_at: usize,
}

/// A withdrawal and everything the saga knows about it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Withdrawal {
    /// Its id.
    pub id: u64,
    /// What was asked.
    pub request: Request,
    /// Where it is.
    pub state: State,
    /// Coins reserved for it (released on FAILED/CANCELLED, or once settled).
    pub coins: Vec<Coin>,
    /// Every signed version, oldest first; the last one is current.
    pub attempts: Vec<Attempt>,
    /// The version that confirmed, when one did.
    pub confirmed: Option<Txid>,
    /// Its confirmations as last seen.
    pub confirmations: u32,
    /// The tip height when the current version was broadcast (for the stuck check).
    pub broadcast_height: Option<u32>,
    /// The transaction must be sent (again): after signing, a replacement or a reorg.
    pub needs_broadcast: bool,
    /// How many times a send of the first signed version was begun: each is recorded
    /// before the transaction is handed to bitcoind, so from the first one on it may be on
    /// the network and the withdrawal can only be followed to its outcome.
    #[serde(default = "possibly_sent")]
    pub sends: u32,
    /// Whether it is settled (confirmed past the settlement depth): its coins are
    /// released and the record is archived.
    pub settled: bool,
    /// Why it failed or needs review.
    pub failure_reason: Option<String>,
    /// Creation time, ms since 1970.
    pub created_ms: u64,
    /// Last change, ms since 1970.
    pub updated_ms: u64,
    /// The batch paying it, when it is a member of one: the batch's saga runs the steps
    /// and this record mirrors the batch's state and versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    /// When this record is a batch: the withdrawals it pays, one output each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    /// A version waiting for external signatures (the first, or a replacement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Pending>,
}

/// What happened: the result of a step the executor ran, or an observation.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Coins were selected and reserved.
    Reserved(Vec<Coin>),
    /// A transaction spending exactly the reserved coins was signed and stored.
    Signed(Attempt),
    /// The signed transaction is about to be handed to bitcoind (recorded before the send,
    /// so that a cancel can no longer win once it may have left the process).
    Sending,
    /// bitcoind accepted the current version (or already had it) at this tip height.
    Broadcast {
        /// Tip height then.
        height: u32,
    },
    /// A version was built that external signers must sign (the first from RESERVED, a
    /// replacement while BROADCAST).
    AwaitingSignatures(Pending),
    /// External signatures were added to the pending version; more are needed.
    SignaturesAdded(Vec<u8>),
    /// A replacement paying more fee was signed (spending the same coins).
    Replaced(Attempt),
    /// A batch's replacement was signed that also pays `joiners` (withdrawals waiting in
    /// its queue), from its change.
    Grown(Attempt, Vec<Withdrawal>),
    /// One of its versions is in the best chain with this many confirmations.
    Confirmed {
        /// Which version.
        txid: Txid,
        /// Confirmations (>= 1).
        confirmations: u32,
        /// Confirmations required to complete.
        required: u32,
        /// Confirmations after which it is settled (>= required).
        settle_at: u32,
    },
    /// The version that was confirmed left the best chain (reorg).
    ReorgedOut,
    /// A step failed for good before anything could be on the network.
    Failed(String),
    /// A step's outcome is unknown and may have reached the network.
    Unclear(String),
    /// The client cancelled it.
    Cancelled,
    /// A batch's member was cancelled before the batch could have left: it leaves the
    /// batch, whose signed bytes (if any) are discarded so it is signed again without it.
    MemberLeft(u64),
}

/// An outcome that cannot happen in the withdrawal's state.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("withdrawal {id} is {state:?}: {what}")]
pub struct TransitionError {
    /// The withdrawal.
    pub id: u64,
    /// Its state.
    pub state: State,
    /// What was refused.
    pub what: String,
}

/// What the executor should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Select and reserve coins.
    Reserve,
    /// Build and sign the transaction.
    Sign,
    /// Send the current version to bitcoind.
    Broadcast,
    /// Wait for the chain (confirmations, reorgs, or a stuck transaction to bump).
    Watch,
    /// Wait for external signers (their signatures come through the Signatures API).
    AwaitSignatures,
    /// Nothing: final (settled, failed, cancelled, or waiting for an operator).
    Rest,
}

impl Member {
    /// `w` as a member paid from the batch's version `joined_at` on.
    fn of(w: &Withdrawal, joined_at: usize) -> Member {
        Member {
            id: w.id,
            destination: w.request.destination.clone(),
            amount: w.request.amount,
            max_fee: w.request.max_fee,
            joined_at,
        }
    }
}

impl Withdrawal {
    /// A new withdrawal in RECEIVED.
    pub fn new(id: u64, request: Request, now_ms: u64) -> Withdrawal {
        Withdrawal {
            id,
            request,
            state: State::Received,
            coins: Vec::new(),
            attempts: Vec::new(),
            confirmed: None,
            confirmations: 0,
            broadcast_height: None,
            needs_broadcast: false,
            sends: 0,
            settled: false,
            failure_reason: None,
            created_ms: now_ms,
            updated_ms: now_ms,
            batch: None,
            members: None,
            pending: None,
        }
    }

    /// A new batch in RECEIVED paying `members` (withdrawals of one wallet and fee
    /// policy, in RECEIVED) from `wallet`.
    pub fn new_batch(id: u64, members: &[Withdrawal], now_ms: u64) -> Withdrawal {
        let first = &members[0].request;
        let mut b = Withdrawal::new(
            id,
            Request {
                request_id: format!("batch-{id}"),
                wallet: first.wallet.clone(),
                destination: String::new(),
                amount: Amount::ZERO,
                fee_rate: first.fee_rate,
                max_fee: Amount::ZERO,
            },
            now_ms,
        );
        b.set_members(members.iter().map(|w| Member::of(w, 0)).collect());
        b
    }

    /// The batch with `joiners` (withdrawals in RECEIVED of its wallet and fee policy)
    /// added as members paid from its next version on.
    pub fn with_joiners(&self, joiners: &[Withdrawal]) -> Withdrawal {
        let mut grown = self.clone();
        let mut members = self.members.clone().unwrap_or_default();
        members.extend(joiners.iter().map(|w| Member::of(w, self.attempts.len())));
        grown.set_members(members);
        grown
    }

    /// The index of the version that confirmed, if one did.
    fn confirmed_index(&self) -> Option<usize> {
        let txid = self.confirmed?;
        self.attempts.iter().position(|a| a.txid == txid)
    }

    /// Sets a batch's members, and its amount and cap to their sums.
    fn set_members(&mut self, members: Vec<Member>) {
        self.request.amount = members.iter().map(|m| m.amount).sum();
        self.request.max_fee = members.iter().map(|m| m.max_fee).sum();
        self.members = Some(members);
    }

    /// Whether this record is a batch (its members are withdrawals of their own).
    pub fn is_batch(&self) -> bool {
        self.members.is_some()
    }

    /// A member's record as `batch` (its batch, as just recorded) shows it: the batch's
    /// state, the versions that pay it, confirmations and reason; its own request, id and
    /// times. A member that joined a replacement while an earlier version confirmed is
    /// not paid by it: it shows BROADCAST (its versions unconfirmed) until the batch
    /// settles and it goes back to the queue.
    pub fn mirrored(&self, batch: &Withdrawal) -> Withdrawal {
        let joined_at = batch
            .members
            .iter()
            .flatten()
            .find(|m| m.id == self.id)
            .map_or(0, |m| m.joined_at);
        let paid_by_confirmed = batch.confirmed_index().is_none_or(|i| i >= joined_at);
        let mut m = Withdrawal {
            id: self.id,
            request: self.request.clone(),
            state: batch.state,
            coins: Vec::new(),
            attempts: batch.attempts[joined_at.min(batch.attempts.len())..].to_vec(),
            confirmed: batch.confirmed,
            confirmations: batch.confirmations,
            broadcast_height: batch.broadcast_height,
            needs_broadcast: false,
            sends: batch.sends,
            settled: batch.settled,
            failure_reason: batch.failure_reason.clone(),
            created_ms: self.created_ms,
            updated_ms: batch.updated_ms,
            batch: Some(batch.id),
            members: None,
            pending: None,
        };
        if !paid_by_confirmed {
            m.state = State::Broadcast;
            m.confirmed = None;
            m.confirmations = 0;
            m.settled = false;
        }
        m
    }

    /// A member sent back to the queue: an earlier version of its batch, which did not
    /// pay it, settled. Its versions stay in its history; it is paid anew.
    pub fn requeued(&self, now_ms: u64) -> Withdrawal {
        let mut w = self.clone();
        w.state = State::Received;
        w.batch = None;
        w.coins = Vec::new();
        w.confirmed = None;
        w.confirmations = 0;
        w.broadcast_height = None;
        w.needs_broadcast = false;
        w.sends = 0;
        w.settled = false;
        w.failure_reason = Some(format!(
            "batch {}: an earlier version that did not pay it confirmed; paid again by a new transaction",
            self.batch.unwrap_or(0)
        ));
        w.updated_ms = now_ms;
        w
    }

    /// The current signed version.
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// Whether a signed version may have left the process (a send was begun, or it was
    /// broadcast): from then on it can never be cancelled or failed back to unpaid.
    pub fn may_have_left(&self) -> bool {
        self.state.may_be_on_chain() || (self.state == State::Signed && self.sends > 0)
    }

    /// Whether its coins are still held (not released by failure, cancel or settlement).
    pub fn holds_coins(&self) -> bool {
        !self.coins.is_empty()
            && !self.settled
            && !matches!(self.state, State::Failed | State::Cancelled)
    }

    /// The next step for the executor.
    pub fn next_step(&self) -> Step {
        if self.batch.is_some() {
            // Its batch runs the steps.
            return Step::Rest;
        }
        match self.state {
            State::Received => Step::Reserve,
            State::Reserved => Step::Sign,
            State::AwaitingSignatures => Step::AwaitSignatures,
            State::Signed => Step::Broadcast,
            State::Broadcast | State::Confirming if self.needs_broadcast => Step::Broadcast,
            State::Broadcast | State::Confirming => Step::Watch,
            State::Completed if !self.settled => Step::Watch,
            _ => Step::Rest,
        }
    }

    /// "transaction TXID" for the current version, for messages.
    fn txid_shown(&self) -> String {
        self.current().map_or_else(
            || "its transaction".into(),
            |a| format!("transaction {}", a.txid),
        )
    }

    fn refuse(&self, what: impl Into<String>) -> TransitionError {
        TransitionError {
            id: self.id,
            state: self.state,
            what: what.into(),
        }
    }

    /// The withdrawal after `outcome`, at time `now_ms`.
    pub fn apply(&self, outcome: Outcome, now_ms: u64) -> Result<Withdrawal, TransitionError> {
        let mut w = self.clone();
        w.updated_ms = now_ms;
        match (self.state, outcome) {
            (State::Received, Outcome::Reserved(coins)) => {
                if coins.is_empty() {
                    return Err(self.refuse("reserving no coins"));
                }
                w.coins = coins;
                w.state = State::Reserved;
            }
            (State::Reserved, Outcome::Signed(attempt)) => {
                w.sends = 0;
                w.attempts.push(attempt);
                w.needs_broadcast = true;
                w.state = State::Signed;
            }
            (State::Reserved, Outcome::AwaitingSignatures(p)) if !p.replacing => {
                w.pending = Some(p);
                w.state = State::AwaitingSignatures;
            }
            (State::Broadcast, Outcome::AwaitingSignatures(p))
                if p.replacing && self.pending.is_none() =>
            {
                w.pending = Some(p);
            }
            (State::AwaitingSignatures | State::Broadcast, Outcome::SignaturesAdded(psbt))
                if self.pending.is_some() =>
            {
                if let Some(p) = &mut w.pending {
                    p.psbt = psbt;
                }
            }
            (State::AwaitingSignatures, Outcome::Signed(attempt)) => {
                let expected = self.pending.as_ref().map(|p| p.txid);
                if expected != Some(attempt.txid) {
                    return Err(self.refuse("signed a transaction other than the pending one"));
                }
                w.pending = None;
                // The external signers could complete it too (and send it themselves):
                // from here it may be on the network, like a version whose send began.
                w.sends = 1;
                w.attempts.push(attempt);
                w.needs_broadcast = true;
                w.state = State::Signed;
            }
            (State::Signed, Outcome::Sending) => {
                w.sends = self.sends.saturating_add(1);
            }
            (State::Signed, Outcome::Broadcast { height })
            | (State::Broadcast, Outcome::Broadcast { height })
            | (State::Confirming, Outcome::Broadcast { height }) => {
                if self.state == State::Signed && self.sends == 0 {
                    return Err(self.refuse("broadcast without a send recorded first"));
                }
                if !self.needs_broadcast && self.state != State::Signed {
                    return Err(self.refuse("broadcast when nothing needed sending"));
                }
                w.needs_broadcast = false;
                w.broadcast_height = Some(height);
                if self.state == State::Signed {
                    w.state = State::Broadcast;
                }
            }
            (State::Broadcast, Outcome::Grown(attempt, joiners)) => {
                if !self.is_batch() || joiners.is_empty() {
                    return Err(self.refuse("only a batch grows, by one member or more"));
                }
                let grown = self.with_joiners(&joiners);
                w = grown.apply(Outcome::Replaced(attempt), now_ms)?;
            }
            (State::Broadcast, Outcome::Replaced(attempt)) => {
                let current = self.current().ok_or_else(|| self.refuse("no version"))?;
                if attempt.fee <= current.fee || attempt.fee_rate <= current.fee_rate {
                    return Err(self.refuse("a replacement must pay a higher fee and rate"));
                }
                if attempt.fee > self.request.max_fee {
                    return Err(self.refuse("a replacement above max_fee"));
                }
                if self.pending.as_ref().is_some_and(|p| p.txid != attempt.txid) {
                    return Err(self.refuse("a replacement other than the pending one"));
                }
                w.pending = None;
                w.attempts.push(attempt);
                w.needs_broadcast = true;
            }
            (
                State::Broadcast | State::Confirming | State::Completed,
                Outcome::Confirmed {
                    txid,
                    confirmations,
                    required,
                    settle_at,
                },
            ) => {
                if !self.attempts.iter().any(|a| a.txid == txid) {
                    return Err(self.refuse(format!("{txid} is none of its versions")));
                }
                if confirmations == 0 {
                    return Err(self.refuse("confirmed with zero confirmations"));
                }
                w.confirmed = Some(txid);
                w.confirmations = confirmations;
                w.needs_broadcast = false;
                // A replacement still waiting for signatures is moot now.
                w.pending = None;
                w.state = if confirmations >= required.max(1) {
                    State::Completed
                } else {
                    State::Confirming
                };
                // A completed payment stays completed for the client; only its
                // settlement waits for the deeper depth.
                if self.state == State::Completed {
                    w.state = State::Completed;
                }
                w.settled = confirmations >= settle_at.max(required).max(1);
                if w.settled {
                    // Members the settled version does not pay leave (back to the queue).
                    let i = w.confirmed_index().unwrap_or(0);
                    if let Some(members) = &w.members {
                        let paid = members.iter().filter(|m| m.joined_at <= i).cloned();
                        w.set_members(paid.collect());
                    }
                }
            }
            (State::Confirming | State::Completed, Outcome::ReorgedOut) => {
                if self.settled {
                    return Err(self.refuse("a settled payment cannot be reorged out"));
                }
                w.confirmed = None;
                w.confirmations = 0;
                w.needs_broadcast = true;
                w.state = State::Confirming;
            }
            (State::Received | State::Reserved, Outcome::Failed(reason)) => {
                w.failure_reason = Some(reason);
                w.state = State::Failed;
            }
            (State::Signed, Outcome::Failed(reason)) => {
                // Only the first send may fail the withdrawal: bitcoind refused it for good,
                // so it never reached the network. After a second send began, an earlier
                // one may have been accepted (and the refusal be about something else): an
                // operator decides (`Unclear`).
                if self.sends > 1 {
                    return Err(self.refuse(format!(
                        "{} may have been sent before: it cannot fail, only be reviewed",
                        self.txid_shown()
                    )));
                }
                w.failure_reason = Some(reason);
                w.state = State::Failed;
            }
            (s, Outcome::Unclear(reason)) if !s.is_final() || s == State::Completed => {
                if s.may_be_on_chain() || s == State::Signed || s == State::AwaitingSignatures {
                    w.failure_reason = Some(reason);
                    w.state = State::NeedsReview;
                } else {
                    // Nothing signed yet: nothing can be on the network.
                    w.failure_reason = Some(reason);
                    w.state = State::Failed;
                }
            }
            (state, Outcome::MemberLeft(id)) if !self.may_have_left() => {
                let Some(members) = &self.members else {
                    return Err(self.refuse("only a batch has members"));
                };
                if !matches!(state, State::Received | State::Reserved | State::Signed) {
                    return Err(self.refuse("members leave only before the batch is sent"));
                }
                if !members.iter().any(|m| m.id == id) {
                    return Err(self.refuse(format!("withdrawal {id} is not a member")));
                }
                let rest: Vec<Member> = members.iter().filter(|m| m.id != id).cloned().collect();
                let empty = rest.is_empty();
                w.set_members(rest);
                if state == State::Signed {
                    // Never handed to anyone: the bytes go, and it is signed again without
                    // the member (or not at all).
                    w.attempts.clear();
                    w.needs_broadcast = false;
                    w.state = State::Reserved;
                }
                if empty {
                    w.failure_reason = Some("every member was cancelled".into());
                    w.state = State::Cancelled;
                }
            }
            (_, Outcome::MemberLeft(_)) => {
                return Err(self.refuse(format!(
                    "{} may already be on the network: its members can no longer leave",
                    self.txid_shown()
                )))
            }
            (State::Received | State::Reserved, Outcome::Cancelled) => {
                w.state = State::Cancelled;
            }
            (State::Signed, Outcome::Cancelled) if self.sends == 0 => {
                // Signed but never handed to anyone: the bytes are discarded, so the
                // transaction can never be sent and its inputs are free again.
                let discarded = std::mem::take(&mut w.attempts);
                w.needs_broadcast = false;
                w.failure_reason = Some(format!(
                    "cancelled before sending: the signed transaction {} never left the orchestrator and was discarded",
                    discarded.last().map_or_else(String::new, |a| a.txid.to_string())
                ));
                w.state = State::Cancelled;
            }
            (State::AwaitingSignatures, Outcome::Cancelled) => {
                return Err(self.refuse(format!(
                    "transaction {} was handed to external signers, who could complete it without the orchestrator: it can no longer be cancelled, only followed (or reviewed by an operator)",
                    self.pending.as_ref().map_or_else(String::new, |p| p.txid.to_string())
                )))
            }
            (_, Outcome::Cancelled) if self.may_have_left() => {
                return Err(self.refuse(format!(
                    "{} may already be on the network: it can no longer be cancelled, only followed to its outcome",
                    self.txid_shown()
                )))
            }
            (_, Outcome::Cancelled) => {
                return Err(self.refuse("only a withdrawal not yet sent can be cancelled"))
            }
            (_, other) => return Err(self.refuse(format!("{other:?} cannot happen now"))),
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    fn request() -> Request {
        Request {
            request_id: "r1".into(),
            wallet: "hot".into(),
            destination: "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into(),
            amount: Amount::from_sat(50_000),
            fee_rate: FeeRate::TargetBlocks(6),
            max_fee: Amount::from_sat(10_000),
        }
    }

    fn attempt(n: u8, fee: u64) -> Attempt {
        Attempt {
            txid: Txid::from_byte_array([n; 32]),
            raw: vec![n],
            fee: Amount::from_sat(fee),
            fee_rate: fee as f64 / 141.0,
            fee_choice: String::new(),
        }
    }

    fn coin() -> Coin {
        Coin {
            outpoint: OutPoint::new(Txid::from_byte_array([9; 32]), 0),
            value: Amount::from_sat(100_000),
            script: bitcoin::ScriptBuf::new(),
        }
    }

    fn confirmed(txid: Txid, confirmations: u32) -> Outcome {
        Outcome::Confirmed {
            txid,
            confirmations,
            required: 3,
            settle_at: 6,
        }
    }

    fn broadcast() -> Withdrawal {
        let w = Withdrawal::new(1, request(), 0);
        let w = w.apply(Outcome::Reserved(vec![coin()]), 1).unwrap();
        let w = w.apply(Outcome::Signed(attempt(1, 1_000)), 2).unwrap();
        assert_eq!(w.next_step(), Step::Broadcast);
        let w = w.apply(Outcome::Sending, 3).unwrap();
        w.apply(Outcome::Broadcast { height: 100 }, 3).unwrap()
    }

    fn signed() -> Withdrawal {
        Withdrawal::new(1, request(), 0)
            .apply(Outcome::Reserved(vec![coin()]), 1)
            .unwrap()
            .apply(Outcome::Signed(attempt(1, 1_000)), 2)
            .unwrap()
    }

    #[test]
    fn once_a_send_began_it_cannot_be_cancelled_only_followed() {
        let w = signed();
        assert!(!w.may_have_left());
        assert!(
            w.apply(Outcome::Broadcast { height: 1 }, 3).is_err(),
            "the send's intent is recorded first"
        );
        // Before the send: cancelled, and the signed bytes are gone for good.
        let c = w.apply(Outcome::Cancelled, 3).unwrap();
        assert_eq!((c.state, c.holds_coins()), (State::Cancelled, false));
        assert!(c.attempts.is_empty() && c.current().is_none());
        let reason = c.failure_reason.unwrap();
        assert!(reason.contains(&w.attempts[0].txid.to_string()), "{reason}");
        // After the intent: refused, naming the transaction.
        let sending = w.apply(Outcome::Sending, 3).unwrap();
        assert!(sending.may_have_left() && sending.holds_coins());
        let refused = sending.apply(Outcome::Cancelled, 4).unwrap_err();
        assert!(
            refused.what.contains(&w.attempts[0].txid.to_string()),
            "{refused}"
        );
        let sent = sending.apply(Outcome::Broadcast { height: 7 }, 4).unwrap();
        assert!(sent.apply(Outcome::Cancelled, 5).is_err());
    }

    #[test]
    fn only_a_first_send_refused_for_good_fails_a_signed_withdrawal() {
        let once = signed().apply(Outcome::Sending, 3).unwrap();
        let f = once.apply(Outcome::Failed("rejected".into()), 4).unwrap();
        assert_eq!((f.state, f.holds_coins()), (State::Failed, false));
        // A second send (after a restart): the first may have gone through.
        let twice = once.apply(Outcome::Sending, 4).unwrap();
        assert_eq!(twice.sends, 2);
        assert!(twice.apply(Outcome::Failed("rejected".into()), 5).is_err());
        let review = twice.apply(Outcome::Unclear("rejected".into()), 5).unwrap();
        assert_eq!(
            (review.state, review.holds_coins()),
            (State::NeedsReview, true)
        );
    }

    #[test]
    fn the_happy_path_completes_then_settles_deeper() {
        let w = broadcast();
        assert_eq!((w.state, w.next_step()), (State::Broadcast, Step::Watch));
        let txid = w.current().unwrap().txid;
        let w = w.apply(confirmed(txid, 1), 4).unwrap();
        assert_eq!(w.state, State::Confirming);
        let w = w.apply(confirmed(txid, 3), 5).unwrap();
        assert_eq!((w.state, w.settled), (State::Completed, false));
        assert!(w.holds_coins(), "coins stay reserved until settled");
        assert_eq!(w.next_step(), Step::Watch);
        let w = w.apply(confirmed(txid, 6), 6).unwrap();
        assert_eq!(
            (w.state, w.settled, w.next_step()),
            (State::Completed, true, Step::Rest)
        );
        assert!(!w.holds_coins());
    }

    #[test]
    fn a_reorg_before_settlement_goes_back_to_confirming_and_rebroadcasts() {
        let w = broadcast();
        let txid = w.current().unwrap().txid;
        let w = w.apply(confirmed(txid, 4), 4).unwrap();
        assert_eq!(w.state, State::Completed);
        let w = w.apply(Outcome::ReorgedOut, 5).unwrap();
        assert_eq!(
            (w.state, w.next_step()),
            (State::Confirming, Step::Broadcast)
        );
        assert!(w.holds_coins());
        let w = w.apply(Outcome::Broadcast { height: 104 }, 6).unwrap();
        assert_eq!(w.next_step(), Step::Watch);
        let w = w.apply(confirmed(txid, 3), 7).unwrap();
        assert_eq!(w.state, State::Completed);
        let settled = w.apply(confirmed(txid, 6), 8).unwrap();
        assert!(settled.apply(Outcome::ReorgedOut, 9).is_err());
    }

    #[test]
    fn replacements_pay_more_stay_under_the_cap_and_any_version_completes() {
        let w = broadcast();
        assert!(w.apply(Outcome::Replaced(attempt(2, 900)), 4).is_err());
        assert!(w.apply(Outcome::Replaced(attempt(2, 20_000)), 4).is_err());
        let w = w.apply(Outcome::Replaced(attempt(2, 2_000)), 4).unwrap();
        assert_eq!((w.attempts.len(), w.next_step()), (2, Step::Broadcast));
        let w = w.apply(Outcome::Broadcast { height: 103 }, 5).unwrap();
        // The first version confirms after all: it completes the saga.
        let first = w.attempts[0].txid;
        let w = w.apply(confirmed(first, 3), 6).unwrap();
        assert_eq!((w.state, w.confirmed), (State::Completed, Some(first)));
        let stranger = Txid::from_byte_array([7; 32]);
        assert!(w.apply(confirmed(stranger, 9), 7).is_err());
    }

    #[test]
    fn cancel_and_failure_release_before_broadcast_only() {
        let w = Withdrawal::new(1, request(), 0)
            .apply(Outcome::Reserved(vec![coin()]), 1)
            .unwrap();
        let c = w.apply(Outcome::Cancelled, 2).unwrap();
        assert_eq!((c.state, c.holds_coins()), (State::Cancelled, false));
        let f = w
            .apply(Outcome::Failed("insufficient funds".into()), 2)
            .unwrap();
        assert_eq!((f.state, f.holds_coins()), (State::Failed, false));
        let b = broadcast();
        assert!(b.apply(Outcome::Cancelled, 4).is_err());
        assert!(b.apply(Outcome::Failed("x".into()), 4).is_err());
        // A SIGNED record written before `sends` existed may have been sent.
        let mut old = serde_json::to_value(signed()).unwrap();
        old.as_object_mut().unwrap().remove("sends");
        let old: Withdrawal = serde_json::from_value(old).unwrap();
        assert_eq!((old.sends, old.may_have_left()), (1, true));
        assert!(old.apply(Outcome::Cancelled, 4).is_err());
    }

    #[test]
    fn an_unclear_outcome_after_signing_needs_an_operator_and_keeps_the_coins() {
        let b = broadcast();
        let r = b
            .apply(Outcome::Unclear("bitcoind timed out".into()), 4)
            .unwrap();
        assert_eq!((r.state, r.next_step()), (State::NeedsReview, Step::Rest));
        assert!(r.holds_coins());
        let early = Withdrawal::new(2, request(), 0);
        let f = early
            .apply(Outcome::Unclear("indexer down".into()), 1)
            .unwrap();
        assert_eq!(f.state, State::Failed);
    }

    #[test]
    fn final_states_accept_nothing_and_the_machine_survives_a_json_round_trip() {
        let w = broadcast();
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<Withdrawal>(&json).unwrap(), w);
        let c = Withdrawal::new(3, request(), 0)
            .apply(Outcome::Cancelled, 1)
            .unwrap();
        for o in [
            Outcome::Reserved(vec![coin()]),
            Outcome::Signed(attempt(1, 1)),
            Outcome::Broadcast { height: 1 },
            Outcome::ReorgedOut,
            Outcome::Cancelled,
        ] {
            assert!(c.apply(o, 2).is_err());
        }
    }

    fn batch_of(n: u64) -> (Vec<Withdrawal>, Withdrawal) {
        let members: Vec<Withdrawal> = (1..=n)
            .map(|id| {
                let mut r = request();
                r.request_id = format!("r{id}");
                r.amount = Amount::from_sat(10_000 * id);
                Withdrawal::new(id, r, 0)
            })
            .collect();
        let b = Withdrawal::new_batch(100, &members, 1);
        (members, b)
    }

    #[test]
    fn a_batch_sums_its_members_and_they_mirror_it_without_running_steps() {
        let (members, b) = batch_of(3);
        assert!(b.is_batch() && !members[0].is_batch());
        assert_eq!(b.request.amount, Amount::from_sat(60_000));
        assert_eq!(b.request.max_fee, Amount::from_sat(30_000));
        assert_eq!(b.next_step(), Step::Reserve);
        let b = b.apply(Outcome::Reserved(vec![coin()]), 2).unwrap();
        let b = b.apply(Outcome::Signed(attempt(1, 1_000)), 3).unwrap();
        let m = members[1].mirrored(&b);
        assert_eq!((m.id, m.batch, m.state), (2, Some(100), State::Signed));
        assert_eq!(m.request, members[1].request);
        assert_eq!(m.attempts, b.attempts);
        // The batch holds the coins and runs the steps; the member neither.
        assert!(!m.holds_coins() && b.holds_coins());
        assert_eq!(
            (m.next_step(), b.next_step()),
            (Step::Rest, Step::Broadcast)
        );
    }

    #[test]
    fn a_member_leaves_until_the_batch_may_have_been_sent() {
        let (_, b) = batch_of(2);
        let reserved = b.apply(Outcome::Reserved(vec![coin()]), 2).unwrap();
        let left = reserved.apply(Outcome::MemberLeft(1), 3).unwrap();
        assert_eq!(left.state, State::Reserved);
        assert_eq!(left.request.amount, Amount::from_sat(20_000));
        assert!(
            left.apply(Outcome::MemberLeft(1), 4).is_err(),
            "not a member now"
        );
        // Signed but unsent: the bytes go and it is signed again without the member.
        let signed = reserved
            .apply(Outcome::Signed(attempt(1, 1_000)), 3)
            .unwrap();
        let resign = signed.apply(Outcome::MemberLeft(2), 4).unwrap();
        assert_eq!(
            (resign.state, resign.next_step()),
            (State::Reserved, Step::Sign)
        );
        assert!(resign.attempts.is_empty() && resign.holds_coins());
        // The last one leaving cancels the batch and frees its coins.
        let gone = resign.apply(Outcome::MemberLeft(1), 5).unwrap();
        assert_eq!((gone.state, gone.holds_coins()), (State::Cancelled, false));
        // Once a send began, nobody leaves.
        let sending = signed.apply(Outcome::Sending, 4).unwrap();
        let refused = sending.apply(Outcome::MemberLeft(1), 5).unwrap_err();
        assert!(
            refused.what.contains("may already be on the network"),
            "{refused}"
        );
        // A withdrawal paid alone has no members.
        assert!(broadcast().apply(Outcome::MemberLeft(1), 4).is_err());
    }

    #[test]
    fn a_stuck_batch_grows_and_a_joiner_unpaid_by_the_settled_version_goes_back() {
        let (members, b) = batch_of(2);
        let b = b.apply(Outcome::Reserved(vec![coin()]), 2).unwrap();
        let b = b.apply(Outcome::Signed(attempt(1, 1_000)), 3).unwrap();
        let b = b.apply(Outcome::Sending, 3).unwrap();
        let b = b.apply(Outcome::Broadcast { height: 10 }, 4).unwrap();
        let mut r = request();
        r.request_id = "late".into();
        let late = Withdrawal::new(7, r, 5);
        assert!(
            signed()
                .apply(Outcome::Grown(attempt(2, 2_000), vec![late.clone()]), 5)
                .is_err(),
            "only a batch grows"
        );
        assert!(b
            .apply(Outcome::Grown(attempt(2, 900), vec![late.clone()]), 5)
            .is_err());
        let grown = b
            .apply(Outcome::Grown(attempt(2, 2_000), vec![late.clone()]), 5)
            .unwrap();
        assert_eq!(grown.members.as_ref().unwrap().len(), 3);
        assert_eq!(grown.request.amount, Amount::from_sat(80_000));
        assert_eq!(grown.next_step(), Step::Broadcast);
        // The joiner's history holds only the versions that pay it.
        let shown = late.mirrored(&grown);
        assert_eq!(shown.attempts, vec![attempt(2, 2_000)]);
        assert_eq!(members[0].mirrored(&grown).attempts.len(), 2);
        let grown = grown.apply(Outcome::Broadcast { height: 12 }, 6).unwrap();
        // The first version confirms after all: it does not pay the joiner.
        let first = grown.attempts[0].txid;
        let done = grown.apply(confirmed(first, 3), 7).unwrap();
        assert_eq!(done.state, State::Completed);
        let shown = late.mirrored(&done);
        assert_eq!((shown.state, shown.confirmed), (State::Broadcast, None));
        assert_eq!(members[1].mirrored(&done).state, State::Completed);
        // Settled: the joiner is no longer a member (the store sends it back).
        let settled = done.apply(confirmed(first, 6), 8).unwrap();
        let ids: Vec<u64> = settled.members.unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 2]);
        let back = shown.requeued(9);
        assert_eq!(
            (back.state, back.batch, back.next_step()),
            (State::Received, None, Step::Reserve)
        );
        assert!(back.failure_reason.unwrap().contains("paid again"));
    }

    #[test]
    fn a_version_the_external_signers_could_complete_is_never_cancelled() {
        let reserved = Withdrawal::new(1, request(), 0)
            .apply(Outcome::Reserved(vec![coin()]), 1)
            .unwrap();
        let pending = Pending {
            psbt: vec![1],
            txid: attempt(1, 1_000).txid,
            fee: Amount::from_sat(1_000),
            fee_rate: 7.0,
            fee_choice: String::new(),
            replacing: false,
        };
        let waiting = reserved
            .apply(Outcome::AwaitingSignatures(pending), 2)
            .unwrap();
        assert_eq!(waiting.next_step(), Step::AwaitSignatures);
        assert!(waiting.apply(Outcome::Cancelled, 3).is_err());
        assert!(
            waiting
                .apply(Outcome::Signed(attempt(2, 1_000)), 3)
                .is_err(),
            "only the pending transaction"
        );
        let signed = waiting
            .apply(Outcome::Signed(attempt(1, 1_000)), 3)
            .unwrap();
        assert!(signed.may_have_left(), "the signers hold it too");
        assert!(signed.apply(Outcome::Cancelled, 4).is_err());
        // Refused at its first send here: it may be out there all the same.
        let sending = signed.apply(Outcome::Sending, 4).unwrap();
        assert!(sending.apply(Outcome::Failed("refused".into()), 5).is_err());
    }
}
