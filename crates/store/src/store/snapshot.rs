//! What a reader sees: a [`Snapshot`] is one redb read transaction, so lookups, scans and trees
//! all see the same state while writes continue; the store's own lookups each take one.

use std::sync::Arc;

use propd_merkle::{Entity, Property};
use redb::{ReadTransaction, ReadableDatabase};

use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::rows::{decode_row, open_read, read_meta_snapshot, read_row};
use crate::tables::ShardTableNames;
use crate::validate::Rules;

/// A consistent read view of the store (a redb read transaction): scans, lookups and trees all see
/// the same state while writes continue.
pub struct Snapshot {
    pub(super) txn: ReadTransaction,
    pub(super) rules: Arc<Rules>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The shard's revision in this snapshot.
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.rules.check_shard(group, shard)?;
        Ok(read_meta_snapshot(&self.txn, group, shard)?.revision)
    }

    /// The stored copy of an entity (tombstones included).
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        let shard = self.rules.shard_of(entity)?;
        let names = ShardTableNames::new(entity.group(), shard);
        let Some(table) = open_read(&self.txn, names.props())? else {
            return Ok(None);
        };
        read_row(&table, &names.props, entity)
    }

    /// Every property of the shard (tombstones included) in entity order.
    pub fn scan(&self, group: &str, shard: u32) -> Result<ShardScan, StoreError> {
        self.scan_after(group, shard, None)
    }

    /// The shard's properties in entity order, starting strictly after `after` (for paging).
    pub fn scan_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
    ) -> Result<ShardScan, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        let rows = match open_read(&self.txn, names.props())? {
            Some(table) => Some(match after {
                Some(after) => table.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                ))?,
                None => table.range::<&str>(..)?,
            }),
            None => None,
        };
        Ok(ShardScan {
            rows,
            table: names.props,
        })
    }
}

/// An iterator over one shard's properties in entity order, from a [`Snapshot`].
pub struct ShardScan {
    rows: Option<redb::Range<'static, &'static str, &'static [u8]>>,
    table: String,
}

impl std::fmt::Debug for ShardScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardScan")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Iterator for ShardScan {
    type Item = Result<Property, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let row = self.rows.as_mut()?.next()?;
        Some(match row {
            Ok((key, value)) => decode_row(&self.table, key.value(), value.value()),
            Err(error) => Err(error.into()),
        })
    }
}

impl RedbStore {
    /// A consistent read view of the whole store as of now; writes continue meanwhile.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            txn: self.db.begin_read()?,
            rules: Arc::clone(&self.rules),
        })
    }

    /// The stored copy of an entity (tombstones included), `None` if absent.
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        self.snapshot()?.get(entity)
    }

    /// The shard's revision: it increases with every change (its snapshot id).
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.snapshot()?.revision(group, shard)
    }
}
