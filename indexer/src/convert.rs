//! Between the query layer and the `indexer.v1` messages: one error-to-status mapping and
//! the message conversions, so the handlers stay thin.

use std::collections::BTreeMap;

use bitcoin::BlockHash;
use proto::indexer::v1 as pb;
use tonic::Status;

use crate::query::{
    QueryError, ReceivedEntry, ScriptInfo, SpentEntry, Target, TransferEntry, UtxoEntry,
};
use crate::types::{Event, EventKind, WalletId};

impl From<QueryError> for Status {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::UnknownWallet(_) => Status::not_found(e.to_string()),
            QueryError::Store(inner) => {
                tracing::error!(error = %inner, "database error while answering a query");
                Status::internal("database error; see the indexer's log")
            }
            QueryError::InvalidAddress { .. }
            | QueryError::WrongNetwork { .. }
            | QueryError::InvalidScript(_)
            | QueryError::InvalidTxid(_)
            | QueryError::BadRange { .. }
            | QueryError::BadPageToken
            | QueryError::FutureOffset { .. } => Status::invalid_argument(e.to_string()),
            QueryError::Pruned { .. } => Status::out_of_range(e.to_string()),
        }
    }
}

/// Longest wallet name.
pub const MAX_WALLET: usize = 64;
/// Longest address (bech32 allows 90 characters).
pub const MAX_ADDRESS: usize = 100;
/// Longest script, hex (consensus caps a script at 10,000 bytes).
pub const MAX_SCRIPT_HEX: usize = 20_000;
/// A txid or log id: 64 hex digits (log ids are 32).
pub const MAX_ID: usize = 64;
/// Longest page token this server issues, with room to spare.
pub const MAX_PAGE_TOKEN: usize = 256;
/// Longest descriptor.
pub const MAX_DESCRIPTOR: usize = 4096;
/// Most descriptors in one `AddWatch` (larger sets go in several calls).
pub const MAX_DESCRIPTORS: usize = 100_000;
/// Most scripts the descriptors of one `AddWatch` may expand to (ranged descriptors
/// derive `gap_limit` scripts a branch): bounds a call's memory and the follower's pause.
pub const MAX_SCRIPTS_PER_CALL: usize = 1_000_000;
/// Calls of `AddWatch` expanded or waiting for the follower at once; more wait their turn.
pub const MAX_ADDS_AT_ONCE: usize = 4;
/// Largest request the server decodes: room for [`MAX_DESCRIPTORS`] ranged xpub
/// descriptors (~150 bytes each), where tonic's default of 4 MiB does not hold 100,000
/// bech32 addresses.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Refuses a request field longer than `max` bytes, without echoing it.
pub fn bounded(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max}",
            value.len()
        )));
    }
    Ok(())
}

/// The query target of a request; exactly one field must be set.
pub fn target(t: Option<pb::Target>) -> Result<Target, Status> {
    use pb::target::Target as T;
    match t.and_then(|t| t.target) {
        Some(T::Wallet(w)) => bounded("wallet", &w, MAX_WALLET).map(|()| Target::Wallet(w)),
        Some(T::Address(a)) => bounded("address", &a, MAX_ADDRESS).map(|()| Target::Address(a)),
        Some(T::ScriptHex(h)) => {
            bounded("script_hex", &h, MAX_SCRIPT_HEX).map(|()| Target::ScriptHex(h))
        }
        None => Err(Status::invalid_argument(
            "target: set one of wallet, address, script_hex",
        )),
    }
}

/// A page token field: empty means the first page.
pub fn page_token(token: &str) -> Result<Option<&str>, Status> {
    bounded("page_token", token, MAX_PAGE_TOKEN)?;
    Ok((!token.is_empty()).then_some(token))
}

/// Tip height and display hash, as every response names them.
pub fn tip(tip: Option<(u32, BlockHash)>) -> (u32, String) {
    tip.map_or((0, String::new()), |(h, hash)| (h, hash_hex(&hash)))
}

/// An unspent output.
pub fn utxo(e: UtxoEntry) -> pb::Utxo {
    pb::Utxo {
        txid: hash_hex(&e.outpoint.txid),
        vout: e.outpoint.vout,
        value_sat: e.value,
        script_hex: e.script.to_hex_string(),
        address: e.address.map(|a| a.to_string()).unwrap_or_default(),
        height: e.height,
        confirmations: e.confirmations,
        coinbase: e.coinbase,
    }
}

fn script_fields(s: ScriptInfo) -> (String, String, Vec<String>) {
    (
        s.script.to_hex_string(),
        s.address.map(|a| a.to_string()).unwrap_or_default(),
        s.wallets,
    )
}

fn received(r: ReceivedEntry) -> pb::Received {
    let (script_hex, address, wallets) = script_fields(r.script);
    pb::Received {
        vout: r.vout,
        script_hex,
        address,
        value_sat: r.value,
        wallets,
    }
}

fn spent(s: SpentEntry) -> pb::Spent {
    let (script_hex, address, wallets) = script_fields(s.script);
    pb::Spent {
        input: s.input,
        prev_txid: hash_hex(&s.outpoint.txid),
        prev_vout: s.outpoint.vout,
        script_hex,
        address,
        value_sat: s.value,
        wallets,
    }
}

/// A confirmed transfer.
pub fn transfer(t: TransferEntry) -> pb::Transfer {
    pb::Transfer {
        txid: hash_hex(&t.txid),
        status: pb::TransferStatus::Confirmed.into(),
        height: t.height,
        block_hash: hash_hex(&t.block_hash),
        confirmations: t.confirmations,
        received: t.received.into_iter().map(received).collect(),
        spent: t.spent.into_iter().map(spent).collect(),
        replaced_by: String::new(),
    }
}

/// A txid or block hash in display order (as bitcoind's RPC shows it). Formatting through
/// `Display` was an eighth of the CPU of streaming events to 100 subscribers.
pub fn hash_hex<H: bitcoin::hashes::Hash<Bytes = [u8; 32]>>(hash: &H) -> String {
    let mut bytes = hash.to_byte_array();
    bytes.reverse();
    let mut out = [0u8; 64];
    hex::encode_to_slice(bytes, &mut out).expect("64 hex digits for 32 bytes");
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

/// An event of the log, with its offset; `names` names its wallets.
pub fn event(offset: u64, e: Event, names: &BTreeMap<WalletId, String>) -> pb::Event {
    let kind = match e.kind {
        EventKind::BlockConnected => pb::EventKind::BlockConnected,
        EventKind::BlockDisconnected => pb::EventKind::BlockDisconnected,
        EventKind::TransferConfirmed => pb::EventKind::TransferConfirmed,
        EventKind::TransferReorgedOut => pb::EventKind::TransferReorgedOut,
        EventKind::TransferSeen => pb::EventKind::TransferSeen,
        EventKind::TransferReplaced => pb::EventKind::TransferReplaced,
        EventKind::TransferEvicted => pb::EventKind::TransferEvicted,
    };
    pb::Event {
        offset,
        kind: kind.into(),
        height: e.height,
        block_hash: hash_hex(&e.block_hash),
        txid: e.txid.as_ref().map(hash_hex).unwrap_or_default(),
        wallets: e
            .wallets
            .iter()
            .filter_map(|w| names.get(w).cloned())
            .collect(),
    }
}

/// A backfill's status as the API shows it.
pub fn backfill(s: &crate::backfill::Status) -> pb::Backfill {
    use crate::backfill::State;
    let (state, failure) = match &s.state {
        State::Indexing => (pb::BackfillState::Indexing, String::new()),
        State::Merging => (pb::BackfillState::Merging, String::new()),
        State::Done => (pb::BackfillState::Done, String::new()),
        State::Failed(why) => (pb::BackfillState::Failed, why.clone()),
    };
    pb::Backfill {
        id: s.job.id,
        wallet: s.job.wallet.clone(),
        descriptors: s.job.descriptors.clone(),
        birth_height: s.job.birth,
        height: s.height,
        target_height: s.target,
        state: state.into(),
        failure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn hashes_are_hex_in_display_order() {
        let text = "000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f";
        let hash = BlockHash::from_str(text).unwrap();
        assert_eq!(hash_hex(&hash), text);
        assert_eq!(hash_hex(&hash), hash.to_string());
    }
}
