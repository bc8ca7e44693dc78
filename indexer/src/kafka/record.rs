//! What one event of the log becomes on the topic (docs/kafka.md): the `indexer.v1.Event`
//! bytes Subscribe sends, keyed by the network for block events and by wallet for transfer
//! events (one record per wallet, so each wallet's events keep their order in one
//! partition), with headers a consumer can route and deduplicate on without decoding.

use std::collections::BTreeMap;

use prost::Message;

use crate::convert;
use crate::types::{Event, WalletId};

/// One Kafka record, before it is produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The partitioning key.
    pub key: String,
    /// `indexer.v1.Event`, protobuf-encoded.
    pub value: Vec<u8>,
    /// `log_id`, `log_offset`, `kind`, `height`, `block_hash`, and `wallet` on transfer
    /// records, each as text.
    pub headers: Vec<(&'static str, String)>,
}

/// The records of the event at `offset` of log `log_id` on `network`; `names` names the
/// wallets.
pub fn records(
    log_id: &str,
    network: &str,
    offset: u64,
    event: Event,
    names: &BTreeMap<WalletId, String>,
) -> Vec<Record> {
    let wallets: Vec<String> = event
        .wallets
        .iter()
        .filter_map(|w| names.get(w).cloned())
        .collect();
    let pb = convert::event(offset, event, names);
    let value = pb.encode_to_vec();
    let headers = vec![
        ("log_id", log_id.to_owned()),
        ("log_offset", offset.to_string()),
        ("kind", pb.kind.to_string()),
        ("height", pb.height.to_string()),
        ("block_hash", pb.block_hash.clone()),
    ];
    if wallets.is_empty() {
        // Block events, and transfer events logged before events named their wallets.
        return vec![Record {
            key: network.to_owned(),
            value,
            headers,
        }];
    }
    wallets
        .into_iter()
        .map(|wallet| {
            let mut headers = headers.clone();
            headers.push(("wallet", wallet.clone()));
            Record {
                key: wallet,
                value: value.clone(),
                headers,
            }
        })
        .collect()
}

/// The header of a chunk's end marker: every event below it is on the topic.
pub const EXPORTED_TO: &str = "exported_to";

/// The marker that ends a chunk, one per partition: no key, no value, headers `log_id` and
/// `exported_to`. Consumers skip records without `log_offset`.
pub fn marker(log_id: &str, next: u64) -> Record {
    Record {
        key: String::new(),
        value: Vec::new(),
        headers: vec![
            ("log_id", log_id.to_owned()),
            (EXPORTED_TO, next.to_string()),
        ],
    }
}

/// The value of header `name` of a record of log `log_id` (`None`: another log's record,
/// or no such header).
pub fn header_of<'a>(
    log_id: &str,
    name: &str,
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Option<u64> {
    let (mut ours, mut value) = (false, None);
    for (key, v) in headers {
        if key == "log_id" {
            ours = v == log_id.as_bytes();
        } else if key == name {
            value = std::str::from_utf8(v).ok()?.parse().ok();
        }
    }
    value.filter(|_| ours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::EventKind;
    use bitcoin::hashes::Hash;
    use proto::indexer::v1 as pb;

    fn names() -> BTreeMap<WalletId, String> {
        BTreeMap::from([(WalletId(1), "hot".into()), (WalletId(2), "cold".into())])
    }

    #[test]
    fn a_transfer_of_two_wallets_is_a_record_for_each_keyed_by_wallet() {
        let event = Event {
            kind: EventKind::TransferConfirmed,
            height: 9,
            block_hash: bitcoin::BlockHash::from_byte_array([3; 32]),
            txid: Some(bitcoin::Txid::from_byte_array([4; 32])),
            wallets: vec![WalletId(1), WalletId(2)],
        };
        let r = records("L", "regtest", 41, event, &names());
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].key.as_str(), r[1].key.as_str()), ("hot", "cold"));
        let decoded = pb::Event::decode(&r[0].value[..]).unwrap();
        assert_eq!(decoded.offset, 41);
        assert_eq!(decoded.wallets, ["hot", "cold"]);
        assert_eq!(r[0].value, r[1].value);
        let header = |i: usize, k: &str| {
            r[i].headers
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(header(0, "log_offset").as_deref(), Some("41"));
        assert_eq!(header(0, "log_id").as_deref(), Some("L"));
        assert_eq!(header(0, "kind").as_deref(), Some("3"));
        assert_eq!(header(1, "wallet").as_deref(), Some("cold"));
        let headers = r[1].headers.iter().map(|(k, v)| (*k, v.as_bytes()));
        assert_eq!(header_of("L", "log_offset", headers.clone()), Some(41));
        assert_eq!(header_of("other log", "log_offset", headers), None);
        let m = marker("L", 42);
        let headers = m.headers.iter().map(|(k, v)| (*k, v.as_bytes()));
        assert_eq!(header_of("L", EXPORTED_TO, headers.clone()), Some(42));
        assert_eq!(header_of("L", "log_offset", headers), None);
    }

    #[test]
    fn a_block_event_is_one_record_keyed_by_the_network() {
        let event = Event {
            kind: EventKind::BlockConnected,
            height: 9,
            block_hash: bitcoin::BlockHash::from_byte_array([3; 32]),
            txid: None,
            wallets: Vec::new(),
        };
        let r = records("L", "regtest", 0, event, &names());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].key, "regtest");
        assert!(r[0].headers.iter().all(|(k, _)| *k != "wallet"));
    }
}
