//! A complete in-memory tree built from a stream of leaves, and the builder that makes it.

use crate::digest::{Digest, NodeHasher, push_bucket_entry, start_bucket_input};
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
        shape.validate()?;
        Ok(Tree::from_buckets(shape, Vec::new(), Vec::new()))
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

    /// Builds the levels above the buckets from the bucket nodes (by index) and keeps the leaves,
    /// which must be in `(bucket, entity)` order without duplicates and agree with the buckets.
    fn from_buckets(shape: Shape, buckets: Vec<(u64, InnerNode)>, leaves: Vec<Leaf>) -> Tree {
        let bucket_level = shape.bucket_level() as usize;
        let width = shape.width();
        let mut levels: Vec<Vec<(u64, InnerNode)>> = vec![Vec::new(); bucket_level + 1];
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
/// Leaves may come in any order (a store scan yields entity order). The builder keeps each leaf
/// compactly (its bucket index, its entity, its digest bytes in one shared buffer); at the end it
/// orders the leaves by bucket with a counting sort (stable, so a stream in entity order needs no
/// further comparison), sorts by entity only inside a bucket whose leaves came out of order, and
/// then, bucket by bucket in one pass, hashes the bucket and moves its leaves into the tree. An
/// entity given twice is an error.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    shape: Shape,
    /// Per leaf, in push order: its bucket index.
    buckets: Vec<u64>,
    /// Per leaf, in push order: its entity.
    entities: Vec<Entity>,
    /// Per leaf, in push order: its digest, `shape.width()` bytes each.
    digests: Vec<u8>,
    /// Reused for canonical bytes and bucket hash inputs.
    scratch: Vec<u8>,
}

impl TreeBuilder {
    /// A builder for a valid shape.
    pub fn new(shape: Shape) -> Result<Self, ShapeError> {
        shape.validate()?;
        Ok(TreeBuilder {
            shape,
            buckets: Vec::new(),
            entities: Vec::new(),
            digests: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// A builder that expects about `leaves` leaves.
    pub fn with_capacity(shape: Shape, leaves: usize) -> Result<Self, ShapeError> {
        let mut builder = TreeBuilder::new(shape)?;
        builder.buckets.reserve(leaves);
        builder.entities.reserve(leaves);
        builder
            .digests
            .reserve(leaves.saturating_mul(shape.width()));
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
        self.buckets.push(self.shape.bucket_of(&entity).index);
        self.entities.push(entity);
        self.digests.extend_from_slice(digest.as_bytes());
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
    pub fn finish(self) -> Result<Tree, BuildError> {
        let mut order = self.bucket_order();
        let TreeBuilder {
            shape,
            buckets,
            mut entities,
            digests,
            mut scratch,
        } = self;
        let width = shape.width();
        let digest_of = |leaf: usize| &digests[leaf * width..(leaf + 1) * width];
        let mut leaves = Vec::with_capacity(order.len());
        let mut nodes = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let bucket = buckets[order[start]];
            let mut end = start + 1;
            while end < order.len() && buckets[order[end]] == bucket {
                end += 1;
            }
            let run = &mut order[start..end];
            // Strictly increasing means sorted and free of duplicates; only a bucket that fails
            // the check is sorted (equal entities always share a bucket).
            if !run.is_sorted_by(|&a, &b| entities[a] < entities[b]) {
                run.sort_unstable_by(|&a, &b| entities[a].cmp(&entities[b]));
                if let Some(pair) = run
                    .windows(2)
                    .find(|pair| entities[pair[0]] == entities[pair[1]])
                {
                    return Err(BuildError::Duplicate {
                        entity: entities[pair[0]].clone(),
                    });
                }
            }
            start_bucket_input(&mut scratch);
            for &leaf in run.iter() {
                push_bucket_entry(&mut scratch, entities[leaf].as_bytes(), digest_of(leaf));
            }
            let digest = shape.digest(&scratch);
            nodes.push((
                bucket,
                InnerNode {
                    digest,
                    leaf_count: run.len() as u64,
                },
            ));
            for &leaf in run.iter() {
                leaves.push(Leaf {
                    bucket,
                    entity: std::mem::replace(&mut entities[leaf], Entity::placeholder()),
                    digest: Digest::from_checked(digest_of(leaf)),
                });
            }
            start = end;
        }
        Ok(Tree::from_buckets(shape, nodes, leaves))
    }

    /// The leaves' indexes (in push order) ordered by bucket, stable: within a bucket, in push
    /// order. A counting sort when the shape has no more buckets than twice the leaves (one pass
    /// to count, one to place), else a sort of `(bucket, index)` keys.
    fn bucket_order(&self) -> Vec<usize> {
        let count = self.buckets.len();
        let bucket_count = self.shape.bucket_count();
        if bucket_count > (count as u64).saturating_mul(2) {
            let mut keys: Vec<(u64, usize)> = self.buckets.iter().copied().zip(0..).collect();
            keys.sort_unstable();
            return keys.into_iter().map(|(_, leaf)| leaf).collect();
        }
        // `next[b]` is where the next leaf of bucket `b` goes; bucket indexes of a valid shape
        // are below `bucket_count`.
        let mut next = vec![0usize; bucket_count as usize];
        for &bucket in &self.buckets {
            next[bucket as usize] += 1;
        }
        let mut total = 0;
        for slot in &mut next {
            let size = *slot;
            *slot = total;
            total += size;
        }
        let mut order = vec![0usize; count];
        for (leaf, &bucket) in self.buckets.iter().enumerate() {
            let slot = &mut next[bucket as usize];
            order[*slot] = leaf;
            *slot += 1;
        }
        order
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

    /// Bucket digests recomputed with the streaming `NodeHasher` from the tree's own leaves.
    fn streamed_buckets(tree: &Tree) -> Vec<(u64, InnerNode)> {
        let shape = *tree.shape();
        let mut buckets: Vec<(u64, InnerNode)> = Vec::new();
        let mut start = 0;
        let leaves = tree.leaves();
        while start < leaves.len() {
            let bucket = leaves[start].bucket;
            let mut hasher = NodeHasher::bucket(shape.algorithm, shape.width());
            let mut end = start;
            while end < leaves.len() && leaves[end].bucket == bucket {
                hasher.push_leaf(&leaves[end].entity, &leaves[end].digest);
                end += 1;
            }
            let (digest, leaf_count) = hasher.finish();
            buckets.push((bucket, InnerNode { digest, leaf_count }));
            start = end;
        }
        buckets
    }

    #[test]
    fn few_buckets_many_leaves_any_order_give_the_streamed_digests() {
        // 32 buckets for 500 leaves: the counting sort path, several leaves per bucket.
        for algorithm in [crate::Algorithm::Sha512, crate::Algorithm::Blake3] {
            let shape = Shape {
                algorithm,
                ..Shape::reference()
            };
            let build = |order: &[u32]| {
                let mut builder = TreeBuilder::with_capacity(shape, order.len()).expect("valid");
                for &i in order {
                    builder
                        .push(entity(i), shape.digest(&i.to_le_bytes()))
                        .expect("push");
                }
                builder.finish()
            };
            let forward: Vec<u32> = (0..500).collect();
            let backward: Vec<u32> = (0..500).rev().collect();
            // A fixed scramble: 7 is coprime with 500.
            let scrambled: Vec<u32> = (0..500).map(|i| i * 7 % 500).collect();
            let tree = build(&forward).expect("build");
            assert_eq!(tree, build(&backward).expect("build"));
            assert_eq!(tree, build(&scrambled).expect("build"));
            assert!(
                tree.leaves()
                    .windows(2)
                    .all(|pair| (pair[0].bucket, &pair[0].entity)
                        < (pair[1].bucket, &pair[1].entity))
            );
            assert_eq!(tree.level(shape.bucket_level()), streamed_buckets(&tree));
            assert_eq!(tree.root().leaf_count, 500);
            for i in [0, 17, 499] {
                assert_eq!(tree.leaf(&entity(i)), Some(shape.digest(&i.to_le_bytes())));
            }

            let mut with_duplicate = scrambled.clone();
            with_duplicate.push(123);
            assert_eq!(
                build(&with_duplicate),
                Err(BuildError::Duplicate {
                    entity: entity(123)
                })
            );
        }
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
