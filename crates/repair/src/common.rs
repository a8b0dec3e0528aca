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
