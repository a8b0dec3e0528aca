//! Integration tests of propd-store: one binary, a module per suite.

mod concurrency;
mod conformance;
mod crash;
mod disk_full;
mod integrity;
mod laws;
mod model;
mod purge;
mod snapshots;
mod store;
mod validation;

use std::collections::BTreeMap;
use std::path::Path;

use propd_merkle::{Entity, Property, Shape, TagValue};
use propd_store::{GroupDef, Groups, RedbStore, StoreConfig, WriteDurability};

/// The groups every test store knows: `g` with 4 shards, `h` with 1.
pub fn groups() -> Groups {
    Groups::new([GroupDef::new("g", 4, 2), GroupDef::new("h", 1, 0)])
        .unwrap_or_else(|error| panic!("{error}"))
}

/// A test configuration in `dir` with the default shape. Writes are not synced (the crash test
/// uses the synced default explicitly), and a small flush threshold makes writes flush the tree
/// now and then, so that tests meet both a flushed tree and pending leaf changes.
pub fn config(dir: &Path) -> StoreConfig {
    let mut config = StoreConfig::new(dir, groups(), Shape::default());
    config.durability = WriteDurability::NotSynced;
    config.flush_threshold = 5;
    config
}

/// Opens a test store in `dir`.
pub fn open(dir: &Path) -> RedbStore {
    RedbStore::open(config(dir)).unwrap_or_else(|error| panic!("open {}: {error}", dir.display()))
}

/// A live property.
pub fn live(
    group: &str,
    name: &str,
    id: &str,
    revision: i64,
    tags: &[(&str, TagValue)],
) -> Property {
    Property {
        group: group.to_owned(),
        name: name.to_owned(),
        id: id.to_owned(),
        tags: tags
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect::<BTreeMap<_, _>>(),
        mod_revision: revision,
        delete_time: 0,
    }
}

/// The entity of a property (panics on an invalid one: test data is valid).
pub fn entity_of(property: &Property) -> Entity {
    property
        .entity()
        .unwrap_or_else(|error| panic!("test entity: {error}"))
}
