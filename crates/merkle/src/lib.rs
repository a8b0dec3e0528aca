//! The Merkle tree of one (group, shard): canonical property bytes, leaf and node digests, tree
//! positions, an incremental tree over a storage trait, a tree built from a stream, a level-by-level
//! diff with its bandwidth model, a versioned snapshot file format, and the narrow store view the
//! repair protocol reads a shard through ([`RepairStore`]).
//!
//! The tree has the levels **root → slots → bucket levels → leaves** (see [`Shape`] and
//! [`NodeId`]). A leaf is `(entity, digest of the canonical bytes)`; leaves are ordered everywhere
//! (tree, diff, snapshot, wire) by `(bucket index, entity bytes)`: within one bucket by entity
//! bytes. The exact byte layouts are in `docs/formats.md`.
//!
//! ```
//! use propd_merkle::{LiveTree, MemStorage, Property, Shape, TreeBuilder, diff};
//!
//! let shape = Shape::default();
//! let property = Property { group: "g".into(), name: "n".into(), id: "1".into(), ..Property::default() };
//!
//! // A tree built in one pass and a live tree kept up to date leaf by leaf agree.
//! let mut builder = TreeBuilder::new(shape)?;
//! builder.push_property(&property)?;
//! let built = builder.finish()?;
//! let mut live = LiveTree::new(shape, MemStorage::new())?;
//! live.upsert(&property.entity()?, property.leaf_digest(&shape))?;
//! live.flush()?;
//! assert_eq!(live.root()?, built.root());
//! assert!(diff(&built, &live.to_tree()?)?.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What this crate does not do: no IO, no async, no clock reads and no logging. It never touches a
//! disk or a socket: the store persists the live tree through [`TreeStorage`], and the repair
//! protocol moves digests over the wire itself.

pub mod build;
pub mod diff;
pub mod digest;
pub mod entity;
pub mod live;
pub mod position;
pub mod property;
pub mod repair_store;
pub mod shape;
pub mod snapshot;
pub mod storage;
pub mod version;

pub use build::{BuildError, Leaf, Tree, TreeBuilder};
pub use diff::{Diff, LevelCost, ShapeMismatch, diff};
pub use digest::{Algorithm, Digest, DigestError, MAX_DIGEST_WIDTH, NodeHasher};
pub use entity::{Entity, EntityError};
pub use live::{LiveError, LiveTree};
pub use position::{NodeId, TREE_SEED, position, shard_of};
pub use property::{Property, TagValue};
pub use repair_store::{LeafKey, RepairOutcome, RepairStore};
pub use shape::{FORMAT_VERSION, Shape, ShapeDecodeError, ShapeError, ShapeLayout};
pub use snapshot::SnapshotError;
pub use storage::{InnerNode, MemStorage, TreeStorage};
pub use version::version_order;
