//! Concurrent synced writers and the group commit: every acknowledged write is readable with its
//! tree entry, and the shards end exactly as the same writes one by one leave them (revisions,
//! leaf log, properties, trees).

use std::collections::BTreeMap;
use std::path::Path;

use propd_merkle::{Entity, Property, Shape, TagValue};
use propd_store::{RedbStore, RepairOutcome, StoreConfig, StoreError, WriteDurability};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::{entity_of, groups, live};

const THREADS: u64 = 8;
const OPS: u64 = 24;
/// Each thread updates its own ten entities again and again.
const ENTITIES: u64 = 10;

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// One write of the test workload.
#[derive(Debug, Clone)]
enum Op {
    Apply(Property),
    Delete(Entity, i64),
    Batch(Vec<Property>),
}

/// Thread `t`'s writes, in its order: applies of its own entities with rising revisions, every
/// sixth a delete of the entity written just before, and (thread 0) batches of copies into `h`.
fn ops(t: u64) -> Vec<Op> {
    (0..OPS)
        .map(|k| {
            let revision = k as i64 + 1;
            if t == 0 && k % 4 == 0 {
                return Op::Batch(
                    (0..4)
                        .map(|b| live("h", "b", &format!("{k}-{b}"), revision, &[]))
                        .collect(),
                );
            }
            if k % 6 == 5 {
                let id = format!("t{t}-{}", (k - 1) % ENTITIES);
                return Op::Delete(entity(&id), revision);
            }
            let id = format!("t{t}-{}", k % ENTITIES);
            Op::Apply(live(
                "g",
                "n",
                &id,
                revision,
                &[("k", TagValue::Int(k as i64))],
            ))
        })
        .collect()
}

fn entity(id: &str) -> Entity {
    Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs one op; every op of the workload is applied (its revision is the newest of its entity).
fn run(store: &RedbStore, op: &Op) {
    let outcomes = match op {
        Op::Apply(property) => vec![ok(store.apply(property.clone()))],
        Op::Delete(entity, revision) => {
            vec![ok(store.delete(entity, *revision, *revision)).outcome]
        }
        Op::Batch(copies) => ok(store.repair_apply_batch("h", 0, copies.clone())),
    };
    assert!(
        outcomes
            .iter()
            .all(|outcome| *outcome == RepairOutcome::Applied),
        "{op:?}: {outcomes:?}"
    );
}

fn store_config(dir: &Path, durability: WriteDurability) -> StoreConfig {
    let mut config = StoreConfig::new(dir, groups(), Shape::default());
    config.durability = durability;
    config
}

fn open_store(dir: &Path, durability: WriteDurability) -> RedbStore {
    ok(RedbStore::open(store_config(dir, durability)))
}

/// Per shard: revision, properties, and the leaf log's sequence numbers and entries (sorted: the
/// entries' order follows the commit order, which threads make arbitrary).
#[derive(Debug, PartialEq, Eq)]
struct ShardState {
    revision: u64,
    properties: Vec<Property>,
    log_keys: Vec<u64>,
    log_entries: Vec<Vec<u8>>,
}

const SHARDS: [(&str, u32); 5] = [("g", 0), ("g", 1), ("g", 2), ("g", 3), ("h", 0)];

/// Reads every shard's state; closes the store to read the leaf log with redb itself.
fn shard_states(store: RedbStore) -> BTreeMap<(&'static str, u32), ShardState> {
    let snapshot = ok(store.snapshot());
    let mut read: Vec<(u64, Vec<Property>)> = Vec::new();
    for (group, shard) in SHARDS {
        let properties = ok(snapshot.scan(group, shard)).map(ok).collect();
        read.push((ok(snapshot.revision(group, shard)), properties));
    }
    let path = store.path().to_owned();
    drop(snapshot);
    drop(store);
    let db = redb::Database::open(&path).unwrap_or_else(|e| panic!("{e}"));
    let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
    SHARDS
        .into_iter()
        .zip(read)
        .map(|((group, shard), (revision, properties))| {
            let name = format!("log/{group}/{shard}");
            let table = txn
                .open_table(TableDefinition::<u64, &[u8]>::new(&name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut log_keys = Vec::new();
            let mut log_entries = Vec::new();
            for row in table.iter().unwrap_or_else(|e| panic!("{e}")) {
                let (key, value) = row.unwrap_or_else(|e| panic!("{e}"));
                log_keys.push(key.value());
                log_entries.push(value.value().to_vec());
            }
            log_entries.sort();
            let state = ShardState {
                revision,
                properties,
                log_keys,
                log_entries,
            };
            ((group, shard), state)
        })
        .collect()
}

/// Runs `writer(t)` for every `t < threads` at once, each on a thread of its own; a panic in one
/// fails the caller once all are done.
fn in_threads(threads: u64, writer: impl Fn(u64) + Sync) {
    std::thread::scope(|scope| {
        for t in 0..threads {
            let writer = &writer;
            scope.spawn(move || writer(t));
        }
    });
}

#[test]
fn concurrent_writers_leave_the_shards_as_the_same_writes_one_by_one() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Synced, group commit on (the defaults); the flush threshold is far above the workload, so
    // the leaf log keeps every entry for the comparison.
    let store = open_store(dir.path(), WriteDurability::Immediate);
    in_threads(THREADS, |t| {
        for op in ops(t) {
            run(&store, &op);
        }
    });

    // Every acknowledged write is readable (its entity's last write wins), with its tree entry.
    let snapshot = ok(store.snapshot());
    let shape = store.shape();
    let mut last: BTreeMap<Entity, Property> = BTreeMap::new();
    for t in 0..THREADS {
        for op in ops(t) {
            match op {
                Op::Apply(property) => {
                    last.insert(entity_of(&property), property);
                }
                Op::Delete(entity, revision) => {
                    let tombstone = Property {
                        delete_time: revision,
                        ..live("g", "n", entity.id(), revision, &[])
                    };
                    last.insert(entity, tombstone);
                }
                Op::Batch(copies) => {
                    last.extend(copies.into_iter().map(|p| (entity_of(&p), p)));
                }
            }
        }
    }
    let trees: BTreeMap<(&str, u32), BTreeMap<Entity, propd_merkle::Digest>> = SHARDS
        .into_iter()
        .map(|(group, shard)| {
            let tree = ok(snapshot.tree(group, shard));
            let leaves = tree
                .leaves()
                .iter()
                .map(|leaf| (leaf.entity.clone(), leaf.digest))
                .collect();
            ((group, shard), leaves)
        })
        .collect();
    for (entity, property) in &last {
        assert_eq!(
            ok(snapshot.get(entity)).as_ref(),
            Some(property),
            "{entity}"
        );
        let in_tree = trees
            .iter()
            .find_map(|(_, leaves)| leaves.get(entity))
            .copied();
        assert_eq!(
            in_tree,
            Some(shape.digest(&property.canonical_bytes())),
            "{entity}'s tree entry"
        );
    }
    drop(snapshot);
    let concurrent = shard_states(store);

    // The same writes one by one, thread after thread, in a store of their own.
    let sequential_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let sequential = open_store(sequential_dir.path(), WriteDurability::NotSynced);
    for t in 0..THREADS {
        for op in ops(t) {
            run(&sequential, &op);
        }
    }
    let sequential = shard_states(sequential);
    for (shard, state) in &concurrent {
        let expected = (0..state.revision).collect::<Vec<_>>();
        assert_eq!(
            state.log_keys, expected,
            "{shard:?}: one log entry per change"
        );
    }
    assert_eq!(concurrent, sequential);
}

#[test]
fn group_commit_on_and_off_store_the_same() {
    // The switch changes how writes share syncs, never what they store.
    let mut states = Vec::new();
    for group_commit in [true, false] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut config = store_config(dir.path(), WriteDurability::Immediate);
        config.group_commit = group_commit;
        let store = ok(RedbStore::open(config));
        for op in ops(0).iter().chain(&ops(1)) {
            run(&store, op);
        }
        states.push(shard_states(store));
    }
    assert_eq!(states[0], states[1]);
}

#[test]
fn a_refused_write_among_concurrent_writers_refuses_only_itself() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open_store(dir.path(), WriteDurability::Immediate);
    in_threads(4, |t| {
        for k in 0..10u64 {
            let good = live("g", "n", &format!("good-{t}-{k}"), 1, &[]);
            assert_eq!(ok(store.apply(good)), RepairOutcome::Applied);
            // Revision 0 is refused for an apply (DESIGN §9).
            let bad = live("g", "n", &format!("bad-{t}-{k}"), 0, &[]);
            match store.apply(bad) {
                Err(StoreError::Invalid(_)) => {}
                other => panic!("a revision-0 apply must be refused: {other:?}"),
            }
        }
    });
    let snapshot = ok(store.snapshot());
    let mut stored = 0;
    for shard in 0..4 {
        for property in ok(snapshot.scan("g", shard)) {
            assert!(ok(property).id.starts_with("good-"));
            stored += 1;
        }
    }
    assert_eq!(stored, 40, "every good write, no refused one");
}
