//! Domain types of a propagation: the context every hop carries, the trace, the result.
//!
//! These are plain Rust values, not protobuf messages; `crate::convert` maps them to and from
//! the wire at the edge.

use std::fmt;
use std::time::Duration;

/// A member's identity as the membership knows it (for example `"node-3"`).
///
/// Not to be confused with `propd_merkle::NodeId`, a node of a Merkle tree.
pub type MemberId = String;

/// A point in time: milliseconds since the unix epoch on the caller's clock.
///
/// The state machine never reads a clock; every input carries the time as one of these.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    /// This time moved `duration` later (saturating).
    #[must_use]
    pub fn plus(self, duration: Duration) -> Millis {
        let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Millis(self.0.saturating_add(ms))
    }

    /// The time from `earlier` to this time, zero when `earlier` is later.
    #[must_use]
    pub fn since(self, earlier: Millis) -> Duration {
        let ms = self.0.saturating_sub(earlier.0);
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// The (group, shard) a propagation repairs. At most one propagation per key runs on a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    /// The group's name.
    pub group: String,
    /// The shard number within the group.
    pub shard: u32,
}

impl fmt::Display for ShardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.group, self.shard)
    }
}

/// The unique id of one propagation, chosen by its origin (`origin-startms-counter`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub String);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The count of syncs plus skips after which a round over `n` nodes ends: `2n - 3`.
///
/// Returns `None` for `n < 2`, where there is nothing to propagate. The argument for the
/// bound is in `docs/protocol.md` ("Propagation").
#[must_use]
pub fn max_count(n: usize) -> Option<u32> {
    if n < 2 {
        return None;
    }
    u32::try_from(n).ok()?.checked_mul(2)?.checked_sub(3)
}

/// The context every hop of a propagation carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Context {
    /// The shard's node list in placement order.
    pub nodes: Vec<MemberId>,
    /// `2n - 3`: syncs plus skips after which the round ends.
    pub max_count: u32,
    /// Syncs and skips counted so far.
    pub count: u32,
    /// The node that started the round and receives its result.
    pub origin: MemberId,
    /// The round's unique id.
    pub message_id: MessageId,
    /// The (group, shard) being repaired.
    pub key: ShardKey,
    /// When the origin started the round.
    pub started_at: Millis,
    /// Compute differences without applying them.
    pub preview: bool,
}

impl Context {
    /// The position of `node` in the node list.
    #[must_use]
    pub fn index_of(&self, node: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n == node)
    }

    /// The index after `index`, wrapping round the node list.
    #[must_use]
    pub fn next_index(&self, index: usize) -> usize {
        (index + 1) % self.nodes.len().max(1)
    }
}

/// What one sync did, from the side that held the propagation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entities whose digests were compared at the leaves.
    pub compared: u64,
    /// Properties sent to the peer.
    pub sent: u64,
    /// Properties received from the peer.
    pub received: u64,
    /// Received properties the holder applied (they were newer than its copies).
    pub applied: u64,
    /// Received properties the holder failed to apply (counted and traced; the sync went on).
    pub failed: u64,
    /// Sent properties the peer applied.
    pub peer_applied: u64,
    /// Sent properties the peer failed to apply.
    pub peer_failed: u64,
    /// Bytes sent to the peer.
    pub bytes_sent: u64,
    /// Bytes received from the peer.
    pub bytes_received: u64,
    /// Round trips the sync took (`propd_repair::SyncReport::round_trips`; 0 from a node that
    /// predates the count).
    pub round_trips: u32,
}

/// Whether a trace span is a sync or a skip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpanKind {
    /// A pairwise sync between `from` and `to` ran (possibly failing part-way).
    Sync,
    /// `to` could not be reached from `from` and was skipped.
    Skip,
}

/// One entry of a round's trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceSpan {
    /// Sync or skip.
    pub kind: SpanKind,
    /// The node that held the propagation.
    pub from: MemberId,
    /// The peer it synced with or skipped.
    pub to: MemberId,
    /// When the step began.
    pub start: Millis,
    /// How long it took.
    pub duration: Duration,
    /// What the sync did, when it ran.
    pub report: Option<SyncReport>,
    /// Why the step failed, `None` on success.
    pub error: Option<String>,
    /// The round's count right after this step: a sync or a skip counts one, except the
    /// origin's own skips and a failed sync (which ends the round).
    pub count: u32,
}

/// A propagation as handed from one node to the next: its context and the trace so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Propagation {
    /// The context.
    pub context: Context,
    /// The spans recorded so far, in order.
    pub trace: Vec<TraceSpan>,
}

/// A round's progress as a holder reports it to the origin after each step: the context and
/// the whole trace so far, so that a report lost or overtaken by a later one loses nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The round as it is on the holder after the step.
    pub propagation: Propagation,
    /// The holder.
    pub reported_by: MemberId,
}

/// One step (a sync or a skip) of a round started here, as the origin learns of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoundStep {
    /// The round.
    pub message_id: MessageId,
    /// Its (group, shard).
    pub key: ShardKey,
    /// Its `2n - 3`: [`TraceSpan::count`] of `max_count` steps are done after this one.
    pub max_count: u32,
    /// The position of the step in the round's trace, from 0.
    pub index: u32,
    /// The step.
    pub span: TraceSpan,
}

/// The steps of the trace of the round in `context` from position `from` on.
#[must_use]
pub fn round_steps(context: &Context, trace: &[TraceSpan], from: usize) -> Vec<RoundStep> {
    trace
        .iter()
        .enumerate()
        .skip(from)
        .map(|(index, span)| RoundStep {
            message_id: context.message_id.clone(),
            key: context.key.clone(),
            max_count: context.max_count,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            span: span.clone(),
        })
        .collect()
}

/// How a round ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The count was spent: all reachable copies are identical.
    Completed,
    /// No reachable successor was left before the count was spent.
    NoPeers,
    /// A failure (a sync error, an invalid hand-off) ended the round.
    Aborted,
    /// A node refused the round because one was already running there for the same shard.
    Refused,
    /// A sync or the whole round exceeded its timeout, or a stuck round was taken over.
    TimedOut,
}

/// The result of a round, sent to its origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PropagationResult {
    /// The context as it was when the round ended.
    pub context: Context,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it did not complete, `None` when it completed.
    pub error: Option<String>,
    /// Every sync and skip, in order.
    pub trace: Vec<TraceSpan>,
    /// The node that ended the round.
    pub reported_by: MemberId,
}

impl PropagationResult {
    /// The number of sync spans in the trace.
    #[must_use]
    pub fn syncs(&self) -> usize {
        self.trace
            .iter()
            .filter(|s| s.kind == SpanKind::Sync)
            .count()
    }

    /// The number of skip spans in the trace.
    #[must_use]
    pub fn skips(&self) -> usize {
        self.trace
            .iter()
            .filter(|s| s.kind == SpanKind::Skip)
            .count()
    }

    /// Whether the round completed without skipping any node: every copy of the shard took
    /// part, so every copy now holds the newest version of every entity (the condition for
    /// purging tombstones older than the round).
    #[must_use]
    pub fn reached_every_copy(&self) -> bool {
        self.outcome == Outcome::Completed && self.skips() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_count_is_two_n_minus_three_from_two_nodes() {
        assert_eq!(max_count(0), None);
        assert_eq!(max_count(1), None);
        assert_eq!(max_count(2), Some(1));
        assert_eq!(max_count(3), Some(3));
        assert_eq!(max_count(5), Some(7));
    }

    #[test]
    fn times_and_shards_read_as_errors_and_logs_name_them() {
        assert_eq!(Millis(1_500).to_string(), "1500ms");
        let key = ShardKey {
            group: "orders".into(),
            shard: 3,
        };
        assert_eq!(key.to_string(), "orders/3");
    }

    #[test]
    fn millis_arithmetic_saturates() {
        assert_eq!(Millis(5).since(Millis(9)), Duration::ZERO);
        assert_eq!(Millis(9).since(Millis(5)), Duration::from_millis(4));
        assert_eq!(
            Millis(i64::MAX).plus(Duration::from_secs(1)),
            Millis(i64::MAX)
        );
    }
}
