//! Choosing the best chain from a pile of headers: proof of work checked per header, the
//! chain with the most cumulative work wins, whatever order the headers came in.

use std::collections::HashMap;

use bitcoin::blockdata::constants::genesis_block;
use bitcoin::{block, BlockHash, Network, Work};

/// Why no chain could be chosen.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The genesis block of the network is not among the headers.
    #[error("the {network} genesis block {genesis} is not among the {count} blocks found")]
    NoGenesis {
        /// Network asked for.
        network: Network,
        /// Its genesis hash.
        genesis: BlockHash,
        /// How many headers were offered.
        count: usize,
    },
}

/// A header on the chosen chain with the caller's locator for its block data.
#[derive(Clone, Debug)]
pub struct ChainEntry<L> {
    /// Height in the chain.
    pub height: u32,
    /// Block hash.
    pub hash: BlockHash,
    /// The header.
    pub header: block::Header,
    /// Where the caller keeps the block.
    pub loc: L,
    /// Where later copies of the same block are (a body under the same header may be
    /// damaged or mutated in one copy and good in another).
    pub copies: Vec<L>,
}

/// What was set aside while choosing the chain.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Headers whose hash does not meet their own `bits`, or whose `bits` exceed the limit.
    pub bad_pow: usize,
    /// Headers seen more than once.
    pub duplicates: usize,
    /// Headers not on the chosen chain (stale or orphaned).
    pub off_chain: usize,
}

struct Node<L> {
    header: block::Header,
    loc: L,
    copies: Vec<L>,
    order: usize,
    // Cumulative work and height once linked to genesis; `None` while unknown or orphaned.
    linked: Option<(Work, u32)>,
}

/// Whether `header` meets its own target, and that target is within `network`'s limit.
pub fn pow_ok(header: &block::Header, network: Network) -> bool {
    let target = header.target();
    target <= network.params().max_attainable_target && header.validate_pow(target).is_ok()
}

/// Returns the most-work chain from genesis among `headers`, in height order.
///
/// Ties go to the header seen first, as Bitcoin Core prefers the block it received first.
pub fn best_chain<L: Clone>(
    network: Network,
    headers: impl IntoIterator<Item = (block::Header, L)>,
) -> Result<(Vec<ChainEntry<L>>, Rejected), ChainError> {
    let genesis = genesis_block(network).block_hash();
    let mut rejected = Rejected::default();
    let mut nodes: HashMap<BlockHash, Node<L>> = HashMap::new();
    for (order, (header, loc)) in headers.into_iter().enumerate() {
        let hash = header.block_hash();
        if !pow_ok(&header, network) {
            rejected.bad_pow += 1;
            continue;
        }
        if let Some(first) = nodes.get_mut(&hash) {
            rejected.duplicates += 1;
            first.copies.push(loc);
            continue;
        }
        let linked = (hash == genesis).then(|| (header.work(), 0));
        nodes.insert(
            hash,
            Node {
                header,
                loc,
                copies: Vec::new(),
                order,
                linked,
            },
        );
    }
    if !nodes.contains_key(&genesis) {
        return Err(ChainError::NoGenesis {
            network,
            genesis,
            count: nodes.len() + rejected.bad_pow + rejected.duplicates,
        });
    }
    link_all(&mut nodes);

    let best = nodes
        .iter()
        .filter_map(|(hash, n)| {
            n.linked
                .map(|(work, _)| (work, std::cmp::Reverse(n.order), *hash))
        })
        .max()
        .map(|(_, _, hash)| hash)
        .expect("genesis is linked");
    let mut chain = Vec::new();
    let mut cursor = Some(best);
    while let Some(hash) = cursor {
        let node = &nodes[&hash];
        let (_, height) = node.linked.expect("ancestors of a linked node are linked");
        chain.push(ChainEntry {
            height,
            hash,
            header: node.header,
            loc: node.loc.clone(),
            copies: node.copies.clone(),
        });
        cursor = (height > 0).then_some(node.header.prev_blockhash);
    }
    chain.reverse();
    rejected.off_chain = nodes.len() - chain.len();
    Ok((chain, rejected))
}

/// Fills in cumulative work and height for every node that links back to genesis.
fn link_all<L>(nodes: &mut HashMap<BlockHash, Node<L>>) {
    let hashes: Vec<BlockHash> = nodes.keys().copied().collect();
    let mut path = Vec::new();
    for start in hashes {
        // Walk back to the first node whose link is known (or to a missing parent),
        // then fill the path forward; each node is walked once overall.
        let mut cursor = start;
        let base = loop {
            match nodes.get(&cursor) {
                None => break None,
                Some(n) if n.linked.is_some() => break n.linked,
                Some(n) => {
                    path.push(cursor);
                    cursor = n.header.prev_blockhash;
                }
            }
        };
        let Some((mut work, mut height)) = base else {
            path.clear();
            continue;
        };
        while let Some(hash) = path.pop() {
            let node = nodes.get_mut(&hash).expect("path holds known nodes");
            work = work + node.header.work();
            height += 1;
            node.linked = Some((work, height));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;
    use bitcoin::{CompactTarget, TxMerkleNode};

    /// Mines a regtest header on `prev` (regtest targets take a few tries at most).
    fn mine(prev: BlockHash, nonce_seed: u32) -> block::Header {
        let mut header = block::Header {
            version: block::Version::TWO,
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::from_byte_array([nonce_seed as u8; 32]),
            time: 1_600_000_000 + nonce_seed,
            bits: CompactTarget::from_consensus(0x207fffff),
            nonce: 0,
        };
        while header.validate_pow(header.target()).is_err() {
            header.nonce += 1;
        }
        header
    }

    fn branch(from: BlockHash, len: usize, seed: u32) -> Vec<block::Header> {
        let mut out = Vec::new();
        let mut prev = from;
        for i in 0..len {
            let h = mine(prev, seed * 1000 + i as u32);
            prev = h.block_hash();
            out.push(h);
        }
        out
    }

    #[test]
    fn longest_branch_wins_in_any_order() {
        let genesis = genesis_block(Network::Regtest).header;
        let main = branch(genesis.block_hash(), 5, 1);
        let side = branch(main[1].block_hash(), 6, 2);
        let mut all: Vec<_> = vec![genesis];
        all.extend(side.iter().rev());
        all.extend(main.iter());
        let (chain, rejected) =
            best_chain(Network::Regtest, all.into_iter().map(|h| (h, ()))).unwrap();
        assert_eq!(chain.len(), 9);
        assert_eq!(chain.last().unwrap().hash, side[5].block_hash());
        assert_eq!(chain[2].hash, main[1].block_hash());
        assert_eq!(rejected.off_chain, 3);
    }

    #[test]
    fn bad_pow_and_orphans_are_set_aside() {
        let genesis = genesis_block(Network::Regtest).header;
        let main = branch(genesis.block_hash(), 3, 1);
        let mut forged = mine(main[2].block_hash(), 9);
        // A hash above its own target: search for a nonce that fails.
        while forged.validate_pow(forged.target()).is_ok() {
            forged.nonce += 1;
        }
        let orphan = branch(BlockHash::from_byte_array([5; 32]), 2, 3);
        let mut all = vec![genesis, forged];
        all.extend(main.iter());
        all.extend(orphan.iter());
        all.push(main[0]);
        let (chain, rejected) =
            best_chain(Network::Regtest, all.into_iter().map(|h| (h, ()))).unwrap();
        assert_eq!(chain.len(), 4);
        assert_eq!(rejected.bad_pow, 1);
        assert_eq!(rejected.duplicates, 1);
        assert_eq!(
            chain[1].copies.len(),
            1,
            "the second copy of block 1 is kept"
        );
        assert_eq!(rejected.off_chain, 2);
    }

    #[test]
    fn missing_genesis_is_an_error() {
        let genesis = genesis_block(Network::Regtest).header;
        let main = branch(genesis.block_hash(), 2, 1);
        let err = best_chain(Network::Regtest, main.into_iter().map(|h| (h, ()))).unwrap_err();
        assert!(err.to_string().contains("genesis"));
    }
}
