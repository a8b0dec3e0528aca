//! The conformance suite against both stores.

use propd_store::{ModelStore, RedbStore, StoreConfig, WriteDurability, conformance};

#[test]
fn model_store_passes_the_conformance_suite() {
    conformance::run_all(|groups, shape| {
        let store = ModelStore::new(groups, shape).unwrap_or_else(|error| panic!("{error}"));
        (store, ())
    });
}

#[test]
fn redb_store_passes_the_conformance_suite() {
    conformance::run_all(|groups, shape| {
        let dir = tempfile::tempdir().unwrap_or_else(|error| panic!("tempdir: {error}"));
        let mut config = StoreConfig::new(dir.path(), groups, shape);
        config.durability = WriteDurability::NotSynced;
        let store = RedbStore::open(config).unwrap_or_else(|error| panic!("{error}"));
        (store, dir)
    });
}
