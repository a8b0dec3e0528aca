//! Reading stored rows back: tables that may not exist yet, a shard's bookkeeping, property rows,
//! the leaf log, and a tree built from a shard's rows. A property row is checked against its
//! check digest whenever it is read; an undecodable bookkeeping record is a
//! [`StoreError::Corrupt`] naming its table.

use std::collections::BTreeMap;

use propd_merkle::{BuildError, Digest, Entity, Property, Shape, Tree, TreeBuilder};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, TableDefinition, TableError};

use crate::codec::{ROW_CHECK_LEN, ShardMeta, decode_log, decode_property, open_row};
use crate::config::ReadCheck;
use crate::error::{ConfigError, StoreError};
use crate::store::quarantine::Rotten;
use crate::tables::{META, ShardTableNames};

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

/// The property of a stored row, or why the row cannot be used: its check digest does not match
/// its key and bytes, or it does not decode (docs/formats.md, "Property rows"). Such a row is
/// rotten: treated as absent and quarantined.
///
/// With [`ReadCheck::OffForBenchmarksOnly`] the check digest is skipped, not verified.
pub(super) fn decode_row(key: &str, row: &[u8], check: ReadCheck) -> Result<Property, String> {
    let canonical = match check {
        ReadCheck::On => open_row(key, row).map_err(|error| error.0)?,
        ReadCheck::OffForBenchmarksOnly => row.get(ROW_CHECK_LEN..).unwrap_or_default(),
    };
    let entity = Entity::parse(key).map_err(|error| format!("key {key:?}: {error}"))?;
    decode_property(&entity, canonical).map_err(|error| error.0)
}

/// What a lookup of one property row found.
pub(super) enum RowRead {
    /// No row.
    Absent,
    /// A row that passed its check.
    Good(Property),
    /// A row that failed it.
    Rotten(Rotten),
}

/// The stored copy of `entity` in a shard's property table `table`.
pub(super) fn read_row(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    names: &ShardTableNames,
    entity: &Entity,
    check: ReadCheck,
) -> Result<RowRead, StoreError> {
    let Some(guard) = table.get(entity.as_str())? else {
        return Ok(RowRead::Absent);
    };
    Ok(match decode_row(entity.as_str(), guard.value(), check) {
        Ok(property) => RowRead::Good(property),
        Err(reason) => RowRead::Rotten(Rotten::new(names, entity.as_str(), guard.value(), reason)),
    })
}

/// The net leaf changes of a shard's leaf log: the last entry per entity wins.
pub(super) fn read_log(
    log: &impl ReadableTable<u64, &'static [u8]>,
    table: &str,
) -> Result<BTreeMap<Entity, Option<Digest>>, StoreError> {
    let mut changes = BTreeMap::new();
    for row in log.iter()? {
        let (_, value) = row?;
        let entry = decode_log(value.value()).map_err(|error| StoreError::Corrupt {
            table: table.to_owned(),
            detail: error.0,
        })?;
        changes.insert(entry.entity, entry.digest);
    }
    Ok(changes)
}

/// Builds a shard's tree from its property rows, checking each: a row's leaf digest is the hash
/// of its canonical bytes (no decoding), and a row that fails its check digest or whose key is
/// not an entity is left out and handed to `rotten`. Returns the tree and the bytes read.
///
/// A storage failure part way is [`StoreError::Damaged`], naming the table and the last key
/// read before it.
pub(super) fn build_from_rows(
    shape: Shape,
    props: &impl ReadableTable<&'static str, &'static [u8]>,
    names: &ShardTableNames,
    rotten: &mut dyn FnMut(Rotten),
) -> Result<(Tree, u64), StoreError> {
    let mut builder =
        TreeBuilder::with_capacity(shape, props.len()? as usize).map_err(ConfigError::Shape)?;
    let mut bytes = 0u64;
    let mut last_key = String::new();
    for row in props.iter()? {
        let (key, value) = row.map_err(|error| damaged(&names.props, &last_key, error))?;
        let (key, value) = (key.value(), value.value());
        last_key.clear();
        last_key.push_str(key);
        bytes += value.len() as u64;
        let canonical = match open_row(key, value) {
            Ok(canonical) => canonical,
            Err(error) => {
                rotten(Rotten::new(names, key, value, error.0));
                continue;
            }
        };
        // The key is checked as `Entity::parse` checks it, but no `Entity` is made per row: the
        // builder allocates each entity once, in tree order.
        match builder.push_str(key, shape.digest(canonical)) {
            Ok(()) => {}
            Err(BuildError::Entity(error)) => {
                rotten(Rotten::new(names, key, value, format!("key: {error}")));
            }
            Err(error) => return Err(StoreError::Rebuild(error)),
        }
    }
    Ok((builder.finish().map_err(StoreError::Rebuild)?, bytes))
}

/// A storage failure while scanning `table`, after the row `last_key` ("" before the first).
pub(super) fn damaged(table: &str, last_key: &str, error: redb::StorageError) -> StoreError {
    StoreError::Damaged {
        path: std::path::PathBuf::new(),
        table: table.to_owned(),
        keys: if last_key.is_empty() {
            "from the first key".to_owned()
        } else {
            format!("after key {last_key:?}")
        },
        detail: error.to_string(),
    }
}
