//! A generator of valid-proof-of-work regtest chains with realistic transactions: spends of
//! earlier outputs (also within one block), coinbase maturity respected, a mix of script
//! types, zero-value and OP_RETURN outputs, witnesses. Scripts are not signed: indexing
//! does not verify them.

use bitcoin::absolute::LockTime;
use bitcoin::blockdata::constants::genesis_block;
use bitcoin::blockdata::opcodes::all::{OP_CHECKMULTISIG, OP_CHECKSIG, OP_PUSHNUM_1, OP_PUSHNUM_2};
use bitcoin::hashes::Hash;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::transaction::Version;
use bitcoin::{
    block, Amount, Block, BlockHash, CompactTarget, Network, OutPoint, ScriptBuf, Sequence,
    Transaction, TxIn, TxMerkleNode, TxOut, Witness,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A spendable coin in the generator's wallet.
#[derive(Clone, Debug)]
struct Coin {
    outpoint: OutPoint,
    value: u64,
    height: u32,
    coinbase: bool,
}

/// Builds a chain block by block. Clone it to fork: both copies share the history so far.
#[derive(Clone)]
pub struct ChainGen {
    rng: StdRng,
    blocks: Vec<Block>,
    pool: Vec<Coin>,
    palette: Vec<ScriptBuf>,
}

/// `n` scripts of every kind an index must handle: P2PK, P2PKH, P2SH, P2WPKH, P2WSH, P2TR,
/// bare multisig, non-standard and the empty script.
pub fn script_palette(seed: u64, n: usize) -> Vec<ScriptBuf> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let mut key = [0u8; 33];
            rng.fill(&mut key[..]);
            key[0] = 2 + (key[0] & 1);
            let h20: [u8; 20] = rng.gen();
            let h32: [u8; 32] = rng.gen();
            match i % 9 {
                0 => Builder::new()
                    .push_slice(key)
                    .push_opcode(OP_CHECKSIG)
                    .into_script(),
                1 => ScriptBuf::new_p2pkh(&bitcoin::PubkeyHash::from_byte_array(h20)),
                2 => ScriptBuf::new_p2sh(&bitcoin::ScriptHash::from_byte_array(h20)),
                3 => ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(h20)),
                4 => ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_byte_array(h32)),
                5 => {
                    let mut s = vec![0x51, 0x20];
                    s.extend_from_slice(&h32);
                    ScriptBuf::from_bytes(s)
                }
                6 => Builder::new()
                    .push_opcode(OP_PUSHNUM_1)
                    .push_slice(key)
                    .push_slice(key)
                    .push_opcode(OP_PUSHNUM_2)
                    .push_opcode(OP_CHECKMULTISIG)
                    .into_script(),
                7 => ScriptBuf::from_bytes(h20[..(i % 20) + 1].to_vec()),
                _ => {
                    if i == 8 {
                        ScriptBuf::new()
                    } else {
                        ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array(h20))
                    }
                }
            }
        })
        .collect()
}

/// A coinbase transaction: BIP34 height push followed by `extra` in the script_sig.
pub fn coinbase_tx(
    height: u32,
    extra: &[u8],
    witness: Witness,
    outputs: Vec<TxOut>,
) -> Transaction {
    let push = PushBytesBuf::try_from(extra.to_vec()).expect("short extra nonce");
    let script_sig = Builder::new()
        .push_int(i64::from(height))
        .push_slice(push)
        .into_script();
    Transaction {
        version: Version::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig,
            sequence: Sequence::MAX,
            witness,
        }],
        output: outputs,
    }
}

/// Makes `block`'s coinbase commit to its witnesses (BIP141) when any transaction has
/// witness data: a reserved value of zeros in the coinbase witness and the commitment as
/// its last output. The merkle root is the caller's to compute afterwards (the coinbase
/// changed). A block without witness data is left as it is.
pub fn commit_witnesses(block: &mut Block) {
    let segwit = block
        .txdata
        .iter()
        .skip(1)
        .any(|t| t.input.iter().any(|i| !i.witness.is_empty()));
    if !segwit {
        return;
    }
    let reserved = [0u8; 32];
    let root = block.witness_root().expect("at least the coinbase");
    let commitment = Block::compute_witness_commitment(&root, &reserved);
    let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
    script.extend_from_slice(commitment.as_byte_array());
    let coinbase = &mut block.txdata[0];
    coinbase.input[0].witness = Witness::from_slice(&[reserved]);
    coinbase
        .output
        .retain(|o| !o.script_pubkey.as_bytes().starts_with(&script[..6]));
    coinbase.output.push(TxOut {
        value: Amount::ZERO,
        script_pubkey: ScriptBuf::from_bytes(script),
    });
}

/// An OP_RETURN output script carrying `data`.
pub fn op_return(data: &[u8]) -> ScriptBuf {
    let push = PushBytesBuf::try_from(data.to_vec()).expect("short data");
    ScriptBuf::new_op_return(push)
}

impl ChainGen {
    /// A chain holding only the regtest genesis block.
    pub fn new(seed: u64, palette: Vec<ScriptBuf>) -> Self {
        assert!(!palette.is_empty(), "a palette of scripts to pay");
        ChainGen {
            rng: StdRng::seed_from_u64(seed),
            blocks: vec![genesis_block(Network::Regtest)],
            pool: Vec::new(),
            palette,
        }
    }

    /// Changes the randomness from here on (so a clone makes a different branch).
    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Every block from genesis.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Height of the tip.
    pub fn height(&self) -> u32 {
        self.blocks.len() as u32 - 1
    }

    fn pick_script(&mut self) -> ScriptBuf {
        let i = self.rng.gen_range(0..self.palette.len());
        self.palette[i].clone()
    }

    /// A coinbase for `height`, unique by its BIP34 height push and a random tag.
    pub fn coinbase(&mut self, height: u32, outputs: Vec<TxOut>) -> Transaction {
        let tag: u64 = self.rng.gen();
        coinbase_tx(height, &tag.to_le_bytes(), Witness::new(), outputs)
    }

    /// Adds a block with a random coinbase and `txs` random transactions.
    pub fn add_random_block(&mut self, txs: usize) -> &Block {
        let height = self.height() + 1;
        let mut cb_outputs = vec![TxOut {
            value: Amount::from_sat(50 * 100_000_000),
            script_pubkey: self.pick_script(),
        }];
        if self.rng.gen_bool(0.3) {
            cb_outputs.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: op_return(b"commitment"),
            });
        }
        let coinbase = self.coinbase(height, cb_outputs);
        let mut body = Vec::new();
        for _ in 0..txs {
            match self.random_tx(height) {
                Some(tx) => body.push(tx),
                None => break,
            }
        }
        self.add_block(coinbase, body)
    }

    /// A transaction spending 1..3 mature coins (possibly created earlier in this block).
    fn random_tx(&mut self, height: u32) -> Option<Transaction> {
        let mature: Vec<usize> = (0..self.pool.len())
            .filter(|&i| !self.pool[i].coinbase || height >= self.pool[i].height + 100)
            .collect();
        if mature.is_empty() {
            return None;
        }
        let n_in = self.rng.gen_range(1..=3.min(mature.len()));
        let mut picked: Vec<usize> = Vec::new();
        while picked.len() < n_in {
            let i = mature[self.rng.gen_range(0..mature.len())];
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked.sort_unstable_by(|a, b| b.cmp(a));
        let coins: Vec<Coin> = picked
            .into_iter()
            .map(|i| self.pool.swap_remove(i))
            .collect();
        let total: u64 = coins.iter().map(|c| c.value).sum();
        let fee = 1000.min(total);
        let n_out = self.rng.gen_range(1..=4);
        let mut remaining = total - fee;
        let mut output = Vec::new();
        let same_script = self.rng.gen_bool(0.2).then(|| self.pick_script());
        for k in 0..n_out {
            let value = if k + 1 == n_out {
                remaining
            } else if self.rng.gen_bool(0.1) {
                0
            } else {
                self.rng.gen_range(0..=remaining)
            };
            remaining -= value;
            let script_pubkey = match &same_script {
                Some(s) => s.clone(),
                None => self.pick_script(),
            };
            output.push(TxOut {
                value: Amount::from_sat(value),
                script_pubkey,
            });
        }
        if self.rng.gen_bool(0.15) {
            output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: op_return(b"memo"),
            });
        }
        let input = coins
            .iter()
            .map(|c| {
                let mut witness = Witness::new();
                if self.rng.gen_bool(0.5) {
                    witness.push([0x30u8; 71]);
                    witness.push([0x02u8; 33]);
                }
                TxIn {
                    previous_output: c.outpoint,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::ENABLE_RBF_NO_LOCKTIME,
                    witness,
                }
            })
            .collect();
        let tx = Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input,
            output,
        };
        // Its outputs are spendable by later transactions of the same block.
        self.add_coins(&tx, height);
        Some(tx)
    }

    fn add_coins(&mut self, tx: &Transaction, height: u32) {
        let txid = tx.compute_txid();
        for (vout, out) in tx.output.iter().enumerate() {
            if !out.script_pubkey.is_op_return() {
                self.pool.push(Coin {
                    outpoint: OutPoint::new(txid, vout as u32),
                    value: out.value.to_sat(),
                    height,
                    coinbase: tx.is_coinbase(),
                });
            }
        }
    }

    /// Appends a block of exactly these transactions, mined to regtest difficulty.
    /// Coins the body spends are not tracked: use it for hand-made edge cases.
    pub fn add_block(&mut self, coinbase: Transaction, body: Vec<Transaction>) -> &Block {
        let height = self.height() + 1;
        let mut txdata = vec![coinbase];
        txdata.extend(body);
        let prev = self.blocks.last().expect("genesis at least");
        let mut block = Block {
            header: block::Header {
                version: block::Version::from_consensus(0x2000_0000),
                prev_blockhash: prev.block_hash(),
                merkle_root: TxMerkleNode::all_zeros(),
                time: prev.header.time + 600,
                bits: CompactTarget::from_consensus(0x207f_ffff),
                nonce: 0,
            },
            txdata,
        };
        commit_witnesses(&mut block);
        self.add_coins(&block.txdata[0].clone(), height);
        block.header.merkle_root = block.compute_merkle_root().expect("at least the coinbase");
        while block.header.validate_pow(block.header.target()).is_err() {
            block.header.nonce += 1;
        }
        self.blocks.push(block);
        self.blocks.last().expect("just pushed")
    }

    /// Hash of the tip.
    pub fn tip_hash(&self) -> BlockHash {
        self.blocks.last().expect("genesis at least").block_hash()
    }
}
