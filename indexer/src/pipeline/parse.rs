//! Parse stage: raw block bytes -> transactions with txids, inputs and outputs, checked
//! against the header (hash and merkle root) so a damaged block is never applied.

use bitcoin::consensus::deserialize;
use bitcoin::{block, Block, BlockHash, OutPoint, TxOut, Txid};
use rayon::prelude::*;

/// A block as read from its source, before parsing.
pub struct RawBlock {
    /// Height the source says it has.
    pub height: u32,
    /// Hash the source expects it to have.
    pub hash: BlockHash,
    /// Serialized block.
    pub bytes: Vec<u8>,
    /// Where it came from, for error messages (file and offset, or URL).
    pub origin: String,
}

/// A transaction reduced to what indexing needs.
pub struct ParsedTx {
    /// Its txid.
    pub txid: Txid,
    /// Whether it is the coinbase.
    pub coinbase: bool,
    /// Outpoints it spends (empty for the coinbase).
    pub inputs: Vec<OutPoint>,
    /// Outputs it creates, with their index (the bloom pass drops the unwatched ones).
    pub outputs: Vec<(u32, TxOut)>,
}

/// A parsed, checked block.
pub struct ParsedBlock {
    /// Height.
    pub height: u32,
    /// Hash.
    pub hash: BlockHash,
    /// Header.
    pub header: block::Header,
    /// Transactions in block order.
    pub txs: Vec<ParsedTx>,
    /// Serialized size in bytes.
    pub size: usize,
    /// Where it came from.
    pub origin: String,
}

/// A block that cannot be indexed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The bytes are not a block.
    #[error("{origin}: block {height} does not decode: {detail}")]
    Decode {
        /// Where it came from.
        origin: String,
        /// Height expected.
        height: u32,
        /// Decoder's message.
        detail: String,
    },
    /// The header hashes to something else than expected.
    #[error("{origin}: block {height} hashes to {found}, expected {expected}")]
    Hash {
        /// Where it came from.
        origin: String,
        /// Height expected.
        height: u32,
        /// Hash found.
        found: BlockHash,
        /// Hash expected.
        expected: BlockHash,
    },
    /// The transactions do not match the header's merkle root.
    #[error("{origin}: block {height} ({hash}): transactions do not match the merkle root")]
    Merkle {
        /// Where it came from.
        origin: String,
        /// Height.
        height: u32,
        /// Hash.
        hash: BlockHash,
    },
}

/// Parses and checks one block; transactions are hashed in parallel.
pub fn parse_block(raw: RawBlock) -> Result<ParsedBlock, ParseError> {
    let RawBlock {
        height,
        hash,
        bytes,
        origin,
    } = raw;
    let block: Block = match deserialize(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return Err(ParseError::Decode {
                origin,
                height,
                detail: e.to_string(),
            })
        }
    };
    let found = block.block_hash();
    if found != hash {
        return Err(ParseError::Hash {
            origin,
            height,
            found,
            expected: hash,
        });
    }
    let txs: Vec<ParsedTx> = block
        .txdata
        .into_par_iter()
        .map(|tx| ParsedTx {
            txid: tx.compute_txid(),
            coinbase: tx.is_coinbase(),
            inputs: if tx.is_coinbase() {
                Vec::new()
            } else {
                tx.input.iter().map(|i| i.previous_output).collect()
            },
            outputs: (0u32..).zip(tx.output).collect(),
        })
        .collect();
    let root = bitcoin::merkle_tree::calculate_root(txs.iter().map(|t| t.txid.to_raw_hash()));
    if root != Some(block.header.merkle_root.to_raw_hash()) {
        return Err(ParseError::Merkle {
            origin,
            height,
            hash,
        });
    }
    Ok(ParsedBlock {
        height,
        hash,
        header: block.header,
        txs,
        size: bytes.len(),
        origin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::blockdata::constants::genesis_block;
    use bitcoin::consensus::serialize;
    use bitcoin::Network;

    fn raw(bytes: Vec<u8>, hash: BlockHash) -> RawBlock {
        RawBlock {
            height: 0,
            hash,
            bytes,
            origin: "test".into(),
        }
    }

    #[test]
    fn genesis_parses_with_its_known_txid() {
        let g = genesis_block(Network::Bitcoin);
        let parsed = parse_block(raw(serialize(&g), g.block_hash())).unwrap();
        assert_eq!(parsed.txs.len(), 1);
        assert!(parsed.txs[0].coinbase);
        assert_eq!(
            parsed.txs[0].txid.to_string(),
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
        );
    }

    #[test]
    fn damaged_body_is_caught_by_the_merkle_root() {
        let g = genesis_block(Network::Bitcoin);
        let mut bytes = serialize(&g);
        let last = bytes.len() - 10;
        bytes[last] ^= 1; // inside the coinbase output script
        let Err(err) = parse_block(raw(bytes, g.block_hash())) else {
            panic!("a damaged block parsed");
        };
        assert!(matches!(err, ParseError::Merkle { .. }), "{err}");
    }

    #[test]
    fn trailing_garbage_is_a_decode_error() {
        let g = genesis_block(Network::Bitcoin);
        let mut bytes = serialize(&g);
        bytes.push(0);
        let Err(err) = parse_block(raw(bytes, g.block_hash())) else {
            panic!("a damaged block parsed");
        };
        assert!(err.to_string().contains("does not decode"), "{err}");
    }
}
