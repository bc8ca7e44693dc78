//! The checks that tie a block's transactions to its header, as Bitcoin Core's
//! `CheckBlock` makes them before it trusts a body: proof of work covers only the header,
//! so a body that was altered while keeping the header's hash must be caught here.
//!
//! - the merkle root, computed with Core's mutation check: a block whose last transactions
//!   are repeated (CVE-2012-2459) has the same root and must still be refused;
//! - no transaction of 64 bytes (stripped), which could pass for an inner merkle node;
//! - the first transaction and only it is a coinbase;
//! - the witness commitment: witness data only with a commitment that matches it;
//! - the consensus size and weight limits.
//!
//! Pure functions over hashes and sizes the parser already has; no I/O.

use crate::sha256d;

/// Consensus limit on a block's weight (BIP141).
pub const MAX_BLOCK_WEIGHT: u64 = 4_000_000;

/// The prefix of a coinbase output that commits to the witness root (BIP141).
pub const WITNESS_COMMITMENT_PREFIX: [u8; 6] = [0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];

/// What the parser learnt of one transaction that the block checks need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxFacts {
    /// Its txid (the hash of its serialization without witness data).
    pub txid: [u8; 32],
    /// Its wtxid, computed only for transactions with witness data when the block commits
    /// to witnesses (otherwise equal to the txid, or not needed).
    pub wtxid: Option<[u8; 32]>,
    /// Whether it carries witness data.
    pub has_witness: bool,
    /// Serialized size without witness data.
    pub stripped_size: u64,
    /// BIP141 weight.
    pub weight: u64,
    /// Whether it has the coinbase's shape: one input spending the null outpoint.
    pub coinbase_shaped: bool,
}

/// The coinbase's witness commitment and its witness reserved value, when present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commitment {
    /// The 32 bytes after the prefix of the last output that carries one.
    pub root_hash: Option<[u8; 32]>,
    /// The coinbase input's witness, when it is exactly one element of 32 bytes.
    pub reserved_value: Option<[u8; 32]>,
}

/// Why a block's body is not the one its header commits to, or breaks a consensus limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockCheckError {
    /// It has no transaction.
    #[error("no transactions")]
    Empty,
    /// The transactions do not hash to the header's merkle root.
    #[error("transactions do not match the merkle root")]
    MerkleRoot,
    /// The root matches only because transactions repeat (CVE-2012-2459).
    #[error("mutated: repeated transactions keep the merkle root (CVE-2012-2459)")]
    Duplicated,
    /// A transaction of 64 bytes could pass for an inner node of the merkle tree.
    #[error("mutated: transaction {0} is 64 bytes long")]
    SixtyFourBytes(usize),
    /// The first transaction is not a coinbase, or a later one is.
    #[error("transaction {0} is {1}")]
    Coinbase(usize, &'static str),
    /// Witness data without a commitment to it.
    #[error("mutated: witness data without a witness commitment")]
    UnexpectedWitness,
    /// The commitment does not match the witnesses.
    #[error("mutated: the witness commitment does not match ({0})")]
    WitnessCommitment(&'static str),
    /// Over the consensus size or weight limit.
    #[error("over the consensus limit: {0}")]
    TooLarge(String),
}

/// The merkle root of `hashes` as Core computes it, and whether it is mutated: a level
/// where two adjacent nodes of a pair are equal means the same root could come from a
/// shorter list (Core's `ComputeMerkleRoot(hashes, &mutated)`).
pub fn merkle_root(mut hashes: Vec<[u8; 32]>) -> (Option<[u8; 32]>, bool) {
    let mut mutated = false;
    let mut len = hashes.len();
    // Each level overwrites the front of the one below it: node i reads 2i and 2i + 1.
    while len > 1 {
        mutated |= hashes[..len].chunks_exact(2).any(|pair| pair[0] == pair[1]);
        for i in 0..len.div_ceil(2) {
            let left = hashes[2 * i];
            // An odd level pairs its last node with itself.
            let right = if 2 * i + 1 < len {
                hashes[2 * i + 1]
            } else {
                left
            };
            hashes[i] = sha256d::merkle_node(&left, &right);
        }
        len = len.div_ceil(2);
    }
    (hashes.first().copied(), mutated)
}

/// Checks a parsed block: `header_root` is the header's merkle root, `header_and_count`
/// the bytes of the header and the transaction count (for the weight).
pub fn check_block(
    header_root: [u8; 32],
    header_and_count: u64,
    txs: &[TxFacts],
    commitment: &Commitment,
) -> Result<(), BlockCheckError> {
    if txs.is_empty() {
        return Err(BlockCheckError::Empty);
    }
    // Sizes first: they bound everything else.
    let stripped: u64 = header_and_count + txs.iter().map(|t| t.stripped_size).sum::<u64>();
    let weight: u64 = header_and_count * 4 + txs.iter().map(|t| t.weight).sum::<u64>();
    if stripped * 4 > MAX_BLOCK_WEIGHT {
        return Err(BlockCheckError::TooLarge(format!(
            "{stripped} bytes without witness data, limit {}",
            MAX_BLOCK_WEIGHT / 4
        )));
    }
    if weight > MAX_BLOCK_WEIGHT {
        return Err(BlockCheckError::TooLarge(format!(
            "weight {weight}, limit {MAX_BLOCK_WEIGHT}"
        )));
    }
    let (root, mutated) = merkle_root(txs.iter().map(|t| t.txid).collect());
    if root != Some(header_root) {
        return Err(BlockCheckError::MerkleRoot);
    }
    if mutated {
        return Err(BlockCheckError::Duplicated);
    }
    if let Some(i) = txs.iter().position(|t| t.stripped_size == 64) {
        return Err(BlockCheckError::SixtyFourBytes(i));
    }
    if !txs[0].coinbase_shaped {
        return Err(BlockCheckError::Coinbase(0, "not a coinbase"));
    }
    if let Some(i) = txs.iter().skip(1).position(|t| t.coinbase_shaped) {
        return Err(BlockCheckError::Coinbase(i + 1, "a second coinbase"));
    }
    check_witnesses(txs, commitment)
}

/// Witness data is allowed only under a commitment that matches it (BIP141; Core's
/// `CheckWitnessMalleation`). Without witness data there is nothing to commit to.
fn check_witnesses(txs: &[TxFacts], commitment: &Commitment) -> Result<(), BlockCheckError> {
    if !txs.iter().any(|t| t.has_witness) {
        return Ok(());
    }
    let Some(expected) = commitment.root_hash else {
        return Err(BlockCheckError::UnexpectedWitness);
    };
    let Some(reserved) = commitment.reserved_value else {
        return Err(BlockCheckError::WitnessCommitment(
            "the coinbase witness is not one 32-byte value",
        ));
    };
    let mut wtxids = Vec::with_capacity(txs.len());
    // The coinbase's wtxid counts as zero.
    wtxids.push([0u8; 32]);
    for t in &txs[1..] {
        wtxids.push(match (t.has_witness, t.wtxid) {
            (false, _) => t.txid,
            (true, Some(w)) => w,
            (true, None) => return Err(BlockCheckError::WitnessCommitment("wtxid not computed")),
        });
    }
    let (root, _) = merkle_root(wtxids);
    if sha256d::merkle_node(&root.expect("at least the coinbase"), &reserved) != expected {
        return Err(BlockCheckError::WitnessCommitment("root differs"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::{sha256d, Hash, HashEngine};

    fn h(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn tx(n: u8) -> TxFacts {
        TxFacts {
            txid: h(n),
            stripped_size: 200,
            weight: 800,
            coinbase_shaped: n == 0,
            ..TxFacts::default()
        }
    }

    fn root_of(txs: &[TxFacts]) -> [u8; 32] {
        merkle_root(txs.iter().map(|t| t.txid).collect()).0.unwrap()
    }

    #[test]
    fn the_merkle_root_agrees_with_rust_bitcoin_and_a_repeated_tail_is_mutated() {
        for n in 1..=40u8 {
            let hashes: Vec<[u8; 32]> = (0..n).map(h).collect();
            let expected = bitcoin::merkle_tree::calculate_root(
                hashes.iter().map(|b| sha256d::Hash::from_byte_array(*b)),
            )
            .unwrap();
            let (root, mutated) = merkle_root(hashes.clone());
            assert_eq!(root, Some(expected.to_byte_array()));
            assert!(!mutated, "{n} distinct hashes");
        }
        // Three transactions, and the same block with the third repeated: one root.
        let three: Vec<TxFacts> = (0..3).map(tx).collect();
        let mut four = three.clone();
        four.push(tx(2));
        assert_eq!(root_of(&three), root_of(&four));
        assert_eq!(
            check_block(root_of(&three), 81, &three, &Commitment::default()),
            Ok(())
        );
        assert_eq!(
            check_block(root_of(&three), 81, &four, &Commitment::default()),
            Err(BlockCheckError::Duplicated)
        );
        assert_eq!(merkle_root(Vec::new()), (None, false));
    }

    #[test]
    fn coinbase_position_64_byte_transactions_and_limits_are_enforced() {
        let ok: Vec<TxFacts> = (0..3).map(tx).collect();
        let c = Commitment::default();
        let mut no_coinbase = ok.clone();
        no_coinbase[0].coinbase_shaped = false;
        assert!(matches!(
            check_block(root_of(&no_coinbase), 81, &no_coinbase, &c),
            Err(BlockCheckError::Coinbase(0, _))
        ));
        let mut two = ok.clone();
        two[2].coinbase_shaped = true;
        assert!(matches!(
            check_block(root_of(&two), 81, &two, &c),
            Err(BlockCheckError::Coinbase(2, _))
        ));
        let mut short = ok.clone();
        short[1].stripped_size = 64;
        assert_eq!(
            check_block(root_of(&short), 81, &short, &c),
            Err(BlockCheckError::SixtyFourBytes(1))
        );
        let mut heavy = ok.clone();
        heavy[1].weight = MAX_BLOCK_WEIGHT;
        assert!(matches!(
            check_block(root_of(&heavy), 81, &heavy, &c),
            Err(BlockCheckError::TooLarge(_))
        ));
        let mut big = ok.clone();
        big[1].stripped_size = MAX_BLOCK_WEIGHT / 4;
        assert!(matches!(
            check_block(root_of(&big), 81, &big, &c),
            Err(BlockCheckError::TooLarge(_))
        ));
        assert_eq!(
            check_block(h(9), 81, &ok, &c),
            Err(BlockCheckError::MerkleRoot)
        );
        assert_eq!(check_block(h(9), 81, &[], &c), Err(BlockCheckError::Empty));
    }

    #[test]
    fn witness_data_needs_a_matching_commitment() {
        let mut txs: Vec<TxFacts> = (0..3).map(tx).collect();
        txs[2].has_witness = true;
        txs[2].wtxid = Some(h(42));
        let root = root_of(&txs);
        assert_eq!(
            check_block(root, 81, &txs, &Commitment::default()),
            Err(BlockCheckError::UnexpectedWitness)
        );
        let reserved = [7u8; 32];
        let (wroot, _) = merkle_root(vec![[0; 32], h(1), h(42)]);
        let mut engine = sha256d::Hash::engine();
        engine.input(&wroot.unwrap());
        engine.input(&reserved);
        let good = Commitment {
            root_hash: Some(sha256d::Hash::from_engine(engine).to_byte_array()),
            reserved_value: Some(reserved),
        };
        assert_eq!(check_block(root, 81, &txs, &good), Ok(()));
        // The same block with other witness data: its wtxid differs.
        txs[2].wtxid = Some(h(43));
        assert!(matches!(
            check_block(root, 81, &txs, &good),
            Err(BlockCheckError::WitnessCommitment(_))
        ));
        let no_nonce = Commitment {
            reserved_value: None,
            ..good
        };
        assert!(matches!(
            check_block(root, 81, &txs, &no_nonce),
            Err(BlockCheckError::WitnessCommitment(_))
        ));
    }
}
