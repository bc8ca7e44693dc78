//! The Temporal engine (`engine = "temporal"`): each withdrawal is a workflow whose id is
//! its request id, driving the same saga state machine as the embedded engine
//! ([`crate::saga`]); its side effects are activities ([`activities`]) that any worker of
//! the task queue may run; each hot wallet's coin reservations belong to one long-lived
//! workflow ([`hot_wallet`]), so two workers on two machines never hold the same coin;
//! the chain reaches the workflows as signals from the indexer's event stream
//! ([`adapter`]); the wallet's workflow also keeps its payout queue, and a batch is a
//! withdrawal workflow paying its members, which follow it ([`batching`]); each hot
//! wallet's [`balancing`] runs from a workflow of its own; the
//! `orchestrator.v1.Withdrawals` API is served from workflow starts,
//! queries and updates ([`service`]), external signers' `orchestrator.v1.Signatures` from
//! the workflows waiting for them ([`signatures`]); [`worker`] wires them into `orchestrator run`.

pub mod activities;
pub mod adapter;
pub mod balancing;
pub mod batching;
pub mod hot_wallet;
pub mod service;
pub mod signatures;
pub mod withdrawal;
pub mod worker;

use serde::{Deserialize, Serialize};
use temporalio_common::search_attributes::SearchAttributeKey;

/// The withdrawal's numeric id, for the API's `id` (search attribute, Int).
pub const WITHDRAWAL_ID: SearchAttributeKey<i64> = SearchAttributeKey::int("WithdrawalId");
/// Its state as the API names it (search attribute, Keyword).
pub const WITHDRAWAL_STATE: SearchAttributeKey<String> =
    SearchAttributeKey::keyword("WithdrawalState");
/// Whether a version of it waits for external signatures (search attribute, Bool; set
/// only on withdrawals that ever waited).
pub const WITHDRAWAL_AWAITS_SIGNATURES: SearchAttributeKey<bool> =
    SearchAttributeKey::bool("WithdrawalAwaitsSignatures");
/// The wallet paying (search attribute, Keyword).
pub const WITHDRAWAL_WALLET: SearchAttributeKey<String> =
    SearchAttributeKey::keyword("WithdrawalWallet");

/// Workflow ids starting with this are the orchestrator's own (hot wallets): a request id
/// may not start with it.
pub const RESERVED_PREFIX: &str = "orchestrator.";

/// What the workflow needs of the payment policy, fixed when it starts (a workflow's
/// decisions must replay the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkflowPolicy {
    /// Confirmations that complete it.
    pub confirmations: u32,
    /// Confirmations after which its coins are released.
    pub settle_at: u32,
    /// Blocks unmined before a replacement.
    pub bump_after_blocks: u32,
    /// Longest wait between two looks at the chain when no signal comes, seconds.
    pub poll_secs: u64,
    /// Payout queues (`None`: each withdrawal is paid alone). Left out of the payload
    /// when off, so workflows started before it existed replay unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::executor::Batching>,
}

impl WorkflowPolicy {
    /// The workflow's share of the executor's policy.
    pub fn of(policy: &crate::executor::Policy) -> WorkflowPolicy {
        WorkflowPolicy {
            confirmations: policy.confirmations,
            settle_at: policy.settle_at,
            bump_after_blocks: policy.bump_after_blocks,
            poll_secs: 30,
            batch: policy.batch,
        }
    }
}

/// The API's numeric id of a request id: 63 bits of its SHA-256 (never 0). Any worker and
/// any API server compute the same one without asking anybody.
pub fn withdrawal_id(request_id: &str) -> u64 {
    use bitcoin::hashes::{sha256, Hash};
    let hash = sha256::Hash::hash(request_id.as_bytes()).to_byte_array();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    (u64::from_be_bytes(first) >> 1).max(1)
}

/// The workflow id of a hot wallet's balancing.
pub fn balancing_workflow_id(wallet: &str) -> String {
    format!("{RESERVED_PREFIX}balancing.{wallet}")
}

/// The workflow id (and request id) of the batch whose first member is `first_member`:
/// a withdrawal is proposed as the first of at most one batch, so a repeated start finds
/// the same one.
pub fn batch_workflow_id(first_member: &str) -> String {
    format!("{RESERVED_PREFIX}batch.{first_member}")
}

/// The workflow id of a wallet's reservations.
pub fn hot_wallet_workflow_id(wallet: &str) -> String {
    format!("{RESERVED_PREFIX}hot-wallet.{wallet}")
}
