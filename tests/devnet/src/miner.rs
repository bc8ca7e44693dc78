//! Block assembly: mempool packages by fee rate, filler transactions, coinbase, PoW.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version};
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_PUSHBYTES_0;
use bitcoin::script::{Builder, PushBytesBuf};
use bitcoin::transaction::Version as TxVersion;
use bitcoin::{
    Amount, Block, CompactTarget, OutPoint, ScriptBuf, Sequence, Transaction, TxIn, TxMerkleNode,
    TxOut, Txid, Witness,
};
use rand::Rng;

use crate::chain::{subsidy, Chain, COINBASE_MATURITY};
use crate::mempool::Mempool;
use crate::validation::verify_scripts;
use crate::wallet::Wallet;

/// Regtest's (minimum) difficulty.
pub(crate) const REGTEST_BITS: u32 = 0x207f_ffff;
/// Block weight limit, less room for the coinbase as Core reserves.
const MAX_TEMPLATE_WEIGHT: u64 = 4_000_000 - 4_000;

/// What to put in the next block besides the mempool.
pub(crate) struct Template<'a> {
    /// Mempool packages below this fee rate (sat/vB) stay out.
    pub min_fee_rate: u64,
    /// How many filler transactions to add from the wallet.
    pub fillers: usize,
    /// Where the coinbase pays.
    pub coinbase_script: &'a ScriptBuf,
}

/// Builds and solves the next block on the active tip.
pub(crate) fn build_block(
    chain: &Chain,
    mempool: &Mempool,
    wallet: &Wallet,
    template: &Template<'_>,
    rng: &mut impl Rng,
) -> Block {
    let height = chain.height() + 1;
    let mut txs: Vec<Transaction> = Vec::new();
    let mut weight = 0u64;
    let mut fees = Amount::ZERO;
    select_mempool(
        mempool,
        template.min_fee_rate,
        &mut txs,
        &mut weight,
        &mut fees,
    );
    add_fillers(
        chain,
        mempool,
        wallet,
        template.fillers,
        rng,
        &mut txs,
        &mut weight,
        &mut fees,
    );

    let coinbase = Transaction {
        version: TxVersion::TWO,
        lock_time: LockTime::ZERO,
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: Builder::new()
                .push_int(i64::from(height))
                .push_opcode(OP_PUSHBYTES_0)
                .into_script(),
            sequence: Sequence::MAX,
            witness: Witness::from_slice(&[[0u8; 32]]),
        }],
        output: vec![TxOut {
            value: subsidy(height) + fees,
            script_pubkey: template.coinbase_script.clone(),
        }],
    };
    let tip = chain.tip();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0);
    let mut block = Block {
        header: Header {
            version: Version::from_consensus(0x2000_0000),
            prev_blockhash: tip.hash,
            merkle_root: TxMerkleNode::all_zeros(),
            time: now.max(chain.median_time_past(&tip.hash) + 1),
            bits: CompactTarget::from_consensus(REGTEST_BITS),
            nonce: 0,
        },
        txdata: std::iter::once(coinbase).chain(txs).collect(),
    };
    // Core always commits to witnesses once segwit is active, even with no witness tx.
    if let Some(root) = block.witness_root() {
        let commitment = Block::compute_witness_commitment(&root, &[0u8; 32]);
        let mut data = vec![0xaa, 0x21, 0xa9, 0xed];
        data.extend_from_slice(commitment.as_ref());
        if let Ok(push) = PushBytesBuf::try_from(data) {
            block.txdata[0].output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: ScriptBuf::new_op_return(push),
            });
        }
    }
    if let Some(root) = block.compute_merkle_root() {
        block.header.merkle_root = root;
    }
    let target = block.header.target();
    // A block the chain already knows (the same contents as one `invalidateblock` marked)
    // would not extend anything: grind on to a new one, as a real miner's clock would.
    while !target.is_met_by(block.header.block_hash())
        || chain.entry(&block.header.block_hash()).is_some()
    {
        block.header.nonce = block.header.nonce.wrapping_add(1);
        if block.header.nonce == 0 {
            block.header.time += 1;
        }
    }
    block
}

/// Core's ancestor-score selection: best package fee rate first, parents before children.
fn select_mempool(
    mempool: &Mempool,
    min_fee_rate: u64,
    txs: &mut Vec<Transaction>,
    weight: &mut u64,
    fees: &mut Amount,
) {
    let mut selected: HashSet<Txid> = HashSet::new();
    let mut skipped: HashSet<Txid> = HashSet::new();
    let entries = mempool.sorted();
    loop {
        let mut best: Option<(u64, u64, u64, Vec<Txid>)> = None;
        for e in &entries {
            if selected.contains(&e.txid) || skipped.contains(&e.txid) {
                continue;
            }
            let mut package: Vec<Txid> = mempool
                .ancestors(&e.txid)
                .into_iter()
                .filter(|a| !selected.contains(a))
                .collect();
            package.push(e.txid);
            let (mut fee, mut vsize, mut w) = (0, 0, 0);
            for t in &package {
                if let Some(p) = mempool.get(t) {
                    fee += p.fee.to_sat();
                    vsize += p.vsize;
                    w += p.weight;
                }
            }
            let better = match &best {
                None => true,
                Some((bf, bv, _, _)) => {
                    u128::from(fee) * u128::from(*bv) > u128::from(*bf) * u128::from(vsize)
                }
            };
            if better {
                best = Some((fee, vsize, w, package));
            }
        }
        let Some((fee, vsize, w, mut package)) = best else {
            return;
        };
        if fee < min_fee_rate.saturating_mul(vsize) {
            return; // the best package is below the threshold, so is every other
        }
        if *weight + w > MAX_TEMPLATE_WEIGHT {
            if let Some(last) = package.last() {
                skipped.insert(*last);
            }
            continue;
        }
        package.sort_by_key(|t| mempool.get(t).map(|e| e.order));
        for t in package {
            if let Some(e) = mempool.get(&t) {
                txs.push(Transaction::clone(&e.tx));
                *fees += e.fee;
                selected.insert(t);
            }
        }
        *weight += w;
    }
}

/// Realistic wallet traffic: mixed script types, OP_RETURN, chains within the block.
#[allow(clippy::too_many_arguments)]
fn add_fillers(
    chain: &Chain,
    mempool: &Mempool,
    wallet: &Wallet,
    count: usize,
    rng: &mut impl Rng,
    txs: &mut Vec<Transaction>,
    weight: &mut u64,
    fees: &mut Amount,
) {
    if count == 0 {
        return;
    }
    let spend_height = chain.height() + 1;
    let mut pool: Vec<(OutPoint, TxOut)> = chain
        .utxos()
        .iter()
        .filter(|(op, coin)| {
            wallet.is_mine(&coin.txout.script_pubkey)
                && (!coin.coinbase || spend_height - coin.height >= COINBASE_MATURITY)
                && mempool.spender(op).is_none()
        })
        .map(|(op, coin)| (*op, coin.txout.clone()))
        .collect();
    pool.sort_by_key(|(op, _)| *op); // HashMap order is random; keep runs comparable
    let mut fresh: Vec<(OutPoint, TxOut)> = Vec::new();
    for _ in 0..count {
        let mut inputs = Vec::new();
        let n_in = if rng.gen_bool(0.3) { 2 } else { 1 };
        for _ in 0..n_in {
            // Sometimes spend an output created earlier in this very block.
            let from_fresh = !fresh.is_empty() && (pool.is_empty() || rng.gen_bool(0.25));
            let source = if from_fresh { &mut fresh } else { &mut pool };
            if source.is_empty() {
                break;
            }
            let i = rng.gen_range(0..source.len());
            inputs.push(source.swap_remove(i));
        }
        if inputs.is_empty() {
            return;
        }
        let total: u64 = inputs.iter().map(|(_, o)| o.value.to_sat()).sum();
        let mut n_out: u64 = rng.gen_range(1..=3);
        let op_return = rng.gen_bool(0.15);
        let in_vsize: u64 = inputs
            .iter()
            .map(|(_, o)| {
                wallet
                    .kind_of(&o.script_pubkey)
                    .map_or(68, |k| k.input_vsize())
            })
            .sum();
        let vsize = 11 + in_vsize + n_out * 43 + if op_return { 20 } else { 0 };
        let fee = vsize * rng.gen_range(1..=25);
        if total < fee + n_out * 1_000 {
            n_out = 1;
        }
        if total < fee + 1_000 {
            continue; // dust: leave it
        }
        let spendable = total - fee - n_out * 1_000;
        let weights: Vec<u64> = (0..n_out).map(|_| rng.gen_range(1..100)).collect();
        let sum_w: u64 = weights.iter().sum();
        let mut outputs: Vec<TxOut> = Vec::new();
        let mut paid = 0;
        for (k, w) in weights.iter().enumerate() {
            let value = if k as u64 == n_out - 1 {
                total - fee - paid
            } else {
                1_000 + spendable * w / sum_w
            };
            paid += value;
            outputs.push(TxOut {
                value: Amount::from_sat(value),
                script_pubkey: wallet.filler_script(rng),
            });
        }
        if op_return {
            let mut data = b"devnet".to_vec();
            data.extend_from_slice(&rng.gen::<[u8; 8]>());
            if let Ok(push) = PushBytesBuf::try_from(data) {
                outputs.push(TxOut {
                    value: Amount::ZERO,
                    script_pubkey: ScriptBuf::new_op_return(push),
                });
            }
        }
        let sequences = [
            Sequence::MAX,
            Sequence::ENABLE_RBF_NO_LOCKTIME,
            Sequence::ENABLE_LOCKTIME_NO_RBF,
        ];
        let mut tx = Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: inputs
                .iter()
                .map(|(op, _)| TxIn {
                    previous_output: *op,
                    script_sig: ScriptBuf::new(),
                    sequence: sequences[rng.gen_range(0..sequences.len())],
                    witness: Witness::new(),
                })
                .collect(),
            output: outputs,
        };
        let prevouts: Vec<TxOut> = inputs.iter().map(|(_, o)| o.clone()).collect();
        if let Err(e) = wallet.sign(&mut tx, &prevouts) {
            tracing::error!(error = %e, "signing a filler failed");
            continue;
        }
        // Fillers go straight into blocks, so check them as the mempool would.
        if let Err(e) = verify_scripts(&tx, &prevouts) {
            tracing::error!(error = %e.message, "a filler failed script verification");
            continue;
        }
        let w = tx.weight().to_wu();
        if *weight + w > MAX_TEMPLATE_WEIGHT {
            return;
        }
        *weight += w;
        *fees += Amount::from_sat(fee);
        let txid = tx.compute_txid();
        for (vout, out) in tx.output.iter().enumerate() {
            if !out.script_pubkey.is_op_return() {
                fresh.push((
                    OutPoint {
                        txid,
                        vout: vout as u32,
                    },
                    out.clone(),
                ));
            }
        }
        txs.push(tx);
    }
}
