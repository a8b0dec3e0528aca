//! Byte encodings of the store's redb values (explicit little-endian; docs/formats.md).

use propd_merkle::{Digest, Entity, InnerNode, Property, TagValue};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) String);

const WIRE_VARINT: u64 = 0;
const WIRE_LEN: u64 = 2;

/// Decodes a property row stored under `entity`. The row's value is the property's canonical
/// bytes (the deterministic protobuf encoding of `propd.v1.Property`, as
/// `Property::canonical_bytes` writes it), so a rebuild hashes stored rows without decoding them.
///
/// The decoder is strict: fields in number order, known fields and wire types only, group, name
/// and id equal to the key's, tags unique and in key order, every tag value set once.
pub(crate) fn decode_property(entity: &Entity, bytes: &[u8]) -> Result<Property, DecodeError> {
    let fail = |what: String| DecodeError(format!("{entity}: {what}"));
    let mut reader = Reader { bytes, at: 0 };
    let mut property = Property::default();
    let mut last_field = 0;
    while !reader.done() {
        let key = reader.varint().map_err(|e| fail(e.0))?;
        let (field, wire) = (key >> 3, key & 7);
        // Only the tags (field 4) repeat; every field comes in number order.
        if field < last_field || (field == last_field && field != 4) {
            return Err(fail(format!("field {field} out of order or repeated")));
        }
        last_field = field;
        match (field, wire) {
            (1..=3, WIRE_LEN) => {
                let text = reader.string().map_err(|e| fail(e.0))?;
                match field {
                    1 => property.group = text,
                    2 => property.name = text,
                    _ => property.id = text,
                }
            }
            (4, WIRE_LEN) => {
                let body = reader.len_bytes().map_err(|e| fail(e.0))?;
                let (key, value) = decode_tag(body).map_err(|e| fail(e.0))?;
                if property
                    .tags
                    .last_key_value()
                    .is_some_and(|(last, _)| *last >= key)
                {
                    return Err(fail(format!("tag {key:?} out of order or repeated")));
                }
                property.tags.insert(key, value);
            }
            (5, WIRE_VARINT) => {
                property.mod_revision = reader.varint().map_err(|e| fail(e.0))? as i64
            }
            (6, WIRE_VARINT) => {
                property.delete_time = reader.varint().map_err(|e| fail(e.0))? as i64
            }
            _ => {
                return Err(fail(format!(
                    "unexpected field {field} with wire type {wire}"
                )));
            }
        }
    }
    if property.group != entity.group()
        || property.name != entity.name()
        || property.id != entity.id()
    {
        return Err(fail(format!(
            "record names {}/{}/{}",
            property.group, property.name, property.id
        )));
    }
    Ok(property)
}

fn decode_tag(bytes: &[u8]) -> Result<(String, TagValue), DecodeError> {
    let mut reader = Reader { bytes, at: 0 };
    let mut key = String::new();
    let mut value = None;
    let mut last_field = 0;
    while !reader.done() {
        let header = reader.varint()?;
        let (field, wire) = (header >> 3, header & 7);
        if field <= last_field {
            return Err(DecodeError(format!("tag field {field} out of order")));
        }
        last_field = field;
        match (field, wire) {
            (1, WIRE_LEN) => key = reader.string()?,
            (2, WIRE_LEN) => value = Some(decode_tag_value(reader.len_bytes()?)?),
            _ => {
                return Err(DecodeError(format!(
                    "unexpected tag field {field} with wire type {wire}"
                )));
            }
        }
    }
    let value = value.ok_or_else(|| DecodeError(format!("tag {key:?} has no value")))?;
    Ok((key, value))
}

fn decode_tag_value(bytes: &[u8]) -> Result<TagValue, DecodeError> {
    let mut reader = Reader { bytes, at: 0 };
    let header = reader.varint()?;
    let value = match (header >> 3, header & 7) {
        (1, WIRE_LEN) => TagValue::Str(reader.string()?),
        (2, WIRE_VARINT) => TagValue::Int(reader.varint()? as i64),
        (3, WIRE_LEN) => TagValue::Binary(reader.len_bytes()?.to_vec()),
        (field, wire) => {
            return Err(DecodeError(format!(
                "unexpected tag value field {field} with wire type {wire}"
            )));
        }
    };
    if !reader.done() {
        return Err(DecodeError(
            "a tag value holds more than one member".to_owned(),
        ));
    }
    Ok(value)
}

/// The length of the check digest that starts every property row.
pub(crate) const ROW_CHECK_LEN: usize = 8;

/// The check digest of a property row: xxh3-64 of the canonical bytes, seeded with xxh3-64 of
/// the row's key, so that a changed byte in the value or a row filed under another key fails it.
/// A fast hash rather than the tree's leaf digest: it is recomputed on every read (see
/// docs/benchmarks.md, "Integrity checks on reads").
pub(crate) fn row_check(key: &str, canonical: &[u8]) -> u64 {
    xxh3_64_with_seed(canonical, xxh3_64(key.as_bytes()))
}

/// Encodes a property row: the `u64` LE check digest of [`row_check`], then the canonical bytes.
pub(crate) fn encode_row(key: &str, canonical: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ROW_CHECK_LEN + canonical.len());
    out.extend_from_slice(&row_check(key, canonical).to_le_bytes());
    out.extend_from_slice(canonical);
    out
}

/// The canonical bytes of a stored property row, when its check digest matches its key and
/// bytes; why not otherwise.
pub(crate) fn open_row<'a>(key: &str, row: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    let Some((check, canonical)) = row.split_first_chunk::<ROW_CHECK_LEN>() else {
        return Err(DecodeError(format!(
            "row of {} bytes is shorter than its {ROW_CHECK_LEN}-byte check digest",
            row.len()
        )));
    };
    let stored = u64::from_le_bytes(*check);
    let computed = row_check(key, canonical);
    if stored != computed {
        return Err(DecodeError(format!(
            "check digest mismatch: stored {stored:016x}, computed {computed:016x} over {} bytes",
            canonical.len()
        )));
    }
    Ok(canonical)
}

/// Encodes a quarantined row: `u16` LE length of the reason, the reason (UTF-8), then the row's
/// bytes exactly as they were found.
pub(crate) fn encode_quarantined(reason: &str, row: &[u8]) -> Vec<u8> {
    let reason = &reason.as_bytes()[..reason.len().min(usize::from(u16::MAX))];
    let mut out = Vec::with_capacity(2 + reason.len() + row.len());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason);
    out.extend_from_slice(row);
    out
}

/// Decodes a quarantined row written by [`encode_quarantined`]: the reason and the row's bytes.
pub(crate) fn decode_quarantined(bytes: &[u8]) -> Result<(String, Vec<u8>), DecodeError> {
    let mut reader = Reader { bytes, at: 0 };
    let len = u16::from_le_bytes(reader.array()?);
    let reason = String::from_utf8_lossy(reader.take(usize::from(len))?).into_owned();
    Ok((reason, bytes[reader.at..].to_vec()))
}

/// One entry of a shard's leaf log: a leaf change written with its property and applied to the
/// leaf table at the next flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogEntry {
    pub(crate) entity: Entity,
    /// The new leaf digest; `None` when the leaf was removed.
    pub(crate) digest: Option<Digest>,
}

/// Encodes a log entry: `u8 digest length` (0 = removed), the digest bytes, the entity bytes.
pub(crate) fn encode_log(entity: &Entity, digest: Option<&Digest>) -> Vec<u8> {
    let digest = digest.map_or(&[][..], Digest::as_bytes);
    let mut out = Vec::with_capacity(1 + digest.len() + entity.as_str().len());
    out.push(digest.len() as u8);
    out.extend_from_slice(digest);
    out.extend_from_slice(entity.as_bytes());
    out
}

/// Decodes a log entry written by [`encode_log`].
pub(crate) fn decode_log(bytes: &[u8]) -> Result<LogEntry, DecodeError> {
    let mut reader = Reader { bytes, at: 0 };
    let width = reader.u8()? as usize;
    let digest = match width {
        0 => None,
        width => Some(decode_digest(reader.take(width)?)?),
    };
    let entity = Entity::from_bytes(&bytes[reader.at..])
        .map_err(|error| DecodeError(format!("log entry entity: {error}")))?;
    Ok(LogEntry { entity, digest })
}

/// Encodes an inner node: `u64 leaf_count`, then the digest bytes.
pub(crate) fn encode_inner(node: &InnerNode) -> Vec<u8> {
    let digest = node.digest.as_bytes();
    let mut out = Vec::with_capacity(8 + digest.len());
    out.extend_from_slice(&node.leaf_count.to_le_bytes());
    out.extend_from_slice(digest);
    out
}

/// Decodes an inner node written by [`encode_inner`].
pub(crate) fn decode_inner(bytes: &[u8]) -> Result<InnerNode, DecodeError> {
    let Some((count, digest)) = bytes.split_first_chunk::<8>() else {
        return Err(DecodeError(format!(
            "inner node of {} bytes is shorter than 8",
            bytes.len()
        )));
    };
    Ok(InnerNode {
        digest: decode_digest(digest)?,
        leaf_count: u64::from_le_bytes(*count),
    })
}

/// Decodes a digest stored as its bytes.
pub(crate) fn decode_digest(bytes: &[u8]) -> Result<Digest, DecodeError> {
    Digest::from_slice(bytes).map_err(|error| DecodeError(format!("digest: {error}")))
}

/// The per-(group, shard) bookkeeping row of the `meta` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ShardMeta {
    /// Increases with every change of the shard: its snapshot id.
    pub(crate) revision: u64,
    /// The revision at the last verification that found the live tree correct (0: never; a shard
    /// at revision 0 is empty and needs no verification).
    pub(crate) verified_revision: u64,
    /// When the last repair round that reached every copy started (unix nanos; 0: never).
    pub(crate) last_complete_repair: i64,
    /// The largest purge cutoff a complete round gave this copy (unix nanos; 0: none).
    pub(crate) purge_cutoff: i64,
    /// The largest purge line this copy used: tombstones with a delete time below it are
    /// purged, never stored and never sent (0: none).
    pub(crate) purged_below: i64,
}

impl ShardMeta {
    /// The size of an encoded row.
    const LEN: usize = 40;
    /// The size of a row written before the purge cutoff and line were kept (both read as 0).
    const LEN_WITHOUT_PURGE: usize = 24;

    /// Layout: `u64 revision`, `u64 verified_revision`, `i64 last_complete_repair`,
    /// `i64 purge_cutoff`, `i64 purged_below`.
    pub(crate) fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[..8].copy_from_slice(&self.revision.to_le_bytes());
        out[8..16].copy_from_slice(&self.verified_revision.to_le_bytes());
        out[16..24].copy_from_slice(&self.last_complete_repair.to_le_bytes());
        out[24..32].copy_from_slice(&self.purge_cutoff.to_le_bytes());
        out[32..].copy_from_slice(&self.purged_below.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != Self::LEN && bytes.len() != Self::LEN_WITHOUT_PURGE {
            return Err(DecodeError(format!(
                "shard meta of {} bytes, expected {} or {}",
                bytes.len(),
                Self::LEN,
                Self::LEN_WITHOUT_PURGE
            )));
        }
        let mut reader = Reader { bytes, at: 0 };
        let mut meta = ShardMeta {
            revision: reader.u64()?,
            verified_revision: reader.u64()?,
            last_complete_repair: reader.i64()?,
            ..ShardMeta::default()
        };
        if bytes.len() == Self::LEN {
            meta.purge_cutoff = reader.i64()?;
            meta.purged_below = reader.i64()?;
        }
        Ok(meta)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "record ends at byte {} but {len} more bytes are needed at {}",
                    self.bytes.len(),
                    self.at
                ))
            })?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.u8()?;
            if shift == 63 && byte > 1 {
                return Err(DecodeError(format!("varint overflows at byte {}", self.at)));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError(format!(
            "varint longer than 10 bytes at byte {}",
            self.at
        )))
    }

    fn len_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(self.varint()?)
            .map_err(|_| DecodeError(format!("length too large at byte {}", self.at)))?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.len_bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError(format!("string at byte {} is not UTF-8", self.at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tag_value() -> impl Strategy<Value = TagValue> {
        prop_oneof![
            ".{0,8}".prop_map(TagValue::Str),
            any::<i64>().prop_map(TagValue::Int),
            prop::collection::vec(any::<u8>(), 0..8).prop_map(TagValue::Binary),
        ]
    }

    fn property() -> impl Strategy<Value = Property> {
        (
            "[a-z]{1,4}",
            "[a-z]{1,4}",
            "[a-z/]{1,6}",
            prop::collection::btree_map(".{0,4}", tag_value(), 0..4),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(group, name, id, tags, mod_revision, delete_time)| Property {
                    group,
                    name,
                    id,
                    tags,
                    mod_revision,
                    delete_time,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn canonical_bytes_decode_to_the_property(property in property()) {
            let entity = property.entity().unwrap_or_else(|e| panic!("{e}"));
            let decoded = decode_property(&entity, &property.canonical_bytes());
            prop_assert_eq!(decoded, Ok(property));
        }

        #[test]
        fn damaged_records_are_refused_or_decode_without_panic(
            property in property(),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let entity = property.entity().unwrap_or_else(|e| panic!("{e}"));
            let bytes = property.canonical_bytes();
            let truncated = &bytes[..cut.index(bytes.len().max(1)).min(bytes.len())];
            if truncated.len() < bytes.len() {
                // A strict prefix can decode only when it cut exactly at a field boundary of
                // the trailing optional fields; it must never equal the whole property.
                prop_assert_ne!(decode_property(&entity, truncated), Ok(property.clone()));
            }
            let mut flipped = bytes.clone();
            if !flipped.is_empty() {
                let at = flip.0.index(flipped.len());
                flipped[at] ^= flip.1 | 1;
                let _ = decode_property(&entity, &flipped);
            }
        }
    }

    #[test]
    fn a_row_opens_only_with_its_own_key_and_bytes() {
        let row = encode_row("g/n/i", b"canonical");
        assert_eq!(open_row("g/n/i", &row), Ok(&b"canonical"[..]));
        assert!(open_row("g/n/j", &row).is_err(), "filed under another key");
        for at in 0..row.len() {
            let mut flipped = row.clone();
            flipped[at] ^= 0x10;
            assert!(open_row("g/n/i", &flipped).is_err(), "byte {at} flipped");
        }
        assert!(open_row("g/n/i", &row[..7]).is_err());
        assert!(open_row("g/n/i", &row[..row.len() - 1]).is_err());
        let kept = encode_quarantined("why", &row);
        assert_eq!(decode_quarantined(&kept), Ok(("why".to_owned(), row)));
    }

    #[test]
    fn a_record_for_another_entity_is_refused() {
        let property = Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            mod_revision: 1,
            ..Property::default()
        };
        // Another group, name or id, each alone.
        for (group, name, id) in [("h", "n", "i"), ("g", "m", "i"), ("g", "n", "j")] {
            let other = Entity::new(group, name, id).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                decode_property(&other, &property.canonical_bytes()).is_err(),
                "{other}"
            );
        }
    }

    /// A varint is at most ten bytes, and its tenth holds only the top bit of a `u64`.
    #[test]
    fn varints_past_64_bits_are_refused() {
        let read = |bytes: &[u8]| Reader { bytes, at: 0 }.varint();
        let top = [[0xff; 9].as_slice(), &[0x01]].concat();
        assert_eq!(read(&top), Ok(u64::MAX));
        let zero_tenth = [[0x80; 9].as_slice(), &[0x00]].concat();
        assert_eq!(read(&zero_tenth), Ok(0), "padded, but within 64 bits");
        let over = [[0xff; 9].as_slice(), &[0x02]].concat();
        assert!(read(&over).is_err(), "a 65th bit");
        let long = [0x80; 11];
        assert!(read(&long).is_err(), "longer than ten bytes");
    }

    /// Fields come in number order, once each but for the tags: a record with two fields
    /// swapped or one repeated is refused, and one with two tags decodes.
    #[test]
    fn fields_out_of_order_or_repeated_are_refused() {
        let mut property = Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            mod_revision: 1,
            ..Property::default()
        };
        property.tags.insert("a".into(), TagValue::Int(1));
        property.tags.insert("b".into(), TagValue::Int(2));
        let entity = property.entity().unwrap_or_else(|e| panic!("{e}"));
        let bytes = property.canonical_bytes();
        assert_eq!(decode_property(&entity, &bytes), Ok(property.clone()));
        // Group, name and id are the first three fields, three bytes each (key, length, byte).
        assert_eq!(&bytes[..9], b"\x0a\x01g\x12\x01n\x1a\x01i");
        let swapped = [&bytes[3..6], &bytes[..3], &bytes[6..]].concat();
        let repeated = [&bytes[..3], &bytes[..3], &bytes[3..]].concat();
        for (what, bad) in [("swapped", swapped), ("repeated", repeated)] {
            let err = decode_property(&entity, &bad).expect_err(what);
            assert!(
                err.0.contains("out of order or repeated"),
                "{what}: {err:?}"
            );
        }
    }

    #[test]
    fn meta_and_inner_nodes_round_trip() {
        let meta = ShardMeta {
            revision: 7,
            verified_revision: 5,
            last_complete_repair: -1,
            purge_cutoff: 9,
            purged_below: -3,
        };
        assert_eq!(ShardMeta::decode(&meta.encode()), Ok(meta));
        assert!(ShardMeta::decode(&[0; 23]).is_err());
        assert!(ShardMeta::decode(&[0; 41]).is_err());
        let older = ShardMeta::decode(&meta.encode()[..24]);
        assert_eq!(
            older,
            Ok(ShardMeta {
                purge_cutoff: 0,
                purged_below: 0,
                ..meta
            }),
            "a row written before the purge fields reads them as 0"
        );
        let inner = InnerNode {
            digest: Digest::zero(16),
            leaf_count: 3,
        };
        assert_eq!(decode_inner(&encode_inner(&inner)), Ok(inner));
        assert!(decode_inner(&[1, 2, 3]).is_err());
        let entity = Entity::new("g", "n", "a/b").unwrap_or_else(|e| panic!("{e}"));
        let digest = Digest::zero(16);
        for digest in [Some(digest), None] {
            let entry = decode_log(&encode_log(&entity, digest.as_ref()));
            assert_eq!(
                entry,
                Ok(LogEntry {
                    entity: entity.clone(),
                    digest
                })
            );
        }
        assert!(decode_log(&[16, 1, 2]).is_err());
    }
}
