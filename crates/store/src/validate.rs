//! Validation of incoming properties and shard addresses (DESIGN §9), shared by both stores.

use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};

use propd_merkle::{Digest, Entity, Property, Shape, shard_of};

use crate::codec::encode_row;
use crate::config::{GroupDef, Groups, ReadCheck};
use crate::error::{ConfigError, StoreError, ValidationError};

/// What a store checks every request against.
#[derive(Debug)]
pub(crate) struct Rules {
    /// The groups: a running node may add one (a group created in etcd while it runs).
    pub(crate) groups: GroupTable,
    pub(crate) shape: Shape,
    pub(crate) max_property_bytes: usize,
    /// Whether client reads check rows against their check digests.
    pub(crate) read_check: ReadCheck,
}

/// A property that passed validation, with what the store derives from it.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub(crate) entity: Entity,
    pub(crate) shard: u32,
    pub(crate) digest: Digest,
    /// What the store keeps as the row's value: the check digest, then the canonical bytes
    /// (`codec::encode_row`).
    pub(crate) bytes: Vec<u8>,
    pub(crate) property: Property,
}

/// What kind of write a property arrives with; each accepts different `delete_time`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// A create or update: live only.
    Apply,
    /// A delete: a tombstone only.
    Delete,
    /// A copy from another node (repair or replication): live or tombstone.
    Copy,
}

/// The groups a store serves, replaced whole when one is added (readers keep the set they
/// took).
#[derive(Debug)]
pub(crate) struct GroupTable(RwLock<Arc<Groups>>);

impl GroupTable {
    pub(crate) fn new(groups: Groups) -> Self {
        Self(RwLock::new(Arc::new(groups)))
    }

    /// The groups now.
    pub(crate) fn current(&self) -> Arc<Groups> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds the groups of `defs` not known yet (by name).
    pub(crate) fn extend(&self, defs: &[GroupDef]) -> Result<(), ConfigError> {
        let mut current = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let added: Vec<GroupDef> = defs
            .iter()
            .filter(|d| current.get(&d.name).is_none())
            .cloned()
            .collect();
        if !added.is_empty() {
            *current = Arc::new(Groups::new(current.iter().cloned().chain(added))?);
        }
        Ok(())
    }

    /// Whether (group, shard) exists.
    pub(crate) fn has_shard(&self, group: &str, shard: u32) -> bool {
        self.current().has_shard(group, shard)
    }
}

impl Rules {
    /// The definition of a known group.
    pub(crate) fn group(&self, group: &str) -> Result<GroupDef, ValidationError> {
        self.groups
            .current()
            .get(group)
            .cloned()
            .ok_or_else(|| ValidationError::UnknownGroup {
                group: group.to_owned(),
            })
    }

    /// Checks that `shard` exists in `group`.
    pub(crate) fn check_shard(&self, group: &str, shard: u32) -> Result<GroupDef, ValidationError> {
        let def = self.group(group)?;
        if shard >= def.shard_num {
            return Err(ValidationError::ShardOutOfRange {
                group: group.to_owned(),
                shard,
                shard_num: def.shard_num,
            });
        }
        Ok(def)
    }

    /// The shard an entity of a known group lives in.
    pub(crate) fn shard_of(&self, entity: &Entity) -> Result<u32, ValidationError> {
        let def = self.group(entity.group())?;
        Ok(shard_of_def(&def, entity))
    }

    /// Validates a property for a write of `kind`, optionally addressed to `shard`.
    pub(crate) fn check(
        &self,
        property: Property,
        kind: WriteKind,
        shard: Option<u32>,
    ) -> Result<Checked, ValidationError> {
        let entity = Entity::new(&property.group, &property.name, &property.id)?;
        let def = self.group(entity.group())?;
        let actual = shard_of_def(&def, &entity);
        if let Some(expected) = shard {
            self.check_shard(entity.group(), expected)?;
            if expected != actual {
                return Err(ValidationError::WrongShard {
                    entity: entity.to_string(),
                    expected,
                    actual,
                });
            }
        }
        let field =
            |field: &'static str, value: i64, expected: &'static str| ValidationError::Field {
                entity: entity.to_string(),
                field,
                value,
                expected,
            };
        if property.mod_revision <= 0 {
            return Err(field("mod_revision", property.mod_revision, "must be > 0"));
        }
        match kind {
            WriteKind::Apply if property.delete_time != 0 => {
                return Err(field(
                    "delete_time",
                    property.delete_time,
                    "must be 0 for an apply (use delete)",
                ));
            }
            WriteKind::Delete if property.delete_time <= 0 => {
                return Err(field(
                    "delete_time",
                    property.delete_time,
                    "must be > 0 for a delete",
                ));
            }
            WriteKind::Copy if property.delete_time < 0 => {
                return Err(field("delete_time", property.delete_time, "must be >= 0"));
            }
            _ => {}
        }
        let size = property.canonical_len();
        if size > self.max_property_bytes {
            return Err(ValidationError::TooLarge {
                entity: entity.to_string(),
                size,
                max: self.max_property_bytes,
            });
        }
        let canonical = property.canonical_bytes();
        let digest = self.shape.digest(&canonical);
        let bytes = encode_row(entity.as_str(), &canonical);
        Ok(Checked {
            entity,
            shard: actual,
            digest,
            bytes,
            property,
        })
    }

    /// Checks that an entity belongs to (group, shard).
    pub(crate) fn check_member(
        &self,
        entity: &Entity,
        group: &str,
        shard: u32,
    ) -> Result<(), ValidationError> {
        self.check_shard(group, shard)?;
        if entity.group() != group {
            return Err(ValidationError::WrongGroup {
                entity: entity.to_string(),
                expected: group.to_owned(),
            });
        }
        let actual = self.shard_of(entity)?;
        if actual != shard {
            return Err(ValidationError::WrongShard {
                entity: entity.to_string(),
                expected: shard,
                actual,
            });
        }
        Ok(())
    }

    /// Checks that every entity belongs to (group, shard), in order; the first stranger fails.
    pub(crate) fn check_members(
        &self,
        entities: &[Entity],
        group: &str,
        shard: u32,
    ) -> Result<(), ValidationError> {
        entities
            .iter()
            .try_for_each(|entity| self.check_member(entity, group, shard))
    }

    /// Validates a repair batch for (group, shard): the shard first, then every item; the first
    /// refused item names its index.
    pub(crate) fn check_batch(
        &self,
        group: &str,
        shard: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<Checked>, StoreError> {
        self.check_shard(group, shard)?;
        batch
            .into_iter()
            .enumerate()
            .map(|(index, property)| {
                let checked = if property.group != group {
                    Err(ValidationError::WrongGroup {
                        entity: format!("{}/{}/{}", property.group, property.name, property.id),
                        expected: group.to_owned(),
                    })
                } else {
                    self.check(property, WriteKind::Copy, Some(shard))
                };
                checked.map_err(|source| StoreError::BatchItem { index, source })
            })
            .collect()
    }
}

fn shard_of_def(def: &GroupDef, entity: &Entity) -> u32 {
    // `Groups::new` refuses shard_num 0, so the fallback is never taken.
    NonZeroU32::new(def.shard_num).map_or(0, |shard_num| shard_of(entity, shard_num))
}
