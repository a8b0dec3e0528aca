//! The difference of two trees, found by descending only differing nodes level by level, with
//! the bandwidth a real exchange would spend at each level.

use crate::build::{Leaf, Tree};
use crate::entity::Entity;
use crate::position::NodeId;
use crate::shape::Shape;

/// The two trees have different shapes and cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tree shapes differ: left {left:?}, right {right:?}")]
pub struct ShapeMismatch {
    /// The left tree's shape.
    pub left: Shape,
    /// The right tree's shape.
    pub right: Shape,
}

/// What the exchange sends at one level of the descent (the bandwidth model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LevelCost {
    /// The level: 0 the root, 1 the slots, ..., `bucket_level + 1` the leaves.
    pub level: u32,
    /// Digests sent at this level.
    pub digests_sent: u64,
    /// Bytes sent at this level, both directions, payload only (no framing).
    pub bytes_sent: u64,
}

/// The difference of a left and a right tree. Entities are listed in `(bucket, entity)` order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    /// Entities with a leaf only in the left tree.
    pub only_left: Vec<Entity>,
    /// Entities with a leaf only in the right tree.
    pub only_right: Vec<Entity>,
    /// Entities in both trees with different leaf digests.
    pub differing: Vec<Entity>,
    /// The cost of the exchange, one entry per level visited, root first.
    pub levels: Vec<LevelCost>,
}

impl Diff {
    /// Whether the trees hold the same leaves.
    pub fn is_empty(&self) -> bool {
        self.only_left.is_empty() && self.only_right.is_empty() && self.differing.is_empty()
    }

    /// The number of differing entities.
    pub fn len(&self) -> usize {
        self.only_left.len() + self.only_right.len() + self.differing.len()
    }

    /// Total bytes of tree traffic over all levels.
    pub fn bytes_sent(&self) -> u64 {
        self.levels.iter().map(|cost| cost.bytes_sent).sum()
    }

    /// Total digests sent over all levels.
    pub fn digests_sent(&self) -> u64 {
        self.levels.iter().map(|cost| cost.digests_sent).sum()
    }
}

/// Bytes of a child index on the wire in the cost model.
const INDEX_BYTES: u64 = 4;
/// Bytes of an entity length prefix on the wire in the cost model.
const LENGTH_BYTES: u64 = 4;

/// Compares two trees of one shape, as the two sides of a sync would (left = the client A,
/// right = the server B).
///
/// The cost model, per level: level 0 sends the left root (one digest, `digest_width` bytes);
/// equal roots end there. At each level below, for every node that differs, the left side sends
/// its non-empty children as `(u32 index, digest)` and the right side answers with the `u32`
/// index of each child that differs (including children only it has). At the leaves, for every
/// differing bucket the right side sends its leaves as `(u32 length, entity bytes, digest)`; the
/// left side merges them with its own in entity order.
pub fn diff(left: &Tree, right: &Tree) -> Result<Diff, ShapeMismatch> {
    let shape = *left.shape();
    if shape != *right.shape() {
        return Err(ShapeMismatch {
            left: shape,
            right: *right.shape(),
        });
    }
    let width = shape.width() as u64;
    let mut result = Diff {
        levels: vec![LevelCost {
            level: 0,
            digests_sent: 1,
            bytes_sent: width,
        }],
        ..Diff::default()
    };
    if left.root().digest == right.root().digest {
        return Ok(result);
    }

    let mut differing = vec![NodeId::ROOT];
    for level in 1..=shape.bucket_level() {
        let mut cost = LevelCost {
            level,
            ..LevelCost::default()
        };
        let mut next = Vec::new();
        for &parent in &differing {
            let ours = left.children(parent);
            let theirs = right.children(parent);
            cost.digests_sent += ours.len() as u64;
            cost.bytes_sent += ours.len() as u64 * (INDEX_BYTES + width);
            let before = next.len();
            merge_by(
                &ours,
                &theirs,
                |a, b| a.0.cmp(&b.0),
                |step| match step {
                    Merge::Left(&(node, _)) | Merge::Right(&(node, _)) => next.push(node),
                    Merge::Both(&(node, a), (_, b)) => {
                        if a.digest != b.digest {
                            next.push(node);
                        }
                    }
                },
            );
            cost.bytes_sent += (next.len() - before) as u64 * INDEX_BYTES;
        }
        result.levels.push(cost);
        differing = next;
    }

    let mut cost = LevelCost {
        level: shape.bucket_level() + 1,
        ..LevelCost::default()
    };
    for &bucket in &differing {
        let ours = left.leaves_under(bucket);
        let theirs = right.leaves_under(bucket);
        cost.digests_sent += theirs.len() as u64;
        cost.bytes_sent += theirs
            .iter()
            .map(|leaf| LENGTH_BYTES + leaf.entity.as_bytes().len() as u64 + width)
            .sum::<u64>();
        merge_by(ours, theirs, compare_leaves, |step| match step {
            Merge::Left(leaf) => result.only_left.push(leaf.entity.clone()),
            Merge::Right(leaf) => result.only_right.push(leaf.entity.clone()),
            Merge::Both(a, b) => {
                if a.digest != b.digest {
                    result.differing.push(a.entity.clone());
                }
            }
        });
    }
    result.levels.push(cost);
    Ok(result)
}

fn compare_leaves(a: &Leaf, b: &Leaf) -> std::cmp::Ordering {
    a.bucket
        .cmp(&b.bucket)
        .then_with(|| a.entity.cmp(&b.entity))
}

enum Merge<'a, T> {
    Left(&'a T),
    Right(&'a T),
    Both(&'a T, &'a T),
}

/// Walks two sorted slices in step, reporting each element as left-only, right-only or both.
fn merge_by<'a, T>(
    left: &'a [T],
    right: &'a [T],
    compare: impl Fn(&T, &T) -> std::cmp::Ordering,
    mut visit: impl FnMut(Merge<'a, T>),
) {
    let (mut i, mut j) = (0, 0);
    while i < left.len() || j < right.len() {
        let order = match (left.get(i), right.get(j)) {
            (Some(a), Some(b)) => compare(a, b),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match order {
            std::cmp::Ordering::Less => {
                visit(Merge::Left(&left[i]));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                visit(Merge::Right(&right[j]));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                visit(Merge::Both(&left[i], &right[j]));
                i += 1;
                j += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::TreeBuilder;
    use crate::shape::strategies::small_shape;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn tree(shape: Shape, leaves: &BTreeMap<u32, u8>) -> Tree {
        let mut builder = TreeBuilder::new(shape).expect("valid");
        for (&id, &version) in leaves {
            let entity = Entity::new("g", "n", &id.to_string()).expect("valid");
            builder
                .push(entity, shape.digest(&[version]))
                .expect("push");
        }
        builder.finish().expect("build")
    }

    fn entity(id: u32) -> Entity {
        Entity::new("g", "n", &id.to_string()).expect("valid")
    }

    #[test]
    fn equal_trees_cost_one_digest() {
        let shape = Shape::default();
        let leaves: BTreeMap<u32, u8> = (0..50).map(|i| (i, 0)).collect();
        let result = diff(&tree(shape, &leaves), &tree(shape, &leaves)).expect("same shape");
        assert!(result.is_empty());
        assert_eq!(
            result.levels,
            vec![LevelCost {
                level: 0,
                digests_sent: 1,
                bytes_sent: 16
            }]
        );
    }

    #[test]
    fn one_difference_is_found_and_costs_one_path() {
        let shape = Shape::default();
        let left: BTreeMap<u32, u8> = (0..1000).map(|i| (i, 0)).collect();
        let mut right = left.clone();
        right.insert(500, 1);
        right.remove(&7);
        right.insert(5000, 0);
        let result = diff(&tree(shape, &left), &tree(shape, &right)).expect("same shape");
        assert_eq!(result.only_left, vec![entity(7)]);
        assert_eq!(result.only_right, vec![entity(5000)]);
        assert_eq!(result.differing, vec![entity(500)]);
        assert_eq!(result.levels.len(), shape.bucket_level() as usize + 2);
        // Three differences touch at most three paths: far below a full exchange.
        assert!(
            result.bytes_sent() < 6 * 1024,
            "{} bytes",
            result.bytes_sent()
        );
    }

    /// The cost model, level by level, on a shape small enough to count by hand: 2 slots of 2
    /// buckets, 8-byte digests, and 40 entities that differ in every bucket.
    #[test]
    fn every_level_costs_what_the_model_says() {
        let shape = Shape {
            slot_count: 2,
            fanout: 2,
            depth: 1,
            digest_width: 8,
            ..Shape::default()
        };
        let left: BTreeMap<u32, u8> = (0..40).map(|i| (i, 0)).collect();
        let right: BTreeMap<u32, u8> = (0..40).map(|i| (i, 1)).collect();
        let (a, b) = (tree(shape, &left), tree(shape, &right));
        for bucket in 0..4 {
            let id = NodeId {
                level: 2,
                index: bucket,
            };
            assert!(
                !a.leaves_under(id).is_empty(),
                "bucket {bucket} holds leaves"
            );
        }
        let result = diff(&a, &b).expect("same shape");
        assert_eq!(result.differing.len(), 40);
        assert_eq!(result.len(), 40);
        let leaf_bytes: u64 = (0..40)
            .map(|i| 4 + entity(i).as_bytes().len() as u64 + 8)
            .sum();
        let level = |level, digests_sent, bytes_sent| LevelCost {
            level,
            digests_sent,
            bytes_sent,
        };
        assert_eq!(
            result.levels,
            vec![
                // The root.
                level(0, 1, 8),
                // Both slots, (index, digest) each; both differ, an index each back.
                level(1, 2, 2 * (4 + 8) + 2 * 4),
                // Two buckets under each slot, all four differ.
                level(2, 4, 4 * (4 + 8) + 4 * 4),
                // Every leaf of the right side, with its length and digest.
                level(3, 40, leaf_bytes),
            ]
        );
        assert_eq!(result.digests_sent(), 1 + 2 + 4 + 40);
        assert_eq!(result.bytes_sent(), 8 + 32 + 64 + leaf_bytes);
    }

    #[test]
    fn shapes_must_match() {
        let a = Tree::empty(Shape::default()).expect("valid");
        let b = Tree::empty(Shape::reference()).expect("valid");
        assert_eq!(
            diff(&a, &b),
            Err(ShapeMismatch {
                left: Shape::default(),
                right: Shape::reference()
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn diff_equals_the_brute_force_set_difference(
            shape in small_shape(),
            left in proptest::collection::btree_map(0u32..60, 0u8..3, 0..40),
            right in proptest::collection::btree_map(0u32..60, 0u8..3, 0..40),
        ) {
            let result = diff(&tree(shape, &left), &tree(shape, &right)).expect("same shape");
            let mut only_left: Vec<Entity> = left.keys().filter(|k| !right.contains_key(k)).map(|&k| entity(k)).collect();
            let mut only_right: Vec<Entity> = right.keys().filter(|k| !left.contains_key(k)).map(|&k| entity(k)).collect();
            let mut differing: Vec<Entity> = left.iter()
                .filter(|(k, v)| right.get(k).is_some_and(|w| w != *v))
                .map(|(&k, _)| entity(k)).collect();
            only_left.sort();
            only_right.sort();
            differing.sort();
            let expected_len = only_left.len() + only_right.len() + differing.len();
            let sorted = |mut v: Vec<Entity>| { v.sort(); v };
            prop_assert_eq!(sorted(result.only_left.clone()), only_left);
            prop_assert_eq!(sorted(result.only_right.clone()), only_right);
            prop_assert_eq!(sorted(result.differing.clone()), differing);
            prop_assert_eq!(result.is_empty(), left == right);
            prop_assert_eq!(result.len(), expected_len);
        }
    }
}
