//! The store's canonical property decoder (a stored row: key and canonical bytes) fed arbitrary
//! input: a typed error or a property, never a panic; a property it accepts has canonical bytes
//! that decode back to the same property.
//!
//! Input layout: one byte `n`, then `n` bytes of row key (UTF-8), then the row value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use propd_store::decode_property_row;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at((n as usize).min(rest.len()));
    let Ok(key) = std::str::from_utf8(key) else {
        return;
    };
    if let Ok(property) = decode_property_row(key, value) {
        let canonical = property.canonical_bytes();
        assert_eq!(canonical.len(), property.canonical_len());
        let again = decode_property_row(key, &canonical).expect("canonical bytes must decode");
        assert_eq!(
            again, property,
            "canonical bytes must decode to the same property"
        );
    }
});
