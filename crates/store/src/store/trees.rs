//! A shard's tree as readers see it: the live tree of a snapshot with its leaf log applied in
//! memory, a rebuild from the snapshot's rows, leaves under a node, and the store's tree reads,
//! which flush a pending leaf log first so that they are fresh.

use propd_merkle::{
    Entity, InnerNode, Leaf, LeafKey, LiveError, LiveTree, NodeId, Shape, Tree, snapshot,
};
use redb::ReadableTableMetadata;

use crate::codec::{decode_digest, open_row};
use crate::error::{ConfigError, StoreError, tree_error};
use crate::repair_view::page_after;
use crate::store::RedbStore;
use crate::store::quarantine::Rotten;
use crate::store::rows::{build_from_rows, open_read, read_log};
use crate::store::snapshot::Snapshot;
use crate::tables::ShardTableNames;
use crate::tree_store::SnapshotTree;

/// A shard's tree as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeView {
    /// The tree shape.
    pub shape: Shape,
    /// The shard's revision the view was read at.
    pub revision: u64,
    /// The root digest and leaf count.
    pub root: InnerNode,
    /// The non-empty slots (level-1 nodes), by index.
    pub slots: Vec<(NodeId, InnerNode)>,
}

impl Snapshot {
    /// Whether the shard's tree has leaf changes waiting for a flush.
    pub(super) fn has_pending(&self, group: &str, shard: u32) -> Result<bool, StoreError> {
        self.has_log(&ShardTableNames::new(group, shard))
    }

    fn has_log(&self, names: &ShardTableNames) -> Result<bool, StoreError> {
        match open_read(&self.txn, names.log())? {
            Some(table) => Ok(!table.is_empty()?),
            None => Ok(false),
        }
    }

    /// The shard's live tree in this snapshot, its leaf log applied and the nodes above the
    /// changes recomputed in memory.
    pub(super) fn live_tree(
        &self,
        group: &str,
        shard: u32,
    ) -> Result<LiveTree<SnapshotTree>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        let storage = SnapshotTree {
            leaves: open_read(&self.txn, names.leaves())?,
            nodes: open_read(&self.txn, names.nodes())?,
            leaves_name: names.leaves.clone(),
            nodes_name: names.nodes.clone(),
            leaf_overlay: Default::default(),
            inner_overlay: Default::default(),
        };
        let mut tree = LiveTree::new(self.rules.shape, storage).map_err(ConfigError::Shape)?;
        if let Some(log) = open_read(&self.txn, names.log())? {
            for (entity, digest) in read_log(&log, &names.log)? {
                match digest {
                    Some(digest) => tree.upsert(&entity, digest).map(drop),
                    None => tree.remove(&entity).map(drop),
                }
                .map_err(tree_error)?;
            }
        }
        tree.flush().map_err(tree_error)?;
        Ok(tree)
    }

    /// The shard's live tree as of this snapshot (fresh digests).
    pub fn tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.live_tree(group, shard)?.to_tree().map_err(tree_error)
    }

    /// The shard's live tree as of this snapshot, in the merkle snapshot file format.
    pub fn export_tree(&self, group: &str, shard: u32) -> Result<Vec<u8>, StoreError> {
        Ok(snapshot::encode(&self.tree(group, shard)?))
    }

    /// A tree built from scratch from a scan of the shard's properties in this snapshot. Rows
    /// that fail their check are left out and reported to the store for quarantine.
    pub fn rebuild_tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        let (tree, _) = self.rebuild_checked(group, shard, &mut |rotten| self.rot.push(rotten))?;
        Ok(tree)
    }

    /// A rebuild that hands rotten rows to `rotten`; returns the tree and the bytes read.
    pub(super) fn rebuild_checked(
        &self,
        group: &str,
        shard: u32,
        rotten: &mut dyn FnMut(Rotten),
    ) -> Result<(Tree, u64), StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        match open_read(&self.txn, names.props())? {
            Some(table) => build_from_rows(self.rules.shape, &table, &names, rotten),
            None => Ok((
                Tree::empty(self.rules.shape).map_err(ConfigError::Shape)?,
                0,
            )),
        }
    }

    /// Leaves under a node in `(bucket, entity)` order after `after`, at most `limit` (fewer
    /// only at the end), each checked against its property row: a leaf whose row is absent or
    /// fails its check is left out (a rotten row is reported to the store for quarantine), and
    /// every leaf carries the digest of its row's stored bytes. So a repair never lists, and a
    /// peer never keeps, a copy this node could not send.
    pub fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        let names = ShardTableNames::new(group, shard);
        let props = open_read(&self.txn, names.props())?;
        let mut checked = Vec::new();
        let mut cursor = after.cloned();
        while checked.len() < limit {
            let want = limit - checked.len();
            let page = self.tree_leaves_under(group, shard, node, cursor.as_ref(), want)?;
            let full = page.len() == want;
            cursor = page.last().map(LeafKey::of);
            let Some(props) = &props else {
                break;
            };
            for mut leaf in page {
                let key = leaf.entity.as_str();
                let Some(row) = props.get(key)? else {
                    continue;
                };
                match open_row(key, row.value()) {
                    Ok(canonical) => {
                        leaf.digest = self.rules.shape.digest(canonical);
                        checked.push(leaf);
                    }
                    Err(error) => self
                        .rot
                        .push(Rotten::new(&names, key, row.value(), error.0)),
                }
            }
            if !full {
                break;
            }
        }
        Ok(checked)
    }

    /// The tree's leaves under a node after `after`, at most `limit`, as the tree holds them.
    fn tree_leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let shape = self.rules.shape;
        if !shape.contains(node) {
            return Err(StoreError::Tree(LiveError::NoSuchNode { node }));
        }
        let buckets = shape.bucket_range(node);
        let names = ShardTableNames::new(group, shard);
        if self.has_log(&names)? {
            // Leaf changes are still in the log: read the leaves through the snapshot's tree,
            // which applies them in memory.
            let leaves = self
                .live_tree(group, shard)?
                .leaves_under(node)
                .map_err(tree_error)?;
            return Ok(page_after(leaves, after, limit));
        }
        let Some(table) = open_read(&self.txn, names.leaves())? else {
            return Ok(Vec::new());
        };
        let lower = match after {
            Some(after) if after.bucket >= buckets.end => return Ok(Vec::new()),
            Some(after) if after.bucket >= buckets.start => {
                std::ops::Bound::Excluded((after.bucket, after.entity.as_str()))
            }
            _ => std::ops::Bound::Included((buckets.start, "")),
        };
        let upper = std::ops::Bound::Excluded((buckets.end, ""));
        let mut leaves = Vec::new();
        if limit == 0 {
            return Ok(leaves);
        }
        for row in table.range::<(u64, &str)>((lower, upper))? {
            let (key, value) = row?;
            let (bucket, text) = key.value();
            let entity = Entity::parse(text).map_err(|error| StoreError::Corrupt {
                table: names.leaves.clone(),
                detail: format!("leaf key {text:?}: {error}"),
            })?;
            let digest = decode_digest(value.value()).map_err(|error| StoreError::Corrupt {
                table: names.leaves.clone(),
                detail: error.0,
            })?;
            leaves.push(Leaf {
                bucket,
                entity,
                digest,
            });
            if leaves.len() >= limit {
                break;
            }
        }
        Ok(leaves)
    }
}

impl RedbStore {
    /// A snapshot in which the shard's leaf log is empty or short: flushes first when the current
    /// state has pending leaf changes. (Changes that race in are applied in memory by the
    /// snapshot's own tree reads.)
    pub(super) fn fresh_snapshot(&self, group: &str, shard: u32) -> Result<Snapshot, StoreError> {
        self.rules.check_shard(group, shard)?;
        let snapshot = self.snapshot()?;
        if snapshot.has_pending(group, shard)? {
            drop(snapshot);
            self.flush(group, shard)?;
            return self.snapshot();
        }
        Ok(snapshot)
    }

    /// The shard's tree for the admin view: root, revision and the non-empty slots.
    pub fn tree_view(&self, group: &str, shard: u32) -> Result<TreeView, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        let tree = snapshot.live_tree(group, shard)?;
        Ok(TreeView {
            shape: self.rules.shape,
            revision: snapshot.revision(group, shard)?,
            root: tree.root().map_err(tree_error)?,
            slots: tree.children(NodeId::ROOT).map_err(tree_error)?,
        })
    }

    /// The shard's whole live tree, fresh.
    pub fn tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.fresh_snapshot(group, shard)?.tree(group, shard)
    }

    /// The shard's live tree in the merkle snapshot file format.
    pub fn export_tree(&self, group: &str, shard: u32) -> Result<Vec<u8>, StoreError> {
        Ok(snapshot::encode(&self.tree(group, shard)?))
    }
}
