//! A bitcoind client: typed calls over JSON-RPC ([`rpc`]) with cookie or password auth, and
//! raw blocks over REST when the node enables it (`getblock` otherwise). Both services use
//! it; neither needs the other's code for it. The ZMQ feed stays with the indexer, the only
//! one that follows blocks.

pub mod rpc;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use bitcoin::hashes::Hash;
use bitcoin::hex::FromHex;
use bitcoin::{Amount, BlockHash, Network, Txid};
use serde::Deserialize;
use serde_json::{json, Value};

pub use rpc::{Auth, RpcClient};

/// bitcoind's default RPC port for a network.
pub fn default_rpc_port(network: Network) -> u16 {
    match network {
        Network::Bitcoin => 8332,
        Network::Testnet => 18332,
        Network::Testnet4 => 48332,
        Network::Signet => 38332,
        _ => 18443,
    }
}

/// A failed exchange with bitcoind.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Nothing answers, or the connection broke.
    #[error("bitcoind at {url} is unreachable: {detail}")]
    Unreachable {
        /// Where we called.
        url: String,
        /// What the transport said.
        detail: String,
    },
    /// The cookie file cannot be read.
    #[error(
        "reading bitcoind's cookie file {path}: {source} (is bitcoind running with this datadir?)"
    )]
    Cookie {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// bitcoind refused the credentials.
    #[error("bitcoind at {url} refused the credentials ({auth}): check cookie_file or rpc_user/rpc_password")]
    Unauthorized {
        /// Where we called.
        url: String,
        /// Which credentials (secrets redacted).
        auth: String,
    },
    /// An HTTP error without a JSON-RPC body.
    #[error("bitcoind at {url} answered HTTP {status}: {body}")]
    Http {
        /// Where we called.
        url: String,
        /// HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// bitcoind answered with an RPC error.
    #[error("bitcoind {method}: error {code}: {message}")]
    Rpc {
        /// The method called.
        method: String,
        /// bitcoind's error code (-28 warming up, -5 not found, -8 invalid parameter...).
        code: i64,
        /// Its message.
        message: String,
    },
    /// A reply that does not have the expected shape.
    #[error("bitcoind sent an unreadable {what}: {detail}")]
    Decode {
        /// What was being read.
        what: String,
        /// Why it failed.
        detail: String,
    },
    /// bitcoind follows another network than the index.
    #[error("bitcoind is on chain {daemon:?} but the index is for {index}: point rpc_url at the right node or use another --db")]
    WrongNetwork {
        /// bitcoind's chain name.
        daemon: String,
        /// The index's network.
        index: Network,
    },
}

/// RPC error: still loading (retry later).
pub const RPC_IN_WARMUP: i64 = -28;
/// RPC error: block or transaction not found.
pub const RPC_NOT_FOUND: i64 = -5;
/// RPC error: transaction already in the chain.
pub const RPC_VERIFY_ALREADY_IN_CHAIN: i64 = -27;

impl DaemonError {
    /// Whether waiting and trying again may succeed (bitcoind down, restarting, warming up).
    pub fn is_transient(&self) -> bool {
        match self {
            DaemonError::Unreachable { .. }
            | DaemonError::Cookie { .. }
            | DaemonError::Http { .. }
            | DaemonError::Unauthorized { .. } => true,
            DaemonError::Rpc { code, .. } => *code == RPC_IN_WARMUP,
            DaemonError::Decode { .. } | DaemonError::WrongNetwork { .. } => false,
        }
    }
}

impl DaemonError {
    /// Whether a long-running reader of the node should keep trying: every answer may be
    /// different later (a restart, a reorg under our feet, another implementation's error
    /// codes), except a node on another network, which is a configuration to fix.
    pub fn worth_retrying(&self) -> bool {
        !matches!(self, DaemonError::WrongNetwork { .. })
    }
}

/// What the indexer needs from `getblockchaininfo`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChainInfo {
    /// Chain name: main, test, testnet4, signet, regtest.
    pub chain: String,
    /// Height of the best validated block.
    pub blocks: u32,
    /// Height of the best known header.
    pub headers: u32,
    /// Hash of the best block.
    pub bestblockhash: BlockHash,
    /// Whether bitcoind is still in initial block download.
    #[serde(default)]
    pub initialblockdownload: bool,
}

/// bitcoind's chain name for a network.
pub fn chain_name(network: Network) -> &'static str {
    match network {
        Network::Bitcoin => "main",
        Network::Testnet => "test",
        Network::Testnet4 => "testnet4",
        Network::Signet => "signet",
        _ => "regtest",
    }
}

/// A bitcoind node: RPC, and REST for raw blocks when enabled.
pub struct Daemon {
    rpc: RpcClient,
    /// The REST interface (on the RPC port), when configured.
    rest: Option<Rest>,
}

/// bitcoind's REST interface, as configured and as found.
struct Rest {
    /// `http://host:port`.
    base: String,
    /// Cleared for good once the node shows it does not serve REST.
    on: std::sync::atomic::AtomicBool,
}

/// Whether an HTTP answer under `/rest/` says the node serves no REST at all: bitcoind
/// without `-rest` (its default) has no handler there and answers 404 with an empty body,
/// while a REST 404 for an unknown block names it ("... not found"); a proxy in front may
/// answer 401 or 403.
fn rest_refused(status: u16, body: &str) -> bool {
    matches!(status, 401 | 403) || (status == 404 && !body.contains("not found"))
}

impl Daemon {
    /// A client of the node at `rpc_url`; `rest` fetches blocks over REST from the same port.
    pub fn new(rpc_url: &str, auth: Auth, rest: bool, timeout: Duration) -> Daemon {
        let rest = rest.then(|| Rest {
            base: rpc_url.trim_end_matches('/').to_owned(),
            on: std::sync::atomic::AtomicBool::new(true),
        });
        Daemon {
            rpc: RpcClient::new(rpc_url, auth, timeout),
            rest,
        }
    }

    /// Whether blocks are fetched over REST (configured, and the node serves it).
    pub fn rest_in_use(&self) -> bool {
        self.rest
            .as_ref()
            .is_some_and(|r| r.on.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Turns REST off for good, with one warning saying why and what to do.
    fn rest_off(&self, url: &str, status: u16) {
        if let Some(r) = &self.rest {
            if r.on.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(%url, status, "bitcoind does not serve REST (start it with -rest=1; its default is off): fetching blocks with getblock over RPC instead");
            }
        }
    }

    /// Checks at start that the node serves REST when configured to use it (see
    /// [`Daemon::rest_in_use`]); a node out of reach is left for later calls to find.
    pub fn probe_rest(&self) {
        let Some(r) = &self.rest else {
            return;
        };
        let url = format!("{}/rest/chaininfo.json", r.base);
        if let Err(ureq::Error::Status(status, response)) = self.rpc.agent().get(&url).call() {
            let body: String = response.into_string().unwrap_or_default();
            if rest_refused(status, &body) {
                self.rest_off(&url, status);
            }
        }
    }

    /// The RPC client, for calls without a typed wrapper.
    pub fn rpc(&self) -> &RpcClient {
        &self.rpc
    }

    /// `getblockchaininfo`, checked against the index's network.
    pub fn chain_info(&self, network: Network) -> Result<ChainInfo, DaemonError> {
        let info: ChainInfo = self.rpc.call("getblockchaininfo", json!([]))?;
        if info.chain != chain_name(network) {
            return Err(DaemonError::WrongNetwork {
                daemon: info.chain,
                index: network,
            });
        }
        Ok(info)
    }

    /// Waits at start until bitcoind answers `getblockchaininfo` on `network`. A node
    /// warming up is only slow and is waited for however long it takes; one that never
    /// answers within `wait` is a wrong URL, port, cookie path or password, and its last
    /// error is returned (as is a wrong network, at once) for the caller to name the fix.
    pub fn wait_ready(&self, network: Network, wait: Duration) -> Result<ChainInfo, DaemonError> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.chain_info(network) {
                Ok(info) => return Ok(info),
                Err(DaemonError::Rpc { code, message, .. }) if code == RPC_IN_WARMUP => {
                    tracing::info!(%message, "bitcoind is warming up; waiting");
                }
                Err(e) if e.is_transient() && std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "bitcoind is not answering yet; will keep trying");
                }
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `getbestblockhash`.
    pub fn best_block_hash(&self) -> Result<BlockHash, DaemonError> {
        self.rpc.call("getbestblockhash", json!([]))
    }

    /// Hashes of the active chain at `heights`, in one round trip.
    pub fn block_hashes(&self, heights: &[u32]) -> Result<Vec<BlockHash>, DaemonError> {
        self.rpc
            .batch("getblockhash", heights.iter().map(|h| json!([h])))
    }

    /// The serialized block `hash`: REST when in use, else RPC hex.
    pub fn block(&self, hash: &BlockHash) -> Result<Vec<u8>, DaemonError> {
        if let Some(rest) = self.rest.as_ref().filter(|_| self.rest_in_use()) {
            match self.rest_block(&rest.base, hash) {
                Err(DaemonError::Http {
                    url, status, body, ..
                }) if rest_refused(status, &body) => self.rest_off(&url, status),
                other => return other,
            }
        }
        let hex: String = self.rpc.call("getblock", json!([hash, 0]))?;
        Vec::<u8>::from_hex(&hex).map_err(|e| DaemonError::Decode {
            what: format!("getblock {hash} hex"),
            detail: e.to_string(),
        })
    }

    fn rest_block(&self, base: &str, hash: &BlockHash) -> Result<Vec<u8>, DaemonError> {
        let url = format!("{base}/rest/block/{hash}.bin");
        let response = match self.rpc.agent().get(&url).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                return Err(DaemonError::Http {
                    url,
                    status,
                    body: r
                        .into_string()
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect(),
                })
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(DaemonError::Unreachable {
                    url,
                    detail: t.to_string(),
                })
            }
        };
        let mut bytes = Vec::new();
        response
            .into_reader()
            .take(64 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| DaemonError::Unreachable {
                url,
                detail: format!("reading the block: {e}"),
            })?;
        Ok(bytes)
    }

    /// `getrawmempool`: txids in the mempool.
    pub fn raw_mempool(&self) -> Result<Vec<Txid>, DaemonError> {
        self.rpc.call("getrawmempool", json!([]))
    }

    /// `getrawtransaction txid` for a mempool transaction: the serialized transaction, or
    /// `None` when the node cannot give it. A mempool transaction can leave at any moment,
    /// and nodes say so with different codes (Core -5, others -1 or their own) or send
    /// something unreadable: any answer of the node other than the transaction is `None`,
    /// logged; only a node that does not answer at all is an error.
    pub fn mempool_transaction(&self, txid: &Txid) -> Result<Option<Vec<u8>>, DaemonError> {
        let answer = self
            .rpc
            .call::<String>("getrawtransaction", json!([txid]))
            .and_then(|hex| decode_tx_hex(txid, &hex));
        missing_is_none(txid, answer)
    }

    /// Serialized mempool transactions for `txids` in one round trip, each `None` when the
    /// node cannot give it (see [`Daemon::mempool_transaction`]).
    pub fn mempool_transactions(
        &self,
        txids: &[Txid],
    ) -> Result<Vec<Option<Vec<u8>>>, DaemonError> {
        self.rpc
            .batch_each::<String>("getrawtransaction", txids.iter().map(|t| json!([t])))?
            .into_iter()
            .zip(txids)
            .map(|(r, txid)| missing_is_none(txid, r.and_then(|hex| decode_tx_hex(txid, &hex))))
            .collect()
    }

    /// `sendrawtransaction`; a transaction already in the chain counts as sent.
    pub fn send_raw_transaction(&self, tx_hex: &str) -> Result<Txid, DaemonError> {
        match self.rpc.call::<Txid>("sendrawtransaction", json!([tx_hex])) {
            Err(DaemonError::Rpc { code, .. }) if code == RPC_VERIFY_ALREADY_IN_CHAIN => {
                let tx: bitcoin::Transaction = bitcoin::consensus::encode::deserialize_hex(tx_hex)
                    .map_err(|e| DaemonError::Decode {
                        what: "transaction hex".into(),
                        detail: e.to_string(),
                    })?;
                Ok(tx.compute_txid())
            }
            other => other,
        }
    }

    /// `estimatesmartfee target`: sat/kvB, `None` when bitcoind has no estimate yet.
    pub fn estimate_smart_fee(&self, target: u16) -> Result<Option<Amount>, DaemonError> {
        let v: Value = self.rpc.call("estimatesmartfee", json!([target]))?;
        Ok(fee_rate_of(&v))
    }
}

/// The fee rate (per kvB) of an `estimatesmartfee` result, `None` when it has none or an
/// impossible one: negative, not a number, or above 1 BTC/kvB (100,000 sat/vB, ten times
/// bitcoind's own `maxfeerate` for sending; found by fuzzing: an answer of 42 million BTC
/// per kvB was taken as an estimate).
pub fn fee_rate_of(result: &Value) -> Option<Amount> {
    result
        .get("feerate")
        .and_then(Value::as_f64)
        .and_then(|btc| Amount::from_btc(btc).ok())
        .filter(|rate| *rate <= Amount::ONE_BTC)
}

fn decode_tx_hex(txid: &Txid, hex: &str) -> Result<Vec<u8>, DaemonError> {
    Vec::<u8>::from_hex(hex).map_err(|e| DaemonError::Decode {
        what: format!("getrawtransaction {txid}"),
        detail: e.to_string(),
    })
}

/// A mempool transaction's answer: the node's refusal or an unreadable reply mean it is
/// gone (or unusable); a node out of reach stays an error.
fn missing_is_none(
    txid: &Txid,
    answer: Result<Vec<u8>, DaemonError>,
) -> Result<Option<Vec<u8>>, DaemonError> {
    match answer {
        Ok(bytes) => Ok(Some(bytes)),
        Err(DaemonError::Rpc { code, .. }) if code == RPC_NOT_FOUND => Ok(None),
        Err(e @ (DaemonError::Rpc { .. } | DaemonError::Decode { .. })) => {
            tracing::warn!(%txid, error = %e, "bitcoind did not give a mempool transaction; taken as gone");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Reads a 32-byte hash sent in display order (as RPC hex and ZMQ bodies show it).
pub fn hash_from_display<H: Hash<Bytes = [u8; 32]>>(bytes: &[u8]) -> Option<H> {
    let mut b: [u8; 32] = bytes.try_into().ok()?;
    b.reverse();
    Some(H::from_byte_array(b))
}
