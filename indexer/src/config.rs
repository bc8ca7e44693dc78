//! Settings, parsed once into a typed struct: command-line flags and `INDEXER_*` variables
//! first, then the TOML config file, then defaults.

use std::path::{Path, PathBuf};

use bitcoin::Network;
use serde::Deserialize;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("reading config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for these settings.
    #[error("config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range or unknown.
    #[error("{0}")]
    Invalid(String),
}

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
    /// Events kept in the event log (absent: all).
    pub event_retention: Option<u64>,
}

impl FileConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
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
            event_retention: self.event_retention.or(other.event_retention),
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
    /// Events kept in the event log (`None`: all).
    pub event_retention: Option<u64>,
}

/// Parses a network name as the CLI and config take it.
pub fn parse_network(name: &str) -> Result<Network, ConfigError> {
    match name {
        "mainnet" | "bitcoin" | "main" => Ok(Network::Bitcoin),
        "testnet3" | "testnet" | "test" => Ok(Network::Testnet),
        "testnet4" => Ok(Network::Testnet4),
        "signet" => Ok(Network::Signet),
        "regtest" => Ok(Network::Regtest),
        other => Err(ConfigError::Invalid(format!(
            "unknown network {other:?}: use mainnet, testnet3, testnet4, signet or regtest"
        ))),
    }
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
        Ok(Config {
            db: c.db.unwrap_or_else(|| PathBuf::from("indexer-db")),
            network,
            bloom_capacity: c.bloom_capacity.unwrap_or(1_000_000),
            bloom_fp_rate,
            undo_depth: c.undo_depth,
            gap_limit,
            grpc_token_file: c.grpc_token_file,
            event_retention: c.event_retention,
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
}
