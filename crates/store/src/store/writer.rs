//! The write path: a property write, delete or batch of copies, validated, applied to one
//! (group, shard) by the version order, its leaf change appended to the shard's leaf log and the
//! revision bumped, all in one write transaction ([`ShardWriter`]); and a flush after the commit
//! when the log has grown past the threshold.

use std::collections::BTreeSet;
use std::sync::Arc;

use propd_merkle::{Digest, Entity, LiveTree, Property, Shape, Tree};
use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};

use crate::codec::{ShardMeta, encode_inner, encode_log};
use crate::config::{ReadCheck, TreeUpkeep};
use crate::error::{ConfigError, StoreError, tree_error};
use crate::repair_view::{RepairOutcome, decide, entity_order};
use crate::store::RedbStore;
use crate::store::quarantine::RotQueue;
use crate::store::rows::{RowRead, build_from_rows, read_log, read_meta, read_row};
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
            dirty: BTreeSet::new(),
            leaves_name: &self.names.leaves,
            nodes_name: &self.names.nodes,
        };
        LiveTree::new(self.shape, storage).map_err(|error| ConfigError::Shape(error).into())
    }

    /// The stored copy of `entity`; a rotten copy is quarantined in this transaction and reads
    /// as absent.
    fn get(&mut self, entity: &Entity) -> Result<Option<Property>, StoreError> {
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
    fn pending(&self) -> Result<u64, StoreError> {
        Ok(self.log.len()?)
    }

    /// Applies the leaf log to the leaf table in (bucket, entity) order, recomputes every dirty
    /// node and empties the log. Returns the number of inner nodes recomputed.
    pub(super) fn flush_tree(&mut self) -> Result<usize, StoreError> {
        let changes = read_log(&self.log, &self.names.log)?;
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
        if !sorted.is_empty() {
            self.log.retain(|_, _| false)?;
            self.next_seq = None;
        }
        Ok(recomputed)
    }

    fn apply(&mut self, checked: &Checked) -> Result<RepairOutcome, StoreError> {
        let ours = self.get(&checked.entity)?;
        let outcome = decide(ours.as_ref(), &checked.property, &self.shape);
        if outcome == RepairOutcome::Applied {
            self.put(checked)?;
        }
        Ok(outcome)
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

    /// Runs `f` on the writer of (group, shard) in one write transaction with the configured
    /// durability, then flushes the shard's tree if the leaf log reached the flush threshold.
    pub(super) fn write_shard<T>(
        &self,
        group: &str,
        shard: u32,
        f: impl FnOnce(&mut ShardWriter<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (value, pending) = self.write(self.data_durability(), |txn| {
            let mut writer = self.shard_writer(txn, group, shard)?;
            let value = f(&mut writer)?;
            let pending = writer.pending()?;
            writer.finish(txn)?;
            Ok((value, pending))
        })?;
        if pending >= self.flush_threshold {
            // The write is committed; a failed flush only leaves the log for the next one.
            if let Err(error) = self.flush(group, shard) {
                tracing::warn!(group, shard, %error, "flush after a write failed");
            }
        }
        Ok(value)
    }

    fn write_one(&self, checked: Checked) -> Result<RepairOutcome, StoreError> {
        let group = checked.entity.group().to_owned();
        self.write_shard(&group, checked.shard, |writer| writer.apply(&checked))
    }

    /// Creates or updates a live property (`delete_time` 0, `mod_revision` > 0). Like every write
    /// it follows the version order: an older revision than the stored copy's is not stored and
    /// the stored copy is returned as [`RepairOutcome::LocalNewer`]. Durable when it returns.
    pub fn apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Apply, None)?;
        self.write_one(checked)
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
        let group = entity.group().to_owned();
        self.write_shard(&group, checked.shard, |writer| {
            let found = writer
                .get(&checked.entity)?
                .is_some_and(|property| !property.is_tombstone());
            let outcome = writer.apply(&checked)?;
            Ok(DeleteOutcome { found, outcome })
        })
    }

    /// Applies a copy from another node (a replicated write or read repair): live or tombstone,
    /// by the version order.
    pub fn repair_apply(&self, property: Property) -> Result<RepairOutcome, StoreError> {
        let checked = self.rules.check(property, WriteKind::Copy, None)?;
        self.write_one(checked)
    }

    /// Applies a batch of copies for one (group, shard) in one write transaction; see
    /// [`crate::RepairStore::repair_apply_batch`] for the rules.
    pub fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let checked = self.rules.check_batch(group, shard, batch)?;
        if checked.is_empty() {
            return Ok(Vec::new());
        }
        let order = entity_order(&checked, |item| &item.entity);
        self.write_shard(group, shard, |writer| {
            let mut outcomes = vec![RepairOutcome::Same; checked.len()];
            for index in order {
                outcomes[index] = writer.apply(&checked[index])?;
            }
            Ok(outcomes)
        })
    }
}
