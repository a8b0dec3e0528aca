//! Queries over one group (DESIGN §8): which properties match a name, ids and tag filters, in
//! entity order, at most a limit.

use propd_merkle::{Entity, Property, TagValue};

use crate::error::{StoreError, ValidationError};
use crate::store::RedbStore;
use crate::store::quarantine::Rotten;
use crate::store::rows::{damaged, decode_row, open_read};
use crate::store::snapshot::Snapshot;
use crate::tables::ShardTableNames;

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

impl Snapshot {
    /// Properties of one group matching a query, in entity order, at most `query.limit`.
    pub fn query(&self, query: &Query) -> Result<Vec<Property>, StoreError> {
        let def = self.rules.group(&query.group)?;
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
                // A row that fails its check is skipped (and quarantined after the query); a
                // damaged page ends the query with an error naming the table and keys.
                let mut taken = 0;
                let mut last_key = String::new();
                for row in rows {
                    let (key, value) =
                        row.map_err(|error| damaged(&names.props, &last_key, error))?;
                    let (key, value) = (key.value(), value.value());
                    if prefix
                        .as_ref()
                        .is_some_and(|prefix| !key.starts_with(prefix.as_str()))
                    {
                        break;
                    }
                    last_key.clear();
                    last_key.push_str(key);
                    let property = match decode_row(key, value, self.rules.read_check) {
                        Ok(property) => property,
                        Err(reason) => {
                            self.rot.push(Rotten::new(&names, key, value, reason));
                            continue;
                        }
                    };
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
}
