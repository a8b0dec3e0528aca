//! The redb store's own behaviour: reopening, configuration checks, queries, deletes, revisions,
//! tree views and export, verification and healing, tombstone purges.

use std::time::Duration;

use propd_merkle::{NodeId, Property, Shape, TagValue, snapshot};
use propd_store::{
    ConfigError, GroupDef, Groups, PURGE_CHUNK, PurgeReport, PurgeState, Query, RedbStore,
    RepairOutcome, RepairStore, StoreError, TreeUpkeep, VerifyOutcome, purge_line, round_cutoff,
};

use crate::{config, entity_of, groups, live, open};

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn data_survives_reopen_and_the_recorded_config_is_enforced() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let property = live("g", "n", "1", 5, &[("k", TagValue::Str("v".into()))]);
    {
        let store = open(dir.path());
        ok(store.apply(property.clone()));
        ok(store.record_complete_round("g", 0, 77, 70));
        ok(store.purge_tombstones("g", 0, 60, PURGE_CHUNK));
    }
    let store = open(dir.path());
    assert_eq!(ok(store.get(&entity_of(&property))), Some(property.clone()));
    assert_eq!(
        ok(store.purge_state("g", 0)),
        PurgeState {
            last_complete_round: Some(77),
            cutoff: Some(70),
            purged_below: 60
        }
    );
    drop(store);

    let mut other_shape = config(dir.path());
    other_shape.shape = Shape::reference();
    match RedbStore::open(other_shape) {
        Err(StoreError::Config(ConfigError::ShapeChanged { .. })) => {}
        other => panic!("another shape must be refused, got {other:?}"),
    }
    let mut other_shards = config(dir.path());
    other_shards.groups =
        Groups::new([GroupDef::new("g", 8, 2)]).unwrap_or_else(|error| panic!("{error}"));
    match RedbStore::open(other_shards) {
        Err(StoreError::Config(ConfigError::ShardNumChanged {
            stored: 4,
            given: 8,
            ..
        })) => {}
        other => panic!("another shard_num must be refused, got {other:?}"),
    }
    let mut more_groups = config(dir.path());
    more_groups.groups = Groups::new(groups().iter().cloned().chain([GroupDef::new("new", 2, 1)]))
        .unwrap_or_else(|error| panic!("{error}"));
    let store = RedbStore::open(more_groups).unwrap_or_else(|e| panic!("adding a group: {e}"));
    assert_eq!(ok(store.get(&entity_of(&property))), Some(property));
    assert!(store.groups().has_shard("new", 1));
}

#[test]
fn queries_filter_by_name_ids_tags_and_limit() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    let color = |c: &str| [("color", TagValue::Str(c.into()))];
    for i in 0..12 {
        let name = if i % 2 == 0 { "even" } else { "odd" };
        let c = if i % 3 == 0 { "red" } else { "blue" };
        ok(store.apply(live("g", name, &format!("{i:02}"), 1, &color(c))));
    }
    ok(store.apply(live("h", "even", "x", 1, &[])));
    ok(store.delete(&entity_of(&live("g", "even", "00", 1, &[])), 2, 10));

    let ids = |found: Vec<Property>| {
        found
            .into_iter()
            .map(|p| format!("{}/{}", p.name, p.id))
            .collect::<Vec<_>>()
    };
    let mut query = Query::group("g");
    query.name = Some("even".into());
    assert_eq!(
        ids(ok(store.query(&query))),
        ["even/02", "even/04", "even/06", "even/08", "even/10"]
    );
    query.include_deleted = true;
    assert_eq!(
        ok(store.query(&query)).len(),
        6,
        "the tombstone of even/00 too"
    );
    query.include_deleted = false;
    query.tags = vec![("color".into(), TagValue::Str("red".into()))];
    assert_eq!(ids(ok(store.query(&query))), ["even/06"]);
    query.tags.clear();
    query.ids = vec!["04".into(), "05".into(), "10".into()];
    assert_eq!(
        ids(ok(store.query(&query))),
        ["even/04", "even/10"],
        "05 is odd"
    );

    let mut all = Query::group("g");
    all.limit = 4;
    assert_eq!(
        ids(ok(store.query(&all))),
        ["even/02", "even/04", "even/06", "even/08"],
        "entity order across shards, limited"
    );
    all.limit = usize::MAX;
    all.ids = vec!["03".into(), "04".into()];
    assert_eq!(
        ids(ok(store.query(&all))),
        ["even/04", "odd/03"],
        "ids without a name"
    );
}

#[test]
fn query_pages_resume_after_their_last_entity_and_add_up_to_the_whole() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    // Names that are prefixes of each other: entity order is the order of the entity's bytes.
    for i in 0..60 {
        let name = ["a", "a-b", "ab"][i % 3];
        ok(store.apply(live("g", name, &format!("{i:02}/x"), 1, &[])));
    }
    ok(store.delete(&entity_of(&live("g", "a", "00/x", 1, &[])), 2, 10));
    let key = |p: &Property| format!("{}/{}/{}", p.group, p.name, p.id);
    let whole = ok(store.query(&Query::group("g")));
    assert_eq!(whole.len(), 59);
    let keys: Vec<String> = whole.iter().map(key).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "byte order of group/name/id");

    let pages = |mut query: Query| {
        let mut all = Vec::new();
        loop {
            let page = ok(store.query_page(&query));
            assert!(page.properties.len() <= query.limit);
            all.extend(page.properties);
            match page.resume_after {
                Some(after) => query.after = Some(after),
                None => return all,
            }
        }
    };
    for limit in [1, 7, 59, 100] {
        let mut query = Query::group("g");
        query.limit = limit;
        assert_eq!(pages(query), whole, "limit {limit}");
    }
    // A byte bound ends pages early, at least one property each.
    let mut query = Query::group("g");
    query.max_bytes = 1;
    assert_eq!(ok(store.query_page(&query)).properties.len(), 1);
    assert_eq!(pages(query), whole);
    // A page stays within the bound (a key, the stored row: an 8-byte check and the canonical
    // bytes, and 16 bytes of framing each).
    let size = |p: &Property| key(p).len() + 8 + p.canonical_bytes().len() + 16;
    let mut query = Query::group("g");
    query.max_bytes = 3 * size(&whole[0]) + 10;
    let page = ok(store.query_page(&query));
    assert_eq!(page.properties.len(), 3);
    assert!(page.properties.iter().map(size).sum::<usize>() <= query.max_bytes);
    assert_eq!(pages(query), whole);
    // Tombstones, a name, ids, one shard: each paged the same way.
    let mut query = Query::group("g");
    query.include_deleted = true;
    query.limit = 4;
    assert_eq!(pages(query.clone()).len(), 60);
    query.name = Some("a".into());
    let named = pages(query.clone());
    assert_eq!(named.len(), 20);
    assert!(named.iter().all(|p| p.name == "a"));
    query.ids = vec!["33/x".into(), "03/x".into(), "06/x".into(), "04/x".into()];
    query.limit = 1;
    assert_eq!(
        pages(query.clone())
            .iter()
            .map(|p| p.id.as_str())
            .collect::<Vec<_>>(),
        ["03/x", "06/x", "33/x"]
    );
    // A cursor before the name's first entity (an entity of a name that sorts first, with
    // another name's entities between) starts the name's query at its beginning.
    let mut query = Query::group("g");
    query.name = Some("ab".into());
    let from_start = pages(query.clone());
    assert_eq!(from_start.len(), 20);
    query.after = Some(entity_of(&live("g", "a-b", "02/x", 1, &[])));
    assert_eq!(pages(query), from_start, "a cursor before the name");
    // Ids of a name looked up one shard at a time: each shard answers its own, and the byte
    // bound of a lookup counts each copy's canonical bytes and its framing.
    let mut query = Query::group("g");
    query.name = Some("a".into());
    query.ids = (0..60).step_by(3).map(|i| format!("{i:02}/x")).collect();
    let looked_up = pages(query.clone());
    assert_eq!(looked_up.len(), 19, "00/x is deleted");
    let four = std::num::NonZeroU32::new(4).unwrap_or_else(|| panic!("four shards"));
    let mut by_shard = Vec::new();
    for shard in 0..4 {
        let mut one = query.clone();
        one.shard = Some(shard);
        let found = pages(one);
        assert!(
            found
                .iter()
                .all(|p| propd_merkle::shard_of(&entity_of(p), four) == shard),
            "shard {shard}"
        );
        by_shard.extend(found);
    }
    by_shard.sort_by_key(key);
    assert_eq!(by_shard, looked_up);
    // A lookup whose last id fills the page says no page follows.
    let mut exact = query.clone();
    exact.ids = vec!["03/x".into(), "06/x".into(), "33/x".into()];
    exact.limit = 3;
    let page = ok(store.query_page(&exact));
    assert_eq!((page.properties.len(), page.resume_after), (3, None));
    let framed = |p: &Property| p.canonical_bytes().len() + 16;
    query.max_bytes = 3 * framed(&looked_up[0]) + 5;
    assert_eq!(ok(store.query_page(&query)).properties.len(), 3);
    let mut shards = Vec::new();
    for shard in 0..4 {
        let mut query = Query::group("g");
        query.shard = Some(shard);
        query.limit = 5;
        shards.extend(pages(query));
    }
    shards.sort_by_key(key);
    assert_eq!(shards, whole, "the shards partition the group");
    let mut query = Query::group("g");
    query.shard = Some(4);
    assert!(store.query_page(&query).is_err(), "shard out of range");
    query.shard = None;
    query.after = Some(entity_of(&live("h", "a", "1", 1, &[])));
    assert!(
        store.query_page(&query).is_err(),
        "a resume point of another group"
    );
}

#[test]
fn deletes_store_identical_tombstones_and_revisions_count_changes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    let property = live("h", "n", "1", 5, &[("k", TagValue::Int(1))]);
    let entity = entity_of(&property);
    assert_eq!(ok(store.revision("h", 0)), 0);
    assert_eq!(ok(store.apply(property.clone())), RepairOutcome::Applied);
    assert_eq!(ok(store.apply(property.clone())), RepairOutcome::Same);
    assert_eq!(
        ok(store.revision("h", 0)),
        1,
        "a write that changes nothing is not counted"
    );
    let deleted = ok(store.delete(&entity, 6, 1000));
    assert!(deleted.found);
    assert_eq!(deleted.outcome, RepairOutcome::Applied);
    let tombstone = ok(store.get(&entity)).unwrap_or_else(|| panic!("the tombstone is stored"));
    assert!(
        tombstone.tags.is_empty(),
        "a tombstone carries no tags: every copy is identical"
    );
    assert_eq!((tombstone.mod_revision, tombstone.delete_time), (6, 1000));
    let again = ok(store.delete(&entity, 6, 1000));
    assert_eq!((again.found, again.outcome), (false, RepairOutcome::Same));
    assert_eq!(
        ok(store.apply(live("h", "n", "1", 6, &[]))),
        RepairOutcome::LocalNewer(tombstone),
        "a live copy at the delete's revision does not undo it"
    );
    assert_eq!(ok(store.revision("h", 0)), 2);
}

#[test]
fn tree_view_and_export_show_the_live_tree() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    for i in 0..50 {
        ok(store.apply(live("h", "n", &format!("{i}"), 1, &[])));
    }
    let view = ok(store.tree_view("h", 0));
    assert_eq!(view.revision, 50);
    assert_eq!(view.root.leaf_count, 50);
    assert_eq!(
        view.slots.iter().map(|(_, s)| s.leaf_count).sum::<u64>(),
        50
    );
    assert!(view.slots.iter().all(|(node, _)| node.level == 1));
    let tree = ok(store.tree("h", 0));
    assert_eq!(view.root, tree.root());
    assert_eq!(view.slots, tree.children(NodeId::ROOT));
    let bytes = ok(store.export_tree("h", 0));
    let decoded = snapshot::decode(&bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(decoded, tree, "the export decodes to the live tree");
    assert_eq!(decoded, ok(ok(store.snapshot()).rebuild_tree("h", 0)));
    assert_eq!(
        ok(ok(store.snapshot()).export_tree("h", 0)),
        bytes,
        "a snapshot exports the same tree"
    );
}

#[test]
fn verify_skips_unchanged_shards_and_heals_a_corrupt_tree() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    {
        let store = open(dir.path());
        assert_eq!(
            ok(store.verify("h", 0)),
            VerifyOutcome::Skipped { revision: 0 }
        );
        for i in 0..20 {
            ok(store.apply(live("h", "n", &format!("{i}"), 1, &[])));
        }
        assert_eq!(
            ok(store.verify("h", 0)),
            VerifyOutcome::Consistent {
                revision: 20,
                leaf_count: 20
            }
        );
        assert_eq!(
            ok(store.verify("h", 0)),
            VerifyOutcome::Skipped { revision: 20 }
        );
        ok(store.apply(live("h", "n", "x", 1, &[])));
        assert!(matches!(
            ok(store.verify("h", 0)),
            VerifyOutcome::Consistent { revision: 21, .. }
        ));
    }
    // Corrupt the tree behind the store's back: drop one leaf from the leaf table (its bucket's
    // stored digest now hides the loss) and log a wrong digest for another.
    let good_root;
    {
        let store = open(dir.path());
        good_root = ok(store.tree("h", 0)).root();
        let leaves = ok(ok(store.snapshot()).tree("h", 0)).leaves().to_vec();
        drop(store);
        let db =
            redb::Database::create(dir.path().join("propd.redb")).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        {
            let definition: redb::TableDefinition<'_, (u64, &str), &[u8]> =
                redb::TableDefinition::new("leaves/h/0");
            let mut table = txn.open_table(definition).unwrap_or_else(|e| panic!("{e}"));
            table
                .remove((leaves[0].bucket, leaves[0].entity.as_str()))
                .unwrap_or_else(|e| panic!("{e}"));
            let log: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("log/h/0");
            let mut log = txn.open_table(log).unwrap_or_else(|e| panic!("{e}"));
            // A log entry: digest length, digest, entity (docs/formats.md).
            let mut entry = vec![16u8];
            entry.extend_from_slice(&[9; 16]);
            entry.extend_from_slice(leaves[1].entity.as_bytes());
            log.insert(0, entry.as_slice())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }
    let store = open(dir.path());
    assert_ne!(
        ok(store.tree("h", 0)).root(),
        good_root,
        "the corruption shows in the live tree"
    );
    ok(store.apply(live("h", "n", "y", 1, &[])));
    match ok(store.verify("h", 0)) {
        VerifyOutcome::Healed {
            differing_leaves,
            revision,
            live_root,
            rebuilt_root,
        } => {
            assert_eq!(differing_leaves, 2);
            assert_eq!(revision, 22);
            assert_ne!(live_root, rebuilt_root);
        }
        other => panic!("the mismatch must be healed, got {other:?}"),
    }
    let snapshot = ok(store.snapshot());
    assert_eq!(ok(snapshot.tree("h", 0)), ok(snapshot.rebuild_tree("h", 0)));
    assert_eq!(
        ok(store.verify("h", 0)),
        VerifyOutcome::Skipped { revision: 22 }
    );
}

#[test]
fn writes_without_tree_upkeep_are_healed_by_verification() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut benchmark_config = config(dir.path());
    benchmark_config.tree_upkeep = TreeUpkeep::OffForBenchmarksOnly;
    {
        let store = RedbStore::open(benchmark_config).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..10 {
            ok(store.apply(live("h", "n", &format!("{i}"), 1, &[])));
        }
        assert_eq!(
            ok(store.tree("h", 0)).leaf_count(),
            0,
            "no upkeep: the tree did not move"
        );
    }
    let store = open(dir.path());
    assert!(matches!(
        ok(store.verify("h", 0)),
        VerifyOutcome::Healed {
            differing_leaves: 10,
            ..
        }
    ));
    assert_eq!(ok(store.tree("h", 0)).leaf_count(), 10);
}

#[test]
fn the_purge_line_comes_from_the_grace_and_the_cutoff_of_a_complete_round() {
    let grace = Duration::from_nanos(100);
    assert_eq!(
        purge_line(1000, grace, 1, None),
        Some(900),
        "one copy: the grace"
    );
    assert_eq!(
        purge_line(1000, grace, 3, None),
        None,
        "never a complete round"
    );
    assert_eq!(purge_line(1000, grace, 3, Some(25)), Some(25));
    assert_eq!(purge_line(1000, grace, 3, Some(5000)), Some(900));
    assert_eq!(
        round_cutoff(10_000_000_000, Duration::from_secs(1)),
        7_000_000_000,
        "three skew bounds below the round's start"
    );
    assert_eq!(round_cutoff(i64::MIN + 1, Duration::MAX), i64::MIN);
}

/// A purge flushes the leaf log in slices of its chunk size, oldest changes first, in
/// transactions of their own: with a log far longer than a chunk (the writes before it, and the
/// purge's own removals), every slice leaves a tree that readers and a rebuild agree on, and the
/// log is empty when the purge ends.
#[test]
fn a_purge_flushes_the_leaf_log_in_slices_and_leaves_a_consistent_tree() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut config = config(dir.path());
    config.flush_threshold = u64::MAX;
    let store = RedbStore::open(config).unwrap_or_else(|e| panic!("{e}"));
    for k in 0..60 {
        let id = format!("{k:02}");
        ok(store.apply(live("h", "n", &id, 1, &[])));
        if k % 3 != 0 {
            ok(store.delete(&entity_of(&live("h", "n", &id, 1, &[])), 2, 10));
        }
    }
    // Read through the leaf log (`RedbStore::tree` would flush it first).
    let before = ok(ok(store.snapshot()).tree("h", 0));
    let report = ok(store.purge_tombstones("h", 0, 20, 4));
    assert_eq!((report.purged, report.chunks), (40, 10));
    assert_eq!(
        ok(store.flush("h", 0)),
        0,
        "the purge flushed the whole leaf log"
    );
    let after = ok(store.tree("h", 0));
    assert_eq!(after.leaf_count(), 20, "the live properties are left");
    assert_ne!(after.root(), before.root());
    assert!(
        matches!(
            ok(store.verify("h", 0)),
            VerifyOutcome::Consistent { leaf_count: 20, .. }
        ),
        "the tree the slices left equals a rebuild"
    );
}

#[test]
fn purge_removes_tombstones_below_the_line_in_chunks_and_the_line_never_moves_back() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    // Tombstones deleted at 10, 20, 30, 40, 50 and a live property.
    for (id, delete_time) in [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("e", 50)] {
        ok(store.apply(live("h", "n", id, 1, &[])));
        ok(store.delete(&entity_of(&live("h", "n", id, 1, &[])), 2, delete_time));
    }
    ok(store.apply(live("h", "n", "live", 1, &[])));
    let report = ok(store.purge_tombstones("h", 0, 45, 2));
    assert_eq!(
        report,
        PurgeReport {
            purged: 4,
            purged_below: 45,
            chunks: 2,
            ridden: 0
        },
        "a to d, two per transaction"
    );
    let report = ok(store.purge_tombstones("h", 0, 15, 2));
    assert_eq!(
        (report.purged, report.purged_below),
        (0, 45),
        "the line never moves back"
    );
    // e was deleted at 50: a tombstone at the line is not below it.
    let report = ok(store.purge_tombstones("h", 0, 50, 2));
    assert_eq!(
        (report.purged, report.purged_below),
        (0, 50),
        "a tombstone at the line stays"
    );
    let left: Vec<String> = ok(ok(store.snapshot()).scan("h", 0))
        .map(|p| ok(p).id)
        .collect();
    assert_eq!(left, ["e", "live"], "live properties are never purged");
    let snapshot = ok(store.snapshot());
    assert_eq!(ok(snapshot.tree("h", 0)), ok(snapshot.rebuild_tree("h", 0)));
    ok(store.record_complete_round("h", 0, 500, 400));
    ok(store.record_complete_round("h", 0, 7, 3));
    let state = ok(store.purge_state("h", 0));
    assert_eq!(
        (state.last_complete_round, state.cutoff),
        (Some(500), Some(400)),
        "a late notice of an older round changes nothing"
    );
}

#[test]
fn a_tombstone_below_the_line_is_never_stored_nor_sent_and_removes_an_older_version() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    let old = live("h", "n", "old", 1, &[]);
    ok(store.apply(old.clone()));
    let kept = live("h", "n", "kept", 9, &[]);
    ok(store.apply(kept.clone()));
    ok(store.purge_tombstones("h", 0, 100, PURGE_CHUNK));
    let tombstone = |id: &str, revision: i64, delete_time: i64| Property {
        tags: Default::default(),
        mod_revision: revision,
        delete_time,
        ..live("h", "n", id, 1, &[])
    };
    assert_eq!(
        ok(store.repair_apply(tombstone("gone", 5, 50))),
        RepairOutcome::Same,
        "nothing held, nothing stored"
    );
    assert_eq!(ok(store.get(&entity_of(&tombstone("gone", 5, 50)))), None);
    assert_eq!(
        ok(store.repair_apply(tombstone("old", 5, 50))),
        RepairOutcome::Applied,
        "the delete takes effect"
    );
    assert_eq!(
        ok(store.get(&entity_of(&old))),
        None,
        "and its tombstone is not kept"
    );
    assert_eq!(
        ok(store.repair_apply(tombstone("kept", 5, 50))),
        RepairOutcome::LocalNewer(kept.clone()),
        "an older tombstone loses as always"
    );
    // Above the line a tombstone is stored; raising the line hides it from syncs until purged.
    ok(store.repair_apply(tombstone("late", 5, 150)));
    let entity = entity_of(&tombstone("late", 5, 150));
    assert_eq!(
        ok(store.get_many("h", 0, std::slice::from_ref(&entity))),
        [Some(tombstone("late", 5, 150))]
    );
    ok(store.purge_tombstones("h", 0, 200, PURGE_CHUNK));
    assert_eq!(ok(store.get(&entity)), None);
    assert_eq!(ok(store.get_many("h", 0, &[entity])), [None]);
}

/// A write whose transaction leaves `flush_threshold` leaf changes or more in its shard's log
/// flushes them into the tree: after ten writes at a threshold of five the tree is clean (a
/// flush recomputes nothing), after one more it is not.
#[test]
fn writes_flush_the_leaf_log_once_it_reaches_the_threshold() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    for k in 0..10 {
        ok(store.apply(live("h", "n", &format!("{k:02}"), 1, &[])));
    }
    assert_eq!(
        ok(store.flush("h", 0)),
        0,
        "flushed by the fifth and tenth writes"
    );
    ok(store.apply(live("h", "n", "10", 1, &[])));
    assert!(ok(store.flush("h", 0)) > 0, "one change pending");
}

/// A running store gains groups: it records and serves a new one, leaves known ones as they
/// are, refuses a shard count its file recorded otherwise, and keeps what it recorded across a
/// restart.
#[test]
fn a_running_store_adds_groups_and_records_them() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    let added = ok(store.add_groups(&[GroupDef::new("h", 1, 0), GroupDef::new("new", 2, 1)]));
    assert_eq!(added, ["new"], "h is known already");
    ok(store.apply(live("new", "n", "a", 1, &[])));
    assert_eq!(
        ok(store.add_groups(&[GroupDef::new("new", 2, 1)])),
        Vec::<String>::new()
    );
    drop(store);

    // Reopened with the group configured as recorded, it serves what was written; configured
    // with another shard count, the file refuses it.
    let mut groups: Vec<GroupDef> = groups().iter().cloned().collect();
    groups.push(GroupDef::new("new", 2, 1));
    let mut config = config(dir.path());
    config.groups = Groups::new(groups.clone()).unwrap_or_else(|e| panic!("{e}"));
    let store = ok(RedbStore::open(config.clone()));
    assert_eq!(ok(store.query(&Query::group("new"))).len(), 1);
    drop(store);
    let store = open(dir.path());
    match store.add_groups(&[GroupDef::new("new", 4, 1)]) {
        Err(StoreError::Config(ConfigError::ShardNumChanged { stored, given, .. })) => {
            assert_eq!((stored, given), (2, 4));
        }
        other => panic!("a recorded shard count must not change, got {other:?}"),
    }
}

/// A store answers with the tree shape it was opened with, through its own API and the repair
/// view alike.
#[test]
fn a_store_reports_the_shape_it_was_opened_with() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let shape = Shape {
        slot_count: 8,
        fanout: 4,
        depth: 2,
        ..Shape::default()
    };
    let mut config = config(dir.path());
    config.shape = shape;
    let store = ok(RedbStore::open(config));
    assert_eq!(store.shape(), shape);
    assert_eq!(RepairStore::shape(&store), shape);
}
