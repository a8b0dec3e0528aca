//! The small storage trait the live tree persists itself through, and its in-memory
//! implementation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::Range;

use crate::digest::Digest;
use crate::entity::Entity;
use crate::position::NodeId;

/// A stored inner node (any level from the root down to the buckets): its digest and the number
/// of leaves under it. Empty nodes are not stored; they read as [`InnerNode::empty`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InnerNode {
    /// The node's digest.
    pub digest: Digest,
    /// The leaves under the node.
    pub leaf_count: u64,
}

impl InnerNode {
    /// The node of an empty subtree: the empty digest (`width` zero bytes) and no leaves.
    pub fn empty(width: usize) -> Self {
        InnerNode {
            digest: Digest::zero(width),
            leaf_count: 0,
        }
    }

    /// Whether no leaf is under the node.
    pub fn is_empty(&self) -> bool {
        self.leaf_count == 0
    }

    /// The node, or `None` when no leaf is under it (how [`crate::RepairStore::tree_node`]
    /// answers for an empty subtree).
    pub fn non_empty(self) -> Option<Self> {
        (!self.is_empty()).then_some(self)
    }
}

/// Where a [`crate::LiveTree`] keeps its leaves and inner nodes. The store implements it over redb
/// tables; [`MemStorage`] keeps everything in memory. The dirty set is not the storage's: the live
/// tree keeps it in memory from a leaf change to the flush that recomputes it.
///
/// Leaves are keyed by `(bucket index, entity)` and iterate in that order. Inner nodes are keyed
/// by [`NodeId`] (level, index) and only non-empty ones are stored.
pub trait TreeStorage {
    /// The storage's error.
    type Error: std::error::Error + 'static;

    /// The digest of a leaf, if stored.
    fn get_leaf(&self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, Self::Error>;
    /// Stores a leaf; returns the digest it replaced.
    fn put_leaf(
        &mut self,
        bucket: u64,
        entity: &Entity,
        digest: Digest,
    ) -> Result<Option<Digest>, Self::Error>;
    /// Removes a leaf; returns its digest if it was stored.
    fn remove_leaf(&mut self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, Self::Error>;
    /// Calls `visit(bucket, entity, digest)` for every leaf whose bucket is in `buckets`, in
    /// `(bucket, entity bytes)` order.
    fn visit_leaves(
        &self,
        buckets: Range<u64>,
        visit: &mut dyn FnMut(u64, &Entity, Digest),
    ) -> Result<(), Self::Error>;

    /// A stored inner node (`None` when empty).
    fn get_inner(&self, node: NodeId) -> Result<Option<InnerNode>, Self::Error>;
    /// Stores a non-empty inner node.
    fn put_inner(&mut self, node: NodeId, inner: InnerNode) -> Result<(), Self::Error>;
    /// Removes an inner node that became empty.
    fn remove_inner(&mut self, node: NodeId) -> Result<(), Self::Error>;
    /// Calls `visit(node, inner)` for every stored node of `level` whose index is in `indexes`,
    /// in index order.
    fn visit_inner(
        &self,
        level: u32,
        indexes: Range<u64>,
        visit: &mut dyn FnMut(NodeId, InnerNode),
    ) -> Result<(), Self::Error>;
}

/// A [`TreeStorage`] in memory, over `BTreeMap`s. Cannot fail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemStorage {
    leaves: BTreeMap<u64, BTreeMap<Entity, Digest>>,
    inner: BTreeMap<NodeId, InnerNode>,
}

impl MemStorage {
    /// An empty storage (the same as `MemStorage::default()`).
    pub fn new() -> Self {
        MemStorage::default()
    }

    /// The number of stored leaves.
    pub fn leaf_count(&self) -> usize {
        self.leaves.values().map(BTreeMap::len).sum()
    }
}

impl TreeStorage for MemStorage {
    type Error = Infallible;

    fn get_leaf(&self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, Infallible> {
        Ok(self
            .leaves
            .get(&bucket)
            .and_then(|leaves| leaves.get(entity))
            .copied())
    }

    fn put_leaf(
        &mut self,
        bucket: u64,
        entity: &Entity,
        digest: Digest,
    ) -> Result<Option<Digest>, Infallible> {
        let leaves = self.leaves.entry(bucket).or_default();
        if let Some(slot) = leaves.get_mut(entity) {
            return Ok(Some(std::mem::replace(slot, digest)));
        }
        leaves.insert(entity.clone(), digest);
        Ok(None)
    }

    fn remove_leaf(&mut self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, Infallible> {
        let Some(leaves) = self.leaves.get_mut(&bucket) else {
            return Ok(None);
        };
        let removed = leaves.remove(entity);
        if leaves.is_empty() {
            self.leaves.remove(&bucket);
        }
        Ok(removed)
    }

    fn visit_leaves(
        &self,
        buckets: Range<u64>,
        visit: &mut dyn FnMut(u64, &Entity, Digest),
    ) -> Result<(), Infallible> {
        for (&bucket, leaves) in self.leaves.range(buckets) {
            for (entity, digest) in leaves {
                visit(bucket, entity, *digest);
            }
        }
        Ok(())
    }

    fn get_inner(&self, node: NodeId) -> Result<Option<InnerNode>, Infallible> {
        Ok(self.inner.get(&node).copied())
    }

    fn put_inner(&mut self, node: NodeId, inner: InnerNode) -> Result<(), Infallible> {
        self.inner.insert(node, inner);
        Ok(())
    }

    fn remove_inner(&mut self, node: NodeId) -> Result<(), Infallible> {
        self.inner.remove(&node);
        Ok(())
    }

    fn visit_inner(
        &self,
        level: u32,
        indexes: Range<u64>,
        visit: &mut dyn FnMut(NodeId, InnerNode),
    ) -> Result<(), Infallible> {
        let Some(range) = NodeId::level_range(level, indexes) else {
            return Ok(());
        };
        for (&node, &inner) in self.inner.range(range) {
            visit(node, inner);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a repair store answers for a subtree: nothing when it is empty, the node otherwise.
    #[test]
    fn only_a_node_with_leaves_is_non_empty() {
        let empty = InnerNode::empty(16);
        assert!(empty.is_empty());
        assert_eq!(empty.non_empty(), None);
        let node = InnerNode {
            digest: Digest::zero(16),
            leaf_count: 1,
        };
        assert!(!node.is_empty());
        assert_eq!(node.non_empty(), Some(node));
    }

    /// The storage contract on the in-memory storage: what each call returns, what it keeps,
    /// and what the visits see, in order and within their range.
    #[test]
    fn mem_storage_keeps_replaces_removes_and_visits_in_order() {
        let shape = crate::Shape::default();
        let (one, two) = (shape.digest(b"1"), shape.digest(b"2"));
        let entity = |id: &str| Entity::new("g", "n", id).expect("valid");
        let mut storage = MemStorage::new();
        assert_eq!(storage.get_leaf(3, &entity("a")), Ok(None));
        assert_eq!(storage.put_leaf(3, &entity("a"), one), Ok(None));
        assert_eq!(storage.put_leaf(3, &entity("a"), two), Ok(Some(one)));
        assert_eq!(storage.get_leaf(3, &entity("a")), Ok(Some(two)));
        assert_eq!(storage.get_leaf(4, &entity("a")), Ok(None));
        assert_eq!(storage.put_leaf(3, &entity("b"), one), Ok(None));
        assert_eq!(storage.put_leaf(7, &entity("c"), one), Ok(None));
        assert_eq!(storage.put_leaf(1, &entity("d"), two), Ok(None));
        assert_eq!(storage.leaf_count(), 4);

        let mut seen = Vec::new();
        storage
            .visit_leaves(2..8, &mut |bucket, entity, digest| {
                seen.push((bucket, entity.clone(), digest));
            })
            .expect("infallible");
        assert_eq!(
            seen,
            vec![
                (3, entity("a"), two),
                (3, entity("b"), one),
                (7, entity("c"), one)
            ]
        );

        assert_eq!(storage.remove_leaf(3, &entity("a")), Ok(Some(two)));
        assert_eq!(storage.remove_leaf(3, &entity("a")), Ok(None));
        assert_eq!(storage.remove_leaf(9, &entity("a")), Ok(None));
        assert_eq!(storage.leaf_count(), 3);

        let node = |level, index| NodeId { level, index };
        let inner = |leaf_count| InnerNode {
            digest: one,
            leaf_count,
        };
        assert_eq!(storage.get_inner(node(1, 2)), Ok(None));
        storage.put_inner(node(1, 2), inner(2)).expect("infallible");
        storage.put_inner(node(1, 5), inner(5)).expect("infallible");
        storage.put_inner(node(2, 3), inner(3)).expect("infallible");
        assert_eq!(storage.get_inner(node(1, 2)), Ok(Some(inner(2))));
        let mut visited = Vec::new();
        storage
            .visit_inner(1, 0..5, &mut |id, node| visited.push((id, node.leaf_count)))
            .expect("infallible");
        assert_eq!(visited, vec![(node(1, 2), 2)], "level 1, indexes 0..5");
        storage.remove_inner(node(1, 2)).expect("infallible");
        assert_eq!(storage.get_inner(node(1, 2)), Ok(None));
        assert_eq!(storage.get_inner(node(1, 5)), Ok(Some(inner(5))));
    }
}
