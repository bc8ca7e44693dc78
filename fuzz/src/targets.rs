//! The targets: one function per parser of untrusted input.

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{block, Block, BlockHash, Network};
use indexer::blkfile::BlocksDir;
use indexer::pipeline::parse::{parse_block, RawBlock};
use indexer::script_filter::ScriptFilter;

/// The network of a fuzz input's selector byte.
fn network(selector: u8) -> Network {
    match selector % 4 {
        0 => Network::Bitcoin,
        1 => Network::Testnet,
        2 => Network::Signet,
        _ => Network::Regtest,
    }
}

/// A block file: byte 0 picks the network (bits 0-1) and obfuscation (bit 2, key in the
/// next 8 bytes); the rest is `blk00000.dat`. Every record found is read and parsed.
pub fn blk_records(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (key, file) = if selector & 4 != 0 && rest.len() >= 8 {
        (Some(&rest[..8]), &rest[8..])
    } else {
        (None, rest)
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::write(dir.path().join("blk00000.dat"), file).expect("write the file");
    if let Some(key) = key {
        std::fs::write(dir.path().join("xor.dat"), key).expect("write the key");
    }
    let Ok(blocks) = BlocksDir::open(dir.path(), network(selector)) else {
        return;
    };
    let Ok(scan) = blocks.scan_headers() else {
        return;
    };
    let nothing = ScriptFilter::new(1, 0.5);
    for (header, loc) in scan.headers {
        assert!(loc.len >= 80, "a record shorter than a header was listed");
        let bytes = blocks.read_block(loc).expect("a listed record is readable");
        let _ = parse_block(
            RawBlock {
                height: 0,
                hash: header.block_hash(),
                bytes,
                origin: "fuzz".into(),
            },
            &nothing,
        );
    }
}

/// A block body under any header: the zero-copy parser must not panic, and whatever it
/// accepts rust-bitcoin's decoder must decode to the same transactions, inputs and
/// (spendable) outputs, with a merkle root that checks.
pub fn block_parse(data: &[u8]) {
    let theirs: Option<Block> = deserialize(data).ok();
    let hash = data
        .get(..80)
        .and_then(|h| deserialize::<block::Header>(h).ok())
        .map_or(BlockHash::all_zeros(), |h| h.block_hash());
    // Every script theirs has is watched, so ours keeps every spendable output.
    let filter = ScriptFilter::new(1024, 1e-6);
    if let Some(b) = &theirs {
        for tx in &b.txdata {
            for out in &tx.output {
                filter.insert(out.script_pubkey.as_bytes());
            }
        }
    }
    let raw = RawBlock {
        height: 1,
        hash,
        bytes: data.to_vec(),
        origin: "fuzz".into(),
    };
    let Ok(ours) = parse_block(raw, &filter) else {
        return;
    };
    let theirs = theirs.expect("rust-bitcoin decodes every block the parser accepts");
    assert!(
        theirs.check_merkle_root(),
        "accepted with a wrong merkle root"
    );
    assert_eq!(ours.txs.len(), theirs.txdata.len());
    for (i, (o, t)) in ours.txs.iter().zip(&theirs.txdata).enumerate() {
        assert_eq!(o.txid, t.compute_txid(), "txid of tx {i}");
        assert_eq!(o.coinbase, i == 0);
        if i > 0 {
            let inputs: Vec<_> = t.input.iter().map(|i| i.previous_output).collect();
            assert_eq!(o.inputs, inputs, "inputs of tx {i}");
        }
        let outputs: Vec<_> = t
            .output
            .iter()
            .enumerate()
            .filter(|(_, out)| !out.script_pubkey.as_bytes().starts_with(&[0x6a]))
            .map(|(vout, out)| (vout as u32, out.clone()))
            .collect();
        assert_eq!(o.outputs, outputs, "outputs of tx {i}");
    }
}

/// ZMQ messages: a count byte (frames in its low bits, the endpoint in its top bit), then
/// each frame as a length and its bytes (see [`zmq_message`]); all messages go through one
/// tracker, so sequence numbers are checked across them too.
pub fn zmq_frames(data: &[u8]) {
    let mut tracker = indexer::zmq_feed::SequenceTracker::default();
    let mut rest = data;
    while let Some((&count, after)) = rest.split_first() {
        rest = after;
        let mut frames = Vec::new();
        for _ in 0..count % 5 {
            let Some((len, after)) = frame_len(rest) else {
                break;
            };
            let len = len.min(after.len());
            frames.push(after[..len].to_vec());
            rest = &after[len..];
        }
        let endpoint = if count & 0x80 != 0 { "a" } else { "b" };
        let _ = tracker.decode(endpoint, frames);
    }
}

/// A frame length: one byte below 254, else 254 and a u16 or 255 and a u32 (little
/// endian).
fn frame_len(data: &[u8]) -> Option<(usize, &[u8])> {
    match data.split_first()? {
        (254, rest) if rest.len() >= 2 => Some((
            usize::from(u16::from_le_bytes([rest[0], rest[1]])),
            &rest[2..],
        )),
        (255, rest) if rest.len() >= 4 => Some((
            u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize,
            &rest[4..],
        )),
        (&n, rest) if n < 254 => Some((usize::from(n), rest)),
        _ => None,
    }
}

/// One message in [`zmq_frames`]'s encoding (a seed).
pub fn zmq_message(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![frames.len() as u8];
    for f in frames {
        if f.len() < 254 {
            out.push(f.len() as u8);
        } else {
            out.push(255);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(f);
    }
    out
}

/// A JSON-RPC answer body, read as each reply the indexer and orchestrator use.
pub fn rpc_answers(data: &[u8]) {
    use bitcoind::rpc::reply_of;
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let _ = reply_of::<bitcoind::ChainInfo>("getblockchaininfo", body);
    let _ = reply_of::<BlockHash>("getbestblockhash", body);
    let _ = reply_of::<Vec<bitcoin::Txid>>("getrawmempool", body);
    let _ = reply_of::<bitcoin::Txid>("sendrawtransaction", body);
    if let Ok(hex) = reply_of::<String>("getblock", body) {
        use bitcoin::hex::FromHex;
        let _ = Vec::<u8>::from_hex(&hex);
    }
    if let Ok(v) = reply_of::<serde_json::Value>("estimatesmartfee", body) {
        if let Some(rate) = bitcoind::fee_rate_of(&v) {
            assert!(
                rate <= bitcoin::Amount::ONE_BTC,
                "{rate} per kvB taken as an estimate"
            );
        }
    }
}

/// A descriptor or address as `watch add` and `AddWatch` take it: byte 0 picks the network,
/// byte 1 the gap limit (at most 64); the rest is the text.
pub fn descriptors(data: &[u8]) {
    let [selector, gap, text @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let gap_limit = 1 + u32::from(*gap % 64);
    if let Ok(expanded) = indexer::descriptors::expand(text, network(*selector), gap_limit) {
        assert!(!expanded.scripts.is_empty(), "a descriptor with no script");
        assert!(
            expanded.scripts.len() <= indexer::descriptors::MAX_BRANCHES * gap_limit as usize,
            "{} scripts from one descriptor",
            expanded.scripts.len()
        );
    }
    let _ = text.parse::<bitcoin::Address<bitcoin::address::NetworkUnchecked>>();
}

/// A page token as a client may send it back: decoding accepts only what encoding makes.
pub fn page_tokens(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = indexer::query::decode_token(token) {
        assert_eq!(
            indexer::query::decode_token(&indexer::query::encode_token(&key)).ok(),
            Some(key)
        );
    }
}

/// A config file of either binary: parsed (unknown keys and bad values are errors) and,
/// for the indexer, resolved into settings.
pub fn config_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("fuzz.toml");
    if let Ok(file) = service::config::parse_toml::<indexer::config::Settings>(path, text) {
        let _ = indexer::config::Config::resolve(file);
    }
    let _ = service::config::parse_toml::<orchestrator::config::Settings>(path, text);
}
