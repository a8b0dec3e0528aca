//! The edge between wire and domain: shapes, properties, bitmaps, packed digests and fingerprints.

use std::collections::BTreeMap;

use propd_merkle::{Algorithm, Digest, Entity, Property, Shape, TagValue};
use propd_proto::v1 as pb;

use crate::error::{PropertyError, ProtocolError, malformed};
use crate::store_api::LeafKey;

/// Hard bound on the entries of one page, whatever the sender's config says.
pub const MAX_PAGE_ITEMS: usize = 65_536;

/// Width in bytes of a leaf fingerprint on the wire.
pub const FINGERPRINT_BYTES: usize = 8;

/// The fingerprint of a leaf: the first 8 bytes of its digest, read little-endian.
pub(crate) fn fingerprint(digest: &Digest) -> u64 {
    let mut bytes = [0u8; FINGERPRINT_BYTES];
    let src = digest.as_bytes();
    let n = src.len().min(FINGERPRINT_BYTES);
    bytes[..n].copy_from_slice(&src[..n]);
    u64::from_le_bytes(bytes)
}

/// The highest protocol version this crate speaks (docs/protocol.md, "Versions").
pub const PROTOCOL_VERSION: u32 = 3;

/// The first version with the bulk path and range cursors on leaf lists.
pub(crate) const BULK_VERSION: u32 = 2;

/// The first version with the alternating descent (`TreeStep`, slots in `TreeRoot`).
pub(crate) const STEP_VERSION: u32 = 3;

/// A peer whose highest protocol version is below this node's minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VersionRefused {
    /// The peer's highest version.
    pub(crate) peer: u32,
    /// This node's lowest and highest versions.
    pub(crate) min: u32,
    pub(crate) max: u32,
}

impl From<VersionRefused> for crate::error::SyncError {
    fn from(refused: VersionRefused) -> Self {
        crate::error::SyncError::UnsupportedVersion {
            peer: refused.peer,
            min: refused.min,
            max: refused.max,
        }
    }
}

/// The version of a sync with a peer that sent `sent` as its version (0, from a peer that
/// predates the field, means 1): the lower of the peer's and ours, refused below our minimum.
/// Both sides decide the same way (docs/protocol.md, "Versions").
pub(crate) fn negotiate(sent: u32, config: &crate::Config) -> Result<u32, VersionRefused> {
    let peer = sent.max(1);
    let version = peer.min(config.protocol_version);
    if version < config.min_protocol_version {
        return Err(VersionRefused {
            peer,
            min: config.min_protocol_version,
            max: config.protocol_version,
        });
    }
    Ok(version)
}

/// The wire form of a leaf key: the bucket as 8 bytes little-endian, then the entity's bytes.
pub(crate) fn leaf_key_to_bytes(key: &LeafKey) -> Vec<u8> {
    let entity = key.entity.as_bytes();
    let mut bytes = Vec::with_capacity(8 + entity.len());
    bytes.extend_from_slice(&key.bucket.to_le_bytes());
    bytes.extend_from_slice(entity);
    bytes
}

/// Reads a leaf key; an empty field is `None` (the start or the end of a node).
pub(crate) fn leaf_key_from_bytes(
    field: &'static str,
    bytes: &[u8],
) -> Result<Option<LeafKey>, ProtocolError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() < 8 {
        return Err(malformed(
            field,
            format!("{} bytes, a leaf key has at least 9", bytes.len()),
        ));
    }
    let (bucket, entity) = bytes.split_at(8);
    let mut word = [0u8; 8];
    word.copy_from_slice(bucket);
    let entity = Entity::from_bytes(entity).map_err(|err| malformed(field, err.to_string()))?;
    Ok(Some(LeafKey {
        bucket: u64::from_le_bytes(word),
        entity,
    }))
}

/// Splits a packed fingerprint field into fingerprints.
pub(crate) fn fingerprints(field: &'static str, bytes: &[u8]) -> Result<Vec<u64>, ProtocolError> {
    if !bytes.len().is_multiple_of(FINGERPRINT_BYTES) {
        return Err(malformed(
            field,
            format!("{} bytes is not a multiple of 8", bytes.len()),
        ));
    }
    let count = bytes.len() / FINGERPRINT_BYTES;
    if count > MAX_PAGE_ITEMS {
        return Err(ProtocolError::PageTooLarge {
            field,
            count,
            max: MAX_PAGE_ITEMS,
        });
    }
    Ok(bytes
        .chunks_exact(FINGERPRINT_BYTES)
        .map(|chunk| {
            let mut word = [0u8; FINGERPRINT_BYTES];
            word.copy_from_slice(chunk);
            u64::from_le_bytes(word)
        })
        .collect())
}

/// Bytes of a bitmap of `n` bits.
pub(crate) fn bitmap_len(n: usize) -> usize {
    n.div_ceil(8)
}

pub(crate) fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap[i / 8] >> (i % 8) & 1 == 1
}

pub(crate) fn set_bit(bitmap: &mut [u8], i: usize) {
    bitmap[i / 8] |= 1 << (i % 8);
}

/// Rejects bits at or beyond `n` (the unused high bits of the last byte must be zero).
pub(crate) fn check_bitmap(
    field: &'static str,
    bitmap: &[u8],
    n: usize,
) -> Result<(), ProtocolError> {
    if let Some(last) = bitmap.last()
        && !n.is_multiple_of(8)
        && last >> (n % 8) != 0
    {
        return Err(malformed(
            field,
            format!("bits set beyond the {n} children"),
        ));
    }
    Ok(())
}

/// A cursor over a packed bytes field.
pub(crate) struct Reader<'a> {
    field: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(field: &'static str, bytes: &'a [u8]) -> Self {
        Reader { field, bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < n {
            return Err(malformed(
                self.field,
                format!("ends {} bytes early", n - self.bytes.len()),
            ));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if !self.bytes.is_empty() {
            return Err(malformed(
                self.field,
                format!("{} trailing bytes", self.bytes.len()),
            ));
        }
        Ok(())
    }
}

/// The wire form of a shape.
pub fn shape_to_proto(shape: &Shape) -> pb::TreeShape {
    let algorithm = match shape.algorithm {
        Algorithm::Sha512 => pb::HashAlgorithm::Sha512,
        Algorithm::Blake3 => pb::HashAlgorithm::Blake3,
    };
    pb::TreeShape {
        algorithm: algorithm as i32,
        slot_count: shape.slot_count,
        fanout: shape.fanout,
        depth: shape.depth,
        digest_width: shape.digest_width,
        format_version: shape.format_version,
    }
}

/// The shape of a wire `TreeShape`, validated.
pub fn shape_from_proto(shape: &pb::TreeShape) -> Result<Shape, ProtocolError> {
    let algorithm = match pb::HashAlgorithm::try_from(shape.algorithm) {
        Ok(pb::HashAlgorithm::Sha512) => Algorithm::Sha512,
        Ok(pb::HashAlgorithm::Blake3) => Algorithm::Blake3,
        _ => {
            return Err(malformed(
                "shape.algorithm",
                format!("unknown algorithm {}", shape.algorithm),
            ));
        }
    };
    let shape = Shape {
        algorithm,
        slot_count: shape.slot_count,
        fanout: shape.fanout,
        depth: shape.depth,
        digest_width: shape.digest_width,
        format_version: shape.format_version,
    };
    shape
        .validate()
        .map_err(|err| malformed("shape", err.to_string()))?;
    Ok(shape)
}

/// The wire form of a property (tags in key order, as the canonical encoding).
pub fn property_to_proto(property: &Property) -> pb::Property {
    pb::Property {
        group: property.group.clone(),
        name: property.name.clone(),
        id: property.id.clone(),
        tags: property
            .tags
            .iter()
            .map(|(key, value)| pb::Tag {
                key: key.clone(),
                value: Some(pb::TagValue {
                    value: Some(match value {
                        TagValue::Str(s) => pb::tag_value::Value::Str(s.clone()),
                        TagValue::Int(i) => pb::tag_value::Value::Int(*i),
                        TagValue::Binary(b) => pb::tag_value::Value::Binary(b.clone()),
                    }),
                }),
            })
            .collect(),
        mod_revision: property.mod_revision,
        delete_time: property.delete_time,
    }
}

/// The domain property of a wire property, with its validated entity. Rejects an invalid
/// entity, a tag without a value, a repeated tag key and a negative deletion time, as a
/// [`ProtocolError::Property`] naming the entity as received and the [`PropertyError`].
pub fn property_from_proto(property: pb::Property) -> Result<(Entity, Property), ProtocolError> {
    let label = format!("{}/{}/{}", property.group, property.name, property.id);
    convert_property(property).map_err(|reason| ProtocolError::Property {
        entity: label,
        reason,
    })
}

fn convert_property(property: pb::Property) -> Result<(Entity, Property), PropertyError> {
    let entity = Entity::new(&property.group, &property.name, &property.id)?;
    let mut tags = BTreeMap::new();
    for tag in property.tags {
        let value = match tag.value.and_then(|v| v.value) {
            Some(pb::tag_value::Value::Str(s)) => TagValue::Str(s),
            Some(pb::tag_value::Value::Int(i)) => TagValue::Int(i),
            Some(pb::tag_value::Value::Binary(b)) => TagValue::Binary(b),
            None => return Err(PropertyError::TagWithoutValue { key: tag.key }),
        };
        if tags.contains_key(&tag.key) {
            return Err(PropertyError::RepeatedTag { key: tag.key });
        }
        tags.insert(tag.key, value);
    }
    if property.delete_time < 0 {
        return Err(PropertyError::NegativeDeleteTime {
            delete_time: property.delete_time,
        });
    }
    let domain = Property {
        group: property.group,
        name: property.name,
        id: property.id,
        tags,
        mod_revision: property.mod_revision,
        delete_time: property.delete_time,
    };
    Ok((entity, domain))
}

/// The name of a client message kind, for errors and logs.
pub(crate) fn request_kind(msg: &pb::RepairRequest) -> &'static str {
    use pb::repair_request::Msg;
    match &msg.msg {
        Some(Msg::TreeRoot(_)) => "TreeRoot",
        Some(Msg::LevelDigests(_)) => "LevelDigests",
        Some(Msg::PropertyMissing(_)) => "PropertyMissing",
        Some(Msg::PropertySync(_)) => "PropertySync",
        Some(Msg::NoMorePropertySync(_)) => "NoMorePropertySync",
        Some(Msg::TreeStep(_)) => "TreeStep",
        None => "empty RepairRequest",
    }
}

/// The name of a server message kind, for errors and logs.
pub(crate) fn response_kind(msg: &pb::RepairResponse) -> &'static str {
    use pb::repair_response::Msg;
    match &msg.msg {
        Some(Msg::RootCompare(_)) => "RootCompare",
        Some(Msg::LevelDiff(_)) => "LevelDiff",
        Some(Msg::DifferTreeSummary(_)) => "DifferTreeSummary",
        Some(Msg::PropertySync(_)) => "PropertySync",
        Some(Msg::BulkSync(_)) => "BulkSync",
        Some(Msg::SyncEnd(_)) => "SyncEnd",
        Some(Msg::TreeStep(_)) => "TreeStep",
        None => "empty RepairResponse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_are_lsb_first_and_reject_stray_bits() {
        let mut map = vec![0u8; bitmap_len(10)];
        set_bit(&mut map, 0);
        set_bit(&mut map, 9);
        assert_eq!(map, vec![0b0000_0001, 0b0000_0010]);
        assert!(bit(&map, 9) && !bit(&map, 8));
        check_bitmap("x", &map, 10).expect("bits within range");
        assert!(check_bitmap("x", &[0, 0b0000_0100], 10).is_err());
    }

    #[test]
    fn fingerprints_round_trip_and_reject_ragged_input() {
        let digest = Digest::from_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).expect("digest");
        let fp = fingerprint(&digest);
        assert_eq!(
            fingerprints("f", &fp.to_le_bytes()).expect("whole"),
            vec![fp]
        );
        assert!(fingerprints("f", &[0; 9]).is_err());
    }

    #[test]
    fn shapes_of_either_algorithm_round_trip_and_unknown_ones_are_refused() {
        for algorithm in [Algorithm::Sha512, Algorithm::Blake3] {
            let shape = Shape {
                algorithm,
                slot_count: 8,
                fanout: 4,
                depth: 2,
                digest_width: 12,
                ..Shape::default()
            };
            assert_eq!(
                shape_from_proto(&shape_to_proto(&shape)).expect("valid"),
                shape
            );
        }
        let mut unknown = shape_to_proto(&Shape::default());
        unknown.algorithm = 99;
        let refused = shape_from_proto(&unknown).expect_err("unknown algorithm");
        assert!(refused.to_string().contains("shape.algorithm"), "{refused}");
        let mut invalid = shape_to_proto(&Shape::default());
        invalid.fanout = 1;
        assert!(shape_from_proto(&invalid).is_err());
    }

    #[test]
    fn a_fingerprint_field_holds_at_most_a_page_of_fingerprints() {
        let full = vec![0u8; MAX_PAGE_ITEMS * FINGERPRINT_BYTES];
        assert_eq!(
            fingerprints("f", &full).expect("a page").len(),
            MAX_PAGE_ITEMS
        );
        let over = vec![0u8; (MAX_PAGE_ITEMS + 1) * FINGERPRINT_BYTES];
        let refused = fingerprints("f", &over);
        assert!(
            matches!(
                refused,
                Err(ProtocolError::PageTooLarge { field: "f", count, max })
                    if count == MAX_PAGE_ITEMS + 1 && max == MAX_PAGE_ITEMS
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn leaf_keys_round_trip_and_short_ones_are_refused_by_field() {
        let key = LeafKey {
            bucket: 0x0102_0304_0506_0708,
            entity: Entity::new("g", "n", "id").expect("entity"),
        };
        let bytes = leaf_key_to_bytes(&key);
        assert_eq!(leaf_key_from_bytes("k", &bytes).expect("a key"), Some(key));
        assert_eq!(leaf_key_from_bytes("k", &[]).expect("none"), None);
        for len in [1, 7] {
            let refused = leaf_key_from_bytes("k", &bytes[..len]).expect_err("too short");
            assert!(refused.to_string().contains("at least 9"), "{refused}");
        }
        // A bucket without an entity is refused by the entity's decoder.
        assert!(leaf_key_from_bytes("k", &bytes[..8]).is_err());
    }

    #[test]
    fn properties_round_trip_and_bad_ones_are_named() {
        let mut property = Property {
            group: "g".into(),
            name: "n".into(),
            id: "a/b".into(),
            mod_revision: 5,
            ..Property::default()
        };
        property.tags.insert("k".into(), TagValue::Int(3));
        let (entity, back) = property_from_proto(property_to_proto(&property)).expect("valid");
        assert_eq!((entity.as_str(), &back), ("g/n/a/b", &property));
        let mut wire = property_to_proto(&property);
        wire.group = "g/x".into();
        assert!(matches!(
            property_from_proto(wire),
            Err(ProtocolError::Property {
                reason: PropertyError::Entity(_),
                ..
            })
        ));
        let mut wire = property_to_proto(&property);
        wire.tags.push(wire.tags[0].clone());
        assert_eq!(
            property_from_proto(wire).unwrap_err(),
            ProtocolError::Property {
                entity: "g/n/a/b".into(),
                reason: PropertyError::RepeatedTag { key: "k".into() },
            }
        );
        let mut wire = property_to_proto(&property);
        wire.tags[0].value = None;
        let err = property_from_proto(wire).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"property "g/n/a/b" rejected: tag "k" has no value"#
        );
        let mut wire = property_to_proto(&property);
        wire.delete_time = -1;
        assert!(matches!(
            property_from_proto(wire),
            Err(ProtocolError::Property {
                reason: PropertyError::NegativeDeleteTime { delete_time: -1 },
                ..
            })
        ));
    }
}
