//! Where a leaf sits in the tree (a seeded xxh3 independent of the shard hash), node addressing,
//! and the shard function everyone shares.

use std::num::NonZeroU32;
use std::ops::Range;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::entity::Entity;
use crate::shape::Shape;

/// The seed of the position hash. It makes positions independent of the shard hash (plain
/// `xxh3_64` without seed): otherwise every leaf of a shard would land in the few slots that
/// share factors with `shard_num` (the reference's collapse). Part of format version 1.
pub const TREE_SEED: u64 = 0x7072_6f70_642d_6d6b; // "propd-mk"

/// The position of a leaf: `xxh3_64_with_seed(entity bytes, TREE_SEED)`.
pub fn position(entity: &Entity) -> u64 {
    position_of_bytes(entity.as_bytes())
}

/// The position of the entity with these (already validated) bytes.
pub(crate) fn position_of_bytes(entity: &[u8]) -> u64 {
    xxh3_64_with_seed(entity, TREE_SEED)
}

/// The shard of an entity in a group of `shard_num` shards: `xxh3_64(entity bytes) % shard_num`
/// (no seed). Part of the data format: never changed without a version bump.
pub fn shard_of(entity: &Entity, shard_num: NonZeroU32) -> u32 {
    (xxh3_64(entity.as_bytes()) % shard_num.get() as u64) as u32
}

/// The address of an inner node: its level (0 the root, 1 the slots, 2..=depth+1 the bucket
/// levels) and its index within the level. Under a node of level >= 1 with index `i` the children
/// have indexes `i * fanout .. (i + 1) * fanout`; under the root, `0..slot_count`.
///
/// Ordered by (level, index): the order of storage keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// The level, 0 = root.
    pub level: u32,
    /// The index within the level.
    pub index: u64,
}

impl NodeId {
    /// The root.
    pub const ROOT: NodeId = NodeId { level: 0, index: 0 };

    /// A node id from its parts (not checked against a shape; see [`Shape::contains`]).
    pub fn new(level: u32, index: u64) -> Self {
        NodeId { level, index }
    }

    /// The parent, or `None` for the root. Needs the shape for the fanout.
    pub fn parent(self, shape: &Shape) -> Option<NodeId> {
        shape.parent(self)
    }

    /// The ids of the nodes of `level` whose index is in `indexes`, as one range in (level,
    /// index) order (a range of storage keys); `None` when `indexes` is empty.
    pub fn level_range(level: u32, indexes: Range<u64>) -> Option<Range<NodeId>> {
        (indexes.start < indexes.end)
            .then(|| NodeId::new(level, indexes.start)..NodeId::new(level, indexes.end))
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.level, self.index)
    }
}

impl Shape {
    /// The fanout as a divisor: at least 1, so that no method panics even on an unvalidated shape.
    fn fanout_u64(&self) -> u64 {
        self.fanout.max(1) as u64
    }

    /// The bucket index of a position: the slot is `p % slot_count`; each bucket level below
    /// appends the next base-`fanout` digit of `p / slot_count`, least significant first.
    pub fn bucket_index(&self, position: u64) -> u64 {
        let slot_count = self.slot_count.max(1) as u64;
        let fanout = self.fanout_u64();
        if slot_count.is_power_of_two() && fanout.is_power_of_two() {
            // The same digits by shifts and masks (the default shape's case): a 64-bit division
            // per digit is a large part of placing a leaf.
            let (slot_bits, fanout_bits) = (slot_count.trailing_zeros(), fanout.trailing_zeros());
            let mut index = position & (slot_count - 1);
            let mut rest = position >> slot_bits;
            for _ in 0..self.depth {
                index = (index << fanout_bits) | (rest & (fanout - 1));
                rest >>= fanout_bits;
            }
            return index;
        }
        let mut index = position % slot_count;
        let mut rest = position / slot_count;
        for _ in 0..self.depth {
            index = index.wrapping_mul(fanout).wrapping_add(rest % fanout);
            rest /= fanout;
        }
        index
    }

    /// The bucket (node at [`Shape::bucket_level`]) that holds an entity's leaf.
    pub fn bucket_of(&self, entity: &Entity) -> NodeId {
        NodeId {
            level: self.bucket_level(),
            index: self.bucket_index(position(entity)),
        }
    }

    /// Whether the node exists in a tree of this shape.
    pub fn contains(&self, node: NodeId) -> bool {
        node.level <= self.bucket_level() && node.index < self.level_width(node.level)
    }

    /// The parent of a node, `None` for the root.
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        match node.level {
            0 => None,
            1 => Some(NodeId::ROOT),
            level => Some(NodeId {
                level: level - 1,
                index: node.index / self.fanout_u64(),
            }),
        }
    }

    /// The ancestor of `node` at `level` (the node itself at its own level). `level` must not be
    /// below the node's level.
    pub fn ancestor(&self, node: NodeId, level: u32) -> NodeId {
        if level == 0 {
            return NodeId::ROOT;
        }
        let up = node.level.saturating_sub(level);
        NodeId {
            level: node.level.min(level),
            index: node.index / self.fanout_u64().saturating_pow(up),
        }
    }

    /// The position of a node under its parent: its slot under the root, else `index % fanout`.
    pub fn child_position(&self, node: NodeId) -> u32 {
        match node.level {
            0 => 0,
            1 => node.index as u32,
            _ => (node.index % self.fanout_u64()) as u32,
        }
    }

    /// The indexes, at `level + 1`, of a node's children (empty for a bucket).
    pub fn child_range(&self, node: NodeId) -> Range<u64> {
        if node.level >= self.bucket_level() {
            return 0..0;
        }
        if node.level == 0 {
            return 0..self.slot_count as u64;
        }
        let fanout = self.fanout_u64();
        // Saturating: a node id from the wire may be out of range; it then gets an empty range.
        node.index.saturating_mul(fanout)..node.index.saturating_add(1).saturating_mul(fanout)
    }

    /// A node's children (empty for a bucket).
    pub fn children(&self, node: NodeId) -> impl Iterator<Item = NodeId> + use<> {
        let level = node.level.saturating_add(1);
        self.child_range(node)
            .map(move |index| NodeId { level, index })
    }

    /// The bucket indexes under a node: contiguous because a child's index is
    /// `parent * fanout + digit`. The root covers every bucket; a bucket covers itself.
    pub fn bucket_range(&self, node: NodeId) -> Range<u64> {
        if node.level == 0 {
            return 0..self.bucket_count();
        }
        let span = self
            .fanout_u64()
            .saturating_pow(self.bucket_level().saturating_sub(node.level));
        node.index.saturating_mul(span)..node.index.saturating_add(1).saturating_mul(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shift-and-mask path and the arithmetic one place a position in the same bucket, and
    /// shapes of other counts (not powers of two) use the digits the definition gives.
    #[test]
    fn bucket_indexes_follow_the_definition_whatever_the_counts() {
        for (slot_count, fanout, depth) in [(4, 16, 2), (3, 16, 2), (4, 3, 2), (5, 7, 3), (1, 2, 4)]
        {
            let shape = Shape {
                slot_count,
                fanout,
                depth,
                ..Shape::default()
            };
            let (slots, fan) = (u64::from(slot_count), u64::from(fanout));
            for position in (0..5_000u64).chain([u64::MAX - 3, u64::MAX]) {
                let mut expected = position % slots;
                let mut rest = position / slots;
                for _ in 0..depth {
                    expected = expected * fan + rest % fan;
                    rest /= fan;
                }
                assert_eq!(
                    shape.bucket_index(position),
                    expected,
                    "{slot_count} slots, fanout {fanout}, position {position}"
                );
            }
        }
        assert_eq!(NodeId::new(2, 5).to_string(), "2:5");
    }

    /// A node exists only at a level of the shape and within its level's width; a slot's
    /// position under the root is its index, however many slots there are.
    #[test]
    fn nodes_exist_within_their_levels_and_slots_sit_at_their_index() {
        let shape = Shape {
            slot_count: 40,
            fanout: 16,
            depth: 2,
            ..Shape::default()
        };
        let buckets = shape.bucket_level();
        assert!(shape.contains(NodeId::ROOT));
        assert!(shape.contains(NodeId::new(1, 39)));
        assert!(!shape.contains(NodeId::new(1, 40)));
        assert!(shape.contains(NodeId::new(buckets, 40 * 256 - 1)));
        assert!(!shape.contains(NodeId::new(buckets, 40 * 256)));
        assert!(!shape.contains(NodeId::new(buckets + 1, 0)));
        assert_eq!(shape.child_position(NodeId::new(1, 20)), 20);
        assert_eq!(shape.child_position(NodeId::new(2, 20 * 16 + 5)), 5);
        assert_eq!(shape.child_position(NodeId::ROOT), 0);
    }

    #[test]
    fn bucket_digits_follow_the_documented_rule() {
        let shape = Shape {
            slot_count: 32,
            fanout: 16,
            depth: 2,
            ..Shape::default()
        };
        // p = 5 + 32 * (3 + 16 * 7): slot 5, then digits 3 and 7.
        let p = 5 + 32 * (3 + 16 * 7);
        assert_eq!(shape.bucket_index(p), (5 * 16 + 3) * 16 + 7);
        let bucket = NodeId::new(3, shape.bucket_index(p));
        assert_eq!(shape.ancestor(bucket, 1), NodeId::new(1, 5));
        assert_eq!(shape.ancestor(bucket, 2), NodeId::new(2, 5 * 16 + 3));
        assert_eq!(bucket.parent(&shape), Some(NodeId::new(2, 5 * 16 + 3)));
        assert_eq!(shape.child_position(bucket), 7);
        assert_eq!(NodeId::new(1, 5).parent(&shape), Some(NodeId::ROOT));
        assert_eq!(NodeId::ROOT.parent(&shape), None);
    }

    #[test]
    fn power_of_two_shapes_place_leaves_as_the_division_rule_does() {
        // The documented rule, by division, for any shape.
        fn by_division(shape: &Shape, position: u64) -> u64 {
            let slot_count = shape.slot_count as u64;
            let fanout = shape.fanout as u64;
            let mut index = position % slot_count;
            let mut rest = position / slot_count;
            for _ in 0..shape.depth {
                index = index.wrapping_mul(fanout).wrapping_add(rest % fanout);
                rest /= fanout;
            }
            index
        }
        let shapes = [
            Shape::default(),
            Shape::reference(),
            Shape {
                slot_count: 1,
                fanout: 2,
                depth: 8,
                ..Shape::default()
            },
            Shape {
                slot_count: 65_536,
                fanout: 256,
                depth: 2,
                ..Shape::default()
            },
            Shape {
                slot_count: 3,
                fanout: 5,
                depth: 4,
                ..Shape::default()
            },
        ];
        for shape in shapes {
            let mut position = 0x9e37_79b9_7f4a_7c15_u64;
            for _ in 0..1000 {
                position = position.rotate_left(17).wrapping_mul(0x2545_f491_4f6c_dd1d);
                assert_eq!(shape.bucket_index(position), by_division(&shape, position));
                assert!(shape.bucket_index(position) < shape.bucket_count());
            }
            assert_eq!(shape.bucket_index(u64::MAX), by_division(&shape, u64::MAX));
        }
    }

    #[test]
    fn level_ranges_stay_within_their_level() {
        let range = NodeId::level_range(2, 3..5).expect("non-empty");
        assert_eq!(range, NodeId::new(2, 3)..NodeId::new(2, 5));
        assert!(!range.contains(&NodeId::new(1, 4)) && !range.contains(&NodeId::new(3, 4)));
        assert_eq!(NodeId::level_range(2, 5..5), None);
        assert_eq!(NodeId::level_range(2, Range { start: 6, end: 5 }), None);
    }

    #[test]
    fn bucket_ranges_nest() {
        let shape = Shape::default();
        assert_eq!(shape.bucket_range(NodeId::ROOT), 0..131_072);
        assert_eq!(shape.bucket_range(NodeId::new(1, 2)), 2 * 4096..3 * 4096);
        assert_eq!(shape.bucket_range(NodeId::new(4, 9)), 9..10);
        let children: Vec<NodeId> = shape.children(NodeId::new(1, 2)).collect();
        assert_eq!(children.len(), 16);
        assert_eq!(children[0], NodeId::new(2, 32));
        assert_eq!(shape.children(NodeId::ROOT).count(), 32);
        assert_eq!(shape.children(NodeId::new(4, 0)).count(), 0);
    }

    #[test]
    fn depth_zero_buckets_are_the_slots() {
        let shape = Shape::reference();
        let entity = Entity::parse("g/n/i").expect("valid");
        let bucket = shape.bucket_of(&entity);
        assert_eq!(bucket, NodeId::new(1, position(&entity) % 32));
    }

    #[test]
    fn shard_of_is_plain_xxh3_modulo() {
        let entity = Entity::parse("g/n/i").expect("valid");
        let n = NonZeroU32::new(7).expect("non-zero");
        assert_eq!(shard_of(&entity, n) as u64, xxh3_64(b"g/n/i") % 7);
        assert_ne!(position(&entity), xxh3_64(b"g/n/i"));
    }

    #[test]
    fn leaves_of_one_shard_spread_over_all_slots() {
        // The reference took slots from the shard hash, so a shard's leaves met in
        // slot_count / gcd(slot_count, shard_num) slots: one slot when shard_num = 32.
        let shape = Shape::default();
        let entities: Vec<Entity> = (0..20_000)
            .map(|i| Entity::new("group", "name", &format!("id-{i}")).expect("valid"))
            .collect();
        for shard_num in [1u32, 2, 4, 8, 32] {
            let n = NonZeroU32::new(shard_num).expect("non-zero");
            for shard in [0, shard_num - 1] {
                let mut per_slot = vec![0u32; shape.slot_count as usize];
                let mut collapsed = std::collections::BTreeSet::new();
                for entity in entities.iter().filter(|e| shard_of(e, n) == shard) {
                    per_slot[shape.ancestor(shape.bucket_of(entity), 1).index as usize] += 1;
                    collapsed.insert(xxh3_64(entity.as_bytes()) % shape.slot_count as u64);
                }
                let total: u32 = per_slot.iter().sum();
                let mean = total as f64 / per_slot.len() as f64;
                let (min, max) = (
                    per_slot.iter().min().copied(),
                    per_slot.iter().max().copied(),
                );
                assert!(
                    min > Some(0),
                    "shard_num {shard_num} shard {shard}: an empty slot in {per_slot:?}"
                );
                assert!(
                    max.is_some_and(|m| (m as f64) < 2.5 * mean),
                    "shard_num {shard_num}: {per_slot:?}"
                );
                assert_eq!(
                    collapsed.len(),
                    32 / shard_num as usize,
                    "the reference's collapse"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn addressing_never_panics_on_any_shape_or_node(
            slot_count: u32, fanout: u32, depth in 0u32..64, level: u32, index: u64, p: u64,
        ) {
            let shape = Shape { slot_count, fanout, depth, ..Shape::default() };
            let node = NodeId::new(level, index);
            let _ = shape.bucket_index(p);
            let _ = (shape.parent(node), shape.ancestor(node, level / 2), shape.child_position(node));
            let _ = (shape.child_range(node), shape.bucket_range(node), shape.contains(node));
            let _ = (shape.level_width(level), shape.bucket_count());
            // And a valid tree answers any node id, in range or not.
            let tree = crate::Tree::empty(Shape::default()).expect("valid");
            let _ = (tree.node(node), tree.children(node), tree.leaves_under(node));
            let edge = NodeId::new(u32::MAX, u64::MAX);
            let _ = (tree.node(edge), tree.children(edge), tree.leaves_under(edge), shape.children(edge).next());
            let _ = (shape.child_range(edge), shape.bucket_range(edge), shape.parent(edge), shape.ancestor(edge, 1));
        }
    }
}
