//! Hash algorithms, the fixed-capacity `Digest`, and the hashers for bucket and inner nodes.

use std::fmt;

use sha2::Digest as _;

use crate::entity::Entity;

/// The widest digest: the full output of SHA-512 (and of BLAKE3 in extended-output mode).
pub const MAX_DIGEST_WIDTH: usize = 64;

/// The hash function `H` of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Algorithm {
    /// SHA-512 (the reference's choice and the default).
    #[default]
    Sha512,
    /// BLAKE3 in extended-output mode, so that widths up to 64 bytes are available.
    Blake3,
}

impl Algorithm {
    /// The code of the algorithm in the snapshot format (1 = SHA-512, 2 = BLAKE3).
    pub fn code(self) -> u8 {
        match self {
            Algorithm::Sha512 => 1,
            Algorithm::Blake3 => 2,
        }
    }

    /// The algorithm with the given snapshot code, if any.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Algorithm::Sha512),
            2 => Some(Algorithm::Blake3),
            _ => None,
        }
    }

    /// The first `width` bytes of `H(data)`. `width` is clamped to 1..=64.
    pub fn hash(self, data: &[u8], width: usize) -> Digest {
        // One-shot paths: no streaming state is built and moved around for a single input.
        let width = width.clamp(1, MAX_DIGEST_WIDTH);
        let mut digest = Digest {
            len: width as u8,
            bytes: [0; MAX_DIGEST_WIDTH],
        };
        match self {
            Algorithm::Sha512 => {
                digest.bytes[..width].copy_from_slice(&sha2::Sha512::digest(data)[..width])
            }
            Algorithm::Blake3 if width <= blake3::OUT_LEN => {
                digest.bytes[..width].copy_from_slice(&blake3::hash(data).as_bytes()[..width])
            }
            Algorithm::Blake3 => {
                let mut hasher = blake3::Hasher::new();
                hasher.update(data);
                hasher.finalize_xof().fill(&mut digest.bytes[..width]);
            }
        }
        digest
    }
}

impl fmt::Display for Algorithm {
    /// The algorithm's usual name: `SHA-512` or `BLAKE3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Sha512 => "SHA-512",
            Algorithm::Blake3 => "BLAKE3",
        })
    }
}

/// A digest: a prefix (the tree's digest width, 1 to 64 bytes) of a full hash. `Copy`, no heap.
/// Compared and ordered by its bytes.
#[derive(Clone, Copy)]
pub struct Digest {
    len: u8,
    bytes: [u8; MAX_DIGEST_WIDTH],
}

/// A byte string that cannot be a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// The length is 0 or more than 64.
    #[error("digest length {len} is outside 1..=64")]
    Length {
        /// The rejected length.
        len: usize,
    },
}

impl Digest {
    /// A digest holding a copy of `bytes` (1 to 64 bytes).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, DigestError> {
        if bytes.is_empty() || bytes.len() > MAX_DIGEST_WIDTH {
            return Err(DigestError::Length { len: bytes.len() });
        }
        let mut digest = Digest {
            len: bytes.len() as u8,
            bytes: [0; MAX_DIGEST_WIDTH],
        };
        digest.bytes[..bytes.len()].copy_from_slice(bytes);
        Ok(digest)
    }

    /// `width` zero bytes (clamped to 1..=64): the digest of an empty subtree.
    pub fn zero(width: usize) -> Self {
        Digest {
            len: width.clamp(1, MAX_DIGEST_WIDTH) as u8,
            bytes: [0; MAX_DIGEST_WIDTH],
        }
    }

    /// A digest holding the first `min(len, 64)` bytes of `bytes`, for lengths the caller has
    /// already checked (a validated shape's width); an empty input gives one zero byte.
    pub(crate) fn from_checked(bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_DIGEST_WIDTH);
        let mut digest = Digest::zero(len);
        digest.bytes[..len].copy_from_slice(&bytes[..len]);
        digest
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The width in bytes.
    pub fn width(&self) -> usize {
        self.len as usize
    }
}

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Digest {}

impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Ord for Digest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl PartialOrd for Digest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.as_bytes()))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A streaming hasher of either algorithm.
#[derive(Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "a hasher lives on the stack for one node or leaf; boxing would allocate each time"
)]
pub(crate) enum Hasher {
    Sha512(sha2::Sha512),
    Blake3(blake3::Hasher),
}

impl Hasher {
    pub(crate) fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
            Algorithm::Blake3 => Hasher::Blake3(blake3::Hasher::new()),
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha512(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The first `width` bytes of the hash; resets the hasher for reuse.
    pub(crate) fn finish(&mut self, width: usize) -> Digest {
        let width = width.clamp(1, MAX_DIGEST_WIDTH);
        let mut digest = Digest {
            len: width as u8,
            bytes: [0; MAX_DIGEST_WIDTH],
        };
        match self {
            Hasher::Sha512(h) => {
                let full = h.finalize_reset();
                digest.bytes[..width].copy_from_slice(&full[..width]);
            }
            Hasher::Blake3(h) => {
                h.finalize_xof().fill(&mut digest.bytes[..width]);
                h.reset();
            }
        }
        digest
    }
}

/// Domain byte that starts the hash input of a bucket (a node holding leaves).
pub(crate) const BUCKET_DOMAIN: u8 = 0x01;
/// Domain byte that starts the hash input of an inner node above the buckets.
const INNER_DOMAIN: u8 = 0x02;

/// Starts the one-shot hash input of a bucket in `out` (cleared first); entries follow (see
/// [`push_bucket_entry`]), then `Algorithm::hash` over `out` gives the same digest as a
/// [`NodeHasher::bucket`] fed the same leaves.
pub(crate) fn start_bucket_input(out: &mut Vec<u8>) {
    out.clear();
    out.push(BUCKET_DOMAIN);
}

/// Appends one leaf's entry to a bucket's hash input: the layout of [`NodeHasher::push_leaf`].
pub(crate) fn push_bucket_entry(out: &mut Vec<u8>, entity: &[u8], digest: &[u8]) {
    // Entities are at most u16::MAX bytes (Entity::MAX_LEN), so the length fits.
    out.extend_from_slice(&(entity.len() as u16).to_le_bytes());
    out.extend_from_slice(entity);
    out.extend_from_slice(digest);
}

/// Splits the first entry (as written by [`push_bucket_entry`] with `width`-byte digests) off
/// `entries`: `(entity, digest, rest)`, or `None` when the bytes are too short.
pub(crate) fn split_bucket_entry(entries: &[u8], width: usize) -> Option<(&[u8], &[u8], &[u8])> {
    let (len, rest) = entries.split_first_chunk::<2>()?;
    let (entity, rest) = rest.split_at_checked(u16::from_le_bytes(*len) as usize)?;
    let (digest, rest) = rest.split_at_checked(width)?;
    Some((entity, digest, rest))
}

/// Computes the digest of one tree node from its entries, streaming.
///
/// A bucket digest is `H(0x01 || for each leaf in entity order: u16 LE entity length || entity
/// bytes || leaf digest)`; an inner digest is `H(0x02 || for each non-empty child in index order:
/// u32 LE child position under the parent || child digest)`. A node with no entries has the empty
/// digest (`digest_width` zero bytes), whatever its kind. See `docs/formats.md`.
#[derive(Clone)]
pub struct NodeHasher {
    hasher: Hasher,
    width: usize,
    entries: u64,
    leaf_count: u64,
}

impl NodeHasher {
    /// A hasher for a bucket node of a tree with this algorithm and digest width.
    pub fn bucket(algorithm: Algorithm, width: usize) -> Self {
        Self::with_domain(algorithm, width, BUCKET_DOMAIN)
    }

    /// A hasher for an inner node above the buckets.
    pub fn inner(algorithm: Algorithm, width: usize) -> Self {
        Self::with_domain(algorithm, width, INNER_DOMAIN)
    }

    fn with_domain(algorithm: Algorithm, width: usize, domain: u8) -> Self {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(&[domain]);
        NodeHasher {
            hasher,
            width,
            entries: 0,
            leaf_count: 0,
        }
    }

    /// Adds one leaf of a bucket; leaves must come in entity order.
    pub fn push_leaf(&mut self, entity: &Entity, digest: &Digest) {
        // Entities are at most u16::MAX bytes (Entity::MAX_LEN), so the length fits.
        self.hasher
            .update(&(entity.as_bytes().len() as u16).to_le_bytes());
        self.hasher.update(entity.as_bytes());
        self.hasher.update(digest.as_bytes());
        self.entries += 1;
        self.leaf_count += 1;
    }

    /// Adds one non-empty child of an inner node: its position under the parent (0..fanout, or
    /// 0..slot_count under the root), its digest and its leaf count. Children must come in
    /// position order.
    pub fn push_child(&mut self, position: u32, digest: &Digest, leaf_count: u64) {
        self.hasher.update(&position.to_le_bytes());
        self.hasher.update(digest.as_bytes());
        self.entries += 1;
        self.leaf_count += leaf_count;
    }

    /// The number of leaves under the node so far.
    pub fn leaf_count(&self) -> u64 {
        self.leaf_count
    }

    /// The node's digest (the empty digest when nothing was pushed) and its leaf count.
    pub fn finish(mut self) -> (Digest, u64) {
        if self.entries == 0 {
            return (Digest::zero(self.width), 0);
        }
        (self.hasher.finish(self.width), self.leaf_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_hasher_counts_the_leaves_pushed() {
        let entity = |id: &str| Entity::new("g", "n", id).expect("valid");
        let digest = Algorithm::Blake3.hash(b"leaf", 16);
        let mut hasher = NodeHasher::bucket(Algorithm::Blake3, 16);
        assert_eq!(hasher.leaf_count(), 0);
        hasher.push_leaf(&entity("a"), &digest);
        hasher.push_leaf(&entity("b"), &digest);
        assert_eq!(hasher.leaf_count(), 2);
        assert_eq!(hasher.finish().1, 2);
    }

    #[test]
    fn sha512_prefix_matches_known_vector() {
        // SHA-512("abc") starts with ddaf35a193617aba.
        let digest = Algorithm::Sha512.hash(b"abc", 8);
        assert_eq!(digest.to_string(), "ddaf35a193617aba");
        assert_eq!(digest.width(), 8);
    }

    #[test]
    fn blake3_prefix_matches_the_standard_output_and_extends_it() {
        let short = Algorithm::Blake3.hash(b"abc", 32);
        assert_eq!(short.as_bytes(), blake3::hash(b"abc").as_bytes());
        let long = Algorithm::Blake3.hash(b"abc", 64);
        assert_eq!(&long.as_bytes()[..32], short.as_bytes());
    }

    #[test]
    fn digests_compare_by_their_bytes_only() {
        let a = Digest::from_slice(&[1, 2, 3]).expect("valid");
        let b = Digest::from_slice(&[1, 2, 4]).expect("valid");
        assert!(a < b);
        assert_eq!(a, Digest::from_slice(&[1, 2, 3]).expect("valid"));
        assert_eq!(Digest::from_slice(&[]), Err(DigestError::Length { len: 0 }));
        assert_eq!(
            Digest::from_slice(&[0; 65]),
            Err(DigestError::Length { len: 65 })
        );
    }

    #[test]
    fn empty_node_has_the_zero_digest_and_hasher_is_reusable() {
        let (empty, count) = NodeHasher::inner(Algorithm::Sha512, 16).finish();
        assert_eq!((empty, count), (Digest::zero(16), 0));
        let mut h = Hasher::new(Algorithm::Sha512);
        h.update(b"abc");
        let first = h.finish(16);
        h.update(b"abc");
        assert_eq!(first, h.finish(16));
    }
}
