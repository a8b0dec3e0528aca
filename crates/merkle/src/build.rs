//! A complete in-memory tree built from a stream of leaves, and the builder that makes it.

use crate::digest::{
    BUCKET_DOMAIN, Digest, NodeHasher, push_bucket_entry, split_bucket_entry, start_bucket_input,
};
use crate::entity::{Entity, EntityError};
use crate::position::{NodeId, position_of_bytes};
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
/// Leaves may come in any order (a store scan yields entity order). The builder appends each
/// leaf to one byte buffer in the layout of a bucket's hash input (entity length, entity bytes,
/// digest) and remembers its bucket, so that no allocation is made per leaf while pushing (except
/// by [`TreeBuilder::push`]'s caller, who built the `Entity`). At the end it orders the leaves by
/// bucket with a counting sort (stable, so a stream in entity order needs no comparison), sorts
/// by entity only inside a bucket whose leaves came out of order, and then, bucket by bucket in
/// one pass, gathers the bucket's entries, hashes them in one call and makes the bucket's leaves.
/// An entity given twice is an error.
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    shape: Shape,
    /// Per leaf, in push order: its bucket index and where its entry starts in `entries`.
    leaves: Vec<(u64, usize)>,
    /// Every leaf's entry, in push order: u16 LE entity length, entity bytes, digest bytes.
    entries: Vec<u8>,
    /// Reused for canonical bytes and bucket hash inputs.
    scratch: Vec<u8>,
    /// Reused for a property's entity string.
    text: Vec<u8>,
}

impl TreeBuilder {
    /// A builder for a valid shape.
    pub fn new(shape: Shape) -> Result<Self, ShapeError> {
        shape.validate()?;
        Ok(TreeBuilder {
            shape,
            leaves: Vec::new(),
            entries: Vec::new(),
            scratch: Vec::new(),
            text: Vec::new(),
        })
    }

    /// A builder that expects about `leaves` leaves.
    pub fn with_capacity(shape: Shape, leaves: usize) -> Result<Self, ShapeError> {
        let mut builder = TreeBuilder::new(shape)?;
        builder.leaves.reserve(leaves);
        // About 32 bytes of entity per leaf; the buffer grows when entities are longer.
        builder
            .entries
            .reserve(leaves.saturating_mul(2 + 32 + shape.width()));
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
        self.push_valid(entity.as_bytes(), &digest);
        Ok(())
    }

    /// Adds a leaf whose entity is given as its string `group/name/id`, checked exactly as
    /// [`Entity::parse`] checks it (same errors) but without allocating an [`Entity`]: the tree
    /// allocates each entity once, when it is built. What a store scan uses.
    pub fn push_str(&mut self, entity: &str, digest: Digest) -> Result<(), BuildError> {
        Entity::check_str(entity)?;
        if digest.width() != self.shape.width() {
            return Err(BuildError::DigestWidth {
                entity: Entity::parse(entity)?,
                expected: self.shape.width(),
                found: digest.width(),
            });
        }
        self.push_valid(entity.as_bytes(), &digest);
        Ok(())
    }

    /// Adds the leaf of a property: its entity and the digest of its canonical bytes (computed in
    /// a reused buffer).
    pub fn push_property(&mut self, property: &Property) -> Result<(), BuildError> {
        Entity::check_parts(&property.group, &property.name, &property.id)?;
        let digest = property.leaf_digest_with(&self.shape, &mut self.scratch);
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        text.extend_from_slice(property.group.as_bytes());
        text.push(b'/');
        text.extend_from_slice(property.name.as_bytes());
        text.push(b'/');
        text.extend_from_slice(property.id.as_bytes());
        self.push_valid(&text, &digest);
        self.text = text;
        Ok(())
    }

    /// Records a leaf whose entity bytes are valid and whose digest has the shape's width.
    fn push_valid(&mut self, entity: &[u8], digest: &Digest) {
        let bucket = self.shape.bucket_index(position_of_bytes(entity));
        self.leaves.push((bucket, self.entries.len()));
        push_bucket_entry(&mut self.entries, entity, digest.as_bytes());
    }

    /// Sorts the leaves, rejects duplicates and hashes every level.
    pub fn finish(self) -> Result<Tree, BuildError> {
        let width = self.shape.width();
        let (mut layout, buckets) = self.bucket_layout();
        let mut leaves = Vec::with_capacity(self.leaves.len());
        drop(self.leaves);
        drop(self.entries);
        let mut nodes = Vec::with_capacity(buckets.len());
        for (bucket, range) in buckets {
            let input = &mut layout[range];
            if !entries_in_order(&input[1..], width) {
                sort_entries(input, width)?;
            }
            let digest = self.shape.digest(input);
            let first = leaves.len();
            let mut rest = &input[1..];
            while let Some((entity, digest, next)) = split_bucket_entry(rest, width) {
                leaves.push(Leaf {
                    bucket,
                    entity: Entity::from_checked_bytes(entity)?,
                    digest: Digest::from_checked(digest),
                });
                rest = next;
            }
            nodes.push((
                bucket,
                InnerNode {
                    digest,
                    leaf_count: (leaves.len() - first) as u64,
                },
            ));
        }
        Ok(Tree::from_buckets(self.shape, nodes, leaves))
    }

    /// The length of leaf `leaf`'s entry: entries are contiguous in push order.
    fn entry_len(&self, leaf: usize) -> usize {
        let end = self
            .leaves
            .get(leaf + 1)
            .map_or(self.entries.len(), |next| next.1);
        end - self.leaves[leaf].1
    }

    /// Every non-empty bucket's hash input, in bucket order, in one buffer: the domain byte, then
    /// the bucket's entries in push order (stable). Returns the buffer and, per non-empty bucket
    /// by index, its range in the buffer.
    ///
    /// When the shape has no more buckets than twice the leaves, a counting sort: one pass over
    /// the leaves sums each bucket's bytes, one copies each entry to its place (reading the
    /// entries in order and writing each where it belongs). Otherwise the `(bucket, entry start)`
    /// pairs are sorted (the starts grow with push order) and the entries gathered.
    fn bucket_layout(&self) -> (Vec<u8>, Vec<(u64, std::ops::Range<usize>)>) {
        let count = self.leaves.len();
        let bucket_count = self.shape.bucket_count();
        let mut layout = Vec::with_capacity(self.entries.len() + count);
        let mut buckets: Vec<(u64, std::ops::Range<usize>)> = Vec::new();
        if bucket_count > (count as u64).saturating_mul(2) {
            let mut sorted = self.leaves.clone();
            sorted.sort_unstable();
            for (position, &(bucket, start)) in sorted.iter().enumerate() {
                if position == 0 || sorted[position - 1].0 != bucket {
                    if let Some(last) = buckets.last_mut() {
                        last.1.end = layout.len();
                    }
                    buckets.push((bucket, layout.len()..layout.len()));
                    layout.push(BUCKET_DOMAIN);
                }
                // Every recorded start is that of a whole entry, written by `push_valid`.
                let entry = self.entries.get(start..).and_then(|rest| {
                    let (entity, _, _) = split_bucket_entry(rest, self.shape.width())?;
                    rest.get(..2 + entity.len() + self.shape.width())
                });
                layout.extend_from_slice(entry.unwrap_or_default());
            }
            if let Some(last) = buckets.last_mut() {
                last.1.end = layout.len();
            }
            return (layout, buckets);
        }
        // `next[b]` first holds bucket `b`'s bytes, then where its next entry goes; bucket
        // indexes of a valid shape are below `bucket_count`.
        let mut next = vec![0usize; bucket_count as usize];
        for leaf in 0..count {
            next[self.leaves[leaf].0 as usize] += self.entry_len(leaf);
        }
        let mut total = 0;
        for (bucket, slot) in next.iter_mut().enumerate() {
            let size = *slot;
            if size > 0 {
                buckets.push((bucket as u64, total..total + 1 + size));
                total += 1;
            }
            *slot = total;
            total += size;
        }
        layout.resize(total, 0);
        for (_, range) in &buckets {
            layout[range.start] = BUCKET_DOMAIN;
        }
        for leaf in 0..count {
            let (bucket, start) = self.leaves[leaf];
            let len = self.entry_len(leaf);
            let at = &mut next[bucket as usize];
            layout[*at..*at + len].copy_from_slice(&self.entries[start..start + len]);
            *at += len;
        }
        (layout, buckets)
    }
}

/// Whether the entities of a bucket's entries are strictly increasing (sorted, no duplicates).
fn entries_in_order(mut entries: &[u8], width: usize) -> bool {
    let mut previous: Option<&[u8]> = None;
    while let Some((entity, _, rest)) = split_bucket_entry(entries, width) {
        if previous.is_some_and(|previous| previous >= entity) {
            return false;
        }
        previous = Some(entity);
        entries = rest;
    }
    true
}

/// Sorts the entries of a bucket's hash input (after its domain byte) by entity, in place; a
/// repeated entity is an error.
fn sort_entries(input: &mut [u8], width: usize) -> Result<(), BuildError> {
    let mut split = Vec::new();
    let mut rest = input.get(1..).unwrap_or_default();
    while let Some((entity, digest, next)) = split_bucket_entry(rest, width) {
        split.push((entity, digest));
        rest = next;
    }
    split.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if let Some(pair) = split.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(BuildError::Duplicate {
            entity: Entity::from_bytes(pair[0].0)?,
        });
    }
    let mut sorted = Vec::with_capacity(input.len());
    start_bucket_input(&mut sorted);
    for (entity, digest) in split {
        push_bucket_entry(&mut sorted, entity, digest);
    }
    // The same entries in another order: the same length.
    input.copy_from_slice(&sorted);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(i: u32) -> Entity {
        Entity::new("g", "n", &format!("{i}")).expect("valid")
    }

    #[test]
    fn a_builder_keeps_its_shape() {
        let shape = Shape {
            slot_count: 8,
            depth: 1,
            ..Shape::default()
        };
        assert_eq!(TreeBuilder::new(shape).expect("valid").shape(), &shape);
        assert_eq!(
            TreeBuilder::with_capacity(shape, 10)
                .expect("valid")
                .shape(),
            &shape
        );
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
    fn push_str_and_push_property_agree_with_push() {
        let shape = Shape::reference();
        let properties: Vec<Property> = (0..100)
            .map(|i| Property {
                group: "g".into(),
                name: "n".into(),
                id: format!("a/{i}"),
                mod_revision: i,
                ..Property::default()
            })
            .collect();
        let mut by_entity = TreeBuilder::new(shape).expect("valid");
        let mut by_str = TreeBuilder::new(shape).expect("valid");
        let mut by_property = TreeBuilder::new(shape).expect("valid");
        for property in properties.iter().rev() {
            let entity = property.entity().expect("valid");
            let digest = property.leaf_digest(&shape);
            by_str.push_str(entity.as_str(), digest).expect("push");
            by_entity.push(entity, digest).expect("push");
            by_property.push_property(property).expect("push");
        }
        let tree = by_entity.finish().expect("build");
        assert_eq!(tree, by_str.finish().expect("build"));
        assert_eq!(tree, by_property.finish().expect("build"));
        let entity = Entity::parse("g/n/a/7").expect("valid");
        assert_eq!(
            (entity.group(), entity.name(), entity.id()),
            (
                tree.leaves()[0].entity.group(),
                tree.leaves()[0].entity.name(),
                "a/7"
            )
        );
        let found = tree
            .leaves()
            .iter()
            .find(|leaf| leaf.entity == entity)
            .expect("present");
        assert_eq!(found.entity.id(), "a/7");

        let mut builder = TreeBuilder::new(shape).expect("valid");
        for bad in ["g/n", "g//i", "/n/i", "g/n/"] {
            assert_eq!(
                builder.push_str(bad, shape.digest(b"x")),
                Err(BuildError::Entity(Entity::parse(bad).expect_err("invalid")))
            );
        }
        assert!(matches!(
            builder.push_str("g/n/i", Shape::default().digest(b"x")),
            Err(BuildError::DigestWidth {
                expected: 64,
                found: 16,
                ..
            })
        ));
        let bad = Property {
            group: "a/b".into(),
            name: "n".into(),
            id: "i".into(),
            ..Property::default()
        };
        assert_eq!(
            builder.push_property(&bad),
            Err(BuildError::Entity(bad.entity().expect_err("invalid")))
        );
        assert_eq!(builder.finish().expect("empty").leaf_count(), 0);
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
