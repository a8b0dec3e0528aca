//! Conversions at the node's wire edge. Properties convert with the repair crate's functions
//! (one definition of the mapping for the whole node); tag values, which only the property API
//! uses alone (query filters), convert here.

use propd_merkle::{Property, TagValue};
use propd_proto::v1;
use propd_repair::ProtocolError;

/// Wire to domain: validates the entity and rejects a tag without a value or a repeated key;
/// the error names the entity and, in its [`propd_repair::PropertyError`], the tag.
pub(crate) fn property_from_wire(wire: v1::Property) -> Result<Property, ProtocolError> {
    propd_repair::property_from_proto(wire).map(|(_, property)| property)
}

/// Domain to wire (tags in key order, as the canonical form has them).
pub(crate) fn property_to_wire(property: &Property) -> v1::Property {
    propd_repair::property_to_proto(property)
}

/// A domain tag value on the wire.
pub(crate) fn tag_value_to_wire(value: &TagValue) -> v1::TagValue {
    v1::TagValue {
        value: Some(match value {
            TagValue::Str(s) => v1::tag_value::Value::Str(s.clone()),
            TagValue::Int(i) => v1::tag_value::Value::Int(*i),
            TagValue::Binary(b) => v1::tag_value::Value::Binary(b.clone()),
        }),
    }
}

/// A wire tag value as a domain one, `None` when unset.
pub(crate) fn tag_value_from_wire(value: Option<v1::TagValue>) -> Option<TagValue> {
    match value?.value? {
        v1::tag_value::Value::Str(s) => Some(TagValue::Str(s)),
        v1::tag_value::Value::Int(i) => Some(TagValue::Int(i)),
        v1::tag_value::Value::Binary(b) => Some(TagValue::Binary(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_tags() {
        let wire = v1::Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            tags: vec![
                v1::Tag {
                    key: "b".into(),
                    value: Some(tag_value_to_wire(&TagValue::Int(2))),
                },
                v1::Tag {
                    key: "a".into(),
                    value: Some(tag_value_to_wire(&TagValue::Str("x".into()))),
                },
            ],
            mod_revision: 7,
            delete_time: 0,
        };
        let domain = property_from_wire(wire).unwrap();
        let back = property_to_wire(&domain);
        assert_eq!(back.tags[0].key, "a", "tags come back sorted");
        assert_eq!(property_from_wire(back).unwrap(), domain);

        let base = v1::Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            ..Default::default()
        };
        let missing = v1::Property {
            tags: vec![v1::Tag {
                key: "k".into(),
                value: None,
            }],
            ..base.clone()
        };
        assert!(
            property_from_wire(missing)
                .unwrap_err()
                .to_string()
                .contains("\"k\"")
        );
        let twice = v1::Property {
            tags: vec![
                v1::Tag {
                    key: "k".into(),
                    value: Some(tag_value_to_wire(&TagValue::Int(1))),
                },
                v1::Tag {
                    key: "k".into(),
                    value: Some(tag_value_to_wire(&TagValue::Int(2))),
                },
            ],
            ..base
        };
        assert!(
            property_from_wire(twice)
                .unwrap_err()
                .to_string()
                .contains("\"k\"")
        );
        assert_eq!(
            tag_value_from_wire(Some(tag_value_to_wire(&TagValue::Int(5)))),
            Some(TagValue::Int(5))
        );
        assert_eq!(
            tag_value_from_wire(Some(v1::TagValue { value: None })),
            None
        );
    }
}
