//! How the repair protocol sees the redb store: [`RepairStore`] over fresh snapshots for tree
//! reads and the write path for batches of copies.

use propd_merkle::{Entity, InnerNode, Leaf, NodeId, Property, Shape};

use crate::config::ReadCheck;
use crate::error::{StoreError, tree_error};
use crate::repair_view::{LeafKey, RepairOutcome, RepairStore, below_line};
use crate::store::RedbStore;
use crate::store::rows::{open_read, read_meta_snapshot, read_row};
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

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        RedbStore::repair_apply_batch(self, group, shard, batch)
    }
}
