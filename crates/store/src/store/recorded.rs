//! The recorded node configuration: which tree shape and which groups' `shard_num` the database
//! was created with, written at the first open and checked at every later one (docs/formats.md,
//! the `config` table).

use propd_merkle::{Shape, ShapeLayout};
use redb::ReadableTable;

use crate::error::{ConfigError, StoreError};
use crate::store::RedbStore;
use crate::tables::{CONFIG, CONFIG_ROW_FORMAT, CONFIG_SHAPE, META, ROW_FORMAT, config_group_key};

impl RedbStore {
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
            for def in self.rules.groups.iter() {
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
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(())
    }
}
