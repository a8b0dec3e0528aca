//! Handing a shard over: once a shard's copies have moved to other nodes (membership changes),
//! the old holder drops its rows, its tree and its bookkeeping in one transaction.

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use crate::codec::ShardMeta;
use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::rows::{open_read, read_meta};
use crate::tables::{META, QUARANTINE, ShardTableNames};

impl RedbStore {
    /// Whether this store holds anything of (group, shard): a property row, a tree leaf or a
    /// pending leaf change.
    pub fn holds_rows(&self, group: &str, shard: u32) -> Result<bool, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        self.guarded(|| {
            let txn = self.database()?.begin_read()?;
            let props = match open_read(&txn, names.props())? {
                Some(table) => !table.is_empty()?,
                None => false,
            };
            let leaves = match open_read(&txn, names.leaves())? {
                Some(table) => !table.is_empty()?,
                None => false,
            };
            let log = match open_read(&txn, names.log())? {
                Some(table) => !table.is_empty()?,
                None => false,
            };
            Ok(props || leaves || log)
        })
    }

    /// Drops everything this store keeps of (group, shard): its four tables (rows, leaves, inner
    /// nodes, leaf log) and its quarantined rows, and resets its bookkeeping (the revision keeps
    /// rising, so that no reader mistakes the empty shard for an older state). Durable. Returns
    /// the property rows dropped. The node calls it only for a shard it no longer holds, after
    /// the shard's new copies completed a round.
    pub fn drop_shard(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        self.write(Durability::Immediate, |txn| {
            let rows = match txn.open_table(names.props()) {
                Ok(table) => table.len()?,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(error) => return Err(error.into()),
            };
            txn.delete_table(names.props())?;
            txn.delete_table(names.leaves())?;
            txn.delete_table(names.nodes())?;
            txn.delete_table(names.log())?;
            {
                let mut quarantine = txn.open_table(QUARANTINE)?;
                let keys: Vec<String> = quarantine
                    .range((group, shard, "")..)?
                    .map_while(|entry| {
                        let (key, _) = entry.ok()?;
                        let (g, s, row) = key.value();
                        (g == group && s == shard).then(|| row.to_owned())
                    })
                    .collect();
                for row in &keys {
                    quarantine.remove((group, shard, row.as_str()))?;
                }
            }
            let mut meta = txn.open_table(META)?;
            let before = read_meta(&meta, group, shard)?;
            let after = ShardMeta {
                revision: before.revision + 1,
                ..ShardMeta::default()
            };
            meta.insert((group, shard), after.encode().as_slice())?;
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use propd_merkle::{Entity, Property, Shape, shard_of};

    use crate::config::{GroupDef, Groups, StoreConfig};
    use crate::store::RedbStore;

    fn store(dir: &std::path::Path) -> RedbStore {
        let groups = Groups::new([GroupDef::new("g", 2, 0)]).unwrap_or_else(|e| panic!("{e}"));
        RedbStore::open(StoreConfig::new(dir, groups, Shape::default()))
            .unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn property(id: &str) -> Property {
        Property {
            group: "g".to_owned(),
            name: "n".to_owned(),
            id: id.to_owned(),
            tags: Default::default(),
            mod_revision: 1,
            delete_time: 0,
        }
    }

    fn shard(id: &str) -> u32 {
        let entity = Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"));
        shard_of(
            &entity,
            std::num::NonZeroU32::new(2).unwrap_or_else(|| panic!("2")),
        )
    }

    /// A shard whose only row was deleted and purged, its leaf log flushed, holds nothing
    /// though its tables exist; with the row still there, or only its leaf change, it holds
    /// something.
    #[test]
    fn a_shard_of_empty_tables_holds_no_rows() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = store(dir.path());
        let id = (0..)
            .map(|i| format!("e{i}"))
            .find(|id| shard(id) == 0)
            .unwrap_or_else(|| panic!("an id of shard 0"));
        let holds = || store.holds_rows("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(!holds(), "nothing written");
        store.apply(property(&id)).unwrap_or_else(|e| panic!("{e}"));
        assert!(holds(), "a row and its pending leaf change");
        store.flush("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(holds(), "a row and its leaf");
        let entity = Entity::new("g", "n", &id).unwrap_or_else(|e| panic!("{e}"));
        store
            .delete(&entity, 2, 10)
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .purge_tombstones("g", 0, 1_000, 64)
            .unwrap_or_else(|e| panic!("{e}"));
        store.flush("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(!holds(), "empty tables");
    }

    #[test]
    fn dropping_a_shard_empties_it_and_leaves_the_other_shard_alone() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = store(dir.path());
        let ids: Vec<String> = (0..40).map(|i| format!("e{i}")).collect();
        for id in &ids {
            store.apply(property(id)).unwrap_or_else(|e| panic!("{e}"));
        }
        let dropped: Vec<&String> = ids.iter().filter(|id| shard(id) == 0).collect();
        let kept: Vec<&String> = ids.iter().filter(|id| shard(id) == 1).collect();
        assert!(
            !dropped.is_empty() && !kept.is_empty(),
            "both shards hold rows"
        );
        let revision = store.revision("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.holds_rows("g", 0).unwrap_or_else(|e| panic!("{e}")));

        let rows = store.drop_shard("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, dropped.len() as u64);
        assert!(!store.holds_rows("g", 0).unwrap_or_else(|e| panic!("{e}")));
        assert!(store.holds_rows("g", 1).unwrap_or_else(|e| panic!("{e}")));
        let tree = store.tree("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tree.root().leaf_count,
            0,
            "the dropped shard's tree is empty"
        );
        assert!(
            store.revision("g", 0).unwrap_or_else(|e| panic!("{e}")) > revision,
            "the revision keeps rising"
        );
        for id in dropped {
            let entity = Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(store.get(&entity).unwrap_or_else(|e| panic!("{e}")), None);
        }
        for id in kept {
            let entity = Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                store
                    .get(&entity)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .is_some()
            );
        }
        // Dropping it twice is harmless.
        assert_eq!(
            store.drop_shard("g", 0).unwrap_or_else(|e| panic!("{e}")),
            0
        );
        assert!(!store.holds_rows("g", 0).unwrap_or_else(|e| panic!("{e}")));
    }
}
