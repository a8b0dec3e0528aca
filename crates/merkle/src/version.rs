//! The total version order of two copies of one property (DESIGN §3).

use std::cmp::Ordering;

use crate::property::Property;
use crate::shape::Shape;

/// Compares two copies of one entity; `Greater` means `a` is newer and wins. In order: the larger
/// `mod_revision`; at an equal revision a tombstone beats a live copy; of two tombstones the
/// larger `delete_time`; otherwise the larger leaf digest, and if the digests tie the larger
/// canonical bytes. `Equal` only for copies with identical canonical bytes, so the order is total
/// and merging is commutative, associative and idempotent.
pub fn version_order(a: &Property, b: &Property, shape: &Shape) -> Ordering {
    a.mod_revision
        .cmp(&b.mod_revision)
        .then_with(|| a.is_tombstone().cmp(&b.is_tombstone()))
        .then_with(|| {
            if a.is_tombstone() {
                a.delete_time.cmp(&b.delete_time)
            } else {
                Ordering::Equal
            }
        })
        .then_with(|| {
            let (ca, cb) = (a.canonical_bytes(), b.canonical_bytes());
            if ca == cb {
                return Ordering::Equal;
            }
            shape
                .digest(&ca)
                .cmp(&shape.digest(&cb))
                .then_with(|| ca.cmp(&cb))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::property::TagValue;
    use proptest::prelude::*;

    fn property(rev: i64, delete: i64, tag: i64) -> Property {
        let mut p = Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            mod_revision: rev,
            delete_time: delete,
            ..Property::default()
        };
        p.tags.insert("t".into(), TagValue::Int(tag));
        p
    }

    #[test]
    fn rules_apply_in_order() {
        let shape = Shape::default();
        assert_eq!(
            version_order(&property(2, 0, 0), &property(1, 9, 0), &shape),
            Ordering::Greater
        );
        assert_eq!(
            version_order(&property(2, 0, 0), &property(2, 1, 0), &shape),
            Ordering::Less
        );
        assert_eq!(
            version_order(&property(2, 5, 0), &property(2, 4, 9), &shape),
            Ordering::Greater
        );
        assert_eq!(
            version_order(&property(2, 0, 3), &property(2, 0, 3), &shape),
            Ordering::Equal
        );
        let (a, b) = (property(2, 0, 3), property(2, 0, 4));
        let by_digest = a.leaf_digest(&shape).cmp(&b.leaf_digest(&shape));
        assert_eq!(version_order(&a, &b, &shape), by_digest);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn order_is_antisymmetric_transitive_and_equal_only_when_identical(
            a in (0i64..3, 0i64..3, 0i64..3), b in (0i64..3, 0i64..3, 0i64..3), c in (0i64..3, 0i64..3, 0i64..3),
        ) {
            let shape = Shape::default();
            let (a, b, c) = (property(a.0, a.1, a.2), property(b.0, b.1, b.2), property(c.0, c.1, c.2));
            prop_assert_eq!(version_order(&a, &b, &shape), version_order(&b, &a, &shape).reverse());
            prop_assert_eq!(version_order(&a, &b, &shape) == Ordering::Equal, a == b);
            if version_order(&a, &b, &shape) != Ordering::Less && version_order(&b, &c, &shape) != Ordering::Less {
                prop_assert_ne!(version_order(&a, &c, &shape), Ordering::Less);
            }
        }
    }
}
