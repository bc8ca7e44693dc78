//! What a node is told at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A ZMQ notification topic, as bitcoind names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `rawblock`: the serialized new tip.
    RawBlock,
    /// `hashblock`: the new tip's hash in display order.
    HashBlock,
    /// `rawtx`: every transaction entering the mempool or a connected block.
    RawTx,
    /// `hashtx`: the txid of each `rawtx`, in display order.
    HashTx,
    /// `sequence`: block connects/disconnects and mempool adds/removals.
    Sequence,
}

impl Topic {
    /// Every topic, in a fixed order.
    pub const ALL: [Topic; 5] = [
        Topic::RawBlock,
        Topic::HashBlock,
        Topic::RawTx,
        Topic::HashTx,
        Topic::Sequence,
    ];

    /// The topic frame bitcoind sends.
    pub fn name(self) -> &'static str {
        match self {
            Topic::RawBlock => "rawblock",
            Topic::HashBlock => "hashblock",
            Topic::RawTx => "rawtx",
            Topic::HashTx => "hashtx",
            Topic::Sequence => "sequence",
        }
    }

    /// The topic with this frame name.
    pub fn from_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Where the ZMQ publishers bind. `tcp://127.0.0.1:0` picks a free port.
#[derive(Debug, Clone)]
pub enum ZmqBind {
    /// One PUB socket for every topic, like `-zmqpub*=` all given the same address.
    All(String),
    /// One address per topic; topics left out are not published. Topics sharing an
    /// address share a socket.
    PerTopic(Vec<(Topic, String)>),
}

/// How RPC clients authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcAuth {
    /// `<datadir>/regtest/.cookie`, a fresh secret at every start.
    Cookie,
    /// Fixed `rpcuser`/`rpcpassword`.
    UserPass {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory; state lives in `<datadir>/regtest/` like Core's.
    pub datadir: PathBuf,
    /// RPC and REST listen address; port 0 picks a free port.
    pub rpc_bind: SocketAddr,
    /// ZMQ publishers, or none.
    pub zmq_bind: Option<ZmqBind>,
    /// Obfuscate new block files with a random `xor.dat` key (Core 28's default).
    pub xor_blocks: bool,
    /// RPC credentials.
    pub rpc_auth: RpcAuth,
    /// How long every RPC call answers -28 after start, like a node loading its index.
    pub warmup: Duration,
    /// Filler transactions the node adds to every block it mines (when its wallet has coins).
    pub filler_txs: usize,
    /// A new `blkNNNNN.dat` is started once a file grows past this many bytes.
    pub max_blockfile_size: u64,
    /// Serve REST (Core's `-rest=1`); without it `/rest/` answers 404, as Core's default
    /// `-rest=0` does.
    pub rest: bool,
}

impl Config {
    /// Defaults: loopback with ephemeral ports for RPC and one ZMQ socket, cookie auth,
    /// plain block files, no warmup, 20 filler transactions a block, REST on.
    pub fn new(datadir: impl Into<PathBuf>) -> Config {
        Config {
            datadir: datadir.into(),
            rpc_bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            zmq_bind: Some(ZmqBind::All("tcp://127.0.0.1:0".to_string())),
            xor_blocks: false,
            rpc_auth: RpcAuth::Cookie,
            warmup: Duration::ZERO,
            filler_txs: 20,
            max_blockfile_size: 16 * 1024 * 1024,
            rest: true,
        }
    }

    /// `<datadir>/regtest`, where Core keeps a regtest node's files.
    pub fn network_dir(&self) -> PathBuf {
        self.datadir.join("regtest")
    }
}
