//! The incremental tree: leaf updates mark their bucket dirty; a flush recomputes only the dirty
//! buckets and their ancestors. The tree keeps its dirty set itself, in memory: it lives from the
//! first leaf change to the flush that recomputes it, so no storage has to keep one.

use std::collections::BTreeSet;
use std::convert::Infallible;

use crate::build::{Leaf, Tree};
use crate::digest::{Digest, NodeHasher};
use crate::entity::Entity;
use crate::position::NodeId;
use crate::shape::{Shape, ShapeError};
use crate::storage::{InnerNode, TreeStorage};

/// An error of the live tree: its storage failed, or the request does not fit the tree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LiveError<E: std::error::Error + 'static> {
    /// The storage failed.
    #[error("tree storage failed: {0}")]
    Storage(#[source] E),
    /// A read needs a flushed tree but dirty nodes are pending; call [`LiveTree::flush`].
    #[error("the tree has dirty nodes; flush it before reading inner digests")]
    NotFlushed,
    /// The node does not exist in a tree of this shape.
    #[error("node {node} does not exist in this tree shape")]
    NoSuchNode {
        /// The rejected node.
        node: NodeId,
    },
    /// A leaf digest has another width than the shape's.
    #[error("leaf digest is {found} bytes wide, the shape says digest_width = {expected}")]
    DigestWidth {
        /// The shape's digest width.
        expected: usize,
        /// The given digest's width.
        found: usize,
    },
}

impl<E: std::error::Error + 'static> LiveError<E> {
    /// Separates a failure of the storage from the tree's own: `Err` with the storage's error for
    /// [`LiveError::Storage`], `Ok` with the same error over no storage otherwise, so that a
    /// caller can keep the tree's error as a typed source whatever its storage is.
    pub fn split_storage(self) -> std::result::Result<LiveError<Infallible>, E> {
        match self {
            LiveError::Storage(error) => Err(error),
            LiveError::NotFlushed => Ok(LiveError::NotFlushed),
            LiveError::NoSuchNode { node } => Ok(LiveError::NoSuchNode { node }),
            LiveError::DigestWidth { expected, found } => {
                Ok(LiveError::DigestWidth { expected, found })
            }
        }
    }
}

/// The incremental Merkle tree of one (group, shard) over a [`TreeStorage`].
///
/// [`LiveTree::upsert`] and [`LiveTree::remove`] change one leaf and mark its bucket dirty: no
/// digest is recomputed. [`LiveTree::flush`] recomputes the dirty buckets and their ancestors,
/// bottom-up, and nothing else. The readers of inner digests ([`LiveTree::root`],
/// [`LiveTree::node`], [`LiveTree::children`], [`LiveTree::to_tree`]) take `&self` and require a
/// flushed tree: they return [`LiveError::NotFlushed`] rather than a stale digest.
///
/// The dirty set (the buckets changed since the last flush) is the tree's own and lives in
/// memory; [`LiveTree::into_storage`] before a flush drops it with the tree.
#[derive(Debug, Clone)]
pub struct LiveTree<S> {
    shape: Shape,
    storage: S,
    dirty: BTreeSet<NodeId>,
}

type Result<T, S> = std::result::Result<T, LiveError<<S as TreeStorage>::Error>>;

impl<S: TreeStorage> LiveTree<S> {
    /// A live tree of a valid shape over some storage (empty or holding a tree of this shape).
    pub fn new(shape: Shape, storage: S) -> std::result::Result<Self, ShapeError> {
        shape.validate()?;
        Ok(LiveTree {
            shape,
            storage,
            dirty: BTreeSet::new(),
        })
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The storage.
    pub fn storage(&self) -> &S {
        &self.storage
    }

    /// The storage, mutably (for a caller that batches its own writes).
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.storage
    }

    /// Gives the storage back.
    pub fn into_storage(self) -> S {
        self.storage
    }

    /// Inserts or updates a leaf and marks its bucket dirty when the digest changed. Returns the
    /// digest it replaced.
    pub fn upsert(&mut self, entity: &Entity, digest: Digest) -> Result<Option<Digest>, S> {
        if digest.width() != self.shape.width() {
            return Err(LiveError::DigestWidth {
                expected: self.shape.width(),
                found: digest.width(),
            });
        }
        let bucket = self.shape.bucket_of(entity);
        let previous = self
            .storage
            .put_leaf(bucket.index, entity, digest)
            .map_err(LiveError::Storage)?;
        if previous != Some(digest) {
            self.dirty.insert(bucket);
        }
        Ok(previous)
    }

    /// Removes a leaf and marks its bucket dirty if it existed. Returns its digest.
    pub fn remove(&mut self, entity: &Entity) -> Result<Option<Digest>, S> {
        let bucket = self.shape.bucket_of(entity);
        let removed = self
            .storage
            .remove_leaf(bucket.index, entity)
            .map_err(LiveError::Storage)?;
        if removed.is_some() {
            self.dirty.insert(bucket);
        }
        Ok(removed)
    }

    /// The digest of one leaf, if present (needs no flush).
    pub fn leaf(&self, entity: &Entity) -> Result<Option<Digest>, S> {
        let bucket = self.shape.bucket_of(entity);
        self.storage
            .get_leaf(bucket.index, entity)
            .map_err(LiveError::Storage)
    }

    /// Whether no dirty node is pending.
    pub fn is_flushed(&self) -> Result<bool, S> {
        Ok(self.dirty.is_empty())
    }

    /// Recomputes the dirty nodes and their ancestors, deepest level first, then clears the dirty
    /// set. Returns the number of nodes recomputed (0 for a clean tree).
    pub fn flush(&mut self) -> Result<usize, S> {
        if self.dirty.is_empty() {
            return Ok(0);
        }
        let bucket_level = self.shape.bucket_level();
        let mut by_level: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); bucket_level as usize + 1];
        // Only `upsert` and `remove` mark nodes, with buckets of this shape.
        for node in &self.dirty {
            by_level[node.level as usize].insert(node.index);
        }
        let mut recomputed = 0;
        for level in (0..=bucket_level).rev() {
            let indexes = std::mem::take(&mut by_level[level as usize]);
            for index in indexes {
                let node = NodeId { level, index };
                let inner = if level == bucket_level {
                    self.hash_bucket(index)?
                } else {
                    self.hash_inner(node)?
                };
                if inner.is_empty() {
                    self.storage
                        .remove_inner(node)
                        .map_err(LiveError::Storage)?;
                } else {
                    self.storage
                        .put_inner(node, inner)
                        .map_err(LiveError::Storage)?;
                }
                recomputed += 1;
                if let Some(parent) = self.shape.parent(node) {
                    by_level[parent.level as usize].insert(parent.index);
                }
            }
        }
        self.dirty.clear();
        Ok(recomputed)
    }

    fn hash_bucket(&self, index: u64) -> Result<InnerNode, S> {
        let mut hasher = NodeHasher::bucket(self.shape.algorithm, self.shape.width());
        self.storage
            .visit_leaves(index..index + 1, &mut |_, entity, digest| {
                hasher.push_leaf(entity, &digest)
            })
            .map_err(LiveError::Storage)?;
        let (digest, leaf_count) = hasher.finish();
        Ok(InnerNode { digest, leaf_count })
    }

    fn hash_inner(&self, node: NodeId) -> Result<InnerNode, S> {
        let mut hasher = NodeHasher::inner(self.shape.algorithm, self.shape.width());
        let shape = self.shape;
        self.storage
            .visit_inner(
                node.level + 1,
                shape.child_range(node),
                &mut |child, inner| {
                    hasher.push_child(shape.child_position(child), &inner.digest, inner.leaf_count)
                },
            )
            .map_err(LiveError::Storage)?;
        let (digest, leaf_count) = hasher.finish();
        Ok(InnerNode { digest, leaf_count })
    }

    fn require_flushed(&self) -> Result<(), S> {
        if !self.dirty.is_empty() {
            return Err(LiveError::NotFlushed);
        }
        Ok(())
    }

    /// The root (requires a flushed tree).
    pub fn root(&self) -> Result<InnerNode, S> {
        self.node(NodeId::ROOT)
    }

    /// The number of leaves (requires a flushed tree).
    pub fn leaf_count(&self) -> Result<u64, S> {
        Ok(self.root()?.leaf_count)
    }

    /// One inner node, [`InnerNode::empty`] when no leaf is under it (requires a flushed tree).
    pub fn node(&self, node: NodeId) -> Result<InnerNode, S> {
        if !self.shape.contains(node) {
            return Err(LiveError::NoSuchNode { node });
        }
        self.require_flushed()?;
        let stored = self.storage.get_inner(node).map_err(LiveError::Storage)?;
        Ok(stored.unwrap_or_else(|| InnerNode::empty(self.shape.width())))
    }

    /// The non-empty children of a node in index order; empty for a bucket (requires a flushed
    /// tree).
    pub fn children(&self, node: NodeId) -> Result<Vec<(NodeId, InnerNode)>, S> {
        if !self.shape.contains(node) {
            return Err(LiveError::NoSuchNode { node });
        }
        self.require_flushed()?;
        let mut children = Vec::new();
        self.storage
            .visit_inner(
                node.level + 1,
                self.shape.child_range(node),
                &mut |child, inner| children.push((child, inner)),
            )
            .map_err(LiveError::Storage)?;
        Ok(children)
    }

    /// The leaves under a node in `(bucket, entity)` order, by one range iteration (needs no
    /// flush: leaves are always current).
    pub fn leaves_under(&self, node: NodeId) -> Result<Vec<Leaf>, S> {
        if !self.shape.contains(node) {
            return Err(LiveError::NoSuchNode { node });
        }
        let mut leaves = Vec::new();
        self.storage
            .visit_leaves(
                self.shape.bucket_range(node),
                &mut |bucket, entity, digest| {
                    leaves.push(Leaf {
                        bucket,
                        entity: entity.clone(),
                        digest,
                    })
                },
            )
            .map_err(LiveError::Storage)?;
        Ok(leaves)
    }

    /// Exports the whole tree, with the inner digests as stored (requires a flushed tree). An
    /// exported tree equals the one [`crate::TreeBuilder`] builds from the same leaves.
    pub fn to_tree(&self) -> Result<Tree, S> {
        self.require_flushed()?;
        let leaves = self.leaves_under(NodeId::ROOT)?;
        let mut levels = Vec::with_capacity(self.shape.bucket_level() as usize + 1);
        for level in 0..=self.shape.bucket_level() {
            let mut nodes = Vec::new();
            self.storage
                .visit_inner(
                    level,
                    0..self.shape.level_width(level),
                    &mut |node, inner| nodes.push((node.index, inner)),
                )
                .map_err(LiveError::Storage)?;
            levels.push(nodes);
        }
        Ok(Tree::from_parts(self.shape, levels, leaves))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::TreeBuilder;
    use crate::shape::strategies::small_shape;
    use crate::storage::MemStorage;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn entity(i: u32) -> Entity {
        Entity::new("g", "n", &format!("id-{i}")).expect("valid")
    }

    #[test]
    fn split_storage_keeps_the_storage_error_apart() {
        let storage: LiveError<std::fmt::Error> = LiveError::Storage(std::fmt::Error);
        assert!(matches!(storage.split_storage(), Err(std::fmt::Error)));
        let node = NodeId { level: 9, index: 1 };
        let own: LiveError<std::fmt::Error> = LiveError::NoSuchNode { node };
        assert!(matches!(
            own.split_storage(),
            Ok(LiveError::NoSuchNode { node: found }) if found == node
        ));
    }

    #[test]
    fn updates_mark_dirty_and_flush_recomputes_the_path_only() {
        let shape = Shape::default();
        let mut tree = LiveTree::new(shape, MemStorage::new()).expect("valid shape");
        assert!(tree.is_flushed().expect("no storage error"));
        assert_eq!(
            tree.root().expect("empty tree is flushed"),
            InnerNode::empty(16)
        );
        for i in 0..100 {
            tree.upsert(&entity(i), shape.digest(&i.to_le_bytes()))
                .expect("upsert");
        }
        assert!(!tree.is_flushed().expect("no storage error"));
        assert!(matches!(tree.root(), Err(LiveError::NotFlushed)));
        tree.flush().expect("flush");
        assert!(tree.is_flushed().expect("no storage error"));
        assert_eq!(tree.leaf_count().expect("flushed"), 100);
        let before = tree.root().expect("flushed");
        // One changed leaf recomputes exactly one node per level.
        tree.upsert(&entity(7), shape.digest(b"new"))
            .expect("upsert");
        assert_eq!(
            tree.flush().expect("flush"),
            shape.bucket_level() as usize + 1
        );
        assert_ne!(tree.root().expect("flushed").digest, before.digest);
        // Writing the same digest again changes nothing.
        tree.upsert(&entity(7), shape.digest(b"new"))
            .expect("upsert");
        assert_eq!(tree.flush().expect("flush"), 0);
        // Removing every leaf leaves the empty tree and no stored inner node.
        for i in 0..100 {
            assert!(tree.remove(&entity(i)).expect("remove").is_some());
        }
        assert_eq!(tree.remove(&entity(0)).expect("remove"), None);
        tree.flush().expect("flush");
        assert_eq!(tree.root().expect("flushed"), InnerNode::empty(16));
        assert_eq!(tree.storage(), &MemStorage::new());
    }

    #[test]
    fn reads_are_scoped_to_the_shape() {
        let reference = LiveTree::new(Shape::reference(), MemStorage::new()).expect("valid");
        assert_eq!(reference.shape(), &Shape::reference());
        let shape = Shape::default();
        let mut tree = LiveTree::new(shape, MemStorage::new()).expect("valid shape");
        let e = entity(1);
        tree.upsert(&e, shape.digest(b"x")).expect("upsert");
        tree.flush().expect("flush");
        let bucket = shape.bucket_of(&e);
        let slot = shape.ancestor(bucket, 1);
        assert_eq!(
            tree.children(NodeId::ROOT).expect("flushed"),
            vec![(slot, tree.node(slot).expect("flushed"))]
        );
        assert_eq!(tree.leaves_under(slot).expect("leaves").len(), 1);
        assert_eq!(tree.leaves_under(bucket).expect("leaves")[0].entity, e);
        assert_eq!(tree.leaf(&e).expect("leaf"), Some(shape.digest(b"x")));
        assert!(matches!(
            tree.node(NodeId::new(9, 0)),
            Err(LiveError::NoSuchNode { .. })
        ));
        assert!(matches!(
            tree.upsert(&e, Digest::zero(8)),
            Err(LiveError::DigestWidth {
                expected: 16,
                found: 8
            })
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(u32, u8),
        Remove(u32),
        Flush,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..40, 0u8..4).prop_map(|(id, v)| Op::Upsert(id, v)),
            2 => (0u32..40).prop_map(Op::Remove),
            1 => Just(Op::Flush),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn incremental_tree_equals_the_tree_rebuilt_from_scratch(
            shape in small_shape(), ops in proptest::collection::vec(op(), 0..80),
        ) {
            let mut live = LiveTree::new(shape, MemStorage::new()).expect("valid shape");
            let mut model: BTreeMap<u32, u8> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Upsert(id, v) => {
                        let previous = live.upsert(&entity(id), shape.digest(&[v])).expect("upsert");
                        prop_assert_eq!(previous, model.insert(id, v).map(|old| shape.digest(&[old])));
                    }
                    Op::Remove(id) => {
                        let removed = live.remove(&entity(id)).expect("remove");
                        prop_assert_eq!(removed, model.remove(&id).map(|old| shape.digest(&[old])));
                    }
                    Op::Flush => {
                        live.flush().expect("flush");
                    }
                }
            }
            live.flush().expect("flush");
            let mut builder = TreeBuilder::new(shape).expect("valid shape");
            for (&id, &v) in &model {
                builder.push(entity(id), shape.digest(&[v])).expect("push");
            }
            let rebuilt = builder.finish().expect("build");
            prop_assert_eq!(live.root().expect("flushed"), rebuilt.root());
            prop_assert_eq!(live.to_tree().expect("flushed"), rebuilt);
        }
    }
}
