//! Live following against the devnet (the project's bitcoind-compatible node): a node in a
//! temp dir with a JSON-RPC client, `indexer run` on it in-process ([`Indexer`], wired by
//! `indexer::app::run` as the binary is), a bare follower for the follower's own tests, and
//! the fresh index of the node's own block files that a follower must equal.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitcoin::hashes::sha256;
use bitcoin::{Address, BlockHash, Network};
use bitcoind::{Auth, Daemon, DaemonError, RpcClient};
use devnet::{Node, NodeHandle, Topic as NodeTopic};
use indexer::add_watch::WatchChanges;
use indexer::app::{self, AppError, Mode, Observer};
use indexer::config::{BitcoindSettings, Settings};
use indexer::follow::{FollowError, FollowOptions, Follower};
use indexer::mempool::SharedMempool;
use indexer::store::{Reader, Store};
use indexer::wallets;
use indexer::zmq_feed::{Topic, ZmqEndpoints};
use serde_json::{json, Value};

use crate::harness::{open_with_wallets, rescan, TestWallet};

/// A devnet node in its own temp dir.
pub struct Devnet {
    /// The running node.
    pub node: NodeHandle,
    /// A client with the node's cookie.
    pub rpc: RpcClient,
    /// Its data dir (removed on drop).
    pub dir: tempfile::TempDir,
}

impl Devnet {
    /// Starts a node; `f` adjusts its config (fillers, XOR, ZMQ...).
    pub fn start(f: impl FnOnce(&mut devnet::Config)) -> Devnet {
        let dir = tempfile::tempdir().unwrap();
        let mut config = devnet::Config::new(dir.path());
        f(&mut config);
        let node = Node::start(config).unwrap();
        let rpc = RpcClient::new(
            &node.rpc_url(),
            Auth::Cookie(node.cookie_file().unwrap()),
            Duration::from_secs(120),
        );
        Devnet { node, rpc, dir }
    }

    /// Calls `method`, panicking on an error.
    pub fn call(&self, method: &str, params: Value) -> Value {
        self.rpc
            .call(method, params)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    /// Calls `method`.
    pub fn try_call(&self, method: &str, params: Value) -> Result<Value, DaemonError> {
        self.rpc.call(method, params)
    }

    /// A fresh address of the node's wallet (`bech32`, `bech32m`, `legacy`, `p2sh-segwit`).
    pub fn new_address(&self, kind: &str) -> String {
        self.call("getnewaddress", json!(["", kind]))
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Mines `n` blocks paying `address`.
    pub fn mine_to(&self, n: u32, address: &str) -> Vec<BlockHash> {
        let hashes = self.call("generatetoaddress", json!([n, address]));
        hashes
            .as_array()
            .unwrap()
            .iter()
            .map(|h| BlockHash::from_str(h.as_str().unwrap()).unwrap())
            .collect()
    }

    /// The node's tip.
    pub fn best(&self) -> (u32, BlockHash) {
        let info = self.call("getblockchaininfo", json!([]));
        (
            info["blocks"].as_u64().unwrap() as u32,
            BlockHash::from_str(info["bestblockhash"].as_str().unwrap()).unwrap(),
        )
    }

    /// Hash of the active chain's block at `height`.
    pub fn hash_at(&self, height: u32) -> BlockHash {
        BlockHash::from_str(self.call("getblockhash", json!([height])).as_str().unwrap()).unwrap()
    }

    /// The node's `blocks` directory.
    pub fn blocks_dir(&self) -> PathBuf {
        self.node.blocks_dir()
    }

    /// Every ZMQ topic the follower uses, where the node publishes it.
    pub fn zmq(&self) -> ZmqEndpoints {
        let mut e = ZmqEndpoints::default();
        for (ours, theirs) in [
            (Topic::RawBlock, NodeTopic::RawBlock),
            (Topic::HashBlock, NodeTopic::HashBlock),
            (Topic::Sequence, NodeTopic::Sequence),
            (Topic::RawTx, NodeTopic::RawTx),
        ] {
            if let Some(endpoint) = self.node.zmq_endpoint(theirs) {
                e.topics.push((ours, endpoint));
            }
        }
        e
    }

    /// A client of the node for a follower (REST for blocks when `rest`).
    pub fn daemon(&self, rest: bool) -> Daemon {
        Daemon::new(
            &self.node.rpc_url(),
            Auth::Cookie(self.node.cookie_file().unwrap()),
            rest,
            Duration::from_secs(120),
        )
    }
}

/// An indexer following a node in a thread, as `indexer run` does.
pub struct Following {
    /// Its database.
    pub store: Arc<Store>,
    /// Its mempool tracker.
    pub mempool: SharedMempool,
    /// Where a gRPC server sends `AddWatch` for this follower to apply.
    pub watch: WatchChanges,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), FollowError>>>,
}

impl Following {
    /// Starts following `daemon` into a new database at `db` watching `wallets`; with
    /// `zmq`, live from those endpoints, else by polling.
    pub fn start(
        daemon: Daemon,
        zmq: Option<&ZmqEndpoints>,
        db: &Path,
        wallets: &[TestWallet],
        opts: FollowOptions,
    ) -> Following {
        let store = Arc::new(open_with_wallets(db, Network::Regtest, wallets));
        Self::resume(daemon, zmq, store, opts)
    }

    /// Follows `node` over REST and every ZMQ topic into a new database at `db`, with
    /// default options, and waits until it has the node's tip.
    pub fn caught_up(node: &Devnet, db: &Path, wallets: &[TestWallet]) -> Following {
        let f = Self::start(
            node.daemon(true),
            Some(&node.zmq()),
            db,
            wallets,
            FollowOptions::default(),
        );
        assert!(
            f.wait_for(node.best().1, Duration::from_secs(60)),
            "the follower did not catch up"
        );
        f
    }

    /// Starts following into an existing database.
    pub fn resume(
        daemon: Daemon,
        zmq: Option<&ZmqEndpoints>,
        store: Arc<Store>,
        opts: FollowOptions,
    ) -> Following {
        let scripts = wallets::load_filter(&store, 100_000, 1e-4).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let notices =
            zmq.map(|endpoints| indexer::zmq_feed::spawn(endpoints, stop.clone()).unwrap());
        let follower = Follower::new(
            store.clone(),
            Arc::new(daemon),
            Arc::new(scripts),
            Network::Regtest,
            opts,
            stop.clone(),
            notices,
        );
        let (watch, requests, backfills) = indexer::add_watch::channel(20);
        let follower = follower.with_watch_requests(requests, backfills);
        let mempool = follower.mempool();
        let thread = std::thread::Builder::new()
            .name("follower".into())
            .spawn(move || follower.run())
            .unwrap();
        Following {
            store,
            mempool,
            watch,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until the index's tip is `hash`; false on timeout.
    pub fn wait_for(&self, hash: BlockHash, timeout: Duration) -> bool {
        tip_reaches(&self.store, hash, timeout, self.thread.as_ref())
    }

    /// Stops the follower and returns how it ended.
    pub fn stop(mut self) -> Result<(), FollowError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until `store`'s tip is `hash`; false on timeout or once `thread` (what writes
/// the store) has ended.
fn tip_reaches<T>(
    store: &Store,
    hash: BlockHash,
    timeout: Duration,
    thread: Option<&JoinHandle<T>>,
) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if store.tip().unwrap().is_some_and(|(_, h)| h == hash) {
            return true;
        }
        if thread.is_some_and(|t| t.is_finished()) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The state digest of a fresh index of `blocks_dir` (bitcoind's files) for `wallets`.
pub fn fresh_digest(blocks_dir: &Path, wallets: &[TestWallet]) -> sha256::Hash {
    let db = tempfile::tempdir().unwrap();
    let store = open_with_wallets(db.path(), Network::Regtest, wallets);
    rescan(&store, Network::Regtest, blocks_dir, None, None, None).unwrap();
    store.digest().unwrap()
}

/// A P2WPKH key the test holds, to build and sign its own transactions (RBF scenarios).
pub struct TestKey {
    secret: bitcoin::secp256k1::SecretKey,
}

impl Default for TestKey {
    fn default() -> Self {
        Self::new()
    }
}

impl TestKey {
    /// A random key.
    pub fn new() -> TestKey {
        TestKey {
            secret: bitcoin::secp256k1::SecretKey::new(&mut rand::thread_rng()),
        }
    }

    fn public(&self) -> bitcoin::CompressedPublicKey {
        let secp = bitcoin::secp256k1::Secp256k1::signing_only();
        bitcoin::CompressedPublicKey(self.secret.public_key(&secp))
    }

    /// Its regtest address.
    pub fn address(&self) -> Address {
        Address::p2wpkh(&self.public(), bitcoin::KnownHrp::Regtest)
    }

    /// A transaction spending `coin` (worth `value`) to `to`, paying `fee`, signalling RBF.
    pub fn spend(
        &self,
        coin: bitcoin::OutPoint,
        value: bitcoin::Amount,
        to: &bitcoin::Script,
        fee: bitcoin::Amount,
    ) -> bitcoin::Transaction {
        use bitcoin::hashes::Hash;
        let mut tx = bitcoin::Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn {
                previous_output: coin,
                sequence: bitcoin::Sequence::ENABLE_RBF_NO_LOCKTIME,
                ..Default::default()
            }],
            output: vec![bitcoin::TxOut {
                value: value - fee,
                script_pubkey: to.to_owned(),
            }],
        };
        let secp = bitcoin::secp256k1::Secp256k1::signing_only();
        let own = self.address().script_pubkey();
        let sighash = bitcoin::sighash::SighashCache::new(&tx)
            .p2wpkh_signature_hash(0, &own, value, bitcoin::EcdsaSighashType::All)
            .unwrap();
        let msg = bitcoin::secp256k1::Message::from_digest(sighash.to_byte_array());
        let signature = bitcoin::ecdsa::Signature::sighash_all(secp.sign_ecdsa(&msg, &self.secret));
        tx.input[0].witness = bitcoin::Witness::p2wpkh(&signature, &self.public().0);
        tx
    }
}

/// Pays `key` `btc` from the node's wallet and mines it; returns the coin and its value.
pub fn fund(node: &Devnet, key: &TestKey, btc: f64) -> (bitcoin::OutPoint, bitcoin::Amount) {
    let txid = node.call("sendtoaddress", json!([key.address().to_string(), btc]));
    let txid = bitcoin::Txid::from_str(txid.as_str().unwrap()).unwrap();
    node.mine_to(1, &node.new_address("bech32"));
    let hex = node.call("getrawtransaction", json!([txid.to_string()]));
    let tx: bitcoin::Transaction =
        bitcoin::consensus::encode::deserialize_hex(hex.as_str().unwrap()).unwrap();
    let own = key.address().script_pubkey();
    let vout = tx
        .output
        .iter()
        .position(|o| o.script_pubkey == own)
        .unwrap();
    (
        bitcoin::OutPoint::new(txid, vout as u32),
        tx.output[vout].value,
    )
}

/// A gRPC server over a bare [`Following`]'s database and mempool on 127.0.0.1, with its
/// runtime and a channel to it, for tests that stage that state by hand (others run the
/// whole service: [`Indexer`]); the server stops when this is dropped.
pub struct Served {
    /// The runtime the server and the test's calls run on.
    pub runtime: tokio::runtime::Runtime,
    /// A connection to the server.
    pub channel: tonic::transport::Channel,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Served {
    /// Serves `f`'s database and mempool with `access` on an ephemeral port.
    pub fn start(f: &Following, access: indexer::grpc::Access) -> Served {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        runtime.spawn(indexer::grpc::serve(
            f.store.clone(),
            listener,
            indexer::grpc::ServeOptions {
                mempool: Some(f.mempool.clone()),
                access,
                ..indexer::grpc::ServeOptions::new(Network::Regtest)
            },
            async {
                let _ = stopped.await;
            },
        ));
        let channel = runtime
            .block_on(
                tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect(),
            )
            .unwrap();
        Served {
            runtime,
            channel,
            addr,
            _stop: stop,
        }
    }
}

/// `indexer run` in this process, wired by [`indexer::app::run`] as the binary wires it:
/// following a devnet over REST and every ZMQ topic, serving gRPC on an ephemeral loopback
/// port, with a runtime and a channel for the test's calls. Stops when dropped.
pub struct Indexer {
    /// Its database (read it to see what was committed).
    pub store: Arc<Store>,
    /// The runtime the test's calls run on.
    pub runtime: tokio::runtime::Runtime,
    /// A connection to its gRPC server.
    pub channel: tonic::transport::Channel,
    /// Where it serves gRPC.
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), AppError>>>,
}

/// An observer that sees nothing: the tests read the database and gRPC instead.
struct Unobserved;

impl Observer for Unobserved {
    fn listening(&self, _: std::net::SocketAddr, _: Option<std::net::SocketAddr>) {}
    fn catching_up(&self, _: u32, _: u32) {}
    fn committed(&self, _: &indexer::pipeline::Progress) {}
}

impl Indexer {
    /// The settings that follow `node` (REST, every ZMQ topic) into `db` on regtest; a
    /// test changes what it needs on top.
    pub fn settings(node: &Devnet, db: &Path) -> Settings {
        let zmq = |topic: NodeTopic| node.node.zmq_endpoint(topic);
        Settings {
            db: Some(db.to_owned()),
            network: Some("regtest".into()),
            bitcoind: BitcoindSettings {
                rpc_url: Some(node.node.rpc_url()),
                cookie_file: node.node.cookie_file(),
                rest: Some(true),
                zmq_rawblock: zmq(NodeTopic::RawBlock),
                zmq_hashblock: zmq(NodeTopic::HashBlock),
                zmq_sequence: zmq(NodeTopic::Sequence),
                zmq_rawtx: zmq(NodeTopic::RawTx),
                ..BitcoindSettings::default()
            },
            ..Settings::default()
        }
    }

    /// Runs with `settings` on a new database at their `db` watching `wallets`.
    pub fn start(settings: Settings, wallets: &[TestWallet]) -> Indexer {
        let config = Settings::load(None, &settings).unwrap();
        let store = Arc::new(open_with_wallets(&config.db, config.network, wallets));
        Self::resume(settings, store)
    }

    /// Runs with `settings` on their database, open already as `store`.
    pub fn resume(settings: Settings, store: Arc<Store>) -> Indexer {
        let config = Settings::load(None, &settings).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = {
            let store = store.clone();
            std::thread::Builder::new()
                .name("indexer-run".into())
                .spawn(move || {
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    app::run(
                        store,
                        &config,
                        listener,
                        Mode::Run,
                        Arc::new(Unobserved),
                        shutdown,
                    )
                })
                .unwrap()
        };
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // The listener is bound already: connecting waits for nothing but the handshake.
        let channel = match runtime.block_on(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect(),
        ) {
            Ok(channel) => channel,
            Err(e) => {
                // The service ended at start: its error says why.
                let _ = shutdown.send(());
                let ended = thread.join().unwrap();
                panic!("connecting to the indexer: {e}; the service ended with {ended:?}");
            }
        };
        Indexer {
            store,
            runtime,
            channel,
            addr,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// Follows `node` into a new database at `db` watching `wallets`, and waits until it
    /// has the node's tip.
    pub fn caught_up(node: &Devnet, db: &Path, wallets: &[TestWallet]) -> Indexer {
        let i = Self::start(Self::settings(node, db), wallets);
        assert!(
            i.wait_for(node.best().1, Duration::from_secs(60)),
            "the indexer did not catch up"
        );
        i
    }

    /// Waits until the index's tip is `hash`; false on timeout or when the service ended.
    pub fn wait_for(&self, hash: BlockHash, timeout: Duration) -> bool {
        tip_reaches(&self.store, hash, timeout, self.thread.as_ref())
    }

    /// Shuts the service down as SIGTERM does and returns how it ended.
    pub fn stop(mut self) -> Result<(), AppError> {
        let _ = self.shutdown.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Indexer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Indexer {
    /// What every indexed transaction spending `wallet`'s coins paid, by script (read from
    /// the index and the node); asserts that no coin was spent twice. The caller makes sure
    /// the index has caught up.
    pub fn payments(
        &self,
        node: &Devnet,
        wallet: &str,
    ) -> std::collections::HashMap<bitcoin::ScriptBuf, Vec<u64>> {
        use proto::indexer::v1 as ipb;
        let mut indexer = ipb::indexer_client::IndexerClient::new(self.channel.clone());
        let transfers = self
            .runtime
            .block_on(indexer.list_transfers(ipb::ListTransfersRequest {
                wallet: wallet.into(),
                limit: 1000,
                ..Default::default()
            }))
            .unwrap()
            .into_inner()
            .transfers;
        let mut paid: std::collections::HashMap<bitcoin::ScriptBuf, Vec<u64>> =
            std::collections::HashMap::new();
        let mut coins = std::collections::HashSet::new();
        for t in transfers.iter().filter(|t| !t.spent.is_empty()) {
            let raw = node.call("getrawtransaction", json!([t.txid]));
            let tx: bitcoin::Transaction =
                bitcoin::consensus::encode::deserialize_hex(raw.as_str().unwrap()).unwrap();
            for input in &tx.input {
                assert!(coins.insert(input.previous_output), "a coin spent twice");
            }
            for o in &tx.output {
                paid.entry(o.script_pubkey.clone())
                    .or_default()
                    .push(o.value.to_sat());
            }
        }
        paid
    }
}

/// A wallet whose key the test holds, as the orchestrator's signer would: a regtest P2WPKH
/// key written as a WIF key file only its owner may read, funded by the node.
pub struct KeyedWallet {
    /// The key file (mode 600).
    pub key_file: PathBuf,
    /// The key's P2WPKH address.
    pub address: Address,
    /// A wallet `hot` of that address, to watch.
    pub wallets: Vec<TestWallet>,
}

impl KeyedWallet {
    /// The key from `seed` in `dir`, paid `coins` outputs of `btc` by `node` and confirmed
    /// by a block mined to `miner`.
    pub fn funded(
        node: &Devnet,
        miner: &str,
        dir: &Path,
        seed: u8,
        coins: usize,
        btc: f64,
    ) -> KeyedWallet {
        use std::os::unix::fs::PermissionsExt;
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let key = bitcoin::PrivateKey::new(
            bitcoin::secp256k1::SecretKey::from_slice(&[seed; 32]).unwrap(),
            bitcoin::NetworkKind::Test,
        );
        let key_file = dir.join("hot.keys");
        std::fs::write(&key_file, key.to_wif()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let address = Address::p2wpkh(
            &bitcoin::CompressedPublicKey(key.public_key(&secp).inner),
            Network::Regtest,
        );
        for _ in 0..coins {
            node.call("sendtoaddress", json!([address.to_string(), btc]));
        }
        node.mine_to(1, miner);
        let wallets = vec![TestWallet {
            name: "hot".into(),
            scripts: std::collections::BTreeSet::from([address.script_pubkey()]),
        }];
        KeyedWallet {
            key_file,
            address,
            wallets,
        }
    }
}
