//! The tree's shape: algorithm, slot count, fanout, depth, digest width and format version, and
//! its byte encoding (the one the store records and the snapshot header carries).

use std::fmt;

use crate::digest::{Algorithm, Digest, MAX_DIGEST_WIDTH};

/// The only tree format version this crate implements (positions, digest layouts, snapshot).
pub const FORMAT_VERSION: u32 = 1;

/// Everything two trees must agree on to be compared. Both sides of a sync check their shapes
/// match and refuse when they do not.
///
/// The levels are: 0 the root, 1 the `slot_count` slots, then `depth` bucket levels of `fanout`
/// children per node. The deepest inner level, `depth + 1` ([`Shape::bucket_level`]), holds the
/// buckets under which the leaves hang; with `depth` 0 the slots are the buckets and the tree has
/// the reference's three levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// The hash function `H`.
    pub algorithm: Algorithm,
    /// Children of the root (1..=65536).
    pub slot_count: u32,
    /// Children of each slot and bucket-level node above the deepest level (2..=256).
    pub fanout: u32,
    /// Number of bucket levels below the slots (0..=8).
    pub depth: u32,
    /// Bytes kept of every digest (8..=64): a prefix of the full hash.
    pub digest_width: u32,
    /// The tree format version; must be [`FORMAT_VERSION`].
    pub format_version: u32,
}

impl Default for Shape {
    /// SHA-512, 32 slots, fanout 16, depth 3 (131 072 buckets: about 8 leaves per bucket at 1 M
    /// leaves), digests of 16 bytes.
    fn default() -> Self {
        Shape {
            algorithm: Algorithm::Sha512,
            slot_count: 32,
            fanout: 16,
            depth: 3,
            digest_width: 16,
            format_version: FORMAT_VERSION,
        }
    }
}

/// Why a shape is not valid. Each variant names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeError {
    /// A field is outside its bounds.
    #[error("shape field `{field}` = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The field name.
        field: &'static str,
        /// The rejected value.
        value: u64,
        /// The smallest accepted value.
        min: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// `slot_count * fanout^depth` exceeds 2^32 buckets.
    #[error(
        "shape has too many buckets: slot_count {slot_count} * fanout {fanout} ^ depth {depth} > 2^32"
    )]
    TooManyBuckets {
        /// The slot count.
        slot_count: u32,
        /// The fanout.
        fanout: u32,
        /// The depth.
        depth: u32,
    },
}

impl Shape {
    /// The reference's three levels: root, 32 slots, leaves; SHA-512 digests kept whole.
    pub fn reference() -> Self {
        Shape {
            depth: 0,
            digest_width: MAX_DIGEST_WIDTH as u32,
            ..Shape::default()
        }
    }

    /// Checks every bound; a tree is only ever built with a valid shape.
    pub fn validate(&self) -> Result<(), ShapeError> {
        check("slot_count", self.slot_count, 1, 65_536)?;
        check("fanout", self.fanout, 2, 256)?;
        check("depth", self.depth, 0, 8)?;
        check(
            "digest_width",
            self.digest_width,
            8,
            MAX_DIGEST_WIDTH as u32,
        )?;
        check(
            "format_version",
            self.format_version,
            FORMAT_VERSION,
            FORMAT_VERSION,
        )?;
        let too_many = || ShapeError::TooManyBuckets {
            slot_count: self.slot_count,
            fanout: self.fanout,
            depth: self.depth,
        };
        let buckets = (self.fanout as u64)
            .checked_pow(self.depth)
            .and_then(|per_slot| per_slot.checked_mul(self.slot_count as u64))
            .ok_or_else(too_many)?;
        if buckets > 1 << 32 {
            return Err(too_many());
        }
        Ok(())
    }

    /// The level of the buckets, the deepest inner level: `depth + 1`. Leaves hang under it.
    pub fn bucket_level(&self) -> u32 {
        self.depth + 1
    }

    /// The number of nodes at `level` (0 for a level below the buckets):
    /// 1, `slot_count`, `slot_count * fanout`, ...
    pub fn level_width(&self, level: u32) -> u64 {
        match level {
            0 => 1,
            l if l <= self.bucket_level() => {
                (self.slot_count as u64).saturating_mul((self.fanout as u64).saturating_pow(l - 1))
            }
            _ => 0,
        }
    }

    /// The number of buckets: `slot_count * fanout^depth`.
    pub fn bucket_count(&self) -> u64 {
        self.level_width(self.bucket_level())
    }

    /// The digest width in bytes.
    pub fn width(&self) -> usize {
        self.digest_width as usize
    }

    /// The digest of an empty subtree (of any level, including the root of an empty tree):
    /// `digest_width` zero bytes.
    pub fn empty_digest(&self) -> Digest {
        Digest::zero(self.width())
    }

    /// The leaf digest of some canonical bytes: `H(bytes)` cut to the digest width.
    pub fn digest(&self, bytes: &[u8]) -> Digest {
        self.algorithm.hash(bytes, self.width())
    }
}

/// Where a shape's bytes go, and so how many reserved zero bytes follow the algorithm code.
///
/// Both layouts are the `u8` algorithm code ([`Algorithm::code`]), the reserved bytes, then the
/// five `u32` fields in little-endian: `slot_count`, `fanout`, `depth`, `digest_width`,
/// `format_version` (docs/formats.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeLayout {
    /// No reserved bytes: 21 bytes. The store's recorded shape (its `config` table).
    Packed,
    /// Three reserved zero bytes after the code, so that the fields are 4-byte aligned: 24 bytes.
    /// The snapshot header.
    Padded,
}

impl ShapeLayout {
    /// The reserved zero bytes between the algorithm code and the fields.
    pub const fn reserved(self) -> usize {
        match self {
            ShapeLayout::Packed => 0,
            ShapeLayout::Padded => 3,
        }
    }

    /// The encoded length in bytes.
    pub const fn encoded_len(self) -> usize {
        1 + self.reserved() + SHAPE_FIELDS * 4
    }
}

/// The `u32` fields of an encoded shape.
const SHAPE_FIELDS: usize = 5;

/// Why bytes are not an encoded shape. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShapeDecodeError {
    /// The input is not exactly the layout's length.
    #[error("encoded shape is {len} bytes, expected {expected}")]
    Length {
        /// The input length.
        len: usize,
        /// The layout's length.
        expected: usize,
    },
    /// The algorithm code is not one of [`Algorithm::code`]'s.
    #[error("shape field `algorithm` has unknown code {code}")]
    UnknownAlgorithm {
        /// The code found.
        code: u8,
    },
    /// The reserved bytes of [`ShapeLayout::Padded`] are not zero.
    #[error("shape field `reserved` must be zero, found {found:02x?}")]
    Reserved {
        /// The bytes found.
        found: [u8; 3],
    },
}

impl Shape {
    /// The shape's bytes in `layout` (see [`ShapeLayout`]). The fields are written as they are;
    /// an invalid shape encodes too.
    pub fn encode(&self, layout: ShapeLayout) -> Vec<u8> {
        let mut out = Vec::with_capacity(layout.encoded_len());
        out.push(self.algorithm.code());
        out.resize(1 + layout.reserved(), 0);
        for field in self.fields() {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out
    }

    /// Reads a shape written by [`Shape::encode`] in the same layout. The input must be exactly
    /// the layout's length. Checks the algorithm code and the reserved bytes, not the bounds:
    /// call [`Shape::validate`] for those.
    pub fn decode(bytes: &[u8], layout: ShapeLayout) -> Result<Shape, ShapeDecodeError> {
        let length = || ShapeDecodeError::Length {
            len: bytes.len(),
            expected: layout.encoded_len(),
        };
        let Some((&code, rest)) = bytes
            .split_first()
            .filter(|_| bytes.len() == layout.encoded_len())
        else {
            return Err(length());
        };
        let algorithm =
            Algorithm::from_code(code).ok_or(ShapeDecodeError::UnknownAlgorithm { code })?;
        let (reserved, fields) = rest.split_at(layout.reserved());
        if reserved.iter().any(|&byte| byte != 0) {
            let mut found = [0; 3];
            found[..reserved.len()].copy_from_slice(reserved);
            return Err(ShapeDecodeError::Reserved { found });
        }
        let fields: &[u8; SHAPE_FIELDS * 4] = fields.try_into().map_err(|_| length())?;
        let field = |index: usize| {
            let mut word = [0; 4];
            word.copy_from_slice(&fields[index * 4..index * 4 + 4]);
            u32::from_le_bytes(word)
        };
        Ok(Shape {
            algorithm,
            slot_count: field(0),
            fanout: field(1),
            depth: field(2),
            digest_width: field(3),
            format_version: field(4),
        })
    }

    /// The `u32` fields in their encoded order.
    fn fields(&self) -> [u32; SHAPE_FIELDS] {
        [
            self.slot_count,
            self.fanout,
            self.depth,
            self.digest_width,
            self.format_version,
        ]
    }
}

impl fmt::Display for Shape {
    /// `SHA-512 slots=32 fanout=16 depth=3 digest_width=16 format_version=1`: every field, named.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} slots={} fanout={} depth={} digest_width={} format_version={}",
            self.algorithm,
            self.slot_count,
            self.fanout,
            self.depth,
            self.digest_width,
            self.format_version
        )
    }
}

fn check(field: &'static str, value: u32, min: u32, max: u32) -> Result<(), ShapeError> {
    if value < min || value > max {
        return Err(ShapeError::OutOfRange {
            field,
            value: value as u64,
            min: min as u64,
            max: max as u64,
        });
    }
    Ok(())
}

/// Property-test strategies over shapes, for the crate's own tests.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    use super::Shape;
    use crate::digest::Algorithm;

    /// Small valid shapes of either algorithm and 8-byte digests: few buckets, so random
    /// entities share buckets and every level has work.
    pub(crate) fn small_shape() -> impl Strategy<Value = Shape> {
        (
            1u32..5,
            2u32..5,
            0u32..3,
            prop_oneof![Just(Algorithm::Sha512), Just(Algorithm::Blake3)],
        )
            .prop_map(|(slot_count, fanout, depth, algorithm)| Shape {
                algorithm,
                slot_count,
                fanout,
                depth,
                digest_width: 8,
                ..Shape::default()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_reference_shapes_are_valid() {
        Shape::default().validate().expect("default shape");
        Shape::reference().validate().expect("reference shape");
        assert_eq!(Shape::default().bucket_count(), 32 * 16 * 16 * 16);
        assert_eq!(Shape::reference().bucket_level(), 1);
        assert_eq!(Shape::reference().bucket_count(), 32);
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let bad = Shape {
            fanout: 1,
            ..Shape::default()
        };
        assert_eq!(
            bad.validate(),
            Err(ShapeError::OutOfRange {
                field: "fanout",
                value: 1,
                min: 2,
                max: 256
            })
        );
        let bad = Shape {
            digest_width: 65,
            ..Shape::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ShapeError::OutOfRange {
                field: "digest_width",
                ..
            })
        ));
        let bad = Shape {
            format_version: 2,
            ..Shape::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ShapeError::OutOfRange {
                field: "format_version",
                ..
            })
        ));
        let bad = Shape {
            slot_count: 65_536,
            fanout: 256,
            depth: 3,
            ..Shape::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(ShapeError::TooManyBuckets { .. })
        ));
        let edge = Shape {
            slot_count: 256,
            fanout: 256,
            depth: 3,
            ..Shape::default()
        };
        edge.validate().expect("exactly 2^32 buckets is allowed");
    }

    #[test]
    fn encoding_round_trips_in_both_layouts() {
        let shapes = [
            Shape::default(),
            Shape::reference(),
            Shape {
                algorithm: Algorithm::Blake3,
                slot_count: 65_536,
                fanout: 256,
                depth: 8,
                digest_width: 8,
                format_version: FORMAT_VERSION,
            },
        ];
        for shape in shapes {
            for layout in [ShapeLayout::Packed, ShapeLayout::Padded] {
                let bytes = shape.encode(layout);
                assert_eq!(bytes.len(), layout.encoded_len());
                assert_eq!(
                    Shape::decode(&bytes, layout),
                    Ok(shape),
                    "{layout:?} {shape}"
                );
            }
        }
    }

    #[test]
    fn encoding_is_as_documented() {
        // docs/formats.md: the store's `config` record and the snapshot header's bytes 12..36.
        let fields: Vec<u8> = [32u32, 16, 3, 16, 1]
            .iter()
            .flat_map(|field| field.to_le_bytes())
            .collect();
        let packed = Shape::default().encode(ShapeLayout::Packed);
        assert_eq!(packed, [&[1][..], &fields].concat());
        let padded = Shape::default().encode(ShapeLayout::Padded);
        assert_eq!(padded, [&[1, 0, 0, 0][..], &fields].concat());
    }

    #[test]
    fn malformed_encodings_have_their_errors() {
        let packed = Shape::default().encode(ShapeLayout::Packed);
        assert_eq!(
            Shape::decode(&packed[..20], ShapeLayout::Packed),
            Err(ShapeDecodeError::Length {
                len: 20,
                expected: 21
            })
        );
        assert_eq!(
            Shape::decode(&[], ShapeLayout::Packed),
            Err(ShapeDecodeError::Length {
                len: 0,
                expected: 21
            })
        );
        assert_eq!(
            Shape::decode(&packed, ShapeLayout::Padded),
            Err(ShapeDecodeError::Length {
                len: 21,
                expected: 24
            })
        );
        let mut bad = packed.clone();
        bad[0] = 9;
        assert_eq!(
            Shape::decode(&bad, ShapeLayout::Packed),
            Err(ShapeDecodeError::UnknownAlgorithm { code: 9 })
        );
        let mut bad = Shape::default().encode(ShapeLayout::Padded);
        bad[2] = 7;
        assert_eq!(
            Shape::decode(&bad, ShapeLayout::Padded),
            Err(ShapeDecodeError::Reserved { found: [0, 7, 0] })
        );
    }

    #[test]
    fn display_names_every_field() {
        assert_eq!(
            Shape::default().to_string(),
            "SHA-512 slots=32 fanout=16 depth=3 digest_width=16 format_version=1"
        );
    }

    #[test]
    fn level_widths_grow_by_fanout() {
        let shape = Shape::default();
        let widths: Vec<u64> = (0..=5).map(|l| shape.level_width(l)).collect();
        assert_eq!(widths, vec![1, 32, 512, 8192, 131_072, 0]);
    }
}
