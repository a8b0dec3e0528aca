//! The narrow view of one node's store that the two-node repair protocol needs (STYLE 7): read a
//! shard's tree node by node, page through its leaves, read properties by entity and apply a batch
//! of copies by the version order.
//!
//! It lives here, beside the tree types it speaks in, so that the repair core depends on the
//! tree and not on a database: `propd-store` implements [`RepairStore`] for its redb store and its
//! in-memory model, and the repair protocol reads any implementation through it.

use crate::build::Leaf;
use crate::entity::Entity;
use crate::position::NodeId;
use crate::property::Property;
use crate::shape::Shape;
use crate::storage::InnerNode;

/// What applying one incoming copy did (DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairOutcome {
    /// The incoming copy was newer (or there was none) and is now stored.
    Applied,
    /// The stored copy is newer; it is returned so that the caller can send it back.
    LocalNewer(Property),
    /// The stored copy is identical to the incoming one; nothing changed.
    Same,
}

/// The position of a leaf in `(bucket, entity)` order: the paging cursor of
/// [`RepairStore::leaves_under`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafKey {
    /// The leaf's bucket index (at the shape's bucket level).
    pub bucket: u64,
    /// The leaf's entity.
    pub entity: Entity,
}

impl LeafKey {
    /// The key of a leaf.
    pub fn of(leaf: &Leaf) -> Self {
        LeafKey {
            bucket: leaf.bucket,
            entity: leaf.entity.clone(),
        }
    }
}

impl From<&Leaf> for LeafKey {
    fn from(leaf: &Leaf) -> Self {
        LeafKey::of(leaf)
    }
}

/// The narrow view of one node's store that the two-node repair protocol needs.
///
/// Every tree read returns fresh digests (dirty nodes are recomputed first). Consecutive calls
/// may see different states when writes continue in between: the protocol tolerates that, the
/// next round settles it.
pub trait RepairStore: Send + Sync {
    /// The store's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The tree shape this store uses for every shard.
    fn shape(&self) -> Shape;

    /// Whether this node holds (group, shard): the group is known and `shard < shard_num`.
    fn has_shard(&self, group: &str, shard: u32) -> bool;

    /// A fresh tree node (digest and leaf count); `None` for an empty subtree.
    fn tree_node(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Option<InnerNode>, Self::Error>;

    /// The non-empty children of a node, in index order, with fresh digests (none for a bucket).
    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, Self::Error>;

    /// Leaves under a node in `(bucket, entity)` order, starting strictly after `after` (for
    /// paging), at most `limit` of them.
    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, Self::Error>;

    /// The shard's properties in entity order, strictly after `after`, at most `limit`
    /// (tombstones included; those a `get_many` would not return left out). Entity order is the
    /// key order of a store's property rows, the order in which a store writes a batch fastest:
    /// the bulk path streams a whole shard this way to a replica that holds none of it.
    fn properties_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, Self::Error>;

    /// Properties by entity (tombstones included), `None` where absent; one answer per entity in
    /// input order. Every entity must belong to (group, shard).
    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, Self::Error>;

    /// Applies incoming copies by the version order in one write transaction, in entity order;
    /// returns one outcome per input, in input order. An entity given twice is applied twice, in
    /// input order, the second against the result of the first.
    ///
    /// **Validation is all or nothing**: when any item is refused (bad entity, wrong group or
    /// shard, oversize, bad revision), the call fails with an error naming the item's index (the
    /// redb store's `StoreError::BatchItem`) and nothing of the batch is applied. A caller that
    /// wants to go on drops that item, counts it as failed and applies the rest.
    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, Self::Error>;
}
