//! Rows that failed their check: how a reader reports one, and how the store moves it out of the
//! way. A rotten row is never served, sent or used to build a tree; it is copied into the
//! `quarantine` table for inspection, removed from its shard with its leaf (so the shard's tree
//! no longer claims it, and the next repair brings the good copy back from a peer), and counted.
//!
//! Readers see the database through a read transaction and cannot move anything, so they report
//! what they find to the store's [`RotQueue`]; the store quarantines the reported rows in a
//! write transaction after the read ([`RedbStore::settle_rot`]). A writer that meets a rotten row
//! quarantines it in its own transaction.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use propd_merkle::Entity;
use redb::ReadableTable;

use crate::codec::{decode_quarantined, encode_quarantined};
use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::rows::open_read;
use crate::store::writer::ShardWriter;
use crate::tables::{QUARANTINE, ShardTableNames};

/// A property row whose bytes failed their check digest or could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rotten {
    pub(crate) group: String,
    pub(crate) shard: u32,
    /// The row's key as stored.
    pub(crate) key: String,
    /// The row's bytes as found.
    pub(crate) row: Vec<u8>,
    /// Why it failed.
    pub(crate) reason: String,
}

impl Rotten {
    fn log(&self, message: &str) {
        tracing::warn!(
            group = self.group,
            shard = self.shard,
            key = self.key,
            reason = self.reason,
            "{message}"
        );
    }

    pub(super) fn new(names: &ShardTableNames, key: &str, row: &[u8], reason: String) -> Self {
        Rotten {
            group: names.group.clone(),
            shard: names.shard,
            key: key.to_owned(),
            row: row.to_vec(),
            reason,
        }
    }
}

/// Rotten rows found by readers, waiting to be quarantined, and the count of rows quarantined
/// since the store was opened.
#[derive(Debug, Default)]
pub(crate) struct RotQueue {
    any: AtomicBool,
    rows: Mutex<Vec<Rotten>>,
    quarantined: AtomicU64,
}

impl RotQueue {
    /// Reports a rotten row (logged once here, where it was found).
    pub(crate) fn push(&self, rotten: Rotten) {
        rotten.log("a stored property row failed its check; it is treated as absent");
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rotten);
        self.any.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<Rotten> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.rows.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A row kept in the quarantine table, as [`RedbStore::quarantined`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantinedRow {
    /// The group of the shard it was found in.
    pub group: String,
    /// The shard it was found in.
    pub shard: u32,
    /// The row's key (the entity, unless the key itself was damaged).
    pub key: String,
    /// Why it was quarantined.
    pub reason: String,
    /// The row's bytes exactly as they were found (docs/formats.md, "Property rows").
    pub row: Vec<u8>,
}

impl ShardWriter<'_> {
    /// Moves a rotten row out of the shard in this transaction: a copy into the quarantine
    /// table, the row and its leaf removed, the revision bumped (so the next verification
    /// rebuilds the tree even when the key was damaged and no leaf could be named). Does
    /// nothing when the row changed since it was found (a write replaced it).
    pub(super) fn quarantine(&mut self, rotten: &Rotten) -> Result<bool, StoreError> {
        let current = self
            .props
            .get(rotten.key.as_str())?
            .map(|guard| guard.value().to_vec());
        if current.as_deref() != Some(rotten.row.as_slice()) {
            return Ok(false);
        }
        self.txn.open_table(QUARANTINE)?.insert(
            (rotten.group.as_str(), rotten.shard, rotten.key.as_str()),
            encode_quarantined(&rotten.reason, &rotten.row).as_slice(),
        )?;
        match Entity::parse(&rotten.key) {
            Ok(entity) => self.remove(&entity)?,
            Err(_) => {
                self.props.remove(rotten.key.as_str())?;
                self.bump();
            }
        }
        self.rot.quarantined.fetch_add(1, Ordering::Relaxed);
        rotten.log("quarantined a rotten property row; the next repair brings the good copy back");
        Ok(true)
    }
}

impl RedbStore {
    /// Quarantines the rows readers reported rotten since the last call, one write transaction
    /// per shard. A failure is logged, not returned: the rows stay where they are, are still
    /// never served (every read checks them), and are reported again by the next read or scrub.
    pub(super) fn settle_rot(&self) {
        let mut found = self.rot.take();
        if found.is_empty() {
            return;
        }
        found.sort_by(|a, b| (&a.group, a.shard, &a.key).cmp(&(&b.group, b.shard, &b.key)));
        found.dedup_by(|a, b| (&a.group, a.shard, &a.key) == (&b.group, b.shard, &b.key));
        for shard_rows in found.chunk_by(|a, b| (&a.group, a.shard) == (&b.group, b.shard)) {
            let (group, shard) = (&shard_rows[0].group, shard_rows[0].shard);
            let moved = self.write_shard(group, shard, |writer| {
                let mut moved = 0;
                for rotten in shard_rows {
                    moved += usize::from(writer.quarantine(rotten)?);
                }
                Ok(moved)
            });
            if let Err(error) = moved {
                tracing::error!(group, shard, %error, "quarantining rotten rows failed");
            }
        }
    }

    /// How many rows this store quarantined since it was opened.
    pub fn quarantined_since_open(&self) -> u64 {
        self.rot.quarantined.load(Ordering::Relaxed)
    }

    /// Every row kept in the quarantine table, in (group, shard, key) order.
    pub fn quarantined(&self) -> Result<Vec<QuarantinedRow>, StoreError> {
        let snapshot = self.snapshot()?;
        let Some(table) = open_read(&snapshot.txn, QUARANTINE)? else {
            return Ok(Vec::new());
        };
        let mut rows = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (group, shard, row_key) = key.value();
            let (reason, row) =
                decode_quarantined(value.value()).map_err(|error| StoreError::Corrupt {
                    table: "quarantine".to_owned(),
                    detail: format!("{group}/{shard} {row_key:?}: {}", error.0),
                })?;
            rows.push(QuarantinedRow {
                group: group.to_owned(),
                shard,
                key: row_key.to_owned(),
                reason,
                row,
            });
        }
        Ok(rows)
    }

    /// How many rows the quarantine table holds.
    pub fn quarantined_count(&self) -> Result<u64, StoreError> {
        let snapshot = self.snapshot()?;
        match open_read(&snapshot.txn, QUARANTINE)? {
            Some(table) => Ok(redb::ReadableTableMetadata::len(&table)?),
            None => Ok(0),
        }
    }
}
