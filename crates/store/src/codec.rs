//! Byte encodings of the store's redb values (explicit little-endian; docs/formats.md).

use std::collections::BTreeMap;

use propd_merkle::{Digest, Entity, InnerNode, Property, TagValue};

/// The version byte that starts every property record.
pub(crate) const RECORD_VERSION: u8 = 1;

const KIND_STR: u8 = 0;
const KIND_INT: u8 = 1;
const KIND_BINARY: u8 = 2;

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub(crate) String);

/// Encodes the value of a property row: everything but the entity, which is the key.
///
/// Layout: `u8 version (1)`, `i64 mod_revision`, `i64 delete_time`, `u32 tag count`, then per tag
/// in key order: `u32 key length`, key bytes, `u8 kind` (0 str, 1 int, 2 binary), and for str
/// and binary `u32 length` + bytes, for int an `i64`.
pub(crate) fn encode_property(property: &Property) -> Vec<u8> {
    let mut out = Vec::with_capacity(21 + property.tags.len() * 16);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&property.mod_revision.to_le_bytes());
    out.extend_from_slice(&property.delete_time.to_le_bytes());
    out.extend_from_slice(&(property.tags.len() as u32).to_le_bytes());
    for (key, value) in &property.tags {
        put_bytes(&mut out, key.as_bytes());
        match value {
            TagValue::Str(text) => {
                out.push(KIND_STR);
                put_bytes(&mut out, text.as_bytes());
            }
            TagValue::Int(number) => {
                out.push(KIND_INT);
                out.extend_from_slice(&number.to_le_bytes());
            }
            TagValue::Binary(bytes) => {
                out.push(KIND_BINARY);
                put_bytes(&mut out, bytes);
            }
        }
    }
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Decodes a property row stored under `entity`.
pub(crate) fn decode_property(entity: &Entity, bytes: &[u8]) -> Result<Property, DecodeError> {
    let mut reader = Reader { bytes, at: 0 };
    let version = reader.u8()?;
    if version != RECORD_VERSION {
        return Err(DecodeError(format!(
            "{entity}: unknown record version {version}"
        )));
    }
    let mod_revision = reader.i64()?;
    let delete_time = reader.i64()?;
    let count = reader.u32()?;
    let mut tags = BTreeMap::new();
    for _ in 0..count {
        let key = reader.string()?;
        let value = match reader.u8()? {
            KIND_STR => TagValue::Str(reader.string()?),
            KIND_INT => TagValue::Int(reader.i64()?),
            KIND_BINARY => TagValue::Binary(reader.bytes()?.to_vec()),
            kind => {
                return Err(DecodeError(format!(
                    "{entity}: unknown tag kind {kind} for tag {key:?}"
                )));
            }
        };
        if tags.insert(key.clone(), value).is_some() {
            return Err(DecodeError(format!("{entity}: tag {key:?} appears twice")));
        }
    }
    if reader.at != bytes.len() {
        return Err(DecodeError(format!(
            "{entity}: {} trailing bytes",
            bytes.len() - reader.at
        )));
    }
    Ok(Property {
        group: entity.group().to_owned(),
        name: entity.name().to_owned(),
        id: entity.id().to_owned(),
        tags,
        mod_revision,
        delete_time,
    })
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
}

impl ShardMeta {
    /// Layout: `u64 revision`, `u64 verified_revision`, `i64 last_complete_repair`.
    pub(crate) fn encode(&self) -> [u8; 24] {
        let mut out = [0; 24];
        out[..8].copy_from_slice(&self.revision.to_le_bytes());
        out[8..16].copy_from_slice(&self.verified_revision.to_le_bytes());
        out[16..].copy_from_slice(&self.last_complete_repair.to_le_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader { bytes, at: 0 };
        let meta = ShardMeta {
            revision: reader.u64()?,
            verified_revision: reader.u64()?,
            last_complete_repair: reader.i64()?,
        };
        if reader.at != bytes.len() {
            return Err(DecodeError(format!(
                "shard meta of {} bytes, expected 24",
                bytes.len()
            )));
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

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError(format!("string at byte {} is not UTF-8", self.at)))
    }
}
