//! Settings, each declared once in [`Settings`] and layered: flags over `INDEXER_*`
//! variables over the TOML config file over defaults; then checked into a typed [`Config`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bitcoin::Network;
use serde::{Deserialize, Serialize};

use bitcoind::default_rpc_port;
pub use service::config::ConfigError;
use service::config::{check_no_credentials, layered, parse_network};

/// Every setting, declared once: a key of the config file, a `--flag` and an `INDEXER_*`
/// variable. Unset ones are `None` and do not serialize, so each layer (defaults < file <
/// variable < flag) only overrides what it gives.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Database directory (default indexer-db).
    #[arg(long, global = true, env = "INDEXER_DB")]
    pub db: Option<PathBuf>,
    /// mainnet, testnet3, testnet4, signet or regtest (default mainnet).
    #[arg(long, global = true, env = "INDEXER_NETWORK")]
    pub network: Option<String>,
    /// Least scripts the bloom filter is sized for; it takes 2x the watched count when more
    /// (default 1,000,000).
    #[arg(long, global = true, env = "INDEXER_BLOOM_CAPACITY")]
    pub bloom_capacity: Option<usize>,
    /// Bloom filter false-positive rate (default 0.001).
    #[arg(long, global = true, env = "INDEXER_BLOOM_FP_RATE")]
    pub bloom_fp_rate: Option<f64>,
    /// Blocks of undo journal to keep (default: all).
    #[arg(long, global = true, env = "INDEXER_UNDO_DEPTH")]
    pub undo_depth: Option<u32>,
    /// Scripts derived from each ranged descriptor (default 1000).
    #[arg(long, global = true, env = "INDEXER_GAP_LIMIT")]
    pub gap_limit: Option<u32>,
    /// File holding the bearer token gRPC calls must present (required off loopback).
    #[arg(long, global = true, env = "INDEXER_GRPC_TOKEN_FILE")]
    pub grpc_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve gRPC over TLS (with the key file).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CERT_FILE")]
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_KEY_FILE")]
    pub grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS).
    #[arg(long, global = true, env = "INDEXER_GRPC_TLS_CLIENT_CA_FILE")]
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    /// Events kept in the event log; older offsets are pruned (default: all).
    #[arg(long, global = true, env = "INDEXER_EVENT_RETENTION")]
    pub event_retention: Option<u64>,
    /// Serve Prometheus metrics, /health and /ready over HTTP here (run and serve).
    #[arg(long, global = true, env = "INDEXER_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach bitcoind (the `[bitcoind]` table).
    #[command(flatten)]
    #[serde(default)]
    pub bitcoind: BitcoindSettings,
    /// Where `indexer run` exports the event log (the `[kafka]` table; absent: nowhere).
    #[command(flatten)]
    #[serde(default)]
    pub kafka: KafkaSettings,
}

/// The `[kafka]` table: the Kafka topic the event log is exported to.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Kafka bootstrap servers, e.g. 127.0.0.1:9092 (set: export the event log).
    #[arg(long = "kafka-brokers", global = true, env = "INDEXER_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// The topic events go to (default indexer.events).
    #[arg(long = "kafka-topic", global = true, env = "INDEXER_KAFKA_TOPIC")]
    pub topic: Option<String>,
    /// The producer's client.id (default indexer).
    #[arg(
        long = "kafka-client-id",
        global = true,
        env = "INDEXER_KAFKA_CLIENT_ID"
    )]
    pub client_id: Option<String>,
    /// librdkafka settings passed through as they are (TLS: `security.protocol`,
    /// `ssl.ca.location`...; SASL: `sasl.mechanism`...). Config file only.
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    /// A file of more librdkafka settings, `key=value` lines (Kafka's client.properties
    /// format), for secrets such as `sasl.password`; mode 600.
    #[arg(
        long = "kafka-properties-file",
        global = true,
        env = "INDEXER_KAFKA_PROPERTIES_FILE"
    )]
    pub properties_file: Option<std::path::PathBuf>,
}

/// The settings the exporter manages itself: passing them through would break exactly-once.
const KAFKA_MANAGED: &[&str] = &[
    "bootstrap.servers",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "isolation.level",
];

/// Where the event log is exported, resolved.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic.
    pub topic: String,
    /// client.id.
    pub client_id: String,
    /// librdkafka settings passed through.
    pub properties: BTreeMap<String, String>,
}

impl KafkaSettings {
    /// The export settings, when brokers are given.
    pub fn resolve(&self) -> Result<Option<KafkaConfig>, ConfigError> {
        let Some(brokers) = self.brokers.clone() else {
            if self.topic.is_some() || !self.properties.is_empty() || self.properties_file.is_some()
            {
                return Err(ConfigError::Invalid(
                    "kafka settings without kafka.brokers: set the brokers to export to".into(),
                ));
            }
            return Ok(None);
        };
        if brokers.trim().is_empty() {
            return Err(ConfigError::Invalid("kafka.brokers is empty".into()));
        }
        let properties = service::config::kafka_properties(
            &self.properties,
            self.properties_file.as_deref(),
            KAFKA_MANAGED,
            "exporter itself (exactly-once needs it)",
        )
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let topic = self
            .topic
            .clone()
            .unwrap_or_else(|| "indexer.events".into());
        service::config::check_kafka_topic(&topic, "kafka.topic")
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(Some(KafkaConfig {
            brokers,
            topic,
            client_id: self.client_id.clone().unwrap_or_else(|| "indexer".into()),
            properties,
        }))
    }
}

/// The `[bitcoind]` table: how to reach the node `indexer run` follows.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct BitcoindSettings {
    /// bitcoind's JSON-RPC URL (default `http://127.0.0.1:<the network's rpcport>/`).
    #[arg(
        long = "bitcoind-rpc-url",
        global = true,
        env = "INDEXER_BITCOIND_RPC_URL"
    )]
    pub rpc_url: Option<String>,
    /// bitcoind's .cookie file (default `~/.bitcoin/[<network>/].cookie`).
    #[arg(
        long = "bitcoind-cookie-file",
        global = true,
        env = "INDEXER_BITCOIND_COOKIE_FILE"
    )]
    pub cookie_file: Option<PathBuf>,
    /// rpcuser, instead of the cookie; the password comes from the password file or
    /// INDEXER_BITCOIND_RPC_PASSWORD, never from the config file itself.
    #[arg(
        long = "bitcoind-rpc-user",
        global = true,
        env = "INDEXER_BITCOIND_RPC_USER"
    )]
    pub rpc_user: Option<String>,
    /// File holding the RPC password.
    #[arg(
        long = "bitcoind-rpc-password-file",
        global = true,
        env = "INDEXER_BITCOIND_RPC_PASSWORD_FILE"
    )]
    pub rpc_password_file: Option<PathBuf>,
    /// Fetch blocks over REST (rest=1 in bitcoin.conf): faster than RPC hex.
    #[arg(long = "bitcoind-rest", global = true, env = "INDEXER_BITCOIND_REST")]
    pub rest: Option<bool>,
    /// zmqpubrawblock endpoint, e.g. tcp://127.0.0.1:28332.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWBLOCK")]
    pub zmq_rawblock: Option<String>,
    /// zmqpubhashblock endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_HASHBLOCK")]
    pub zmq_hashblock: Option<String>,
    /// zmqpubsequence endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_SEQUENCE")]
    pub zmq_sequence: Option<String>,
    /// zmqpubrawtx endpoint.
    #[arg(long, global = true, env = "INDEXER_ZMQ_RAWTX")]
    pub zmq_rawtx: Option<String>,
    /// Tip polling interval without ZMQ, milliseconds (default 1000).
    #[arg(long, global = true, env = "INDEXER_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// With ZMQ, check bitcoind's tip after this many seconds of silence (default 30).
    #[arg(long, global = true, env = "INDEXER_ZMQ_SILENCE_SECS")]
    pub zmq_silence_secs: Option<u64>,
    /// RPC call timeout, seconds (default 60).
    #[arg(
        long = "bitcoind-rpc-timeout-secs",
        global = true,
        env = "INDEXER_BITCOIND_RPC_TIMEOUT_SECS"
    )]
    pub rpc_timeout_secs: Option<u64>,
    /// At start, seconds bitcoind may stay unreachable before that is reported as a
    /// configuration error (default 60; a node that answers "warming up" is waited for).
    #[arg(
        long = "bitcoind-startup-wait-secs",
        global = true,
        env = "INDEXER_BITCOIND_STARTUP_WAIT_SECS"
    )]
    pub startup_wait_secs: Option<u64>,
}

/// How to reach bitcoind, resolved.
#[derive(Clone, Debug)]
pub struct BitcoindConfig {
    /// JSON-RPC URL.
    pub rpc_url: String,
    /// Credentials (a password is never printed).
    pub auth: bitcoind::Auth,
    /// Fetch blocks over REST.
    pub rest: bool,
    /// ZMQ topics and their endpoints.
    pub zmq: crate::zmq_feed::ZmqEndpoints,
    /// Tip polling interval without ZMQ.
    pub poll_interval: std::time::Duration,
    /// Silence after which the tip is checked over RPC.
    pub zmq_silence: std::time::Duration,
    /// RPC call timeout.
    pub rpc_timeout: std::time::Duration,
    /// How long bitcoind may be unreachable at start.
    pub startup_wait: std::time::Duration,
}

impl BitcoindSettings {
    /// Resolves the settings for `network`; `password_env` is `INDEXER_BITCOIND_RPC_PASSWORD`.
    pub fn resolve(
        &self,
        network: Network,
        password_env: Option<String>,
    ) -> Result<BitcoindConfig, ConfigError> {
        use crate::zmq_feed::{Topic, ZmqEndpoints};
        let rpc_url = self
            .rpc_url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}/", default_rpc_port(network)));
        // First: the messages below repeat the URL.
        check_no_credentials(&rpc_url, "bitcoind.rpc_url")?;
        if !rpc_url.starts_with("http://") {
            return Err(ConfigError::Invalid(format!(
                "bitcoind.rpc_url {rpc_url:?} must start with http:// (bitcoind serves RPC over plain HTTP; tunnel it for remote nodes)"
            )));
        }
        let auth = match &self.rpc_user {
            Some(user) => {
                let password = match (&self.rpc_password_file, password_env) {
                    (Some(file), _) => {
                        service::auth::read_secret_file("bitcoind.rpc_password_file", file)
                            .map_err(|e| ConfigError::Invalid(e.to_string()))?
                    }
                    (None, Some(p)) => p,
                    (None, None) => {
                        return Err(ConfigError::Invalid(
                            "bitcoind.rpc_user is set but no password: set bitcoind.rpc_password_file or INDEXER_BITCOIND_RPC_PASSWORD".into(),
                        ))
                    }
                };
                bitcoind::Auth::UserPass {
                    user: user.clone(),
                    password,
                }
            }
            None => {
                let cookie = match &self.cookie_file {
                    Some(c) => c.clone(),
                    None => default_cookie_file(network).ok_or_else(|| {
                        ConfigError::Invalid(
                            "no bitcoind credentials: set bitcoind.cookie_file or bitcoind.rpc_user".into(),
                        )
                    })?,
                };
                bitcoind::Auth::Cookie(cookie)
            }
        };
        let mut zmq = ZmqEndpoints::default();
        for (topic, endpoint) in [
            (Topic::RawBlock, &self.zmq_rawblock),
            (Topic::HashBlock, &self.zmq_hashblock),
            (Topic::Sequence, &self.zmq_sequence),
            (Topic::RawTx, &self.zmq_rawtx),
        ] {
            if let Some(e) = endpoint {
                if !e.starts_with("tcp://") && !e.starts_with("ipc://") {
                    return Err(ConfigError::Invalid(format!(
                        "bitcoind.zmq_{} {e:?} must be a ZMQ endpoint like tcp://127.0.0.1:28332",
                        topic.name()
                    )));
                }
                zmq.topics.push((topic, e.clone()));
            }
        }
        let secs = std::time::Duration::from_secs;
        Ok(BitcoindConfig {
            rpc_url,
            auth,
            rest: self.rest.unwrap_or(false),
            zmq,
            poll_interval: std::time::Duration::from_millis(
                self.poll_interval_ms.unwrap_or(1000).max(10),
            ),
            zmq_silence: secs(self.zmq_silence_secs.unwrap_or(30).max(1)),
            rpc_timeout: secs(self.rpc_timeout_secs.unwrap_or(60).max(1)),
            // Capped at a day: far beyond any start, and clear of time arithmetic overflow.
            startup_wait: secs(self.startup_wait_secs.unwrap_or(60).min(86_400)),
        })
    }
}

/// Where bitcoind writes its cookie by default (`~/.bitcoin/[<network>/].cookie`).
fn default_cookie_file(network: Network) -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let mut p = PathBuf::from(home).join(".bitcoin");
    match network {
        Network::Bitcoin => {}
        Network::Testnet => p.push("testnet3"),
        Network::Testnet4 => p.push("testnet4"),
        Network::Signet => p.push("signet"),
        _ => p.push("regtest"),
    }
    Some(p.join(".cookie"))
}

impl Settings {
    /// The settings in force: `given` (flags and variables) over config file `file`, over
    /// the defaults.
    pub fn load(file: Option<&Path>, given: &Settings) -> Result<Config, ConfigError> {
        Config::resolve(layered(file, given)?)
    }
}

/// The settings in force.
#[derive(Clone, Debug)]
pub struct Config {
    /// Database directory.
    pub db: PathBuf,
    /// Network.
    pub network: Network,
    /// Least number of scripts the bloom filter is sized for (it takes 2x the watched count
    /// when that is more).
    pub bloom_capacity: usize,
    /// Bloom filter false-positive rate.
    pub bloom_fp_rate: f64,
    /// Blocks of undo journal to keep (`None`: all).
    pub undo_depth: Option<u32>,
    /// Scripts derived from each ranged descriptor.
    pub gap_limit: u32,
    /// File holding the bearer token gRPC calls must present (`None`: open, loopback only).
    pub grpc_token_file: Option<PathBuf>,
    /// gRPC over TLS: certificate chain, key and optional client CA (PEM files).
    pub grpc_tls: Option<TlsFiles>,
    /// Events kept in the event log (`None`: all).
    pub event_retention: Option<u64>,
    /// Where the metrics endpoint listens (`None`: no endpoint).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The `[bitcoind]` settings, resolved when a command needs the node.
    pub bitcoind: BitcoindSettings,
    /// Where `indexer run` exports the event log (`None`: nowhere).
    pub kafka: Option<KafkaConfig>,
}

/// The PEM files of the gRPC server's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// CA whose certificates clients must present (`None`: no client certificates).
    pub client_ca: Option<PathBuf>,
}

impl Config {
    /// Resolves settings, with defaults for whatever is unset.
    pub fn resolve(c: Settings) -> Result<Config, ConfigError> {
        let network = parse_network(c.network.as_deref().unwrap_or("mainnet"))?;
        let bloom_fp_rate = c.bloom_fp_rate.unwrap_or(1e-3);
        // Below one in a million the filter's 8 bits a script need hundreds of bits each
        // (gigabytes for millions of scripts) to save lookups that cost microseconds.
        if !(1e-6..1.0).contains(&bloom_fp_rate) {
            return Err(ConfigError::Invalid(format!(
                "bloom_fp_rate {bloom_fp_rate} must be at least 0.000001 and below 1"
            )));
        }
        let gap_limit = c.gap_limit.unwrap_or(1000);
        if gap_limit == 0 || gap_limit > 10_000_000 {
            return Err(ConfigError::Invalid(format!(
                "gap_limit {gap_limit} must be 1..=10000000"
            )));
        }
        let grpc_tls = match (c.grpc_tls_cert_file, c.grpc_tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca: c.grpc_tls_client_ca_file,
            }),
            (None, None) if c.grpc_tls_client_ca_file.is_none() => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "gRPC TLS needs both grpc_tls_cert_file and grpc_tls_key_file \
                     (grpc_tls_client_ca_file only with them)"
                        .into(),
                ))
            }
        };
        Ok(Config {
            db: c.db.unwrap_or_else(|| PathBuf::from("indexer-db")),
            network,
            bloom_capacity: c.bloom_capacity.unwrap_or(1_000_000),
            bloom_fp_rate,
            undo_depth: c.undo_depth,
            gap_limit,
            grpc_token_file: c.grpc_token_file,
            grpc_tls,
            event_retention: c.event_retention,
            metrics_listen: c.metrics_listen,
            kafka: c.kafka.resolve()?,
            bitcoind: c.bitcoind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file holding `text`, in a directory that lives as long as the guard.
    fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexer.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// The flags as clap parses them (without variables: clap reads those the same way).
    fn flags(args: &[&str]) -> Settings {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        let argv = std::iter::once("indexer").chain(args.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv)
            .unwrap()
            .settings
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let (_dir, path) = config_file(
            "db = \"/a\"\nnetwork = \"regtest\"\nundo_depth = 7\n\
             [bitcoind]\nrpc_url = \"http://127.0.0.1:1/\"\nrest = true\n",
        );
        let given = flags(&[
            "--db",
            "/b",
            "--bitcoind-rest",
            "false",
            "--zmq-rawtx",
            "tcp://x:1",
        ]);
        let c = Settings::load(Some(&path), &given).unwrap();
        assert_eq!(c.db, PathBuf::from("/b"));
        assert_eq!(c.network, Network::Regtest);
        assert_eq!(c.undo_depth, Some(7));
        assert_eq!(c.gap_limit, 1000);
        assert_eq!(c.bitcoind.rpc_url.as_deref(), Some("http://127.0.0.1:1/"));
        assert_eq!(c.bitcoind.rest, Some(false));
        assert_eq!(c.bitcoind.zmq_rawtx.as_deref(), Some("tcp://x:1"));
        let c = Settings::load(None, &flags(&[])).unwrap();
        assert_eq!(c.db, PathBuf::from("indexer-db"));
        assert_eq!(c.network, Network::Bitcoin);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../indexer.example.toml");
        let file: Settings = toml::from_str(text).unwrap();
        let c = Config::resolve(file).unwrap();
        assert_eq!(c.network, Network::Bitcoin);
        let b = c.bitcoind.resolve(c.network, None).unwrap();
        assert!(b.rest);
        assert_eq!(b.zmq.topics.len(), 4);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9332".parse().unwrap()));
    }

    #[test]
    fn kafka_export_needs_brokers_and_leaves_exactly_once_settings_alone() {
        let (_dir, path) = config_file(
            "[kafka]\nbrokers = \"127.0.0.1:9092\"\n[kafka.properties]\n\"security.protocol\" = \"ssl\"\n",
        );
        let k = Settings::load(Some(&path), &flags(&[]))
            .unwrap()
            .kafka
            .unwrap();
        assert_eq!(k.topic, "indexer.events");
        assert_eq!(k.properties["security.protocol"], "ssl");
        let k = Settings::load(Some(&path), &flags(&["--kafka-topic", "t1"]))
            .unwrap()
            .kafka
            .unwrap();
        assert_eq!(
            (k.topic.as_str(), k.brokers.as_str()),
            ("t1", "127.0.0.1:9092")
        );
        assert!(Settings::load(None, &flags(&[])).unwrap().kafka.is_none());
        // Secrets from a properties file of their own, mode 600.
        let secrets = _dir.path().join("kafka.properties");
        std::fs::write(
            &secrets,
            "# SASL\nsasl.username = idx\nsasl.password=s3cret=x\n",
        )
        .unwrap();
        let with_file = |mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(mode)).unwrap();
            Settings::load(
                Some(&path),
                &flags(&["--kafka-properties-file", secrets.to_str().unwrap()]),
            )
        };
        let k = with_file(0o600).unwrap().kafka.unwrap();
        assert_eq!(
            (
                k.properties["sasl.password"].as_str(),
                k.properties["sasl.username"].as_str(),
                k.properties["security.protocol"].as_str()
            ),
            ("s3cret=x", "idx", "ssl")
        );
        let e = with_file(0o644).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::write(&secrets, "security.protocol=plaintext\n").unwrap();
        let e = with_file(0o600).unwrap_err().to_string();
        assert!(e.contains("both"), "{e}");
        for (text, says) in [
            ("[kafka]\ntopic = \"t\"\n", "without kafka.brokers"),
            (
                "[kafka]\nbrokers = \"b:1\"\n[kafka.properties]\n\"transactional.id\" = \"x\"\n",
                "set by the exporter itself",
            ),
            (
                "[kafka]\nbrokers = \"b:1\"\ntopic = \"a b\"\n",
                "topic name",
            ),
        ] {
            let (_dir, path) = config_file(text);
            let e = Settings::load(Some(&path), &flags(&[]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(toml::from_str::<Settings>("colour = 1").is_err());
        let bad = Settings {
            network: Some("moon".into()),
            ..Settings::default()
        };
        assert!(Config::resolve(bad)
            .unwrap_err()
            .to_string()
            .contains("moon"));
        for rate in [1.5, 0.0, 1e-9, f64::NAN] {
            let bad = Settings {
                bloom_fp_rate: Some(rate),
                ..Settings::default()
            };
            let e = Config::resolve(bad).unwrap_err().to_string();
            assert!(e.contains("bloom_fp_rate"), "{rate}: {e}");
        }
    }

    #[test]
    fn credentials_in_the_rpc_url_are_refused_without_being_repeated() {
        let with = |url: &str| BitcoindSettings {
            rpc_url: Some(url.into()),
            cookie_file: Some("/c".into()),
            ..BitcoindSettings::default()
        };
        let err = with("http://alice:hunter2@127.0.0.1:8332/")
            .resolve(Network::Regtest, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("credentials"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let fine = with("http://127.0.0.1:8332/wallet/a@b")
            .resolve(Network::Regtest, None)
            .unwrap();
        assert_eq!(fine.rpc_url, "http://127.0.0.1:8332/wallet/a@b");
    }

    #[test]
    fn the_metrics_address_comes_from_the_file_unless_a_flag_gives_one() {
        let (_dir, path) = config_file("metrics_listen = \"127.0.0.1:9332\"");
        let c = Settings::load(Some(&path), &flags(&[])).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9332".parse().unwrap()));
        let given = flags(&["--metrics-listen", "0.0.0.0:9400"]);
        let c = Settings::load(Some(&path), &given).unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9400".parse().unwrap()));
        assert!(Config::resolve(Settings::default())
            .unwrap()
            .metrics_listen
            .is_none());
    }
}
