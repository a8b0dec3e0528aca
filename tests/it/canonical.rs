//! The canonical bytes that `propd-merkle` writes by hand must be exactly the deterministic
//! protobuf encoding of `propd.v1.Property` (tags sorted by key), or two implementations of the
//! contract would hash the same property differently.

use std::collections::BTreeMap;

use propd_merkle::{Property, TagValue};
use propd_proto::v1;
use proptest::prelude::*;
use prost::Message as _;

fn tag_value() -> impl Strategy<Value = TagValue> {
    prop_oneof![
        ".{0,12}".prop_map(TagValue::Str),
        any::<i64>().prop_map(TagValue::Int),
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(TagValue::Binary),
    ]
}

fn property() -> impl Strategy<Value = Property> {
    (
        "[a-z]{1,8}",
        "[a-z]{1,8}",
        "[a-z/]{1,12}",
        proptest::collection::btree_map(".{0,8}", tag_value(), 0..6),
        any::<i64>(),
        prop_oneof![Just(0i64), any::<i64>()],
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

fn to_wire(property: &Property) -> v1::Property {
    // The node's one mapping between domain and wire properties.
    propd_repair::property_to_proto(property)
}

proptest! {
    #[test]
    fn canonical_bytes_are_the_prost_encoding(property in property()) {
        prop_assert_eq!(property.canonical_bytes(), to_wire(&property).encode_to_vec());
    }
}

#[test]
fn default_values_are_encoded_as_prost_does() {
    let mut tags = BTreeMap::new();
    tags.insert(String::new(), TagValue::Str(String::new()));
    tags.insert("zero".to_owned(), TagValue::Int(0));
    tags.insert("empty".to_owned(), TagValue::Binary(Vec::new()));
    let property = Property {
        group: "g".into(),
        name: "n".into(),
        id: "i".into(),
        tags,
        mod_revision: 0,
        delete_time: 0,
    };
    assert_eq!(
        property.canonical_bytes(),
        to_wire(&property).encode_to_vec()
    );
}
