//! The write path: a property write, delete or batch of copies, validated, applied to one
//! (group, shard) by the version order, its leaf change appended to the shard's leaf log and the
//! revision bumped, all in one write transaction ([`ShardWriter`]); and a flush after the commit
//! when the log has grown past the threshold.
//!
//! Synced writes go through the group commit (`crate::group_commit`): the writes that waited for
//! the same sync are applied one after the other in one transaction, each exactly as it would be
//! alone (its own version-order decision, leaf-log entries and revision bumps, in arrival order),
//! so the shards end as the same writes one by one would leave them. If one of them fails inside
//! the shared transaction, the transaction is aborted and each write is committed alone, so that
//! a failure refuses only itself.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Range;
use std::sync::Arc;

use propd_merkle::{Digest, Entity, LiveTree, Property, Shape, Tree};
use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use crate::codec::{ShardMeta, encode_inner, encode_log};
use crate::config::{ReadCheck, TreeUpkeep};
use crate::error::{ConfigError, StoreError, tree_error};
use crate::group_commit::GroupId;
use crate::repair_view::{Decision, RepairOutcome, decide_at_line, entity_order};
use crate::store::RedbStore;
use crate::store::quarantine::RotQueue;
use crate::store::rows::{RowRead, build_from_rows, read_log_oldest, read_meta, read_row};
use crate::tables::{META, ShardTableNames};
use crate::tree_store::TxnTree;
use crate::validate::{Checked, WriteKind};

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Whether a live copy was stored before the delete.
    pub found: bool,
    /// What storing the tombstone did by the version order.
    pub outcome: RepairOutcome,
}

/// The tombstone every copy of a delete stores: no tags, the given revision and delete time.
pub(crate) fn tombstone(entity: &Entity, mod_revision: i64, delete_time: i64) -> Property {
    Property {
        group: entity.group().to_owned(),
        name: entity.name().to_owned(),
        id: entity.id().to_owned(),
        tags: Default::default(),
        mod_revision,
        delete_time,
    }
}

/// One write the group commit carries: validated copies of one (group, shard), applied in entity
/// order in one transaction (a single `apply`, `delete` or `repair_apply` is a write of one).
pub(crate) struct ShardWrite {
    group: String,
    shard: u32,
    items: Vec<Checked>,
}

impl ShardWrite {
    fn one(checked: Checked) -> Self {
        ShardWrite {
            group: checked.entity.group().to_owned(),
            shard: checked.shard,
            items: vec![checked],
        }
    }
}

/// What one item of a [`ShardWrite`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ItemOutcome {
    outcome: RepairOutcome,
    /// Whether a live copy was stored before.
    had_live: bool,
}

/// What a [`ShardWrite`] did: one outcome per item, in the order the items were given.
pub(crate) type Written = Vec<ItemOutcome>;

/// The tables of one (group, shard) opened in a write transaction, and its bookkeeping.
pub(super) struct ShardWriter<'txn> {
    pub(super) txn: &'txn WriteTransaction,
    pub(super) rot: Arc<RotQueue>,
    pub(super) names: ShardTableNames,
    group: String,
    shard: u32,
    pub(super) props: Table<'txn, &'static str, &'static [u8]>,
    leaves: Table<'txn, (u64, &'static str), &'static [u8]>,
    nodes: Table<'txn, (u32, u64), &'static [u8]>,
    log: Table<'txn, u64, &'static [u8]>,
    next_seq: Option<u64>,
    pub(super) meta: ShardMeta,
    pub(super) meta_changed: bool,
    shape: Shape,
    upkeep: TreeUpkeep,
}

impl<'txn> ShardWriter<'txn> {
    fn open(
        txn: &'txn WriteTransaction,
        group: &str,
        shard: u32,
        shape: Shape,
        upkeep: TreeUpkeep,
        rot: Arc<RotQueue>,
    ) -> Result<Self, StoreError> {
        let names = ShardTableNames::new(group, shard);
        let meta = read_meta(&txn.open_table(META)?, group, shard)?;
        Ok(ShardWriter {
            txn,
            rot,
            props: txn.open_table(names.props())?,
            leaves: txn.open_table(names.leaves())?,
            nodes: txn.open_table(names.nodes())?,
            log: txn.open_table(names.log())?,
            next_seq: None,
            names,
            group: group.to_owned(),
            shard,
            meta,
            meta_changed: false,
            shape,
            upkeep,
        })
    }

    fn tree(&mut self) -> Result<LiveTree<TxnTree<'_, 'txn>>, StoreError> {
        let storage = TxnTree {
            leaves: &mut self.leaves,
            nodes: &mut self.nodes,
            leaves_name: &self.names.leaves,
            nodes_name: &self.names.nodes,
        };
        LiveTree::new(self.shape, storage).map_err(|error| ConfigError::Shape(error).into())
    }

    /// The stored copy of `entity`; a rotten copy is quarantined in this transaction and reads
    /// as absent.
    pub(super) fn get(&mut self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        match read_row(&self.props, &self.names, entity, ReadCheck::On)? {
            RowRead::Absent => Ok(None),
            RowRead::Good(property) => Ok(Some(property)),
            RowRead::Rotten(rotten) => {
                self.quarantine(&rotten)?;
                Ok(None)
            }
        }
    }

    pub(super) fn bump(&mut self) {
        self.meta.revision += 1;
        self.meta_changed = true;
    }

    fn put(&mut self, checked: &Checked) -> Result<(), StoreError> {
        self.props
            .insert(checked.entity.as_str(), checked.bytes.as_slice())?;
        self.log_leaf(&checked.entity, Some(&checked.digest))?;
        self.bump();
        Ok(())
    }

    pub(super) fn remove(&mut self, entity: &Entity) -> Result<(), StoreError> {
        self.props.remove(entity.as_str())?;
        self.log_leaf(entity, None)?;
        self.bump();
        Ok(())
    }

    /// Records a leaf change in the shard's leaf log, in the property's own transaction. The log
    /// is keyed by a sequence number, so this is an append: the random-order leaf table is
    /// written at the next flush, sorted, many changes at once.
    fn log_leaf(&mut self, entity: &Entity, digest: Option<&Digest>) -> Result<(), StoreError> {
        if self.upkeep != TreeUpkeep::Live {
            return Ok(());
        }
        let seq = match self.next_seq {
            Some(seq) => seq,
            None => match self.log.last()? {
                Some((key, _)) => key.value() + 1,
                None => 0,
            },
        };
        self.log
            .insert(seq, encode_log(entity, digest).as_slice())?;
        self.next_seq = Some(seq + 1);
        Ok(())
    }

    /// Leaf changes waiting in the log.
    pub(super) fn pending(&self) -> Result<u64, StoreError> {
        Ok(self.log.len()?)
    }

    /// Applies the oldest `max` entries of the leaf log (`usize::MAX`: all) to the leaf table in
    /// (bucket, entity) order, recomputes every dirty node and removes those entries from the
    /// log. Entries left are newer, so a reader applying the log over the leaf table sees the
    /// same tree. Returns the number of inner nodes recomputed.
    pub(super) fn flush_tree(&mut self, max: usize) -> Result<usize, StoreError> {
        let (changes, last) = read_log_oldest(&self.log, &self.names.log, max)?;
        let mut sorted: Vec<(u64, Entity, Option<Digest>)> = changes
            .into_iter()
            .map(|(entity, digest)| (self.shape.bucket_of(&entity).index, entity, digest))
            .collect();
        sorted.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut tree = self.tree()?;
        for (_, entity, digest) in &sorted {
            match digest {
                Some(digest) => tree.upsert(entity, *digest).map(drop),
                None => tree.remove(entity).map(drop),
            }
            .map_err(tree_error)?;
        }
        let recomputed = tree.flush().map_err(tree_error)?;
        if let Some(last) = last {
            self.log.retain_in(..=last, |_, _| false)?;
            if self.log.is_empty()? {
                self.next_seq = None;
            }
        }
        Ok(recomputed)
    }

    /// Writes one copy by the version order and the shard's purge line: a tombstone below the
    /// line is never stored (docs/protocol.md, "The life of a delete").
    fn apply(&mut self, checked: &Checked) -> Result<ItemOutcome, StoreError> {
        let ours = self.get(&checked.entity)?;
        let had_live = ours
            .as_ref()
            .is_some_and(|property| !property.is_tombstone());
        let outcome = match decide_at_line(
            ours.as_ref(),
            &checked.property,
            &self.shape,
            self.meta.purged_below,
        ) {
            Decision::Store => {
                self.put(checked)?;
                RepairOutcome::Applied
            }
            Decision::RemoveOurs => {
                self.remove(&checked.entity)?;
                RepairOutcome::Applied
            }
            Decision::Keep(outcome) => outcome,
        };
        Ok(ItemOutcome { outcome, had_live })
    }

    /// Replaces the shard's tree (leaves, inner nodes, leaf log) by one built from its
    /// properties. Returns the rebuilt tree.
    pub(super) fn rebuild_tree(&mut self) -> Result<Tree, StoreError> {
        // The build leaves rotten rows out; they are quarantined before the tree is written, so
        // the tree and the rows agree.
        let mut rotten = Vec::new();
        let (tree, _) = build_from_rows(self.shape, &self.props, &self.names, &mut |row| {
            rotten.push(row)
        })?;
        for row in &rotten {
            self.quarantine(row)?;
        }
        self.leaves.retain(|_, _| false)?;
        self.nodes.retain(|_, _| false)?;
        self.log.retain(|_, _| false)?;
        self.next_seq = None;
        for leaf in tree.leaves() {
            self.leaves
                .insert((leaf.bucket, leaf.entity.as_str()), leaf.digest.as_bytes())?;
        }
        for level in 0..=self.shape.bucket_level() {
            for (index, inner) in tree.level(level) {
                self.nodes
                    .insert((level, *index), encode_inner(inner).as_slice())?;
            }
        }
        Ok(tree)
    }

    pub(super) fn finish(self, txn: &WriteTransaction) -> Result<(), StoreError> {
        if self.meta_changed {
            txn.open_table(META)?.insert(
                (self.group.as_str(), self.shard),
                self.meta.encode().as_slice(),
            )?;
        }
        Ok(())
    }
}

/// The writers of every (group, shard) a write transaction touches, each opened once: the writes
/// of a group commit that land in one shard continue its leaf log and revision where the previous
/// one left them.
pub(super) struct ShardWriters<'txn> {
    txn: &'txn WriteTransaction,
    shape: Shape,
    upkeep: TreeUpkeep,
    rot: Arc<RotQueue>,
    open: BTreeMap<(String, u32), ShardWriter<'txn>>,
}

impl<'txn> ShardWriters<'txn> {
    /// The writer of (group, shard), opened on first use.
    pub(super) fn shard(
        &mut self,
        group: &str,
        shard: u32,
    ) -> Result<&mut ShardWriter<'txn>, StoreError> {
        Ok(match self.open.entry((group.to_owned(), shard)) {
            Entry::Occupied(open) => open.into_mut(),
            Entry::Vacant(slot) => slot.insert(ShardWriter::open(
                self.txn,
                group,
                shard,
                self.shape,
                self.upkeep,
                Arc::clone(&self.rot),
            )?),
        })
    }

    /// Applies one write's items in entity order; the outcomes in the items' order.
    fn apply(&mut self, write: &ShardWrite) -> Result<Written, StoreError> {
        let writer = self.shard(&write.group, write.shard)?;
        let mut outcomes = vec![
            ItemOutcome {
                outcome: RepairOutcome::Same,
                had_live: false,
            };
            write.items.len()
        ];
        for index in entity_order(&write.items, |item| &item.entity) {
            outcomes[index] = writer.apply(&write.items[index])?;
        }
        Ok(outcomes)
    }

    /// Writes every shard's bookkeeping; returns the shards whose leaf log reached `threshold`.
    fn finish(self, threshold: u64) -> Result<Vec<(String, u32)>, StoreError> {
        let mut full = Vec::new();
        for (key, writer) in self.open {
            let pending = writer.pending()?;
            writer.finish(self.txn)?;
            if pending >= threshold {
                full.push(key);
            }
        }
        Ok(full)
    }
}

impl RedbStore {
    /// Opens the writer of (group, shard) in a write transaction.
    pub(super) fn shard_writer<'txn>(
        &self,
        txn: &'txn WriteTransaction,
        group: &str,
        shard: u32,
    ) -> Result<ShardWriter<'txn>, StoreError> {
        ShardWriter::open(
            txn,
            group,
            shard,
            self.rules.shape,
            self.upkeep,
            Arc::clone(&self.rot),
        )
    }

    /// Runs `f` on the writers of the shards it touches in one write transaction with the
    /// configured durability, then flushes each shard whose leaf log reached the flush threshold.
    /// The transaction also carries one step of each purge in progress (`purge`), and is synced
    /// when one of them has its line to raise.
    fn write_shards<T>(
        &self,
        f: impl FnOnce(&mut ShardWriters<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let durability = match self.purges.want_sync() {
            true => redb::Durability::Immediate,
            false => self.data_durability(),
        };
        let (value, full, carried) = self.write(durability, |txn| {
            let mut writers = ShardWriters {
                txn,
                shape: self.rules.shape,
                upkeep: self.upkeep,
                rot: Arc::clone(&self.rot),
                open: BTreeMap::new(),
            };
            let value = f(&mut writers)?;
            let carried = self.carry_purges(&mut writers, durability)?;
            Ok((value, writers.finish(self.flush_threshold)?, carried))
        })?;
        if let Some(carried) = carried {
            carried.committed();
        }
        for (group, shard) in full {
            // The write is committed; a failed flush only leaves the log for the next one.
            if let Err(error) = self.flush(&group, shard) {
                tracing::warn!(group, shard, %error, "flush after a write failed");
            }
        }
        Ok(value)
    }

    /// Runs `f` on the writer of (group, shard) in one write transaction of its own, then flushes
    /// the shard's tree if the leaf log reached the flush threshold.
    pub(super) fn write_shard<T>(
        &self,
        group: &str,
        shard: u32,
        f: impl FnOnce(&mut ShardWriter<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_shards(|writers| f(writers.shard(group, shard)?))
    }

    /// Commits `writes` in one transaction: all of them, or (on an error) none.
    fn commit_together(&self, writes: &[ShardWrite]) -> Result<Vec<Written>, StoreError> {
        self.write_shards(|writers| writes.iter().map(|write| writers.apply(write)).collect())
    }

    /// Commits one group of the group commit: in one transaction, or, when that fails, each
    /// write in a transaction of its own, so that a failing write refuses only itself.
    fn commit_group(
        &self,
        group: GroupId,
        writes: &[ShardWrite],
    ) -> Vec<Result<Written, StoreError>> {
        let error = match self.commit_together(writes) {
            Ok(written) => {
                self.synced(group, 0..writes.len());
                return written.into_iter().map(Ok).collect();
            }
            Err(error) if writes.len() == 1 => return vec![Err(error)],
            Err(error) => error,
        };
        tracing::warn!(
            group_size = writes.len(),
            %error,
            "a group commit failed; committing its writes one by one"
        );
        (0..writes.len())
            .map(|member| {
                let alone = member..member + 1;
                let mut written = self.commit_together(&writes[alone.clone()])?;
                self.synced(group, alone);
                Ok(written.swap_remove(0))
            })
            .collect()
    }

    /// Tells the group commit (its test log) that these members of a group are committed.
    fn synced(&self, group: GroupId, members: Range<usize>) {
        if let Some(commits) = &self.commits {
            commits.synced(group, members);
        }
    }

    /// Commits one write: through the group commit when it is on, else in a transaction of its
    /// own.
    fn submit(&self, write: ShardWrite) -> Result<Written, StoreError> {
        match &self.commits {
            Some(commits) => {
                commits.submit(write, &|group, writes| self.commit_group(group, writes))
            }
            None => Ok(self
                .commit_together(std::slice::from_ref(&write))?
                .swap_remove(0)),
        }
    }

    /// Commits a write of one validated property.
    fn submit_one(&self, checked: Checked) -> Result<ItemOutcome, StoreError> {
        Ok(self.submit(ShardWrite::one(checked))?.swap_remove(0))
    }

    /// Creates or updates a live property (`delete_time` 0, `mod_revision` > 0). Like every write
    /// it follows the version order: an older revision than the stored copy's is not stored and
    /// the stored copy is returned as [`RepairOutcome::LocalNewer`]. Durable when it returns.
    pub fn apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Apply, None)?;
        Ok(self.submit_one(checked)?.outcome)
    }

    /// Deletes a property: stores the tombstone that every copy stores (no tags, the caller's
    /// `mod_revision` and `delete_time` > 0), by the version order.
    pub fn delete(
        &self,
        entity: &Entity,
        mod_revision: i64,
        delete_time: i64,
    ) -> Result<DeleteOutcome, StoreError> {
        let checked = self.rules.check(
            tombstone(entity, mod_revision, delete_time),
            WriteKind::Delete,
            None,
        )?;
        let done = self.submit_one(checked)?;
        Ok(DeleteOutcome {
            found: done.had_live,
            outcome: done.outcome,
        })
    }

    /// Applies a copy from another node (a replicated write or read repair): live or tombstone,
    /// by the version order.
    pub fn repair_apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Copy, None)?;
        Ok(self.submit_one(checked)?.outcome)
    }

    /// Applies a batch of copies for one (group, shard) in one write transaction; see
    /// [`crate::RepairStore::repair_apply_batch`] for the rules.
    pub fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        let checked = self.rules.check_batch(group, shard, batch)?;
        if checked.is_empty() {
            return Ok(Vec::new());
        }
        let written = self.submit(ShardWrite {
            group: group.to_owned(),
            shard,
            items: checked,
        })?;
        Ok(written.into_iter().map(|done| done.outcome).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use propd_merkle::{Entity, Property, Shape};

    use super::ShardWrite;
    use crate::config::{GroupDef, Groups, StoreConfig};
    use crate::error::StoreError;
    use crate::repair_view::RepairOutcome;
    use crate::store::RedbStore;
    use crate::tables::META;
    use crate::validate::WriteKind;

    fn synced_store(dir: &std::path::Path) -> RedbStore {
        let groups = Groups::new([GroupDef::new("g", 4, 0)]).unwrap_or_else(|e| panic!("{e}"));
        let config = StoreConfig::new(dir, groups, Shape::default());
        RedbStore::open(config).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn property(id: &str, revision: i64) -> Property {
        Property {
            group: "g".to_owned(),
            name: "n".to_owned(),
            id: id.to_owned(),
            tags: Default::default(),
            mod_revision: revision,
            delete_time: 0,
        }
    }

    fn entity(id: &str) -> Entity {
        Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn no_write_is_acknowledged_before_its_group_is_synced() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = Arc::new(synced_store(dir.path()));
        let log = store
            .commits
            .as_ref()
            .unwrap_or_else(|| panic!("group commit is on by default"))
            .observe();
        const THREADS: usize = 16;
        const WRITES: usize = 15;
        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for k in 0..WRITES {
                        // Each acknowledgement checks in the log that its group was synced
                        // first (`CommitLog::acknowledge` panics otherwise).
                        let outcome = store
                            .apply(property(&format!("{thread}-{k}"), 1))
                            .unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(outcome, RepairOutcome::Applied);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap_or_else(|_| panic!("a writer failed"));
        }
        assert_eq!(log.acknowledged(), THREADS * WRITES, "every write checked");
        assert!(
            log.largest() > 1,
            "some writes shared a commit, so the check covered groups"
        );
        for thread in 0..THREADS {
            for k in 0..WRITES {
                let id = format!("{thread}-{k}");
                assert_eq!(
                    store.get(&entity(&id)).unwrap_or_else(|e| panic!("{e}")),
                    Some(property(&id, 1))
                );
            }
        }
    }

    #[test]
    fn a_write_that_fails_in_a_shared_commit_refuses_only_itself() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = synced_store(dir.path());
        let log = store
            .commits
            .as_ref()
            .unwrap_or_else(|| panic!("group commit is on by default"))
            .observe();
        // A shard whose bookkeeping cannot be decoded: a write to it fails when it opens the
        // shard. (A rotten property row would not do: it is quarantined and reads as absent.)
        let broken = entity("broken");
        let shard_of = |id: &str| {
            store
                .rules
                .shard_of(&entity(id))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let broken_shard = shard_of("broken");
        let txn = store
            .database()
            .and_then(|db| Ok(db.begin_write()?))
            .unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(META)
            .unwrap_or_else(|e| panic!("{e}"))
            .insert(("g", broken_shard), [0xff_u8].as_slice())
            .unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        // Two writes to other shards.
        let ok: Vec<String> = (0..)
            .map(|k| format!("ok-{k}"))
            .filter(|id| shard_of(id) != broken_shard)
            .take(2)
            .collect();

        let write = |id: &str| {
            let checked = store
                .rules
                .check(property(id, 5), WriteKind::Apply, None)
                .unwrap_or_else(|e| panic!("{e}"));
            ShardWrite::one(checked)
        };
        let results = store.commit_group(7, &[write(&ok[0]), write(broken.id()), write(&ok[1])]);
        assert!(
            matches!(results[1], Err(StoreError::Corrupt { .. })),
            "{:?}",
            results[1]
        );
        for (index, id) in [(0, ok[0].as_str()), (2, ok[1].as_str())] {
            let done = results[index]
                .as_ref()
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(done[0].outcome, RepairOutcome::Applied);
            assert_eq!(
                store.get(&entity(id)).unwrap_or_else(|e| panic!("{e}")),
                Some(property(id, 5))
            );
            log.acknowledge(7, index);
        }
        let unsynced = std::panic::AssertUnwindSafe(|| log.acknowledge(7, 1));
        assert!(
            std::panic::catch_unwind(unsynced).is_err(),
            "the failed write was never reported synced"
        );
    }
}
