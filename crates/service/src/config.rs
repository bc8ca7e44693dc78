//! Config helpers both services use: one error type with the file and line at fault, TOML
//! parsing that names unknown keys, network names, and URLs that must not carry secrets.

use std::path::{Path, PathBuf};

use bitcoin::Network;

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
    #[error("config file {}{}: {message}", path.display(), line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line at fault, when known.
        line: Option<usize>,
        /// What is wrong (for an unknown key: the keys there are).
        message: String,
    },
    /// A value is out of range or unknown.
    #[error("{0}")]
    Invalid(String),
}

/// Parses the text of config file `path`; a failure names the file, the line and the
/// problem in one line (no source excerpt), as an operator's log wants it.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        message: e.message().trim().to_owned(),
    })
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

/// Refuses a URL with a user or password in it: URLs appear in logs and error messages.
pub fn check_no_credentials(url: &str, key: &str) -> Result<(), ConfigError> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(ConfigError::Invalid(format!(
            "{key} must not hold credentials (they would show in logs): use a cookie file, \
             or a user with a password file"
        )));
    }
    Ok(())
}
