//! The knobs of one sync: wire digest width, page limits, where the server lists leaves, preview.

use crate::error::SyncError;

/// Limits and choices of one sync. Both sides use their own `Config`; nothing in it has to match
/// between the two peers (the client tells the server the wire digest width and preview).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Bytes of every node digest sent below the root: a prefix of the stored digest. 8 (the
    /// default) keeps the chance that two different subtrees look equal at about 2^-64 per
    /// comparison; it must lie in 8..=the shape's digest width.
    pub wire_digest_width: u32,
    /// Most entries (node digests, leaf fingerprints, properties) in one message. Default 1024.
    pub page_items: usize,
    /// Most bytes of one message, approximately (a single property larger than this still
    /// travels alone in its page). Default 4 MiB, a quarter of `propd_proto::MAX_MESSAGE_BYTES`:
    /// a page of 1024 properties of 2 KB is one write transaction on the receiver.
    pub page_bytes: usize,
    /// Received copies applied together in one write transaction (default 4096; also applied
    /// when they reach `4 * page_bytes` bytes, and whenever the protocol needs them stored).
    pub apply_batch: usize,
    /// Server: a differing node with at most this many leaves is answered with its leaf list
    /// instead of a further descent. Default 16 (the default fanout): a list of 16 fingerprints
    /// costs about what one more level of 16 child digests costs.
    pub leaf_list_max: u64,
    /// Client: compute the differences and apply nothing, on either side.
    pub preview: bool,
    /// Client: pending copies and requests (entries) above which it pauses the descent until
    /// they are sent. Default 8 pages. Bounds the client's memory; the server is bounded by
    /// reading one message only after it has sent the answers to the previous one.
    pub max_backlog: usize,
    /// The highest protocol version this side speaks (default
    /// [`crate::PROTOCOL_VERSION`]); a sync runs at the lower of the two sides'. 1 turns off
    /// the bulk path and the range cursors, 2 the alternating descent (for mixed-version
    /// clusters and their tests).
    pub protocol_version: u32,
    /// The lowest protocol version this side accepts (default 1: every older peer syncs at its
    /// own version). A peer whose highest version is below it is refused with
    /// [`SyncError::UnsupportedVersion`] (client) or a `RootCompare` error naming both versions
    /// (server).
    pub min_protocol_version: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            wire_digest_width: 8,
            page_items: 1024,
            page_bytes: 4 << 20,
            apply_batch: 4096,
            leaf_list_max: 16,
            preview: false,
            max_backlog: 8 * 1024,
            protocol_version: crate::wire::PROTOCOL_VERSION,
            min_protocol_version: 1,
        }
    }
}

impl Config {
    /// Checks the bounds that do not depend on the tree shape.
    pub fn validate(&self) -> Result<(), SyncError> {
        let bad = |field: &'static str, value: u64, reason: &'static str| {
            Err(SyncError::Config {
                field,
                value,
                reason,
            })
        };
        if !(8..=64).contains(&self.wire_digest_width) {
            return bad(
                "wire_digest_width",
                self.wire_digest_width as u64,
                "must lie in 8..=64",
            );
        }
        if self.page_items == 0 || self.page_items > crate::wire::MAX_PAGE_ITEMS {
            return bad(
                "page_items",
                self.page_items as u64,
                "must lie in 1..=65536",
            );
        }
        if self.page_bytes < 4096 || self.page_bytes > propd_proto::MAX_MESSAGE_BYTES / 4 {
            return bad(
                "page_bytes",
                self.page_bytes as u64,
                "must lie in 4096..=MAX_MESSAGE_BYTES/4",
            );
        }
        if self.apply_batch == 0 || self.apply_batch > crate::wire::MAX_PAGE_ITEMS {
            return bad(
                "apply_batch",
                self.apply_batch as u64,
                "must lie in 1..=65536",
            );
        }
        if !(1..=crate::wire::PROTOCOL_VERSION).contains(&self.protocol_version) {
            return bad(
                "protocol_version",
                self.protocol_version as u64,
                "must lie in 1..=PROTOCOL_VERSION",
            );
        }
        if !(1..=self.protocol_version).contains(&self.min_protocol_version) {
            return bad(
                "min_protocol_version",
                self.min_protocol_version as u64,
                "must lie in 1..=protocol_version",
            );
        }
        if self.max_backlog < self.page_items {
            return bad(
                "max_backlog",
                self.max_backlog as u64,
                "must be at least page_items",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        Config::default().validate().expect("defaults");
        let err = Config {
            wire_digest_width: 4,
            ..Config::default()
        }
        .validate();
        assert!(matches!(
            err,
            Err(SyncError::Config {
                field: "wire_digest_width",
                value: 4,
                ..
            })
        ));
        let err = Config {
            max_backlog: 1,
            ..Config::default()
        }
        .validate();
        assert!(matches!(
            err,
            Err(SyncError::Config {
                field: "max_backlog",
                ..
            })
        ));
        assert!(Config::default().page_bytes * 4 <= propd_proto::MAX_MESSAGE_BYTES);
    }

    /// Each bound at its edges: the last value accepted on either side, and the first refused,
    /// naming its field.
    #[test]
    fn every_bound_is_checked_at_its_edges() {
        use crate::wire::{MAX_PAGE_ITEMS, PROTOCOL_VERSION};
        let max_message = propd_proto::MAX_MESSAGE_BYTES;
        let accepted = |config: Config| {
            config
                .validate()
                .unwrap_or_else(|err| panic!("{config:?} refused: {err}"));
        };
        let refused = |config: Config, named: &str| match config.validate() {
            Err(SyncError::Config { field, .. }) => assert_eq!(field, named, "{config:?}"),
            other => panic!("{config:?}: expected {named} refused, got {other:?}"),
        };
        let wide = || Config {
            max_backlog: MAX_PAGE_ITEMS,
            ..Config::default()
        };
        for width in [8, 64] {
            accepted(Config {
                wire_digest_width: width,
                ..wide()
            });
        }
        for width in [7, 65] {
            refused(
                Config {
                    wire_digest_width: width,
                    ..wide()
                },
                "wire_digest_width",
            );
        }
        for items in [1, MAX_PAGE_ITEMS] {
            accepted(Config {
                page_items: items,
                ..wide()
            });
        }
        for items in [0, MAX_PAGE_ITEMS + 1] {
            refused(
                Config {
                    page_items: items,
                    ..wide()
                },
                "page_items",
            );
        }
        for bytes in [4096, max_message / 4] {
            accepted(Config {
                page_bytes: bytes,
                ..wide()
            });
        }
        for bytes in [4095, max_message / 4 + 1] {
            refused(
                Config {
                    page_bytes: bytes,
                    ..wide()
                },
                "page_bytes",
            );
        }
        for batch in [1, MAX_PAGE_ITEMS] {
            accepted(Config {
                apply_batch: batch,
                ..wide()
            });
        }
        for batch in [0, MAX_PAGE_ITEMS + 1] {
            refused(
                Config {
                    apply_batch: batch,
                    ..wide()
                },
                "apply_batch",
            );
        }
        for version in [1, PROTOCOL_VERSION] {
            accepted(Config {
                protocol_version: version,
                ..wide()
            });
        }
        for version in [0, PROTOCOL_VERSION + 1] {
            refused(
                Config {
                    protocol_version: version,
                    ..wide()
                },
                "protocol_version",
            );
        }
        let v2 = || Config {
            protocol_version: 2,
            ..wide()
        };
        for min in [1, 2] {
            accepted(Config {
                min_protocol_version: min,
                ..v2()
            });
        }
        for min in [0, 3] {
            refused(
                Config {
                    min_protocol_version: min,
                    ..v2()
                },
                "min_protocol_version",
            );
        }
        accepted(Config {
            page_items: 100,
            max_backlog: 100,
            ..wide()
        });
        refused(
            Config {
                page_items: 100,
                max_backlog: 99,
                ..wide()
            },
            "max_backlog",
        );
    }
}
