//! Model-based test: random apply / delete / repair_apply / purge / complete-round / reopen /
//! verify sequences against a `BTreeMap` model, compared after every step, with the live tree of
//! every shard equal to a tree rebuilt from the model.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::num::NonZeroU32;

use propd_merkle::{Entity, Property, Shape, TagValue, TreeBuilder, shard_of, version_order};
use propd_store::{PurgeState, RedbStore, RepairOutcome, StoreError, VerifyOutcome};
use proptest::prelude::*;

use crate::{entity_of, open};

const SHARDS: u32 = 4;

#[derive(Debug, Clone)]
enum Op {
    Apply(Property),
    Delete {
        entity: Entity,
        revision: i64,
        delete_time: i64,
    },
    RepairApply(Property),
    Batch {
        shard: u32,
        copies: Vec<Property>,
    },
    Purge {
        shard: u32,
        line: i64,
        chunk: usize,
    },
    Round {
        shard: u32,
        started_at: i64,
        cutoff: i64,
    },
    Verify {
        shard: u32,
    },
    Reopen,
}

fn entity() -> impl Strategy<Value = Entity> {
    (prop::sample::select(&["a", "b"][..]), 0u8..6).prop_map(|(name, id)| {
        Entity::new("g", name, &format!("{id}")).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn property() -> impl Strategy<Value = Property> {
    (
        entity(),
        // Revision 0 and negative delete times are invalid: the store must refuse them and
        // change nothing.
        -1i64..6,
        prop_oneof![4 => Just(0i64), 3 => 1i64..100, 1 => Just(-5i64)],
        prop::collection::btree_map("[xy]", 0i64..3, 0..3),
    )
        .prop_map(|(entity, mod_revision, delete_time, tags)| Property {
            group: "g".to_owned(),
            name: entity.name().to_owned(),
            id: entity.id().to_owned(),
            tags: tags
                .into_iter()
                .map(|(k, v)| (k, TagValue::Int(v)))
                .collect(),
            mod_revision,
            delete_time,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => property().prop_map(Op::Apply),
        2 => (entity(), 0i64..6, 0i64..100).prop_map(|(entity, revision, delete_time)| Op::Delete {
            entity,
            revision,
            delete_time,
        }),
        3 => property().prop_map(Op::RepairApply),
        2 => (0..SHARDS, prop::collection::vec(property(), 0..5))
            .prop_map(|(shard, copies)| Op::Batch { shard, copies }),
        1 => (0..SHARDS, 0i64..150, 1usize..4).prop_map(|(shard, line, chunk)| Op::Purge {
            shard,
            line,
            chunk,
        }),
        1 => (0..SHARDS, 0i64..150, 0i64..150).prop_map(|(shard, started_at, cutoff)| Op::Round {
            shard,
            started_at,
            cutoff,
        }),
        1 => (0..SHARDS).prop_map(|shard| Op::Verify { shard }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    properties: BTreeMap<Entity, Property>,
    /// Per shard: last complete round, cutoff, purge line.
    purge: BTreeMap<u32, PurgeState>,
}

fn shard(entity: &Entity) -> u32 {
    shard_of(entity, NonZeroU32::new(SHARDS).unwrap_or(NonZeroU32::MIN))
}

fn valid_copy(property: &Property) -> bool {
    property.entity().is_ok() && property.mod_revision > 0 && property.delete_time >= 0
}

impl Model {
    fn line(&self, entity: &Entity) -> i64 {
        self.purge
            .get(&shard(entity))
            .map_or(0, |state| state.purged_below)
    }

    fn apply(&mut self, incoming: Property) -> RepairOutcome {
        let entity = entity_of(&incoming);
        let line = self.line(&entity);
        let outcome = match self.properties.get(&entity) {
            None => RepairOutcome::Applied,
            Some(ours) => match version_order(&incoming, ours, &Shape::default()) {
                Ordering::Greater => RepairOutcome::Applied,
                Ordering::Equal => RepairOutcome::Same,
                Ordering::Less => RepairOutcome::LocalNewer(ours.clone()),
            },
        };
        if outcome != RepairOutcome::Applied {
            return outcome;
        }
        if incoming.is_tombstone() && incoming.delete_time < line {
            // Below the purge line a tombstone is never stored; an older version goes.
            return match self.properties.remove(&entity) {
                Some(_) => RepairOutcome::Applied,
                None => RepairOutcome::Same,
            };
        }
        self.properties.insert(entity, incoming);
        outcome
    }
}

fn check(store: &RedbStore, model: &Model, step: usize) -> Result<(), TestCaseError> {
    for shard_index in 0..SHARDS {
        let expected: Vec<&Property> = model
            .properties
            .iter()
            .filter(|(entity, _)| shard(entity) == shard_index)
            .map(|(_, property)| property)
            .collect();
        let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        let scanned: Vec<Property> = snapshot
            .scan("g", shard_index)
            .unwrap_or_else(|e| panic!("{e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(
            scanned.iter().collect::<Vec<_>>(),
            expected.clone(),
            "step {}: shard {} contents",
            step,
            shard_index
        );
        let mut builder = TreeBuilder::new(Shape::default()).unwrap_or_else(|e| panic!("{e}"));
        for property in &expected {
            builder
                .push_property(property)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let rebuilt = builder.finish().unwrap_or_else(|e| panic!("{e}"));
        // Alternate the two read paths: the snapshot's in-memory recomputation and the flushing one.
        let live = if step.is_multiple_of(2) {
            snapshot.tree("g", shard_index)
        } else {
            drop(snapshot);
            store.tree("g", shard_index)
        }
        .unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(
            live.root(),
            rebuilt.root(),
            "step {}: root of shard {}",
            step,
            shard_index
        );
        prop_assert_eq!(
            &live,
            &rebuilt,
            "step {}: tree of shard {}",
            step,
            shard_index
        );
        let state = store
            .purge_state("g", shard_index)
            .unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(
            state,
            model.purge.get(&shard_index).copied().unwrap_or_default()
        );
    }
    for entity in model.properties.keys() {
        let stored = store.get(entity).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!(stored.as_ref(), model.properties.get(entity));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut store = open(dir.path());
        let mut model = Model::default();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Apply(property) => {
                    let result = store.apply(property.clone());
                    if valid_copy(&property) && property.delete_time == 0 {
                        let expected = model.apply(property);
                        prop_assert_eq!(result.unwrap_or_else(|e| panic!("{e}")), expected);
                    } else {
                        prop_assert!(matches!(result, Err(StoreError::Invalid(_))), "{:?}", result);
                    }
                }
                Op::Delete { entity, revision, delete_time } => {
                    let result = store.delete(&entity, revision, delete_time);
                    if revision > 0 && delete_time > 0 {
                        let found = model
                            .properties
                            .get(&entity)
                            .is_some_and(|p| !p.is_tombstone());
                        let tombstone = Property {
                            group: entity.group().to_owned(),
                            name: entity.name().to_owned(),
                            id: entity.id().to_owned(),
                            tags: BTreeMap::new(),
                            mod_revision: revision,
                            delete_time,
                        };
                        let expected = model.apply(tombstone);
                        let got = result.unwrap_or_else(|e| panic!("{e}"));
                        prop_assert_eq!(got.found, found);
                        prop_assert_eq!(got.outcome, expected);
                    } else {
                        prop_assert!(matches!(result, Err(StoreError::Invalid(_))), "{:?}", result);
                    }
                }
                Op::RepairApply(property) => {
                    let result = store.repair_apply(property.clone());
                    if valid_copy(&property) {
                        let expected = model.apply(property);
                        prop_assert_eq!(result.unwrap_or_else(|e| panic!("{e}")), expected);
                    } else {
                        prop_assert!(matches!(result, Err(StoreError::Invalid(_))), "{:?}", result);
                    }
                }
                Op::Batch { shard: target, copies } => {
                    let result = store.repair_apply_batch("g", target, copies.clone());
                    let bad = copies
                        .iter()
                        .position(|p| !valid_copy(p) || shard(&entity_of(p)) != target);
                    match bad {
                        Some(index) => prop_assert!(
                            matches!(result, Err(StoreError::BatchItem { index: i, .. }) if i == index),
                            "{:?}",
                            result
                        ),
                        None => {
                            // The model applies in entity order (stable), like the store.
                            let mut order: Vec<usize> = (0..copies.len()).collect();
                            order.sort_by_key(|&i| entity_of(&copies[i]));
                            let mut expected = vec![RepairOutcome::Same; copies.len()];
                            for i in order {
                                expected[i] = model.apply(copies[i].clone());
                            }
                            prop_assert_eq!(result.unwrap_or_else(|e| panic!("{e}")), expected);
                        }
                    }
                }
                Op::Purge { shard: target, line, chunk } => {
                    let report = store
                        .purge_tombstones("g", target, line, chunk)
                        .unwrap_or_else(|e| panic!("{e}"));
                    let state = model.purge.entry(target).or_default();
                    state.purged_below = state.purged_below.max(line);
                    let line = state.purged_below;
                    let mut purged = 0;
                    model.properties.retain(|entity, property| {
                        let doomed = shard(entity) == target
                            && property.is_tombstone()
                            && property.delete_time < line;
                        purged += u64::from(doomed);
                        !doomed
                    });
                    prop_assert_eq!(report.purged, purged);
                    prop_assert_eq!(report.purged_below, line);
                    prop_assert_eq!(report.chunks, purged.div_ceil(chunk as u64));
                }
                Op::Round { shard: target, started_at, cutoff } => {
                    store
                        .record_complete_round("g", target, started_at, cutoff)
                        .unwrap_or_else(|e| panic!("{e}"));
                    let state = model.purge.entry(target).or_default();
                    state.last_complete_round =
                        state.last_complete_round.max(Some(started_at)).filter(|t| *t > 0);
                    state.cutoff = state.cutoff.max(Some(cutoff)).filter(|t| *t > 0);
                }
                Op::Verify { shard: target } => {
                    let outcome = store.verify("g", target).unwrap_or_else(|e| panic!("{e}"));
                    prop_assert!(
                        !matches!(outcome, VerifyOutcome::Healed { .. }),
                        "the live tree never needs healing: {:?}",
                        outcome
                    );
                }
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path());
                }
            }
            check(&store, &model, step)?;
        }
    }
}
