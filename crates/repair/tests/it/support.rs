//! Store builders and helpers shared by the suites.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use propd_merkle::{
    Entity, InnerNode, Leaf, NodeId, Property, Shape, TagValue, shard_of, version_order,
};
use propd_repair::Config;
use propd_store::{
    GroupDef, Groups, LeafKey, ModelStore, RedbStore, RepairOutcome, RepairStore, StoreConfig,
    ValidationError, WriteDurability,
};

pub(crate) const GROUP: &str = "g";

pub(crate) fn groups(shard_num: u32) -> Groups {
    Groups::new([GroupDef::new(GROUP, shard_num, 2)]).expect("valid groups")
}

pub(crate) fn model(shape: Shape, shard_num: u32) -> ModelStore {
    ModelStore::new(groups(shard_num), shape).expect("model store")
}

pub(crate) fn redb(dir: &tempfile::TempDir, shape: Shape, shard_num: u32) -> RedbStore {
    let mut config = StoreConfig::new(dir.path(), groups(shard_num), shape);
    config.durability = WriteDurability::NotSynced;
    RedbStore::open(config).expect("redb store")
}

/// A property of entity `g/n/{id}`.
pub(crate) fn prop(id: &str, revision: i64, value: &str, delete_time: i64) -> Property {
    let mut property = Property {
        group: GROUP.into(),
        name: "n".into(),
        id: id.into(),
        mod_revision: revision,
        delete_time,
        ..Property::default()
    };
    if delete_time == 0 {
        property
            .tags
            .insert("v".into(), TagValue::Str(value.into()));
    }
    property
}

pub(crate) fn shard_of_id(id: &str, shard_num: u32) -> u32 {
    let entity = Entity::new(GROUP, "n", id).expect("entity");
    shard_of(&entity, NonZeroU32::new(shard_num).expect("non-zero"))
}

/// Stores copies through the repair path (any version, tombstones included).
pub(crate) fn put<S: RepairStore>(store: &S, shard: u32, properties: Vec<Property>) {
    for chunk in properties.chunks(4096) {
        store
            .repair_apply_batch(GROUP, shard, chunk.to_vec())
            .expect("seed batch");
    }
}

/// Every property of the shard in entity order, read through the repair view.
pub(crate) fn contents<S: RepairStore>(store: &S, shard: u32) -> Vec<Property> {
    let leaves = store
        .leaves_under(GROUP, shard, NodeId::ROOT, None, usize::MAX)
        .expect("leaves");
    let mut entities: Vec<Entity> = leaves.into_iter().map(|leaf| leaf.entity).collect();
    entities.sort();
    store
        .get_many(GROUP, shard, &entities)
        .expect("get_many")
        .into_iter()
        .map(|p| p.expect("a leaf without its property"))
        .collect()
}

pub(crate) fn root<S: RepairStore>(store: &S, shard: u32) -> Option<Vec<u8>> {
    store
        .tree_node(GROUP, shard, NodeId::ROOT)
        .expect("root")
        .map(|node| node.digest.as_bytes().to_vec())
}

/// The expected result of a sync: per entity the greater copy by the version order.
pub(crate) fn merged(a: &[Property], b: &[Property], shape: &Shape) -> Vec<Property> {
    let mut all: std::collections::BTreeMap<String, Property> = std::collections::BTreeMap::new();
    for p in a.iter().chain(b) {
        let key = p.entity().expect("entity").to_string();
        match all.get(&key) {
            Some(existing) if version_order(existing, p, shape).is_ge() => {}
            _ => {
                all.insert(key, p.clone());
            }
        }
    }
    all.into_values().collect()
}

/// A small shape that still has bucket levels: 4 slots, fanout 2, depth 2.
pub(crate) fn small_shape() -> Shape {
    Shape {
        slot_count: 4,
        fanout: 2,
        depth: 2,
        ..Shape::default()
    }
}

/// A config that pages after every couple of entries and descends as deep as it can.
pub(crate) fn tiny_pages() -> Config {
    Config {
        page_items: 2,
        leaf_list_max: 0,
        max_backlog: 4,
        apply_batch: 3,
        ..Config::default()
    }
}

/// A store that passes every call on to `inner` and watches the reads the protocol makes: it
/// counts the leaves `leaves_under` returns, and calls `before_page` with the page's number
/// before each page `properties_after` reads (the bulk path), where a test can slow it down.
pub(crate) struct Watched<S> {
    pub(crate) inner: S,
    leaves_read: AtomicU64,
    pages_read: AtomicU64,
    before_page: Box<dyn Fn(u64) + Send + Sync>,
    /// Ids whose copies `repair_apply_batch` refuses (a batch holding one is refused whole).
    refused_ids: Vec<String>,
    /// Whether `tree_node` fails (a store that cannot read its tree).
    tree_unreadable: bool,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S) -> Self {
        Self::with_page_hook(inner, |_| {})
    }

    pub(crate) fn with_page_hook(
        inner: S,
        before_page: impl Fn(u64) + Send + Sync + 'static,
    ) -> Self {
        Watched {
            inner,
            leaves_read: AtomicU64::new(0),
            pages_read: AtomicU64::new(0),
            before_page: Box::new(before_page),
            refused_ids: Vec::new(),
            tree_unreadable: false,
        }
    }

    /// A store that refuses to apply copies of these ids, as a store refuses bad input.
    pub(crate) fn refusing(inner: S, ids: &[&str]) -> Self {
        Watched {
            refused_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            ..Self::new(inner)
        }
    }

    /// A store whose every `tree_node` read fails.
    pub(crate) fn tree_unreadable(inner: S) -> Self {
        Watched {
            tree_unreadable: true,
            ..Self::new(inner)
        }
    }

    /// The leaves `leaves_under` has returned so far.
    pub(crate) fn leaves_read(&self) -> u64 {
        self.leaves_read.load(Ordering::Relaxed)
    }

    /// The pages `properties_after` has been asked for so far.
    pub(crate) fn pages_read(&self) -> u64 {
        self.pages_read.load(Ordering::Relaxed)
    }
}

impl<S: RepairStore> RepairStore for Watched<S>
where
    S::Error: From<ValidationError>,
{
    type Error = S::Error;

    fn shape(&self) -> Shape {
        self.inner.shape()
    }

    fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.inner.has_shard(group, shard)
    }

    fn tree_node(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Option<InnerNode>, Self::Error> {
        if self.tree_unreadable {
            return Err(ValidationError::Field {
                entity: format!("{group}/{shard}"),
                field: "tree",
                value: 0,
                expected: "readable (this test's store fails every tree read)",
            }
            .into());
        }
        self.inner.tree_node(group, shard, node)
    }

    fn tree_children(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, Self::Error> {
        self.inner.tree_children(group, shard, node)
    }

    fn leaves_under(
        &self,
        group: &str,
        shard: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, Self::Error> {
        let leaves = self.inner.leaves_under(group, shard, node, after, limit)?;
        self.leaves_read
            .fetch_add(leaves.len() as u64, Ordering::Relaxed);
        Ok(leaves)
    }

    fn properties_after(
        &self,
        group: &str,
        shard: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, Self::Error> {
        (self.before_page)(self.pages_read.fetch_add(1, Ordering::Relaxed));
        self.inner.properties_after(group, shard, after, limit)
    }

    fn get_many(
        &self,
        group: &str,
        shard: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, Self::Error> {
        self.inner.get_many(group, shard, entities)
    }

    fn repair_apply_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, Self::Error> {
        if let Some(refused) = batch.iter().find(|p| self.refused_ids.contains(&p.id)) {
            return Err(ValidationError::Field {
                entity: refused.id.clone(),
                field: "mod_revision",
                value: refused.mod_revision,
                expected: "refused by this test's store",
            }
            .into());
        }
        self.inner.repair_apply_batch(group, shard, batch)
    }
}
