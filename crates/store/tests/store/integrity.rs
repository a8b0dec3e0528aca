//! Regression tests for stored bytes that rot at rest (issue "Faults a node meets"): one flipped
//! byte in a stopped node's `propd.redb` used to be served, chosen by read repair and spread to
//! every copy, because leaf digests were stored, not recomputed from the bytes; and a damaged or
//! empty file either panicked at start or started as an empty store.
//!
//! Every row a read meets is now checked against its check digest: a rotten row is never served,
//! sent, listed as a leaf or built into a tree; it is quarantined and its leaf removed, so that
//! the next repair brings the good copy back.

use std::path::Path;

use redb::ReadableTable as _;

use propd_merkle::{NodeId, Property, RepairStore as _, TagValue};
use propd_store::{Query, RepairOutcome, StoreError, StoreHealth, VerifyOutcome};

use crate::{config, entity_of, live, open};

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|error| panic!("{error}"))
}

fn sample(i: usize) -> Property {
    live(
        "h",
        "n",
        &format!("{i:03}"),
        1,
        &[("payload", TagValue::Str(format!("value of item {i}")))],
    )
}

/// Flips one byte of the stored row of `property` (in its canonical bytes, past the check
/// digest) behind the store's back, as rot on the disk would.
fn flip_stored_byte(dir: &Path, property: &Property) {
    flip_stored_byte_in(dir, property, 0);
}

/// [`flip_stored_byte`] for a property of shard `shard` of its group.
fn flip_stored_byte_in(dir: &Path, property: &Property, shard: u32) {
    let db = redb::Database::create(dir.join("propd.redb")).unwrap_or_else(|e| panic!("{e}"));
    let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
    {
        let table_name = format!("props/{}/{shard}", property.group);
        let definition: redb::TableDefinition<'_, &str, &[u8]> =
            redb::TableDefinition::new(&table_name);
        let mut table = txn.open_table(definition).unwrap_or_else(|e| panic!("{e}"));
        let key = entity_of(property).as_str().to_owned();
        let mut row = table
            .get(key.as_str())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("{key} is stored"))
            .value()
            .to_vec();
        let last = row.len() - 1;
        row[last] ^= 0x01;
        table
            .insert(key.as_str(), row.as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    txn.commit().unwrap_or_else(|e| panic!("{e}"));
}

fn filled(dir: &Path, n: usize) -> Vec<Property> {
    let store = open(dir);
    let written: Vec<Property> = (0..n).map(sample).collect();
    for property in &written {
        ok(store.apply(property.clone()));
    }
    assert!(matches!(
        ok(store.verify("h", 0)),
        VerifyOutcome::Consistent { .. }
    ));
    written
}

#[test]
fn a_flipped_byte_is_never_served_and_the_row_is_quarantined_with_its_leaf() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let written = filled(dir.path(), 20);
    flip_stored_byte(dir.path(), &written[7]);

    let store = open(dir.path());
    let leaves_before = ok(store.tree("h", 0)).leaf_count();
    assert_eq!(leaves_before, 20, "the tree still claims the rotten row");
    assert_eq!(
        ok(store.get(&entity_of(&written[7]))),
        None,
        "a rotten copy reads as absent"
    );
    assert_eq!(
        ok(store.get(&entity_of(&written[8]))),
        Some(written[8].clone())
    );
    assert_eq!(store.quarantined_since_open(), 1);
    let kept = ok(store.quarantined());
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].key, entity_of(&written[7]).as_str());
    assert!(
        kept[0].reason.contains("check digest"),
        "{}",
        kept[0].reason
    );
    assert_eq!(
        ok(store.tree("h", 0)).leaf_count(),
        19,
        "its leaf is gone, so the next repair brings the good copy back"
    );
    let snapshot = ok(store.snapshot());
    assert_eq!(ok(snapshot.tree("h", 0)), ok(snapshot.rebuild_tree("h", 0)));

    // The good copy from a peer is applied over the gap (not refused as "same").
    assert_eq!(
        ok(store.repair_apply(written[7].clone())),
        RepairOutcome::Applied
    );
    assert_eq!(
        ok(store.get(&entity_of(&written[7]))),
        Some(written[7].clone())
    );
}

#[test]
fn queries_scans_repair_reads_and_leaf_lists_skip_a_rotten_row() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let written = filled(dir.path(), 10);
    flip_stored_byte(dir.path(), &written[3]);
    let rotten = entity_of(&written[3]);
    let good: Vec<Property> = written
        .iter()
        .filter(|p| entity_of(p) != rotten)
        .cloned()
        .collect();

    // Each read path meets the rotten row on a fresh copy of the file, before anything
    // quarantined it.
    let file = dir.path().join("propd.redb");
    let rotten_file = std::fs::read(&file).unwrap_or_else(|e| panic!("{e}"));
    let fresh = || {
        std::fs::write(&file, &rotten_file).unwrap_or_else(|e| panic!("{e}"));
        open(dir.path())
    };
    let store = fresh();
    let leaves = ok(store.leaves_under("h", 0, NodeId::ROOT, None, 100));
    assert_eq!(leaves.len(), 9, "the leaf list leaves the rotten row out");
    assert!(leaves.iter().all(|leaf| leaf.entity != rotten));
    assert_eq!(ok(store.quarantined_count()), 1);
    drop(store);

    // A list cut at its limit reads past the rotten row and still returns exactly the limit.
    let whole = ok(fresh().leaves_under("h", 0, NodeId::ROOT, None, 100));
    for limit in 1..9 {
        let cut = ok(fresh().leaves_under("h", 0, NodeId::ROOT, None, limit));
        assert_eq!(cut.as_slice(), &whole[..limit], "limit {limit}");
    }

    let store = fresh();
    let copies = ok(store.get_many("h", 0, &[rotten.clone(), entity_of(&written[4])]));
    assert_eq!(
        copies,
        vec![None, Some(written[4].clone())],
        "a rotten copy is never sent"
    );
    assert_eq!(ok(store.quarantined_count()), 1);
    drop(store);

    let store = fresh();
    assert_eq!(
        ok(store.query(&Query::group("h"))),
        good,
        "the rest stays queryable"
    );
    assert_eq!(ok(store.quarantined_count()), 1);
    drop(store);

    let store = fresh();
    let scanned: Vec<Property> = ok(ok(store.snapshot()).scan("h", 0))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(scanned, good);
    // A scan through a snapshot reports the row; the store's next operation quarantines it.
    ok(store.get(&entity_of(&written[0])));
    assert_eq!(ok(store.quarantined_count()), 1);
}

#[test]
fn scrub_finds_rot_in_an_unchanged_shard_that_verification_skips() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let written = filled(dir.path(), 20);
    flip_stored_byte(dir.path(), &written[11]);

    let store = open(dir.path());
    assert!(
        matches!(ok(store.verify("h", 0)), VerifyOutcome::Skipped { .. }),
        "verification trusts an unchanged shard"
    );
    let report = ok(store.scrub("h", 0));
    assert_eq!(report.quarantined, 1);
    assert_eq!(report.healed, Some(1));
    assert_eq!(report.leaves, 19);
    assert!(report.bytes > 0);
    assert_eq!(ok(store.quarantined_count()), 1);
    assert_eq!(ok(store.tree("h", 0)).leaf_count(), 19);

    let again = ok(store.scrub("h", 0));
    assert_eq!((again.quarantined, again.healed), (0, None), "{again:?}");
    assert_eq!(store.health(), StoreHealth::Ok);
}

#[test]
fn an_empty_database_file_is_refused_unless_the_operator_starts_empty() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    filled(dir.path(), 3);
    let file = dir.path().join("propd.redb");
    std::fs::write(&file, b"").unwrap_or_else(|e| panic!("{e}"));

    match propd_store::RedbStore::open(config(dir.path())) {
        Err(StoreError::DamagedFile { path, detail }) => {
            assert_eq!(path, file);
            assert!(detail.contains("empty"), "{detail}");
        }
        other => panic!("an empty file must be refused, got {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(&file).map(|m| m.len()).ok(),
        Some(0),
        "a refused open changes nothing"
    );

    let mut start_empty = config(dir.path());
    start_empty.start_empty_if_damaged = true;
    let store = ok(propd_store::RedbStore::open(start_empty));
    assert_eq!(ok(store.query(&Query::group("h"))), Vec::new());
    assert!(
        dir.path().join("propd.redb.damaged").exists(),
        "the damaged file is kept"
    );
    drop(store);

    // Damaged again, twice: each damaged file is kept under a name of its own.
    for kept in ["propd.redb.damaged.1", "propd.redb.damaged.2"] {
        std::fs::write(&file, b"").unwrap_or_else(|e| panic!("{e}"));
        let mut start_empty = config(dir.path());
        start_empty.start_empty_if_damaged = true;
        drop(ok(propd_store::RedbStore::open(start_empty)));
        assert!(dir.path().join(kept).exists(), "{kept}");
    }
}

#[test]
fn a_truncated_database_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    filled(dir.path(), 50);
    let file = dir.path().join("propd.redb");
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&file, &bytes[..bytes.len() / 3]).unwrap_or_else(|e| panic!("{e}"));
    match propd_store::RedbStore::open(config(dir.path())) {
        Err(StoreError::DamagedFile { path, .. }) => assert_eq!(path, file),
        Ok(store) => {
            // redb may recover an older commit from the part that is left; then every value it
            // serves must still be one that was written.
            let found = ok(store.query(&Query::group("h")));
            let written: Vec<Property> = (0..50).map(sample).collect();
            assert!(found.iter().all(|p| written.contains(p)));
        }
        Err(other) => panic!("a truncated file must be named as damaged, got {other}"),
    }
}

#[test]
fn a_zeroed_page_is_an_error_naming_the_damage_never_a_panic_or_a_wrong_value() {
    let written: Vec<Property> = (0..300).map(sample).collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    filled(dir.path(), written.len());
    let file = dir.path().join("propd.redb");
    let pristine = std::fs::read(&file).unwrap_or_else(|e| panic!("{e}"));
    let pages = pristine.len() / 4096;
    let mut named = 0;
    // Zero each page after the header in turn; whatever the page held, the store must open or
    // refuse by name, and every read must return written values or a typed error.
    // About 24 pages spread over the file keep the test short.
    for page in (1..pages).step_by((pages / 24).max(1)) {
        let mut bytes = pristine.clone();
        bytes[page * 4096..(page + 1) * 4096].fill(0);
        std::fs::write(&file, &bytes).unwrap_or_else(|e| panic!("{e}"));
        let store = match propd_store::RedbStore::open(config(dir.path())) {
            Ok(store) => store,
            Err(StoreError::DamagedFile { .. } | StoreError::Damaged { .. }) => {
                named += 1;
                continue;
            }
            Err(other) => panic!("page {page}: open failed with {other}"),
        };
        // A read returns written values, or an error that names the damage and the file.
        let named_damage = |what: &str, result: Result<(), StoreError>| match result {
            Ok(()) => false,
            Err(error @ StoreError::Damaged { .. }) => {
                assert!(
                    error.to_string().contains("propd.redb"),
                    "names the file: {error}"
                );
                true
            }
            Err(other) => panic!("page {page}: {what} failed with {other}"),
        };
        let queried = store.query(&Query::group("h")).map(|found| {
            assert!(
                found.iter().all(|p| written.contains(p)),
                "page {page}: a wrong value was served"
            );
        });
        let damaged =
            named_damage("query", queried) | named_damage("scrub", store.scrub("h", 0).map(drop));
        if damaged {
            named += 1;
            assert!(
                matches!(store.health(), StoreHealth::Damaged(_)),
                "page {page}: damage shows in the health"
            );
        }
    }
    assert!(named > 0, "zeroing pages found no damage at all");
}

/// Found by the nemesis (seed 1): bytes flipped in a stopped node's file damaged the stored
/// definition of one shard's table; the node started, served its other shards, and failed every
/// read of that one ("Current definition of (u32,u64) does not match stored definition") while
/// its copies there went stale. A table whose stored definition does not match is now refused at
/// start, naming it, like any other damage to the file.
#[test]
fn a_table_whose_stored_definition_is_damaged_refuses_the_file_at_start() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    filled(dir.path(), 3);
    let file = dir.path().join("propd.redb");
    {
        // The nodes table of h/0 stored with another key type, as a damaged definition reads.
        let db = redb::Database::open(&file).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.delete_table(redb::TableDefinition::<(u32, u64), &[u8]>::new("nodes/h/0"))
            .unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(redb::TableDefinition::<&str, u64>::new("nodes/h/0"))
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }
    match propd_store::RedbStore::open(config(dir.path())) {
        Err(StoreError::DamagedFile { path, detail }) => {
            assert_eq!(path, file);
            assert!(detail.contains("nodes/h/0"), "{detail}");
        }
        other => panic!("a damaged table definition must be refused, got {other:?}"),
    }
}

/// A redb file that records no store configuration (no tree shape) is not a store: refused,
/// never taken as a new, empty one.
#[test]
fn a_redb_file_that_records_no_store_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("propd.redb");
    {
        let db = redb::Database::create(&file).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("other"))
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }
    match propd_store::RedbStore::open(config(dir.path())) {
        Err(StoreError::DamagedFile { path, detail }) => {
            assert_eq!(path, file);
            assert!(detail.contains("no tree shape"), "{detail}");
        }
        other => panic!("a file that is not a store must be refused, got {other:?}"),
    }
}

/// A file whose rows are of another format than this build reads is refused at start, naming
/// both formats.
#[test]
fn a_file_of_another_row_format_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    filled(dir.path(), 3);
    let file = dir.path().join("propd.redb");
    {
        let db = redb::Database::open(&file).unwrap_or_else(|e| panic!("{e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("config"))
            .unwrap_or_else(|e| panic!("{e}"))
            .insert("row_format", 1u32.to_le_bytes().as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
    }
    match propd_store::RedbStore::open(config(dir.path())) {
        Err(StoreError::Config(propd_store::ConfigError::RowFormat { stored, supported })) => {
            assert_eq!((stored, supported), (Some(1), 2));
        }
        other => panic!("another row format must be refused, got {other:?}"),
    }
}

/// Rows found rotten by one read in several shards, several in a shard, are each quarantined.
#[test]
fn every_rotten_row_a_read_meets_is_quarantined_whatever_its_shard() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let four = std::num::NonZeroU32::new(4).unwrap_or_else(|| panic!("four shards"));
    let shard = |p: &Property| propd_merkle::shard_of(&entity_of(p), four);
    let written: Vec<Property> = (0..40)
        .map(|i| live("g", "n", &format!("{i:02}"), 1, &[]))
        .collect();
    {
        let store = open(dir.path());
        for property in &written {
            ok(store.apply(property.clone()));
        }
    }
    // Two rows of one shard and one of another.
    let first = shard(&written[0]);
    let same: Vec<&Property> = written
        .iter()
        .filter(|p| shard(p) == first)
        .take(2)
        .collect();
    let other = written
        .iter()
        .find(|p| shard(p) != first)
        .unwrap_or_else(|| panic!("a row of another shard"));
    for property in same.iter().copied().chain([other]) {
        flip_stored_byte_in(dir.path(), property, shard(property));
    }
    let store = open(dir.path());
    assert_eq!(ok(store.query(&Query::group("g"))).len(), 37);
    assert_eq!(ok(store.quarantined_count()), 3);
    assert_eq!(store.quarantined_since_open(), 3);
    // Handing the first shard over drops its quarantined rows, not the other shard's.
    ok(store.drop_shard("g", first));
    assert_eq!(ok(store.quarantined_count()), 1);
}
