//! The conformance suite against both stores.

use propd_store::{ModelStore, RedbStore, StoreConfig, WriteDurability, conformance};

#[test]
fn model_store_passes_the_conformance_suite() {
    conformance::run_all(|groups, shape| {
        let store = ModelStore::new(groups, shape).unwrap_or_else(|error| panic!("{error}"));
        (store, ())
    });
}

/// Runs the suite on redb stores whose writes flush the tree after `flush_threshold` leaf
/// changes: 1 keeps the leaf table current, the default leaves changes in the leaf log.
fn redb_suite(flush_threshold: u64) {
    conformance::run_all(|groups, shape| {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("tempdir: {error}"));
        let mut config = StoreConfig::new(dir.path(), groups, shape);
        config.durability = WriteDurability::NotSynced;
        config.flush_threshold = flush_threshold;
        let store = RedbStore::open(config).unwrap_or_else(|error| panic!("{error}"));
        (store, dir)
    });
}

#[test]
fn redb_store_passes_the_conformance_suite() {
    redb_suite(propd_store::DEFAULT_FLUSH_THRESHOLD);
}

#[test]
fn redb_store_flushing_after_every_write_passes_the_conformance_suite() {
    redb_suite(1);
}
