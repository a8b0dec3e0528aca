//! Shared data generators for the criterion benches in `benches/`.

/// Deterministic properties of about 200 canonical bytes (the size DESIGN §10 measures with).
pub mod properties {
    use std::fmt::Write as _;

    use propd_merkle::{Property, TagValue};

    /// Property number `i` of group `bench`, name `prop`: id `id-{i:010}`, three tags.
    pub fn property(i: u64) -> Property {
        let mut property = Property::default();
        fill(&mut property, i);
        property
    }

    /// Rewrites `property` in place into property number `i`, reusing its allocations, so that a
    /// bench can stream a million properties without a million allocations.
    pub fn fill(property: &mut Property, i: u64) {
        if property.group.is_empty() {
            property.group.push_str("bench");
            property.name.push_str("prop");
            property
                .tags
                .insert("service".into(), TagValue::Str("checkout-frontend".into()));
            property.tags.insert("port".into(), TagValue::Int(0));
            property
                .tags
                .insert("blob".into(), TagValue::Binary(vec![0; 96]));
        }
        property.id.clear();
        let _ = write!(property.id, "id-{i:010}");
        if let Some(TagValue::Int(port)) = property.tags.get_mut("port") {
            *port = (i % 65_536) as i64;
        }
        if let Some(TagValue::Binary(blob)) = property.tags.get_mut("blob") {
            blob[..8].copy_from_slice(&i.to_le_bytes());
        }
        property.mod_revision = 1_700_000_000_000_000_000 + i as i64;
        property.delete_time = 0;
    }
}
