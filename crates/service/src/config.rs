//! Config helpers both services use: the layering of settings (defaults < config file <
//! environment < flags), one error type with the file and line at fault, TOML parsing that
//! names unknown keys, network names, and URLs that must not carry secrets.
//!
//! Each binary declares every setting once, in one struct that is at the same time the
//! config file's schema (serde) and its flags and variables (clap): every field an
//! `Option`, absent when not given, so that a layer above leaves the one below alone.
//! clap already puts a flag above its variable; [`layered`] puts both above the file.

use std::path::{Path, PathBuf};

use bitcoin::Network;
use figment::providers::Serialized;
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;

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

/// The settings of config file `file` (when one is given) with `given` (the flags and
/// variables that were set) laid over them. Unset fields must not serialize (mark the
/// struct `#[serde_with::skip_serializing_none]`), or they would erase the file's values.
pub fn layered<T>(file: Option<&Path>, given: &T) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let below = match file {
        Some(path) => read_toml(path)?,
        None => T::default(),
    };
    Figment::from(Serialized::defaults(below))
        .merge(Serialized::defaults(given))
        .extract()
        .map_err(|e| ConfigError::Invalid(format!("settings do not combine: {e}")))
}

/// Reads and parses config file `path` (see [`parse_toml`]).
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
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

/// The librdkafka settings of a `[kafka]` table: its `properties` and those of
/// `properties_file`, a file of `key=value` lines in Kafka's client.properties format
/// (`#` comments), for secrets such as `sasl.password`. Like every secret file it must be
/// readable by its owner only; a key in both places is refused (which one wins would be a
/// guess), and so is a key of `managed` (the service sets it itself).
pub fn kafka_properties(
    table: &std::collections::BTreeMap<String, String>,
    file: Option<&Path>,
    managed: &[&str],
    who: &str,
) -> Result<std::collections::BTreeMap<String, String>, ConfigError> {
    let mut all = table.clone();
    if let Some(path) = file {
        let text = crate::auth::read_secret_file("kafka.properties_file", path)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ConfigError::Invalid(format!(
                    "kafka.properties_file {}, line {}: not key=value",
                    path.display(),
                    n + 1
                )));
            };
            let key = key.trim().to_owned();
            if all.insert(key.clone(), value.trim().to_owned()).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "kafka property {key:?} is set both in [kafka.properties] and in {}: keep one",
                    path.display()
                )));
            }
        }
    }
    if let Some(k) = all.keys().find(|k| managed.contains(&k.as_str())) {
        return Err(ConfigError::Invalid(format!(
            "kafka property {k:?} is set by the {who}: remove it from the kafka properties"
        )));
    }
    Ok(all)
}

/// Refuses what is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-').
pub fn check_kafka_topic(topic: &str, key: &str) -> Result<(), ConfigError> {
    let valid = (1..=249).contains(&topic.len())
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{key} {topic:?} is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')"
    )))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[serde_with::skip_serializing_none]
    #[derive(Debug, Default, PartialEq, serde::Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        db: Option<PathBuf>,
        depth: Option<u64>,
        #[serde(default)]
        node: Node,
    }

    #[serde_with::skip_serializing_none]
    #[derive(Debug, Default, PartialEq, serde::Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct Node {
        url: Option<String>,
        rest: Option<bool>,
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn what_is_given_wins_over_the_file_key_by_key_in_nested_tables_too() {
        let (_dir, path) = file("db = \"/file\"\ndepth = 7\n[node]\nurl = \"u\"\nrest = true\n");
        let given = Settings {
            db: Some("/flag".into()),
            node: Node {
                rest: Some(false),
                ..Node::default()
            },
            ..Settings::default()
        };
        let s = layered(Some(&path), &given).unwrap();
        assert_eq!(
            s,
            Settings {
                db: Some("/flag".into()),
                depth: Some(7),
                node: Node {
                    url: Some("u".into()),
                    rest: Some(false)
                },
            }
        );
        assert_eq!(layered(None, &given).unwrap(), given);
    }

    #[test]
    fn a_bad_file_is_named_with_its_line_in_one_line() {
        let (_dir, path) = file("db = \"/a\"\n\ncolour = 1\n");
        let e = layered(Some(&path), &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("colour"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = layered(Some(Path::new("/nonexistent/c.toml")), &Settings::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.toml"), "{e}");
    }
}
