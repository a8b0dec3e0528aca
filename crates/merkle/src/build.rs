//! A complete in-memory tree built from a stream of leaves, and the builder that makes it.

use crate::digest::{Digest, NodeHasher};
use crate::entity::{Entity, EntityError};
use crate::position::NodeId;
use crate::property::Property;
use crate::shape::{Shape, ShapeError};
use crate::storage::InnerNode;

/// One leaf: its bucket index, its entity and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// The index of the bucket (at [`Shape::bucket_level`]) that holds the leaf.
    pub bucket: u64,
    /// The entity.
    pub entity: Entity,
    /// The leaf digest.
    pub digest: Digest,
}

/// Why a tree could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The shape is not valid.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A property has no valid entity.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// A leaf digest has another width than the shape's.
    #[error(
        "leaf digest of {entity} is {found} bytes wide, the shape says digest_width = {expected}"
    )]
    DigestWidth {
        /// The leaf's entity.
        entity: Entity,
        /// The shape's width.
        expected: usize,
        /// The digest's width.
        found: usize,
    },
    /// The same entity was given twice.
    #[error("entity {entity} appears twice in the leaf stream")]
    Duplicate {
        /// The repeated entity.
        entity: Entity,
    },
}

/// A complete, immutable Merkle tree in memory: every non-empty node of every level and every
/// leaf in `(bucket, entity)` order. Two trees are equal when their shapes and leaves are (the
/// nodes follow from the leaves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    shape: Shape,
    /// Per level (0 = root .. bucket level), the non-empty nodes as (index, node), by index.
    levels: Vec<Vec<(u64, InnerNode)>>,
    leaves: Vec<Leaf>,
}

impl Tree {
    /// The empty tree of a valid shape.
    pub fn empty(shape: Shape) -> Result<Tree, ShapeError> {
        TreeBuilder::new(shape).map(|builder| builder.finish_sorted())
    }

    /// A tree from parts already computed (the live tree's export).
    pub(crate) fn from_parts(
        shape: Shape,
        levels: Vec<Vec<(u64, InnerNode)>>,
        leaves: Vec<Leaf>,
    ) -> Tree {
        Tree {
            shape,
            levels,
            leaves,
        }
    }

    /// Builds every level from leaves sorted by `(bucket, entity)` without duplicates.
    fn from_sorted_leaves(shape: Shape, leaves: Vec<Leaf>) -> Tree {
        let bucket_level = shape.bucket_level() as usize;
        let width = shape.width();
        let mut levels: Vec<Vec<(u64, InnerNode)>> = vec![Vec::new(); bucket_level + 1];

        let mut buckets = Vec::new();
        let mut start = 0;
        while start < leaves.len() {
            let bucket = leaves[start].bucket;
            let mut hasher = NodeHasher::bucket(shape.algorithm, width);
            let mut end = start;
            while end < leaves.len() && leaves[end].bucket == bucket {
                hasher.push_leaf(&leaves[end].entity, &leaves[end].digest);
                end += 1;
            }
            let (digest, leaf_count) = hasher.finish();
            buckets.push((bucket, InnerNode { digest, leaf_count }));
            start = end;
        }
        levels[bucket_level] = buckets;

        for level in (0..bucket_level).rev() {
            let children = &levels[level + 1];
            let mut nodes = Vec::new();
            let mut start = 0;
            while start < children.len() {
                let parent = shape
                    .parent(NodeId::new(level as u32 + 1, children[start].0))
                    .unwrap_or(NodeId::ROOT);
                let mut hasher = NodeHasher::inner(shape.algorithm, width);
                let mut end = start;
                while end < children.len() {
                    let child = NodeId::new(level as u32 + 1, children[end].0);
                    if shape.parent(child) != Some(parent) {
                        break;
                    }
                    let inner = &children[end].1;
                    hasher.push_child(shape.child_position(child), &inner.digest, inner.leaf_count);
                    end += 1;
                }
                let (digest, leaf_count) = hasher.finish();
                nodes.push((parent.index, InnerNode { digest, leaf_count }));
                start = end;
            }
            levels[level] = nodes;
        }
        Tree {
            shape,
            levels,
            leaves,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The root.
    pub fn root(&self) -> InnerNode {
        self.node(NodeId::ROOT)
    }

    /// The number of leaves.
    pub fn leaf_count(&self) -> u64 {
        self.leaves.len() as u64
    }

    /// One node; [`InnerNode::empty`] when no leaf is under it or it is outside the shape.
    pub fn node(&self, node: NodeId) -> InnerNode {
        self.level(node.level)
            .binary_search_by_key(&node.index, |(index, _)| *index)
            .map(|at| self.level(node.level)[at].1)
            .unwrap_or_else(|_| InnerNode::empty(self.shape.width()))
    }

    /// The non-empty nodes of a level as `(index, node)`, by index (empty beyond the buckets).
    pub fn level(&self, level: u32) -> &[(u64, InnerNode)] {
        self.levels.get(level as usize).map_or(&[], Vec::as_slice)
    }

    /// The non-empty children of a node, by index (none for a bucket).
    pub fn children(&self, node: NodeId) -> Vec<(NodeId, InnerNode)> {
        let level = node.level.saturating_add(1);
        let nodes = self.level(level);
        let range = self.shape.child_range(node);
        let start = nodes.partition_point(|(index, _)| *index < range.start);
        let end = nodes.partition_point(|(index, _)| *index < range.end);
        nodes[start..end.max(start)]
            .iter()
            .map(|&(index, inner)| (NodeId::new(level, index), inner))
            .collect()
    }

    /// Every leaf in `(bucket, entity)` order.
    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// The leaves under a node, in `(bucket, entity)` order.
    pub fn leaves_under(&self, node: NodeId) -> &[Leaf] {
        if node.level > self.shape.bucket_level() {
            return &[];
        }
        let range = self.shape.bucket_range(node);
        let start = self
            .leaves
            .partition_point(|leaf| leaf.bucket < range.start);
        let end = self.leaves.partition_point(|leaf| leaf.bucket < range.end);
        &self.leaves[start..end.max(start)]
    }

    /// The digest of a leaf, if present.
    pub fn leaf(&self, entity: &Entity) -> Option<Digest> {
        let bucket = self.shape.bucket_of(entity).index;
        self.leaves
            .binary_search_by(|leaf| {
                leaf.bucket
                    .cmp(&bucket)
                    .then_with(|| leaf.entity.cmp(entity))
            })
            .ok()
            .map(|at| self.leaves[at].digest)
    }
}

/// Builds a [`Tree`] from a stream of leaves.
///
/// Leaves may come in any order (a store scan yields entity order); the builder places each in
/// its bucket, sorts by `(bucket, entity)` once at the end and hashes every level bottom-up in
/// one pass. An entity given twice is an error.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    shape: Shape,
    leaves: Vec<Leaf>,
    scratch: Vec<u8>,
}

impl TreeBuilder {
    /// A builder for a valid shape.
    pub fn new(shape: Shape) -> Result<Self, ShapeError> {
        shape.validate()?;
        Ok(TreeBuilder {
            shape,
            leaves: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// A builder that expects about `leaves` leaves.
    pub fn with_capacity(shape: Shape, leaves: usize) -> Result<Self, ShapeError> {
        let mut builder = TreeBuilder::new(shape)?;
        builder.leaves.reserve(leaves);
        Ok(builder)
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Adds a leaf.
    pub fn push(&mut self, entity: Entity, digest: Digest) -> Result<(), BuildError> {
        if digest.width() != self.shape.width() {
            return Err(BuildError::DigestWidth {
                entity,
                expected: self.shape.width(),
                found: digest.width(),
            });
        }
        let bucket = self.shape.bucket_of(&entity).index;
        self.leaves.push(Leaf {
            bucket,
            entity,
            digest,
        });
        Ok(())
    }

    /// Adds the leaf of a property: its entity and the digest of its canonical bytes (computed in
    /// a reused buffer).
    pub fn push_property(&mut self, property: &Property) -> Result<(), BuildError> {
        let entity = property.entity()?;
        let digest = property.leaf_digest_with(&self.shape, &mut self.scratch);
        self.push(entity, digest)
    }

    /// Sorts the leaves, rejects duplicates and hashes every level.
    pub fn finish(mut self) -> Result<Tree, BuildError> {
        self.sort();
        if let Some(pair) = self
            .leaves
            .windows(2)
            .find(|pair| pair[0].entity == pair[1].entity)
        {
            return Err(BuildError::Duplicate {
                entity: pair[0].entity.clone(),
            });
        }
        Ok(self.finish_sorted())
    }

    /// Sorts the leaves by `(bucket, entity)`. Sorting small `(bucket, index)` keys and moving
    /// each leaf once is much cheaper than letting the sort move whole leaves around.
    fn sort(&mut self) {
        let is_sorted = self
            .leaves
            .is_sorted_by(|a, b| (a.bucket, &a.entity) <= (b.bucket, &b.entity));
        if is_sorted {
            return;
        }
        let leaves = &self.leaves;
        let mut order: Vec<(u64, usize)> = leaves
            .iter()
            .enumerate()
            .map(|(i, leaf)| (leaf.bucket, i))
            .collect();
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| leaves[a.1].entity.cmp(&leaves[b.1].entity))
        });
        // Apply the permutation in place, one cycle at a time: position `k` must receive the
        // leaf now at `order[k].1`. No second copy of the leaves is ever allocated.
        let mut placed = vec![false; order.len()];
        for start in 0..order.len() {
            let mut current = start;
            while !placed[current] {
                placed[current] = true;
                let source = order[current].1;
                if source == start {
                    break;
                }
                self.leaves.swap(current, source);
                current = source;
            }
        }
    }

    fn finish_sorted(self) -> Tree {
        Tree::from_sorted_leaves(self.shape, self.leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(i: u32) -> Entity {
        Entity::new("g", "n", &format!("{i}")).expect("valid")
    }

    #[test]
    fn a_single_leaf_hashes_up_its_path() {
        let shape = Shape {
            depth: 1,
            ..Shape::default()
        };
        let e = entity(1);
        let leaf = shape.digest(b"leaf");
        let mut builder = TreeBuilder::new(shape).expect("valid");
        builder.push(e.clone(), leaf).expect("push");
        let tree = builder.finish().expect("build");

        let bucket = shape.bucket_of(&e);
        let slot = shape.ancestor(bucket, 1);
        let mut expected = NodeHasher::bucket(shape.algorithm, 16);
        expected.push_leaf(&e, &leaf);
        let (bucket_digest, _) = expected.finish();
        let mut expected = NodeHasher::inner(shape.algorithm, 16);
        expected.push_child(shape.child_position(bucket), &bucket_digest, 1);
        let (slot_digest, _) = expected.finish();
        let mut expected = NodeHasher::inner(shape.algorithm, 16);
        expected.push_child(slot.index as u32, &slot_digest, 1);
        let (root_digest, _) = expected.finish();

        assert_eq!(tree.node(bucket).digest, bucket_digest);
        assert_eq!(tree.node(slot).digest, slot_digest);
        assert_eq!(
            tree.root(),
            InnerNode {
                digest: root_digest,
                leaf_count: 1
            }
        );
        assert_eq!(tree.leaf(&e), Some(leaf));
        assert_eq!(tree.leaves_under(slot).len(), 1);
        assert_eq!(tree.children(NodeId::ROOT), vec![(slot, tree.node(slot))]);
    }

    #[test]
    fn input_order_does_not_matter_and_duplicates_are_rejected() {
        let shape = Shape::default();
        let build = |order: &mut dyn Iterator<Item = u32>| {
            let mut builder = TreeBuilder::new(shape).expect("valid");
            for i in order {
                builder
                    .push(entity(i), shape.digest(&i.to_le_bytes()))
                    .expect("push");
            }
            builder.finish()
        };
        let forward = build(&mut (0..200)).expect("build");
        let backward = build(&mut (0..200).rev()).expect("build");
        assert_eq!(forward, backward);
        assert_eq!(forward.leaf_count(), 200);
        assert_eq!(forward.root().leaf_count, 200);
        assert!(matches!(
            build(&mut [1, 2, 1].into_iter()),
            Err(BuildError::Duplicate { .. })
        ));
        assert_eq!(
            Tree::empty(shape).expect("valid").root(),
            InnerNode::empty(16)
        );
    }
}
