//! A running node: chain state behind one lock, the HTTP server on its own runtime thread.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bitcoin::consensus::serialize;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, BlockHash, ScriptBuf, Transaction, Txid};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;

use crate::blkstore::BlockStore;
use crate::chain::{Chain, TipEvent};
use crate::config::{Config, RpcAuth, Topic};
use crate::cookie::{write_cookie, COOKIE_USER};
use crate::error::{io_err, Error, Result};
use crate::mempool::{Entry, Mempool};
use crate::miner::{build_block, Template};
use crate::validation::{check, Checked, Policy, Reject};
use crate::wallet::Wallet;
use crate::zmqpub::Publisher;

/// Reverses a hash's internal byte order into the order RPC shows (and ZMQ sends).
pub(crate) fn display_bytes(internal: [u8; 32]) -> [u8; 32] {
    let mut b = internal;
    b.reverse();
    b
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Everything the RPC methods read and change.
pub(crate) struct State {
    /// Block tree and UTXO set.
    pub chain: Chain,
    /// Unconfirmed transactions.
    pub mempool: Mempool,
    /// The node's keys.
    pub wallet: Wallet,
    store: BlockStore,
    /// ZMQ notifications.
    pub zmq: Publisher,
    /// What `estimatesmartfee` answers, per kvB.
    pub fee_estimate: Option<Amount>,
    /// Mempool packages below this (sat/vB) are not mined.
    pub mining_fee_rate: u64,
    /// Filler transactions per mined block.
    pub fillers: usize,
    /// Whether `/rest/` answers (see [`Config::rest`]).
    pub rest: bool,
    /// Calls that fail on purpose: method -> the error and how many more calls get it
    /// (another node implementation's error codes, a node in trouble).
    pub rpc_faults: std::collections::HashMap<String, RpcFault>,
    rng: StdRng,
}

/// An RPC method made to fail: the error its next calls answer.
#[derive(Clone, Debug, serde::Deserialize)]
pub(crate) struct RpcFault {
    /// The JSON-RPC error code.
    pub code: i32,
    /// Its message.
    pub message: String,
    /// How many calls still fail.
    pub count: u32,
}

impl State {
    fn open(config: &Config) -> Result<State> {
        let blocks_dir = config.network_dir().join("blocks");
        let (mut store, stored) =
            BlockStore::open(&blocks_dir, config.xor_blocks, config.max_blockfile_size)?;
        let mut chain = Chain::new();
        if stored.is_empty() {
            store.append(&chain.genesis().block)?;
        }
        for block in stored {
            let hash = block.block_hash();
            if let Err(reason) = chain.add_block(block) {
                return Err(Error::InvalidStoredBlock {
                    hash: hash.to_string(),
                    reason,
                });
            }
        }
        chain.activate_best();
        let wallet = Wallet::open(&config.network_dir().join("devnet_wallet.json"))?;
        let zmq = Publisher::start(config.zmq_bind.as_ref())?;
        Ok(State {
            chain,
            mempool: Mempool::new(),
            wallet,
            store,
            zmq,
            fee_estimate: None,
            mining_fee_rate: 0,
            fillers: config.filler_txs,
            rest: config.rest,
            rpc_faults: std::collections::HashMap::new(),
            rng: StdRng::from_entropy(),
        })
    }

    fn notify_tx(&self, tx: &Transaction) {
        self.zmq.publish(Topic::RawTx, serialize(tx));
        let txid = tx.compute_txid().to_byte_array();
        self.zmq
            .publish(Topic::HashTx, display_bytes(txid).to_vec());
    }

    fn notify_mempool(&mut self, txid: &Txid, label: u8) {
        let seq = self.mempool.next_sequence();
        let mut body = display_bytes(txid.to_byte_array()).to_vec();
        body.push(label);
        body.extend_from_slice(&seq.to_le_bytes());
        self.zmq.publish(Topic::Sequence, body);
    }

    fn notify_block(&self, hash: &BlockHash, label: u8) {
        let mut body = display_bytes(hash.to_byte_array()).to_vec();
        body.push(label);
        self.zmq.publish(Topic::Sequence, body);
    }

    /// Checks a transaction and, unless `test_only`, adds it (evicting what it replaces).
    pub(crate) fn accept(
        &mut self,
        tx: Transaction,
        policy: &Policy,
        test_only: bool,
    ) -> std::result::Result<Checked, Reject> {
        let checked = check(&self.chain, &self.mempool, &tx, policy)?;
        if test_only {
            return Ok(checked);
        }
        for txid in &checked.evict {
            if self.mempool.remove(txid).is_some() {
                self.notify_mempool(txid, b'R');
            }
        }
        let tx = Arc::new(tx);
        self.insert(tx.clone(), &checked, unix_now());
        self.notify_tx(&tx);
        self.notify_mempool(&checked.txid, b'A');
        Ok(checked)
    }

    fn insert(&mut self, tx: Arc<Transaction>, checked: &Checked, time: u64) {
        self.mempool.insert(Entry {
            tx,
            txid: checked.txid,
            fee: checked.fee,
            vsize: checked.vsize,
            weight: checked.weight,
            time,
            height: self.chain.height(),
            order: 0,
        });
    }

    /// Removes a transaction and its descendants as if evicted.
    pub(crate) fn evict(&mut self, txid: &Txid) -> bool {
        if !self.mempool.contains(txid) {
            return false;
        }
        let mut gone: Vec<Txid> = self.mempool.descendants(txid).into_iter().collect();
        gone.push(*txid);
        for t in gone {
            if self.mempool.remove(&t).is_some() {
                self.notify_mempool(&t, b'R');
            }
        }
        true
    }

    /// Mines `count` blocks paying `script`, one tip change each.
    pub(crate) fn mine(&mut self, count: u32, script: &ScriptBuf) -> Result<Vec<BlockHash>> {
        let mut hashes = Vec::new();
        for _ in 0..count {
            let template = Template {
                min_fee_rate: self.mining_fee_rate,
                fillers: self.fillers,
                coinbase_script: script,
            };
            let block = build_block(
                &self.chain,
                &self.mempool,
                &self.wallet,
                &template,
                &mut self.rng,
            );
            self.store.append(&block)?;
            let hash = block.block_hash();
            self.chain
                .add_block(block)
                .map_err(|reason| Error::InvalidStoredBlock {
                    hash: hash.to_string(),
                    reason,
                })?;
            let events = self.chain.activate_best();
            self.apply_tip_events(events);
            hashes.push(hash);
        }
        Ok(hashes)
    }

    /// Publishes a chain change and brings the mempool in line with the new chain.
    pub(crate) fn apply_tip_events(&mut self, events: Vec<TipEvent>) {
        if events.is_empty() {
            return;
        }
        let mut disconnected_blocks = Vec::new();
        let mut any_connected = false;
        for event in &events {
            match event {
                TipEvent::Disconnected(block, hash) => {
                    for tx in &block.txdata {
                        self.notify_tx(tx);
                    }
                    self.notify_block(hash, b'D');
                    disconnected_blocks.push(block.clone());
                }
                TipEvent::Connected(block, hash) => {
                    for tx in &block.txdata {
                        self.notify_tx(tx);
                    }
                    self.notify_block(hash, b'C');
                    any_connected = true;
                }
            }
        }
        // Like Core: the new tip only, and only when blocks were connected.
        if any_connected {
            let tip = self.chain.tip();
            self.zmq.publish(
                Topic::HashBlock,
                display_bytes(tip.hash.to_byte_array()).to_vec(),
            );
            self.zmq.publish(Topic::RawBlock, serialize(&*tip.block));
        }
        // Disconnected blocks come newest first; their transactions return oldest first.
        let resurrect: Vec<Transaction> = disconnected_blocks
            .iter()
            .rev()
            .flat_map(|b| b.txdata.iter().skip(1).cloned())
            .collect();
        self.resync_mempool(resurrect);
    }

    /// Re-checks the mempool against the new chain, plus transactions of disconnected blocks.
    fn resync_mempool(&mut self, resurrect: Vec<Transaction>) {
        let old: Vec<Entry> = self.mempool.sorted().into_iter().cloned().collect();
        for e in &old {
            self.mempool.remove(&e.txid);
        }
        let policy = Policy {
            bypass_fees: true,
            check_scripts: false,
            max_fee_rate: None,
        };
        let mut added = Vec::new();
        for tx in resurrect {
            if let Ok(checked) = check(&self.chain, &self.mempool, &tx, &policy) {
                let tx = Arc::new(tx);
                added.push(tx.clone());
                self.insert(tx, &checked, unix_now());
            }
        }
        let mut removed = Vec::new();
        for e in old {
            match check(&self.chain, &self.mempool, &e.tx, &policy) {
                Ok(checked) => self.insert(e.tx.clone(), &checked, e.time),
                Err(_) => removed.push(e.txid),
            }
        }
        for txid in removed {
            if self.chain.tx_location(&txid).is_some() {
                // Mined: leaves without an R, but Core still spends a sequence number.
                self.mempool.next_sequence();
            } else {
                self.notify_mempool(&txid, b'R');
            }
        }
        for tx in added {
            self.notify_tx(&tx);
            self.notify_mempool(&tx.compute_txid(), b'A');
        }
    }

    /// Total size of the block files.
    pub(crate) fn size_on_disk(&self) -> u64 {
        self.store.size_on_disk()
    }
}

/// What the HTTP handlers share.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// `Authorization` header value that is accepted.
    pub auth_header: String,
    /// When the node started.
    pub started: Instant,
    /// How long calls answer -28.
    pub warmup: Duration,
    /// Set to true to stop the node.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// ZMQ endpoints, readable without the lock.
    pub zmq_endpoints: Vec<(Topic, String)>,
}

impl Shared {
    /// The chain state; a panic while holding it does not make the node unusable.
    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the node still pretends to load its block index.
    pub(crate) fn warming_up(&self) -> bool {
        self.started.elapsed() < self.warmup
    }

    /// Asks the node to stop.
    pub(crate) fn request_stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Entry point: [`Node::start`].
pub struct Node;

/// A running node; stops on [`NodeHandle::shutdown`] or drop.
pub struct NodeHandle {
    shared: Arc<Shared>,
    rpc_addr: SocketAddr,
    datadir: PathBuf,
    cookie: Option<PathBuf>,
    stop_rx: tokio::sync::watch::Receiver<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    /// Loads the chain from the data directory and starts RPC/REST and ZMQ.
    pub fn start(config: Config) -> Result<NodeHandle> {
        let net_dir = config.network_dir();
        std::fs::create_dir_all(&net_dir).map_err(io_err(&net_dir))?;
        let state = State::open(&config)?;
        let zmq_endpoints = state.zmq.endpoints().to_vec();

        let (cookie, user, password) = match &config.rpc_auth {
            RpcAuth::Cookie => {
                let path = net_dir.join(".cookie");
                let password = write_cookie(&path)?;
                (Some(path), COOKIE_USER.to_string(), password)
            }
            RpcAuth::UserPass { user, password } => (None, user.clone(), password.clone()),
        };
        let auth_header = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );

        let listener =
            std::net::TcpListener::bind(config.rpc_bind).map_err(|source| Error::Rpc {
                addr: config.rpc_bind.to_string(),
                source,
            })?;
        let rpc_addr = listener.local_addr().map_err(|source| Error::Rpc {
            addr: config.rpc_bind.to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Rpc {
                addr: rpc_addr.to_string(),
                source,
            })?;

        let (shutdown, stop_rx) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            auth_header,
            started: Instant::now(),
            warmup: config.warmup,
            shutdown,
            zmq_endpoints,
        });

        let thread_shared = shared.clone();
        let thread_cookie = cookie.clone();
        let thread = std::thread::Builder::new()
            .name("devnet-rpc".into())
            .spawn(move || {
                crate::http::serve(listener, thread_shared.clone());
                // Clean shutdown: Core removes its cookie and flushes notifications.
                if let Some(path) = thread_cookie {
                    let _ = std::fs::remove_file(path);
                }
                thread_shared.state().zmq.stop();
            })
            .map_err(|e| Error::Thread(e.to_string()))?;

        let handle = NodeHandle {
            shared,
            rpc_addr,
            datadir: config.datadir.clone(),
            cookie,
            stop_rx,
            thread: Some(thread),
        };
        handle.write_endpoints_file(&net_dir)?;
        Ok(handle)
    }
}

impl NodeHandle {
    fn write_endpoints_file(&self, net_dir: &Path) -> Result<()> {
        let zmq: serde_json::Map<String, serde_json::Value> = self
            .shared
            .zmq_endpoints
            .iter()
            .map(|(t, e)| (t.name().to_string(), json!(e)))
            .collect();
        let info = json!({
            "rpc_url": self.rpc_url(),
            "rest_url": self.rest_url(),
            "zmq": zmq,
            "cookie_file": self.cookie_file(),
            "blocks_dir": self.blocks_dir(),
            "datadir": self.datadir,
            "pid": std::process::id(),
        });
        let path = net_dir.join("devnet.json");
        let text = serde_json::to_string_pretty(&info).unwrap_or_default();
        std::fs::write(&path, text).map_err(io_err(&path))
    }

    /// `http://127.0.0.1:PORT/` for JSON-RPC.
    pub fn rpc_url(&self) -> String {
        format!("http://{}/", self.rpc_addr)
    }

    /// `http://127.0.0.1:PORT` (same port as RPC); REST paths start with `/rest/`.
    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rpc_addr)
    }

    /// The RPC/REST socket address.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.rpc_addr
    }

    /// The endpoint publishing a topic, e.g. `tcp://127.0.0.1:41234`.
    pub fn zmq_endpoint(&self, topic: Topic) -> Option<String> {
        self.shared
            .zmq_endpoints
            .iter()
            .find(|(t, _)| *t == topic)
            .map(|(_, e)| e.clone())
    }

    /// The cookie file, when cookie auth is used.
    pub fn cookie_file(&self) -> Option<PathBuf> {
        self.cookie.clone()
    }

    /// `<datadir>/regtest/blocks`.
    pub fn blocks_dir(&self) -> PathBuf {
        self.datadir.join("regtest").join("blocks")
    }

    /// The data directory.
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// A watch that turns true when the node was asked to stop (RPC `stop` or shutdown).
    pub fn stop_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop_rx.clone()
    }

    /// Stops the server, removes the cookie and closes the ZMQ sockets.
    pub fn shutdown(&mut self) {
        self.shared.request_stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
