//! Parse stage: raw block bytes -> transactions with txids, inputs and the outputs that may
//! pay watched scripts (the bloom pass of the filter), checked against the header (hash,
//! merkle root without mutation, witness commitment, limits: [`crate::block_check`]) so a
//! damaged or mutated block is never applied. Nothing is allocated from a count the bytes
//! claim: only from what is present.

use std::ops::{ControlFlow, Range};

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::opcodes::all::OP_RETURN;
use bitcoin::{block, Amount, BlockHash, OutPoint, ScriptBuf, TxOut, Txid};
use bitcoin_slices::{bsl, Parse, Visit, Visitor};
use rayon::prelude::*;

use crate::block_check::{self, BlockCheckError, Commitment, TxFacts};
use crate::script_filter::ScriptFilter;
use crate::sha256d;

/// The smallest serialized transaction (one input, one output, empty scripts): a count
/// above `bytes / MIN_TX_SIZE` cannot be true.
const MIN_TX_SIZE: usize = 60;
/// The smallest serialized input.
const MIN_TXIN_SIZE: usize = 41;

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
    /// The block's bytes, for the filter stage to look through again when the watched
    /// set grew after the bloom pass (the look-ahead); returned to [`crate::buffers`] after.
    pub bytes: Vec<u8>,
    /// The filter's generation when the bloom pass ran.
    pub filter_generation: u64,
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
    /// The transactions are not the ones the header commits to (a damaged or mutated
    /// body under a valid header), or break a consensus limit.
    #[error("{origin}: block {height} ({hash}): {reason}")]
    Invalid {
        /// Where it came from.
        origin: String,
        /// Height.
        height: u32,
        /// Hash.
        hash: BlockHash,
        /// What is wrong with it.
        reason: BlockCheckError,
    },
}

impl ParseError {
    /// Whether the header is right and only the body is not (another copy of the same
    /// block may be good): a mutated or damaged body, rather than another block.
    pub fn is_bad_body(&self) -> bool {
        matches!(self, ParseError::Invalid { .. } | ParseError::Decode { .. })
    }
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
    // Read before any probe: scripts added after it are looked for again later.
    let filter_generation = scripts.generation();
    let mut layout = Layout {
        base: bytes.as_ptr() as usize,
        len: bytes.len(),
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
    let Some(first) = layout.txs.first() else {
        return Err(ParseError::Invalid {
            origin,
            height,
            hash,
            reason: BlockCheckError::Empty,
        });
    };
    // The coinbase first: whether the block commits to witnesses decides whether the
    // others' wtxids are needed.
    let header_and_count = first.start as u64;
    let (coinbase, coinbase_facts, commitment) =
        parse_tx(&bytes[first.clone()], true, scripts, false, &mut Vec::new())
            .map_err(&decode_error)?;
    let wtxids = commitment.root_hash.is_some();
    let rest: Vec<(ParsedTx, TxFacts, Commitment)> = layout.txs[1..]
        .par_iter()
        .with_min_len(64)
        .map_init(Vec::new, |candidates, range| {
            parse_tx(&bytes[range.clone()], false, scripts, wtxids, candidates)
        })
        .collect::<Result<_, String>>()
        .map_err(decode_error)?;
    let mut facts = Vec::with_capacity(rest.len() + 1);
    facts.push(coinbase_facts);
    let mut txs = Vec::with_capacity(rest.len() + 1);
    txs.push(coinbase);
    for (tx, f, _) in rest {
        txs.push(tx);
        facts.push(f);
    }
    let size = bytes.len();
    let root = header.merkle_root.to_raw_hash().to_byte_array();
    if let Err(reason) = block_check::check_block(root, header_and_count, &facts, &commitment) {
        return Err(ParseError::Invalid {
            origin,
            height,
            hash,
            reason,
        });
    }
    Ok(ParsedBlock {
        height,
        hash,
        header,
        txs,
        size,
        origin,
        bytes,
        filter_generation,
    })
}

/// The outputs of `bytes` (a block that parsed) paying one of `scripts`: (transaction
/// index, output index, output).
pub fn outputs_paying(
    bytes: &[u8],
    scripts: &std::collections::HashSet<ScriptBuf>,
) -> Vec<(usize, u32, TxOut)> {
    struct Finder<'s> {
        scripts: &'s std::collections::HashSet<ScriptBuf>,
        tx: usize,
        found: Vec<(usize, u32, TxOut)>,
    }
    impl Visitor for Finder<'_> {
        fn visit_tx_out(&mut self, vout: usize, tx_out: &bsl::TxOut) -> ControlFlow<()> {
            let script = tx_out.script_pubkey();
            if self.scripts.contains(bitcoin::Script::from_bytes(script)) {
                self.found.push((
                    self.tx,
                    vout as u32,
                    TxOut {
                        value: Amount::from_sat(tx_out.value()),
                        script_pubkey: ScriptBuf::from_bytes(script.to_vec()),
                    },
                ));
            }
            ControlFlow::Continue(())
        }

        fn visit_transaction(&mut self, _tx: &bsl::Transaction) -> ControlFlow<()> {
            self.tx += 1;
            ControlFlow::Continue(())
        }
    }
    let mut finder = Finder {
        scripts,
        tx: 0,
        found: Vec::new(),
    };
    // The block parsed once already: a failure here cannot happen, and finds nothing.
    let _ = bsl::Block::visit(bytes, &mut finder);
    finder.found
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

/// Parses one transaction's bytes: txid, inputs, outputs that pass the bloom filter, what
/// the block checks need (the wtxid only when `wtxid` asks for it), and for the coinbase
/// its witness commitment.
fn parse_tx(
    bytes: &[u8],
    coinbase: bool,
    scripts: &ScriptFilter,
    wtxid: bool,
    candidates: &mut Vec<Candidate>,
) -> Result<(ParsedTx, TxFacts, Commitment), String> {
    candidates.clear();
    let mut visitor = TxVisitor {
        scripts,
        len: bytes.len(),
        coinbase,
        inputs: Vec::new(),
        base: bytes.as_ptr() as usize,
        candidates,
        commitment: Commitment::default(),
        witness_of: None,
        first_witness_items: 0,
    };
    let parsed = bsl::Transaction::visit(bytes, &mut visitor).map_err(|e| format!("{e:?}"))?;
    let tx = parsed.parsed();
    let (version, ins_outs, locktime) = tx.txid_preimage();
    let txid = sha256d::hash_parts(&[version, ins_outs, locktime]);
    let total = tx.as_ref().len() as u64;
    let weight = tx.weight();
    // BIP141: weight = stripped * 3 + total.
    let stripped_size = (weight - total) / 3;
    let has_witness = stripped_size != total;
    let null = OutPoint::null();
    let coinbase_shaped = visitor.inputs.len() == 1 && visitor.inputs[0] == null;
    let facts = TxFacts {
        txid,
        wtxid: (wtxid && has_witness).then(|| sha256d::hash(bytes)),
        has_witness,
        stripped_size,
        weight,
        coinbase_shaped,
    };
    let mut inputs = visitor.inputs;
    let commitment = visitor.commitment;
    if coinbase {
        inputs.clear();
    }
    let outputs = visitor
        .candidates
        .iter()
        .filter(|c| scripts.contains_hash(c.hash))
        .map(|c| {
            let script_pubkey = ScriptBuf::from_bytes(bytes[c.script.clone()].to_vec());
            let value = Amount::from_sat(c.value);
            (
                c.vout,
                TxOut {
                    value,
                    script_pubkey,
                },
            )
        })
        .collect();
    let tx = ParsedTx {
        txid: Txid::from_byte_array(txid),
        coinbase,
        inputs,
        outputs,
    };
    Ok((tx, facts, commitment))
}

/// First pass: the header, and where each transaction's bytes are in the block.
struct Layout {
    base: usize,
    /// The block's length: no count can claim more transactions than fit in it.
    len: usize,
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
        // The count is untrusted: a header with valid proof of work can precede any body.
        self.txs
            .reserve(total_transactions.min(self.len / MIN_TX_SIZE));
    }

    fn visit_transaction(&mut self, tx: &bsl::Transaction) -> ControlFlow<()> {
        let bytes = tx.as_ref();
        // The transaction's slice lies inside the block's: its offset is the address gap.
        let start = bytes.as_ptr() as usize - self.base;
        self.txs.push(start..start + bytes.len());
        ControlFlow::Continue(())
    }
}

/// An output to probe the filter for.
struct Candidate {
    vout: u32,
    hash: u64,
    value: u64,
    /// Its script, as a range of the transaction's bytes.
    script: Range<usize>,
}

/// Second pass over one transaction: inputs and the outputs worth an exact lookup.
struct TxVisitor<'f, 'c> {
    scripts: &'f ScriptFilter,
    /// The transaction's length, which bounds what its counts may claim.
    len: usize,
    coinbase: bool,
    inputs: Vec<OutPoint>,
    /// Where the transaction's bytes start in memory (script slices lie inside).
    base: usize,
    /// Every spendable output, its filter block fetched ahead: probed once the
    /// transaction is hashed, by when the fetch has arrived.
    candidates: &'c mut Vec<Candidate>,
    /// The coinbase's witness commitment (coinbase only).
    commitment: Commitment,
    /// The input whose witness is being read.
    witness_of: Option<usize>,
    /// How many items the first input's witness has.
    first_witness_items: usize,
}

impl Visitor for TxVisitor<'_, '_> {
    fn visit_tx_ins(&mut self, total_inputs: usize) {
        self.inputs
            .reserve(total_inputs.min(self.len / MIN_TXIN_SIZE));
    }

    fn visit_witness(&mut self, vin: usize) -> ControlFlow<()> {
        self.witness_of = Some(vin);
        ControlFlow::Continue(())
    }

    fn visit_witness_total_element(&mut self, witness_total: usize) {
        if self.witness_of == Some(0) {
            self.first_witness_items = witness_total;
        }
    }

    fn visit_witness_element(&mut self, _witness_i: usize, witness_element: &[u8]) {
        if self.coinbase && self.witness_of == Some(0) && self.first_witness_items == 1 {
            self.commitment.reserved_value = witness_element.try_into().ok();
        }
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
        // The last output that carries a commitment is the one (as Core reads it).
        if self.coinbase
            && script.len() >= 38
            && script.starts_with(&block_check::WITNESS_COMMITMENT_PREFIX)
        {
            self.commitment.root_hash = script[6..38].try_into().ok();
        }
        // Nothing watched (a block only checked, or an empty watched set): no output is
        // worth hashing.
        if !self.scripts.is_empty() && script.first() != Some(&OP_RETURN.to_u8()) {
            let hash = self.scripts.hash(script);
            self.scripts.prefetch(hash);
            // The script's slice lies inside the transaction's: its offset is the gap.
            let start = script.as_ptr() as usize - self.base;
            self.candidates.push(Candidate {
                vout: vout as u32,
                hash,
                value: tx_out.value(),
                script: start..start + script.len(),
            });
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
        let f = ScriptFilter::new(10, 0.01);
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
        assert!(
            matches!(
                err,
                ParseError::Invalid {
                    reason: BlockCheckError::MerkleRoot,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A block of `txs` after a coinbase (with a witness commitment when any has witness
    /// data), its header committing to them: (block, its hash).
    fn block_of(mut txs: Vec<bitcoin::Transaction>) -> bitcoin::Block {
        use bitcoin::{absolute::LockTime, transaction::Version, Sequence, TxIn, Witness};
        let segwit = txs
            .iter()
            .any(|t| t.input.iter().any(|i| !i.witness.is_empty()));
        let mut coinbase = bitcoin::Transaction {
            version: Version::ONE,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(vec![1, 7, 0]),
                sequence: Sequence::MAX,
                witness: if segwit {
                    Witness::from_slice(&[[0u8; 32]])
                } else {
                    Witness::new()
                },
            }],
            output: vec![TxOut {
                value: Amount::from_sat(50),
                script_pubkey: genesis_block(Network::Bitcoin).txdata[0].output[0]
                    .script_pubkey
                    .clone(),
            }],
        };
        txs.insert(0, coinbase.clone());
        let mut block = bitcoin::Block {
            header: genesis_block(Network::Regtest).header,
            txdata: txs,
        };
        if segwit {
            let root = block.witness_root().unwrap();
            let commitment = bitcoin::Block::compute_witness_commitment(&root, &[0u8; 32]);
            let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
            script.extend_from_slice(commitment.as_byte_array());
            coinbase.output.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: ScriptBuf::from_bytes(script),
            });
            block.txdata[0] = coinbase;
        }
        block.header.merkle_root = block.compute_merkle_root().unwrap();
        block
    }

    /// A transaction spending `n`'s outpoint, with a witness when `witness` is given.
    fn spend(n: u8, witness: Option<&[u8]>) -> bitcoin::Transaction {
        use bitcoin::{absolute::LockTime, transaction::Version, Sequence, TxIn, Witness};
        bitcoin::Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::new(Txid::from_byte_array([n; 32]), 0),
                script_sig: ScriptBuf::new(),
                sequence: Sequence::MAX,
                witness: witness.map_or_else(Witness::new, |w| Witness::from_slice(&[w])),
            }],
            output: vec![TxOut {
                value: Amount::from_sat(1_000),
                script_pubkey: ScriptBuf::from_bytes(vec![0x51; 30]),
            }],
        }
    }

    fn check(block: &bitcoin::Block, bytes: Vec<u8>) -> Result<ParsedBlock, ParseError> {
        parse_block(raw(bytes, block.block_hash()), &all())
    }

    #[test]
    fn a_block_with_its_last_transaction_repeated_is_refused_though_its_root_matches() {
        let block = block_of(vec![spend(1, None), spend(2, None)]);
        let parsed = check(&block, serialize(&block)).unwrap();
        assert_eq!(parsed.txs.len(), 3);
        let mut mutated = block.clone();
        mutated.txdata.push(block.txdata[2].clone());
        assert_eq!(
            mutated.compute_merkle_root(),
            Some(block.header.merkle_root)
        );
        let Err(err) = check(&block, serialize(&mutated)) else {
            panic!("a mutated block parsed");
        };
        assert!(
            matches!(
                &err,
                ParseError::Invalid {
                    reason: BlockCheckError::Duplicated,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_bad_body());
    }

    #[test]
    fn witness_data_must_match_the_coinbase_commitment() {
        let block = block_of(vec![spend(1, Some(&[1, 2, 3])), spend(2, None)]);
        check(&block, serialize(&block)).unwrap();
        // Other witness bytes keep every txid and the merkle root, not the commitment.
        let mut altered = block.clone();
        altered.txdata[1].input[0].witness = bitcoin::Witness::from_slice(&[[9u8, 9, 9]]);
        assert_eq!(
            altered.compute_merkle_root(),
            Some(block.header.merkle_root)
        );
        let Err(err) = check(&block, serialize(&altered)) else {
            panic!("a block with altered witnesses parsed");
        };
        assert!(
            matches!(
                &err,
                ParseError::Invalid {
                    reason: BlockCheckError::WitnessCommitment(_),
                    ..
                }
            ),
            "{err}"
        );
        // Witness data in a block that commits to none.
        let mut bare = block_of(vec![spend(1, None)]);
        bare.txdata[1].input[0].witness = bitcoin::Witness::from_slice(&[[1u8]]);
        let Err(err) = check(&bare, serialize(&bare)) else {
            panic!("uncommitted witness data parsed");
        };
        assert!(
            matches!(
                &err,
                ParseError::Invalid {
                    reason: BlockCheckError::UnexpectedWitness,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_first_transaction_that_is_not_a_coinbase_is_refused() {
        let mut block = block_of(vec![spend(1, None)]);
        block.txdata.remove(0);
        block.header.merkle_root = block.compute_merkle_root().unwrap();
        let Err(err) = check(&block, serialize(&block)) else {
            panic!("a block without a coinbase parsed");
        };
        assert!(
            matches!(
                &err,
                ParseError::Invalid {
                    reason: BlockCheckError::Coinbase(0, _),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_count_of_2_64_transactions_or_inputs_is_an_error_not_an_allocation() {
        let g = genesis_block(Network::Bitcoin);
        let mut bytes = serialize(&g.header);
        bytes.extend([0xff; 9]); // varint u64::MAX
        let Err(err) = parse_block(raw(bytes.clone(), g.block_hash()), &all()) else {
            panic!("a block of no transactions parsed");
        };
        assert!(err.to_string().contains("does not decode"), "{err}");
        // One transaction claiming 2^64-1 inputs.
        let mut one = serialize(&g.header);
        one.push(1);
        one.extend([1, 0, 0, 0]);
        one.extend([0xff; 9]);
        one.extend([0u8; 100]);
        assert!(parse_block(raw(one, g.block_hash()), &all()).is_err());
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
