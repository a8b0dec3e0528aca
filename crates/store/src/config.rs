//! Store configuration: the data directory, the group definitions and the tree shape.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use propd_merkle::Shape;

use crate::error::ConfigError;

/// The default limit on a property's canonical size (DESIGN §9): 1 MiB.
pub const DEFAULT_MAX_PROPERTY_BYTES: usize = 1 << 20;

/// The file name of the node's database inside the data directory.
pub const DATABASE_FILE: &str = "propd.redb";

/// One group as the caller defines it (DESIGN §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDef {
    /// The group's name: non-empty, without `/`.
    pub name: String,
    /// How many shards the group is split into (at least 1); part of the data's placement, so it
    /// must not change for an existing group.
    pub shard_num: u32,
    /// Extra copies of each shard (copies = replicas + 1). The store records it only for the
    /// caller; it does not place anything.
    pub replicas: u32,
}

impl GroupDef {
    /// A group definition.
    pub fn new(name: impl Into<String>, shard_num: u32, replicas: u32) -> Self {
        GroupDef {
            name: name.into(),
            shard_num,
            replicas,
        }
    }
}

/// The validated set of group definitions, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Groups {
    by_name: BTreeMap<String, GroupDef>,
}

impl Groups {
    /// Checks every definition (non-empty name without `/`, `shard_num >= 1`, names unique).
    pub fn new(defs: impl IntoIterator<Item = GroupDef>) -> Result<Self, ConfigError> {
        let mut by_name = BTreeMap::new();
        for def in defs {
            if def.name.is_empty() {
                return Err(ConfigError::EmptyGroupName);
            }
            if def.name.contains('/') {
                return Err(ConfigError::SlashInGroupName { group: def.name });
            }
            if def.shard_num == 0 {
                return Err(ConfigError::ZeroShards { group: def.name });
            }
            if by_name.contains_key(&def.name) {
                return Err(ConfigError::DuplicateGroup { group: def.name });
            }
            by_name.insert(def.name.clone(), def);
        }
        Ok(Groups { by_name })
    }

    /// The definition of `group`, if it is known.
    pub fn get(&self, group: &str) -> Option<&GroupDef> {
        self.by_name.get(group)
    }

    /// Every definition, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &GroupDef> {
        self.by_name.values()
    }

    /// Whether `group` is known and `shard < shard_num`.
    pub fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.get(group).is_some_and(|def| shard < def.shard_num)
    }
}

/// Whether writes keep the Merkle tree up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TreeUpkeep {
    /// Every write updates its leaf and marks the path dirty in the same transaction (the only
    /// correct setting for a node).
    #[default]
    Live,
    /// Writes skip the tree entirely. **For benchmarks only**: it measures what the live tree
    /// costs. Tree reads then return stale digests until [`crate::RedbStore::verify`] heals the
    /// shard.
    OffForBenchmarksOnly,
}

/// How a property write is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteDurability {
    /// Every write transaction is on disk when the call returns (redb `Durability::Immediate`):
    /// an acknowledged write survives a crash.
    #[default]
    Immediate,
    /// Commits are not synced (redb `Durability::None`); a crash loses writes since the last
    /// synced commit. For tests and benchmarks that measure CPU cost, never for a node.
    NotSynced,
}

/// Everything [`crate::RedbStore::open`] needs.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory; created if missing. The database is `<data_dir>/propd.redb`.
    pub data_dir: PathBuf,
    /// The groups this node knows, validated once by [`Groups::new`].
    pub groups: Groups,
    /// The shape of every tree in this store; it must match the shape stored at creation.
    pub shape: Shape,
    /// The largest canonical property size accepted (default [`DEFAULT_MAX_PROPERTY_BYTES`]).
    pub max_property_bytes: usize,
    /// Whether writes keep the tree live (default: yes).
    pub tree_upkeep: TreeUpkeep,
    /// How property writes are made durable (default: synced before the call returns).
    pub durability: WriteDurability,
    /// redb's page cache size in bytes; `None` keeps redb's default.
    pub cache_bytes: Option<usize>,
    /// A write that leaves at least this many leaf changes in a shard's leaf log flushes the
    /// shard's tree right after it commits (default [`DEFAULT_FLUSH_THRESHOLD`]). Tree reads
    /// flush too; this bounds the log when nobody reads.
    pub flush_threshold: u64,
    /// Whether synced writes that arrive while another write's transaction is syncing share the
    /// next transaction and its one sync (default: yes). Off, every acknowledged write is its own
    /// synced transaction; benchmarks compare the two. Ignored with
    /// [`WriteDurability::NotSynced`], where every write is its own unsynced transaction.
    pub group_commit: bool,
    /// What to do when the database file exists but cannot be read as a store (empty,
    /// truncated, refused by redb): `false` (the default) refuses to open, naming the file;
    /// `true` renames it to `propd.redb.damaged` and starts with an empty store, which repair
    /// then refills from the other copies.
    pub start_empty_if_damaged: bool,
    /// Whether reads check each property row against its check digest (default: yes).
    pub read_check: ReadCheck,
}

/// Whether reads check property rows against their check digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadCheck {
    /// Every row read for a client, a repair or a verification is checked; a row that fails is
    /// quarantined and reads as absent (the only correct setting for a node).
    #[default]
    On,
    /// Client reads (`get`, `query`, scans) skip the check. **For benchmarks only**: it
    /// measures what the check costs.
    OffForBenchmarksOnly,
}

/// The default [`StoreConfig::flush_threshold`].
pub const DEFAULT_FLUSH_THRESHOLD: u64 = 32_768;

impl StoreConfig {
    /// A configuration with the defaults for everything but the directory, groups and shape.
    pub fn new(data_dir: impl Into<PathBuf>, groups: Groups, shape: Shape) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            groups,
            shape,
            max_property_bytes: DEFAULT_MAX_PROPERTY_BYTES,
            tree_upkeep: TreeUpkeep::default(),
            durability: WriteDurability::default(),
            cache_bytes: None,
            flush_threshold: DEFAULT_FLUSH_THRESHOLD,
            group_commit: true,
            start_empty_if_damaged: false,
            read_check: ReadCheck::default(),
        }
    }

    /// The path of the database file.
    pub fn database_path(&self) -> PathBuf {
        database_path(&self.data_dir)
    }
}

/// The path of the database file in `data_dir`.
pub fn database_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DATABASE_FILE)
}
