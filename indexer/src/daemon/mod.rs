//! bitcoind as a data source: typed calls over JSON-RPC ([`rpc`]), raw blocks over REST when
//! enabled, and the ZMQ notification feed ([`zmq`]).

pub mod rpc;
pub mod zmq;

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use bitcoin::hashes::Hash;
use bitcoin::hex::FromHex;
use bitcoin::{Amount, BlockHash, Network, Txid};
use serde::Deserialize;
use serde_json::{json, Value};

pub use rpc::{Auth, RpcClient};

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
    /// `http://host:port` of the REST interface (the RPC port), when `rest=1`.
    rest: Option<String>,
}

impl Daemon {
    /// A client of the node at `rpc_url`; `rest` fetches blocks over REST from the same port.
    pub fn new(rpc_url: &str, auth: Auth, rest: bool, timeout: Duration) -> Daemon {
        let rest = rest.then(|| rpc_url.trim_end_matches('/').to_owned());
        Daemon {
            rpc: RpcClient::new(rpc_url, auth, timeout),
            rest,
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

    /// The serialized block `hash`: REST when enabled, else RPC hex.
    pub fn block(&self, hash: &BlockHash) -> Result<Vec<u8>, DaemonError> {
        match &self.rest {
            Some(base) => self.rest_block(base, hash),
            None => {
                let hex: String = self.rpc.call("getblock", json!([hash, 0]))?;
                Vec::<u8>::from_hex(&hex).map_err(|e| DaemonError::Decode {
                    what: format!("getblock {hash} hex"),
                    detail: e.to_string(),
                })
            }
        }
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

    /// `getrawtransaction txid`: the serialized transaction, `None` when unknown.
    pub fn raw_transaction(&self, txid: &Txid) -> Result<Option<Vec<u8>>, DaemonError> {
        match self.rpc.call::<String>("getrawtransaction", json!([txid])) {
            Ok(hex) => Vec::<u8>::from_hex(&hex)
                .map(Some)
                .map_err(|e| DaemonError::Decode {
                    what: format!("getrawtransaction {txid}"),
                    detail: e.to_string(),
                }),
            Err(DaemonError::Rpc { code, .. }) if code == RPC_NOT_FOUND => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Serialized transactions for `txids` in one round trip (`None`: no longer known).
    pub fn raw_transactions(&self, txids: &[Txid]) -> Result<Vec<Option<Vec<u8>>>, DaemonError> {
        self.rpc
            .batch_each::<String>("getrawtransaction", txids.iter().map(|t| json!([t])))?
            .into_iter()
            .zip(txids)
            .map(|(r, txid)| match r {
                Ok(hex) => Vec::<u8>::from_hex(&hex)
                    .map(Some)
                    .map_err(|e| DaemonError::Decode {
                        what: format!("getrawtransaction {txid}"),
                        detail: e.to_string(),
                    }),
                Err(DaemonError::Rpc { code, .. }) if code == RPC_NOT_FOUND => Ok(None),
                Err(e) => Err(e),
            })
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
        Ok(v.get("feerate")
            .and_then(Value::as_f64)
            .and_then(|btc| Amount::from_btc(btc).ok()))
    }
}

/// Reads a 32-byte hash sent in display order (as RPC hex and ZMQ bodies show it).
pub fn hash_from_display<H: Hash<Bytes = [u8; 32]>>(bytes: &[u8]) -> Option<H> {
    let mut b: [u8; 32] = bytes.try_into().ok()?;
    b.reverse();
    Some(H::from_byte_array(b))
}
