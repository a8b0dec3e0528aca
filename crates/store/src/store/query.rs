//! Queries over one group (DESIGN §8): which properties match a name, ids and tag filters, in
//! entity order, one page at a time.
//!
//! A page starts strictly after an entity (the previous page's last) and reads from there: the
//! shards' property tables are merged in entity order (by the bytes of `group/name/id`, the order
//! of their keys), so a page costs its own rows, never a rescan from the start of the group.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ops::Bound;

use propd_merkle::{Entity, Property, TagValue};
use redb::{AccessGuard, Range};

use crate::error::{StoreError, ValidationError};
use crate::store::RedbStore;
use crate::store::quarantine::Rotten;
use crate::store::rows::{damaged, decode_row, open_read};
use crate::store::snapshot::Snapshot;
use crate::tables::ShardTableNames;

/// What one stored row is counted as against [`Query::max_bytes`] beyond its key and value: the
/// few bytes of framing a property costs on the wire.
const ROW_OVERHEAD: usize = 16;

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
    pub tags: Vec<(String, TagValue)>,
    /// At most this many results.
    pub limit: usize,
    /// Whether tombstones are returned.
    pub include_deleted: bool,
    /// Only this shard of the group; `None` for every shard.
    pub shard: Option<u32>,
    /// Start strictly after this entity (of the same group): the previous page's last.
    pub after: Option<Entity>,
    /// End the page once its properties reach about this many bytes (their stored size plus a
    /// few bytes each); a page holds at least one property whatever its size.
    pub max_bytes: usize,
}

/// One page of a query's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPage {
    /// The matches, in entity order.
    pub properties: Vec<Property>,
    /// `Some(entity)` when the page ended at the limit or the byte bound: the next page starts
    /// after it (it is the last property of this page). `None` when nothing is left.
    pub resume_after: Option<Entity>,
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
            shard: None,
            after: None,
            max_bytes: usize::MAX,
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

/// Collects matches until the limit or the byte bound ends the page.
struct PageBuilder {
    properties: Vec<Property>,
    bytes: usize,
    limit: usize,
    max_bytes: usize,
}

impl PageBuilder {
    fn new(query: &Query) -> Self {
        PageBuilder {
            properties: Vec::new(),
            bytes: 0,
            limit: query.limit,
            max_bytes: query.max_bytes,
        }
    }

    /// Whether a match of `size` bytes still belongs in this page: a page never goes over the
    /// byte bound, except with its first property.
    fn fits(&self, size: usize) -> bool {
        self.properties.is_empty() || self.bytes.saturating_add(size) <= self.max_bytes
    }

    /// Adds a match of `size` bytes; `true` when the page is full.
    fn push(&mut self, property: Property, size: usize) -> bool {
        self.properties.push(property);
        self.bytes = self.bytes.saturating_add(size);
        self.properties.len() >= self.limit || self.bytes >= self.max_bytes
    }

    /// The page; `more` says whether rows may be left after its last property.
    fn finish(self, more: bool) -> Result<QueryPage, StoreError> {
        let resume_after = match (more, self.properties.last()) {
            (true, Some(last)) => Some(
                Entity::new(&last.group, &last.name, &last.id).map_err(ValidationError::from)?,
            ),
            _ => None,
        };
        Ok(QueryPage {
            properties: self.properties,
            resume_after,
        })
    }
}

type Row = (
    AccessGuard<'static, &'static str>,
    AccessGuard<'static, &'static [u8]>,
);

/// One shard's rows in key order, with the row read ahead.
struct Cursor {
    names: ShardTableNames,
    rows: Range<'static, &'static str, &'static [u8]>,
    head: Option<Row>,
}

impl Cursor {
    /// Reads the next row ahead; a damaged page is an error naming the table and the last key
    /// read.
    fn advance(&mut self) -> Result<(), StoreError> {
        let last = self
            .head
            .as_ref()
            .map(|(key, _)| key.value().to_owned())
            .unwrap_or_default();
        self.head = self
            .rows
            .next()
            .transpose()
            .map_err(|error| damaged(&self.names.props, &last, error))?;
        Ok(())
    }
}

impl Snapshot {
    /// Properties of one group matching a query, in entity order, at most `query.limit` (the
    /// first page of the query's answer).
    pub fn query(&self, query: &Query) -> Result<Vec<Property>, StoreError> {
        Ok(self.query_page(query)?.properties)
    }

    /// One page of a query's answer: the matches strictly after `query.after`, in entity order,
    /// until the limit or the byte bound.
    pub fn query_page(&self, query: &Query) -> Result<QueryPage, StoreError> {
        let def = self.rules.group(&query.group)?.clone();
        if let Some(shard) = query.shard {
            self.rules.check_shard(&query.group, shard)?;
        }
        if let Some(name) = &query.name {
            // Checks the name the way an entity would (non-empty, no `/`).
            Entity::new(&query.group, name, "id").map_err(ValidationError::from)?;
        }
        if let Some(after) = &query.after
            && after.group() != query.group
        {
            return Err(ValidationError::WrongGroup {
                entity: after.as_str().to_owned(),
                expected: query.group.clone(),
            }
            .into());
        }
        let mut page = PageBuilder::new(query);
        if query.limit == 0 {
            return page.finish(false);
        }
        if let (Some(name), false) = (&query.name, query.ids.is_empty()) {
            return self.lookup_page(query, name, def.shard_num, page);
        }
        let prefix = match &query.name {
            Some(name) => format!("{}/{name}/", query.group),
            None => format!("{}/", query.group),
        };
        let start = match &query.after {
            Some(after) if after.as_str() >= prefix.as_str() => Bound::Excluded(after.as_str()),
            _ => Bound::Included(prefix.as_str()),
        };
        let mut cursors = Vec::new();
        let shards = match query.shard {
            Some(shard) => shard..shard + 1,
            None => 0..def.shard_num,
        };
        for shard in shards {
            let names = ShardTableNames::new(&query.group, shard);
            let Some(table) = open_read(&self.txn, names.props())? else {
                continue;
            };
            let mut cursor = Cursor {
                rows: table.range::<&str>((start, Bound::Unbounded))?,
                names,
                head: None,
            };
            cursor.advance()?;
            cursors.push(cursor);
        }
        // The smallest key first: (key, cursor index).
        let mut heads: BinaryHeap<Reverse<(String, usize)>> = cursors
            .iter()
            .enumerate()
            .filter_map(|(i, cursor)| {
                let (key, _) = cursor.head.as_ref()?;
                Some(Reverse((key.value().to_owned(), i)))
            })
            .collect();
        while let Some(Reverse((key, i))) = heads.pop() {
            if !key.starts_with(prefix.as_str()) {
                // Every other head is larger still: nothing under the prefix is left.
                return page.finish(false);
            }
            let cursor = &mut cursors[i];
            let decoded = match &cursor.head {
                Some((_, value)) => {
                    let value = value.value();
                    // A row that fails its check is skipped (and quarantined after the query).
                    match decode_row(&key, value, self.rules.read_check) {
                        Ok(property) => Some((property, key.len() + value.len() + ROW_OVERHEAD)),
                        Err(reason) => {
                            self.rot
                                .push(Rotten::new(&cursor.names, &key, value, reason));
                            None
                        }
                    }
                }
                None => continue,
            };
            if let Some((property, size)) = decoded
                && query.matches(&property)
            {
                if !page.fits(size) {
                    // The next page starts with it.
                    return page.finish(true);
                }
                if page.push(property, size) {
                    return page.finish(true);
                }
            }
            cursor.advance()?;
            if let Some((next, _)) = &cursor.head {
                heads.push(Reverse((next.value().to_owned(), i)));
            }
        }
        page.finish(false)
    }

    /// A page of direct lookups: every (name, id) pair names one entity.
    fn lookup_page(
        &self,
        query: &Query,
        name: &str,
        shard_num: u32,
        mut page: PageBuilder,
    ) -> Result<QueryPage, StoreError> {
        let mut entities = query
            .ids
            .iter()
            .map(|id| Entity::new(&query.group, name, id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ValidationError::from)?;
        entities.sort();
        entities.dedup();
        entities.retain(|entity| query.after.as_ref().is_none_or(|after| entity > after));
        if let Some(shard) = query.shard {
            let shard_num =
                std::num::NonZeroU32::new(shard_num).unwrap_or(std::num::NonZeroU32::MIN);
            entities.retain(|entity| propd_merkle::shard_of(entity, shard_num) == shard);
        }
        let last = entities.len();
        for (i, entity) in entities.iter().enumerate() {
            if let Some(property) = self.get(entity)?
                && query.matches(&property)
            {
                let size = property.canonical_bytes().len() + ROW_OVERHEAD;
                if !page.fits(size) {
                    return page.finish(true);
                }
                if page.push(property, size) {
                    return page.finish(i + 1 < last);
                }
            }
        }
        page.finish(false)
    }
}

impl RedbStore {
    /// Properties of one group matching a query, in entity order, at most `query.limit`.
    ///
    /// Rows that fail their check are left out and quarantined.
    pub fn query(&self, query: &Query) -> Result<Vec<Property>, StoreError> {
        let found = self.guarded(|| self.snapshot()?.query(query));
        self.settle_rot();
        found
    }

    /// One page of a query's answer; see [`Snapshot::query_page`]. Rows that fail their check
    /// are left out and quarantined.
    pub fn query_page(&self, query: &Query) -> Result<QueryPage, StoreError> {
        let found = self.guarded(|| self.snapshot()?.query_page(query));
        self.settle_rot();
        found
    }
}
