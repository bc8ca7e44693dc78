//! `orchestrator run --config FILE`: the TOML settings, every one also a flag or an
//! `ORCHESTRATOR_<NAME>` environment variable (see `orchestrator --help`). Secrets (the
//! bearer token, the signer's keys, bitcoind's cookie) come from files only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bitcoin::{Address, Network, ScriptBuf};
use serde::Deserialize;

use crate::executor::Policy;

/// The file as written; every key optional so flags can fill or override it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// mainnet, testnet3, testnet4, signet or regtest.
    pub network: Option<String>,
    /// gRPC listen address (default 127.0.0.1:50061).
    pub listen: Option<SocketAddr>,
    /// The indexer's gRPC endpoint, e.g. `http://127.0.0.1:50051` (https: TLS).
    pub indexer: Option<String>,
    /// The file holding the token the indexer asks for (when its reads are protected).
    pub indexer_token_file: Option<PathBuf>,
    /// PEM CA the indexer's TLS certificate must chain to (with an https endpoint).
    pub indexer_ca_file: Option<PathBuf>,
    /// bitcoind's JSON-RPC URL.
    pub bitcoind_rpc_url: Option<String>,
    /// bitcoind's cookie file.
    pub bitcoind_cookie_file: Option<PathBuf>,
    /// At start, seconds bitcoind and the indexer may stay unreachable before the
    /// process exits with what to check (default 60).
    pub startup_wait_secs: Option<u64>,
    /// The saga database directory.
    pub db: Option<PathBuf>,
    /// The signer's key file (WIF keys, mode 600).
    pub key_file: Option<PathBuf>,
    /// The file holding the bearer token every call must present.
    pub token_file: Option<PathBuf>,
    /// Where change goes (an address of the wallet the keys sign for).
    pub change_address: Option<String>,
    /// Confirmations that complete a withdrawal (default 3).
    pub confirmations: Option<u32>,
    /// Confirmations after which its coins are released (default 6).
    pub settle_confirmations: Option<u32>,
    /// Blocks a payment may stay unmined before it is replaced (default 3).
    pub bump_after_blocks: Option<u32>,
    /// Fee rate floor and ceiling, sat/vB (defaults 1 and 500).
    pub fee_floor: Option<f64>,
    /// See `fee_floor`.
    pub fee_ceiling: Option<f64>,
    /// Where to serve Prometheus metrics, `/health` and `/ready` over HTTP (absent: not).
    pub metrics_listen: Option<SocketAddr>,
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
    /// bitcoind cookie file.
    pub bitcoind_cookie_file: PathBuf,
    /// How long bitcoind and the indexer may stay unreachable at start.
    pub startup_wait: std::time::Duration,
    /// Saga database.
    pub db: PathBuf,
    /// Signer key file.
    pub key_file: PathBuf,
    /// Bearer token file.
    pub token_file: PathBuf,
    /// Change script.
    pub change: ScriptBuf,
    /// Executor policy.
    pub policy: Policy,
    /// Where the metrics endpoint listens (`None`: no endpoint).
    pub metrics_listen: Option<SocketAddr>,
}

impl FileConfig {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        indexer::config::parse_toml(path, &text).map_err(|e| ConfigError(e.to_string()))
    }

    /// Fills what this one lacks from `other`.
    pub fn or(self, other: FileConfig) -> FileConfig {
        FileConfig {
            network: self.network.or(other.network),
            listen: self.listen.or(other.listen),
            indexer: self.indexer.or(other.indexer),
            indexer_token_file: self.indexer_token_file.or(other.indexer_token_file),
            indexer_ca_file: self.indexer_ca_file.or(other.indexer_ca_file),
            bitcoind_rpc_url: self.bitcoind_rpc_url.or(other.bitcoind_rpc_url),
            bitcoind_cookie_file: self.bitcoind_cookie_file.or(other.bitcoind_cookie_file),
            startup_wait_secs: self.startup_wait_secs.or(other.startup_wait_secs),
            db: self.db.or(other.db),
            key_file: self.key_file.or(other.key_file),
            token_file: self.token_file.or(other.token_file),
            change_address: self.change_address.or(other.change_address),
            confirmations: self.confirmations.or(other.confirmations),
            settle_confirmations: self.settle_confirmations.or(other.settle_confirmations),
            bump_after_blocks: self.bump_after_blocks.or(other.bump_after_blocks),
            fee_floor: self.fee_floor.or(other.fee_floor),
            fee_ceiling: self.fee_ceiling.or(other.fee_ceiling),
            metrics_listen: self.metrics_listen.or(other.metrics_listen),
        }
    }

    /// Checks everything and fills defaults.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let need = |v: Option<PathBuf>, key: &str| {
            v.ok_or_else(|| {
                ConfigError(format!(
                    "{key} is required (config key, or the --{} flag)",
                    key.replace('_', "-")
                ))
            })
        };
        let network = indexer::config::parse_network(self.network.as_deref().unwrap_or("mainnet"))
            .map_err(|e| ConfigError(e.to_string()))?;
        let change_text = self.change_address.ok_or_else(|| {
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
        let defaults = Policy::default();
        let confirmations = self.confirmations.unwrap_or(defaults.confirmations).max(1);
        let policy = Policy {
            min_conf: defaults.min_conf,
            confirmations,
            settle_at: self
                .settle_confirmations
                .unwrap_or(defaults.settle_at)
                .max(confirmations),
            bump_after_blocks: self
                .bump_after_blocks
                .unwrap_or(defaults.bump_after_blocks)
                .max(1),
            fee_floor: self.fee_floor.unwrap_or(defaults.fee_floor),
            fee_ceiling: self.fee_ceiling.unwrap_or(defaults.fee_ceiling),
        };
        if !(policy.fee_floor >= 1.0 && policy.fee_floor <= policy.fee_ceiling) {
            return Err(ConfigError(format!(
                "fee_floor {} and fee_ceiling {} must satisfy 1 <= floor <= ceiling",
                policy.fee_floor, policy.fee_ceiling
            )));
        }
        let bitcoind_rpc_url = self.bitcoind_rpc_url.unwrap_or_else(|| {
            format!(
                "http://127.0.0.1:{}/",
                indexer::config::default_rpc_port(network)
            )
        });
        indexer::config::check_no_credentials(&bitcoind_rpc_url, "bitcoind_rpc_url")
            .map_err(|e| ConfigError(e.to_string()))?;
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
            bitcoind_cookie_file: need(self.bitcoind_cookie_file, "bitcoind_cookie_file")?,
            // Capped at a day: far beyond any start, and clear of time arithmetic overflow.
            startup_wait: std::time::Duration::from_secs(
                self.startup_wait_secs.unwrap_or(60).min(86_400),
            ),
            db: need(self.db, "db")?,
            key_file: need(self.key_file, "key_file")?,
            token_file: need(self.token_file, "token_file")?,
            change,
            policy,
            metrics_listen: self.metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let file: FileConfig =
            toml::from_str(include_str!("../orchestrator.example.toml")).unwrap();
        // The one key the operator must fill in.
        let missing = file.clone().resolve().unwrap_err().to_string();
        assert!(missing.contains("change_address is required"), "{missing}");
        let mine = FileConfig {
            change_address: Some("bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq".into()),
            ..FileConfig::default()
        };
        let c = mine.or(file).resolve().unwrap();
        assert_eq!(c.network, Network::Bitcoin);
        assert_eq!(c.indexer, "http://127.0.0.1:50051");
        assert_eq!(c.policy.confirmations, 3);
    }
}
