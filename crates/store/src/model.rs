//! `ModelStore`: an in-memory store (a `BTreeMap` per shard and the merkle crate's `MemStorage`)
//! with the same semantics as the redb store, cheap to build, for protocol tests.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::{Mutex, MutexGuard, PoisonError};

use propd_merkle::{Entity, InnerNode, Leaf, LiveTree, MemStorage, NodeId, Property, Shape, Tree};

use crate::config::{DEFAULT_MAX_PROPERTY_BYTES, Groups, ReadCheck};
use crate::error::{ConfigError, StoreError, tree_error};
use crate::repair_view::{
    Decision, LeafKey, RepairOutcome, RepairStore, apply_in_entity_order, below_line,
    decide_at_line, page_after,
};
use crate::store::{DeleteOutcome, PurgeReport, PurgeState};
use crate::validate::{Checked, GroupTable, Rules, WriteKind};

/// An in-memory store with the redb store's semantics (version order, validation, tombstone
/// purge rules, live tree), for tests of the repair protocol. Nothing is persisted.
#[derive(Debug)]
pub struct ModelStore {
    rules: Rules,
    shards: Mutex<BTreeMap<(String, u32), ModelShard>>,
}

#[derive(Debug)]
struct ModelShard {
    properties: BTreeMap<Entity, Property>,
    tree: LiveTree<MemStorage>,
    revision: u64,
    last_complete_repair: i64,
    purge_cutoff: i64,
    purged_below: i64,
    /// Every tombstone this copy dropped (purged, or taken and purged at once), in order.
    purged: Vec<Property>,
}

impl ModelShard {
    fn new(shape: Shape) -> Result<Self, StoreError> {
        Ok(ModelShard {
            properties: BTreeMap::new(),
            tree: LiveTree::new(shape, MemStorage::new()).map_err(ConfigError::Shape)?,
            revision: 0,
            last_complete_repair: 0,
            purge_cutoff: 0,
            purged_below: 0,
            purged: Vec::new(),
        })
    }

    fn put(&mut self, checked: Checked) -> Result<(), StoreError> {
        self.tree
            .upsert(&checked.entity, checked.digest)
            .map_err(tree_error)?;
        self.properties.insert(checked.entity, checked.property);
        self.revision += 1;
        Ok(())
    }

    fn remove(&mut self, entity: &Entity) -> Result<(), StoreError> {
        self.tree.remove(entity).map_err(tree_error)?;
        self.properties.remove(entity);
        self.revision += 1;
        Ok(())
    }

    fn apply(&mut self, checked: Checked, shape: &Shape) -> Result<RepairOutcome, StoreError> {
        match decide_at_line(
            self.properties.get(&checked.entity),
            &checked.property,
            shape,
            self.purged_below,
        ) {
            Decision::Store => self.put(checked)?,
            Decision::RemoveOurs => {
                self.remove(&checked.entity)?;
                self.purged.push(checked.property);
            }
            Decision::Keep(outcome) => return Ok(outcome),
        }
        Ok(RepairOutcome::Applied)
    }

    fn flushed(&mut self) -> Result<&LiveTree<MemStorage>, StoreError> {
        self.tree.flush().map_err(tree_error)?;
        Ok(&self.tree)
    }
}

impl ModelStore {
    /// An empty model store for these groups and tree shape, with the default size limit.
    pub fn new(groups: Groups, shape: Shape) -> Result<Self, StoreError> {
        shape.validate().map_err(ConfigError::Shape)?;
        Ok(ModelStore {
            rules: Rules {
                groups: GroupTable::new(groups),
                shape,
                max_property_bytes: DEFAULT_MAX_PROPERTY_BYTES,
                read_check: ReadCheck::On,
            },
            shards: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<(String, u32), ModelShard>> {
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with_shard<T>(
        &self,
        group: &str,
        shard: u32,
        f: impl FnOnce(&mut ModelShard) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.rules.check_shard(group, shard)?;
        let mut shards = self.lock();
        let state = match shards.entry((group.to_owned(), shard)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(ModelShard::new(self.rules.shape)?),
        };
        f(state)
    }

    fn write_one(&self, checked: Checked) -> Result<RepairOutcome, StoreError> {
        let group = checked.entity.group().to_owned();
        let shape = self.rules.shape;
        self.with_shard(&group, checked.shard, |state| state.apply(checked, &shape))
    }

    /// Creates or updates a live property by the version order (`delete_time` must be 0).
    pub fn apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Apply, None)?;
        self.write_one(checked)
    }

    /// Stores a tombstone (no tags) with the caller's revision and delete time, by the version
    /// order.
    pub fn delete(
        &self,
        entity: &Entity,
        mod_revision: i64,
        delete_time: i64,
    ) -> Result<DeleteOutcome, StoreError> {
        let tombstone = crate::store::tombstone(entity, mod_revision, delete_time);
        let checked = self.rules.check(tombstone, WriteKind::Delete, None)?;
        let group = entity.group().to_owned();
        let shape = self.rules.shape;
        self.with_shard(&group, checked.shard, |state| {
            let found = state
                .properties
                .get(&checked.entity)
                .is_some_and(|property| !property.is_tombstone());
            let outcome = state.apply(checked, &shape)?;
            Ok(DeleteOutcome { found, outcome })
        })
    }

    /// Applies a copy from another node by the version order.
    pub fn repair_apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Copy, None)?;
        self.write_one(checked)
    }

    /// The stored copy of an entity (tombstones included).
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        let shard = self.rules.shard_of(entity)?;
        self.with_shard(entity.group(), shard, |state| {
            Ok(state.properties.get(entity).cloned())
        })
    }

    /// Every property of a shard in entity order (tombstones included).
    pub fn properties(&self, group: &str, shard: u32) -> Result<Vec<Property>, StoreError> {
        self.with_shard(group, shard, |state| {
            Ok(state.properties.values().cloned().collect())
        })
    }

    /// The shard's change counter.
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.with_shard(group, shard, |state| Ok(state.revision))
    }

    /// The shard's whole tree, fresh.
    pub fn tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.with_shard(group, shard, |state| {
            state.flushed()?.to_tree().map_err(tree_error)
        })
    }

    /// Records a round that completed for purging: its start and cutoff (neither moves back).
    pub fn record_complete_round(
        &self,
        group: &str,
        shard: u32,
        started_at: i64,
        cutoff: i64,
    ) -> Result<(), StoreError> {
        self.with_shard(group, shard, |state| {
            state.last_complete_repair = state.last_complete_repair.max(started_at);
            state.purge_cutoff = state.purge_cutoff.max(cutoff);
            Ok(())
        })
    }

    /// The shard's purge bookkeeping.
    pub fn purge_state(&self, group: &str, shard: u32) -> Result<PurgeState, StoreError> {
        self.with_shard(group, shard, |state| {
            Ok(PurgeState {
                last_complete_round: (state.last_complete_repair > 0)
                    .then_some(state.last_complete_repair),
                cutoff: (state.purge_cutoff > 0).then_some(state.purge_cutoff),
                purged_below: state.purged_below,
            })
        })
    }

    /// Raises the purge line to `line` (never back) and removes every tombstone below it, in
    /// chunks of at most `chunk` (counted as the redb store counts its transactions).
    pub fn purge_tombstones(
        &self,
        group: &str,
        shard: u32,
        line: i64,
        chunk: usize,
    ) -> Result<PurgeReport, StoreError> {
        self.with_shard(group, shard, |state| {
            state.purged_below = state.purged_below.max(line);
            let doomed: Vec<Entity> = state
                .properties
                .iter()
                .filter(|(_, property)| below_line(property, state.purged_below))
                .map(|(entity, _)| entity.clone())
                .collect();
            for entity in &doomed {
                if let Some(property) = state.properties.get(entity).cloned() {
                    state.remove(entity)?;
                    state.purged.push(property);
                }
            }
            Ok(PurgeReport {
                purged: doomed.len() as u64,
                purged_below: state.purged_below,
                chunks: doomed.len().div_ceil(chunk.max(1)) as u64,
                ridden: 0,
            })
        })
    }

    /// Every tombstone of the shard this copy dropped, in order: purged, or taken below the purge
    /// line and purged at once (when it removed an older version).
    pub fn purged(&self, group: &str, shard: u32) -> Result<Vec<Property>, StoreError> {
        self.with_shard(group, shard, |state| Ok(state.purged.clone()))
    }
}

impl RepairStore for ModelStore {
    type Error = StoreError;

    fn shape(&self) -> Shape {
        self.rules.shape
    }

    fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.rules.groups.has_shard(group, shard)
    }

    fn tree_node(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Option<InnerNode>, StoreError> {
        self.with_shard(group, shard, |state| {
            let inner = state.flushed()?.node(node).map_err(tree_error)?;
            Ok(inner.non_empty())
        })
    }

    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, StoreError> {
        self.with_shard(group, shard, |state| {
            state.flushed()?.children(node).map_err(tree_error)
        })
    }

    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        self.with_shard(group, shard, |state| {
            let leaves = state.tree.leaves_under(node).map_err(tree_error)?;
            Ok(page_after(leaves, after, limit))
        })
    }

    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, StoreError> {
        self.rules.check_members(entities, group, shard)?;
        self.with_shard(group, shard, |state| {
            Ok(entities
                .iter()
                .map(|entity| {
                    state
                        .properties
                        .get(entity)
                        .filter(|property| !below_line(property, state.purged_below))
                        .cloned()
                })
                .collect())
        })
    }

    fn properties_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, StoreError> {
        use std::ops::Bound;
        self.with_shard(group, shard, |state| {
            let start = after.map_or(Bound::Unbounded, |entity| Bound::Excluded(entity.clone()));
            Ok(state
                .properties
                .range((start, Bound::Unbounded))
                .map(|(_, property)| property)
                .filter(|property| !below_line(property, state.purged_below))
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        let checked = self.rules.check_batch(group, shard, batch)?;
        let shape = self.rules.shape;
        self.with_shard(group, shard, |state| {
            apply_in_entity_order(&checked, |item| state.apply(item.clone(), &shape))
        })
    }
}
