//! How the repair protocol sees the redb store: [`RepairStore`] over fresh snapshots for tree
//! reads and the write path for batches of copies.

use propd_merkle::{Entity, InnerNode, Leaf, NodeId, Property, Shape};

use crate::config::ReadCheck;
use crate::error::{StoreError, tree_error};
use crate::repair_view::{LeafKey, RepairOutcome, RepairStore, below_line};
use crate::store::RedbStore;
use crate::store::quarantine::Rotten;
use crate::store::rows::{RowRead, damaged, decode_row, open_read, read_meta_snapshot, read_row};
use crate::tables::ShardTableNames;

impl RepairStore for RedbStore {
    type Error = StoreError;

    fn shape(&self) -> Shape {
        self.rules.shape
    }

    fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.rules.groups.has_shard(group, shard)
    }

    fn tree_node(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Option<InnerNode>, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        let inner = snapshot
            .live_tree(group, shard)?
            .node(node)
            .map_err(tree_error)?;
        Ok(inner.non_empty())
    }

    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        snapshot
            .live_tree(group, shard)?
            .children(node)
            .map_err(tree_error)
    }

    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        // Flushing first keeps the common case a plain range read of the leaf table.
        let leaves = self.guarded(|| {
            self.fresh_snapshot(group, shard)?
                .leaves_under(group, shard, node, after, limit)
        });
        self.settle_rot();
        leaves
    }

    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, StoreError> {
        self.rules.check_members(entities, group, shard)?;
        // Copies are checked whatever `read_check` says: a rotten copy is never sent.
        let copies = self.guarded(|| {
            let snapshot = self.snapshot()?;
            let names = ShardTableNames::new(group, shard);
            let Some(table) = open_read(&snapshot.txn, names.props())? else {
                return Ok(vec![None; entities.len()]);
            };
            // A tombstone below the purge line is never sent: it reads as absent.
            let purged_below = read_meta_snapshot(&snapshot.txn, group, shard)?.purged_below;
            entities
                .iter()
                .map(|entity| {
                    let row = snapshot.good(read_row(&table, &names, entity, ReadCheck::On)?);
                    Ok(row.filter(|property| !below_line(property, purged_below)))
                })
                .collect()
        });
        self.settle_rot();
        copies
    }

    fn properties_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, StoreError> {
        use std::ops::Bound;
        // Copies are checked whatever `read_check` says, as in `get_many`: a rotten row is
        // skipped (quarantined), never sent.
        let copies = self.guarded(|| {
            let snapshot = self.snapshot()?;
            let names = ShardTableNames::new(group, shard);
            let Some(table) = open_read(&snapshot.txn, names.props())? else {
                return Ok(Vec::new());
            };
            // A tombstone below the purge line is never sent: it reads as absent.
            let purged_below = read_meta_snapshot(&snapshot.txn, group, shard)?.purged_below;
            let start = after.map_or(Bound::Unbounded, |entity| Bound::Excluded(entity.as_str()));
            let mut found = Vec::new();
            let mut last_key = String::new();
            // One range read of the property rows, in key order.
            for row in table.range::<&str>((start, Bound::Unbounded))? {
                if found.len() >= limit {
                    break;
                }
                let (key, value) = row.map_err(|error| damaged(&names.props, &last_key, error))?;
                let (key, value) = (key.value(), value.value());
                last_key.clear();
                last_key.push_str(key);
                let read = match decode_row(key, value, ReadCheck::On) {
                    Ok(property) => RowRead::Good(property),
                    Err(reason) => RowRead::Rotten(Rotten::new(&names, key, value, reason)),
                };
                if let Some(property) = snapshot.good(read)
                    && !below_line(&property, purged_below)
                {
                    found.push(property);
                }
            }
            Ok(found)
        });
        self.settle_rot();
        copies
    }

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        RedbStore::repair_apply_batch(self, group, shard, batch)
    }
}
