//! The block tree, the active chain and its UTXO set.

use std::collections::HashMap;
use std::sync::Arc;

use bitcoin::blockdata::constants::genesis_block;
use bitcoin::{Amount, Block, BlockHash, Network, OutPoint, TxOut, Txid, Work};

/// Blocks before an output of a coinbase can be spent.
pub(crate) const COINBASE_MATURITY: u32 = 100;

/// Regtest's subsidy: 50 BTC, halving every 150 blocks.
pub(crate) fn subsidy(height: u32) -> Amount {
    let halvings = height / 150;
    if halvings >= 64 {
        return Amount::ZERO;
    }
    Amount::from_sat((50 * 100_000_000u64) >> halvings)
}

/// An unspent output.
#[derive(Debug, Clone)]
pub(crate) struct Coin {
    /// The output.
    pub txout: TxOut,
    /// Height of the block that created it.
    pub height: u32,
    /// Whether a coinbase created it (maturity applies).
    pub coinbase: bool,
}

/// One block of the tree, active or not.
#[derive(Debug)]
pub(crate) struct BlockEntry {
    /// The block.
    pub block: Arc<Block>,
    /// Its hash.
    pub hash: BlockHash,
    /// Its height.
    pub height: u32,
    /// Work of the chain up to and including it.
    pub chainwork: Work,
    /// Invalidated by `invalidateblock` or failed to connect.
    pub failed: bool,
    /// Arrival order: of equal-work tips the first seen wins, as in Core.
    seq: u64,
}

/// A change of the active chain, in the order it happened.
#[derive(Debug, Clone)]
pub(crate) enum TipEvent {
    /// A block left the active chain.
    Disconnected(Arc<Block>, BlockHash),
    /// A block joined the active chain.
    Connected(Arc<Block>, BlockHash),
}

/// Coins spent by one transaction, to restore on disconnect.
type TxUndo = Vec<(OutPoint, Coin)>;

/// Block tree, active chain, UTXO set and a transaction index of the active chain.
pub(crate) struct Chain {
    index: HashMap<BlockHash, BlockEntry>,
    active: Vec<BlockHash>,
    utxos: HashMap<OutPoint, Coin>,
    undo: HashMap<BlockHash, Vec<TxUndo>>,
    tx_index: HashMap<Txid, (BlockHash, usize)>,
    next_seq: u64,
}

impl Chain {
    /// A chain holding only the regtest genesis block.
    pub(crate) fn new() -> Chain {
        let genesis = genesis_block(Network::Regtest);
        let hash = genesis.block_hash();
        let entry = BlockEntry {
            chainwork: genesis.header.work(),
            block: Arc::new(genesis),
            hash,
            height: 0,
            failed: false,
            seq: 0,
        };
        // The genesis coinbase is not a transaction Core can look up or spend.
        let tx_index = HashMap::new();
        let mut index = HashMap::new();
        index.insert(hash, entry);
        Chain {
            index,
            active: vec![hash],
            utxos: HashMap::new(),
            undo: HashMap::new(),
            tx_index,
            next_seq: 1,
        }
    }

    /// The genesis block.
    pub(crate) fn genesis(&self) -> &BlockEntry {
        &self.index[&self.active[0]]
    }

    /// The active tip.
    pub(crate) fn tip(&self) -> &BlockEntry {
        &self.index[self.active.last().unwrap_or(&self.active[0])]
    }

    /// Height of the active tip.
    pub(crate) fn height(&self) -> u32 {
        (self.active.len() - 1) as u32
    }

    /// Any known block.
    pub(crate) fn entry(&self, hash: &BlockHash) -> Option<&BlockEntry> {
        self.index.get(hash)
    }

    /// The active block at a height.
    pub(crate) fn at_height(&self, height: u32) -> Option<&BlockEntry> {
        self.active.get(height as usize).map(|h| &self.index[h])
    }

    /// Whether a block is in the active chain.
    pub(crate) fn is_active(&self, hash: &BlockHash) -> bool {
        self.index
            .get(hash)
            .is_some_and(|e| self.active.get(e.height as usize) == Some(hash))
    }

    /// The best known header height among blocks not marked failed.
    pub(crate) fn best_header_height(&self) -> u32 {
        self.index
            .values()
            .filter(|e| !e.failed)
            .map(|e| e.height)
            .max()
            .unwrap_or(0)
    }

    /// An unspent output of the active chain.
    pub(crate) fn coin(&self, outpoint: &OutPoint) -> Option<&Coin> {
        self.utxos.get(outpoint)
    }

    /// The whole UTXO set.
    pub(crate) fn utxos(&self) -> &HashMap<OutPoint, Coin> {
        &self.utxos
    }

    /// Block and position of a transaction of the active chain.
    pub(crate) fn tx_location(&self, txid: &Txid) -> Option<(BlockHash, usize)> {
        self.tx_index.get(txid).copied()
    }

    /// Median time of the 11 blocks ending at `hash`.
    pub(crate) fn median_time_past(&self, hash: &BlockHash) -> u32 {
        let mut times = Vec::with_capacity(11);
        let mut cur = self.index.get(hash);
        while let Some(entry) = cur {
            times.push(entry.block.header.time);
            if times.len() == 11 || entry.height == 0 {
                break;
            }
            cur = self.index.get(&entry.block.header.prev_blockhash);
        }
        times.sort_unstable();
        times.get(times.len() / 2).copied().unwrap_or(0)
    }

    /// Adds a block to the tree (not to the active chain). Its parent must be known.
    pub(crate) fn add_block(&mut self, block: Block) -> Result<BlockHash, String> {
        let hash = block.block_hash();
        if self.index.contains_key(&hash) {
            return Ok(hash);
        }
        let parent = self
            .index
            .get(&block.header.prev_blockhash)
            .ok_or_else(|| "prev-blk-not-found".to_string())?;
        if !block.header.target().is_met_by(hash) {
            return Err("high-hash".into());
        }
        if !block.check_merkle_root() {
            return Err("bad-txnmrklroot".into());
        }
        let entry = BlockEntry {
            chainwork: parent.chainwork + block.header.work(),
            height: parent.height + 1,
            block: Arc::new(block),
            hash,
            failed: false,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        self.index.insert(hash, entry);
        Ok(hash)
    }

    fn parent_of(&self, hash: &BlockHash) -> BlockHash {
        self.index[hash].block.header.prev_blockhash
    }

    /// Whether the block and all its ancestors are not failed.
    fn chain_valid(&self, hash: &BlockHash, memo: &mut HashMap<BlockHash, bool>) -> bool {
        let mut path = Vec::new();
        let mut cur = *hash;
        let result = loop {
            if let Some(&known) = memo.get(&cur) {
                break known;
            }
            let entry = &self.index[&cur];
            if entry.failed {
                break false;
            }
            path.push(cur);
            if entry.height == 0 {
                break true;
            }
            cur = entry.block.header.prev_blockhash;
        };
        for h in path {
            memo.insert(h, result);
        }
        result
    }

    fn best_candidate(&self) -> BlockHash {
        let mut memo = HashMap::new();
        let mut best = self.genesis();
        for entry in self.index.values() {
            let better = (entry.chainwork, std::cmp::Reverse(entry.seq))
                > (best.chainwork, std::cmp::Reverse(best.seq));
            if better && self.chain_valid(&entry.hash, &mut memo) {
                best = entry;
            }
        }
        best.hash
    }

    /// Makes the most-work valid chain active, returning the disconnects and connects.
    pub(crate) fn activate_best(&mut self) -> Vec<TipEvent> {
        let mut events = Vec::new();
        loop {
            let best = self.best_candidate();
            if best == self.tip().hash {
                return events;
            }
            let mut path = Vec::new();
            let mut cur = best;
            while !self.is_active(&cur) {
                path.push(cur);
                cur = self.parent_of(&cur);
            }
            while self.tip().hash != cur {
                events.push(self.disconnect_tip());
            }
            for hash in path.into_iter().rev() {
                match self.connect(hash) {
                    Ok(()) => {
                        events.push(TipEvent::Connected(self.index[&hash].block.clone(), hash))
                    }
                    Err(reason) => {
                        tracing::warn!(%hash, %reason, "block failed to connect");
                        if let Some(e) = self.index.get_mut(&hash) {
                            e.failed = true;
                        }
                        break;
                    }
                }
            }
        }
    }

    fn disconnect_tip(&mut self) -> TipEvent {
        let hash = self.tip().hash;
        let block = self.index[&hash].block.clone();
        let undo = self.undo.remove(&hash).unwrap_or_default();
        self.rollback(&block, &undo);
        self.active.pop();
        TipEvent::Disconnected(block, hash)
    }

    /// Undoes the first `undo.len()` transactions of a block, newest first.
    fn rollback(&mut self, block: &Block, undo: &[TxUndo]) {
        for (tx, spent) in block.txdata.iter().zip(undo).rev() {
            let txid = tx.compute_txid();
            for vout in 0..tx.output.len() as u32 {
                self.utxos.remove(&OutPoint { txid, vout });
            }
            self.tx_index.remove(&txid);
            for (outpoint, coin) in spent {
                self.utxos.insert(*outpoint, coin.clone());
            }
        }
    }

    fn connect(&mut self, hash: BlockHash) -> Result<(), String> {
        let entry = &self.index[&hash];
        let (block, height) = (entry.block.clone(), entry.height);
        let mut undo: Vec<TxUndo> = Vec::with_capacity(block.txdata.len());
        let result = self.apply_txs(&block, height, hash, &mut undo);
        if result.is_err() {
            self.rollback(&block, &undo);
            return result;
        }
        self.undo.insert(hash, undo);
        self.active.push(hash);
        Ok(())
    }

    fn apply_txs(
        &mut self,
        block: &Block,
        height: u32,
        hash: BlockHash,
        undo: &mut Vec<TxUndo>,
    ) -> Result<(), String> {
        if block.txdata.first().is_none_or(|tx| !tx.is_coinbase()) {
            return Err("bad-cb-missing".into());
        }
        let mut fees = Amount::ZERO;
        for (pos, tx) in block.txdata.iter().enumerate() {
            let mut spent = Vec::new();
            let mut failure = None;
            if pos > 0 {
                let mut value_in = Amount::ZERO;
                for input in &tx.input {
                    match self.utxos.remove(&input.previous_output) {
                        Some(coin) => {
                            if coin.coinbase && height - coin.height < COINBASE_MATURITY {
                                failure = Some("bad-txns-premature-spend-of-coinbase");
                            }
                            value_in += coin.txout.value;
                            spent.push((input.previous_output, coin));
                        }
                        None => failure = Some("bad-txns-inputs-missingorspent"),
                    }
                }
                let value_out: Amount = tx.output.iter().map(|o| o.value).sum();
                match value_in.checked_sub(value_out) {
                    Some(fee) => fees += fee,
                    None => failure = failure.or(Some("bad-txns-in-belowout")),
                }
            }
            let txid = tx.compute_txid();
            // Record the spends even on failure so the rollback restores them.
            undo.push(spent);
            if let Some(reason) = failure {
                return Err(reason.into());
            }
            for (vout, out) in tx.output.iter().enumerate() {
                if out.script_pubkey.is_op_return() || out.script_pubkey.len() > 10_000 {
                    continue;
                }
                let coin = Coin {
                    txout: out.clone(),
                    height,
                    coinbase: pos == 0,
                };
                self.utxos.insert(
                    OutPoint {
                        txid,
                        vout: vout as u32,
                    },
                    coin,
                );
            }
            self.tx_index.insert(txid, (hash, pos));
        }
        let coinbase_out: Amount = block.txdata[0].output.iter().map(|o| o.value).sum();
        if coinbase_out > subsidy(height) + fees {
            return Err("bad-cb-amount".into());
        }
        Ok(())
    }

    /// Marks a block failed (its descendants follow) and moves to the best valid chain.
    pub(crate) fn invalidate(&mut self, hash: &BlockHash) -> Result<Vec<TipEvent>, String> {
        let entry = self.index.get_mut(hash).ok_or("Block not found")?;
        if entry.height == 0 {
            return Err("Cannot invalidate the genesis block".into());
        }
        entry.failed = true;
        let mut events = Vec::new();
        if self.is_active(hash) {
            while self.tip().hash != self.parent_of(hash) {
                events.push(self.disconnect_tip());
            }
        }
        events.extend(self.activate_best());
        Ok(events)
    }

    /// Clears the failed flag of a block, its ancestors and descendants, then activates
    /// the best chain.
    pub(crate) fn reconsider(&mut self, hash: &BlockHash) -> Result<Vec<TipEvent>, String> {
        let height = self.index.get(hash).ok_or("Block not found")?.height;
        let mut clear = Vec::new();
        for entry in self.index.values() {
            if entry.height >= height && self.ancestor(&entry.hash, height) == Some(*hash) {
                clear.push(entry.hash);
            }
        }
        let mut cur = Some(*hash);
        while let Some(h) = cur {
            clear.push(h);
            let e = &self.index[&h];
            cur = (e.height > 0).then_some(e.block.header.prev_blockhash);
        }
        for h in clear {
            if let Some(e) = self.index.get_mut(&h) {
                e.failed = false;
            }
        }
        Ok(self.activate_best())
    }

    /// The ancestor of a block at a height.
    fn ancestor(&self, hash: &BlockHash, height: u32) -> Option<BlockHash> {
        let mut cur = self.index.get(hash)?;
        while cur.height > height {
            cur = self.index.get(&cur.block.header.prev_blockhash)?;
        }
        (cur.height == height).then_some(cur.hash)
    }
}
