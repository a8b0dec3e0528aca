//! `RedbStore`: the node's properties on redb, with the live Merkle tree of every (group, shard)
//! kept in the same write transactions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use propd_merkle::{
    Algorithm, BuildError, Entity, InnerNode, Leaf, LiveError, LiveTree, NodeId, Property, Shape,
    Tree, TreeBuilder, snapshot,
};
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, Table, TableDefinition, TableError, WriteTransaction,
};

use crate::codec::{ShardMeta, decode_property};
use crate::config::{Groups, StoreConfig, TreeUpkeep, WriteDurability};
use crate::error::{ConfigError, StoreError, ValidationError};
use crate::repair_view::{LeafKey, RepairOutcome, RepairStore, decide, entity_order};
use crate::tables::{CONFIG, CONFIG_SHAPE, META, ShardTableNames, config_group_key};
use crate::tree_store::{SnapshotTree, TxnTree};
use crate::validate::{Checked, Rules, WriteKind};

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// Whether a live copy was stored before the delete.
    pub found: bool,
    /// What storing the tombstone did by the version order.
    pub outcome: RepairOutcome,
}

/// What a tombstone purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Tombstones removed.
    pub purged: u64,
    /// Tombstones with `delete_time` below this were eligible; `None` when the shard never had a
    /// complete repair, so nothing was eligible.
    pub cutoff: Option<i64>,
}

/// The result of [`RedbStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The shard did not change since the last verification; nothing was read.
    Skipped {
        /// The shard's revision.
        revision: u64,
    },
    /// The live tree equals the tree rebuilt from the properties.
    Consistent {
        /// The revision verified.
        revision: u64,
        /// Leaves in the tree.
        leaf_count: u64,
    },
    /// The live tree differed from the rebuilt one; it was replaced by a rebuild.
    Healed {
        /// The revision of the snapshot that showed the mismatch.
        revision: u64,
        /// Entities whose leaves were missing, extra or different in the live tree (0 when only
        /// inner nodes were wrong).
        differing_leaves: usize,
        /// The live root before healing.
        live_root: InnerNode,
        /// The rebuilt root.
        rebuilt_root: InnerNode,
    },
}

/// A shard's tree as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeView {
    /// The tree shape.
    pub shape: Shape,
    /// The shard's revision the view was read at.
    pub revision: u64,
    /// The root digest and leaf count.
    pub root: InnerNode,
    /// The non-empty slots (level-1 nodes), by index.
    pub slots: Vec<(NodeId, InnerNode)>,
}

/// A query over one group of this node's store (DESIGN §8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The group (required).
    pub group: String,
    /// Only this name; `None` matches every name.
    pub name: Option<String>,
    /// Only these ids; empty matches every id.
    pub ids: Vec<String>,
    /// Tag equality filters; all must match.
    pub tags: Vec<(String, propd_merkle::TagValue)>,
    /// At most this many results.
    pub limit: usize,
    /// Whether tombstones are returned.
    pub include_deleted: bool,
}

impl Query {
    /// Every live property of a group, without limit.
    pub fn group(group: impl Into<String>) -> Self {
        Query {
            group: group.into(),
            name: None,
            ids: Vec::new(),
            tags: Vec::new(),
            limit: usize::MAX,
            include_deleted: false,
        }
    }

    fn matches(&self, property: &Property) -> bool {
        (self.include_deleted || !property.is_tombstone())
            && self.name.as_ref().is_none_or(|name| *name == property.name)
            && (self.ids.is_empty() || self.ids.contains(&property.id))
            && self
                .tags
                .iter()
                .all(|(key, value)| property.tags.get(key) == Some(value))
    }
}

/// The node's property store on redb: one database file in the data directory, four tables per
/// (group, shard) (docs/formats.md). `Send + Sync`: share it behind an `Arc`; redb serializes
/// writers and readers never block.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    rules: Arc<Rules>,
    upkeep: TreeUpkeep,
    durability: WriteDurability,
    flush_threshold: u64,
    path: PathBuf,
}

/// Converts a live-tree error: storage errors are the store's own, the rest mean the stored tree
/// disagrees with the shape.
pub(crate) fn tree_error<E: std::error::Error + Into<StoreError> + 'static>(
    error: LiveError<E>,
) -> StoreError {
    match error {
        LiveError::Storage(error) => error.into(),
        other => StoreError::Tree {
            detail: other.to_string(),
        },
    }
}

impl From<std::convert::Infallible> for StoreError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
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

/// The purge cutoff: tombstones with `delete_time` below it may go. `None` when the shard never
/// had a complete repair.
pub(crate) fn purge_cutoff(now: i64, grace: Duration, last_complete_repair: i64) -> Option<i64> {
    if last_complete_repair <= 0 {
        return None;
    }
    let grace = i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX);
    Some(now.saturating_sub(grace).min(last_complete_repair))
}

fn encode_shape(shape: &Shape) -> Vec<u8> {
    let mut out = vec![shape.algorithm.code()];
    for field in [
        shape.slot_count,
        shape.fanout,
        shape.depth,
        shape.digest_width,
        shape.format_version,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out
}

fn decode_shape(bytes: &[u8]) -> Option<Shape> {
    let (&code, rest) = bytes.split_first()?;
    if rest.len() != 20 {
        return None;
    }
    let field = |at: usize| {
        let mut word = [0; 4];
        word.copy_from_slice(&rest[at * 4..at * 4 + 4]);
        u32::from_le_bytes(word)
    };
    Some(Shape {
        algorithm: Algorithm::from_code(code)?,
        slot_count: field(0),
        fanout: field(1),
        depth: field(2),
        digest_width: field(3),
        format_version: field(4),
    })
}

fn describe_shape(shape: &Shape) -> String {
    format!(
        "{:?} slots={} fanout={} depth={} digest_width={} format_version={}",
        shape.algorithm,
        shape.slot_count,
        shape.fanout,
        shape.depth,
        shape.digest_width,
        shape.format_version
    )
}

/// Opens a table of a read transaction; a table that was never written reads as `None`.
fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    definition: TableDefinition<'_, K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn read_meta(
    table: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    group: &str,
    shard: u32,
) -> Result<ShardMeta, StoreError> {
    match table.get((group, shard))? {
        Some(guard) => ShardMeta::decode(guard.value()).map_err(|error| StoreError::Corrupt {
            table: "meta".to_owned(),
            detail: format!("{group}/{shard}: {}", error.0),
        }),
        None => Ok(ShardMeta::default()),
    }
}

fn read_meta_snapshot(
    txn: &ReadTransaction,
    group: &str,
    shard: u32,
) -> Result<ShardMeta, StoreError> {
    match open_read(txn, META)? {
        Some(table) => read_meta(&table, group, shard),
        None => Ok(ShardMeta::default()),
    }
}

fn decode_row(table: &str, key: &str, value: &[u8]) -> Result<Property, StoreError> {
    let entity = Entity::parse(key).map_err(|error| StoreError::Corrupt {
        table: table.to_owned(),
        detail: format!("key {key:?}: {error}"),
    })?;
    decode_property(&entity, value).map_err(|error| StoreError::Corrupt {
        table: table.to_owned(),
        detail: error.0,
    })
}

/// Entities whose leaves are missing, extra or different between two leaf lists in (bucket,
/// entity) order. Compared leaf by leaf, not by descending the inner nodes: a corrupt tree's inner
/// nodes may hide a difference below them.
fn differing_leaves(left: &[Leaf], right: &[Leaf]) -> usize {
    let (mut i, mut j, mut count) = (0, 0, 0);
    while i < left.len() && j < right.len() {
        let (a, b) = (&left[i], &right[j]);
        match (a.bucket, &a.entity).cmp(&(b.bucket, &b.entity)) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                count += usize::from(a.digest != b.digest);
                i += 1;
                j += 1;
                continue;
            }
        }
        count += 1;
    }
    count + (left.len() - i) + (right.len() - j)
}

/// The net leaf changes of a shard's leaf log: the last entry per entity wins.
fn read_log(
    log: &impl ReadableTable<u64, &'static [u8]>,
    table: &str,
) -> Result<BTreeMap<Entity, Option<propd_merkle::Digest>>, StoreError> {
    let mut changes = BTreeMap::new();
    for row in log.iter()? {
        let (_, value) = row?;
        let entry =
            crate::codec::decode_log(value.value()).map_err(|error| StoreError::Corrupt {
                table: table.to_owned(),
                detail: error.0,
            })?;
        changes.insert(entry.entity, entry.digest);
    }
    Ok(changes)
}

/// Builds a shard's tree from its property rows. A row's value is the property's canonical bytes,
/// so its leaf digest is the hash of the stored value: no decoding.
fn build_from_rows(
    shape: Shape,
    props: &impl ReadableTable<&'static str, &'static [u8]>,
    table: &str,
) -> Result<Tree, StoreError> {
    let tree_error = |detail: String| StoreError::Tree { detail };
    let mut builder = TreeBuilder::with_capacity(shape, props.len()? as usize)
        .map_err(|error| ConfigError::Shape(error.to_string()))?;
    for row in props.iter()? {
        let (key, value) = row?;
        // The key is checked as `Entity::parse` checks it, but no `Entity` is made per row: the
        // builder allocates each entity once, in tree order.
        builder
            .push_str(key.value(), shape.digest(value.value()))
            .map_err(|error| match error {
                BuildError::Entity(error) => StoreError::Corrupt {
                    table: table.to_owned(),
                    detail: format!("key {:?}: {error}", key.value()),
                },
                error => tree_error(error.to_string()),
            })?;
    }
    builder
        .finish()
        .map_err(|error| tree_error(error.to_string()))
}

/// The tables of one (group, shard) opened in a write transaction, and its bookkeeping.
struct ShardWriter<'txn> {
    names: ShardTableNames,
    group: String,
    shard: u32,
    props: Table<'txn, &'static str, &'static [u8]>,
    leaves: Table<'txn, (u64, &'static str), &'static [u8]>,
    nodes: Table<'txn, (u32, u64), &'static [u8]>,
    log: Table<'txn, u64, &'static [u8]>,
    next_seq: Option<u64>,
    meta: ShardMeta,
    meta_changed: bool,
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
    ) -> Result<Self, StoreError> {
        let names = ShardTableNames::new(group, shard);
        let meta = read_meta(&txn.open_table(META)?, group, shard)?;
        Ok(ShardWriter {
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
        LiveTree::new(self.shape, storage)
            .map_err(|error| ConfigError::Shape(error.to_string()).into())
    }

    fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        match self.props.get(entity.as_str())? {
            Some(guard) => Ok(Some(decode_row(
                &self.names.props,
                entity.as_str(),
                guard.value(),
            )?)),
            None => Ok(None),
        }
    }

    fn bump(&mut self) {
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

    fn remove(&mut self, entity: &Entity) -> Result<(), StoreError> {
        self.props.remove(entity.as_str())?;
        self.log_leaf(entity, None)?;
        self.bump();
        Ok(())
    }

    /// Records a leaf change in the shard's leaf log, in the property's own transaction. The log
    /// is keyed by a sequence number, so this is an append: the random-order leaf table is
    /// written at the next flush, sorted, many changes at once.
    fn log_leaf(
        &mut self,
        entity: &Entity,
        digest: Option<&propd_merkle::Digest>,
    ) -> Result<(), StoreError> {
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
            .insert(seq, crate::codec::encode_log(entity, digest).as_slice())?;
        self.next_seq = Some(seq + 1);
        Ok(())
    }

    /// Leaf changes waiting in the log.
    fn pending(&self) -> Result<u64, StoreError> {
        Ok(self.log.len()?)
    }

    /// Applies the leaf log to the leaf table in (bucket, entity) order, recomputes every dirty
    /// node and empties the log. Returns the number of inner nodes recomputed.
    fn flush_tree(&mut self) -> Result<usize, StoreError> {
        let changes = read_log(&self.log, &self.names.log)?;
        let mut sorted: Vec<(u64, Entity, Option<propd_merkle::Digest>)> = changes
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
    fn rebuild_tree(&mut self) -> Result<Tree, StoreError> {
        let tree = build_from_rows(self.shape, &self.props, &self.names.props)?;
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
                self.nodes.insert(
                    (level, *index),
                    crate::codec::encode_inner(inner).as_slice(),
                )?;
            }
        }
        Ok(tree)
    }

    fn finish(self, txn: &WriteTransaction) -> Result<(), StoreError> {
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
    /// Opens (or creates) the store in `config.data_dir`.
    ///
    /// The first open records the tree shape and each group's `shard_num`; a later open with
    /// another shape, or another `shard_num` for a recorded group, is refused
    /// ([`ConfigError::ShapeChanged`], [`ConfigError::ShardNumChanged`]). New groups may be added.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        config
            .shape
            .validate()
            .map_err(|error| ConfigError::Shape(error.to_string()))?;
        let groups = Groups::new(config.groups.iter().cloned())?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StoreError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.database_path();
        let mut builder = Database::builder();
        if let Some(bytes) = config.cache_bytes {
            builder.set_cache_size(bytes);
        }
        let db = builder.create(&path)?;
        let store = RedbStore {
            db,
            rules: Arc::new(Rules {
                groups,
                shape: config.shape,
                max_property_bytes: config.max_property_bytes,
            }),
            upkeep: config.tree_upkeep,
            durability: config.durability,
            flush_threshold: config.flush_threshold,
            path,
        };
        store.check_recorded_config()?;
        tracing::debug!(path = %store.path.display(), "store opened");
        Ok(store)
    }

    fn check_recorded_config(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(CONFIG)?;
            let stored = table.get(CONFIG_SHAPE)?.map(|guard| guard.value().to_vec());
            match stored {
                Some(bytes) => {
                    let given = describe_shape(&self.rules.shape);
                    match decode_shape(&bytes) {
                        Some(stored) if stored == self.rules.shape => {}
                        Some(stored) => {
                            return Err(ConfigError::ShapeChanged {
                                stored: describe_shape(&stored),
                                given,
                            }
                            .into());
                        }
                        None => {
                            return Err(StoreError::Corrupt {
                                table: "config".to_owned(),
                                detail: format!(
                                    "stored shape of {} bytes is unreadable",
                                    bytes.len()
                                ),
                            });
                        }
                    }
                }
                None => {
                    table.insert(CONFIG_SHAPE, encode_shape(&self.rules.shape).as_slice())?;
                }
            }
            for def in self.rules.groups.iter() {
                let key = config_group_key(&def.name);
                let stored = table.get(key.as_str())?.map(|guard| guard.value().to_vec());
                match stored {
                    Some(bytes) => {
                        let stored = <[u8; 4]>::try_from(bytes.as_slice())
                            .map(u32::from_le_bytes)
                            .map_err(|_| StoreError::Corrupt {
                                table: "config".to_owned(),
                                detail: format!("shard_num of group {:?}", def.name),
                            })?;
                        if stored != def.shard_num {
                            return Err(ConfigError::ShardNumChanged {
                                group: def.name.clone(),
                                stored,
                                given: def.shard_num,
                            }
                            .into());
                        }
                    }
                    None => {
                        table.insert(key.as_str(), def.shard_num.to_le_bytes().as_slice())?;
                    }
                }
            }
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree shape of every shard.
    pub fn shape(&self) -> Shape {
        self.rules.shape
    }

    /// The group definitions.
    pub fn groups(&self) -> &Groups {
        &self.rules.groups
    }

    /// Runs `f` in a write transaction and commits it with the configured durability; on an
    /// error the transaction is aborted and nothing changes.
    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability)?;
        match f(&txn) {
            Ok(value) => {
                txn.commit()?;
                Ok(value)
            }
            Err(error) => {
                txn.abort()?;
                Err(error)
            }
        }
    }

    fn data_durability(&self) -> Durability {
        match self.durability {
            WriteDurability::Immediate => Durability::Immediate,
            WriteDurability::NotSynced => Durability::None,
        }
    }

    fn write_shard<T>(
        &self,
        group: &str,
        shard: u32,
        f: impl FnOnce(&mut ShardWriter<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let (value, pending) = self.write(self.data_durability(), |txn| {
            let mut writer = ShardWriter::open(txn, group, shard, self.rules.shape, self.upkeep)?;
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
    /// [`RepairStore::repair_apply_batch`] for the rules.
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

    /// A consistent read view of the whole store as of now; writes continue meanwhile.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot {
            txn: self.db.begin_read()?,
            rules: Arc::clone(&self.rules),
        })
    }

    /// The stored copy of an entity (tombstones included), `None` if absent.
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        self.snapshot()?.get(entity)
    }

    /// Properties of one group matching a query, in entity order, at most `query.limit`.
    pub fn query(&self, query: &Query) -> Result<Vec<Property>, StoreError> {
        self.snapshot()?.query(query)
    }

    /// The shard's revision: it increases with every change (its snapshot id).
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.snapshot()?.revision(group, shard)
    }

    /// Applies the shard's leaf log to its leaf table and recomputes the inner nodes above the
    /// changed leaves, in one write transaction. A no-op for a clean tree. Returns the number of
    /// inner nodes recomputed.
    pub fn flush(&self, group: &str, shard: u32) -> Result<usize, StoreError> {
        self.rules.check_shard(group, shard)?;
        if !self.snapshot()?.has_pending(group, shard)? {
            return Ok(0);
        }
        // Flushed digests are derived data: after a crash the leaf log of the last durable
        // commit come back and are recomputed, so the flush need not wait for the disk.
        self.write(Durability::None, |txn| {
            let mut writer = ShardWriter::open(txn, group, shard, self.rules.shape, self.upkeep)?;
            writer.flush_tree()
        })
    }

    /// A snapshot in which the shard's leaf log is empty or short: flushes first when the current
    /// state has pending leaf changes. (Changes that race in are applied in memory by the
    /// snapshot's own tree reads.)
    fn fresh_snapshot(&self, group: &str, shard: u32) -> Result<Snapshot, StoreError> {
        self.rules.check_shard(group, shard)?;
        let snapshot = self.snapshot()?;
        if snapshot.has_pending(group, shard)? {
            drop(snapshot);
            self.flush(group, shard)?;
            return self.snapshot();
        }
        Ok(snapshot)
    }

    /// The shard's tree for the admin view: root, revision and the non-empty slots.
    pub fn tree_view(&self, group: &str, shard: u32) -> Result<TreeView, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        let tree = snapshot.live_tree(group, shard)?;
        Ok(TreeView {
            shape: self.rules.shape,
            revision: snapshot.revision(group, shard)?,
            root: tree.root().map_err(tree_error)?,
            slots: tree.children(NodeId::ROOT).map_err(tree_error)?,
        })
    }

    /// The shard's whole live tree, fresh.
    pub fn tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.fresh_snapshot(group, shard)?.tree(group, shard)
    }

    /// The shard's live tree in the merkle snapshot file format.
    pub fn export_tree(&self, group: &str, shard: u32) -> Result<Vec<u8>, StoreError> {
        Ok(snapshot::encode(&self.tree(group, shard)?))
    }

    /// Verifies the shard's live tree against a tree rebuilt from a snapshot scan of its
    /// properties; heals a mismatch by replacing the live tree with a rebuild (in one write
    /// transaction, so readers see the old or the new tree, never a mix). Skipped when the
    /// shard's revision has not changed since the last verification that passed or healed.
    pub fn verify(&self, group: &str, shard: u32) -> Result<VerifyOutcome, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        let meta = read_meta_snapshot(&snapshot.txn, group, shard)?;
        if meta.revision == meta.verified_revision {
            return Ok(VerifyOutcome::Skipped {
                revision: meta.revision,
            });
        }
        let rebuilt = snapshot.rebuild_tree(group, shard)?;
        let live = snapshot.tree(group, shard)?;
        drop(snapshot);
        if live == rebuilt {
            self.write(Durability::None, |txn| {
                let mut table = txn.open_table(META)?;
                let mut current = read_meta(&table, group, shard)?;
                current.verified_revision = current.verified_revision.max(meta.revision);
                table.insert((group, shard), current.encode().as_slice())?;
                Ok(())
            })?;
            return Ok(VerifyOutcome::Consistent {
                revision: meta.revision,
                leaf_count: rebuilt.leaf_count(),
            });
        }
        let differing_leaves = differing_leaves(live.leaves(), rebuilt.leaves());
        tracing::warn!(
            group,
            shard,
            revision = meta.revision,
            differing_leaves,
            live_root = %live.root().digest,
            rebuilt_root = %rebuilt.root().digest,
            "live tree differs from a rebuild; healing"
        );
        self.write(self.data_durability(), |txn| {
            let mut writer = ShardWriter::open(txn, group, shard, self.rules.shape, self.upkeep)?;
            writer.rebuild_tree()?;
            writer.meta.verified_revision = writer.meta.revision;
            writer.meta_changed = true;
            writer.finish(txn)
        })?;
        Ok(VerifyOutcome::Healed {
            revision: meta.revision,
            differing_leaves,
            live_root: live.root(),
            rebuilt_root: rebuilt.root(),
        })
    }

    /// Records when the last repair round that reached every copy of the shard started (unix
    /// nanoseconds). Durable; an earlier time than the stored one is ignored.
    pub fn set_last_complete_repair(
        &self,
        group: &str,
        shard: u32,
        time: i64,
    ) -> Result<(), StoreError> {
        self.rules.check_shard(group, shard)?;
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(META)?;
            let mut meta = read_meta(&table, group, shard)?;
            meta.last_complete_repair = meta.last_complete_repair.max(time);
            table.insert((group, shard), meta.encode().as_slice())?;
            Ok(())
        })
    }

    /// The last complete repair time of the shard, `None` if never set.
    pub fn last_complete_repair(&self, group: &str, shard: u32) -> Result<Option<i64>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let meta = read_meta_snapshot(&self.snapshot()?.txn, group, shard)?;
        Ok((meta.last_complete_repair > 0).then_some(meta.last_complete_repair))
    }

    /// Removes the shard's tombstones whose `delete_time` is older than both `now - grace` and
    /// the shard's last complete repair (DESIGN §3); nothing else is ever removed. Without a
    /// recorded complete repair nothing is purged.
    pub fn purge_tombstones(
        &self,
        group: &str,
        shard: u32,
        now: i64,
        grace: Duration,
    ) -> Result<PurgeReport, StoreError> {
        self.rules.check_shard(group, shard)?;
        let meta = read_meta_snapshot(&self.snapshot()?.txn, group, shard)?;
        if purge_cutoff(now, grace, meta.last_complete_repair).is_none() {
            return Ok(PurgeReport::default());
        }
        let report = self.write_shard(group, shard, |writer| {
            // Read the cutoff again inside the transaction: it is the one that counts.
            let Some(cutoff) = purge_cutoff(now, grace, writer.meta.last_complete_repair) else {
                return Ok(PurgeReport::default());
            };
            let mut doomed = Vec::new();
            for row in writer.props.iter()? {
                let (key, value) = row?;
                let property = decode_row(&writer.names.props, key.value(), value.value())?;
                if property.is_tombstone() && property.delete_time < cutoff {
                    doomed.push(Entity::parse(key.value()).map_err(|error| {
                        StoreError::Corrupt {
                            table: writer.names.props.clone(),
                            detail: error.to_string(),
                        }
                    })?);
                }
            }
            for entity in &doomed {
                writer.remove(entity)?;
            }
            Ok(PurgeReport {
                purged: doomed.len() as u64,
                cutoff: Some(cutoff),
            })
        })?;
        if report.purged > 0 {
            tracing::info!(group, shard, purged = report.purged, "tombstones purged");
        }
        Ok(report)
    }
}

impl RepairStore for RedbStore {
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
        let snapshot = self.fresh_snapshot(group, shard)?;
        let inner = snapshot
            .live_tree(group, shard)?
            .node(node)
            .map_err(tree_error)?;
        Ok((!inner.is_empty()).then_some(inner))
    }

    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        snapshot
            .live_tree(group, shard)?
            .children(node)
            .map_err(tree_error)
    }

    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        // Flushing first keeps the common case a plain range read of the leaf table.
        self.fresh_snapshot(group, shard)?
            .leaves_under(group, shard, node, after, limit)
    }

    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, StoreError> {
        for entity in entities {
            self.rules.check_member(entity, group, shard)?;
        }
        let snapshot = self.snapshot()?;
        let names = ShardTableNames::new(group, shard);
        let Some(table) = open_read(&snapshot.txn, names.props())? else {
            return Ok(vec![None; entities.len()]);
        };
        entities
            .iter()
            .map(|entity| match table.get(entity.as_str())? {
                Some(guard) => Ok(Some(decode_row(
                    &names.props,
                    entity.as_str(),
                    guard.value(),
                )?)),
                None => Ok(None),
            })
            .collect()
    }

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, StoreError> {
        RedbStore::repair_apply_batch(self, group, shard, batch)
    }
}

/// A consistent read view of the store (a redb read transaction): scans, lookups and trees all see
/// the same state while writes continue.
pub struct Snapshot {
    txn: ReadTransaction,
    rules: Arc<Rules>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

impl Snapshot {
    /// The shard's revision in this snapshot.
    pub fn revision(&self, group: &str, shard: u32) -> Result<u64, StoreError> {
        self.rules.check_shard(group, shard)?;
        Ok(read_meta_snapshot(&self.txn, group, shard)?.revision)
    }

    /// The stored copy of an entity (tombstones included).
    pub fn get(&self, entity: &Entity) -> Result<Option<Property>, StoreError> {
        let shard = self.rules.shard_of(entity)?;
        let names = ShardTableNames::new(entity.group(), shard);
        let Some(table) = open_read(&self.txn, names.props())? else {
            return Ok(None);
        };
        match table.get(entity.as_str())? {
            Some(guard) => Ok(Some(decode_row(
                &names.props,
                entity.as_str(),
                guard.value(),
            )?)),
            None => Ok(None),
        }
    }

    /// Every property of the shard (tombstones included) in entity order.
    pub fn scan(&self, group: &str, shard: u32) -> Result<ShardScan, StoreError> {
        self.scan_after(group, shard, None)
    }

    /// The shard's properties in entity order, starting strictly after `after` (for paging).
    pub fn scan_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
    ) -> Result<ShardScan, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        let rows = match open_read(&self.txn, names.props())? {
            Some(table) => Some(match after {
                Some(after) => table.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                ))?,
                None => table.range::<&str>(..)?,
            }),
            None => None,
        };
        Ok(ShardScan {
            rows,
            table: names.props,
        })
    }

    /// Properties of one group matching a query, in entity order, at most `query.limit`.
    pub fn query(&self, query: &Query) -> Result<Vec<Property>, StoreError> {
        let def = self.rules.group(&query.group)?.clone();
        if let Some(name) = &query.name {
            // Checks the name the way an entity would (non-empty, no `/`).
            Entity::new(&query.group, name, "id").map_err(ValidationError::from)?;
        }
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let mut found: Vec<Property> = Vec::new();
        if let (Some(name), false) = (&query.name, query.ids.is_empty()) {
            // Direct lookups: every (name, id) pair names one entity.
            for id in &query.ids {
                let entity = Entity::new(&query.group, name, id).map_err(ValidationError::from)?;
                if let Some(property) = self.get(&entity)?
                    && query.matches(&property)
                {
                    found.push(property);
                }
            }
        } else {
            let prefix = query
                .name
                .as_ref()
                .map(|name| format!("{}/{name}/", query.group));
            for shard in 0..def.shard_num {
                let names = ShardTableNames::new(&query.group, shard);
                let Some(table) = open_read(&self.txn, names.props())? else {
                    continue;
                };
                let rows = match &prefix {
                    Some(prefix) => table.range::<&str>(prefix.as_str()..)?,
                    None => table.range::<&str>(..)?,
                };
                // Each shard yields entity order, so its first `limit` matches are enough.
                let mut taken = 0;
                for row in rows {
                    let (key, value) = row?;
                    if prefix
                        .as_ref()
                        .is_some_and(|prefix| !key.value().starts_with(prefix.as_str()))
                    {
                        break;
                    }
                    let property = decode_row(&names.props, key.value(), value.value())?;
                    if query.matches(&property) {
                        found.push(property);
                        taken += 1;
                        if taken >= query.limit {
                            break;
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| {
            (a.name.as_str(), a.id.as_str()).cmp(&(b.name.as_str(), b.id.as_str()))
        });
        found.dedup_by(|a, b| a.name == b.name && a.id == b.id);
        found.truncate(query.limit);
        Ok(found)
    }

    /// Whether the shard's tree has leaf changes waiting for a flush.
    fn has_pending(&self, group: &str, shard: u32) -> Result<bool, StoreError> {
        self.has_log(&ShardTableNames::new(group, shard))
    }

    fn has_log(&self, names: &ShardTableNames) -> Result<bool, StoreError> {
        match open_read(&self.txn, names.log())? {
            Some(table) => Ok(!table.is_empty()?),
            None => Ok(false),
        }
    }

    /// The shard's live tree in this snapshot, its leaf log applied and the nodes above the
    /// changes recomputed in memory.
    fn live_tree(&self, group: &str, shard: u32) -> Result<LiveTree<SnapshotTree>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        let storage = SnapshotTree {
            leaves: open_read(&self.txn, names.leaves())?,
            nodes: open_read(&self.txn, names.nodes())?,
            leaves_name: names.leaves.clone(),
            nodes_name: names.nodes.clone(),
            leaf_overlay: Default::default(),
            inner_overlay: Default::default(),
            dirty_marked: Default::default(),
        };
        let mut tree = LiveTree::new(self.rules.shape, storage)
            .map_err(|error| ConfigError::Shape(error.to_string()))?;
        if let Some(log) = open_read(&self.txn, names.log())? {
            for (entity, digest) in read_log(&log, &names.log)? {
                match digest {
                    Some(digest) => tree.upsert(&entity, digest).map(drop),
                    None => tree.remove(&entity).map(drop),
                }
                .map_err(tree_error)?;
            }
        }
        tree.flush().map_err(tree_error)?;
        Ok(tree)
    }

    /// The shard's live tree as of this snapshot (fresh digests).
    pub fn tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.live_tree(group, shard)?.to_tree().map_err(tree_error)
    }

    /// The shard's live tree as of this snapshot, in the merkle snapshot file format.
    pub fn export_tree(&self, group: &str, shard: u32) -> Result<Vec<u8>, StoreError> {
        Ok(snapshot::encode(&self.tree(group, shard)?))
    }

    /// A tree built from scratch from a scan of the shard's properties in this snapshot.
    pub fn rebuild_tree(&self, group: &str, shard: u32) -> Result<Tree, StoreError> {
        self.rules.check_shard(group, shard)?;
        let names = ShardTableNames::new(group, shard);
        match open_read(&self.txn, names.props())? {
            Some(table) => build_from_rows(self.rules.shape, &table, &names.props),
            None => Tree::empty(self.rules.shape)
                .map_err(|error| ConfigError::Shape(error.to_string()).into()),
        }
    }

    /// Leaves under a node in `(bucket, entity)` order after `after`, at most `limit`.
    pub fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let shape = self.rules.shape;
        if !shape.contains(node) {
            return Err(StoreError::Tree {
                detail: format!("node {node} does not exist in this tree shape"),
            });
        }
        let buckets = shape.bucket_range(node);
        let names = ShardTableNames::new(group, shard);
        if self.has_log(&names)? {
            // Leaf changes are still in the log: read the leaves through the snapshot's tree,
            // which applies them in memory.
            let leaves = self
                .live_tree(group, shard)?
                .leaves_under(node)
                .map_err(tree_error)?;
            return Ok(leaves
                .into_iter()
                .filter(|leaf| after.is_none_or(|after| LeafKey::of(leaf) > *after))
                .take(limit)
                .collect());
        }
        let Some(table) = open_read(&self.txn, names.leaves())? else {
            return Ok(Vec::new());
        };
        let lower = match after {
            Some(after) if after.bucket >= buckets.end => return Ok(Vec::new()),
            Some(after) if after.bucket >= buckets.start => {
                std::ops::Bound::Excluded((after.bucket, after.entity.as_str()))
            }
            _ => std::ops::Bound::Included((buckets.start, "")),
        };
        let upper = std::ops::Bound::Excluded((buckets.end, ""));
        let mut leaves = Vec::new();
        if limit == 0 {
            return Ok(leaves);
        }
        for row in table.range::<(u64, &str)>((lower, upper))? {
            let (key, value) = row?;
            let (bucket, text) = key.value();
            let entity = Entity::parse(text).map_err(|error| StoreError::Corrupt {
                table: names.leaves.clone(),
                detail: format!("leaf key {text:?}: {error}"),
            })?;
            let digest = crate::codec::decode_digest(value.value()).map_err(|error| {
                StoreError::Corrupt {
                    table: names.leaves.clone(),
                    detail: error.0,
                }
            })?;
            leaves.push(Leaf {
                bucket,
                entity,
                digest,
            });
            if leaves.len() >= limit {
                break;
            }
        }
        Ok(leaves)
    }
}

/// An iterator over one shard's properties in entity order, from a [`Snapshot`].
pub struct ShardScan {
    rows: Option<redb::Range<'static, &'static str, &'static [u8]>>,
    table: String,
}

impl std::fmt::Debug for ShardScan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardScan")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Iterator for ShardScan {
    type Item = Result<Property, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let row = self.rows.as_mut()?.next()?;
        Some(match row {
            Ok((key, value)) => decode_row(&self.table, key.value(), value.value()),
            Err(error) => Err(error.into()),
        })
    }
}
