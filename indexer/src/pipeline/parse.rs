//! Parse stage: raw block bytes -> transactions with txids, inputs and the outputs that may
//! pay watched scripts (the bloom pass of the filter), checked against the header (hash and
//! merkle root) so a damaged block is never applied.

use std::ops::{ControlFlow, Range};

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::{block, Amount, BlockHash, OutPoint, ScriptBuf, TxOut, Txid};
use bitcoin_slices::{bsl, Parse, Visit, Visitor};
use rayon::prelude::*;

use crate::watchlist::ScriptFilter;

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
    /// Outputs that may pay watched scripts (bloom filter hits), with their index.
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

/// Parses and checks one block without allocating for what is not kept: every input's
/// outpoint, and only the outputs `scripts` may watch (never OP_RETURN ones, which are
/// unspendable). rust-bitcoin's allocating decode spent most of its time in the allocator.
///
/// Two passes: a cheap sequential one finds the header and each transaction's bytes, then
/// transactions are hashed and filtered in parallel, so one big block uses every core.
pub fn parse_block(raw: RawBlock, scripts: &ScriptFilter) -> Result<ParsedBlock, ParseError> {
    let RawBlock {
        height,
        hash,
        bytes,
        origin,
    } = raw;
    let decode_error = |detail: String| ParseError::Decode {
        origin: origin.clone(),
        height,
        detail,
    };
    let mut layout = Layout {
        base: bytes.as_ptr() as usize,
        header: None,
        txs: Vec::new(),
    };
    let parsed =
        bsl::Block::visit(&bytes, &mut layout).map_err(|e| decode_error(format!("{e:?}")))?;
    if !parsed.remaining().is_empty() {
        return Err(decode_error(format!(
            "{} bytes after the block",
            parsed.remaining().len()
        )));
    }
    let header = layout
        .header
        .ok_or_else(|| decode_error("no header".into()))?;
    let found = header.block_hash();
    if found != hash {
        return Err(ParseError::Hash {
            origin,
            height,
            found,
            expected: hash,
        });
    }
    let txs: Vec<ParsedTx> = layout
        .txs
        .par_iter()
        .with_min_len(64)
        .enumerate()
        .map(|(i, range)| parse_tx(&bytes[range.clone()], i == 0, scripts))
        .collect::<Result<_, String>>()
        .map_err(decode_error)?;
    let root = bitcoin::merkle_tree::calculate_root(txs.iter().map(|t| t.txid.to_raw_hash()));
    if root != Some(header.merkle_root.to_raw_hash()) {
        return Err(ParseError::Merkle {
            origin,
            height,
            hash,
        });
    }
    Ok(ParsedBlock {
        height,
        hash,
        header,
        txs,
        size: bytes.len(),
        origin,
    })
}

/// The txid of one serialized transaction, without decoding it into owned parts: bitcoind
/// announces every transaction of every block over ZMQ, and most need no more than this.
pub fn txid_of(bytes: &[u8]) -> Result<Txid, String> {
    let parsed = bsl::Transaction::parse(bytes).map_err(|e| format!("{e:?}"))?;
    if !parsed.remaining().is_empty() {
        return Err(format!(
            "{} bytes after the transaction",
            parsed.remaining().len()
        ));
    }
    Ok(Txid::from_raw_hash(parsed.parsed().txid()))
}

/// Parses one transaction's bytes: txid, inputs, outputs that pass the bloom filter.
fn parse_tx(bytes: &[u8], coinbase: bool, scripts: &ScriptFilter) -> Result<ParsedTx, String> {
    let mut visitor = TxVisitor {
        scripts,
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    let parsed = bsl::Transaction::visit(bytes, &mut visitor).map_err(|e| format!("{e:?}"))?;
    if coinbase {
        visitor.inputs.clear();
    }
    Ok(ParsedTx {
        txid: Txid::from_raw_hash(parsed.parsed().txid()),
        coinbase,
        inputs: visitor.inputs,
        outputs: visitor.outputs,
    })
}

/// First pass: the header, and where each transaction's bytes are in the block.
struct Layout {
    base: usize,
    header: Option<block::Header>,
    txs: Vec<Range<usize>>,
}

impl Visitor for Layout {
    fn visit_block_header(&mut self, header: &bsl::BlockHeader) -> ControlFlow<()> {
        match deserialize::<block::Header>(header.as_ref()) {
            Ok(h) => {
                self.header = Some(h);
                ControlFlow::Continue(())
            }
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn visit_block_begin(&mut self, total_transactions: usize) {
        self.txs.reserve(total_transactions);
    }

    fn visit_transaction(&mut self, tx: &bsl::Transaction) -> ControlFlow<()> {
        let bytes = tx.as_ref();
        // The transaction's slice lies inside the block's: its offset is the address gap.
        let start = bytes.as_ptr() as usize - self.base;
        self.txs.push(start..start + bytes.len());
        ControlFlow::Continue(())
    }
}

/// Second pass over one transaction: inputs and the outputs worth an exact lookup.
struct TxVisitor<'f> {
    scripts: &'f ScriptFilter,
    inputs: Vec<OutPoint>,
    outputs: Vec<(u32, TxOut)>,
}

impl Visitor for TxVisitor<'_> {
    fn visit_tx_ins(&mut self, total_inputs: usize) {
        self.inputs.reserve(total_inputs);
    }

    fn visit_tx_in(&mut self, _vin: usize, tx_in: &bsl::TxIn) -> ControlFlow<()> {
        let prevout = tx_in.prevout();
        let txid: [u8; 32] = prevout
            .txid()
            .try_into()
            .expect("an outpoint's txid is 32 bytes");
        self.inputs.push(OutPoint {
            txid: Txid::from_byte_array(txid),
            vout: prevout.vout(),
        });
        ControlFlow::Continue(())
    }

    fn visit_tx_out(&mut self, vout: usize, tx_out: &bsl::TxOut) -> ControlFlow<()> {
        let script = tx_out.script_pubkey();
        if self.scripts.may_contain(script) && script.first() != Some(&OP_RETURN.to_u8()) {
            self.outputs.push((
                vout as u32,
                TxOut {
                    value: Amount::from_sat(tx_out.value()),
                    script_pubkey: ScriptBuf::from_bytes(script.to_vec()),
                },
            ));
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::blockdata::constants::genesis_block;
    use bitcoin::consensus::serialize;
    use bitcoin::Network;

    fn all() -> ScriptFilter {
        let mut f = ScriptFilter::new(10, 0.01);
        f.insert(
            genesis_block(Network::Bitcoin).txdata[0].output[0]
                .script_pubkey
                .as_bytes(),
        );
        f
    }

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
        let parsed = parse_block(raw(serialize(&g), g.block_hash()), &all()).unwrap();
        assert_eq!(parsed.txs.len(), 1);
        assert!(parsed.txs[0].coinbase);
        assert_eq!(parsed.txs[0].outputs.len(), 1, "the watched output is kept");
        assert_eq!(
            parsed.txs[0].txid.to_string(),
            "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
        );
    }

    #[test]
    fn txid_of_matches_rust_bitcoin_and_rejects_trailing_bytes() {
        let tx = &genesis_block(Network::Bitcoin).txdata[0];
        let mut bytes = serialize(tx);
        assert_eq!(txid_of(&bytes), Ok(tx.compute_txid()));
        bytes.push(0);
        assert!(txid_of(&bytes).is_err());
        assert!(txid_of(&bytes[..10]).is_err());
    }

    #[test]
    fn damaged_body_is_caught_by_the_merkle_root() {
        let g = genesis_block(Network::Bitcoin);
        let mut bytes = serialize(&g);
        let last = bytes.len() - 10;
        bytes[last] ^= 1; // inside the coinbase output script
        let Err(err) = parse_block(raw(bytes, g.block_hash()), &all()) else {
            panic!("a damaged block parsed");
        };
        assert!(matches!(err, ParseError::Merkle { .. }), "{err}");
    }

    #[test]
    fn trailing_garbage_is_a_decode_error() {
        let g = genesis_block(Network::Bitcoin);
        let mut bytes = serialize(&g);
        bytes.push(0);
        let Err(err) = parse_block(raw(bytes, g.block_hash()), &all()) else {
            panic!("a damaged block parsed");
        };
        assert!(err.to_string().contains("does not decode"), "{err}");
    }
}
