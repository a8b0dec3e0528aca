//! The redb tables of the store and their key encodings (docs/formats.md, "Store tables").
//!
//! One database per node. Node-wide tables have fixed names; each (group, shard) has four tables
//! of its own named `<kind>/<group>/<shard>` (a group name never contains `/`, so names cannot
//! collide), so scanning, rebuilding or dropping one shard touches no other shard's data.

use redb::TableDefinition;

/// Node-wide settings: `"shape"` -> the tree shape the database was created with;
/// `"group/<name>"` -> the group's `shard_num` as `u32` LE.
pub(crate) const CONFIG: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("config");

/// Per-(group, shard) bookkeeping: `(group, shard)` -> `ShardMeta` (24 bytes).
pub(crate) const META: TableDefinition<'static, (&str, u32), &[u8]> = TableDefinition::new("meta");

/// Property rows that failed their check, kept for inspection: `(group, shard, row key)` -> the
/// reason and the row's bytes as found (`codec::encode_quarantined`). Nothing reads them back as
/// properties.
pub(crate) const QUARANTINE: TableDefinition<'static, (&str, u32, &str), &[u8]> =
    TableDefinition::new("quarantine");

/// The key of the property row format in [`CONFIG`] (`u32` LE).
pub(crate) const CONFIG_ROW_FORMAT: &str = "row_format";

/// The property row format this build writes and reads: 2, rows start with their check digest
/// (`codec::encode_row`). Format 1 (no record: canonical bytes alone) is refused.
pub(crate) const ROW_FORMAT: u32 = 2;

/// A key of [`CONFIG`] that [`crate::RedbStore::recover`] writes to probe whether writes work.
pub(crate) const CONFIG_PROBE: &str = "write_probe";

/// The key of the shape in [`CONFIG`].
pub(crate) const CONFIG_SHAPE: &str = "shape";

/// The key of a group's `shard_num` in [`CONFIG`].
pub(crate) fn config_group_key(group: &str) -> String {
    format!("group/{group}")
}

/// The names of the four tables of one (group, shard).
#[derive(Debug, Clone)]
pub(crate) struct ShardTableNames {
    /// The group.
    pub(crate) group: String,
    /// The shard.
    pub(crate) shard: u32,
    /// `props/<group>/<shard>`: entity (UTF-8 `group/name/id`) -> property record.
    pub(crate) props: String,
    /// `leaves/<group>/<shard>`: (bucket index `u64`, entity) -> leaf digest bytes.
    pub(crate) leaves: String,
    /// `nodes/<group>/<shard>`: (level `u32`, index `u64`) -> inner node (leaf count + digest).
    pub(crate) nodes: String,
    /// `log/<group>/<shard>`: sequence `u64` -> leaf change not yet applied to `leaves`.
    pub(crate) log: String,
}

impl ShardTableNames {
    pub(crate) fn new(group: &str, shard: u32) -> Self {
        ShardTableNames {
            group: group.to_owned(),
            shard,
            props: format!("props/{group}/{shard}"),
            leaves: format!("leaves/{group}/{shard}"),
            nodes: format!("nodes/{group}/{shard}"),
            log: format!("log/{group}/{shard}"),
        }
    }

    pub(crate) fn props(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.props)
    }

    pub(crate) fn leaves(&self) -> TableDefinition<'_, (u64, &'static str), &'static [u8]> {
        TableDefinition::new(&self.leaves)
    }

    pub(crate) fn nodes(&self) -> TableDefinition<'_, (u32, u64), &'static [u8]> {
        TableDefinition::new(&self.nodes)
    }

    pub(crate) fn log(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.log)
    }
}
