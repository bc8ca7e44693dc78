//! Plain value types shared by every stage: script ids, UTXOs, balances, transfers.

use bitcoin::hashes::{sha256, Hash};
use bitcoin::{OutPoint, Script, ScriptBuf, Txid};

/// Blocks a coinbase output must wait before it counts as spendable, as Core's wallet counts:
/// a coinbase at height `c` is immature while the tip is below `c + COINBASE_MATURITY`.
pub const COINBASE_MATURITY: u32 = 100;

/// The index key of a watched script: SHA-256 of the script_pubkey, so every script (P2PK,
/// bare multisig, non-standard) has a fixed-size key whether or not it has an address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ScriptId(pub [u8; 32]);

impl ScriptId {
    /// The id of `script`.
    pub fn of(script: &Script) -> Self {
        ScriptId(sha256::Hash::hash(script.as_bytes()).to_byte_array())
    }
}

/// A wallet's compact numeric id; names map to ids in the `wallets` column family.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct WalletId(pub u32);

/// An unspent output paying a watched script.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Utxo {
    /// Value in satoshis.
    pub value: u64,
    /// Height of the block that created it.
    pub height: u32,
    /// Created by a coinbase transaction (subject to maturity).
    pub coinbase: bool,
    /// Id of `script`.
    pub script_id: ScriptId,
    /// The output's script_pubkey.
    pub script: ScriptBuf,
}

impl Utxo {
    /// Whether this output is still immature when the tip is at `tip_height`.
    pub fn is_immature_at(&self, tip_height: u32) -> bool {
        self.coinbase && tip_height < self.height.saturating_add(COINBASE_MATURITY)
    }
}

/// Aggregate of a script's or a wallet's unspent outputs.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Balance {
    /// Spendable satoshis (non-coinbase, or mature coinbase).
    pub confirmed: u64,
    /// Satoshis in coinbase outputs that have not matured yet.
    pub immature: u64,
    /// Number of unspent outputs.
    pub utxo_count: u64,
}

impl Balance {
    /// True when nothing is left: such balances are deleted, not stored as zero, so the
    /// stored state depends only on the UTXO set.
    pub fn is_empty(&self) -> bool {
        *self == Balance::default()
    }

    /// Adds an unspent output, counting it as immature or not.
    pub fn add(&mut self, value: u64, immature: bool) {
        if immature {
            self.immature += value;
        } else {
            self.confirmed += value;
        }
        self.utxo_count += 1;
    }

    /// Removes an unspent output added with the same arguments.
    pub fn remove(&mut self, value: u64, immature: bool) {
        let field = if immature {
            &mut self.immature
        } else {
            &mut self.confirmed
        };
        *field = field
            .checked_sub(value)
            .expect("balance covers every utxo it counted");
        self.utxo_count = self
            .utxo_count
            .checked_sub(1)
            .expect("balance counts every utxo it holds");
    }

    /// This balance moved by what another one moved from `from` to `to`; `None` if that
    /// would go below zero.
    pub fn moved(&self, from: &Balance, to: &Balance) -> Option<Balance> {
        let shift = |v: u64, a: u64, b: u64| v.checked_add(b)?.checked_sub(a);
        Some(Balance {
            confirmed: shift(self.confirmed, from.confirmed, to.confirmed)?,
            immature: shift(self.immature, from.immature, to.immature)?,
            utxo_count: shift(self.utxo_count, from.utxo_count, to.utxo_count)?,
        })
    }

    /// Moves a matured coinbase output from immature to confirmed.
    pub fn mature(&mut self, value: u64) {
        self.immature = self
            .immature
            .checked_sub(value)
            .expect("a maturing output was counted as immature");
        self.confirmed += value;
    }
}

/// A watched output received in a transaction.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Received {
    /// Output index.
    pub vout: u32,
    /// Id of the script paid.
    pub script_id: ScriptId,
    /// Value in satoshis.
    pub value: u64,
}

/// A watched output spent by a transaction.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Spent {
    /// Input index in the spending transaction.
    pub input: u32,
    /// The outpoint spent.
    pub outpoint: OutPoint,
    /// Id of the script that owned it.
    pub script_id: ScriptId,
    /// Value in satoshis.
    pub value: u64,
}

/// What one confirmed transaction did to watched scripts.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Transfer {
    /// The transaction.
    pub txid: Txid,
    /// Confirming block height.
    pub height: u32,
    /// Confirming block hash.
    pub block_hash: bitcoin::BlockHash,
    /// Position of the transaction in its block.
    pub tx_index: u32,
    /// Watched outputs it created.
    pub received: Vec<Received>,
    /// Watched outputs it spent.
    pub spent: Vec<Spent>,
}

impl Transfer {
    /// The watched scripts it involves, each once.
    pub fn script_ids(&self) -> std::collections::BTreeSet<ScriptId> {
        let received = self.received.iter().map(|r| r.script_id);
        received
            .chain(self.spent.iter().map(|s| s.script_id))
            .collect()
    }
}

/// What happened, as recorded in the event log for consumers to replay.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventKind {
    /// A block joined the indexed chain.
    BlockConnected = 1,
    /// A block left the indexed chain (reorg).
    BlockDisconnected = 2,
    /// A transfer confirmed in a connected block.
    TransferConfirmed = 3,
    /// A confirmed transfer's block was disconnected.
    TransferReorgedOut = 4,
    /// A transfer entered the mempool (height and hash: the tip then).
    TransferSeen = 5,
    /// A mempool transfer was replaced by a conflicting transaction.
    TransferReplaced = 6,
    /// A mempool transfer left the mempool unmined, without a known conflict.
    TransferEvicted = 7,
}

/// One entry of the event log.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The block's height.
    pub height: u32,
    /// The block's hash.
    pub block_hash: bitcoin::BlockHash,
    /// The transfer's txid, for transfer events.
    pub txid: Option<Txid>,
    /// For transfer events, the wallets whose scripts the transaction pays or spends, in
    /// id order, as they were when it was logged (a mempool transaction may be gone by the
    /// time a consumer reads its event). Empty for block events and for transfer events
    /// logged before wallets were recorded.
    pub wallets: Vec<WalletId>,
}
