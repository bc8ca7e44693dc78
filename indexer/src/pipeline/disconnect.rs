//! Disconnecting a block, the mirror of [`super::apply`]: from the tip's undo record and
//! the state a [`Reader`] shows, [`disconnect_tip`] works out what to write (every key back
//! to its value before the block, the wallets' balances and history, the transfers kept as
//! reorged out) and what to log; the store only commits it.
//!
//! Wallet balances and history are not in undo records: they follow from the scripts'
//! state and the wallets each script belongs to now. A wallet's balance moves by the
//! change of its scripts' balances, and the history entries of the block's transfers are
//! deleted for every wallet of their scripts. So a script added to a wallet after its
//! blocks were indexed leaves that wallet exact through any disconnect.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashSet};

use bitcoin::hashes::Hash;
use bitcoin::BlockHash;

use crate::store::recent::RecentChanges;
use crate::store::schema::{self, Cf, UndoEntry};
use crate::store::{Reader, Store, StoreError, Writes};
use crate::types::{Balance, Event, EventKind, WalletId};

/// What disconnecting the tip block changes.
pub struct Disconnected {
    /// The block's height.
    pub height: u32,
    /// The block's hash.
    pub hash: BlockHash,
    /// Every key it changes, to its value before the block.
    pub writes: Writes,
    /// What it adds to the event log: each transfer reorged out, then the block.
    pub events: Vec<Event>,
}

/// Works out how to disconnect the tip block `reader` shows, from its undo record.
pub fn disconnect_tip(reader: &impl Reader) -> Result<Disconnected, StoreError> {
    let (height, _) = reader.tip()?.ok_or(StoreError::Empty)?;
    let key = schema::height_key(height);
    let record = reader
        .get(Cf::Undo, &key)?
        .ok_or(StoreError::UndoMissing { height })?;
    let entries = schema::decode_undo(&record)?;
    let mut writes = Writes::new();
    let mut events = Vec::new();
    let recent = recent_changes(reader, &entries)?;
    let mut wallets: BTreeMap<WalletId, Balance> = BTreeMap::new();
    let mut put = |cf: Cf, key: &[u8], value: Option<Vec<u8>>| {
        writes.insert((cf, key.to_vec()), value);
    };
    // Restore in reverse: if a block touched a key twice, the first prior wins.
    for UndoEntry { cf, key, prior } in entries.iter().rev() {
        if *cf == Cf::ScriptBalance {
            let id = schema::decode_script_id(key)?;
            let now = reader.script_balance(&id)?;
            let before = prior
                .as_deref()
                .map(schema::decode_balance)
                .transpose()?
                .unwrap_or_default();
            for w in reader.watch(&id)?.map(|r| r.wallets).unwrap_or_default() {
                let b = match wallets.entry(w) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(e) => e.insert(reader.wallet_balance(w)?),
                };
                *b = b.moved(&now, &before).ok_or(StoreError::Inconsistent {
                    wallet: w.0,
                    height,
                })?;
            }
        }
        if *cf == Cf::Transfers {
            if let Some(value) = reader.get(Cf::Transfers, key)? {
                let t = schema::decode_transfer(key, &value)?;
                // Kept, so the transfer can still be asked about.
                put(
                    Cf::Reorged,
                    t.txid.as_byte_array(),
                    Some(schema::encode_reorged(&t).to_vec()),
                );
                let mut owners = BTreeSet::new();
                for id in t.script_ids() {
                    for w in reader.watch(&id)?.map(|r| r.wallets).unwrap_or_default() {
                        put(
                            Cf::WalletHistory,
                            &schema::history_key(w, t.height, &t.txid),
                            None,
                        );
                        owners.insert(w);
                    }
                }
                events.push(Event {
                    kind: EventKind::TransferReorgedOut,
                    height: t.height,
                    block_hash: t.block_hash,
                    txid: Some(t.txid),
                    wallets: owners.into_iter().collect(),
                });
            }
        }
        put(*cf, key, prior.clone());
    }
    recent.add_writes(reader, &mut writes)?;
    for (w, b) in &wallets {
        let value = (!b.is_empty()).then(|| schema::encode_balance(b).to_vec());
        writes.insert((Cf::WalletBalance, schema::wallet_key(*w).to_vec()), value);
    }
    writes.insert((Cf::Undo, key.to_vec()), None);
    let hash = reader
        .header(height)?
        .map(|h| h.block_hash())
        .ok_or(StoreError::Decode(schema::DecodeError::missing(
            "header of the tip",
        )))?;
    events.push(Event {
        kind: EventKind::BlockDisconnected,
        height,
        block_hash: hash,
        txid: None,
        wallets: Vec::new(),
    });
    Ok(Disconnected {
        height,
        hash,
        writes,
        events,
    })
}

/// A wallet's outputs by creation height follow its scripts' outputs, as its balance
/// does: from each output key's state now and before the block.
fn recent_changes(
    reader: &impl Reader,
    entries: &[UndoEntry],
) -> Result<RecentChanges, StoreError> {
    let mut recent = RecentChanges::default();
    let mut seen = HashSet::new();
    for UndoEntry { cf, key, prior } in entries {
        if *cf != Cf::ScriptUtxo || !seen.insert(key.clone()) {
            continue;
        }
        let id = schema::decode_script_id(&key[..32])?;
        let owners = reader.watch(&id)?.map(|r| r.wallets).unwrap_or_default();
        let mut apply = |bytes: &[u8], sign: i128| -> Result<(), StoreError> {
            let (value, height, coinbase) = schema::decode_script_utxo(bytes)?;
            for w in &owners {
                recent.add(*w, height, value, coinbase, sign);
            }
            Ok(())
        };
        if let Some(now) = reader.get(Cf::ScriptUtxo, key)? {
            apply(&now, -1)?;
        }
        if let Some(before) = prior {
            apply(before, 1)?;
        }
    }
    Ok(recent)
}

/// Disconnects the tip block in one atomic write; returns the new tip.
pub fn undo_tip(store: &Store, sync: bool) -> Result<Option<(u32, BlockHash)>, StoreError> {
    let d = disconnect_tip(store)?;
    store.commit_writes(&d.writes, &d.events, None, sync)?;
    store.tip()
}

/// Disconnects every block above `keep` (all of them for `None`), newest first, each
/// atomically; refuses before changing anything if an undo record is missing.
pub fn disconnect_above(store: &Store, keep: Option<u32>, sync: bool) -> Result<u32, StoreError> {
    let Some((tip, _)) = store.tip()? else {
        return Ok(0);
    };
    let lowest = keep.map_or(0, |k| k + 1);
    for height in (lowest..=tip).rev() {
        if store.get(Cf::Undo, &schema::height_key(height))?.is_none() {
            return Err(StoreError::UndoMissing { height });
        }
    }
    let mut count = 0;
    while store.tip()?.is_some_and(|(h, _)| h >= lowest) {
        undo_tip(store, sync)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitcoin::Network;

    #[test]
    fn disconnecting_an_empty_index_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Network::Regtest).unwrap();
        assert!(matches!(undo_tip(&store, false), Err(StoreError::Empty)));
        assert_eq!(disconnect_above(&store, None, false).unwrap(), 0);
    }
}
