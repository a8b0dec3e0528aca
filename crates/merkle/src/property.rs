//! The property document and its canonical bytes (the deterministic protobuf encoding).

use std::collections::BTreeMap;

use crate::digest::Digest;
use crate::entity::{Entity, EntityError};
use crate::shape::Shape;

/// One tag value.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TagValue {
    /// A string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// Raw bytes.
    Binary(Vec<u8>),
}

/// A property: a small document identified by the entity `group/name/id`, with a version
/// (`mod_revision`) and a tombstone marker (`delete_time` > 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Property {
    /// The group (no `/`).
    pub group: String,
    /// The name (no `/`).
    pub name: String,
    /// The id (may hold `/`).
    pub id: String,
    /// The tags, unique by key and kept sorted by key bytes.
    pub tags: BTreeMap<String, TagValue>,
    /// The version: larger wins (DESIGN §3).
    pub mod_revision: i64,
    /// 0 for a live property, > 0 for a tombstone.
    pub delete_time: i64,
}

impl Property {
    /// The validated entity `group/name/id`.
    pub fn entity(&self) -> Result<Entity, EntityError> {
        Entity::new(&self.group, &self.name, &self.id)
    }

    /// Whether this copy is a tombstone (`delete_time > 0`).
    pub fn is_tombstone(&self) -> bool {
        self.delete_time > 0
    }

    /// The canonical bytes: the deterministic protobuf encoding of `propd.v1.Property` — fields in
    /// number order, proto3 defaults omitted, tags sorted by key, each tag's value always encoded.
    /// Byte-identical to what prost produces for the same message.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.canonical_len());
        self.write_canonical(&mut out);
        out
    }

    /// Appends the canonical bytes to `out` (lets callers reuse one buffer).
    pub fn write_canonical(&self, out: &mut Vec<u8>) {
        put_string(out, 1, &self.group);
        put_string(out, 2, &self.name);
        put_string(out, 3, &self.id);
        for (key, value) in &self.tags {
            put_key(out, 4, WIRE_LEN);
            put_varint(out, tag_len(key, value) as u64);
            put_string(out, 1, key);
            put_key(out, 2, WIRE_LEN);
            put_varint(out, tag_value_len(value) as u64);
            match value {
                // A oneof member is encoded even when it holds the default value.
                TagValue::Str(s) => put_bytes_always(out, 1, s.as_bytes()),
                TagValue::Int(i) => {
                    put_key(out, 2, WIRE_VARINT);
                    put_varint(out, *i as u64);
                }
                TagValue::Binary(b) => put_bytes_always(out, 3, b),
            }
        }
        if self.mod_revision != 0 {
            put_key(out, 5, WIRE_VARINT);
            put_varint(out, self.mod_revision as u64);
        }
        if self.delete_time != 0 {
            put_key(out, 6, WIRE_VARINT);
            put_varint(out, self.delete_time as u64);
        }
    }

    /// The length of the canonical bytes.
    pub fn canonical_len(&self) -> usize {
        let mut len = string_len(&self.group) + string_len(&self.name) + string_len(&self.id);
        for (key, value) in &self.tags {
            len += len_field_len(tag_len(key, value));
        }
        if self.mod_revision != 0 {
            len += 1 + varint_len(self.mod_revision as u64);
        }
        if self.delete_time != 0 {
            len += 1 + varint_len(self.delete_time as u64);
        }
        len
    }

    /// The leaf digest: `H(canonical bytes)` cut to the shape's digest width.
    pub fn leaf_digest(&self, shape: &Shape) -> Digest {
        let mut buf = Vec::with_capacity(self.canonical_len());
        self.leaf_digest_with(shape, &mut buf)
    }

    /// The leaf digest, using `buf` as scratch space (cleared first) to avoid an allocation.
    pub fn leaf_digest_with(&self, shape: &Shape, buf: &mut Vec<u8>) -> Digest {
        buf.clear();
        self.write_canonical(buf);
        shape.digest(buf)
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_LEN: u8 = 2;

fn put_key(out: &mut Vec<u8>, field: u8, wire: u8) {
    // Every field number here is below 16, so the key is one byte.
    out.push(field << 3 | wire);
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint_len(value: u64) -> usize {
    // One byte per started group of 7 bits; 0 takes one byte.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_string(out: &mut Vec<u8>, field: u8, value: &str) {
    if !value.is_empty() {
        put_bytes_always(out, field, value.as_bytes());
    }
}

fn put_bytes_always(out: &mut Vec<u8>, field: u8, value: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

fn len_field_len(payload: usize) -> usize {
    1 + varint_len(payload as u64) + payload
}

fn string_len(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        len_field_len(value.len())
    }
}

fn tag_value_len(value: &TagValue) -> usize {
    match value {
        TagValue::Str(s) => len_field_len(s.len()),
        TagValue::Int(i) => 1 + varint_len(*i as u64),
        TagValue::Binary(b) => len_field_len(b.len()),
    }
}

fn tag_len(key: &str, value: &TagValue) -> usize {
    string_len(key) + len_field_len(tag_value_len(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Property {
        let mut tags = BTreeMap::new();
        tags.insert("b".to_owned(), TagValue::Int(-1));
        tags.insert("a".to_owned(), TagValue::Str(String::new()));
        tags.insert("c".to_owned(), TagValue::Binary(vec![0xff]));
        Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            tags,
            mod_revision: 300,
            delete_time: 0,
        }
    }

    /// The length a property announces is the length of its canonical bytes, tombstones and
    /// long varints included.
    #[test]
    fn canonical_len_is_the_length_of_the_canonical_bytes() {
        let mut cases = vec![sample()];
        for (mod_revision, delete_time) in [(1, 1), (300, 1_700_000_000_000_000_000), (-1, 5)] {
            cases.push(Property {
                tags: BTreeMap::new(),
                mod_revision,
                delete_time,
                ..sample()
            });
        }
        cases.push(Property {
            mod_revision: 0,
            ..sample()
        });
        for property in cases {
            assert_eq!(
                property.canonical_len(),
                property.canonical_bytes().len(),
                "{property:?}"
            );
        }
    }

    #[test]
    fn canonical_bytes_match_a_hand_encoded_message() {
        let expected: Vec<u8> = [
            &[0x0a, 1, b'g', 0x12, 1, b'n', 0x1a, 1, b'i'][..],
            // tag "a": Str("") still encodes its oneof member.
            &[0x22, 7, 0x0a, 1, b'a', 0x12, 2, 0x0a, 0],
            // tag "b": Int(-1) is a ten-byte varint.
            &[0x22, 16, 0x0a, 1, b'b', 0x12, 11, 0x10],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            &[0x22, 8, 0x0a, 1, b'c', 0x12, 3, 0x1a, 1, 0xff],
            // mod_revision 300; delete_time 0 is omitted.
            &[0x28, 0xac, 0x02],
        ]
        .concat();
        let property = sample();
        assert_eq!(property.canonical_bytes(), expected);
        assert_eq!(property.canonical_len(), expected.len());
    }

    #[test]
    fn tombstone_and_digest_depend_on_every_field() {
        let shape = Shape::default();
        let live = sample();
        let mut dead = live.clone();
        dead.delete_time = 5;
        assert!(dead.is_tombstone() && !live.is_tombstone());
        assert_ne!(live.leaf_digest(&shape), dead.leaf_digest(&shape));
        let mut retagged = live.clone();
        retagged.tags.insert("a".into(), TagValue::Str("x".into()));
        assert_ne!(live.leaf_digest(&shape), retagged.leaf_digest(&shape));
        assert_eq!(live.entity().expect("valid").as_str(), "g/n/i");
    }

    #[test]
    fn varint_lengths() {
        for (value, len) in [
            (0u64, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::MAX, 10),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!((out.len(), varint_len(value)), (len, len), "value {value}");
        }
    }
}
