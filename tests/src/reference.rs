//! The reference model: the watched UTXO set and balances computed the plainest way, by
//! walking the chain's transactions in order. Shares nothing with the pipeline.

use std::collections::{BTreeMap, BTreeSet};

use bitcoin::{Block, OutPoint, ScriptBuf};

/// One watched unspent output as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelUtxo {
    /// Satoshis.
    pub value: u64,
    /// The script paid.
    pub script: ScriptBuf,
    /// Creation height.
    pub height: u32,
    /// From a coinbase.
    pub coinbase: bool,
}

/// The watched state after a chain.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Watched unspent outputs.
    pub utxos: BTreeMap<OutPoint, ModelUtxo>,
    /// Height of the last block.
    pub tip: u32,
}

/// Runs `chain` (blocks in height order, starting at `first_height`) against `watched`.
pub fn compute(chain: &[Block], first_height: u32, watched: &BTreeSet<ScriptBuf>) -> Model {
    let mut model = Model::default();
    for (i, block) in chain.iter().enumerate() {
        let height = first_height + i as u32;
        for tx in &block.txdata {
            let coinbase = tx.is_coinbase();
            if !coinbase {
                for input in &tx.input {
                    model.utxos.remove(&input.previous_output);
                }
            }
            let txid = tx.compute_txid();
            for (vout, out) in tx.output.iter().enumerate() {
                let unspendable = out.script_pubkey.is_op_return() || height == 0;
                if watched.contains(&out.script_pubkey) && !unspendable {
                    // A later duplicate (BIP30) simply replaces the earlier entry.
                    model.utxos.insert(
                        OutPoint::new(txid, vout as u32),
                        ModelUtxo {
                            value: out.value.to_sat(),
                            script: out.script_pubkey.clone(),
                            height,
                            coinbase,
                        },
                    );
                }
            }
        }
        model.tip = height;
    }
    model
}

impl Model {
    /// (confirmed, immature, count) over the outputs paying any of `scripts`; a coinbase
    /// output is immature until 100 blocks are built on top of its block.
    pub fn balance(&self, scripts: &BTreeSet<ScriptBuf>) -> (u64, u64, u64) {
        let mut b = (0, 0, 0);
        for u in self.utxos.values().filter(|u| scripts.contains(&u.script)) {
            if u.coinbase && self.tip - u.height < 100 {
                b.1 += u.value;
            } else {
                b.0 += u.value;
            }
            b.2 += 1;
        }
        b
    }
}

/// The chain ending at the highest block reachable from `genesis` through parent links,
/// ignoring the order the blocks came in. For fixtures of equal difficulty this is the
/// most-work chain.
pub fn longest_chain(blocks: &[Block]) -> Vec<Block> {
    let by_hash: BTreeMap<_, _> = blocks.iter().map(|b| (b.block_hash(), b)).collect();
    let height_of = |mut hash| {
        let mut h = 0u32;
        while let Some(b) = by_hash.get(&hash) {
            hash = b.header.prev_blockhash;
            h += 1;
        }
        h
    };
    let tip = blocks
        .iter()
        .max_by_key(|b| height_of(b.block_hash()))
        .expect("at least one block");
    let mut chain = vec![tip.clone()];
    while let Some(parent) = by_hash.get(&chain.last().expect("non-empty").header.prev_blockhash) {
        chain.push((*parent).clone());
    }
    chain.reverse();
    chain
}
