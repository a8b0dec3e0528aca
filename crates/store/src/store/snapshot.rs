//! What a reader sees: a [`Snapshot`] is one redb read transaction, so lookups, scans and trees
//! all see the same state while writes continue; the store's own lookups each take one.

use std::sync::Arc;

use propd_merkle::{Entity, Property};
use redb::{ReadTransaction, ReadableDatabase};

use crate::config::ReadCheck;
use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::quarantine::{RotQueue, Rotten};
use crate::store::rows::{RowRead, damaged, decode_row, open_read, read_meta_snapshot, read_row};
use crate::tables::ShardTableNames;
use crate::validate::Rules;

/// A consistent read view of the store (a redb read transaction): scans, lookups and trees all see
/// the same state while writes continue.
pub struct Snapshot {
    pub(super) txn: ReadTransaction,
    pub(super) rules: Arc<Rules>,
    /// Where rotten rows met by this snapshot's reads are reported.
    pub(super) rot: Arc<RotQueue>,
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

    /// The stored copy of an entity (tombstones included). A copy that fails its check is
    /// reported to the store for quarantine and reads as absent.
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        let shard = self.rules.shard_of(entity)?;
        let names = ShardTableNames::new(entity.group(), shard);
        let Some(table) = open_read(&self.txn, names.props())? else {
            return Ok(None);
        };
        Ok(self.good(read_row(&table, &names, entity, self.rules.read_check)?))
    }

    /// The property of a row read, `None` when absent or rotten (reported for quarantine).
    pub(super) fn good(&self, read: RowRead) -> Option<Property> {
        match read {
            RowRead::Absent => None,
            RowRead::Good(property) => Some(property),
            RowRead::Rotten(rotten) => {
                self.rot.push(rotten);
                None
            }
        }
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
            check: self.rules.read_check,
            names,
            rot: Arc::clone(&self.rot),
            last_key: String::new(),
        })
    }
}

/// An iterator over one shard's properties in entity order, from a [`Snapshot`].
///
/// A row that fails its check is skipped and reported to the store for quarantine; a storage
/// failure is [`StoreError::Damaged`] and ends the scan.
pub struct ShardScan {
    rows: Option<redb::Range<'static, &'static str, &'static [u8]>>,
    names: ShardTableNames,
    check: ReadCheck,
    rot: Arc<RotQueue>,
    last_key: String,
}

impl std::fmt::Debug for ShardScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardScan")
            .field("table", &self.names.props)
            .finish_non_exhaustive()
    }
}

impl Iterator for ShardScan {
    type Item = Result<Property, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (key, value) = match self.rows.as_mut()?.next()? {
                Ok(row) => row,
                Err(error) => {
                    self.rows = None;
                    return Some(Err(damaged(&self.names.props, &self.last_key, error)));
                }
            };
            let (key, value) = (key.value(), value.value());
            self.last_key.clear();
            self.last_key.push_str(key);
            match decode_row(key, value, self.check) {
                Ok(property) => return Some(Ok(property)),
                Err(reason) => self.rot.push(Rotten::new(&self.names, key, value, reason)),
            }
        }
    }
}

impl RedbStore {
    /// A consistent read view of the whole store as of now; writes continue meanwhile.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            txn: self.database()?.begin_read()?,
            rules: Arc::clone(&self.rules),
            rot: Arc::clone(&self.rot),
        })
    }

    /// The stored copy of an entity (tombstones included), `None` if absent. A copy that fails
    /// its check is quarantined and reads as absent.
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        let found = self.guarded(|| self.snapshot()?.get(entity));
        self.settle_rot();
        found
    }

    /// The shard's revision: it increases with every change (its snapshot id).
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.snapshot()?.revision(group, shard)
    }
}
