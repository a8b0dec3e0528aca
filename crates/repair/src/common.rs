//! Pieces both state machines share: the copy queue, batched applies and the listed-node check.

use std::collections::{HashSet, VecDeque};

use propd_merkle::{Entity, NodeId, Property, Shape};
use propd_proto::v1 as pb;
use prost::Message;

use crate::error::{PropertyError, ProtocolError, SyncError};
use crate::store_api::{RepairOutcome, RepairStore};
use crate::wire;

/// Copies waiting to be sent: entities still to read, and properties read but not yet paged.
#[derive(Debug, Default)]
pub(crate) struct CopyQueue {
    pub(crate) entities: VecDeque<Entity>,
    pub(crate) ready: VecDeque<pb::Property>,
}

impl CopyQueue {
    pub(crate) fn len(&self) -> usize {
        self.entities.len() + self.ready.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entities.is_empty() && self.ready.is_empty()
    }

    /// The next page of copies, reading from the store as needed; `None` when nothing is left
    /// (entities deleted meanwhile are skipped).
    pub(crate) fn next_page<S: RepairStore>(
        &mut self,
        store: &S,
        group: &str,
        shard: u32,
        page_items: usize,
        page_bytes: usize,
    ) -> Result<Option<(pb::PropertySync, u64)>, SyncError> {
        let mut page = Vec::new();
        let mut bytes = 0usize;
        loop {
            while let Some(front) = self.ready.front() {
                let len = front.encoded_len();
                if !page.is_empty() && (page.len() >= page_items || bytes + len > page_bytes) {
                    return Ok(Some(finish(page, bytes)));
                }
                bytes += len;
                page.extend(self.ready.pop_front());
            }
            if self.entities.is_empty() || page.len() >= page_items {
                break;
            }
            let take = self.entities.len().min(page_items - page.len()).min(256);
            let batch: Vec<Entity> = self.entities.drain(..take).collect();
            let found = store
                .get_many(group, shard, &batch)
                .map_err(SyncError::store("reading copies to send"))?;
            self.ready
                .extend(found.iter().flatten().map(wire::property_to_proto));
        }
        if page.is_empty() {
            return Ok(None);
        }
        Ok(Some(finish(page, bytes)))
    }
}

fn finish(properties: Vec<pb::Property>, bytes: usize) -> (pb::PropertySync, u64) {
    (pb::PropertySync { properties }, bytes as u64)
}

/// Nodes whose leaves were listed in this sync: only entities under them may travel.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    nodes: HashSet<NodeId>,
}

impl Listed {
    pub(crate) fn insert(&mut self, node: NodeId) {
        self.nodes.insert(node);
    }

    pub(crate) fn contains(&self, node: NodeId) -> bool {
        self.nodes.contains(&node)
    }

    /// Whether the entity's bucket lies under a listed node.
    pub(crate) fn covers(&self, shape: &Shape, entity: &Entity) -> bool {
        let bucket = shape.bucket_of(entity);
        (0..=bucket.level).any(|level| self.nodes.contains(&shape.ancestor(bucket, level)))
    }
}

/// What one batch apply did.
pub(crate) struct Applied {
    pub(crate) applied: u64,
    pub(crate) failed: u64,
    pub(crate) newer_here: Vec<Property>,
}

impl Applied {
    fn count(&mut self, outcomes: Vec<RepairOutcome>) {
        for outcome in outcomes {
            match outcome {
                RepairOutcome::Applied => self.applied += 1,
                RepairOutcome::LocalNewer(ours) => self.newer_here.push(ours),
                RepairOutcome::Same => {}
            }
        }
    }
}

/// Received copies waiting to be applied: pages are validated on arrival and applied together,
/// one write transaction per `apply_batch` copies (a store writes a large batch of keys in tree
/// order much faster than several small ones).
#[derive(Debug, Default)]
pub(crate) struct Applier {
    pending: Vec<Property>,
    bytes: usize,
}

impl Applier {
    /// Validates a received page (every property well formed, of this group, under a listed
    /// node) and queues it. A protocol error queues nothing of the page.
    pub(crate) fn push_page(
        &mut self,
        shape: &Shape,
        group: &str,
        listed: &Listed,
        page: pb::PropertySync,
    ) -> Result<(), ProtocolError> {
        if page.properties.len() > wire::MAX_PAGE_ITEMS {
            return Err(ProtocolError::PageTooLarge {
                field: "PropertySync.properties",
                count: page.properties.len(),
                max: wire::MAX_PAGE_ITEMS,
            });
        }
        let mut batch = Vec::with_capacity(page.properties.len());
        let mut bytes = 0;
        for property in page.properties {
            bytes += property.encoded_len();
            let (entity, property) = wire::property_from_proto(property)?;
            if property.group != group {
                return Err(ProtocolError::Property {
                    entity: entity.to_string(),
                    reason: PropertyError::OtherGroup {
                        synced: group.to_owned(),
                    },
                });
            }
            if !listed.covers(shape, &entity) {
                return Err(ProtocolError::Property {
                    entity: entity.to_string(),
                    reason: PropertyError::Unlisted,
                });
            }
            batch.push(property);
        }
        self.pending.extend(batch);
        self.bytes += bytes;
        Ok(())
    }

    /// Whether the queue has reached `items` copies or `bytes` bytes.
    pub(crate) fn is_full(&self, items: usize, bytes: usize) -> bool {
        self.pending.len() >= items || self.bytes >= bytes
    }

    /// Applies everything queued as one batch. Items the store refuses are counted as failed
    /// and the rest is applied.
    pub(crate) fn flush<S: RepairStore>(&mut self, store: &S, group: &str, shard: u32) -> Applied {
        let batch = std::mem::take(&mut self.pending);
        self.bytes = 0;
        let mut done = Applied {
            applied: 0,
            failed: 0,
            newer_here: Vec::new(),
        };
        if batch.is_empty() {
            return done;
        }
        match store.repair_apply_batch(group, shard, batch.clone()) {
            Ok(outcomes) => done.count(outcomes),
            Err(err) => {
                // The store refuses a whole batch when one item is bad; apply the items one by
                // one so that only the bad ones are lost (counted as failed, the sync goes on).
                tracing::warn!(group, shard, error = %err, count = batch.len(), "repair batch refused, applying item by item");
                for property in batch {
                    match store.repair_apply_batch(group, shard, vec![property]) {
                        Ok(outcomes) => done.count(outcomes),
                        Err(err) => {
                            tracing::warn!(group, shard, error = %err, "repair copy failed to apply");
                            done.failed += 1;
                        }
                    }
                }
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use propd_merkle::TagValue;
    use propd_store::{GroupDef, Groups, ModelStore};

    use super::*;

    fn store() -> ModelStore {
        let groups = Groups::new([GroupDef::new("g", 1, 2)]).expect("groups");
        ModelStore::new(groups, Shape::default()).expect("model store")
    }

    /// `g/n/p{i:02}`, every one the same encoded length.
    fn property(i: usize) -> Property {
        let mut property = Property {
            group: "g".into(),
            name: "n".into(),
            id: format!("p{i:02}"),
            mod_revision: 1,
            ..Property::default()
        };
        property
            .tags
            .insert("v".into(), TagValue::Str("x".repeat(40)));
        property
    }

    fn entity(i: usize) -> Entity {
        Entity::new("g", "n", &format!("p{i:02}")).expect("entity")
    }

    /// A queue of entities 0..10 with entity 3 no longer stored (deleted since it was queued).
    fn queue(store: &ModelStore) -> CopyQueue {
        let stored: Vec<Property> = (0..10).filter(|&i| i != 3).map(property).collect();
        store.repair_apply_batch("g", 0, stored).expect("seed");
        CopyQueue {
            entities: (0..10).map(entity).collect(),
            ready: VecDeque::new(),
        }
    }

    fn ids(page: &pb::PropertySync) -> Vec<String> {
        page.properties.iter().map(|p| p.id.clone()).collect()
    }

    #[test]
    fn copy_pages_stop_at_their_item_limit_skip_vanished_entities_and_keep_order() {
        let store = store();
        let mut copies = queue(&store);
        assert_eq!(copies.len(), 10);
        let one = wire::property_to_proto(&property(0)).encoded_len() as u64;
        let (page, bytes) = copies
            .next_page(&store, "g", 0, 4, usize::MAX)
            .expect("read")
            .expect("a page");
        assert_eq!(ids(&page), ["p00", "p01", "p02", "p04"], "p03 vanished");
        assert_eq!(
            bytes,
            4 * one,
            "the page's bytes are its copies' encoded lengths"
        );
        // Five entities were read (one vanished), none is left ready.
        assert_eq!(copies.len(), 5);
        assert!(!copies.is_empty());
        // Copies are read when their page is built, not ahead of it: a version written since
        // the first page goes out, not the one the queue started with.
        let mut newer = property(6);
        newer.mod_revision = 2;
        store
            .repair_apply_batch("g", 0, vec![newer])
            .expect("newer p06");
        let (page, _) = copies
            .next_page(&store, "g", 0, 4, usize::MAX)
            .expect("read")
            .expect("a page");
        assert_eq!(ids(&page), ["p05", "p06", "p07", "p08"]);
        assert_eq!(page.properties[1].mod_revision, 2, "p06 as it is now");
        assert_eq!(copies.len(), 1);
        let (page, bytes) = copies
            .next_page(&store, "g", 0, 4, usize::MAX)
            .expect("read")
            .expect("a page");
        assert_eq!(ids(&page), ["p09"]);
        assert_eq!(bytes, one);
        assert_eq!(copies.len(), 0);
        assert!(copies.is_empty());
        assert!(
            copies
                .next_page(&store, "g", 0, 4, usize::MAX)
                .expect("read")
                .is_none()
        );
    }

    #[test]
    fn copy_pages_stop_at_their_byte_limit_and_a_copy_larger_than_the_limit_goes_alone() {
        let store = store();
        let mut copies = queue(&store);
        let one = wire::property_to_proto(&property(0)).encoded_len();
        // Exactly two copies fit: a page may reach its byte limit, not pass it.
        let mut pages = Vec::new();
        while let Some((page, bytes)) = copies
            .next_page(&store, "g", 0, 100, 2 * one)
            .expect("read")
        {
            assert_eq!(bytes, (page.properties.len() * one) as u64);
            pages.push(ids(&page));
        }
        assert_eq!(
            pages,
            [
                vec!["p00", "p01"],
                vec!["p02", "p04"],
                vec!["p05", "p06"],
                vec!["p07", "p08"],
                vec!["p09"],
            ]
        );
        // A limit below one copy still sends every copy, one per page.
        let store = self::store();
        let mut copies = queue(&store);
        let mut sizes = Vec::new();
        while let Some((page, _)) = copies
            .next_page(&store, "g", 0, 100, one - 1)
            .expect("read")
        {
            sizes.push(page.properties.len());
        }
        assert_eq!(sizes, [1; 9]);
    }

    #[test]
    fn an_entity_is_covered_only_under_a_listed_node() {
        let shape = Shape::default();
        let entity = entity(1);
        let bucket = shape.bucket_of(&entity);
        let mut listed = Listed::default();
        assert!(!listed.covers(&shape, &entity), "nothing listed");
        // A node of the bucket's level that is not its ancestor covers nothing of it.
        let other = NodeId::new(
            bucket.level,
            (bucket.index + 1) % shape.level_width(bucket.level),
        );
        listed.insert(other);
        assert!(listed.contains(other));
        assert!(!listed.covers(&shape, &entity));
        let parent = shape.ancestor(bucket, bucket.level - 1);
        listed.insert(parent);
        assert!(
            listed.covers(&shape, &entity),
            "its bucket's parent is listed"
        );
        let mut root = Listed::default();
        root.insert(NodeId::ROOT);
        assert!(root.covers(&shape, &entity), "the root covers everything");
        let mut exact = Listed::default();
        exact.insert(bucket);
        assert!(exact.covers(&shape, &entity), "its own bucket is listed");
    }

    fn page(properties: impl IntoIterator<Item = Property>) -> pb::PropertySync {
        pb::PropertySync {
            properties: properties
                .into_iter()
                .map(|p| wire::property_to_proto(&p))
                .collect(),
        }
    }

    fn entity_of(property: &Property) -> Entity {
        Entity::new(&property.group, &property.name, &property.id).expect("entity")
    }

    #[test]
    fn a_received_page_is_queued_whole_or_refused_whole() {
        let shape = Shape::default();
        let mut everything = Listed::default();
        everything.insert(NodeId::ROOT);
        let mut applier = Applier::default();
        // Exactly the most copies a page may hold is accepted; one more is refused.
        let full = page((0..wire::MAX_PAGE_ITEMS).map(|i| {
            let mut p = property(0);
            p.id = format!("q{i}");
            p
        }));
        let bytes: usize = full.properties.iter().map(Message::encoded_len).sum();
        applier
            .push_page(&shape, "g", &everything, full.clone())
            .expect("a full page");
        assert!(applier.is_full(wire::MAX_PAGE_ITEMS, usize::MAX));
        assert!(!applier.is_full(wire::MAX_PAGE_ITEMS + 1, usize::MAX));
        assert!(applier.is_full(usize::MAX, bytes));
        assert!(!applier.is_full(usize::MAX, bytes + 1));
        let mut over = full;
        over.properties.push(wire::property_to_proto(&property(1)));
        let mut fresh = Applier::default();
        let refused = fresh.push_page(&shape, "g", &everything, over);
        assert!(
            matches!(refused, Err(ProtocolError::PageTooLarge { count, .. }) if count == wire::MAX_PAGE_ITEMS + 1),
            "{refused:?}"
        );
        assert!(!fresh.is_full(1, 1), "nothing of a refused page is queued");
        // A copy outside every listed node refuses its whole page.
        let bucket = shape.bucket_of(&entity(1));
        let mut one_bucket = Listed::default();
        one_bucket.insert(bucket);
        let outside = (0..200)
            .map(property)
            .find(|p| shape.bucket_of(&entity_of(p)) != bucket)
            .expect("a property in another bucket");
        let refused = fresh.push_page(&shape, "g", &one_bucket, page([property(1), outside]));
        assert!(
            matches!(
                refused,
                Err(ProtocolError::Property {
                    reason: PropertyError::Unlisted,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert!(!fresh.is_full(1, 1), "nothing of a refused page is queued");
        fresh
            .push_page(&shape, "g", &one_bucket, page([property(1)]))
            .expect("a listed copy");
        assert!(fresh.is_full(1, usize::MAX));
    }

    #[test]
    fn a_refused_batch_is_applied_item_by_item_and_only_the_bad_items_fail() {
        let store = store();
        let mut held = property(2);
        held.mod_revision = 5;
        store.repair_apply_batch("g", 0, vec![held]).expect("seed");
        let mut bad = property(1);
        bad.mod_revision = 0;
        let mut applier = Applier {
            pending: vec![property(0), bad, property(2), property(3)],
            bytes: 1,
        };
        let done = applier.flush(&store, "g", 0);
        assert_eq!((done.applied, done.failed), (2, 1));
        let newer: Vec<(String, i64)> = done
            .newer_here
            .iter()
            .map(|p| (p.id.clone(), p.mod_revision))
            .collect();
        assert_eq!(newer, [("p02".to_owned(), 5)]);
        let stored = store
            .get_many("g", 0, &[entity(0), entity(1), entity(2), entity(3)])
            .expect("read");
        let revisions: Vec<Option<i64>> = stored
            .iter()
            .map(|p| p.as_ref().map(|p| p.mod_revision))
            .collect();
        assert_eq!(revisions, [Some(1), None, Some(5), Some(1)]);
        assert!(!applier.is_full(1, 1), "a flush empties the queue");
        let nothing = applier.flush(&store, "g", 0);
        assert_eq!((nothing.applied, nothing.failed), (0, 0));
    }
}
