//! What one sync did: counts and bytes each way per tree level (the gossip trace and metrics read it).

use propd_proto::v1 as pb;

/// Traffic of one tree level, seen from the client. Level 0 is the root compare; levels
/// `1..=depth + 1` the descent (digests the client sent, differences and leaf lists it
/// received); level `depth + 2` the client's requests for the server's versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LevelTraffic {
    /// The level.
    pub level: u32,
    /// Node digests the client sent (version 3: node digests exchanged either way, since the
    /// two sides take turns).
    pub digests: u64,
    /// Leaf fingerprints the client received (at `depth + 2`: requested).
    pub fingerprints: u64,
    /// Bytes the client sent (encoded protobuf sizes).
    pub bytes_sent: u64,
    /// Bytes the client received.
    pub bytes_received: u64,
}

/// The client's account of one sync. Bytes are encoded protobuf message sizes
/// (`prost::Message::encoded_len` of each `RepairRequest` / `RepairResponse`), without gRPC and
/// HTTP/2 framing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// The roots matched: one round trip, nothing read.
    pub in_sync: bool,
    /// Nothing was applied (preview); `sent` and `requested` then say what a sync would move.
    pub preview: bool,
    /// Leaves compared leaf by leaf: the client's leaves under the listed nodes plus the
    /// server's versions that matched none of them.
    pub compared: u64,
    /// Copies the client sent.
    pub sent: u64,
    /// Server versions the client asked for.
    pub requested: u64,
    /// Copies the client received.
    pub received: u64,
    /// Received copies the client stored (they were newer).
    pub applied: u64,
    /// Received copies the client's store failed to apply.
    pub failed: u64,
    /// Copies the server stored.
    pub peer_applied: u64,
    /// Copies the server's store failed to apply.
    pub peer_failed: u64,
    /// Bytes the client sent.
    pub bytes_sent: u64,
    /// Bytes the client received.
    pub bytes_received: u64,
    /// Bytes of the property records in `PropertySync` pages, both ways: what an ideal protocol
    /// would also send. Everything else is tree traffic.
    pub record_bytes: u64,
    /// Per level, from 0 (root compare) to `depth + 2` (requests).
    pub levels: Vec<LevelTraffic>,
    /// Copies received through the bulk path (part of `received`): the server's properties
    /// under nodes the client lacked, sent without a fingerprint list.
    pub streamed: u64,
    /// The protocol version the sync ran at (0 until the server answered).
    pub protocol_version: u32,
    /// Round trips the sync took: half the one-way trips, rounded up, on its longest chain of
    /// messages each sent in answer to the one before, from `TreeRoot` to the client's last
    /// received message (1 for an in-sync check). A count of the protocol's structure, the same
    /// whatever the network's timing.
    pub round_trips: u32,
    /// Buckets settled by the server's leaf hints whose check failed (two different leaves
    /// shared a short fingerprint), so that they were listed in full: each such sync took one
    /// round trip more.
    pub rechecked: u64,
}

impl SyncReport {
    /// Bytes both ways that are not property records: the cost of finding the differences.
    pub fn tree_bytes(&self) -> u64 {
        (self.bytes_sent + self.bytes_received).saturating_sub(self.record_bytes)
    }

    pub(crate) fn with_levels(levels: u32) -> Self {
        SyncReport {
            levels: (0..levels)
                .map(|level| LevelTraffic {
                    level,
                    ..LevelTraffic::default()
                })
                .collect(),
            ..SyncReport::default()
        }
    }

    pub(crate) fn level_mut(&mut self, level: u32) -> Option<&mut LevelTraffic> {
        self.levels.get_mut(level as usize)
    }
}

impl From<&SyncReport> for pb::SyncReport {
    fn from(report: &SyncReport) -> Self {
        pb::SyncReport {
            compared: report.compared,
            sent: report.sent,
            received: report.received,
            applied: report.applied,
            failed: report.failed,
            bytes_sent: report.bytes_sent,
            bytes_received: report.bytes_received,
            levels: report
                .levels
                .iter()
                .map(|l| pb::LevelBytes {
                    level: l.level,
                    digests: l.digests,
                    bytes: l.bytes_sent,
                    bytes_received: l.bytes_received,
                    fingerprints: l.fingerprints,
                })
                .collect(),
            peer_applied: report.peer_applied,
            peer_failed: report.peer_failed,
            record_bytes: report.record_bytes,
            requested: report.requested,
            preview: report.preview,
            in_sync: report.in_sync,
            streamed: report.streamed,
            protocol_version: report.protocol_version,
            round_trips: report.round_trips,
        }
    }
}

/// The server's account of one sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerReport {
    /// The roots matched.
    pub in_sync: bool,
    /// The client asked for a preview: nothing was applied.
    pub preview: bool,
    /// Copies received from the client.
    pub received: u64,
    /// Received copies stored (they were newer).
    pub applied: u64,
    /// Received copies the store failed to apply.
    pub failed: u64,
    /// Copies sent to the client (answers to requests, newer copies sent back and the bulk
    /// stream).
    pub sent: u64,
    /// Copies sent through the bulk path (part of `sent`).
    pub streamed: u64,
    /// The protocol version the sync ran at.
    pub protocol_version: u32,
    /// Bytes sent (encoded protobuf sizes).
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Buckets the client settled by our leaf hints that we listed in full, a check having
    /// failed.
    pub rechecked: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of a report crosses to its wire form, each to its own field (distinct
    /// values, so that a swap shows).
    #[test]
    fn a_report_keeps_every_field_on_the_wire() {
        let report = SyncReport {
            in_sync: true,
            preview: true,
            compared: 1,
            sent: 2,
            requested: 3,
            received: 4,
            applied: 5,
            failed: 6,
            peer_applied: 7,
            peer_failed: 8,
            bytes_sent: 9,
            bytes_received: 10,
            record_bytes: 11,
            levels: vec![LevelTraffic {
                level: 12,
                digests: 13,
                fingerprints: 14,
                bytes_sent: 15,
                bytes_received: 16,
            }],
            streamed: 17,
            protocol_version: 18,
            round_trips: 19,
            rechecked: 20,
        };
        let wire = pb::SyncReport::from(&report);
        assert_eq!(
            wire,
            pb::SyncReport {
                compared: 1,
                sent: 2,
                received: 4,
                applied: 5,
                failed: 6,
                bytes_sent: 9,
                bytes_received: 10,
                levels: vec![pb::LevelBytes {
                    level: 12,
                    digests: 13,
                    bytes: 15,
                    bytes_received: 16,
                    fingerprints: 14,
                }],
                peer_applied: 7,
                peer_failed: 8,
                record_bytes: 11,
                requested: 3,
                preview: true,
                in_sync: true,
                streamed: 17,
                protocol_version: 18,
                round_trips: 19,
            }
        );
    }
}
