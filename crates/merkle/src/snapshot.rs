//! The snapshot file format of a tree: a versioned header with the shape, the leaves in tree
//! order, explicit little-endian integers and an xxh3 checksum. Described byte by byte in
//! `docs/formats.md`.

use xxhash_rust::xxh3::xxh3_64;

use crate::build::{Tree, TreeBuilder};
use crate::digest::Digest;
use crate::entity::{Entity, EntityError};
use crate::shape::{Shape, ShapeDecodeError, ShapeError, ShapeLayout};

/// The eight bytes every snapshot starts with.
pub const MAGIC: [u8; 8] = *b"PROPDMKT";
/// The snapshot layout version this crate writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Bytes of the fixed header before the root digest.
pub const HEADER_LEN: usize = 44;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 8;

/// Why bytes are not a valid snapshot. Decoding never panics; every malformed input maps here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Fewer bytes than the smallest snapshot.
    #[error("snapshot is {len} bytes, shorter than the minimum {min}")]
    TooShort {
        /// The input length.
        len: usize,
        /// The minimum length.
        min: usize,
    },
    /// The first eight bytes are not the magic.
    #[error("snapshot magic is {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// The checksum does not match the content.
    #[error("snapshot checksum {stored:#018x} does not match the content's {computed:#018x}")]
    Checksum {
        /// The stored checksum.
        stored: u64,
        /// The checksum of the bytes before it.
        computed: u64,
    },
    /// An unknown snapshot layout version.
    #[error("snapshot version {version} is not supported (only {SNAPSHOT_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// An unknown algorithm code.
    #[error("snapshot field `algorithm` has unknown code {code}")]
    UnknownAlgorithm {
        /// The code found.
        code: u8,
    },
    /// The reserved header bytes are not zero.
    #[error("snapshot field `reserved` must be zero, found {found:02x?}")]
    Reserved {
        /// The bytes found.
        found: [u8; 3],
    },
    /// The header's shape is not valid.
    #[error("snapshot shape is invalid: {0}")]
    Shape(#[from] ShapeError),
    /// The input ends inside a field.
    #[error("snapshot ends inside field `{field}` at offset {offset}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Its offset.
        offset: usize,
    },
    /// A leaf's entity is not valid.
    #[error("snapshot leaf {index} has an invalid entity: {source}")]
    Entity {
        /// The leaf's position in the file.
        index: u64,
        /// What is wrong with it.
        source: EntityError,
    },
    /// Leaves are not in strictly increasing `(bucket, entity)` order.
    #[error("snapshot leaf {index} ({entity}) is out of (bucket, entity) order or repeated")]
    OutOfOrder {
        /// The leaf's position in the file.
        index: u64,
        /// Its entity.
        entity: Entity,
    },
    /// Bytes remain between the last leaf and the checksum.
    #[error("snapshot has {extra} unexpected bytes after leaf {leaf_count}")]
    TrailingBytes {
        /// The number of extra bytes.
        extra: usize,
        /// The declared number of leaves.
        leaf_count: u64,
    },
    /// The root rebuilt from the leaves is not the stored root.
    #[error("snapshot root {stored} does not match the root {computed} rebuilt from its leaves")]
    RootMismatch {
        /// The stored root digest.
        stored: Box<Digest>,
        /// The rebuilt root digest.
        computed: Box<Digest>,
    },
}

/// Encodes a tree: header, root digest, leaves in `(bucket, entity)` order, checksum.
pub fn encode(tree: &Tree) -> Vec<u8> {
    let shape = tree.shape();
    let width = shape.width();
    let leaves_len: usize = tree
        .leaves()
        .iter()
        .map(|leaf| 2 + leaf.entity.as_bytes().len() + width)
        .sum();
    let mut out = Vec::with_capacity(HEADER_LEN + width + leaves_len + CHECKSUM_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&shape.encode(ShapeLayout::Padded));
    out.extend_from_slice(&tree.leaf_count().to_le_bytes());
    out.extend_from_slice(tree.root().digest.as_bytes());
    for leaf in tree.leaves() {
        // Entity::MAX_LEN keeps every entity length within a u16.
        out.extend_from_slice(&(leaf.entity.as_bytes().len() as u16).to_le_bytes());
        out.extend_from_slice(leaf.entity.as_bytes());
        out.extend_from_slice(leaf.digest.as_bytes());
    }
    let checksum = xxh3_64(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

/// The leaves to reserve room for when a snapshot declares `leaf_count` of them and `remaining`
/// bytes follow: never more than those bytes can hold, since each leaf takes at least a length,
/// the shortest entity (`g/n/i`) and a digest. A declared count is never trusted for an
/// allocation.
fn leaf_reservation(leaf_count: u64, remaining: usize, width: usize) -> usize {
    let smallest_leaf = 2 + "g/n/i".len() + width;
    usize::try_from(leaf_count)
        .unwrap_or(usize::MAX)
        .min(remaining / smallest_leaf)
}

/// Decodes and verifies a snapshot: magic, checksum, version, shape, every leaf (valid entity,
/// strict `(bucket, entity)` order), no trailing bytes, and the stored root against the root
/// rebuilt from the leaves. Returns a typed error for any malformed input; never panics.
pub fn decode(bytes: &[u8]) -> Result<Tree, SnapshotError> {
    let min = HEADER_LEN + CHECKSUM_LEN;
    if bytes.len() < min {
        return Err(SnapshotError::TooShort {
            len: bytes.len(),
            min,
        });
    }
    let mut reader = Reader { bytes, offset: 0 };
    let magic: [u8; 8] = reader.array("magic")?;
    if magic != MAGIC {
        return Err(SnapshotError::BadMagic { found: magic });
    }
    let (body, stored) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let stored = u64::from_le_bytes(
        stored
            .try_into()
            .map_err(|_| truncated("checksum", body.len()))?,
    );
    let computed = xxh3_64(body);
    if stored != computed {
        return Err(SnapshotError::Checksum { stored, computed });
    }
    let mut reader = Reader {
        bytes: body,
        offset: MAGIC.len(),
    };

    let version = reader.u32("version")?;
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { version });
    }
    let offset = reader.offset;
    let shape = Shape::decode(
        reader.take(ShapeLayout::Padded.encoded_len(), "shape")?,
        ShapeLayout::Padded,
    )
    .map_err(|error| match error {
        ShapeDecodeError::UnknownAlgorithm { code } => SnapshotError::UnknownAlgorithm { code },
        ShapeDecodeError::Reserved { found } => SnapshotError::Reserved { found },
        ShapeDecodeError::Length { .. } => truncated("shape", offset),
    })?;
    shape.validate()?;
    let width = shape.width();
    let leaf_count = reader.u64("leaf_count")?;
    let root = Digest::from_slice(reader.take(width, "root")?)
        .map_err(|_| truncated("root", reader.offset))?;

    let capacity = leaf_reservation(leaf_count, reader.remaining(), width);
    let mut builder = TreeBuilder::with_capacity(shape, capacity)?;
    let mut previous: Option<(u64, Entity)> = None;
    for index in 0..leaf_count {
        let len = u16::from_le_bytes(reader.array("entity_len")?) as usize;
        let entity = Entity::from_bytes(reader.take(len, "entity")?)
            .map_err(|source| SnapshotError::Entity { index, source })?;
        let digest = Digest::from_slice(reader.take(width, "digest")?)
            .map_err(|_| truncated("digest", reader.offset))?;
        let bucket = shape.bucket_of(&entity).index;
        if let Some((last_bucket, last_entity)) = &previous
            && (*last_bucket, last_entity) >= (bucket, &entity)
        {
            return Err(SnapshotError::OutOfOrder { index, entity });
        }
        previous = Some((bucket, entity.clone()));
        builder
            .push(entity, digest)
            .map_err(|_| truncated("digest", reader.offset))?;
    }
    if reader.remaining() != 0 {
        return Err(SnapshotError::TrailingBytes {
            extra: reader.remaining(),
            leaf_count,
        });
    }
    // Leaves are sorted and unique, so finishing cannot fail; map defensively all the same.
    let tree = builder
        .finish()
        .map_err(|_| truncated("leaves", reader.offset))?;
    let computed = tree.root().digest;
    if computed != root {
        return Err(SnapshotError::RootMismatch {
            stored: Box::new(root),
            computed: Box::new(computed),
        });
    }
    Ok(tree)
}

fn truncated(field: &'static str, offset: usize) -> SnapshotError {
    SnapshotError::Truncated { field, offset }
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len());
        let end = end.ok_or(truncated(field, self.offset))?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], SnapshotError> {
        let offset = self.offset;
        self.take(N, field)?
            .try_into()
            .map_err(|_| truncated(field, offset))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, SnapshotError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, SnapshotError> {
        self.array(field).map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Algorithm;
    use proptest::prelude::*;

    fn sample(shape: Shape, n: u32) -> Tree {
        let mut builder = TreeBuilder::new(shape).expect("valid");
        for i in 0..n {
            let entity = Entity::new("g", "n", &format!("id/{i}")).expect("valid");
            builder
                .push(entity, shape.digest(&i.to_le_bytes()))
                .expect("push");
        }
        builder.finish().expect("build")
    }

    /// Replaces the checksum so that a corrupted body reaches the structural checks.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let body = bytes.len() - CHECKSUM_LEN;
        let checksum = xxh3_64(&bytes[..body]);
        bytes[body..].copy_from_slice(&checksum.to_le_bytes());
        bytes
    }

    /// A declared leaf count reserves room for no more leaves than the bytes that follow can hold.
    #[test]
    fn a_declared_leaf_count_reserves_no_more_than_the_bytes_hold() {
        // The smallest leaf at width 16: 2 + 5 + 16 = 23 bytes.
        assert_eq!(leaf_reservation(u64::MAX, 23 * 1000, 16), 1000);
        assert_eq!(leaf_reservation(u64::MAX, 23 * 1000 + 22, 16), 1000);
        assert_eq!(leaf_reservation(10, 23 * 1000, 16), 10);
        assert_eq!(leaf_reservation(u64::MAX, 22, 16), 0);
        assert_eq!(leaf_reservation(u64::MAX, 7 * 1000, 0), 1000);
    }

    /// Fewer bytes than a header and a checksum are refused as too short, naming both lengths;
    /// exactly that many get as far as the magic.
    #[test]
    fn a_snapshot_shorter_than_its_frame_is_too_short() {
        let min = HEADER_LEN + CHECKSUM_LEN;
        assert_eq!(
            decode(&vec![0; min - 1]).err(),
            Some(SnapshotError::TooShort { len: min - 1, min })
        );
        assert!(matches!(
            decode(&vec![0; min]),
            Err(SnapshotError::BadMagic { .. })
        ));
    }
    #[test]
    fn round_trip_for_every_algorithm_and_the_empty_tree() {
        for shape in [
            Shape::default(),
            Shape::reference(),
            Shape {
                algorithm: Algorithm::Blake3,
                ..Shape::default()
            },
        ] {
            for n in [0, 1, 300] {
                let tree = sample(shape, n);
                assert_eq!(decode(&encode(&tree)), Ok(tree));
            }
        }
    }

    #[test]
    fn header_layout_is_as_documented() {
        let bytes = encode(&sample(Shape::default(), 1));
        assert_eq!(&bytes[..8], b"PROPDMKT");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[12], 1);
        assert_eq!(bytes[16..20], 32u32.to_le_bytes());
        assert_eq!(bytes[28..32], 16u32.to_le_bytes());
        assert_eq!(bytes[36..44], 1u64.to_le_bytes());
        // header, root, one leaf ("g/n/id/0" = 8 bytes), checksum.
        assert_eq!(bytes.len(), 44 + 16 + 2 + 8 + 16 + 8);
    }

    #[test]
    fn each_kind_of_damage_has_its_error() {
        let good = encode(&sample(Shape::default(), 3));
        assert!(matches!(
            decode(&good[..10]),
            Err(SnapshotError::TooShort { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(SnapshotError::BadMagic { .. })));
        let mut bad = good.clone();
        bad[50] ^= 1;
        assert!(matches!(decode(&bad), Err(SnapshotError::Checksum { .. })));
        let mut bad = good.clone();
        bad[8] = 2;
        assert_eq!(
            decode(&reseal(bad)),
            Err(SnapshotError::UnsupportedVersion { version: 2 })
        );
        let mut bad = good.clone();
        bad[12] = 9;
        assert_eq!(
            decode(&reseal(bad)),
            Err(SnapshotError::UnknownAlgorithm { code: 9 })
        );
        let mut bad = good.clone();
        bad[20] = 1;
        assert!(matches!(
            decode(&reseal(bad)),
            Err(SnapshotError::Shape(ShapeError::OutOfRange {
                field: "fanout",
                ..
            }))
        ));
        let mut bad = good.clone();
        bad[36] = 4;
        assert!(matches!(
            decode(&reseal(bad)),
            Err(SnapshotError::Truncated {
                field: "entity_len",
                ..
            })
        ));
        let mut bad = good.clone();
        bad[36] = 2;
        assert!(matches!(
            decode(&reseal(bad)),
            Err(SnapshotError::TrailingBytes { .. })
        ));
        let mut bad = good.clone();
        bad[44] ^= 1;
        assert!(matches!(
            decode(&reseal(bad)),
            Err(SnapshotError::RootMismatch { .. })
        ));
        let mut bad = good.clone();
        bad[44 + 16 + 2] = b'/';
        assert!(matches!(
            decode(&reseal(bad)),
            Err(SnapshotError::Entity { index: 0, .. })
        ));
    }

    #[test]
    fn out_of_order_leaves_are_rejected() {
        let tree = sample(Shape::default(), 2);
        let mut bytes = encode(&tree);
        let leaf_len = 2 + 8 + 16;
        let start = 44 + 16;
        let (a, b) = bytes[start..start + 2 * leaf_len].split_at(leaf_len);
        let swapped = [b, a].concat();
        bytes[start..start + 2 * leaf_len].copy_from_slice(&swapped);
        assert!(matches!(
            decode(&reseal(bytes)),
            Err(SnapshotError::OutOfOrder { index: 1, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let _ = decode(&reseal([&encode(&sample(Shape::default(), 0))[..44], &bytes, &[0; 8]].concat()));
        }

        #[test]
        fn truncated_or_flipped_snapshots_fail_cleanly(
            n in 0u32..20, cut in any::<prop::sample::Index>(), flip in any::<prop::sample::Index>(), bit in 0u8..8,
        ) {
            let tree = sample(Shape::default(), n);
            let bytes = encode(&tree);
            let cut = cut.index(bytes.len());
            prop_assert!(decode(&bytes[..cut]).is_err());
            prop_assert!(decode(&reseal_if_long(bytes[..cut].to_vec())).is_err());
            let mut flipped = bytes.clone();
            let at = flip.index(flipped.len());
            flipped[at] ^= 1 << bit;
            prop_assert!(decode(&flipped).is_err());
            // A resealed flip either fails or, at worst, decodes to a valid tree (never a panic).
            let _ = decode(&reseal(flipped));
        }
    }

    fn reseal_if_long(bytes: Vec<u8>) -> Vec<u8> {
        if bytes.len() >= CHECKSUM_LEN {
            reseal(bytes)
        } else {
            bytes
        }
    }
}
