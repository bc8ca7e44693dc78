//! `orchestrator run --config FILE`: the TOML settings, every one also a flag or an
//! `ORCHESTRATOR_<NAME>` environment variable (see `orchestrator run --help`), declared once
//! in [`Settings`] and layered: flags over variables over the file over defaults. Secrets (the
//! bearer token, the signer's keys, bitcoind's cookie) come from files only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bitcoin::{Address, Network, ScriptBuf};
use serde::{Deserialize, Serialize};

use crate::balancing::{Balancing, Consolidation, HighWater, LowWater};
use crate::descriptor_wallet::DescriptorWallet;
use crate::executor::{Batching, Policy, PriorityBlocks};

/// Scripts of a ranged descriptor the wallet spans unless set.
const DEFAULT_DESCRIPTOR_RANGE: u32 = 1000;
/// Most withdrawals in one batch unless set.
const DEFAULT_MAX_BATCH_OUTPUTS: usize = 50;
/// Above this many outputs the batch's output count no longer fits in one byte, and one
/// stuck transaction would hold up too many payouts.
const MAX_BATCH_OUTPUTS: usize = 250;
use crate::kafka_events::KafkaEvents;

/// Every setting, declared once: a key of the config file, a `--flag` and an
/// `ORCHESTRATOR_*` variable. Unset ones are `None` and do not serialize, so each layer
/// (defaults < file < variable < flag) only overrides what it gives.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// mainnet, testnet3, testnet4, signet or regtest.
    #[arg(long, env = "ORCHESTRATOR_NETWORK")]
    pub network: Option<String>,
    /// gRPC listen address (default 127.0.0.1:50061).
    #[arg(long, env = "ORCHESTRATOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The indexer's gRPC endpoint, e.g. `http://127.0.0.1:50051` (https: TLS).
    #[arg(long, env = "ORCHESTRATOR_INDEXER")]
    pub indexer: Option<String>,
    /// The file holding the token the indexer asks for (when its reads are protected).
    #[arg(long, env = "ORCHESTRATOR_INDEXER_TOKEN_FILE")]
    pub indexer_token_file: Option<PathBuf>,
    /// PEM CA the indexer's TLS certificate must chain to (with an https endpoint).
    #[arg(long, env = "ORCHESTRATOR_INDEXER_CA_FILE")]
    pub indexer_ca_file: Option<PathBuf>,
    /// bitcoind's JSON-RPC URL.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_URL")]
    pub bitcoind_rpc_url: Option<String>,
    /// bitcoind's cookie file.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_COOKIE_FILE")]
    pub bitcoind_cookie_file: Option<PathBuf>,
    /// bitcoind's `rpcuser`, instead of the cookie; the password comes from
    /// `bitcoind_rpc_password_file` or `ORCHESTRATOR_BITCOIND_RPC_PASSWORD`.
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_USER")]
    pub bitcoind_rpc_user: Option<String>,
    /// File holding bitcoind's RPC password (mode 600).
    #[arg(long, env = "ORCHESTRATOR_BITCOIND_RPC_PASSWORD_FILE")]
    pub bitcoind_rpc_password_file: Option<PathBuf>,
    /// At start, seconds bitcoind and the indexer may stay unreachable before the
    /// process exits with what to check (default 60).
    #[arg(long, env = "ORCHESTRATOR_STARTUP_WAIT_SECS")]
    pub startup_wait_secs: Option<u64>,
    /// The saga database directory.
    #[arg(long, env = "ORCHESTRATOR_DB")]
    pub db: Option<PathBuf>,
    /// The signer's key file (WIF keys, mode 600).
    #[arg(long, env = "ORCHESTRATOR_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The file holding the bearer token every call must present.
    #[arg(long, env = "ORCHESTRATOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Where change goes (an address of the wallet the keys sign for).
    #[arg(long, env = "ORCHESTRATOR_CHANGE_ADDRESS")]
    pub change_address: Option<String>,
    /// Confirmations that complete a withdrawal (default 3).
    #[arg(long, env = "ORCHESTRATOR_CONFIRMATIONS")]
    pub confirmations: Option<u32>,
    /// Confirmations after which its coins are released (default 6).
    #[arg(long, env = "ORCHESTRATOR_SETTLE_CONFIRMATIONS")]
    pub settle_confirmations: Option<u32>,
    /// Blocks a payment may stay unmined before it is replaced (default 3).
    #[arg(long, env = "ORCHESTRATOR_BUMP_AFTER_BLOCKS")]
    pub bump_after_blocks: Option<u32>,
    /// Fee rate floor and ceiling, sat/vB (defaults 1 and 500).
    #[arg(long, env = "ORCHESTRATOR_FEE_FLOOR")]
    pub fee_floor: Option<f64>,
    /// See `fee_floor`.
    #[arg(long, env = "ORCHESTRATOR_FEE_CEILING")]
    pub fee_ceiling: Option<f64>,
    /// The confirmation target, in blocks, of a withdrawal of low priority (default 144).
    #[arg(long, env = "ORCHESTRATOR_PRIORITY_LOW_BLOCKS")]
    pub priority_low_blocks: Option<u16>,
    /// Of normal priority (default 6).
    #[arg(long, env = "ORCHESTRATOR_PRIORITY_NORMAL_BLOCKS")]
    pub priority_normal_blocks: Option<u16>,
    /// Of high priority (default 2).
    #[arg(long, env = "ORCHESTRATOR_PRIORITY_HIGH_BLOCKS")]
    pub priority_high_blocks: Option<u16>,
    /// The hot wallet as an output descriptor of public keys, e.g.
    /// `wsh(sortedmulti(2,XPUB1/0/*,XPUB2/0/*,XPUB3/0/*))` or `tr(XPUB/0/*)` (absent: the
    /// key file's P2WPKH keys are the wallet). Extended private keys in the key file sign
    /// for their cosigners; external signers add theirs through the Signatures API.
    /// change_address must be one of its scripts. Embedded engine.
    #[arg(long, env = "ORCHESTRATOR_DESCRIPTOR")]
    pub descriptor: Option<String>,
    /// How many scripts of a ranged descriptor are the wallet's, from index 0 (default
    /// 1000; the indexer must watch at least as many).
    #[arg(long, env = "ORCHESTRATOR_DESCRIPTOR_RANGE")]
    pub descriptor_range: Option<u32>,
    /// Wallet balancing, high water: above this many satoshis spendable in the hot wallet
    /// (`hot_wallet`), the excess above `sweep_keep_sat` is swept to `cold_descriptor`
    /// (absent: never swept). Either engine.
    #[arg(long, env = "ORCHESTRATOR_SWEEP_ABOVE_SAT")]
    pub sweep_above_sat: Option<u64>,
    /// What a sweep leaves in the hot wallet, satoshis (below `sweep_above_sat`).
    #[arg(long, env = "ORCHESTRATOR_SWEEP_KEEP_SAT")]
    pub sweep_keep_sat: Option<u64>,
    /// Wallet balancing, low water: below this many satoshis spendable in the hot wallet,
    /// a top-up from the cold wallet is prepared for its offline signers (absent: never).
    /// Embedded engine.
    #[arg(long, env = "ORCHESTRATOR_TOP_UP_BELOW_SAT")]
    pub top_up_below_sat: Option<u64>,
    /// The balance a top-up brings the hot wallet to, satoshis (above
    /// `top_up_below_sat`, below `sweep_above_sat`).
    #[arg(long, env = "ORCHESTRATOR_TOP_UP_TO_SAT")]
    pub top_up_to_sat: Option<u64>,
    /// Consolidate the hot wallet's small coins while bitcoind's estimate for the low
    /// priority is at most this many sat/vB (absent: never). Either engine.
    #[arg(long, env = "ORCHESTRATOR_CONSOLIDATE_BELOW_SAT_VB")]
    pub consolidate_below_sat_vb: Option<f64>,
    /// A coin below this many satoshis is small (default 1,000,000).
    #[arg(long, env = "ORCHESTRATOR_CONSOLIDATE_COINS_BELOW_SAT")]
    pub consolidate_coins_below_sat: Option<u64>,
    /// How many small coins make a consolidation worth it (default 20, at least 2).
    #[arg(long, env = "ORCHESTRATOR_CONSOLIDATE_MIN_COINS")]
    pub consolidate_min_coins: Option<usize>,
    /// Most coins one consolidation spends (default 200, at most 500).
    #[arg(long, env = "ORCHESTRATOR_CONSOLIDATE_MAX_COINS")]
    pub consolidate_max_coins: Option<usize>,
    /// The hot wallet's name at the indexer, for balancing (default `hot`; `sweep_wallet`
    /// is its older name).
    #[arg(long, alias = "sweep-wallet", env = "ORCHESTRATOR_HOT_WALLET")]
    #[serde(alias = "sweep_wallet")]
    pub hot_wallet: Option<String>,
    /// The cold wallet's name at the indexer, which must watch `cold_descriptor` (default
    /// `cold`): top-ups spend its coins.
    #[arg(long, env = "ORCHESTRATOR_COLD_WALLET")]
    pub cold_wallet: Option<String>,
    /// The cold wallet as a watch-only descriptor of public keys: each sweep pays a fresh
    /// address of it (index 1, 2, ...), a top-up's change its index 0. Never a script of
    /// the hot wallet.
    #[arg(long, env = "ORCHESTRATOR_COLD_DESCRIPTOR")]
    pub cold_descriptor: Option<String>,
    /// Seconds a withdrawal waits in its hot wallet's payout queue so that others arriving
    /// meanwhile are paid by the same transaction (absent or 0: each is paid alone).
    /// Withdrawals batch with those of the same wallet and fee policy.
    #[arg(long, env = "ORCHESTRATOR_BATCH_WINDOW_SECS")]
    pub batch_window_secs: Option<u64>,
    /// Most withdrawals one batch pays; a full queue is paid at once, without waiting
    /// out the window (default 50, at most 250).
    #[arg(long, env = "ORCHESTRATOR_MAX_BATCH_OUTPUTS")]
    pub max_batch_outputs: Option<usize>,
    /// Where to serve Prometheus metrics, `/health` and `/ready` over HTTP (absent: not).
    #[arg(long, env = "ORCHESTRATOR_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Where confirmations come from: `subscribe` (the indexer's gRPC stream, default) or
    /// `kafka` (the topic the indexer exports its log to; the `[kafka]` table). Either
    /// engine.
    #[arg(long, env = "ORCHESTRATOR_EVENTS")]
    pub events: Option<String>,
    /// Where the sagas run: `embedded` (this process, on its RocksDB `db`; default) or
    /// `temporal` (workflows on a Temporal cluster; the `[temporal]` table).
    #[arg(long, env = "ORCHESTRATOR_ENGINE")]
    pub engine: Option<String>,
    /// The topic read with `events = "kafka"` (the `[kafka]` table).
    #[command(flatten)]
    #[serde(default)]
    pub kafka: KafkaSettings,
    /// The Temporal cluster with `engine = "temporal"` (the `[temporal]` table).
    #[command(flatten)]
    #[serde(default)]
    pub temporal: TemporalSettings,
}

/// The `[temporal]` table: the cluster the withdrawal workflows run on.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TemporalSettings {
    /// The frontend, e.g. `http://127.0.0.1:7233` (`https://`: TLS).
    #[arg(long = "temporal-address", env = "ORCHESTRATOR_TEMPORAL_ADDRESS")]
    pub address: Option<String>,
    /// The namespace (default `default`).
    #[arg(long = "temporal-namespace", env = "ORCHESTRATOR_TEMPORAL_NAMESPACE")]
    pub namespace: Option<String>,
    /// The task queue every worker of this orchestrator polls (default `withdrawals`).
    #[arg(long = "temporal-task-queue", env = "ORCHESTRATOR_TEMPORAL_TASK_QUEUE")]
    pub task_queue: Option<String>,
    /// A file holding the API key (Temporal Cloud), mode 600.
    #[arg(
        long = "temporal-api-key-file",
        env = "ORCHESTRATOR_TEMPORAL_API_KEY_FILE"
    )]
    pub api_key_file: Option<PathBuf>,
    /// PEM CA the server's certificate must chain to (with `https://`; default: the
    /// system's roots).
    #[arg(long = "temporal-ca-file", env = "ORCHESTRATOR_TEMPORAL_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mTLS (with `client_key_file`).
    #[arg(
        long = "temporal-client-cert-file",
        env = "ORCHESTRATOR_TEMPORAL_CLIENT_CERT_FILE"
    )]
    pub client_cert_file: Option<PathBuf>,
    /// PEM key of `client_cert_file`, mode 600.
    #[arg(
        long = "temporal-client-key-file",
        env = "ORCHESTRATOR_TEMPORAL_CLIENT_KEY_FILE"
    )]
    pub client_key_file: Option<PathBuf>,
}

impl TemporalSettings {
    /// The cluster to use when `engine` is `temporal`; refuses Temporal settings otherwise.
    fn resolve(self, engine: Option<&str>) -> Result<Option<TemporalTarget>, ConfigError> {
        let given = self.address.is_some()
            || self.namespace.is_some()
            || self.task_queue.is_some()
            || self.api_key_file.is_some()
            || self.ca_file.is_some()
            || self.client_cert_file.is_some()
            || self.client_key_file.is_some();
        match engine.unwrap_or("embedded") {
            "embedded" if given => Err(ConfigError(
                "temporal settings are given but engine is \"embedded\": set engine = \"temporal\" to run the workflows on Temporal".into(),
            )),
            "embedded" => Ok(None),
            "temporal" => {
                let address = self.address.filter(|a| !a.trim().is_empty()).ok_or_else(|| {
                    ConfigError(
                        "engine = \"temporal\" needs temporal.address (or --temporal-address), e.g. http://127.0.0.1:7233".into(),
                    )
                })?;
                let tls = address.starts_with("https://");
                if !tls && !address.starts_with("http://") {
                    return Err(ConfigError(format!(
                        "temporal.address {address:?}: give http://host:port, or https://host:port for TLS"
                    )));
                }
                let tls_files = self.ca_file.is_some()
                    || self.client_cert_file.is_some()
                    || self.client_key_file.is_some();
                if tls_files && !tls {
                    return Err(ConfigError(format!(
                        "temporal TLS files are given but temporal.address {address} is not https://"
                    )));
                }
                if self.client_cert_file.is_some() != self.client_key_file.is_some() {
                    return Err(ConfigError(
                        "temporal.client_cert_file and temporal.client_key_file go together (mTLS)".into(),
                    ));
                }
                let api_key = self
                    .api_key_file
                    .map(|f| service::auth::read_secret_file("temporal.api_key_file", &f))
                    .transpose()
                    .map_err(|e| ConfigError(e.to_string()))?;
                let namespace = self.namespace.unwrap_or_else(|| "default".into());
                let task_queue = self.task_queue.unwrap_or_else(|| "withdrawals".into());
                for (key, value) in [("namespace", &namespace), ("task_queue", &task_queue)] {
                    if value.is_empty() || value.len() > 255 {
                        return Err(ConfigError(format!(
                            "temporal.{key} must be 1 to 255 characters"
                        )));
                    }
                }
                Ok(Some(TemporalTarget {
                    address,
                    namespace,
                    task_queue,
                    api_key,
                    tls: tls.then_some(TemporalTls {
                        ca_file: self.ca_file,
                        client_cert_file: self.client_cert_file,
                        client_key_file: self.client_key_file,
                    }),
                }))
            }
            other => Err(ConfigError(format!(
                "engine {other:?}: use \"embedded\" (this process and its database) or \"temporal\""
            ))),
        }
    }
}

/// The Temporal cluster in force.
#[derive(Clone, PartialEq)]
pub struct TemporalTarget {
    /// Frontend URL.
    pub address: String,
    /// Namespace.
    pub namespace: String,
    /// Task queue.
    pub task_queue: String,
    /// API key (never printed).
    pub api_key: Option<String>,
    /// TLS, with an `https://` address.
    pub tls: Option<TemporalTls>,
}

impl std::fmt::Debug for TemporalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporalTarget")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .field("task_queue", &self.task_queue)
            .field("api_key", &self.api_key.as_ref().map(|_| "(set)"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// TLS toward the Temporal cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct TemporalTls {
    /// CA the server's certificate must chain to (`None`: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mTLS).
    pub client_cert_file: Option<PathBuf>,
    /// Its key.
    pub client_key_file: Option<PathBuf>,
}

/// The `[kafka]` table: the topic the indexer exports its event log to.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers, e.g. 127.0.0.1:9092.
    #[arg(long = "kafka-brokers", env = "ORCHESTRATOR_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// The topic (default indexer.events, the indexer's default).
    #[arg(long = "kafka-topic", env = "ORCHESTRATOR_KAFKA_TOPIC")]
    pub topic: Option<String>,
    /// The consumer group read positions are also committed to, for lag tools (default
    /// orchestrator).
    #[arg(long = "kafka-group-id", env = "ORCHESTRATOR_KAFKA_GROUP_ID")]
    pub group_id: Option<String>,
    /// librdkafka settings passed through (TLS: `security.protocol`, `ssl.ca.location`...;
    /// SASL: `sasl.mechanism`...). Config file only.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub properties: std::collections::BTreeMap<String, String>,
    /// A file of more librdkafka settings, `key=value` lines (Kafka's client.properties
    /// format), for secrets such as `sasl.password`; mode 600.
    #[arg(
        long = "kafka-properties-file",
        env = "ORCHESTRATOR_KAFKA_PROPERTIES_FILE"
    )]
    pub properties_file: Option<PathBuf>,
}

/// The settings the Kafka event source manages itself: changed, it could apply events
/// out of order or miss some.
const KAFKA_MANAGED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "isolation.level",
];

impl KafkaSettings {
    /// The topic to read when `events` is `kafka`; refuses Kafka settings otherwise.
    fn resolve(self, events: Option<&str>) -> Result<Option<KafkaEvents>, ConfigError> {
        let given = self.brokers.is_some()
            || self.topic.is_some()
            || self.group_id.is_some()
            || self.properties_file.is_some();
        match events.unwrap_or("subscribe") {
            "subscribe" if given || !self.properties.is_empty() => Err(ConfigError(
                "kafka settings are given but events is \"subscribe\": set events = \"kafka\" to read the topic".into(),
            )),
            "subscribe" => Ok(None),
            "kafka" => {
                let brokers = self
                    .brokers
                    .filter(|b| !b.trim().is_empty())
                    .ok_or_else(|| {
                        ConfigError("events = \"kafka\" needs kafka.brokers (or --kafka-brokers)".into())
                    })?;
                let properties = service::config::kafka_properties(
                    &self.properties,
                    self.properties_file.as_deref(),
                    KAFKA_MANAGED,
                    "orchestrator itself (applying events in order needs it)",
                )
                .map_err(|e| ConfigError(e.to_string()))?;
                let topic = self.topic.unwrap_or_else(|| "indexer.events".into());
                service::config::check_kafka_topic(&topic, "kafka.topic")
                    .map_err(|e| ConfigError(e.to_string()))?;
                Ok(Some(KafkaEvents {
                    brokers,
                    topic,
                    group_id: self.group_id.unwrap_or_else(|| "orchestrator".into()),
                    properties,
                }))
            }
            other => Err(ConfigError(format!(
                "events {other:?}: use \"subscribe\" (the indexer's gRPC stream) or \"kafka\""
            ))),
        }
    }
}

/// A setting that is missing or wrong: one line naming it and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The settings in force.
#[derive(Clone, Debug)]
pub struct Config {
    /// Network.
    pub network: Network,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Indexer endpoint.
    pub indexer: String,
    /// Token file for the indexer's calls.
    pub indexer_token_file: Option<PathBuf>,
    /// CA of the indexer's TLS certificate.
    pub indexer_ca_file: Option<PathBuf>,
    /// bitcoind RPC URL.
    pub bitcoind_rpc_url: String,
    /// bitcoind credentials (a password is never printed).
    pub bitcoind_auth: bitcoind::Auth,
    /// How long bitcoind and the indexer may stay unreachable at start.
    pub startup_wait: std::time::Duration,
    /// Saga database (the embedded engine).
    pub db: PathBuf,
    /// Signer key file.
    pub key_file: PathBuf,
    /// Bearer token file.
    pub token_file: PathBuf,
    /// Change script.
    pub change: ScriptBuf,
    /// The hot wallet's descriptor, when it is described by one.
    pub wallet: Option<std::sync::Arc<DescriptorWallet>>,
    /// Executor policy.
    pub policy: Policy,
    /// Where the metrics endpoint listens (`None`: no endpoint).
    pub metrics_listen: Option<SocketAddr>,
    /// The Kafka topic events come from (`None`: the indexer's Subscribe stream).
    pub kafka_events: Option<KafkaEvents>,
    /// The Temporal cluster the sagas run on (`None`: the embedded engine).
    pub temporal: Option<TemporalTarget>,
}

impl Settings {
    /// The settings in force: `given` (flags and variables) over config file `file`, over
    /// the defaults.
    pub fn load(file: Option<&Path>, given: &Settings) -> Result<Config, ConfigError> {
        service::config::layered(file, given)
            .map_err(|e| ConfigError(e.to_string()))?
            .resolve_with(std::env::var("ORCHESTRATOR_BITCOIND_RPC_PASSWORD").ok())
    }

    /// Checks everything and fills defaults; `password_env` is
    /// `ORCHESTRATOR_BITCOIND_RPC_PASSWORD`.
    pub fn resolve_with(self, password_env: Option<String>) -> Result<Config, ConfigError> {
        let need = |v: Option<PathBuf>, key: &str| {
            v.ok_or_else(|| {
                ConfigError(format!(
                    "{key} is required (config key, or the --{} flag)",
                    key.replace('_', "-")
                ))
            })
        };
        let network = service::config::parse_network(self.network.as_deref().unwrap_or("mainnet"))
            .map_err(|e| ConfigError(e.to_string()))?;
        let change_text = self.change_address.clone().ok_or_else(|| {
            ConfigError("change_address is required: an address of the paying wallet".into())
        })?;
        let change = change_text
            .parse::<Address<_>>()
            .map_err(|e| ConfigError(format!("change_address {change_text:?}: {e}")))?
            .require_network(network)
            .map_err(|_| {
                ConfigError(format!(
                    "change_address {change_text} is not an address of {network}: give an \
                     address of the paying wallet on {network}, or set network"
                ))
            })?
            .script_pubkey();
        let wallet = match &self.descriptor {
            None => None,
            Some(text) => {
                let range = self.descriptor_range.unwrap_or(DEFAULT_DESCRIPTOR_RANGE);
                let wallet = DescriptorWallet::parse(text, network, range)
                    .map_err(|e| ConfigError(e.to_string()))?;
                if !wallet.contains(&change) {
                    return Err(ConfigError(format!(
                        "change_address {change_text} is not one of the descriptor's first {range} scripts: change must go back to the wallet"
                    )));
                }
                Some(std::sync::Arc::new(wallet))
            }
        };
        let balancing = self.balancing(network, &change, wallet.as_deref())?;
        let defaults = Policy::default();
        let policy = Policy {
            min_conf: defaults.min_conf,
            confirmations: self.confirmations.unwrap_or(defaults.confirmations),
            settle_at: self.settle_confirmations.unwrap_or(defaults.settle_at),
            bump_after_blocks: self.bump_after_blocks.unwrap_or(defaults.bump_after_blocks),
            fee_floor: self.fee_floor.unwrap_or(defaults.fee_floor),
            fee_ceiling: self.fee_ceiling.unwrap_or(defaults.fee_ceiling),
            balancing,
            batch: self
                .batch_window_secs
                .filter(|s| *s > 0)
                .map(|secs| Batching {
                    window_ms: secs.saturating_mul(1000),
                    max_outputs: self.max_batch_outputs.unwrap_or(DEFAULT_MAX_BATCH_OUTPUTS),
                }),
            priority_blocks: PriorityBlocks {
                low: self
                    .priority_low_blocks
                    .unwrap_or(defaults.priority_blocks.low),
                normal: self
                    .priority_normal_blocks
                    .unwrap_or(defaults.priority_blocks.normal),
                high: self
                    .priority_high_blocks
                    .unwrap_or(defaults.priority_blocks.high),
            },
        };
        check_policy(&policy)?;
        let bitcoind_rpc_url = self.bitcoind_rpc_url.unwrap_or_else(|| {
            format!("http://127.0.0.1:{}/", bitcoind::default_rpc_port(network))
        });
        service::config::check_no_credentials(&bitcoind_rpc_url, "bitcoind_rpc_url")
            .map_err(|e| ConfigError(e.to_string()))?;
        let temporal = self.temporal.resolve(self.engine.as_deref())?;
        let kafka_events = self.kafka.resolve(self.events.as_deref())?;
        if temporal.is_some() && self.metrics_listen.is_some() {
            return Err(ConfigError(
                "metrics_listen serves the embedded engine's saga metrics; with engine = \"temporal\" leave it unset and use the Temporal cluster's and the SDK's metrics".into(),
            ));
        }
        // The embedded engine keeps its sagas in `db`; Temporal keeps them itself.
        let db = match (&temporal, self.db) {
            (Some(_), db) => db.unwrap_or_default(),
            (None, db) => need(db, "db")?,
        };
        Ok(Config {
            network,
            listen: self
                .listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50061))),
            indexer: self
                .indexer
                .unwrap_or_else(|| "http://127.0.0.1:50051".into()),
            indexer_token_file: self.indexer_token_file,
            indexer_ca_file: self.indexer_ca_file,
            bitcoind_rpc_url,
            bitcoind_auth: bitcoind_auth(
                self.bitcoind_cookie_file,
                self.bitcoind_rpc_user,
                self.bitcoind_rpc_password_file,
                password_env,
            )?,
            // Capped at a day: far beyond any start, and clear of time arithmetic overflow.
            startup_wait: std::time::Duration::from_secs(
                self.startup_wait_secs.unwrap_or(60).min(86_400),
            ),
            db,
            key_file: need(self.key_file, "key_file")?,
            token_file: need(self.token_file, "token_file")?,
            change,
            wallet,
            policy,
            metrics_listen: self.metrics_listen,
            kafka_events,
            temporal,
        })
    }
}

impl Settings {
    /// The balancing policy, when a mark or consolidation is set: each refused in one
    /// line when it makes no sense (no level to keep below the mark, a top-up level not
    /// between the marks, no cold descriptor, one that pays the hot wallet, a cold wallet
    /// named as the hot one, consolidation limits out of range).
    fn balancing(
        &self,
        network: Network,
        change: &ScriptBuf,
        hot: Option<&DescriptorWallet>,
    ) -> Result<Option<Balancing>, ConfigError> {
        let refuse = |m: String| Err(ConfigError(m));
        let sat = bitcoin::Amount::from_sat;
        let sweep = match self.sweep_above_sat {
            None => None,
            Some(above) => match self.sweep_keep_sat.filter(|k| *k < above) {
                Some(keep) => Some(HighWater {
                    above: sat(above),
                    keep: sat(keep),
                }),
                None => {
                    return refuse(format!(
                        "sweep_above_sat {above} needs sweep_keep_sat, the balance a sweep leaves, below it"
                    ))
                }
            },
        };
        let top_up = match self.top_up_below_sat {
            None => None,
            Some(below) if self.sweep_keep_sat.is_some_and(|keep| below > keep) => {
                return refuse(format!(
                    "top_up_below_sat {below} is above sweep_keep_sat: every sweep would be followed by a top-up"
                ))
            }
            Some(below) => {
                let ceiling = self.sweep_above_sat.unwrap_or(u64::MAX);
                match self.top_up_to_sat.filter(|to| *to > below && *to < ceiling) {
                    Some(to) => Some(LowWater {
                        below: sat(below),
                        to: sat(to),
                    }),
                    None => {
                        return refuse(format!(
                            "top_up_below_sat {below} needs top_up_to_sat, the balance a top-up brings, above it and below sweep_above_sat (a top-up must not set off a sweep)"
                        ))
                    }
                }
            }
        };
        let consolidate = match self.consolidate_below_sat_vb {
            None => None,
            Some(rate) if !(rate.is_finite() && rate > 0.0) => {
                return refuse(format!(
                    "consolidate_below_sat_vb {rate}: a rate above 0 sat/vB"
                ))
            }
            Some(max_rate) => {
                let min_coins = self.consolidate_min_coins.unwrap_or(20);
                let max_coins = self.consolidate_max_coins.unwrap_or(200);
                if min_coins < 2 || max_coins < min_coins || max_coins > 500 {
                    return refuse(format!(
                        "consolidate_min_coins {min_coins}, consolidate_max_coins {max_coins}: at least 2 coins, at most 500, the minimum not above the maximum"
                    ));
                }
                Some(Consolidation {
                    max_rate,
                    coins_below: sat(self.consolidate_coins_below_sat.unwrap_or(1_000_000)),
                    min_coins,
                    max_coins,
                })
            }
        };
        if sweep.is_none() && top_up.is_none() && consolidate.is_none() {
            return Ok(None);
        }
        let cold = match &self.cold_descriptor {
            None if sweep.is_some() => {
                return refuse("sweep_above_sat needs cold_descriptor: where sweeps go".into())
            }
            None if top_up.is_some() => {
                return refuse(
                    "top_up_below_sat needs cold_descriptor: the wallet top-ups come from".into(),
                )
            }
            None => None,
            Some(text) => {
                let cold = DescriptorWallet::parse(text, network, DEFAULT_DESCRIPTOR_RANGE)
                    .map_err(|e| ConfigError(format!("cold_descriptor: {e}")))?;
                let pays_hot = cold
                    .scripts()
                    .iter()
                    .any(|s| s == change || hot.is_some_and(|h| h.contains(s)));
                if pays_hot {
                    return refuse(
                        "cold_descriptor pays the hot wallet (its change address or one of its scripts): sweeps must leave it".into(),
                    );
                }
                Some(std::sync::Arc::new(cold))
            }
        };
        let hot_wallet = self.hot_wallet.clone().unwrap_or_else(|| "hot".into());
        let cold_wallet = self.cold_wallet.clone().unwrap_or_else(|| "cold".into());
        for (key, name) in [("hot_wallet", &hot_wallet), ("cold_wallet", &cold_wallet)] {
            let named = (1..=crate::grpc::MAX_WALLET).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !named {
                return refuse(format!(
                    "{key} {name:?}: a wallet name at the indexer is 1 to {} letters, digits, '-', '_' or '.'",
                    crate::grpc::MAX_WALLET
                ));
            }
        }
        if cold.is_some() && cold_wallet == hot_wallet {
            return refuse(format!(
                "cold_wallet {cold_wallet:?} is the hot wallet's name: name the indexer's wallet watching cold_descriptor"
            ));
        }
        Ok(Some(Balancing {
            hot_wallet,
            cold_wallet,
            cold,
            sweep,
            top_up,
            consolidate,
        }))
    }
}

/// Refuses a policy that makes no sense, in one line, rather than adjusting it quietly.
fn check_policy(p: &Policy) -> Result<(), ConfigError> {
    let refuse = |m: String| Err(ConfigError(m));
    if p.confirmations == 0 {
        return refuse(
            "confirmations 0: a withdrawal completes at 1 confirmation at the least".into(),
        );
    }
    if p.settle_at < p.confirmations {
        return refuse(format!(
            "settle_confirmations {} is below confirmations {}: coins are released only after completion, so settle at {} or more",
            p.settle_at, p.confirmations, p.confirmations
        ));
    }
    if let Some(b) = &p.batch {
        if !(2..=MAX_BATCH_OUTPUTS).contains(&b.max_outputs) {
            return refuse(format!(
                "max_batch_outputs {}: a batch pays 2 to {MAX_BATCH_OUTPUTS} withdrawals",
                b.max_outputs
            ));
        }
    }
    if p.bump_after_blocks == 0 {
        return refuse("bump_after_blocks 0: give the blocks a payment may wait unmined before it is replaced (1 or more)".into());
    }
    if !p.fee_floor.is_finite() || !p.fee_ceiling.is_finite() {
        return refuse(format!(
            "fee_floor {} and fee_ceiling {} must be finite numbers of sat/vB",
            p.fee_floor, p.fee_ceiling
        ));
    }
    if let Some(c) = p.balancing.as_ref().and_then(|b| b.consolidate) {
        if c.max_rate < p.fee_floor {
            return refuse(format!(
                "consolidate_below_sat_vb {} is below fee_floor {}: a consolidation could never pay so little",
                c.max_rate, p.fee_floor
            ));
        }
    }
    if !(p.fee_floor >= 1.0 && p.fee_floor <= p.fee_ceiling) {
        return refuse(format!(
            "fee_floor {} and fee_ceiling {} must satisfy 1 <= floor <= ceiling",
            p.fee_floor, p.fee_ceiling
        ));
    }
    let b = p.priority_blocks;
    let in_order = 1 <= b.high && b.high <= b.normal && b.normal <= b.low && b.low <= 1008;
    if !in_order {
        return refuse(format!(
            "priority_high_blocks {}, priority_normal_blocks {} and priority_low_blocks {} must satisfy 1 <= high <= normal <= low <= 1008 (estimatesmartfee's range)",
            b.high, b.normal, b.low
        ));
    }
    Ok(())
}

/// bitcoind's credentials: `rpcuser` with a password (file or environment), else the
/// cookie file.
fn bitcoind_auth(
    cookie_file: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
) -> Result<bitcoind::Auth, ConfigError> {
    match (user, cookie_file) {
        (Some(user), _) => {
            let password = match (password_file, password_env) {
                (Some(file), _) => {
                    service::auth::read_secret_file("bitcoind_rpc_password_file", &file)
                        .map_err(|e| ConfigError(e.to_string()))?
                }
                (None, Some(p)) => p,
                (None, None) => {
                    return Err(ConfigError(
                        "bitcoind_rpc_user is set but no password: set bitcoind_rpc_password_file or ORCHESTRATOR_BITCOIND_RPC_PASSWORD".into(),
                    ))
                }
            };
            Ok(bitcoind::Auth::UserPass { user, password })
        }
        (None, Some(cookie)) => Ok(bitcoind::Auth::Cookie(cookie)),
        (None, None) => Err(ConfigError(
            "bitcoind credentials are required: bitcoind_cookie_file, or bitcoind_rpc_user with bitcoind_rpc_password_file (config keys or --flags)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `settings` on the Temporal engine (a local cluster; no saga database).
    fn on_temporal(settings: Settings) -> Settings {
        Settings {
            engine: Some("temporal".into()),
            temporal: TemporalSettings {
                address: Some("http://127.0.0.1:7233".into()),
                ..TemporalSettings::default()
            },
            db: None,
            ..settings
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let example = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/orchestrator.example.toml"
        ));
        // The one key the operator must fill in.
        let missing = Settings::load(Some(example), &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(missing.contains("change_address is required"), "{missing}");
        let mine = Settings {
            change_address: Some("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq".into()),
            ..Settings::default()
        };
        let c = Settings::load(Some(example), &mine).unwrap();
        assert_eq!(c.network, Network::Bitcoin);
        assert_eq!(c.indexer, "http://127.0.0.1:50051");
        assert_eq!(c.policy.confirmations, 3);
    }

    /// Settings that resolve, to change one thing of.
    fn complete() -> Settings {
        Settings {
            change_address: Some("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into()),
            network: Some("regtest".into()),
            bitcoind_cookie_file: Some("/dev/null".into()),
            db: Some("db".into()),
            key_file: Some("keys".into()),
            token_file: Some("token".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn a_descriptor_wallet_must_be_of_the_network_spendable_and_hold_the_change() {
        use bitcoin::bip32::{Xpriv, Xpub};
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let xpub = |seed: u8, network: Network| {
            Xpub::from_priv(&secp, &Xpriv::new_master(network, &[seed; 32]).unwrap())
        };
        let multi = |k: usize, network: Network| {
            format!(
                "wsh(sortedmulti({k},{}/0/*,{}/0/*,{}/0/*))",
                xpub(1, network),
                xpub(2, network),
                xpub(3, network)
            )
        };
        let good = multi(2, Network::Regtest);
        let wallet =
            crate::descriptor_wallet::DescriptorWallet::parse(&good, Network::Regtest, 5).unwrap();
        let mut scripts = wallet.scripts();
        scripts.sort();
        let change = Address::from_script(&scripts[0], Network::Regtest).unwrap();
        let on = |descriptor: String| Settings {
            network: Some("regtest".into()),
            descriptor: Some(descriptor),
            descriptor_range: Some(5),
            change_address: Some(change.to_string()),
            ..complete()
        };
        let c = on(good.clone()).resolve_with(None).unwrap();
        assert_eq!(c.wallet.unwrap().scripts().len(), 5);
        for (bad, says) in [
            (on(multi(2, Network::Bitcoin)), "another network"),
            (on(multi(4, Network::Regtest)), "wsh(sortedmulti(4,"),
            (
                Settings {
                    change_address: Some("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".into()),
                    ..on(good.clone())
                },
                "not one of the descriptor's first 5 scripts",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Both engines collect external signatures.
        let c = on_temporal(on(good.clone())).resolve_with(None).unwrap();
        assert!(c.temporal.is_some() && c.wallet.is_some());
    }

    #[test]
    fn a_top_up_needs_a_level_between_the_marks_and_consolidation_sane_limits() {
        use bitcoin::bip32::{Xpriv, Xpub};
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let cold_xpub = Xpub::from_priv(
            &secp,
            &Xpriv::new_master(Network::Regtest, &[6; 32]).unwrap(),
        );
        let cold = Some(format!("wpkh({cold_xpub}/0/*)"));
        let base = Settings {
            sweep_above_sat: Some(300_000_000),
            sweep_keep_sat: Some(100_000_000),
            top_up_below_sat: Some(50_000_000),
            top_up_to_sat: Some(200_000_000),
            consolidate_below_sat_vb: Some(2.0),
            cold_descriptor: cold.clone(),
            ..complete()
        };
        let b = base.clone().resolve_with(None).unwrap().policy.balancing;
        let b = b.unwrap();
        assert_eq!(b.cold_wallet, "cold");
        assert_eq!(b.top_up.unwrap().to.to_sat(), 200_000_000);
        assert_eq!(b.consolidate.unwrap().min_coins, 20);
        // Consolidation alone needs no cold wallet.
        let alone = Settings {
            consolidate_below_sat_vb: Some(2.0),
            ..complete()
        };
        let b = alone.resolve_with(None).unwrap().policy.balancing.unwrap();
        assert!(b.cold.is_none() && b.sweep.is_none());
        for (bad, says) in [
            (
                Settings {
                    top_up_to_sat: None,
                    ..base.clone()
                },
                "needs top_up_to_sat",
            ),
            (
                Settings {
                    top_up_to_sat: Some(300_000_000),
                    ..base.clone()
                },
                "must not set off a sweep",
            ),
            (
                Settings {
                    top_up_to_sat: Some(40_000_000),
                    ..base.clone()
                },
                "above it",
            ),
            (
                Settings {
                    sweep_above_sat: None,
                    cold_descriptor: None,
                    ..base.clone()
                },
                "top_up_below_sat needs cold_descriptor",
            ),
            (
                Settings {
                    cold_wallet: Some("hot".into()),
                    ..base.clone()
                },
                "is the hot wallet's name",
            ),
            (
                Settings {
                    top_up_below_sat: Some(150_000_000),
                    top_up_to_sat: Some(200_000_000),
                    ..base.clone()
                },
                "every sweep would be followed by a top-up",
            ),
            (
                Settings {
                    fee_floor: Some(3.0),
                    ..base.clone()
                },
                "is below fee_floor",
            ),
            (
                Settings {
                    hot_wallet: Some("hot' OR 1=1".into()),
                    ..base.clone()
                },
                "a wallet name at the indexer",
            ),
            (
                Settings {
                    consolidate_min_coins: Some(1),
                    ..base.clone()
                },
                "at least 2 coins",
            ),
            (
                Settings {
                    consolidate_below_sat_vb: Some(f64::NAN),
                    ..base.clone()
                },
                "a rate above 0",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Both engines run top-ups.
        let c = on_temporal(base.clone()).resolve_with(None).unwrap();
        assert!(c.policy.balancing.unwrap().top_up.is_some());
    }

    #[test]
    fn a_sweep_needs_a_level_below_the_mark_and_a_cold_wallet_that_is_not_the_hot_one() {
        use bitcoin::bip32::{Xpriv, Xpub};
        let secp = bitcoin::secp256k1::Secp256k1::new();
        let cold_xpub = Xpub::from_priv(
            &secp,
            &Xpriv::new_master(Network::Regtest, &[6; 32]).unwrap(),
        );
        let cold = format!("wpkh({cold_xpub}/0/*)");
        let change = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080";
        let on = |keep: Option<u64>, descriptor: Option<String>| Settings {
            network: Some("regtest".into()),
            change_address: Some(change.into()),
            sweep_above_sat: Some(300_000_000),
            sweep_keep_sat: keep,
            cold_descriptor: descriptor,
            ..complete()
        };
        let c = on(Some(100_000_000), Some(cold.clone()))
            .resolve_with(None)
            .unwrap();
        let balancing = c.policy.balancing.unwrap();
        assert_eq!(
            (
                balancing.hot_wallet.as_str(),
                balancing.sweep.unwrap().keep.to_sat()
            ),
            ("hot", 100_000_000)
        );
        for (bad, says) in [
            (on(None, Some(cold.clone())), "needs sweep_keep_sat"),
            (on(Some(300_000_000), Some(cold.clone())), "below it"),
            (on(Some(1), None), "needs cold_descriptor"),
            (
                // The key of the change address: the hot wallet itself.
                on(
                    Some(1),
                    Some(
                        "wpkh(0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798)"
                            .into(),
                    ),
                ),
                "cold_descriptor pays the hot wallet",
            ),
            (
                on(Some(1), Some("wpkh(nonsense)".into())),
                "cold_descriptor: descriptor",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn batching_is_off_unless_a_window_is_set() {
        assert_eq!(complete().resolve_with(None).unwrap().policy.batch, None);
        let zero = Settings {
            batch_window_secs: Some(0),
            max_batch_outputs: Some(1),
            ..complete()
        };
        assert_eq!(zero.resolve_with(None).unwrap().policy.batch, None);
        let on = Settings {
            batch_window_secs: Some(30),
            ..complete()
        };
        assert_eq!(
            on.resolve_with(None).unwrap().policy.batch,
            Some(Batching {
                window_ms: 30_000,
                max_outputs: 50
            })
        );
    }

    #[test]
    fn policies_that_make_no_sense_are_refused_not_adjusted() {
        let base = complete;
        base().resolve_with(None).unwrap();
        for (bad, says) in [
            (
                Settings {
                    confirmations: Some(0),
                    ..base()
                },
                "confirmations 0",
            ),
            (
                Settings {
                    confirmations: Some(6),
                    settle_confirmations: Some(3),
                    ..base()
                },
                "below confirmations",
            ),
            (
                Settings {
                    bump_after_blocks: Some(0),
                    ..base()
                },
                "bump_after_blocks 0",
            ),
            (
                Settings {
                    fee_ceiling: Some(f64::INFINITY),
                    ..base()
                },
                "finite",
            ),
            (
                Settings {
                    fee_floor: Some(f64::NAN),
                    ..base()
                },
                "finite",
            ),
            (
                Settings {
                    fee_floor: Some(0.5),
                    ..base()
                },
                "1 <= floor",
            ),
            (
                Settings {
                    priority_high_blocks: Some(0),
                    ..base()
                },
                "1 <= high <= normal",
            ),
            (
                Settings {
                    priority_low_blocks: Some(3),
                    ..base()
                },
                "1 <= high <= normal",
            ),
            (
                Settings {
                    priority_normal_blocks: Some(2000),
                    priority_low_blocks: Some(2000),
                    ..base()
                },
                "<= 1008",
            ),
            (
                Settings {
                    batch_window_secs: Some(10),
                    max_batch_outputs: Some(1),
                    ..base()
                },
                "max_batch_outputs 1",
            ),
            (
                Settings {
                    batch_window_secs: Some(10),
                    max_batch_outputs: Some(251),
                    ..base()
                },
                "2 to 250",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
    #[test]
    fn kafka_events_need_brokers_and_leave_the_ordering_settings_alone() {
        let base = complete;
        let kafka = |brokers: Option<&str>| KafkaSettings {
            brokers: brokers.map(str::to_owned),
            ..KafkaSettings::default()
        };
        assert_eq!(base().resolve_with(None).unwrap().kafka_events, None);
        let on = Settings {
            events: Some("kafka".into()),
            kafka: kafka(Some("127.0.0.1:9092")),
            ..base()
        };
        let events = on.resolve_with(None).unwrap().kafka_events.unwrap();
        assert_eq!(
            (events.topic.as_str(), events.group_id.as_str()),
            ("indexer.events", "orchestrator")
        );
        let mut managed = kafka(Some("127.0.0.1:9092"));
        managed
            .properties
            .insert("isolation.level".into(), "read_uncommitted".into());
        for (bad, says) in [
            (
                Settings {
                    events: Some("kafka".into()),
                    ..base()
                },
                "needs kafka.brokers",
            ),
            (
                Settings {
                    kafka: kafka(Some("127.0.0.1:9092")),
                    ..base()
                },
                "set events = \"kafka\"",
            ),
            (
                Settings {
                    events: Some("zmq".into()),
                    ..base()
                },
                "events \"zmq\"",
            ),
            (
                Settings {
                    events: Some("kafka".into()),
                    kafka: managed,
                    ..base()
                },
                "set by the orchestrator itself",
            ),
            (
                Settings {
                    events: Some("kafka".into()),
                    kafka: KafkaSettings {
                        topic: Some("no spaces".into()),
                        ..kafka(Some("127.0.0.1:9092"))
                    },
                    ..base()
                },
                "not a Kafka topic name",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn the_temporal_engine_needs_an_address_and_refuses_what_it_cannot_use() {
        let temporal = |address: Option<&str>| TemporalSettings {
            address: address.map(str::to_owned),
            ..TemporalSettings::default()
        };
        let on = Settings {
            engine: Some("temporal".into()),
            temporal: temporal(Some("http://127.0.0.1:7233")),
            db: None,
            ..complete()
        };
        let c = on.clone().resolve_with(None).unwrap();
        let batching = Settings {
            batch_window_secs: Some(30),
            ..on.clone()
        };
        let batch = batching.resolve_with(None).unwrap().policy.batch.unwrap();
        assert_eq!(batch.window_ms, 30_000, "payout queues run on Temporal too");
        let t = c.temporal.unwrap();
        assert_eq!(
            (t.namespace.as_str(), t.task_queue.as_str(), t.tls),
            ("default", "withdrawals", None)
        );
        let tls = Settings {
            temporal: TemporalSettings {
                ca_file: Some("ca.pem".into()),
                ..temporal(Some("https://temporal.example:7233"))
            },
            ..on.clone()
        };
        assert!(tls
            .resolve_with(None)
            .unwrap()
            .temporal
            .unwrap()
            .tls
            .is_some());
        assert_eq!(complete().resolve_with(None).unwrap().temporal, None);
        for (bad, says) in [
            (
                Settings {
                    temporal: temporal(None),
                    ..on.clone()
                },
                "needs temporal.address",
            ),
            (
                Settings {
                    engine: None,
                    ..on.clone()
                },
                "set engine = \"temporal\"",
            ),
            (
                Settings {
                    engine: Some("cadence".into()),
                    ..on.clone()
                },
                "engine \"cadence\"",
            ),
            (
                Settings {
                    temporal: temporal(Some("127.0.0.1:7233")),
                    ..on.clone()
                },
                "give http://host:port",
            ),
            (
                Settings {
                    temporal: TemporalSettings {
                        ca_file: Some("ca.pem".into()),
                        ..temporal(Some("http://127.0.0.1:7233"))
                    },
                    ..on.clone()
                },
                "not https://",
            ),
            (
                Settings {
                    temporal: TemporalSettings {
                        client_cert_file: Some("c.pem".into()),
                        ..temporal(Some("https://t:7233"))
                    },
                    ..on.clone()
                },
                "go together",
            ),
            (
                Settings {
                    metrics_listen: Some("127.0.0.1:9000".parse().unwrap()),
                    ..on.clone()
                },
                "metrics_listen",
            ),
            (
                Settings {
                    engine: None,
                    temporal: TemporalSettings::default(),
                    db: None,
                    ..on.clone()
                },
                "db is required",
            ),
        ] {
            let e = bad.resolve_with(None).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
