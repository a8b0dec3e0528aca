//! Every refused request names the field and leaves the store unchanged (DESIGN §9).

use propd_merkle::{Entity, NodeId, Property, TagValue, Tree};
use propd_store::{
    Query, RedbStore, RepairStore, StoreConfig, StoreError, ValidationError, WriteDurability,
};

use crate::{entity_of, groups, live};

type State = Vec<(String, u32, Vec<Property>, Tree, u64)>;

fn state(store: &RedbStore) -> State {
    let mut out = Vec::new();
    for (group, shards) in [("g", 4), ("h", 1)] {
        for shard in 0..shards {
            let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
            let properties = snapshot
                .scan(group, shard)
                .unwrap_or_else(|e| panic!("{e}"))
                .collect::<Result<Vec<_>, _>>()
                .unwrap_or_else(|e| panic!("{e}"));
            let tree = snapshot
                .tree(group, shard)
                .unwrap_or_else(|e| panic!("{e}"));
            let revision = snapshot
                .revision(group, shard)
                .unwrap_or_else(|e| panic!("{e}"));
            out.push((group.to_owned(), shard, properties, tree, revision));
        }
    }
    out
}

fn small_store(dir: &std::path::Path) -> RedbStore {
    let mut config = StoreConfig::new(dir, groups(), propd_merkle::Shape::default());
    config.durability = WriteDurability::NotSynced;
    config.max_property_bytes = 200;
    RedbStore::open(config).unwrap_or_else(|e| panic!("{e}"))
}

fn expect_invalid<T: std::fmt::Debug>(
    result: Result<T, StoreError>,
    field: &str,
) -> ValidationError {
    match result {
        Err(StoreError::Invalid(error)) => {
            assert!(
                error.to_string().contains(field),
                "the message {:?} names {field:?}",
                error.to_string()
            );
            error
        }
        other => panic!("expected a validation error naming {field:?}, got {other:?}"),
    }
}

#[test]
fn refused_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = small_store(dir.path());
    let existing = live("g", "n", "1", 10, &[("k", TagValue::Str("v".into()))]);
    store
        .apply(existing.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .apply(live("h", "n", "2", 3, &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let before = state(&store);

    let with = |f: &dyn Fn(&mut Property)| {
        let mut property = live("g", "n", "1", 20, &[]);
        f(&mut property);
        property
    };
    expect_invalid(store.apply(with(&|p| p.group.clear())), "group");
    expect_invalid(store.apply(with(&|p| p.name.clear())), "name");
    expect_invalid(store.apply(with(&|p| p.id.clear())), "id");
    expect_invalid(store.apply(with(&|p| p.group = "g/x".into())), "group");
    expect_invalid(store.apply(with(&|p| p.name = "a/b".into())), "name");
    expect_invalid(store.apply(with(&|p| p.group = "nope".into())), "nope");
    expect_invalid(store.apply(with(&|p| p.mod_revision = 0)), "mod_revision");
    expect_invalid(store.apply(with(&|p| p.mod_revision = -3)), "mod_revision");
    expect_invalid(store.apply(with(&|p| p.delete_time = 5)), "delete_time");
    let oversize = with(&|p| {
        p.tags.insert("blob".into(), TagValue::Binary(vec![0; 300]));
    });
    match expect_invalid(store.apply(oversize.clone()), "bytes") {
        ValidationError::TooLarge { size, max, .. } => {
            assert!(size > 300);
            assert_eq!(max, 200);
        }
        other => panic!("oversize: {other:?}"),
    }
    expect_invalid(store.repair_apply(oversize), "bytes");
    // At the edge: one byte over the bound is refused (exactly the bound is taken, below).
    let sized = |n: usize| {
        with(&|p| {
            p.id = "edge".into();
            p.tags.insert("blob".into(), TagValue::Binary(vec![0; n]));
        })
    };
    let fill = (0..300)
        .find(|&n| sized(n).canonical_len() == 200)
        .unwrap_or_else(|| panic!("a blob that makes the property 200 bytes"));
    match expect_invalid(store.apply(sized(fill + 1)), "bytes") {
        ValidationError::TooLarge { size, max, .. } => assert_eq!((size, max), (201, 200)),
        other => panic!("one byte over: {other:?}"),
    }
    expect_invalid(
        store.repair_apply(with(&|p| p.delete_time = -1)),
        "delete_time",
    );

    let entity = entity_of(&existing);
    expect_invalid(store.delete(&entity, 30, 0), "delete_time");
    expect_invalid(store.delete(&entity, 0, 30), "mod_revision");
    let unknown = Entity::new("nope", "n", "1").unwrap_or_else(|e| panic!("{e}"));
    expect_invalid(store.delete(&unknown, 30, 30), "nope");
    expect_invalid(store.get(&unknown), "nope");

    // Shard addressing.
    match expect_invalid(store.repair_apply_batch("g", 4, Vec::new()), "shard") {
        ValidationError::ShardOutOfRange {
            shard: 4,
            shard_num: 4,
            ..
        } => {}
        other => panic!("shard out of range: {other:?}"),
    }
    expect_invalid(store.tree_view("g", 9), "shard");
    expect_invalid(store.verify("g", 9), "shard");
    expect_invalid(store.purge_tombstones("g", 9, 0, 1), "shard");
    expect_invalid(store.record_complete_round("nope", 0, 5, 1), "nope");
    expect_invalid(store.purge_state("g", 9), "shard");
    expect_invalid(store.tree_children("g", 4, NodeId::ROOT), "shard");
    expect_invalid(
        store.snapshot().and_then(|s| s.scan("g", 4).map(|_| ())),
        "shard",
    );

    // A batch with one bad item is refused whole, naming the item.
    let good = live("h", "n", "3", 1, &[]);
    let mut bad = live("h", "n", "4", 1, &[]);
    bad.mod_revision = 0;
    match store.repair_apply_batch("h", 0, vec![good.clone(), bad]) {
        Err(StoreError::BatchItem { index: 1, source }) => {
            assert!(source.to_string().contains("mod_revision"), "{source}")
        }
        other => panic!("batch: {other:?}"),
    }
    match store.repair_apply_batch("h", 0, vec![live("g", "n", "1", 99, &[]), good]) {
        Err(StoreError::BatchItem {
            index: 0,
            source: ValidationError::WrongGroup { .. },
        }) => {}
        other => panic!("foreign group in a batch: {other:?}"),
    }

    // Queries.
    expect_invalid(store.query(&Query::group("nope")), "nope");
    let mut query = Query::group("g");
    query.name = Some("a/b".into());
    expect_invalid(store.query(&query), "name");

    assert_eq!(state(&store), before, "nothing stored changed");
    store
        .apply(sized(fill))
        .unwrap_or_else(|e| panic!("a property of exactly the bound: {e}"));
}

/// A refusal for bad input carries its validation error, alone or as a batch item (what the
/// node answers as INVALID_ARGUMENT); other errors carry none.
#[test]
fn a_refusal_for_bad_input_carries_its_validation_error() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = small_store(dir.path());
    let mut bad = live("h", "n", "1", 1, &[]);
    bad.mod_revision = 0;
    let alone = store.apply(bad.clone()).expect_err("refused");
    assert!(
        alone
            .validation()
            .is_some_and(|e| e.to_string().contains("mod_revision")),
        "{alone:?}"
    );
    let in_batch = store
        .repair_apply_batch("h", 0, vec![live("h", "n", "2", 1, &[]), bad])
        .expect_err("refused");
    assert!(
        in_batch
            .validation()
            .is_some_and(|e| e.to_string().contains("mod_revision")),
        "{in_batch:?}"
    );
    let other = StoreError::GroupCommitAbandoned;
    assert!(other.validation().is_none());
}

/// The fuzz targets' decoder of a stored row takes the canonical bytes of the property its key
/// names and refuses another's.
#[test]
fn a_stored_row_decodes_to_its_property() {
    let property = live("h", "n", "1", 3, &[("t", TagValue::Int(7))]);
    let decoded = propd_store::decode_property_row("h/n/1", &property.canonical_bytes());
    assert_eq!(decoded.ok(), Some(property.clone()));
    assert!(propd_store::decode_property_row("h/n/2", &property.canonical_bytes()).is_err());
    assert!(propd_store::decode_property_row("h/n", &property.canonical_bytes()).is_err());
}
