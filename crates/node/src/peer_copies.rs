//! The store as the repair protocol sees it on this node: every read goes straight to the redb
//! store, and a batch of copies received from a peer (either side of a repair stream, the
//! descent or the bulk path) is first checked against what a peer could have accepted
//! ([`check_peer_copy`], the rule replica writes follow). A copy whose revision or delete time
//! lies beyond that bound is refused with an error naming the field: it is not stored, so it is
//! never served nor sent on; the sync counts it as failed (and the round does not count for
//! purging) and goes on with the rest.

use std::sync::Arc;
use std::time::Duration;

use propd_merkle::{
    Entity, InnerNode, Leaf, LeafKey, NodeId, Property, RepairOutcome, RepairStore, Shape,
};
use propd_store::{RedbStore, StoreError};

use crate::node::now_nanos;
use crate::tombstones::check_peer_copy;

/// Why a batch of copies from a peer was not applied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerCopyError {
    /// The store failed or refused the batch.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A copy carries a time no coordinator could have accepted; nothing of the batch is applied.
    #[error("copy {index} of the batch ({entity}) refused: {field} {message}")]
    Refused {
        /// Its index in the batch.
        index: usize,
        /// Its entity, as `group/name/id`.
        entity: String,
        /// The field, as the API names it.
        field: &'static str,
        /// Why.
        message: String,
    },
}

/// The node's store under the peer-copy check; `skew` is `max_clock_skew`.
#[derive(Debug, Clone)]
pub(crate) struct PeerChecked {
    store: Arc<RedbStore>,
    skew: Duration,
}

impl PeerChecked {
    /// `store`, checking incoming copies against `skew`.
    pub(crate) fn new(store: Arc<RedbStore>, skew: Duration) -> Self {
        Self { store, skew }
    }

    /// Refuses the batch when any copy's revision or delete time lies beyond the bound at `now`.
    fn check(&self, batch: &[Property], now: i64) -> Result<(), PeerCopyError> {
        for (index, property) in batch.iter().enumerate() {
            check_peer_copy(property, now, self.skew).map_err(|refused| {
                PeerCopyError::Refused {
                    index,
                    entity: format!("{}/{}/{}", property.group, property.name, property.id),
                    field: refused.field,
                    message: refused.message,
                }
            })?;
        }
        Ok(())
    }
}

impl RepairStore for PeerChecked {
    type Error = PeerCopyError;

    fn shape(&self) -> Shape {
        self.store.shape()
    }

    fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.store.has_shard(group, shard)
    }

    fn tree_node(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Option<InnerNode>, PeerCopyError> {
        Ok(self.store.tree_node(group, shard, node)?)
    }

    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, PeerCopyError> {
        Ok(self.store.tree_children(group, shard, node)?)
    }

    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, PeerCopyError> {
        Ok(self.store.leaves_under(group, shard, node, after, limit)?)
    }

    fn properties_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, PeerCopyError> {
        Ok(self.store.properties_after(group, shard, after, limit)?)
    }

    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, PeerCopyError> {
        Ok(self.store.get_many(group, shard, entities)?)
    }

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, PeerCopyError> {
        self.check(&batch, now_nanos())?;
        Ok(self.store.repair_apply_batch(group, shard, batch)?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use propd_store::{GroupDef, Groups, StoreConfig};

    use super::*;

    const S: i64 = 1_000_000_000;

    fn copy(id: &str, mod_revision: i64, delete_time: i64) -> Property {
        Property {
            group: "g".into(),
            name: "p".into(),
            id: id.into(),
            tags: BTreeMap::new(),
            mod_revision,
            delete_time,
        }
    }

    #[test]
    fn a_copy_from_beyond_the_skew_bound_is_refused_naming_the_field_and_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(StoreConfig::new(
            dir.path(),
            Groups::new([GroupDef::new("g", 1, 0)]).unwrap(),
            Shape::default(),
        ))
        .unwrap();
        let checked = PeerChecked::new(Arc::new(store), Duration::from_secs(10));
        let now = now_nanos();
        let future_revision = vec![copy("ok", now, 0), copy("late", now + 30 * S, 0)];
        let error = checked
            .repair_apply_batch("g", 0, future_revision)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("copy 1") && error.contains("g/p/late"),
            "{error}"
        );
        assert!(error.contains("property.mod_revision"), "{error}");
        let future_delete = vec![copy("gone", now, now + 30 * S)];
        let error = checked
            .repair_apply_batch("g", 0, future_delete)
            .unwrap_err()
            .to_string();
        assert!(error.contains("property.delete_time"), "{error}");
        let entities = ["ok", "late", "gone"].map(|id| Entity::new("g", "p", id).unwrap());
        assert_eq!(
            checked.get_many("g", 0, &entities).unwrap(),
            [None, None, None],
            "nothing of a refused batch is stored"
        );

        // Within twice the bound (a client-chosen revision on a coordinator whose clock is
        // ahead of ours): applied.
        let outcomes = checked
            .repair_apply_batch("g", 0, vec![copy("ok", now + 15 * S, 0)])
            .unwrap();
        assert_eq!(outcomes, [RepairOutcome::Applied]);
    }
}
