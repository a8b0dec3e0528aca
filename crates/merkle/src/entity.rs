//! The entity: a property's identity `group/name/id` as one validated string.

use std::fmt;
use std::str::FromStr;

/// Why a string or a triple is not a valid entity. Each variant names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntityError {
    /// A part of the entity is empty.
    #[error("entity field `{field}` is empty")]
    Empty {
        /// `group`, `name` or `id`.
        field: &'static str,
    },
    /// `group` or `name` contains `/`.
    #[error("entity field `{field}` must not contain '/': {value:?}")]
    Slash {
        /// `group` or `name`.
        field: &'static str,
        /// The rejected value.
        value: String,
    },
    /// The entity string does not have the form `group/name/id`.
    #[error("entity {value:?} is not of the form group/name/id")]
    Malformed {
        /// The rejected string.
        value: String,
    },
    /// The entity is longer than [`Entity::MAX_LEN`] bytes.
    #[error("entity is {len} bytes long, more than the limit of {max}")]
    TooLong {
        /// The length in bytes.
        len: usize,
        /// The limit, [`Entity::MAX_LEN`].
        max: usize,
    },
}

/// A validated entity `group/name/id`: no part is empty, `group` and `name` contain no `/`
/// (the `id` may). Ordered, compared and hashed by its bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Entity {
    text: Box<str>,
    group_len: u32,
    name_len: u32,
}

impl Entity {
    /// The longest accepted entity in bytes (64 KiB - 1), so that every length fits a `u16` on
    /// the wire and in the snapshot format with room to spare.
    pub const MAX_LEN: usize = u16::MAX as usize;

    /// Builds the entity `group/name/id` from its parts.
    pub fn new(group: &str, name: &str, id: &str) -> Result<Self, EntityError> {
        let len = Entity::check_parts(group, name, id)?;
        let mut text = String::with_capacity(len);
        text.push_str(group);
        text.push('/');
        text.push_str(name);
        text.push('/');
        text.push_str(id);
        Ok(Entity {
            text: text.into_boxed_str(),
            group_len: group.len() as u32,
            name_len: name.len() as u32,
        })
    }

    /// Checks the parts as [`Entity::new`] does, without building anything; returns the length
    /// of `group/name/id` in bytes.
    pub(crate) fn check_parts(group: &str, name: &str, id: &str) -> Result<usize, EntityError> {
        check_part("group", group, false)?;
        check_part("name", name, false)?;
        check_part("id", id, true)?;
        let len = group.len() + name.len() + id.len() + 2;
        if len > Self::MAX_LEN {
            return Err(EntityError::TooLong {
                len,
                max: Self::MAX_LEN,
            });
        }
        Ok(len)
    }

    /// Parses `group/name/id`: the first `/` ends the group, the second the name, the rest is
    /// the id (which may contain `/`).
    pub fn parse(text: &str) -> Result<Self, EntityError> {
        let (group, name, id) = Entity::split(text)?;
        Entity::new(group, name, id)
    }

    /// Checks a string as [`Entity::parse`] does (same errors), without building anything.
    pub(crate) fn check_str(text: &str) -> Result<(), EntityError> {
        let (group, name, id) = Entity::split(text)?;
        Entity::check_parts(group, name, id).map(|_| ())
    }

    fn split(text: &str) -> Result<(&str, &str, &str), EntityError> {
        let malformed = || EntityError::Malformed {
            value: text.to_owned(),
        };
        let (group, rest) = text.split_once('/').ok_or_else(malformed)?;
        let (name, id) = rest.split_once('/').ok_or_else(malformed)?;
        Ok((group, name, id))
    }

    /// Parses an entity from its UTF-8 bytes (as stored in a snapshot or a storage key).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, EntityError> {
        let text = std::str::from_utf8(bytes).map_err(|_| EntityError::Malformed {
            value: String::from_utf8_lossy(bytes).into_owned(),
        })?;
        Entity::parse(text)
    }

    /// An entity from bytes already checked by [`Entity::check_str`] or [`Entity::check_parts`]
    /// (the builder's own buffer): only the UTF-8 and the two separators are looked at again.
    pub(crate) fn from_checked_bytes(bytes: &[u8]) -> Result<Self, EntityError> {
        let malformed = || EntityError::Malformed {
            value: String::from_utf8_lossy(bytes).into_owned(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
        let group_len = text.find('/').ok_or_else(malformed)?;
        let name_len = text[group_len + 1..].find('/').ok_or_else(malformed)?;
        Ok(Entity {
            text: Box::from(text),
            group_len: group_len as u32,
            name_len: name_len as u32,
        })
    }

    /// The group.
    pub fn group(&self) -> &str {
        &self.text[..self.group_len as usize]
    }

    /// The name.
    pub fn name(&self) -> &str {
        let start = self.group_len as usize + 1;
        &self.text[start..start + self.name_len as usize]
    }

    /// The id.
    pub fn id(&self) -> &str {
        &self.text[self.group_len as usize + self.name_len as usize + 2..]
    }

    /// The whole entity string `group/name/id`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The entity's bytes: what positions, shards, digests and the order are computed from.
    pub fn as_bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

fn check_part(field: &'static str, value: &str, slash_allowed: bool) -> Result<(), EntityError> {
    if value.is_empty() {
        return Err(EntityError::Empty { field });
    }
    if !slash_allowed && value.contains('/') {
        return Err(EntityError::Slash {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl Ord for Entity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.as_bytes().cmp(other.text.as_bytes())
    }
}

impl PartialOrd for Entity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl FromStr for Entity {
    type Err = EntityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Entity::parse(text)
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entity({:?})", &*self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parts' check bounds the whole key, separators included, at `MAX_LEN` bytes, and
    /// says the length.
    #[test]
    fn checked_parts_are_bounded_by_the_whole_keys_length() {
        let id = |n: usize| "i".repeat(n);
        let longest = Entity::MAX_LEN - "gg/nnn/".len();
        assert_eq!(
            Entity::check_parts("gg", "nnn", &id(longest)),
            Ok(Entity::MAX_LEN)
        );
        assert_eq!(
            Entity::check_parts("gg", "nnn", &id(longest + 1)),
            Err(EntityError::TooLong {
                len: Entity::MAX_LEN + 1,
                max: Entity::MAX_LEN
            })
        );
        assert_eq!(Entity::check_parts("g", "n", "i"), Ok(5));
    }

    /// An entity rebuilt from checked bytes has the parts of the text, and shows as its key.
    #[test]
    fn an_entity_from_checked_bytes_has_its_parts_and_shows_its_key() {
        let entity = Entity::from_checked_bytes(b"grp/name/a/b").expect("valid");
        assert_eq!(
            (entity.group(), entity.name(), entity.id()),
            ("grp", "name", "a/b")
        );
        assert_eq!(entity.to_string(), "grp/name/a/b");
        assert_eq!(format!("{entity:?}"), "Entity(\"grp/name/a/b\")");
    }

    #[test]
    fn parts_round_trip_and_id_may_hold_slashes() {
        let entity = Entity::parse("g/n/a/b").expect("valid");
        assert_eq!(
            (entity.group(), entity.name(), entity.id()),
            ("g", "n", "a/b")
        );
        assert_eq!(entity, Entity::new("g", "n", "a/b").expect("valid"));
        assert_eq!(entity.as_str(), "g/n/a/b");
    }

    #[test]
    fn invalid_entities_name_the_field() {
        assert_eq!(
            Entity::new("", "n", "i"),
            Err(EntityError::Empty { field: "group" })
        );
        assert_eq!(
            Entity::new("g", "", "i"),
            Err(EntityError::Empty { field: "name" })
        );
        assert_eq!(
            Entity::new("g", "n", ""),
            Err(EntityError::Empty { field: "id" })
        );
        assert!(matches!(
            Entity::new("a/b", "n", "i"),
            Err(EntityError::Slash { field: "group", .. })
        ));
        assert!(matches!(
            Entity::new("g", "a/b", "i"),
            Err(EntityError::Slash { field: "name", .. })
        ));
        assert!(matches!(
            Entity::parse("g/n"),
            Err(EntityError::Malformed { .. })
        ));
        assert!(matches!(
            Entity::parse("g//i"),
            Err(EntityError::Empty { field: "name" })
        ));
        let long = "x".repeat(Entity::MAX_LEN);
        assert!(matches!(
            Entity::new("g", "n", &long),
            Err(EntityError::TooLong { .. })
        ));
    }

    #[test]
    fn order_is_byte_order_of_the_whole_string() {
        let a = Entity::parse("a/b/c").expect("valid");
        let b = Entity::parse("a/bb/c").expect("valid");
        let c = Entity::parse("a/b0/c").expect("valid");
        // '/' (0x2f) sorts before 'b' and '0'.
        assert!(a < b && a < c && c < b);
    }
}
