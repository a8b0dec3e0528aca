//! The snapshot decoder fed arbitrary bytes: it returns a typed error or a tree, never panics,
//! and a tree it accepts re-encodes to exactly the bytes it came from.
//!
//! To get past the checks a random input almost never passes, each input is also tried with
//! its checksum recomputed and, when the decoder then names the root it rebuilt, with that
//! root written in and the checksum recomputed again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use propd_merkle::snapshot::{self, HEADER_LEN, SnapshotError};
use xxhash_rust::xxh3::xxh3_64;

const CHECKSUM_LEN: usize = 8;

fn with_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - CHECKSUM_LEN;
    let sum = xxh3_64(&bytes[..body]);
    bytes[body..].copy_from_slice(&sum.to_le_bytes());
    bytes
}

fn check(bytes: &[u8]) -> Result<(), SnapshotError> {
    let tree = snapshot::decode(bytes)?;
    assert_eq!(
        snapshot::encode(&tree),
        bytes,
        "an accepted snapshot must re-encode to its own bytes"
    );
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = check(data);
    if data.len() < CHECKSUM_LEN {
        return;
    }
    let fixed = with_checksum(data.to_vec());
    if let Err(SnapshotError::RootMismatch { computed, .. }) = check(&fixed) {
        let start = HEADER_LEN;
        let root = computed.as_bytes();
        let mut rooted = fixed;
        if rooted.len() >= start + root.len() + CHECKSUM_LEN {
            rooted[start..start + root.len()].copy_from_slice(root);
            let rooted = with_checksum(rooted);
            let _ = check(&rooted);
        }
    }
});
