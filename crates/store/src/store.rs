//! `RedbStore`: the node's properties on redb, with the live Merkle tree of every (group, shard)
//! kept in the same write transactions.
//!
//! This file answers "what is a store, and how is it opened?": the struct, [`RedbStore::open`],
//! its accessors and the write transaction every other room commits through. The rest of the store
//! is in rooms, one question each:
//!
//! - `writer`: how does a write reach the database (validation done, version order applied, leaf
//!   log appended, revision bumped, in one transaction shared by the writes that waited for the
//!   same sync: `crate::group_commit`)?
//! - `snapshot`: what does a reader see (a consistent view, lookups and scans)?
//! - `query`: which properties of a group match a query?
//! - `trees`: what is a shard's tree, fresh, at a snapshot?
//! - `maintenance`: how are trees flushed, verified and healed, and tombstones purged?
//! - `recorded`: which shape and groups was the database created with, and do they still match?
//! - `repair`: how does the repair protocol see this store?
//! - `rows`: how are stored rows and bookkeeping read back?

mod maintenance;
mod query;
mod recorded;
mod repair;
mod rows;
mod snapshot;
mod trees;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use propd_merkle::Shape;
use redb::{Database, Durability, WriteTransaction};

use crate::config::{Groups, StoreConfig, TreeUpkeep, WriteDurability};
use crate::error::{ConfigError, StoreError};
use crate::group_commit::GroupCommit;
use crate::validate::Rules;

pub use maintenance::{
    PURGE_CHUNK, PurgeReport, PurgeState, VerifyOutcome, purge_line, round_cutoff,
};
pub use query::{Query, QueryPage};
pub use snapshot::{ShardScan, Snapshot};
pub use trees::TreeView;
pub use writer::DeleteOutcome;
#[cfg(feature = "test-support")]
pub(crate) use writer::tombstone;

/// The node's property store on redb: one database file in the data directory, four tables per
/// (group, shard) (docs/formats.md). `Send + Sync`: share it behind an `Arc`; redb serializes
/// writers and readers never block.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    rules: Arc<Rules>,
    upkeep: TreeUpkeep,
    durability: WriteDurability,
    flush_threshold: u64,
    path: PathBuf,
    /// Synced property writes waiting to share a transaction; `None` when each write commits
    /// alone (group commit off, or writes not synced).
    commits: Option<GroupCommit<writer::ShardWrite, writer::Written>>,
}

impl RedbStore {
    /// Opens (or creates) the store in `config.data_dir`.
    ///
    /// The first open records the tree shape and each group's `shard_num`; a later open with
    /// another shape, or another `shard_num` for a recorded group, is refused
    /// ([`ConfigError::ShapeChanged`], [`ConfigError::ShardNumChanged`]). New groups may be added.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        config.shape.validate().map_err(ConfigError::Shape)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StoreError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.database_path();
        let mut builder = Database::builder();
        if let Some(bytes) = config.cache_bytes {
            builder.set_cache_size(bytes);
        }
        let db = builder.create(&path)?;
        let store = RedbStore {
            db,
            rules: Arc::new(Rules {
                groups: config.groups,
                shape: config.shape,
                max_property_bytes: config.max_property_bytes,
            }),
            upkeep: config.tree_upkeep,
            durability: config.durability,
            flush_threshold: config.flush_threshold,
            path,
            commits: (config.group_commit && config.durability == WriteDurability::Immediate)
                .then(GroupCommit::default),
        };
        store.check_recorded_config()?;
        tracing::debug!(path = %store.path.display(), "store opened");
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree shape of every shard.
    pub fn shape(&self) -> Shape {
        self.rules.shape
    }

    /// The group definitions.
    pub fn groups(&self) -> &Groups {
        &self.rules.groups
    }

    /// Runs `f` in a write transaction and commits it with the configured durability; on an
    /// error the transaction is aborted and nothing changes.
    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        match f(&txn) {
            Ok(value) => {
                txn.commit()?;
                Ok(value)
            }
            Err(error) => {
                txn.abort()?;
                Err(error)
            }
        }
    }

    /// The durability of property writes, as configured.
    fn data_durability(&self) -> Durability {
        match self.durability {
            WriteDurability::Immediate => Durability::Immediate,
            WriteDurability::NotSynced => Durability::None,
        }
    }
}
