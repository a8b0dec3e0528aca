//! The laws of the version order (DESIGN §3) and convergence of `repair_apply` in any order.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use propd_merkle::{Property, Shape, TagValue, version_order};
use propd_store::{ModelStore, RepairOutcome};
use proptest::prelude::*;

use crate::{entity_of, groups};

/// A copy of the entity `g/n/<id>`: small revisions and delete times so that ties are frequent.
fn copy(ids: &'static [&'static str]) -> impl Strategy<Value = Property> {
    (
        prop::sample::select(ids),
        1i64..4,
        prop_oneof![Just(0i64), 1i64..3],
        prop::collection::btree_map("[ab]", 0i64..3, 0..3),
    )
        .prop_map(|(id, mod_revision, delete_time, tags)| Property {
            group: "g".to_owned(),
            name: "n".to_owned(),
            id: id.to_owned(),
            // A tombstone carries no tags, as every delete stores it.
            tags: if delete_time > 0 {
                BTreeMap::new()
            } else {
                tags.into_iter()
                    .map(|(k, v)| (k, TagValue::Int(v)))
                    .collect()
            },
            mod_revision,
            delete_time,
        })
}

fn merge(a: &Property, b: &Property) -> Property {
    if version_order(a, b, &Shape::default()) == Ordering::Less {
        b.clone()
    } else {
        a.clone()
    }
}

fn final_state(store: &ModelStore) -> (Vec<Property>, propd_merkle::Tree) {
    let mut all = Vec::new();
    for shard in 0..4 {
        all.extend(
            store
                .properties("g", shard)
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    (all, tree_of(store))
}

fn tree_of(store: &ModelStore) -> propd_merkle::Tree {
    // Every test entity `g/n/*` used here lives in some shard of g; collect the trees of all.
    let trees: Vec<_> = (0..4)
        .map(|shard| store.tree("g", shard).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let mut builder =
        propd_merkle::TreeBuilder::new(Shape::default()).unwrap_or_else(|e| panic!("{e}"));
    for tree in &trees {
        for leaf in tree.leaves() {
            builder
                .push(leaf.entity.clone(), leaf.digest)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    builder.finish().unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn order_is_total_and_antisymmetric(a in copy(&["x"]), b in copy(&["x"])) {
        let shape = Shape::default();
        let ab = version_order(&a, &b, &shape);
        prop_assert_eq!(ab, version_order(&b, &a, &shape).reverse());
        prop_assert_eq!(ab == Ordering::Equal, a == b, "Equal only for identical copies");
    }

    #[test]
    fn merge_is_commutative(a in copy(&["x"]), b in copy(&["x"])) {
        prop_assert_eq!(merge(&a, &b), merge(&b, &a));
    }

    #[test]
    fn merge_is_associative(a in copy(&["x"]), b in copy(&["x"]), c in copy(&["x"])) {
        prop_assert_eq!(merge(&merge(&a, &b), &c), merge(&a, &merge(&b, &c)));
    }

    /// Merging what a store already holds changes nothing: applied again, in reverse order,
    /// every copy answers `Same` or `LocalNewer` (never `Applied`), and the properties and
    /// trees stay as they were.
    #[test]
    fn merge_is_idempotent(copies in prop::collection::vec(copy(&["x", "y"]), 1..8)) {
        let store = ModelStore::new(groups(), Shape::default()).unwrap_or_else(|e| panic!("{e}"));
        for copy in &copies {
            store.repair_apply(copy.clone()).unwrap_or_else(|e| panic!("{e}"));
        }
        let before = final_state(&store);
        for copy in copies.iter().rev() {
            let outcome = store.repair_apply(copy.clone()).unwrap_or_else(|e| panic!("{e}"));
            prop_assert!(
                !matches!(outcome, RepairOutcome::Applied),
                "{:?} was applied again: {:?}", copy, outcome
            );
        }
        prop_assert_eq!(final_state(&store), before);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Two stores that receive the same copies in different orders (and one of them every copy
    /// twice) end identical, holding the newest copy of each entity; an `Applied` never follows
    /// for a copy older than what is stored.
    #[test]
    fn repair_apply_in_any_order_converges(
        copies in prop::collection::vec(copy(&["x", "y", "z", "w"]), 1..24),
        seed in any::<u64>(),
    ) {
        let left = ModelStore::new(groups(), Shape::default()).unwrap_or_else(|e| panic!("{e}"));
        let right = ModelStore::new(groups(), Shape::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut shuffled = copies.clone();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        for copy in &copies {
            left.repair_apply(copy.clone()).unwrap_or_else(|e| panic!("{e}"));
        }
        for copy in shuffled.iter().chain(shuffled.iter().rev()) {
            let before = right.get(&entity_of(copy)).unwrap_or_else(|e| panic!("{e}"));
            let outcome = right.repair_apply(copy.clone()).unwrap_or_else(|e| panic!("{e}"));
            if let Some(before) = before {
                let order = version_order(copy, &before, &Shape::default());
                let expected = match order {
                    Ordering::Greater => RepairOutcome::Applied,
                    Ordering::Equal => RepairOutcome::Same,
                    Ordering::Less => RepairOutcome::LocalNewer(before),
                };
                prop_assert_eq!(outcome, expected);
            }
        }
        let mut newest: BTreeMap<String, Property> = BTreeMap::new();
        for copy in &copies {
            let key = entity_of(copy).to_string();
            let winner = match newest.get(&key) {
                Some(current) => merge(current, copy),
                None => copy.clone(),
            };
            newest.insert(key, winner);
        }
        let (left_props, left_tree) = final_state(&left);
        let (right_props, right_tree) = final_state(&right);
        prop_assert_eq!(&left_tree, &right_tree);
        let mut expected: Vec<Property> = newest.into_values().collect();
        let mut got = left_props;
        got.sort_by_key(|p| entity_of(p).to_string());
        expected.sort_by_key(|p| entity_of(p).to_string());
        prop_assert_eq!(&got, &expected);
        let mut right_sorted = right_props;
        right_sorted.sort_by_key(|p| entity_of(p).to_string());
        prop_assert_eq!(&right_sorted, &expected);
    }
}

/// The model's change counter moves once per stored change (a write, a delete) and not for a
/// copy the version order turns away.
#[test]
fn the_models_revision_counts_its_changes() {
    let store = ModelStore::new(groups(), Shape::default()).unwrap_or_else(|e| panic!("{e}"));
    let revision = || store.revision("h", 0).unwrap_or_else(|e| panic!("{e}"));
    let live = |mod_revision| Property {
        group: "h".to_owned(),
        name: "n".to_owned(),
        id: "a".to_owned(),
        mod_revision,
        ..Property::default()
    };
    assert_eq!(revision(), 0);
    store.apply(live(2)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(revision(), 1);
    store.apply(live(1)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(revision(), 1, "an older copy changes nothing");
    store
        .delete(&entity_of(&live(3)), 3, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(revision(), 2);
}

/// The model keeps what the redb store keeps: a read returns the stored copy, a delete says
/// whether it found a live version, a complete round is recorded (never moving back), and a
/// purge removes its tombstones from the copies and the tree (one change each).
#[test]
fn the_model_reads_deletes_records_and_purges_as_a_store() {
    let store = ModelStore::new(groups(), Shape::default()).unwrap_or_else(|e| panic!("{e}"));
    let live = Property {
        group: "h".to_owned(),
        name: "n".to_owned(),
        id: "a".to_owned(),
        mod_revision: 1,
        ..Property::default()
    };
    let entity = entity_of(&live);
    store.apply(live.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.get(&entity).ok(), Some(Some(live.clone())));
    let first = store
        .delete(&entity, 2, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(first.found, "a live version was there");
    let again = store
        .delete(&entity, 3, 20)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!again.found, "only a tombstone was there");

    let fresh = store.purge_state("h", 0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (fresh.last_complete_round, fresh.cutoff, fresh.purged_below),
        (None, None, 0)
    );
    store
        .record_complete_round("h", 0, 100, 50)
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .record_complete_round("h", 0, 90, 40)
        .unwrap_or_else(|e| panic!("{e}"));
    let state = store.purge_state("h", 0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (state.last_complete_round, state.cutoff),
        (Some(100), Some(50))
    );

    let before = store.revision("h", 0).unwrap_or_else(|e| panic!("{e}"));
    let report = store
        .purge_tombstones("h", 0, 30, 8)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.purged, 1);
    assert_eq!(store.get(&entity).ok(), Some(None));
    assert_eq!(store.tree("h", 0).map(|t| t.leaf_count()).ok(), Some(0));
    assert_eq!(store.revision("h", 0).ok(), Some(before + 1));
}
