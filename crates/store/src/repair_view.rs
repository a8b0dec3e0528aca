//! The repair protocol's view of a store: the trait and its types are defined in
//! `propd_merkle::repair_store` (so that the repair core links no database) and re-exported here;
//! this file keeps what both of this crate's stores do alike behind it: the version-order
//! decision, the order a batch is applied in, and a page of leaves after a cursor.

use std::cmp::Ordering;

use propd_merkle::{Entity, Leaf, Property, Shape, version_order};

#[cfg(feature = "test-support")]
use crate::{error::StoreError, validate::Checked};

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

/// Whether `property` is a tombstone below a purge line: such a tombstone is purged, never
/// stored and never sent (docs/protocol.md, "The life of a delete").
pub(crate) fn below_line(property: &Property, purged_below: i64) -> bool {
    property.is_tombstone() && property.delete_time < purged_below
}

/// What a write of one copy does to the stored version, by the version order and the purge line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The incoming copy is newer: store it ([`RepairOutcome::Applied`]).
    Store,
    /// The incoming copy is a newer tombstone below the line: the stored version goes and
    /// nothing is stored (the delete takes effect, its tombstone is purged at once;
    /// [`RepairOutcome::Applied`]).
    RemoveOurs,
    /// Nothing changes; the outcome to report.
    Keep(RepairOutcome),
}

/// Decides what writing `incoming` over `ours` does on a copy whose purge line is
/// `purged_below`.
pub(crate) fn decide_at_line(
    ours: Option<&Property>,
    incoming: &Property,
    shape: &Shape,
    purged_below: i64,
) -> Decision {
    match decide(ours, incoming, shape) {
        RepairOutcome::Applied if below_line(incoming, purged_below) => match ours {
            Some(_) => Decision::RemoveOurs,
            None => Decision::Keep(RepairOutcome::Same),
        },
        RepairOutcome::Applied => Decision::Store,
        outcome => Decision::Keep(outcome),
    }
}

/// The order in which a batch is applied: input positions sorted by entity, stable, so repeated
/// entities keep their input order.
pub(crate) fn entity_order<T>(items: &[T], entity: impl Fn(&T) -> &Entity) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| entity(&items[a]).cmp(entity(&items[b])));
    order
}

/// Applies a checked batch item by item in entity order (see [`entity_order`]) with `apply`, and
/// returns the outcomes in input order. (The model store's; the redb store applies through its
/// writers.)
#[cfg(feature = "test-support")]
pub(crate) fn apply_in_entity_order(
    checked: &[Checked],
    mut apply: impl FnMut(&Checked) -> Result<RepairOutcome, StoreError>,
) -> Result<Vec<RepairOutcome>, StoreError> {
    let mut outcomes = vec![RepairOutcome::Same; checked.len()];
    for index in entity_order(checked, |item| &item.entity) {
        outcomes[index] = apply(&checked[index])?;
    }
    Ok(outcomes)
}

/// One page of leaves in `(bucket, entity)` order: those strictly after `after`, at most `limit`.
pub(crate) fn page_after(leaves: Vec<Leaf>, after: Option<&LeafKey>, limit: usize) -> Vec<Leaf> {
    leaves
        .into_iter()
        .filter(|leaf| after.is_none_or(|after| LeafKey::of(leaf) > *after))
        .take(limit)
        .collect()
}
