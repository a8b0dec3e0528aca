//! The merkle crate's `TreeStorage` over redb tables: one implementation inside a flush's write
//! transaction (leaves and inner nodes in redb), and one over a read snapshot that keeps its
//! changes (the leaf log applied, a flush's recomputed digests) in memory. The dirty set is the
//! live tree's own, in memory.

use std::collections::BTreeMap;
use std::ops::Range;

use propd_merkle::{Digest, Entity, InnerNode, NodeId, TreeStorage};
use redb::{ReadOnlyTable, ReadableTable, Table};

use crate::codec::{DecodeError, decode_digest, decode_inner, encode_inner};
use crate::error::StoreError;

type LeafKey<'a> = (u64, &'a str);

fn corrupt(table: &str, error: DecodeError) -> StoreError {
    StoreError::Corrupt {
        table: table.to_owned(),
        detail: error.0,
    }
}

/// A leaf's digest from its stored bytes in the table `name`.
fn leaf_digest(name: &str, bytes: &[u8]) -> Result<Digest, StoreError> {
    decode_digest(bytes).map_err(|error| corrupt(name, error))
}

fn read_leaf(
    table: &impl ReadableTable<LeafKey<'static>, &'static [u8]>,
    name: &str,
    bucket: u64,
    entity: &Entity,
) -> Result<Option<Digest>, StoreError> {
    table
        .get((bucket, entity.as_str()))?
        .map(|guard| leaf_digest(name, guard.value()))
        .transpose()
}

fn visit_leaf_range(
    table: &impl ReadableTable<LeafKey<'static>, &'static [u8]>,
    name: &str,
    buckets: Range<u64>,
    visit: &mut dyn FnMut(u64, &Entity, Digest),
) -> Result<(), StoreError> {
    if buckets.start >= buckets.end {
        return Ok(());
    }
    for row in table.range((buckets.start, "")..(buckets.end, ""))? {
        let (key, value) = row?;
        let (bucket, text) = key.value();
        let entity = Entity::parse(text).map_err(|error| StoreError::Corrupt {
            table: name.to_owned(),
            detail: format!("leaf key {text:?}: {error}"),
        })?;
        visit(bucket, &entity, leaf_digest(name, value.value())?);
    }
    Ok(())
}

fn read_inner(
    table: &impl ReadableTable<(u32, u64), &'static [u8]>,
    name: &str,
    node: NodeId,
) -> Result<Option<InnerNode>, StoreError> {
    match table.get((node.level, node.index))? {
        Some(guard) => Ok(Some(
            decode_inner(guard.value()).map_err(|error| corrupt(name, error))?,
        )),
        None => Ok(None),
    }
}

fn visit_inner_range(
    table: &impl ReadableTable<(u32, u64), &'static [u8]>,
    name: &str,
    level: u32,
    indexes: Range<u64>,
    visit: &mut dyn FnMut(NodeId, InnerNode),
) -> Result<(), StoreError> {
    if indexes.start >= indexes.end {
        return Ok(());
    }
    for row in table.range((level, indexes.start)..(level, indexes.end))? {
        let (key, value) = row?;
        let (level, index) = key.value();
        let inner = decode_inner(value.value()).map_err(|error| corrupt(name, error))?;
        visit(NodeId::new(level, index), inner);
    }
    Ok(())
}

/// Visits, in key order, the stored rows that `stored` reports merged with the in-memory changes
/// of `overlay` (`Some` written, `None` removed), which take precedence.
fn visit_merged<K: Ord, V>(
    stored: impl FnOnce(&mut dyn FnMut(K, V)) -> Result<(), StoreError>,
    overlay: impl Iterator<Item = (K, Option<V>)>,
    visit: &mut dyn FnMut(K, V),
) -> Result<(), StoreError> {
    let mut merged: BTreeMap<K, Option<V>> = BTreeMap::new();
    stored(&mut |key, value| {
        merged.insert(key, Some(value));
    })?;
    merged.extend(overlay);
    for (key, value) in merged {
        if let Some(value) = value {
            visit(key, value);
        }
    }
    Ok(())
}

/// The tables of one shard's tree, opened in a write transaction.
pub(crate) struct TxnTree<'a, 'txn> {
    pub(crate) leaves: &'a mut Table<'txn, LeafKey<'static>, &'static [u8]>,
    pub(crate) nodes: &'a mut Table<'txn, (u32, u64), &'static [u8]>,
    /// Table names for error messages: leaves, nodes.
    pub(crate) leaves_name: &'a str,
    pub(crate) nodes_name: &'a str,
}

impl TreeStorage for TxnTree<'_, '_> {
    type Error = StoreError;

    fn get_leaf(&self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, StoreError> {
        read_leaf(self.leaves, self.leaves_name, bucket, entity)
    }

    fn put_leaf(
        &mut self,
        bucket: u64,
        entity: &Entity,
        digest: Digest,
    ) -> Result<Option<Digest>, StoreError> {
        self.leaves
            .insert((bucket, entity.as_str()), digest.as_bytes())?
            .map(|guard| leaf_digest(self.leaves_name, guard.value()))
            .transpose()
    }

    fn remove_leaf(&mut self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, StoreError> {
        self.leaves
            .remove((bucket, entity.as_str()))?
            .map(|guard| leaf_digest(self.leaves_name, guard.value()))
            .transpose()
    }

    fn visit_leaves(
        &self,
        buckets: Range<u64>,
        visit: &mut dyn FnMut(u64, &Entity, Digest),
    ) -> Result<(), StoreError> {
        visit_leaf_range(self.leaves, self.leaves_name, buckets, visit)
    }

    fn get_inner(&self, node: NodeId) -> Result<Option<InnerNode>, StoreError> {
        read_inner(self.nodes, self.nodes_name, node)
    }

    fn put_inner(&mut self, node: NodeId, inner: InnerNode) -> Result<(), StoreError> {
        self.nodes
            .insert((node.level, node.index), encode_inner(&inner).as_slice())?;
        Ok(())
    }

    fn remove_inner(&mut self, node: NodeId) -> Result<(), StoreError> {
        self.nodes.remove((node.level, node.index))?;
        Ok(())
    }

    fn visit_inner(
        &self,
        level: u32,
        indexes: Range<u64>,
        visit: &mut dyn FnMut(NodeId, InnerNode),
    ) -> Result<(), StoreError> {
        visit_inner_range(self.nodes, self.nodes_name, level, indexes, visit)
    }
}

/// One shard's tree as of a read snapshot. Reads come from the snapshot; writes (the leaf log's
/// changes, a flush's inner nodes) stay in memory, so a reader gets fresh
/// digests without a write transaction. A missing table reads as empty.
pub(crate) struct SnapshotTree {
    pub(crate) leaves: Option<ReadOnlyTable<LeafKey<'static>, &'static [u8]>>,
    pub(crate) nodes: Option<ReadOnlyTable<(u32, u64), &'static [u8]>>,
    pub(crate) leaves_name: String,
    pub(crate) nodes_name: String,
    /// Leaves written (`Some`) or removed (`None`) in memory.
    pub(crate) leaf_overlay: BTreeMap<u64, BTreeMap<Entity, Option<Digest>>>,
    /// Inner nodes written (`Some`) or removed (`None`) by a flush.
    pub(crate) inner_overlay: BTreeMap<NodeId, Option<InnerNode>>,
}

impl TreeStorage for SnapshotTree {
    type Error = StoreError;

    fn get_leaf(&self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, StoreError> {
        if let Some(overlaid) = self
            .leaf_overlay
            .get(&bucket)
            .and_then(|leaves| leaves.get(entity))
        {
            return Ok(*overlaid);
        }
        match &self.leaves {
            Some(table) => read_leaf(table, &self.leaves_name, bucket, entity),
            None => Ok(None),
        }
    }

    fn put_leaf(
        &mut self,
        bucket: u64,
        entity: &Entity,
        digest: Digest,
    ) -> Result<Option<Digest>, StoreError> {
        let previous = self.get_leaf(bucket, entity)?;
        self.leaf_overlay
            .entry(bucket)
            .or_default()
            .insert(entity.clone(), Some(digest));
        Ok(previous)
    }

    fn remove_leaf(&mut self, bucket: u64, entity: &Entity) -> Result<Option<Digest>, StoreError> {
        let previous = self.get_leaf(bucket, entity)?;
        self.leaf_overlay
            .entry(bucket)
            .or_default()
            .insert(entity.clone(), None);
        Ok(previous)
    }

    fn visit_leaves(
        &self,
        buckets: Range<u64>,
        visit: &mut dyn FnMut(u64, &Entity, Digest),
    ) -> Result<(), StoreError> {
        if buckets.start >= buckets.end {
            return Ok(());
        }
        let mut overlay = self.leaf_overlay.range(buckets.clone()).peekable();
        if overlay.peek().is_none() {
            return match &self.leaves {
                Some(table) => visit_leaf_range(table, &self.leaves_name, buckets, visit),
                None => Ok(()),
            };
        }
        visit_merged(
            |stored| match &self.leaves {
                Some(table) => visit_leaf_range(
                    table,
                    &self.leaves_name,
                    buckets,
                    &mut |bucket, entity, digest| stored((bucket, entity.clone()), digest),
                ),
                None => Ok(()),
            },
            overlay.flat_map(|(bucket, leaves)| {
                leaves
                    .iter()
                    .map(|(entity, digest)| ((*bucket, entity.clone()), *digest))
            }),
            &mut |(bucket, entity), digest| visit(bucket, &entity, digest),
        )
    }

    fn get_inner(&self, node: NodeId) -> Result<Option<InnerNode>, StoreError> {
        if let Some(overlaid) = self.inner_overlay.get(&node) {
            return Ok(*overlaid);
        }
        match &self.nodes {
            Some(table) => read_inner(table, &self.nodes_name, node),
            None => Ok(None),
        }
    }

    fn put_inner(&mut self, node: NodeId, inner: InnerNode) -> Result<(), StoreError> {
        self.inner_overlay.insert(node, Some(inner));
        Ok(())
    }

    fn remove_inner(&mut self, node: NodeId) -> Result<(), StoreError> {
        self.inner_overlay.insert(node, None);
        Ok(())
    }

    fn visit_inner(
        &self,
        level: u32,
        indexes: Range<u64>,
        visit: &mut dyn FnMut(NodeId, InnerNode),
    ) -> Result<(), StoreError> {
        let Some(range) = NodeId::level_range(level, indexes.clone()) else {
            return Ok(());
        };
        let mut overlay = self.inner_overlay.range(range).peekable();
        if overlay.peek().is_none() {
            return match &self.nodes {
                Some(table) => visit_inner_range(table, &self.nodes_name, level, indexes, visit),
                None => Ok(()),
            };
        }
        visit_merged(
            |stored| match &self.nodes {
                Some(table) => visit_inner_range(
                    table,
                    &self.nodes_name,
                    level,
                    indexes,
                    &mut |node, inner| stored(node, inner),
                ),
                None => Ok(()),
            },
            overlay.map(|(node, inner)| (*node, *inner)),
            visit,
        )
    }
}
