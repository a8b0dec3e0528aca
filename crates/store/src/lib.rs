//! propd-store: where one node keeps its properties, and the Merkle tree that the repair protocol
//! reads.
//!
//! [`RedbStore`] keeps everything in one redb database per node (`<data_dir>/propd.redb`), with
//! four tables per (group, shard): the properties by entity (their canonical bytes), the tree's
//! leaves by (bucket, entity), its inner nodes, and a leaf log (docs/formats.md, "Store tables
//! (redb)"). Every write validates its input (DESIGN §9), applies it by the total version order of
//! DESIGN §3, and in the same write transaction appends the leaf change to the log and bumps the
//! shard's revision. A flush applies the log to the leaves in bucket order and recomputes the
//! nodes above them; tree reads flush first (or, on a snapshot, recompute in memory), so a tree is
//! never stale. Acknowledged writes are synced to disk before the call returns; writes that arrive
//! while another write's transaction syncs share the next transaction and its one sync (group
//! commit, `StoreConfig::group_commit`), each answered with its own outcome.
//!
//! [`RepairStore`] is the narrow view the repair protocol uses (defined in `propd-merkle`, so that
//! the repair core links no database; re-exported here). With the `test-support` feature,
//! `ModelStore` implements it in memory and `conformance` checks that both implementations
//! behave the same.
//!
//! What this crate does not do: no networking, no async, no clock reads (times such as `now`
//! are parameters), no placement (it stores whatever (group, shard) it is given within the group
//! definitions) and no scheduling of verification, repair or purges (the node does that).

pub mod config;
#[cfg(feature = "test-support")]
pub mod conformance;
pub mod error;
#[cfg(feature = "test-support")]
pub mod model;
pub mod repair_view;
pub mod store;

mod codec;
mod group_commit;
mod tables;
mod tree_store;
mod validate;

pub use config::{
    DATABASE_FILE, DEFAULT_FLUSH_THRESHOLD, DEFAULT_MAX_PROPERTY_BYTES, GroupDef, Groups,
    ReadCheck, StoreConfig, TreeUpkeep, WriteDurability,
};
pub use error::{ConfigError, StoreError, ValidationError};
#[cfg(feature = "test-support")]
pub use model::ModelStore;
pub use repair_view::{LeafKey, RepairOutcome, RepairStore};
pub use store::{
    DeleteOutcome, PURGE_CHUNK, PurgeReport, PurgeState, QuarantinedRow, Query, QueryPage,
    RedbStore, ScrubReport, ShardScan, Snapshot, StoreHealth, TreeView, VerifyOutcome, purge_line,
    round_cutoff,
};

/// Decodes one stored property row, its key and the property's canonical bytes (what follows
/// the row's check digest, docs/formats.md), with the checks the store applies when it decodes
/// a row; a failure is the store's [`StoreError::Corrupt`]. Exposed for the fuzz targets (`tests/fuzz`), behind `test-support`.
#[cfg(feature = "test-support")]
pub fn decode_property_row(key: &str, value: &[u8]) -> Result<propd_merkle::Property, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "(fuzz)".to_owned(),
        detail,
    };
    let entity = propd_merkle::Entity::parse(key)
        .map_err(|error| corrupt(format!("key {key:?}: {error}")))?;
    codec::decode_property(&entity, value).map_err(|error| corrupt(error.0))
}
