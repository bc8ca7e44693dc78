//! Write stage: each group of blocks goes to RocksDB as one atomic batch holding the blocks'
//! data, their undo records and the new tip, so a crash leaves whole blocks or none.

use super::apply::BlockChanges;
use crate::store::schema::{self, Cf};
use crate::store::{Store, StoreError, Writes};
use crate::types::Event;

/// How the writer groups and keeps undo records.
#[derive(Clone, Copy, Debug)]
pub struct WriteOptions {
    /// Most blocks in one batch.
    pub max_blocks: usize,
    /// Batch size (bytes of writes) after which the group is committed.
    pub max_bytes: usize,
    /// Undo records kept, in blocks below the tip; `None` keeps all.
    pub undo_depth: Option<u32>,
    /// Events kept in the log; older ones are pruned. `None` keeps all.
    pub event_retention: Option<u64>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            max_blocks: 256,
            max_bytes: 32 << 20,
            undo_depth: None,
            event_retention: None,
        }
    }
}

/// Adds one block's undo record and undo pruning to `writes`.
fn add_undo(writes: &mut Writes, ch: &BlockChanges, undo_depth: Option<u32>) {
    let undo_key = schema::height_key(ch.height);
    writes.insert(
        (Cf::Undo, undo_key.to_vec()),
        Some(schema::encode_undo(&ch.undo)),
    );
    if let Some(depth) = undo_depth {
        if let Some(old) = ch.height.checked_sub(depth) {
            writes.insert((Cf::Undo, schema::height_key(old).to_vec()), None);
        }
    }
}

/// Commits a group of consecutive blocks atomically: their writes merged in key order (the
/// later block's value wins), each block's undo record, and their events appended to the
/// log.
pub fn commit_group(
    store: &Store,
    group: &mut [BlockChanges],
    opts: &WriteOptions,
) -> Result<(), StoreError> {
    let mut merged = Writes::new();
    let mut events = Vec::new();
    for ch in group.iter_mut() {
        // `extend` inserts one by one (later blocks win); `append` would re-merge the
        // whole accumulated map for every block.
        merged.extend(std::mem::take(&mut ch.writes));
        add_undo(&mut merged, ch, opts.undo_depth);
        events.append(&mut ch.events);
    }
    store.commit_writes(&merged, &events, opts.event_retention, false)?;
    Ok(())
}

/// Appends events that come with no block (mempool changes) to the log, at the tip.
pub fn commit_events(
    store: &Store,
    events: &[Event],
    opts: &WriteOptions,
) -> Result<(), StoreError> {
    store.commit_writes(&Writes::new(), events, opts.event_retention, false)?;
    Ok(())
}
