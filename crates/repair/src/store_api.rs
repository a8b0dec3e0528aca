//! The store's repair view as this crate uses it (a thin adapter over `propd_merkle::repair_store`,
//! which the node's store implements).

use propd_merkle::Leaf;
pub(crate) use propd_merkle::repair_store::{LeafKey, RepairOutcome, RepairStore};

/// The paging cursor just after `leaf`.
pub(crate) fn leaf_key(leaf: &Leaf) -> LeafKey {
    LeafKey::of(leaf)
}
