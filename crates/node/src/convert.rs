//! Conversions between the wire's `propd.v1.Property` and the domain `Property`, in one place.

use propd_merkle::{Property, TagValue};
use propd_proto::v1;

/// Why a wire property cannot become a domain property. Names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertError {
    /// A tag has no value.
    #[error("tags.{key}: the tag has no value")]
    MissingTagValue {
        /// The tag key.
        key: String,
    },
    /// Two tags share a key.
    #[error("tags.{key}: the key appears more than once")]
    DuplicateTag {
        /// The tag key.
        key: String,
    },
    /// The request carries no property.
    #[error("property: missing")]
    MissingProperty,
}

/// Wire to domain.
pub fn property_from_wire(wire: v1::Property) -> Result<Property, ConvertError> {
    let mut tags = std::collections::BTreeMap::new();
    for tag in wire.tags {
        let value = match tag.value.and_then(|v| v.value) {
            Some(v1::tag_value::Value::Str(s)) => TagValue::Str(s),
            Some(v1::tag_value::Value::Int(i)) => TagValue::Int(i),
            Some(v1::tag_value::Value::Binary(b)) => TagValue::Binary(b),
            None => return Err(ConvertError::MissingTagValue { key: tag.key }),
        };
        if tags.insert(tag.key.clone(), value).is_some() {
            return Err(ConvertError::DuplicateTag { key: tag.key });
        }
    }
    Ok(Property {
        group: wire.group,
        name: wire.name,
        id: wire.id,
        tags,
        mod_revision: wire.mod_revision,
        delete_time: wire.delete_time,
    })
}

/// Domain to wire (tags in key order, as the canonical form has them).
pub fn property_to_wire(property: &Property) -> v1::Property {
    v1::Property {
        group: property.group.clone(),
        name: property.name.clone(),
        id: property.id.clone(),
        tags: property
            .tags
            .iter()
            .map(|(key, value)| v1::Tag {
                key: key.clone(),
                value: Some(tag_value_to_wire(value)),
            })
            .collect(),
        mod_revision: property.mod_revision,
        delete_time: property.delete_time,
    }
}

/// A domain tag value on the wire.
pub fn tag_value_to_wire(value: &TagValue) -> v1::TagValue {
    v1::TagValue {
        value: Some(match value {
            TagValue::Str(s) => v1::tag_value::Value::Str(s.clone()),
            TagValue::Int(i) => v1::tag_value::Value::Int(*i),
            TagValue::Binary(b) => v1::tag_value::Value::Binary(b.clone()),
        }),
    }
}

/// A wire tag value as a domain one, `None` when unset.
pub fn tag_value_from_wire(value: Option<v1::TagValue>) -> Option<TagValue> {
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

        let missing = v1::Property {
            tags: vec![v1::Tag {
                key: "k".into(),
                value: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            property_from_wire(missing).unwrap_err(),
            ConvertError::MissingTagValue { key: "k".into() }
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
            ..Default::default()
        };
        assert!(
            property_from_wire(twice)
                .unwrap_err()
                .to_string()
                .contains("tags.k")
        );
    }
}
