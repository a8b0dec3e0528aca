//! Reading stored rows back: tables that may not exist yet, a shard's bookkeeping, property rows,
//! the leaf log, and a tree built from a shard's rows. Every undecodable record is a
//! [`StoreError::Corrupt`] naming its table.

use std::collections::BTreeMap;

use propd_merkle::{BuildError, Digest, Entity, Property, Shape, Tree, TreeBuilder};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition, TableError};

use crate::codec::{ShardMeta, decode_log, decode_property};
use crate::error::{ConfigError, StoreError};
use crate::tables::META;

/// Opens a table of a read transaction; a table that was never written reads as `None`.
pub(super) fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    definition: TableDefinition<'_, K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

pub(super) fn read_meta(
    table: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    group: &str,
    shard: u32,
) -> Result<ShardMeta, StoreError> {
    match table.get((group, shard))? {
        Some(guard) => ShardMeta::decode(guard.value()).map_err(|error| StoreError::Corrupt {
            table: "meta".to_owned(),
            detail: format!("{group}/{shard}: {}", error.0),
        }),
        None => Ok(ShardMeta::default()),
    }
}

pub(super) fn read_meta_snapshot(
    txn: &ReadTransaction,
    group: &str,
    shard: u32,
) -> Result<ShardMeta, StoreError> {
    match open_read(txn, META)? {
        Some(table) => read_meta(&table, group, shard),
        None => Ok(ShardMeta::default()),
    }
}

pub(super) fn decode_row(table: &str, key: &str, value: &[u8]) -> Result<Property, StoreError> {
    let entity = Entity::parse(key).map_err(|error| StoreError::Corrupt {
        table: table.to_owned(),
        detail: format!("key {key:?}: {error}"),
    })?;
    decode_property(&entity, value).map_err(|error| StoreError::Corrupt {
        table: table.to_owned(),
        detail: error.0,
    })
}

/// The stored copy of `entity` in a shard's property table `table` (named `name`), `None` if
/// absent.
pub(super) fn read_row(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
    entity: &Entity,
) -> Result<Option<Property>, StoreError> {
    match table.get(entity.as_str())? {
        Some(guard) => Ok(Some(decode_row(name, entity.as_str(), guard.value())?)),
        None => Ok(None),
    }
}

/// The net leaf changes of a shard's leaf log: the last entry per entity wins.
pub(super) fn read_log(
    log: &impl ReadableTable<u64, &'static [u8]>,
    table: &str,
) -> Result<BTreeMap<Entity, Option<Digest>>, StoreError> {
    Ok(read_log_oldest(log, table, usize::MAX)?.0)
}

/// The oldest `max` entries of a leaf log, the last change of each entity among them, and the
/// sequence number of the last entry read (`None` for an empty log).
pub(super) fn read_log_oldest(
    log: &impl ReadableTable<u64, &'static [u8]>,
    table: &str,
    max: usize,
) -> Result<(BTreeMap<Entity, Option<Digest>>, Option<u64>), StoreError> {
    let mut changes = BTreeMap::new();
    let mut last = None;
    for row in log.iter()?.take(max) {
        let (key, value) = row?;
        let entry = decode_log(value.value()).map_err(|error| StoreError::Corrupt {
            table: table.to_owned(),
            detail: error.0,
        })?;
        changes.insert(entry.entity, entry.digest);
        last = Some(key.value());
    }
    Ok((changes, last))
}

/// Builds a shard's tree from its property rows. A row's value is the property's canonical bytes,
/// so its leaf digest is the hash of the stored value: no decoding.
pub(super) fn build_from_rows(
    shape: Shape,
    props: &impl ReadableTable<&'static str, &'static [u8]>,
    table: &str,
) -> Result<Tree, StoreError> {
    let mut builder =
        TreeBuilder::with_capacity(shape, props.len()? as usize).map_err(ConfigError::Shape)?;
    for row in props.iter()? {
        let (key, value) = row?;
        // The key is checked as `Entity::parse` checks it, but no `Entity` is made per row: the
        // builder allocates each entity once, in tree order.
        builder
            .push_str(key.value(), shape.digest(value.value()))
            .map_err(|error| match error {
                BuildError::Entity(error) => StoreError::Corrupt {
                    table: table.to_owned(),
                    detail: format!("key {:?}: {error}", key.value()),
                },
                error => StoreError::Rebuild(error),
            })?;
    }
    builder.finish().map_err(StoreError::Rebuild)
}
