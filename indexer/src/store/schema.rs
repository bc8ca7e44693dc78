//! Every key and value layout of the database, in one place (tabled in `docs/schema.md`).
//!
//! Keys are fixed-size and big-endian so that RocksDB's byte order is chain order.

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{block, BlockHash, OutPoint, ScriptBuf, Txid};

use crate::types::{
    Balance, Event, EventKind, Received, ScriptId, Spent, Transfer, Utxo, WalletId,
};

/// Version of this layout; a database written with another version is refused on open.
pub const FORMAT_VERSION: u32 = 1;

/// The column families. The discriminant is the id used inside undo records.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[repr(u8)]
pub enum Cf {
    /// Format version, network, tip, running rescan.
    Meta = 0,
    /// height -> 80-byte header of the indexed chain.
    Headers = 1,
    /// wallet name -> wallet id.
    Wallets = 2,
    /// wallet id + sequence -> descriptor text.
    Descriptors = 3,
    /// script id -> watched script and its wallets.
    Watch = 4,
    /// outpoint -> watched unspent output.
    Utxo = 5,
    /// script id + outpoint -> value, height, coinbase.
    ScriptUtxo = 6,
    /// script id -> balance.
    ScriptBalance = 7,
    /// wallet id -> balance.
    WalletBalance = 8,
    /// txid + height -> transfer.
    Transfers = 9,
    /// wallet id + height + txid -> nothing (a wallet's history in chain order).
    WalletHistory = 10,
    /// height -> undo record of that block.
    Undo = 11,
    /// wallet id + script id -> nothing (a wallet's scripts, for per-wallet listings).
    WalletScripts = 12,
    /// offset -> event: the durable, append-only log consumers replay.
    Events = 13,
    /// txid -> height + transfer: confirmed transfers whose block left the chain and that
    /// are not confirmed again (what GetTransfer shows as REORGED_OUT).
    Reorged = 14,
    /// script id -> the (wallet, descriptor, branch, index) it was derived at, each.
    Derived = 15,
    /// wallet + descriptor + branch -> derived up to (exclusive) and the gap limit: the
    /// look-ahead of a ranged descriptor, which grows as its scripts are paid.
    Ranges = 16,
    /// wallet + creation height -> the wallet's unspent outputs created at that height
    /// (value outside coinbases, value in coinbases, count): `min_conf` balances subtract
    /// the last `min_conf - 1` heights from the wallet's total.
    WalletRecent = 17,
}

impl Cf {
    /// Every column family, in id order.
    pub const ALL: [Cf; 18] = [
        Cf::Meta,
        Cf::Headers,
        Cf::Wallets,
        Cf::Descriptors,
        Cf::Watch,
        Cf::Utxo,
        Cf::ScriptUtxo,
        Cf::ScriptBalance,
        Cf::WalletBalance,
        Cf::Transfers,
        Cf::WalletHistory,
        Cf::Undo,
        Cf::WalletScripts,
        Cf::Events,
        Cf::Reorged,
        Cf::Derived,
        Cf::Ranges,
        Cf::WalletRecent,
    ];

    /// The families that make up the indexed state compared by the state digest.
    pub const STATE: [Cf; 7] = [
        Cf::Utxo,
        Cf::ScriptUtxo,
        Cf::ScriptBalance,
        Cf::WalletBalance,
        Cf::Transfers,
        Cf::WalletHistory,
        Cf::WalletRecent,
    ];

    /// RocksDB's name for the family.
    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "default",
            Cf::Headers => "headers",
            Cf::Wallets => "wallets",
            Cf::Descriptors => "descriptors",
            Cf::Watch => "watch",
            Cf::Utxo => "utxo",
            Cf::ScriptUtxo => "script_utxo",
            Cf::ScriptBalance => "script_balance",
            Cf::WalletBalance => "wallet_balance",
            Cf::Transfers => "transfers",
            Cf::WalletHistory => "wallet_history",
            Cf::Undo => "undo",
            Cf::WalletScripts => "wallet_scripts",
            Cf::Events => "events",
            Cf::Reorged => "reorged",
            Cf::Derived => "derived",
            Cf::Ranges => "ranges",
            Cf::WalletRecent => "wallet_recent",
        }
    }

    /// The family with undo id `id`.
    pub fn from_id(id: u8) -> Option<Cf> {
        Cf::ALL.get(usize::from(id)).copied()
    }
}

/// A value that does not have the layout its family expects.
#[derive(Debug, thiserror::Error)]
#[error("corrupt {what} record: {detail}")]
pub struct DecodeError {
    what: &'static str,
    detail: String,
}

impl DecodeError {
    /// A record that another record refers to is absent.
    pub fn missing(what: &'static str) -> Self {
        corrupt(what, "missing")
    }
}

fn corrupt(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        detail: detail.into(),
    }
}

/// A cursor over a value's bytes that reports truncation as corruption.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, bytes: &'a [u8]) -> Self {
        Reader { what, bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(corrupt(
                self.what,
                format!("truncated, wanted {n} more bytes"),
            ));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(corrupt(
                self.what,
                format!("{} trailing bytes", self.bytes.len()),
            ))
        }
    }
}

/// Meta key of the format version (u32 BE).
pub const META_VERSION: &[u8] = b"version";
/// Meta key: u64, moved by every commit that changes the `watch` family; a saved bloom
/// filter of the watched set is valid for the generation it names only.
pub const META_WATCH_GENERATION: &[u8] = b"watch_generation";
/// Meta key, present once `wallet_recent` holds every wallet's unspent outputs (built once
/// for a database from before it existed).
pub const META_RECENT_BUILT: &[u8] = b"wallet_recent_built";
/// Meta key of the network name.
pub const META_NETWORK: &[u8] = b"network";
/// Meta key of the tip (height u32 BE + block hash).
pub const META_TIP: &[u8] = b"tip";
/// Meta key of the next wallet id (u32 BE).
pub const META_NEXT_WALLET: &[u8] = b"next_wallet";
/// Meta key of the next event offset (u64 BE).
pub const META_NEXT_EVENT: &[u8] = b"next_event";
/// Meta key of the event log's identity: random hex written when the database is created,
/// so a consumer can tell a rebuilt index's log from the one its offset belongs to.
pub const META_LOG_ID: &[u8] = b"log_id";
/// Meta key of a rescan in progress (from u32 BE, to u32 BE).
pub const META_RESCAN: &[u8] = b"rescan";
/// Meta key prefix of the position a Kafka export reached (+ topic; value: u64 BE, every
/// event below it is on the topic).
pub const META_KAFKA_EXPORTED_PREFIX: &[u8] = b"kafka-exported/";
/// Meta key prefix of accepted, unmerged backfill jobs (+ id u64 BE; value: JSON job).
pub const META_BACKFILL_PREFIX: &[u8] = b"backfill/";

/// The rescan-in-progress record: requested from and to (`u32::MAX` when not given).
pub fn rescan_job(from: Option<u32>, to: Option<u32>) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&from.unwrap_or(u32::MAX).to_be_bytes());
    v[4..].copy_from_slice(&to.unwrap_or(u32::MAX).to_be_bytes());
    v
}

/// Height key (u32 BE).
pub fn height_key(height: u32) -> [u8; 4] {
    height.to_be_bytes()
}

/// Decodes a height key.
pub fn decode_height(key: &[u8]) -> Result<u32, DecodeError> {
    let mut r = Reader::new("height key", key);
    let h = r.u32()?;
    r.finish()?;
    Ok(h)
}

/// The tip record: height and hash.
pub fn encode_tip(height: u32, hash: &BlockHash) -> Vec<u8> {
    let mut v = height.to_be_bytes().to_vec();
    v.extend_from_slice(hash.as_byte_array());
    v
}

/// Decodes the tip record.
pub fn decode_tip(bytes: &[u8]) -> Result<(u32, BlockHash), DecodeError> {
    let mut r = Reader::new("tip", bytes);
    let height = r.u32()?;
    let hash = BlockHash::from_byte_array(r.array()?);
    r.finish()?;
    Ok((height, hash))
}

/// A header value.
pub fn encode_header(header: &block::Header) -> Vec<u8> {
    serialize(header)
}

/// Decodes a header value.
pub fn decode_header(bytes: &[u8]) -> Result<block::Header, DecodeError> {
    deserialize(bytes).map_err(|e| corrupt("header", e.to_string()))
}

/// Outpoint key: txid (internal byte order) + vout BE.
pub fn outpoint_key(outpoint: &OutPoint) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(outpoint.txid.as_byte_array());
    k[32..].copy_from_slice(&outpoint.vout.to_be_bytes());
    k
}

/// Decodes an outpoint key.
pub fn decode_outpoint(bytes: &[u8]) -> Result<OutPoint, DecodeError> {
    let mut r = Reader::new("outpoint", bytes);
    let txid = Txid::from_byte_array(r.array()?);
    let vout = r.u32()?;
    r.finish()?;
    Ok(OutPoint { txid, vout })
}

/// UTXO value: value u64, height u32, coinbase u8, script id, script bytes.
pub fn encode_utxo(utxo: &Utxo) -> Vec<u8> {
    let mut v = Vec::with_capacity(45 + utxo.script.len());
    v.extend_from_slice(&utxo.value.to_be_bytes());
    v.extend_from_slice(&utxo.height.to_be_bytes());
    v.push(u8::from(utxo.coinbase));
    v.extend_from_slice(&utxo.script_id.0);
    v.extend_from_slice(utxo.script.as_bytes());
    v
}

/// Decodes a UTXO value.
pub fn decode_utxo(bytes: &[u8]) -> Result<Utxo, DecodeError> {
    let mut r = Reader::new("utxo", bytes);
    Ok(Utxo {
        value: r.u64()?,
        height: r.u32()?,
        coinbase: r.u8()? != 0,
        script_id: ScriptId(r.array()?),
        script: ScriptBuf::from_bytes(r.rest().to_vec()),
    })
}

/// Decodes a script id key.
pub fn decode_script_id(key: &[u8]) -> Result<ScriptId, DecodeError> {
    let mut r = Reader::new("script id", key);
    let id = ScriptId(r.array()?);
    r.finish()?;
    Ok(id)
}

/// Per-script UTXO key: script id + outpoint key.
pub fn script_utxo_key(script_id: &ScriptId, outpoint: &OutPoint) -> [u8; 68] {
    let mut k = [0u8; 68];
    k[..32].copy_from_slice(&script_id.0);
    k[32..].copy_from_slice(&outpoint_key(outpoint));
    k
}

/// Per-script UTXO value: what `min_conf` and maturity queries need without a UTXO lookup.
pub fn encode_script_utxo(utxo: &Utxo) -> [u8; 13] {
    let mut v = [0u8; 13];
    v[..8].copy_from_slice(&utxo.value.to_be_bytes());
    v[8..12].copy_from_slice(&utxo.height.to_be_bytes());
    v[12] = u8::from(utxo.coinbase);
    v
}

/// Decodes a per-script UTXO value: (value, height, coinbase).
pub fn decode_script_utxo(bytes: &[u8]) -> Result<(u64, u32, bool), DecodeError> {
    let mut r = Reader::new("script utxo", bytes);
    let v = (r.u64()?, r.u32()?, r.u8()? != 0);
    r.finish()?;
    Ok(v)
}

/// A wallet's unspent outputs created at one height.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recent {
    /// Value outside coinbases.
    pub plain: u64,
    /// Value in coinbases (immature until 100 blocks have passed).
    pub coinbase: u64,
    /// How many.
    pub count: u64,
}

impl Recent {
    /// Whether it holds nothing (its key is then deleted).
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.plain == 0 && self.coinbase == 0
    }
}

/// Wallet-recent key: wallet + height.
pub fn wallet_recent_key(wallet: WalletId, height: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&wallet.0.to_be_bytes());
    k[4..].copy_from_slice(&height.to_be_bytes());
    k
}

/// Wallet-recent value: plain, coinbase, count (u64 BE each).
pub fn encode_recent(r: &Recent) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&r.plain.to_be_bytes());
    v[8..16].copy_from_slice(&r.coinbase.to_be_bytes());
    v[16..].copy_from_slice(&r.count.to_be_bytes());
    v
}

/// Decodes a wallet-recent value.
pub fn decode_recent(bytes: &[u8]) -> Result<Recent, DecodeError> {
    let mut r = Reader::new("wallet recent", bytes);
    let v = Recent {
        plain: r.u64()?,
        coinbase: r.u64()?,
        count: r.u64()?,
    };
    r.finish()?;
    Ok(v)
}

/// Balance value: confirmed, immature, utxo count (u64 BE each).
pub fn encode_balance(b: &Balance) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&b.confirmed.to_be_bytes());
    v[8..16].copy_from_slice(&b.immature.to_be_bytes());
    v[16..].copy_from_slice(&b.utxo_count.to_be_bytes());
    v
}

/// Decodes a balance value.
pub fn decode_balance(bytes: &[u8]) -> Result<Balance, DecodeError> {
    let mut r = Reader::new("balance", bytes);
    let b = Balance {
        confirmed: r.u64()?,
        immature: r.u64()?,
        utxo_count: r.u64()?,
    };
    r.finish()?;
    Ok(b)
}

/// Wallet id key/value (u32 BE).
pub fn wallet_key(id: WalletId) -> [u8; 4] {
    id.0.to_be_bytes()
}

/// Decodes a wallet id.
pub fn decode_wallet(bytes: &[u8]) -> Result<WalletId, DecodeError> {
    let mut r = Reader::new("wallet id", bytes);
    let id = WalletId(r.u32()?);
    r.finish()?;
    Ok(id)
}

/// Descriptor key: wallet id + sequence number within the wallet.
pub fn descriptor_key(wallet: WalletId, seq: u32) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&wallet.0.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Where a ranged descriptor's script came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Derivation {
    /// The wallet.
    pub wallet: WalletId,
    /// The descriptor's sequence number in the wallet.
    pub seq: u32,
    /// Its branch (0 for a single path; multipath `<0;1>` gives 0 and 1).
    pub branch: u32,
    /// The derivation index.
    pub index: u32,
}

/// Derived value: each derivation, 16 bytes.
pub fn encode_derived(all: &[Derivation]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 * all.len());
    for d in all {
        for n in [d.wallet.0, d.seq, d.branch, d.index] {
            v.extend_from_slice(&n.to_be_bytes());
        }
    }
    v
}

/// Decodes a derived value.
pub fn decode_derived(bytes: &[u8]) -> Result<Vec<Derivation>, DecodeError> {
    if !bytes.len().is_multiple_of(16) {
        return Err(corrupt("derived", "not a multiple of 16 bytes"));
    }
    Ok(bytes
        .chunks_exact(16)
        .map(|c| {
            let n = |i: usize| u32::from_be_bytes(c[i..i + 4].try_into().expect("4 bytes"));
            Derivation {
                wallet: WalletId(n(0)),
                seq: n(4),
                branch: n(8),
                index: n(12),
            }
        })
        .collect())
}

/// Ranges key: wallet + descriptor sequence + branch.
pub fn range_key(wallet: WalletId, seq: u32, branch: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&wallet.0.to_be_bytes());
    k[4..8].copy_from_slice(&seq.to_be_bytes());
    k[8..].copy_from_slice(&branch.to_be_bytes());
    k
}

/// A ranged descriptor branch's look-ahead: scripts derived up to `next` (exclusive), and
/// the gap of unused scripts kept after the highest one paid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Derived up to this index (exclusive).
    pub next: u32,
    /// The gap limit.
    pub gap: u32,
}

/// Ranges value: next + gap.
pub fn encode_range(r: &Range) -> [u8; 8] {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&r.next.to_be_bytes());
    v[4..].copy_from_slice(&r.gap.to_be_bytes());
    v
}

/// Decodes a ranges value.
pub fn decode_range(bytes: &[u8]) -> Result<Range, DecodeError> {
    let mut r = Reader::new("range", bytes);
    let (next, gap) = (r.u32()?, r.u32()?);
    r.finish()?;
    Ok(Range { next, gap })
}

/// The sequence number of a descriptor key.
pub fn decode_descriptor_seq(key: &[u8]) -> Result<u32, DecodeError> {
    key.get(4..8)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("descriptor key", "not 8 bytes"))
}

/// Wallet-scripts key: wallet id + script id.
pub fn wallet_script_key(wallet: WalletId, script: &ScriptId) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..4].copy_from_slice(&wallet.0.to_be_bytes());
    k[4..].copy_from_slice(&script.0);
    k
}

/// A watched script and the wallets that own it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct WatchRecord {
    /// Wallets the script belongs to, sorted.
    pub wallets: Vec<WalletId>,
    /// The script_pubkey.
    pub script: ScriptBuf,
}

/// Watch value: wallet count u16, wallet ids, script bytes.
pub fn encode_watch(rec: &WatchRecord) -> Vec<u8> {
    let count = u16::try_from(rec.wallets.len()).expect("a script belongs to < 65536 wallets");
    let mut v = count.to_be_bytes().to_vec();
    for w in &rec.wallets {
        v.extend_from_slice(&w.0.to_be_bytes());
    }
    v.extend_from_slice(rec.script.as_bytes());
    v
}

/// Decodes a watch value.
pub fn decode_watch(bytes: &[u8]) -> Result<WatchRecord, DecodeError> {
    let mut r = Reader::new("watch", bytes);
    let count = u16::from_be_bytes(r.array()?);
    let wallets = (0..count)
        .map(|_| r.u32().map(WalletId))
        .collect::<Result<_, _>>()?;
    Ok(WatchRecord {
        wallets,
        script: ScriptBuf::from_bytes(r.rest().to_vec()),
    })
}

/// The script of a watch value, read in place (loading millions of them allocates nothing).
pub fn watch_script(bytes: &[u8]) -> Result<&[u8], DecodeError> {
    let count = bytes
        .get(..2)
        .map(|c| usize::from(u16::from_be_bytes([c[0], c[1]])))
        .ok_or_else(|| corrupt("watch", "too short"))?;
    bytes
        .get(2 + 4 * count..)
        .ok_or_else(|| corrupt("watch", "shorter than its wallet list"))
}

/// Transfer key: txid + height (a txid can confirm twice: BIP30 duplicate coinbases).
pub fn transfer_key(txid: &Txid, height: u32) -> [u8; 36] {
    let mut k = [0u8; 36];
    k[..32].copy_from_slice(txid.as_byte_array());
    k[32..].copy_from_slice(&height.to_be_bytes());
    k
}

/// Transfer value: block hash, tx index, received list, spent list.
pub fn encode_transfer(t: &Transfer) -> Vec<u8> {
    let mut v = Vec::with_capacity(44 + 44 * t.received.len() + 80 * t.spent.len());
    v.extend_from_slice(t.block_hash.as_byte_array());
    v.extend_from_slice(&t.tx_index.to_be_bytes());
    v.extend_from_slice(&(t.received.len() as u32).to_be_bytes());
    for r in &t.received {
        v.extend_from_slice(&r.vout.to_be_bytes());
        v.extend_from_slice(&r.script_id.0);
        v.extend_from_slice(&r.value.to_be_bytes());
    }
    v.extend_from_slice(&(t.spent.len() as u32).to_be_bytes());
    for s in &t.spent {
        v.extend_from_slice(&s.input.to_be_bytes());
        v.extend_from_slice(&outpoint_key(&s.outpoint));
        v.extend_from_slice(&s.script_id.0);
        v.extend_from_slice(&s.value.to_be_bytes());
    }
    v
}

/// Decodes a transfer from its key and value.
pub fn decode_transfer(key: &[u8], bytes: &[u8]) -> Result<Transfer, DecodeError> {
    let mut k = Reader::new("transfer key", key);
    let txid = Txid::from_byte_array(k.array()?);
    let height = k.u32()?;
    k.finish()?;
    let mut r = Reader::new("transfer", bytes);
    let block_hash = BlockHash::from_byte_array(r.array()?);
    let tx_index = r.u32()?;
    let n = r.u32()?;
    let received = (0..n)
        .map(|_| {
            Ok(Received {
                vout: r.u32()?,
                script_id: ScriptId(r.array()?),
                value: r.u64()?,
            })
        })
        .collect::<Result<_, DecodeError>>()?;
    let n = r.u32()?;
    let spent = (0..n)
        .map(|_| {
            Ok(Spent {
                input: r.u32()?,
                outpoint: decode_outpoint(r.take(36)?)?,
                script_id: ScriptId(r.array()?),
                value: r.u64()?,
            })
        })
        .collect::<Result<_, DecodeError>>()?;
    r.finish()?;
    Ok(Transfer {
        txid,
        height,
        block_hash,
        tx_index,
        received,
        spent,
    })
}

/// Reorged-out value: the height the transfer had, then the transfer as stored.
pub fn encode_reorged(t: &Transfer) -> Vec<u8> {
    let mut v = t.height.to_be_bytes().to_vec();
    v.extend_from_slice(&encode_transfer(t));
    v
}

/// Decodes a reorged-out record (key: txid).
pub fn decode_reorged(key: &[u8], bytes: &[u8]) -> Result<Transfer, DecodeError> {
    if bytes.len() < 4 || key.len() != 32 {
        return Err(corrupt("reorged transfer", "too short"));
    }
    let mut transfer_key = key.to_vec();
    transfer_key.extend_from_slice(&bytes[..4]);
    decode_transfer(&transfer_key, &bytes[4..])
}

/// Wallet history key: wallet id + height + txid.
pub fn history_key(wallet: WalletId, height: u32, txid: &Txid) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..4].copy_from_slice(&wallet.0.to_be_bytes());
    k[4..8].copy_from_slice(&height.to_be_bytes());
    k[8..].copy_from_slice(txid.as_byte_array());
    k
}

/// Event key: the offset, u64 BE.
pub fn event_key(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

/// Decodes an offset (event key or the next-offset record).
pub fn decode_offset(bytes: &[u8]) -> Result<u64, DecodeError> {
    let mut r = Reader::new("event offset", bytes);
    let o = r.u64()?;
    r.finish()?;
    Ok(o)
}

/// Event value: kind u8, height u32, block hash, then the txid for transfer events.
pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut v = Vec::with_capacity(69);
    v.push(e.kind as u8);
    v.extend_from_slice(&e.height.to_be_bytes());
    v.extend_from_slice(e.block_hash.as_byte_array());
    if let Some(txid) = e.txid {
        v.extend_from_slice(txid.as_byte_array());
    }
    // Optional, so events written before wallets were recorded still decode.
    if !e.wallets.is_empty() {
        v.extend_from_slice(&(e.wallets.len() as u32).to_be_bytes());
        for w in &e.wallets {
            v.extend_from_slice(&w.0.to_be_bytes());
        }
    }
    v
}

/// Decodes an event value.
pub fn decode_event(bytes: &[u8]) -> Result<Event, DecodeError> {
    let mut r = Reader::new("event", bytes);
    let kind = match r.u8()? {
        1 => EventKind::BlockConnected,
        2 => EventKind::BlockDisconnected,
        3 => EventKind::TransferConfirmed,
        4 => EventKind::TransferReorgedOut,
        5 => EventKind::TransferSeen,
        6 => EventKind::TransferReplaced,
        7 => EventKind::TransferEvicted,
        k => return Err(corrupt("event", format!("unknown kind {k}"))),
    };
    let height = r.u32()?;
    let block_hash = BlockHash::from_byte_array(r.array()?);
    let txid = match kind {
        EventKind::BlockConnected | EventKind::BlockDisconnected => None,
        _ => Some(Txid::from_byte_array(r.array()?)),
    };
    let mut wallets = Vec::new();
    if !r.is_empty() {
        let n = r.u32()?;
        for _ in 0..n {
            wallets.push(WalletId(r.u32()?));
        }
    }
    r.finish()?;
    Ok(Event {
        kind,
        height,
        block_hash,
        txid,
        wallets,
    })
}

/// One key's state before a block: its family, key, and prior value (`None`: absent).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UndoEntry {
    /// Column family.
    pub cf: Cf,
    /// Key.
    pub key: Vec<u8>,
    /// Value before the block, or `None` when the block created the key.
    pub prior: Option<Vec<u8>>,
}

/// Undo value: a sequence of (cf u8, key len u32, key, present u8, [value len u32, value]).
pub fn encode_undo(entries: &[UndoEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    for e in entries {
        v.push(e.cf as u8);
        v.extend_from_slice(&(e.key.len() as u32).to_be_bytes());
        v.extend_from_slice(&e.key);
        match &e.prior {
            None => v.push(0),
            Some(p) => {
                v.push(1);
                v.extend_from_slice(&(p.len() as u32).to_be_bytes());
                v.extend_from_slice(p);
            }
        }
    }
    v
}

/// Decodes an undo value.
pub fn decode_undo(bytes: &[u8]) -> Result<Vec<UndoEntry>, DecodeError> {
    let mut r = Reader::new("undo", bytes);
    let mut out = Vec::new();
    while !r.bytes.is_empty() {
        let id = r.u8()?;
        let cf = Cf::from_id(id).ok_or_else(|| corrupt("undo", format!("unknown family {id}")))?;
        let len = r.u32()? as usize;
        let key = r.take(len)?.to_vec();
        let prior = match r.u8()? {
            0 => None,
            _ => {
                let len = r.u32()? as usize;
                Some(r.take(len)?.to_vec())
            }
        };
        out.push(UndoEntry { cf, key, prior });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::hashes::Hash;

    #[test]
    fn events_round_trip_with_their_wallets_and_old_ones_decode_without() {
        let e = Event {
            kind: EventKind::TransferSeen,
            height: 7,
            block_hash: BlockHash::from_byte_array([1; 32]),
            txid: Some(Txid::from_byte_array([2; 32])),
            wallets: vec![WalletId(1), WalletId(300)],
        };
        assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
        // As written before events named their wallets: kind, height, hash, txid.
        let old = &encode_event(&e)[..1 + 4 + 32 + 32];
        let decoded = decode_event(old).unwrap();
        assert_eq!(decoded.wallets, Vec::<WalletId>::new());
        assert_eq!(decoded.txid, e.txid);
        // A count the bytes do not hold is an error, not an allocation.
        let mut bad = old.to_vec();
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_event(&bad).is_err());
    }

    #[test]
    fn transfer_round_trips() {
        let t = Transfer {
            txid: Txid::from_byte_array([7; 32]),
            height: 91842,
            block_hash: BlockHash::from_byte_array([9; 32]),
            tx_index: 3,
            received: vec![Received {
                vout: 1,
                script_id: ScriptId([1; 32]),
                value: 0,
            }],
            spent: vec![Spent {
                input: 0,
                outpoint: OutPoint {
                    txid: Txid::from_byte_array([2; 32]),
                    vout: u32::MAX,
                },
                script_id: ScriptId([3; 32]),
                value: u64::MAX,
            }],
        };
        let key = transfer_key(&t.txid, t.height);
        assert_eq!(decode_transfer(&key, &encode_transfer(&t)).unwrap(), t);
    }

    #[test]
    fn undo_round_trips_and_rejects_truncation() {
        let entries = vec![
            UndoEntry {
                cf: Cf::Utxo,
                key: vec![1, 2, 3],
                prior: None,
            },
            UndoEntry {
                cf: Cf::Meta,
                key: META_TIP.to_vec(),
                prior: Some(vec![]),
            },
        ];
        let bytes = encode_undo(&entries);
        assert_eq!(decode_undo(&bytes).unwrap(), entries);
        assert!(decode_undo(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn outpoint_keys_sort_by_txid_then_vout() {
        let a = OutPoint {
            txid: Txid::from_byte_array([1; 32]),
            vout: 2,
        };
        let b = OutPoint { vout: 256, ..a };
        assert!(outpoint_key(&a) < outpoint_key(&b));
        assert_eq!(decode_outpoint(&outpoint_key(&b)).unwrap(), b);
    }
}
