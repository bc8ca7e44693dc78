//! Filter stage: keep every input (spends are matched later against the watched UTXO set)
//! and only the outputs paying watched scripts. The bloom half of the filter runs inside
//! the parallel parse workers ([`super::parse`]), so unwatched outputs are never copied out
//! of the block; the exact lookup of the bloom hits runs in this stage.

use bitcoin::{block, BlockHash, OutPoint, ScriptBuf, Txid};

use super::parse::ParsedBlock;
use crate::store::{Reader, Store, StoreError};
use crate::types::{ScriptId, WalletId};

/// An output paying a watched script.
pub struct WatchedOutput {
    /// Output index.
    pub vout: u32,
    /// Value in satoshis.
    pub value: u64,
    /// The script.
    pub script: ScriptBuf,
    /// Its id.
    pub script_id: ScriptId,
    /// Wallets watching it.
    pub wallets: Vec<WalletId>,
}

/// A transaction after filtering.
pub struct FilteredTx {
    /// Its txid.
    pub txid: Txid,
    /// Whether it is the coinbase.
    pub coinbase: bool,
    /// Every outpoint it spends.
    pub inputs: Vec<OutPoint>,
    /// Its outputs that pay watched scripts.
    pub watched: Vec<WatchedOutput>,
}

/// A block after filtering.
pub struct FilteredBlock {
    /// Height.
    pub height: u32,
    /// Hash.
    pub hash: BlockHash,
    /// Header.
    pub header: block::Header,
    /// Serialized size.
    pub size: usize,
    /// Transactions in block order.
    pub txs: Vec<FilteredTx>,
}

/// The filter stage's view of the watch set: exact lookups of the bloom pass's survivors.
pub struct Filter<'a> {
    /// The watch column family.
    pub store: &'a Store,
}

impl Filter<'_> {
    /// Keeps the block's inputs and its outputs that pay watched scripts.
    pub fn filter_block(&self, block: ParsedBlock) -> Result<FilteredBlock, StoreError> {
        let mut txs = Vec::with_capacity(block.txs.len());
        for tx in block.txs {
            let mut watched = Vec::new();
            for (vout, out) in tx.outputs {
                let script_id = ScriptId::of(&out.script_pubkey);
                let Some(rec) = self.store.watch(&script_id)? else {
                    continue; // bloom false positive
                };
                watched.push(WatchedOutput {
                    vout,
                    value: out.value.to_sat(),
                    script: out.script_pubkey,
                    script_id,
                    wallets: rec.wallets,
                });
            }
            txs.push(FilteredTx {
                txid: tx.txid,
                coinbase: tx.coinbase,
                inputs: tx.inputs,
                watched,
            });
        }
        Ok(FilteredBlock {
            height: block.height,
            hash: block.hash,
            header: block.header,
            size: block.size,
            txs,
        })
    }
}
