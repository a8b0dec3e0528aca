//! The recorded node configuration: which tree shape and which groups' `shard_num` the database
//! was created with, written at the first open and checked at every later one (docs/formats.md,
//! the `config` table).

use propd_merkle::{Shape, ShapeLayout};
use redb::{Durability, ReadableDatabase, ReadableTable};

use crate::config::{GroupDef, Groups};

use crate::error::{ConfigError, StoreError};
use crate::store::RedbStore;
use crate::store::rows::open_read;
use crate::tables::{
    CONFIG, CONFIG_ROW_FORMAT, CONFIG_SHAPE, META, ROW_FORMAT, ShardTableNames, config_group_key,
};

impl RedbStore {
    /// Opens every table of every configured shard once. A table whose stored definition no
    /// longer matches (flipped bytes in the file's table directory: found by the nemesis, seed 1)
    /// refuses the file at start, named ([`StoreError::DamagedFile`]), instead of failing that
    /// shard's every read for as long as the node runs while its other shards serve.
    pub(super) fn check_shard_tables(&self) -> Result<(), StoreError> {
        let txn = self.database()?.begin_read()?;
        for group in self.rules.groups.current().iter() {
            for shard in 0..group.shard_num {
                let names = ShardTableNames::new(&group.name, shard);
                let opened = [
                    (&names.props, open_read(&txn, names.props()).map(drop)),
                    (&names.leaves, open_read(&txn, names.leaves()).map(drop)),
                    (&names.nodes, open_read(&txn, names.nodes()).map(drop)),
                    (&names.log, open_read(&txn, names.log()).map(drop)),
                ];
                for (table, result) in opened {
                    if let Err(error) = result {
                        return Err(StoreError::DamagedFile {
                            path: self.path.clone(),
                            detail: format!("table {table} is corrupt: {error}"),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Records the shape and each group's `shard_num` if they are not recorded yet, and refuses a
    /// configuration that disagrees with what is ([`ConfigError::ShapeChanged`],
    /// [`ConfigError::ShardNumChanged`]). Also creates the `meta` table, so that readers find it.
    ///
    /// A file that existed but records no shape is not a store ([`StoreError::DamagedFile`]);
    /// one written before property rows carried their check digest is refused
    /// ([`ConfigError::RowFormat`]).
    pub(super) fn check_recorded_config(&self, existed: bool) -> Result<(), StoreError> {
        let txn = self.database()?.begin_write()?;
        {
            let mut table = txn.open_table(CONFIG)?;
            let stored = table.get(CONFIG_SHAPE)?.map(|guard| guard.value().to_vec());
            let row_format = table
                .get(CONFIG_ROW_FORMAT)?
                .map(|guard| guard.value().to_vec());
            match (&stored, row_format) {
                (None, _) if existed => {
                    return Err(StoreError::DamagedFile {
                        path: self.path.clone(),
                        detail: "the file records no store configuration (no tree shape)"
                            .to_owned(),
                    });
                }
                (None, _) => {
                    table.insert(CONFIG_ROW_FORMAT, ROW_FORMAT.to_le_bytes().as_slice())?;
                }
                (Some(_), Some(format)) if format == ROW_FORMAT.to_le_bytes() => {}
                (Some(_), format) => {
                    return Err(ConfigError::RowFormat {
                        stored: format.and_then(|bytes| {
                            <[u8; 4]>::try_from(bytes.as_slice())
                                .ok()
                                .map(u32::from_le_bytes)
                        }),
                        supported: ROW_FORMAT,
                    }
                    .into());
                }
            }
            match stored {
                Some(bytes) => {
                    let stored = Shape::decode(&bytes, ShapeLayout::Packed).map_err(|error| {
                        StoreError::Corrupt {
                            table: "config".to_owned(),
                            detail: format!("stored shape: {error}"),
                        }
                    })?;
                    if stored != self.rules.shape {
                        return Err(ConfigError::ShapeChanged {
                            stored,
                            given: self.rules.shape,
                        }
                        .into());
                    }
                }
                None => {
                    table.insert(
                        CONFIG_SHAPE,
                        self.rules.shape.encode(ShapeLayout::Packed).as_slice(),
                    )?;
                }
            }
            record_groups(&mut table, self.rules.groups.current().iter())?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Adds groups to the running store (a group created in etcd while the node runs): records
    /// each new group's `shard_num`, refusing one this file recorded with another count
    /// ([`ConfigError::ShardNumChanged`]), and serves it from then on. Groups the store knows
    /// are left as they are. Returns the names of the groups added.
    pub fn add_groups(&self, defs: &[GroupDef]) -> Result<Vec<String>, StoreError> {
        let known = self.rules.groups.current();
        let added: Vec<GroupDef> = defs
            .iter()
            .filter(|d| known.get(&d.name).is_none())
            .cloned()
            .collect();
        if added.is_empty() {
            return Ok(Vec::new());
        }
        Groups::new(known.iter().cloned().chain(added.iter().cloned()))?;
        self.write(Durability::Immediate, |txn| {
            record_groups(&mut txn.open_table(CONFIG)?, added.iter())
        })?;
        self.rules.groups.extend(&added)?;
        Ok(added.into_iter().map(|d| d.name).collect())
    }
}

/// Records each group's `shard_num` in the `config` table, or refuses a group recorded with
/// another count ([`ConfigError::ShardNumChanged`]).
fn record_groups<'a>(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    defs: impl IntoIterator<Item = &'a GroupDef>,
) -> Result<(), StoreError> {
    for def in defs {
        let key = config_group_key(&def.name);
        let stored = table.get(key.as_str())?.map(|guard| guard.value().to_vec());
        match stored {
            Some(bytes) => {
                let stored = <[u8; 4]>::try_from(bytes.as_slice())
                    .map(u32::from_le_bytes)
                    .map_err(|_| StoreError::Corrupt {
                        table: "config".to_owned(),
                        detail: format!("shard_num of group {:?}", def.name),
                    })?;
                if stored != def.shard_num {
                    return Err(ConfigError::ShardNumChanged {
                        group: def.name.clone(),
                        stored,
                        given: def.shard_num,
                    }
                    .into());
                }
            }
            None => {
                table.insert(key.as_str(), def.shard_num.to_le_bytes().as_slice())?;
            }
        }
    }
    Ok(())
}
