//! The tree's shape: algorithm, slot count, fanout, depth, digest width and format version.

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

    /// The level whose nodes hold the leaves: the same as [`Shape::bucket_level`]. Leaves
    /// themselves have no `NodeId`; in a diff's cost list they are level `bucket_level() + 1`.
    pub fn leaf_level(&self) -> u32 {
        self.bucket_level()
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
    fn level_widths_grow_by_fanout() {
        let shape = Shape::default();
        let widths: Vec<u64> = (0..=5).map(|l| shape.level_width(l)).collect();
        assert_eq!(widths, vec![1, 32, 512, 8192, 131_072, 0]);
    }
}
