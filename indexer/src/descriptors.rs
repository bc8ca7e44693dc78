//! Output descriptors and addresses expanded to the scripts they watch: checked (checksum,
//! network, no hardened step after a public key, a bounded number of branches) before
//! anything is derived. Pure: no database, no I/O.

use std::str::FromStr;

use bitcoin::{Address, Network, NetworkKind, ScriptBuf};
use miniscript::descriptor::{checksum::desc_checksum, DescriptorPublicKey};
use miniscript::{Descriptor, ForEachKey};

/// A descriptor that cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The descriptor (or address) does not parse.
    #[error("invalid descriptor {descriptor:?}: {detail}")]
    Invalid {
        /// The text given.
        descriptor: String,
        /// What is wrong.
        detail: String,
    },
    /// The descriptor is valid but for another network.
    #[error("descriptor {descriptor:?} is not for {network}")]
    WrongNetwork {
        /// The text given.
        descriptor: String,
        /// The indexer's network.
        network: Network,
    },
    /// The checksum after `#` does not match.
    #[error("descriptor {descriptor:?}: checksum mismatch, expected #{expected}")]
    Checksum {
        /// The text given.
        descriptor: String,
        /// The right checksum.
        expected: String,
    },
}

/// A descriptor and the scripts it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expanded {
    /// The descriptor as given, without surrounding whitespace.
    pub descriptor: String,
    /// Its scripts; ranged descriptors are derived for indices `0..gap_limit`.
    pub scripts: Vec<ScriptBuf>,
    /// Whether it is one script given as such (`addr()`, `raw()`, a bare address), with no
    /// key to derive from.
    pub single: bool,
    /// For a ranged descriptor, the (branch, index) of each script, in `scripts`' order;
    /// empty otherwise.
    pub derivations: Vec<(u32, u32)>,
}

/// Expands a Bitcoin Core output descriptor (or a bare address) into scripts.
pub fn expand(text: &str, network: Network, gap_limit: u32) -> Result<Expanded, WatchError> {
    let descriptor = text.trim().to_string();
    let invalid = |detail: String| WatchError::Invalid {
        descriptor: descriptor.clone(),
        detail,
    };
    let body = strip_checksum(&descriptor)?;
    let single =
        inner(body, "addr").is_some() || inner(body, "raw").is_some() || !body.contains('(');
    let mut derivations = Vec::new();
    let scripts = if let Some(addr) = inner(body, "addr") {
        vec![address_script(addr, network, &descriptor)?]
    } else if let Some(hex) = inner(body, "raw") {
        vec![ScriptBuf::from_hex(hex).map_err(|e| invalid(format!("raw script hex: {e}")))?]
    } else if !body.contains('(') {
        vec![address_script(body, network, &descriptor)?]
    } else {
        let parsed = Descriptor::<DescriptorPublicKey>::from_str(&descriptor)
            .map_err(|e| invalid(e.to_string()))?;
        if parsed.for_any_key(hardened_from_public) {
            return Err(invalid(
                "a hardened step after an extended public key (`h` or `'`) needs the private key: use an xpub already derived past it".into(),
            ));
        }
        let wrong_kind = NetworkKind::from(network);
        if parsed.for_any_key(|k| key_network(k).is_some_and(|kind| kind != wrong_kind)) {
            return Err(WatchError::WrongNetwork {
                descriptor,
                network,
            });
        }
        let singles = parsed
            .into_single_descriptors()
            .map_err(|e| invalid(e.to_string()))?;
        // Each branch is derived gap_limit times: a descriptor of a thousand branches would
        // make one request watch millions of scripts.
        if singles.len() > MAX_BRANCHES {
            return Err(invalid(format!(
                "{} multipath branches; at most {MAX_BRANCHES}",
                singles.len()
            )));
        }
        let mut scripts = Vec::new();
        for (branch, single) in singles.iter().enumerate() {
            let ranged = single.has_wildcard();
            let count = if ranged { gap_limit } else { 1 };
            for index in 0..count {
                let definite = single
                    .at_derivation_index(index)
                    .map_err(|e| invalid(format!("index {index}: {e}")))?;
                scripts.push(definite.script_pubkey());
                if ranged {
                    derivations.push((branch as u32, index));
                }
            }
        }
        scripts
    };
    Ok(Expanded {
        descriptor,
        scripts,
        single,
        derivations,
    })
}

/// Most multipath branches (`<0;1;...>`) in one descriptor.
pub const MAX_BRANCHES: usize = 8;

/// The scripts of branch `branch` of ranged descriptor `text` at indices `indices`: what
/// the look-ahead derives when a script near the end of what is watched is paid.
pub fn derive(
    text: &str,
    branch: u32,
    indices: std::ops::Range<u32>,
) -> Result<Vec<ScriptBuf>, WatchError> {
    let invalid = |detail: String| WatchError::Invalid {
        descriptor: text.to_owned(),
        detail,
    };
    let parsed = Descriptor::<DescriptorPublicKey>::from_str(text.trim())
        .map_err(|e| invalid(e.to_string()))?;
    let singles = parsed
        .into_single_descriptors()
        .map_err(|e| invalid(e.to_string()))?;
    let single = singles
        .get(branch as usize)
        .ok_or_else(|| invalid(format!("no branch {branch}")))?;
    indices
        .map(|i| {
            single
                .at_derivation_index(i)
                .map(|d| d.script_pubkey())
                .map_err(|e| invalid(format!("index {i}: {e}")))
        })
        .collect()
}

/// Verifies and removes a trailing `#checksum`.
fn strip_checksum(descriptor: &str) -> Result<&str, WatchError> {
    let Some((body, given)) = descriptor.rsplit_once('#') else {
        return Ok(descriptor);
    };
    let expected = desc_checksum(body).map_err(|e| WatchError::Invalid {
        descriptor: descriptor.to_string(),
        detail: e.to_string(),
    })?;
    if expected != given {
        return Err(WatchError::Checksum {
            descriptor: descriptor.to_string(),
            expected,
        });
    }
    Ok(body)
}

/// The argument of `name(...)`, if `text` is that form.
fn inner<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.strip_prefix(name)?
        .strip_prefix('(')?
        .strip_suffix(')')
}

fn address_script(addr: &str, network: Network, descriptor: &str) -> Result<ScriptBuf, WatchError> {
    let unchecked = Address::from_str(addr).map_err(|e| WatchError::Invalid {
        descriptor: descriptor.to_string(),
        detail: format!("address: {e}"),
    })?;
    let checked = unchecked
        .require_network(network)
        .map_err(|_| WatchError::WrongNetwork {
            descriptor: descriptor.to_string(),
            network,
        })?;
    Ok(checked.script_pubkey())
}

/// Whether an extended public key is derived with a hardened step (or a hardened
/// wildcard): impossible without the private key. Found by fuzzing: miniscript 12 panics
/// deriving `xpub/<0;1h>/*` instead of returning an error.
fn hardened_from_public(key: &DescriptorPublicKey) -> bool {
    use miniscript::descriptor::Wildcard;
    let hardened = |p: &bitcoin::bip32::DerivationPath| p.into_iter().any(|c| c.is_hardened());
    match key {
        DescriptorPublicKey::Single(_) => false,
        DescriptorPublicKey::XPub(x) => {
            hardened(&x.derivation_path) || x.wildcard == Wildcard::Hardened
        }
        DescriptorPublicKey::MultiXPub(x) => {
            x.derivation_paths.paths().iter().any(hardened) || x.wildcard == Wildcard::Hardened
        }
    }
}

/// The network kind an extended key is for; single keys belong to every network.
fn key_network(key: &DescriptorPublicKey) -> Option<NetworkKind> {
    match key {
        DescriptorPublicKey::Single(_) => None,
        DescriptorPublicKey::XPub(x) => Some(x.xkey.network),
        DescriptorPublicKey::MultiXPub(x) => Some(x.xkey.network),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const XPUB: &str = "xpub6ERApfZwUNrhLCkDtcHTcxd75RbzS1ed54G1LkBUHQVHQKqhMkhgbmJbZRkrgZw4koxb5JaHWkY4ALHY2grBGRjaDMzQLcgJvLJuZZvRcEL";

    #[test]
    fn addresses_and_raw_scripts() {
        let e = expand(
            "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
            Network::Bitcoin,
            20,
        )
        .unwrap();
        assert_eq!(
            e.scripts[0].to_hex_string(),
            "0014e8df018c7e326cc253faac7e46cdc51e68542c42"
        );
        let same = expand(
            "addr(bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq)",
            Network::Bitcoin,
            20,
        )
        .unwrap();
        assert_eq!(same.scripts, e.scripts);
        let raw = expand("raw(6a0568656c6c6f)", Network::Bitcoin, 20).unwrap();
        assert_eq!(raw.scripts[0].to_hex_string(), "6a0568656c6c6f");
    }

    #[test]
    fn wrong_network_is_refused() {
        let err = expand(
            "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq",
            Network::Regtest,
            20,
        )
        .unwrap_err();
        assert!(matches!(err, WatchError::WrongNetwork { .. }), "{err}");
        let err = expand(&format!("wpkh({XPUB}/0/*)"), Network::Testnet, 3).unwrap_err();
        assert!(matches!(err, WatchError::WrongNetwork { .. }), "{err}");
    }

    #[test]
    fn ranged_descriptors_derive_to_the_gap_limit() {
        let e = expand(&format!("wpkh({XPUB}/0/*)"), Network::Bitcoin, 5).unwrap();
        assert_eq!(e.scripts.len(), 5);
        let multi = expand(&format!("tr({XPUB}/<0;1>/*)"), Network::Bitcoin, 4).unwrap();
        assert_eq!(multi.scripts.len(), 8);
        assert!(multi.scripts.iter().all(|s| s.is_p2tr()));
    }

    #[test]
    fn checksums_are_verified() {
        let body = "raw(51)";
        let sum = desc_checksum(body).unwrap();
        assert!(expand(&format!("{body}#{sum}"), Network::Bitcoin, 1).is_ok());
        let err = expand(&format!("{body}#aaaaaaaa"), Network::Bitcoin, 1).unwrap_err();
        assert!(matches!(err, WatchError::Checksum { .. }), "{err}");
    }

    #[test]
    fn a_hardened_step_after_an_xpub_is_refused_not_a_panic() {
        for bad in [
            format!("tr({XPUB}/<0;1h>/*)"),
            format!("wpkh({XPUB}/1'/*)"),
            format!("wpkh({XPUB}/0/*h)"),
        ] {
            let err = expand(&bad, Network::Bitcoin, 3).unwrap_err();
            assert!(
                err.to_string().contains("needs the private key"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_descriptor_of_too_many_branches_is_refused() {
        let many: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        let bad = format!("wpkh({XPUB}/<{}>/*)", many.join(";"));
        let err = expand(&bad, Network::Bitcoin, 3).unwrap_err();
        assert!(err.to_string().contains("9 multipath branches"), "{err}");
        assert_eq!(
            expand(
                &format!("wpkh({XPUB}/<0;1;2;3;4;5;6;7>/*)"),
                Network::Bitcoin,
                2
            )
            .unwrap()
            .scripts
            .len(),
            16
        );
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for bad in ["wpkh(nonsense)", "raw(zz)", "addr(1111)", "pkh("] {
            let err = expand(bad, Network::Bitcoin, 1).unwrap_err();
            assert!(
                err.to_string().contains("invalid descriptor"),
                "{bad}: {err}"
            );
        }
    }
}
