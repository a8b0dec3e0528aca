//! The repair protocol's view of a store: the trait and its types are defined in
//! `propd_merkle::repair_store` (so that the repair core links no database) and re-exported here;
//! this file keeps the version-order decision both of this crate's stores apply.

use std::cmp::Ordering;

use propd_merkle::{Entity, Property, Shape, version_order};

pub use propd_merkle::repair_store::{LeafKey, RepairOutcome, RepairStore};

/// Decides what applying `incoming` over `ours` does, by the total version order.
pub(crate) fn decide(ours: Option<&Property>, incoming: &Property, shape: &Shape) -> RepairOutcome {
    match ours {
        None => RepairOutcome::Applied,
        Some(ours) => match version_order(incoming, ours, shape) {
            Ordering::Greater => RepairOutcome::Applied,
            Ordering::Equal => RepairOutcome::Same,
            Ordering::Less => RepairOutcome::LocalNewer(ours.clone()),
        },
    }
}

/// The order in which a batch is applied: input positions sorted by entity, stable, so repeated
/// entities keep their input order.
pub(crate) fn entity_order<T>(items: &[T], entity: impl Fn(&T) -> &Entity) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| entity(&items[a]).cmp(entity(&items[b])));
    order
}
