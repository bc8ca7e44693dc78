//! Watching by address and descriptor against published vectors.
//!
//! Scenarios:
//! 1. every address of Bitcoin Core's key_io_valid.json (from `../shared/fixtures/vectors`)
//!    expands, bare and as `addr()`, to its scriptPubKey on its own network, and is refused
//!    with a network error on the other kind of network.
//! 2. BIP84's account xpub (the "abandon ... about" mnemonic) derives its published first
//!    receive address through `wpkh(xpub/0/*)`.

#![allow(clippy::unwrap_used)]

use bitcoin::base58;
use bitcoin::Network;
use indexer::descriptors::{expand, WatchError};
use system_tests::fixtures::fixture;

fn network(chain: &str) -> Network {
    match chain {
        "main" => Network::Bitcoin,
        "testnet4" => Network::Testnet4,
        "signet" => Network::Signet,
        "regtest" => Network::Regtest,
        other => panic!("unknown chain {other}"),
    }
}

#[test]
fn core_key_io_vectors_expand_to_their_scripts() {
    let path = fixture("vectors/acinq-bitcoin-kmp/src/commonTest/resources/data/key_io_valid.json");
    let vectors: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for v in &vectors {
        let meta = &v[2];
        if meta["isPrivkey"].as_bool() == Some(true) {
            continue;
        }
        let (addr, script) = (v[0].as_str().unwrap(), v[1].as_str().unwrap());
        let net = network(meta["chain"].as_str().unwrap());
        for text in [addr.to_string(), format!("addr({addr})")] {
            let e = expand(&text, net, 1).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(e.scripts.len(), 1);
            assert_eq!(e.scripts[0].to_hex_string(), script, "{text}");
        }
        let other = if net == Network::Bitcoin {
            Network::Testnet4
        } else {
            Network::Bitcoin
        };
        let err = expand(addr, other, 1).unwrap_err();
        assert!(
            matches!(err, WatchError::WrongNetwork { .. }),
            "{addr} on {other}: {err}"
        );
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} address vectors");
}

#[test]
fn bip84_account_derives_its_published_first_address() {
    // BIP84 test vector, account 0, given as a zpub; descriptors take the same key with
    // xpub version bytes.
    let zpub = "zpub6rFR7y4Q2AijBEqTUquhVz398htDFrtymD9xYYfG1m4wAcvPhXNfE3EfH1r1ADqtfSdVCToUG868RvUUkgDKf31mGDtKsAYz2oz2AGutZYs";
    let mut raw = base58::decode_check(zpub).unwrap();
    raw[..4].copy_from_slice(&[0x04, 0x88, 0xb2, 0x1e]);
    let xpub = base58::encode_check(&raw);
    let e = expand(&format!("wpkh({xpub}/0/*)"), Network::Bitcoin, 2).unwrap();
    let first = bitcoin::Address::from_script(&e.scripts[0], Network::Bitcoin).unwrap();
    assert_eq!(
        first.to_string(),
        "bc1qcr8te4kr609gcawutmrza0j4xv80jy8z306fyu"
    );
    let second = bitcoin::Address::from_script(&e.scripts[1], Network::Bitcoin).unwrap();
    assert_eq!(
        second.to_string(),
        "bc1qnjg0jd8228aq7egyzacy8cys3knf9xvrerkf9g"
    );
}
