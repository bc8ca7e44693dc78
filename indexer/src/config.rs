//! Settings, parsed once into a typed struct: command-line flags and `INDEXER_*` variables
//! first, then the TOML config file, then defaults.

use std::path::{Path, PathBuf};

use bitcoin::Network;
use serde::Deserialize;

use bitcoind::default_rpc_port;
pub use service::config::ConfigError;
use service::config::{check_no_credentials, parse_network, parse_toml};

/// Settings as they may appear in the config file (every one optional).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Database directory.
    pub db: Option<PathBuf>,
    /// Network name.
    pub network: Option<String>,
    /// Scripts the bloom filter is sized for.
    pub bloom_capacity: Option<usize>,
    /// Bloom filter false-positive rate.
    pub bloom_fp_rate: Option<f64>,
    /// Blocks of undo journal to keep (absent: all).
    pub undo_depth: Option<u32>,
    /// Scripts derived from each ranged descriptor.
    pub gap_limit: Option<u32>,
    /// File holding the bearer token gRPC calls must present.
    pub grpc_token_file: Option<PathBuf>,
    /// PEM certificate chain for gRPC over TLS.
    pub grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: with it, clients must present a certificate it signed (mTLS).
    pub grpc_tls_client_ca_file: Option<PathBuf>,
    /// Events kept in the event log (absent: all).
    pub event_retention: Option<u64>,
    /// Where to serve Prometheus metrics, `/health` and `/ready` over HTTP (absent: not).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How to reach bitcoind (`[bitcoind]` table).
    #[serde(default)]
    pub bitcoind: BitcoindFileConfig,
}

/// The `[bitcoind]` table: how to reach the node `indexer run` follows.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitcoindFileConfig {
    /// JSON-RPC URL (default `http://127.0.0.1:<the network's rpcport>/`).
    pub rpc_url: Option<String>,
    /// bitcoind's `.cookie` file (default `~/.bitcoin/[<network>/].cookie`).
    pub cookie_file: Option<PathBuf>,
    /// `rpcuser`, instead of the cookie; the password comes from `rpc_password_file` or
    /// `INDEXER_BITCOIND_RPC_PASSWORD`, never from the config file itself.
    pub rpc_user: Option<String>,
    /// File holding the RPC password.
    pub rpc_password_file: Option<PathBuf>,
    /// Fetch blocks over REST (`rest=1` in bitcoin.conf): faster than RPC hex.
    pub rest: Option<bool>,
    /// `zmqpubrawblock` endpoint.
    pub zmq_rawblock: Option<String>,
    /// `zmqpubhashblock` endpoint.
    pub zmq_hashblock: Option<String>,
    /// `zmqpubsequence` endpoint.
    pub zmq_sequence: Option<String>,
    /// `zmqpubrawtx` endpoint.
    pub zmq_rawtx: Option<String>,
    /// Tip polling interval without ZMQ, in milliseconds (default 1000).
    pub poll_interval_ms: Option<u64>,
    /// With ZMQ, ask bitcoind for its tip after this many seconds of silence (default 30).
    pub zmq_silence_secs: Option<u64>,
    /// RPC call timeout in seconds (default 60).
    pub rpc_timeout_secs: Option<u64>,
    /// At start, how long bitcoind may stay unreachable before that is reported as a
    /// configuration error (default 60; a node that answers "warming up" is waited for).
    pub startup_wait_secs: Option<u64>,
}

impl BitcoindFileConfig {
    /// Fills every setting this one lacks from `other`.
    pub fn or(self, other: BitcoindFileConfig) -> BitcoindFileConfig {
        BitcoindFileConfig {
            rpc_url: self.rpc_url.or(other.rpc_url),
            cookie_file: self.cookie_file.or(other.cookie_file),
            rpc_user: self.rpc_user.or(other.rpc_user),
            rpc_password_file: self.rpc_password_file.or(other.rpc_password_file),
            rest: self.rest.or(other.rest),
            zmq_rawblock: self.zmq_rawblock.or(other.zmq_rawblock),
            zmq_hashblock: self.zmq_hashblock.or(other.zmq_hashblock),
            zmq_sequence: self.zmq_sequence.or(other.zmq_sequence),
            zmq_rawtx: self.zmq_rawtx.or(other.zmq_rawtx),
            poll_interval_ms: self.poll_interval_ms.or(other.poll_interval_ms),
            zmq_silence_secs: self.zmq_silence_secs.or(other.zmq_silence_secs),
            rpc_timeout_secs: self.rpc_timeout_secs.or(other.rpc_timeout_secs),
            startup_wait_secs: self.startup_wait_secs.or(other.startup_wait_secs),
        }
    }
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

impl BitcoindFileConfig {
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

impl FileConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse_toml(path, &text)
    }

    /// Fills every setting this one lacks from `other`.
    pub fn or(self, other: FileConfig) -> FileConfig {
        FileConfig {
            db: self.db.or(other.db),
            network: self.network.or(other.network),
            bloom_capacity: self.bloom_capacity.or(other.bloom_capacity),
            bloom_fp_rate: self.bloom_fp_rate.or(other.bloom_fp_rate),
            undo_depth: self.undo_depth.or(other.undo_depth),
            gap_limit: self.gap_limit.or(other.gap_limit),
            grpc_token_file: self.grpc_token_file.or(other.grpc_token_file),
            grpc_tls_cert_file: self.grpc_tls_cert_file.or(other.grpc_tls_cert_file),
            grpc_tls_key_file: self.grpc_tls_key_file.or(other.grpc_tls_key_file),
            grpc_tls_client_ca_file: self
                .grpc_tls_client_ca_file
                .or(other.grpc_tls_client_ca_file),
            event_retention: self.event_retention.or(other.event_retention),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
            bitcoind: self.bitcoind.or(other.bitcoind),
        }
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
    pub bitcoind: BitcoindFileConfig,
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
    pub fn resolve(c: FileConfig) -> Result<Config, ConfigError> {
        let network = parse_network(c.network.as_deref().unwrap_or("mainnet"))?;
        let bloom_fp_rate = c.bloom_fp_rate.unwrap_or(1e-3);
        if !(bloom_fp_rate > 0.0 && bloom_fp_rate < 1.0) {
            return Err(ConfigError::Invalid(format!(
                "bloom_fp_rate {bloom_fp_rate} must be between 0 and 1"
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
            bitcoind: c.bitcoind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file: FileConfig =
            toml::from_str("db = \"/a\"\nnetwork = \"regtest\"\nundo_depth = 7").unwrap();
        let flags = FileConfig {
            db: Some("/b".into()),
            ..FileConfig::default()
        };
        let c = Config::resolve(flags.or(file)).unwrap();
        assert_eq!(c.db, PathBuf::from("/b"));
        assert_eq!(c.network, Network::Regtest);
        assert_eq!(c.undo_depth, Some(7));
        assert_eq!(c.gap_limit, 1000);
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../indexer.example.toml");
        let file: FileConfig = toml::from_str(text).unwrap();
        let c = Config::resolve(file).unwrap();
        assert_eq!(c.network, Network::Bitcoin);
        let b = c.bitcoind.resolve(c.network, None).unwrap();
        assert!(b.rest);
        assert_eq!(b.zmq.topics.len(), 4);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9332".parse().unwrap()));
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(toml::from_str::<FileConfig>("colour = 1").is_err());
        let bad = FileConfig {
            network: Some("moon".into()),
            ..FileConfig::default()
        };
        assert!(Config::resolve(bad)
            .unwrap_err()
            .to_string()
            .contains("moon"));
        let bad = FileConfig {
            bloom_fp_rate: Some(1.5),
            ..FileConfig::default()
        };
        assert!(Config::resolve(bad).is_err());
    }

    #[test]
    fn credentials_in_the_rpc_url_are_refused_without_being_repeated() {
        let with = |url: &str| BitcoindFileConfig {
            rpc_url: Some(url.into()),
            cookie_file: Some("/c".into()),
            ..BitcoindFileConfig::default()
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
        let file: FileConfig = toml::from_str("metrics_listen = \"127.0.0.1:9332\"").unwrap();
        let c = Config::resolve(FileConfig::default().or(file.clone())).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9332".parse().unwrap()));
        let flags = FileConfig {
            metrics_listen: Some("0.0.0.0:9400".parse().unwrap()),
            ..FileConfig::default()
        };
        let c = Config::resolve(flags.or(file)).unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9400".parse().unwrap()));
        assert!(Config::resolve(FileConfig::default())
            .unwrap()
            .metrics_listen
            .is_none());
    }
}
