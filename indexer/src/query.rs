//! Read queries for the API: balances and unspent outputs of a wallet, an address or a
//! script, all read from one snapshot (one tip), confirmations counted from stored heights,
//! lists paged by opaque tokens.

use std::str::FromStr;

use bitcoin::hex::FromHex;
use std::collections::BTreeMap;

use bitcoin::hashes::Hash;
use bitcoin::{Address, BlockHash, Network, OutPoint, ScriptBuf, Txid};

use crate::store::schema::{self, Cf};
use crate::store::{Reader, Snapshot, Store, StoreError};
use crate::types::{Balance, Event, ScriptId, Transfer, WalletId, COINBASE_MATURITY};

/// Page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page served.
pub const MAX_PAGE: u32 = 1000;

/// A query that cannot be answered as asked.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No wallet has this name.
    #[error("unknown wallet {0:?}")]
    UnknownWallet(String),
    /// The address does not parse.
    #[error("invalid address {address:?}: {detail}")]
    InvalidAddress {
        /// The text given.
        address: String,
        /// What is wrong.
        detail: String,
    },
    /// The address is for another network.
    #[error("address {address:?} is not a {network} address")]
    WrongNetwork {
        /// The text given.
        address: String,
        /// The indexer's network.
        network: Network,
    },
    /// The script hex does not parse.
    #[error("invalid script_hex: {0}")]
    InvalidScript(String),
    /// The txid is not 64 hex digits.
    #[error("invalid txid {0:?}")]
    InvalidTxid(String),
    /// The height range is empty.
    #[error("from_height {from} is above to_height {to}")]
    BadRange {
        /// Requested start.
        from: u32,
        /// Requested end.
        to: u32,
    },
    /// The asked offset was pruned from the event log.
    #[error("offset {asked} was pruned from the event log; the oldest kept is {first}")]
    Pruned {
        /// The offset asked for.
        asked: u64,
        /// The oldest offset kept.
        first: u64,
    },
    /// The asked offset is past the end of the log.
    #[error("offset {asked} is past the end of the event log ({next} is the next to be written)")]
    FutureOffset {
        /// The offset asked for.
        asked: u64,
        /// The next offset the log will write.
        next: u64,
    },
    /// The page token is not one this server issued.
    #[error("invalid page token")]
    BadPageToken,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<schema::DecodeError> for QueryError {
    fn from(e: schema::DecodeError) -> Self {
        QueryError::Store(e.into())
    }
}

/// What a query is about.
#[derive(Clone, Debug)]
pub enum Target {
    /// A wallet by name.
    Wallet(String),
    /// One address.
    Address(String),
    /// One script_pubkey, hex.
    ScriptHex(String),
}

/// A balance as of the snapshot's tip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceReport {
    /// Spendable satoshis with at least `min_conf` confirmations.
    pub confirmed: u64,
    /// Satoshis in immature coinbase outputs with at least `min_conf` confirmations.
    pub immature: u64,
    /// Outputs counted.
    pub utxo_count: u64,
    /// The tip the answer is for.
    pub tip: Option<(u32, BlockHash)>,
}

/// One unspent output as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UtxoEntry {
    /// The outpoint.
    pub outpoint: OutPoint,
    /// Satoshis.
    pub value: u64,
    /// The script_pubkey.
    pub script: ScriptBuf,
    /// Its address, where one exists.
    pub address: Option<Address>,
    /// Height of its block.
    pub height: u32,
    /// Confirmations at the snapshot's tip.
    pub confirmations: u32,
    /// From a coinbase.
    pub coinbase: bool,
}

/// A watched script as shown in a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptInfo {
    /// The script_pubkey.
    pub script: ScriptBuf,
    /// Its address, where one exists.
    pub address: Option<Address>,
    /// Names of the wallets watching it.
    pub wallets: Vec<String>,
}

/// A watched output a transfer created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedEntry {
    /// Output index.
    pub vout: u32,
    /// Satoshis.
    pub value: u64,
    /// The script paid.
    pub script: ScriptInfo,
}

/// A watched output a transfer spent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpentEntry {
    /// Input index.
    pub input: u32,
    /// The outpoint spent.
    pub outpoint: OutPoint,
    /// Satoshis.
    pub value: u64,
    /// The script that owned it.
    pub script: ScriptInfo,
}

/// A confirmed transfer as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferEntry {
    /// The transaction.
    pub txid: Txid,
    /// Confirming block height.
    pub height: u32,
    /// Confirming block hash.
    pub block_hash: BlockHash,
    /// Confirmations at the snapshot's tip.
    pub confirmations: u32,
    /// Watched outputs created.
    pub received: Vec<ReceivedEntry>,
    /// Watched outputs spent.
    pub spent: Vec<SpentEntry>,
}

/// A target resolved against the database.
enum Resolved {
    Wallet(WalletId),
    Script(ScriptBuf),
}

/// Queries against one snapshot of the database.
pub struct Query<'a> {
    snap: Snapshot<'a>,
    network: Network,
    tip: Option<(u32, BlockHash)>,
}

impl<'a> Query<'a> {
    /// Takes a snapshot: every answer of this query is for the same tip.
    pub fn new(store: &'a Store, network: Network) -> Result<Self, QueryError> {
        let snap = store.snapshot();
        let tip = snap.tip()?;
        Ok(Query { snap, network, tip })
    }

    /// The tip of the snapshot.
    pub fn tip(&self) -> Option<(u32, BlockHash)> {
        self.tip
    }

    fn confirmations(&self, height: u32) -> u32 {
        self.tip
            .map_or(0, |(tip, _)| (tip + 1).saturating_sub(height))
    }

    /// The balance of `target` counting outputs with at least `min_conf` confirmations.
    /// A wallet's is its stored aggregate, less its still-unspent outputs from the last
    /// `min_conf - 1` blocks (found through its history): the cost follows recent activity,
    /// not the wallet's size. A single script's outputs are few enough to count directly.
    pub fn balance(&self, target: &Target, min_conf: u32) -> Result<BalanceReport, QueryError> {
        let resolved = self.resolve(target)?;
        let b = match &resolved {
            Resolved::Wallet(id) => {
                let total = self.snap.wallet_balance(*id)?;
                match self.tip {
                    Some((tip, _)) if min_conf > 1 => {
                        // Outputs above `cutoff` have fewer than `min_conf` confirmations.
                        let cutoff = (tip + 1).saturating_sub(min_conf);
                        let recent = self.recent_unspent(*id, cutoff)?;
                        total.moved(&recent, &Balance::default()).ok_or_else(|| {
                            StoreError::Decode(schema::DecodeError::missing(
                                "wallet balance covering its recent outputs",
                            ))
                        })?
                    }
                    _ => total,
                }
            }
            Resolved::Script(script) if min_conf <= 1 => {
                self.snap.script_balance(&ScriptId::of(script))?
            }
            Resolved::Script(_) => {
                let mut b = Balance::default();
                self.each_utxo(&resolved, None, |_, e| {
                    if e.confirmations >= min_conf {
                        b.add(e.value, self.is_immature(&e));
                    }
                    Ok(true)
                })?;
                b
            }
        };
        Ok(BalanceReport {
            confirmed: b.confirmed,
            immature: b.immature,
            utxo_count: b.utxo_count,
            tip: self.tip,
        })
    }

    /// The wallet's unspent outputs created above height `cutoff`, counted as the stored
    /// aggregate counts them at the tip: one short scan of its per-height aggregates.
    fn recent_unspent(&self, wallet: WalletId, cutoff: u32) -> Result<Balance, QueryError> {
        let prefix = schema::wallet_key(wallet);
        let seek = schema::wallet_recent_key(wallet, cutoff.saturating_add(1));
        let tip = self.tip.map_or(0, |(t, _)| t);
        let mut recent = Balance::default();
        self.snap
            .scan(Cf::WalletRecent, &prefix, Some(&seek), |k, v| {
                let height = u32::from_be_bytes(k[4..8].try_into().expect("8-byte key"));
                let r = schema::decode_recent(v)?;
                let immature = tip < height.saturating_add(COINBASE_MATURITY);
                recent.confirmed += r.plain;
                if immature {
                    recent.immature += r.coinbase;
                } else {
                    recent.confirmed += r.coinbase;
                }
                recent.utxo_count += r.count;
                Ok::<_, QueryError>(true)
            })?;
        Ok(recent)
    }

    fn is_immature(&self, e: &UtxoEntry) -> bool {
        e.coinbase
            && self
                .tip
                .is_some_and(|(tip, _)| tip < e.height + COINBASE_MATURITY)
    }

    /// One page of `target`'s unspent outputs with at least `min_conf` confirmations, in
    /// (script, outpoint) order, and the token of the next page if there is one.
    pub fn list_utxos(
        &self,
        target: &Target,
        min_conf: u32,
        limit: u32,
        page_token: Option<&str>,
    ) -> Result<(Vec<UtxoEntry>, Option<String>), QueryError> {
        let limit = page_limit(limit);
        let after = page_token.map(decode_token).transpose()?;
        let resolved = self.resolve(target)?;
        let mut page = Vec::new();
        let mut more = false;
        self.each_utxo(&resolved, after, |key, e| {
            if e.confirmations < min_conf {
                return Ok(true);
            }
            if page.len() == limit {
                more = true;
                return Ok(false);
            }
            page.push((key, e));
            Ok(true)
        })?;
        let next = match (more, page.last()) {
            (true, Some((key, _))) => Some(encode_token(key)),
            _ => None,
        };
        Ok((page.into_iter().map(|(_, e)| e).collect(), next))
    }

    /// Whether transaction `txid` is confirmed in this snapshot (it touched watched scripts
    /// in a block of the chain).
    pub fn has_transfer(&self, txid: &Txid) -> Result<bool, QueryError> {
        let mut found = false;
        self.snap
            .scan(Cf::Transfers, txid.as_byte_array(), None, |_, _| {
                found = true;
                Ok::<_, QueryError>(false)
            })?;
        Ok(found)
    }

    /// What transaction `txid` (display hex) did to watched scripts: one entry, or two for
    /// a BIP30 duplicate coinbase; empty if it touched none.
    pub fn transfer(&self, txid: &str) -> Result<Vec<TransferEntry>, QueryError> {
        let txid = Txid::from_str(txid).map_err(|_| QueryError::InvalidTxid(txid.to_string()))?;
        let names = self.wallet_names()?;
        let mut found = Vec::new();
        self.snap
            .scan(Cf::Transfers, txid.as_byte_array(), None, |k, v| {
                found.push(schema::decode_transfer(k, v)?);
                Ok::<_, QueryError>(true)
            })?;
        found
            .iter()
            .map(|t| self.transfer_entry(t, &names))
            .collect()
    }

    /// A transfer whose block left the chain and that is not confirmed again: as it was
    /// (height and block hash of the block that held it), with no confirmations.
    pub fn reorged_transfer(&self, txid: &str) -> Result<Option<TransferEntry>, QueryError> {
        let txid = Txid::from_str(txid).map_err(|_| QueryError::InvalidTxid(txid.to_string()))?;
        let Some(value) = self.snap.get(Cf::Reorged, txid.as_byte_array())? else {
            return Ok(None);
        };
        let t = schema::decode_reorged(txid.as_byte_array(), &value)?;
        let mut entry = self.transfer_entry(&t, &self.wallet_names()?)?;
        entry.confirmations = 0;
        Ok(Some(entry))
    }

    /// One page of `wallet`'s transfers with heights in `from..=to` (`to`: the tip when
    /// `None`), in chain order, and the token of the next page if there is one.
    pub fn list_transfers(
        &self,
        wallet: &str,
        from: u32,
        to: Option<u32>,
        limit: u32,
        page_token: Option<&str>,
    ) -> Result<(Vec<TransferEntry>, Option<String>), QueryError> {
        let to = to.unwrap_or(self.tip.map_or(0, |(h, _)| h));
        if from > to {
            return Err(QueryError::BadRange { from, to });
        }
        let limit = page_limit(limit);
        let id = self.wallet_id(wallet)?;
        let prefix = schema::wallet_key(id);
        let after = match page_token {
            None => None,
            Some(t) => {
                let key = Vec::<u8>::from_hex(t).map_err(|_| QueryError::BadPageToken)?;
                if key.len() != 40 || !key.starts_with(&prefix) {
                    return Err(QueryError::BadPageToken);
                }
                Some(key)
            }
        };
        let first = schema::history_key(id, from, &Txid::all_zeros());
        let seek = after.clone().unwrap_or_else(|| first.to_vec());
        let names = self.wallet_names()?;
        let mut page = Vec::new();
        let mut more = false;
        self.snap
            .scan(Cf::WalletHistory, &prefix, Some(&seek), |k, _| {
                if after.as_deref() == Some(k) {
                    return Ok(true);
                }
                let height = u32::from_be_bytes(k[4..8].try_into().expect("40-byte history key"));
                if height > to {
                    return Ok(false);
                }
                if page.len() == limit {
                    more = true;
                    return Ok(false);
                }
                let txid = Txid::from_byte_array(k[8..40].try_into().expect("40-byte history key"));
                let value = self
                    .snap
                    .get(Cf::Transfers, &schema::transfer_key(&txid, height))?
                    .ok_or(StoreError::Decode(schema::DecodeError::missing(
                        "transfer of a history entry",
                    )))?;
                let t = schema::decode_transfer(&schema::transfer_key(&txid, height), &value)?;
                page.push((k.to_vec(), self.transfer_entry(&t, &names)?));
                Ok::<_, QueryError>(true)
            })?;
        let next = match (more, page.last()) {
            (true, Some((key, _))) => Some(key.iter().map(|b| format!("{b:02x}")).collect()),
            _ => None,
        };
        Ok((page.into_iter().map(|(_, e)| e).collect(), next))
    }

    /// The event log's identity.
    pub fn log_id(&self) -> Result<String, QueryError> {
        Ok(self.snap.log_id()?)
    }

    /// The offset the event log writes next, as of this snapshot.
    pub fn next_offset(&self) -> Result<u64, QueryError> {
        Ok(self.snap.next_event()?)
    }

    /// Up to `max` events of the log from offset `from` on, with their offsets.
    pub fn events(&self, from: u64, max: usize) -> Result<Vec<(u64, Event)>, QueryError> {
        let next = self.snap.next_event()?;
        let mut first = next;
        self.snap.scan(Cf::Events, &[], None, |k, _| {
            first = schema::decode_offset(k)?;
            Ok::<_, QueryError>(false)
        })?;
        if from < first {
            return Err(QueryError::Pruned { asked: from, first });
        }
        if from > next {
            return Err(QueryError::FutureOffset { asked: from, next });
        }
        let mut out = Vec::new();
        self.snap
            .scan(Cf::Events, &[], Some(&schema::event_key(from)), |k, v| {
                out.push((schema::decode_offset(k)?, schema::decode_event(v)?));
                Ok::<_, QueryError>(out.len() < max)
            })?;
        Ok(out)
    }

    fn wallet_id(&self, name: &str) -> Result<WalletId, QueryError> {
        self.snap
            .wallet_id(name)?
            .ok_or_else(|| QueryError::UnknownWallet(name.to_string()))
    }

    /// Every wallet's name, by id.
    pub fn wallet_names(&self) -> Result<BTreeMap<WalletId, String>, QueryError> {
        let mut names = BTreeMap::new();
        self.snap.scan(Cf::Wallets, &[], None, |k, v| {
            names.insert(
                schema::decode_wallet(v)?,
                String::from_utf8_lossy(k).into_owned(),
            );
            Ok::<_, QueryError>(true)
        })?;
        Ok(names)
    }

    fn script_info(
        &self,
        id: &ScriptId,
        names: &BTreeMap<WalletId, String>,
    ) -> Result<ScriptInfo, QueryError> {
        let rec = self
            .snap
            .watch(id)?
            .ok_or(StoreError::Decode(schema::DecodeError::missing(
                "watch record of a transfer's script",
            )))?;
        Ok(ScriptInfo {
            address: Address::from_script(&rec.script, self.network).ok(),
            wallets: rec
                .wallets
                .iter()
                .filter_map(|w| names.get(w).cloned())
                .collect(),
            script: rec.script,
        })
    }

    /// The wallet or script `target` names, as the mempool tracker keys them.
    pub fn target_ids(
        &self,
        target: &Target,
    ) -> Result<(Option<WalletId>, Option<ScriptId>), QueryError> {
        Ok(match self.resolve(target)? {
            Resolved::Wallet(id) => (Some(id), None),
            Resolved::Script(script) => (None, Some(ScriptId::of(&script))),
        })
    }

    /// A mempool transaction in the shape of a transfer (height 0, no block).
    pub fn pending_transfer(
        &self,
        tx: &crate::mempool::PendingTx,
    ) -> Result<TransferEntry, QueryError> {
        let names = self.wallet_names()?;
        let t = Transfer {
            txid: tx.txid,
            height: 0,
            block_hash: BlockHash::all_zeros(),
            tx_index: 0,
            received: tx.received.iter().map(|(r, _)| r.clone()).collect(),
            spent: tx.spent.iter().map(|(s, _)| s.clone()).collect(),
        };
        let mut entry = self.transfer_entry(&t, &names)?;
        entry.confirmations = 0;
        Ok(entry)
    }

    fn transfer_entry(
        &self,
        t: &Transfer,
        names: &BTreeMap<WalletId, String>,
    ) -> Result<TransferEntry, QueryError> {
        let received = t
            .received
            .iter()
            .map(|r| {
                Ok(ReceivedEntry {
                    vout: r.vout,
                    value: r.value,
                    script: self.script_info(&r.script_id, names)?,
                })
            })
            .collect::<Result<_, QueryError>>()?;
        let spent = t
            .spent
            .iter()
            .map(|s| {
                Ok(SpentEntry {
                    input: s.input,
                    outpoint: s.outpoint,
                    value: s.value,
                    script: self.script_info(&s.script_id, names)?,
                })
            })
            .collect::<Result<_, QueryError>>()?;
        Ok(TransferEntry {
            txid: t.txid,
            height: t.height,
            block_hash: t.block_hash,
            confirmations: self.confirmations(t.height),
            received,
            spent,
        })
    }

    fn resolve(&self, target: &Target) -> Result<Resolved, QueryError> {
        match target {
            Target::Wallet(name) => self.wallet_id(name).map(Resolved::Wallet),
            Target::Address(a) => {
                let parsed = Address::from_str(a).map_err(|e| QueryError::InvalidAddress {
                    address: a.clone(),
                    detail: e.to_string(),
                })?;
                let checked =
                    parsed
                        .require_network(self.network)
                        .map_err(|_| QueryError::WrongNetwork {
                            address: a.clone(),
                            network: self.network,
                        })?;
                Ok(Resolved::Script(checked.script_pubkey()))
            }
            Target::ScriptHex(h) => ScriptBuf::from_hex(h)
                .map(Resolved::Script)
                .map_err(|e| QueryError::InvalidScript(e.to_string())),
        }
    }

    /// Visits the target's unspent outputs in (script id, outpoint) order, after the
    /// per-script UTXO key `after`; `f` returns `false` to stop. Lazy: a page of a wallet
    /// with a million scripts reads only as far as the page goes.
    fn each_utxo(
        &self,
        target: &Resolved,
        after: Option<[u8; 68]>,
        mut f: impl FnMut([u8; 68], UtxoEntry) -> Result<bool, QueryError>,
    ) -> Result<(), QueryError> {
        let from = after.map(|k| ScriptId(k[..32].try_into().expect("68-byte key")));
        match target {
            Resolved::Script(script) => {
                let id = ScriptId::of(script);
                if from.is_some_and(|f| f != id) {
                    return Err(QueryError::BadPageToken);
                }
                self.script_utxos(&id, Some(script.clone()), after, &mut f)?;
            }
            Resolved::Wallet(wallet) => {
                let prefix = schema::wallet_key(*wallet);
                let start = from.map(|s| schema::wallet_script_key(*wallet, &s));
                if let Some(key) = &start {
                    self.snap
                        .get(Cf::WalletScripts, key)?
                        .ok_or(QueryError::BadPageToken)?;
                }
                self.snap.scan(
                    Cf::WalletScripts,
                    &prefix,
                    start.as_ref().map(|k| &k[..]),
                    |k, _| {
                        let id = schema::decode_script_id(&k[4..])?;
                        // The token's own script goes on from after its outpoint.
                        let resume = after.filter(|_| Some(id) == from);
                        self.script_utxos(&id, None, resume, &mut f)
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Visits one script's unspent outputs after `resume`; `false` once `f` asked to stop.
    /// The script's bytes are read only if it has outputs to show.
    fn script_utxos(
        &self,
        id: &ScriptId,
        mut script: Option<ScriptBuf>,
        resume: Option<[u8; 68]>,
        f: &mut impl FnMut([u8; 68], UtxoEntry) -> Result<bool, QueryError>,
    ) -> Result<bool, QueryError> {
        let mut go_on = true;
        self.snap.scan(
            Cf::ScriptUtxo,
            &id.0,
            resume.as_ref().map(|k| &k[..]),
            |k, v| {
                let key: [u8; 68] = k.try_into().map_err(|_| QueryError::BadPageToken)?;
                if Some(key) == resume {
                    return Ok(true); // the last entry of the previous page
                }
                let script = match &script {
                    Some(s) => s.clone(),
                    None => {
                        let rec = self.snap.watch(id)?.ok_or(StoreError::Decode(
                            schema::DecodeError::missing("watch record of a utxo's script"),
                        ))?;
                        script.insert(rec.script).clone()
                    }
                };
                let (value, height, coinbase) = schema::decode_script_utxo(v)?;
                let entry = UtxoEntry {
                    outpoint: schema::decode_outpoint(&k[32..])?,
                    value,
                    address: Address::from_script(&script, self.network).ok(),
                    script,
                    height,
                    confirmations: self.confirmations(height),
                    coinbase,
                };
                go_on = f(key, entry)?;
                Ok::<_, QueryError>(go_on)
            },
        )?;
        Ok(go_on)
    }
}

/// The page size served for a requested `limit`.
fn page_limit(limit: u32) -> usize {
    let n = if limit == 0 {
        DEFAULT_PAGE
    } else {
        limit.min(MAX_PAGE)
    };
    n as usize
}

/// A page token for the key a page ended at (opaque to clients: hex of the key).
pub fn encode_token(key: &[u8; 68]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key a page token names; anything this server did not issue is refused.
pub fn decode_token(token: &str) -> Result<[u8; 68], QueryError> {
    let bytes = Vec::<u8>::from_hex(token).map_err(|_| QueryError::BadPageToken)?;
    bytes.try_into().map_err(|_| QueryError::BadPageToken)
}
