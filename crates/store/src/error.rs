//! Typed errors of the store: bad input (naming the field), configuration, and storage faults.

use std::convert::Infallible;
use std::path::PathBuf;

use propd_merkle::{BuildError, LiveError, Shape, ShapeError};

/// A property or request that the store refuses (DESIGN §9). Nothing stored changes when one is
/// returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The group is not one of the store's group definitions.
    #[error("unknown group {group:?}")]
    UnknownGroup {
        /// The refused group name.
        group: String,
    },
    /// The shard number is not below the group's `shard_num`.
    #[error("shard {shard} is out of range for group {group:?} (shard_num {shard_num})")]
    ShardOutOfRange {
        /// The group.
        group: String,
        /// The refused shard.
        shard: u32,
        /// The group's shard count.
        shard_num: u32,
    },
    /// A property handed in for one shard belongs to another.
    #[error("property {entity} belongs to shard {actual}, not to shard {expected}")]
    WrongShard {
        /// The property's entity.
        entity: String,
        /// The shard the caller named.
        expected: u32,
        /// The shard the entity hashes to.
        actual: u32,
    },
    /// A property or entity handed in for one group belongs to another.
    #[error("{entity} does not belong to group {expected:?}")]
    WrongGroup {
        /// The entity.
        entity: String,
        /// The group the caller named.
        expected: String,
    },
    /// The property's canonical encoding is larger than the configured limit.
    #[error("property {entity} is {size} bytes, over the limit of {max} bytes")]
    TooLarge {
        /// The property's entity.
        entity: String,
        /// Its canonical size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A numeric field has a value the operation does not accept.
    #[error("{field} of {entity} is {value}, but {expected}")]
    Field {
        /// The property's entity.
        entity: String,
        /// `mod_revision` or `delete_time`.
        field: &'static str,
        /// The refused value.
        value: i64,
        /// What the operation requires, as a phrase (`must be > 0`).
        expected: &'static str,
    },
    /// The entity is malformed (empty part, `/` in group or name, too long); names the field.
    #[error("invalid entity: {0}")]
    Entity(#[from] propd_merkle::EntityError),
}

/// A refused store configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A group definition has an empty name.
    #[error("group name must not be empty")]
    EmptyGroupName,
    /// A group name contains `/`.
    #[error("group name {group:?} must not contain '/'")]
    SlashInGroupName {
        /// The refused name.
        group: String,
    },
    /// A group with `shard_num` 0.
    #[error("group {group:?}: shard_num must be at least 1")]
    ZeroShards {
        /// The group.
        group: String,
    },
    /// Two definitions with one name.
    #[error("group {group:?} is defined twice")]
    DuplicateGroup {
        /// The group.
        group: String,
    },
    /// The tree shape is invalid.
    #[error("invalid tree shape: {0}")]
    Shape(#[from] ShapeError),
    /// The database was created with another tree shape.
    #[error(
        "the database was created with tree shape {stored}, but the configuration gives {given}"
    )]
    ShapeChanged {
        /// The stored shape.
        stored: Shape,
        /// The configured shape.
        given: Shape,
    },
    /// The database's property rows are in a format this build does not read.
    #[error(
        "the database holds property rows in format {}, but this build reads format {supported} \
         (rows with a check digest); start the node with an empty store and let repair refill it",
        stored.map_or_else(|| "1 (no check digest)".to_owned(), |f| f.to_string())
    )]
    RowFormat {
        /// The recorded format (`None`: written before formats were recorded).
        stored: Option<u32>,
        /// The format this build reads.
        supported: u32,
    },
    /// An existing group's shard count changed, which would misplace every stored property.
    #[error(
        "group {group:?} has shard_num {stored} in the database, but the configuration gives {given}"
    )]
    ShardNumChanged {
        /// The group.
        group: String,
        /// Its stored shard count.
        stored: u32,
        /// Its configured shard count.
        given: u32,
    },
}

/// Any error of a store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The request was refused; nothing changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// One item of a batch was refused; nothing of the batch was applied.
    #[error("batch item {index}: {source}")]
    BatchItem {
        /// The item's position in the batch as given.
        index: usize,
        /// Why it was refused.
        source: ValidationError,
    },
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// redb failed.
    #[error("database: {0}")]
    Database(#[from] redb::Error),
    /// The live tree refused: its storage is inconsistent with the shape (a bug or corruption;
    /// verification heals it), or a read named a node the shape does not have.
    #[error("tree: {0}")]
    Tree(#[source] LiveError<Infallible>),
    /// A shard's tree could not be built from its property rows.
    #[error("tree rebuild: {0}")]
    Rebuild(#[source] BuildError),
    /// The database file is damaged where a scan or lookup read it (redb found a bad page or
    /// panicked on one); names the table and the key range. Other tables may still be readable.
    #[error("damaged store {}: table {table}, {keys}: {detail}", path.display())]
    Damaged {
        /// The database file (set by the store; empty where the error is first made).
        path: PathBuf,
        /// The table being read.
        table: String,
        /// Where in it: `after key "..."`, or `from the first key`.
        keys: String,
        /// What redb reported.
        detail: String,
    },
    /// The database file cannot be opened as a store: empty, truncated or unreadable. Nothing
    /// was changed; the operator may start with an empty store instead (`allow_empty_store`),
    /// which keeps the damaged file aside.
    #[error("damaged database file {path}: {detail}")]
    DamagedFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A write failed because the disk is full. Nothing of it was applied; reads go on, and the
    /// store recovers by itself once space is freed ([`crate::RedbStore::recover`]).
    #[error("disk full: writes to {path} fail ({detail}); free space on its disk")]
    DiskFull {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// A write failed on an I/O error other than a full disk; later writes fail fast until the
    /// database is reopened ([`crate::RedbStore::recover`]).
    #[error("writes to {path} fail on an I/O error: {detail}")]
    WritesFailing {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// A stored record could not be decoded.
    #[error("corrupt record in table {table}: {detail}")]
    Corrupt {
        /// The table.
        table: String,
        /// What was wrong.
        detail: String,
    },
    /// The write waited in a group commit whose leader stopped (it panicked) before answering:
    /// the write may or may not be stored.
    #[error("the group commit this write waited in was abandoned; it may or may not be stored")]
    GroupCommitAbandoned,
    /// A step of a tombstone purge, carried by another write's transaction, failed: that write
    /// failed with the underlying error, and the purge stopped.
    #[error("the purge of group {group:?} shard {shard} stopped: a step of it failed: {detail}")]
    PurgeStep {
        /// The purged shard's group.
        group: String,
        /// The purged shard.
        shard: u32,
        /// What the step's error said.
        detail: String,
    },
}

macro_rules! from_redb {
    ($($ty:ty),*) => {
        $(impl From<$ty> for StoreError {
            fn from(error: $ty) -> Self {
                StoreError::Database(redb::Error::from(error))
            }
        })*
    };
}

from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<Infallible> for StoreError {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

/// Converts a live-tree error: a failure of the tree's storage is the store's own error (redb,
/// a corrupt record); anything else is the tree's, kept as the source of [`StoreError::Tree`].
pub(crate) fn tree_error<E>(error: LiveError<E>) -> StoreError
where
    E: std::error::Error + Into<StoreError> + 'static,
{
    match error.split_storage() {
        Ok(tree) => StoreError::Tree(tree),
        Err(storage) => storage.into(),
    }
}

impl StoreError {
    /// The validation error, when the request was refused as bad input.
    pub fn validation(&self) -> Option<&ValidationError> {
        match self {
            StoreError::Invalid(error) | StoreError::BatchItem { source: error, .. } => Some(error),
            _ => None,
        }
    }
}
