//! Typed errors of a sync: refusals, shape mismatches, protocol violations, store and transport failures.

use propd_merkle::{EntityError, Shape};

/// Why a sync failed. Finding differences is not an error; failing to apply one property is
/// counted in the report, not raised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The peer does not hold the (group, shard).
    #[error("the peer holds no tree for group {group:?} shard {shard}: {reason}")]
    TreeNotFound {
        /// The group.
        group: String,
        /// The shard.
        shard: u32,
        /// The peer's explanation.
        reason: String,
    },
    /// This node does not hold the (group, shard) it was asked to sync.
    #[error("this node holds no tree for group {group:?} shard {shard}")]
    NoLocalTree {
        /// The group.
        group: String,
        /// The shard.
        shard: u32,
    },
    /// The two trees have different shapes.
    #[error("tree shapes differ: ours {ours:?}, the peer's {theirs:?}")]
    ShapeMismatch {
        /// Our shape.
        ours: Shape,
        /// The peer's shape, when it could be decoded.
        theirs: Option<Shape>,
    },
    /// The peer refused the sync at the root compare for another reason (for example a wire
    /// digest width it does not accept).
    #[error("the peer refused the sync: {reason}")]
    Refused {
        /// The peer's explanation.
        reason: String,
    },
    /// The peer speaks no protocol version this node accepts.
    #[error(
        "the peer speaks protocol version {peer} at most, this node speaks versions {min}..={max}"
    )]
    UnsupportedVersion {
        /// The highest version the peer speaks (its `RootCompare.protocol_version`).
        peer: u32,
        /// The lowest version this node accepts.
        min: u32,
        /// The highest version this node speaks.
        max: u32,
    },
    /// The peer was reached and ended the call with an error status (transport driver only):
    /// `INVALID_ARGUMENT` when it judged a message of ours malformed or out of protocol order,
    /// `INTERNAL` when its store failed, and so on. A status that means the peer could not be
    /// reached is a [`SyncError::Transport`] instead (`propd_proto::peer::is_unreachable`).
    #[cfg(feature = "transport")]
    #[error("the peer refused the sync with {code:?}: {message}")]
    PeerRefused {
        /// The status code the peer answered.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// The peer broke the protocol; nothing more was applied after it.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The local store failed.
    #[error("store failed while {operation}: {source}")]
    Store {
        /// What the sync was doing.
        operation: &'static str,
        /// The store's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A configuration value is out of bounds.
    #[error("config field `{field}` = {value}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// The rejected value.
        value: u64,
        /// The bound.
        reason: &'static str,
    },
    /// The peer could not be reached or the stream broke (transport driver only).
    #[error("repair stream failed: {message}")]
    Transport {
        /// The gRPC status or IO error, as text.
        message: String,
    },
    /// No message went either way for the idle timeout (transport driver only).
    #[error("sync made no progress for {millis} ms")]
    Timeout {
        /// The idle timeout in milliseconds.
        millis: u64,
    },
    /// The peer closed the stream before the sync ended.
    #[error("the peer closed the stream during {phase}")]
    PeerClosed {
        /// The phase the sync was in.
        phase: &'static str,
    },
}

/// What a failed sync means for the propagation round that ran it (docs/protocol.md, "The
/// rules", rule 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The peer could not be reached, or has nothing to sync: skip it and go on with the node
    /// after it.
    Skip,
    /// The sync itself failed: abort the round.
    Abort,
}

impl SyncError {
    /// Whether the round skips the peer or aborts, decided here for every kind of failure.
    ///
    /// Skipped: an unreachable peer or broken stream ([`SyncError::Transport`],
    /// [`SyncError::PeerClosed`]), a sync past its timeout, and a peer that holds no tree for
    /// the shard. Everything else aborts: a refusal by the peer (at the root compare or with an
    /// error status), a shape mismatch, a protocol violation, a local store or configuration
    /// failure, and a shard this node does not hold.
    #[must_use]
    pub fn disposition(&self) -> Disposition {
        match self {
            SyncError::Transport { .. }
            | SyncError::PeerClosed { .. }
            | SyncError::Timeout { .. }
            | SyncError::TreeNotFound { .. } => Disposition::Skip,
            SyncError::NoLocalTree { .. }
            | SyncError::ShapeMismatch { .. }
            | SyncError::Refused { .. }
            | SyncError::UnsupportedVersion { .. }
            | SyncError::Protocol(_)
            | SyncError::Store { .. }
            | SyncError::Config { .. } => Disposition::Abort,
            #[cfg(feature = "transport")]
            SyncError::PeerRefused { .. } => Disposition::Abort,
        }
    }

    pub(crate) fn store<E: std::error::Error + Send + Sync + 'static>(
        operation: &'static str,
    ) -> impl FnOnce(E) -> SyncError {
        move |source| SyncError::Store {
            operation,
            source: Box::new(source),
        }
    }
}

/// A message the peer should not have sent: malformed, or out of protocol order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A message that the current phase does not accept.
    #[error("unexpected {message} while {phase}")]
    Unexpected {
        /// What the receiver was doing.
        phase: &'static str,
        /// The message kind.
        message: &'static str,
    },
    /// A message with an empty `msg` oneof.
    #[error("message without content")]
    Empty,
    /// A page of another level than the one in progress.
    #[error("{message} for level {found}, expected level {expected}")]
    Level {
        /// The message kind.
        message: &'static str,
        /// The level in progress.
        expected: u32,
        /// The level in the message.
        found: u32,
    },
    /// A field that does not decode.
    #[error("malformed `{field}`: {reason}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Leaves, a request or a copy for a node the protocol did not name.
    #[error("{message} names node {level}:{index}, which the sync did not list")]
    UnlistedNode {
        /// The message kind.
        message: &'static str,
        /// The node's level.
        level: u32,
        /// The node's index.
        index: u64,
    },
    /// A property the receiver could not accept as part of this sync.
    #[error("property {entity:?} rejected: {reason}")]
    Property {
        /// The entity as received.
        entity: String,
        /// Why.
        #[source]
        reason: PropertyError,
    },
    /// More entries in a page than the protocol allows.
    #[error("`{field}` holds {count} entries, more than {max}")]
    PageTooLarge {
        /// The field.
        field: &'static str,
        /// The count.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// Why a received property is not accepted: it does not convert to a valid domain property, or
/// it does not belong to the sync that carried it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PropertyError {
    /// The group, name and id do not form a valid entity.
    #[error(transparent)]
    Entity(#[from] EntityError),
    /// A tag without a value.
    #[error("tag {key:?} has no value")]
    TagWithoutValue {
        /// The tag's key.
        key: String,
    },
    /// A tag key given twice.
    #[error("tag {key:?} appears twice")]
    RepeatedTag {
        /// The tag's key.
        key: String,
    },
    /// A negative deletion time.
    #[error("delete_time {delete_time} is negative")]
    NegativeDeleteTime {
        /// The received value.
        delete_time: i64,
    },
    /// A property of another group than the one synced.
    #[error("group is not the synced group {synced:?}")]
    OtherGroup {
        /// The synced group.
        synced: String,
    },
    /// A property whose bucket lies under no node the sync listed.
    #[error("its bucket lies under no node listed in this sync")]
    Unlisted,
}

pub(crate) fn malformed(field: &'static str, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_out_of_reach_or_without_the_tree_is_skipped() {
        let skipped = [
            SyncError::Transport {
                message: "Unavailable: tcp connect error".into(),
            },
            SyncError::PeerClosed { phase: "receiving" },
            SyncError::Timeout { millis: 5000 },
            SyncError::TreeNotFound {
                group: "g".into(),
                shard: 3,
                reason: "no tree".into(),
            },
        ];
        for error in &skipped {
            assert_eq!(error.disposition(), Disposition::Skip, "{error:?}");
        }
    }

    #[test]
    fn a_failed_or_refused_sync_aborts() {
        let aborted = [
            SyncError::NoLocalTree {
                group: "g".into(),
                shard: 3,
            },
            SyncError::ShapeMismatch {
                ours: Shape::default(),
                theirs: None,
            },
            SyncError::Refused {
                reason: "wire_digest_width 4 is outside 8..=32".into(),
            },
            SyncError::UnsupportedVersion {
                peer: 2,
                min: 3,
                max: 3,
            },
            SyncError::Protocol(ProtocolError::Empty),
            SyncError::Store {
                operation: "reading the root",
                source: Box::new(std::io::Error::other("disk gone")),
            },
            SyncError::Config {
                field: "page_items",
                value: 0,
                reason: "must be positive",
            },
        ];
        for error in &aborted {
            assert_eq!(error.disposition(), Disposition::Abort, "{error:?}");
        }
    }

    #[cfg(feature = "transport")]
    #[test]
    fn a_peers_error_status_aborts() {
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::Internal,
            tonic::Code::Aborted,
        ] {
            let error = SyncError::PeerRefused {
                code,
                message: "x".into(),
            };
            assert_eq!(error.disposition(), Disposition::Abort, "{error:?}");
        }
    }
}
