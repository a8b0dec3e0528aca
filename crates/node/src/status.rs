//! What this node knows of the cluster, gathered in one place for the admin `status` call, the
//! status page's `/status.json` and the `propd_last_repair_age_seconds` gauge, so that the three
//! always agree.

use std::sync::Arc;

use propd_gossip::{Outcome, PropagationResult, ShardKey, SpanKind};
use serde::Serialize;
use tonic::Status;

use crate::coordinator::blocking;
use crate::membership::MembershipView;
use crate::moves::MoveView;
use crate::node::{NodeState, lock, now_millis, now_nanos};
use crate::sync::Gossip;
use crate::tombstones::purge_blocked;

/// How many recent rounds the status page shows.
pub(crate) const RECENT_ROUNDS: usize = 20;

/// The node's view of the cluster, as `/status.json` serves it.
#[derive(Debug, Serialize)]
pub(crate) struct ClusterView {
    /// This node's id.
    pub(crate) node: String,
    /// The propd version it runs.
    pub(crate) version: &'static str,
    /// When the view was taken, unix milliseconds.
    pub(crate) now_ms: u64,
    /// `repair.enabled`.
    pub(crate) repair_enabled: bool,
    /// Background repair paused by an operator.
    pub(crate) repair_paused: bool,
    /// Every member and whether it answers.
    pub(crate) members: Vec<MemberView>,
    /// Every (group, shard) this node holds a copy of.
    pub(crate) shards: Vec<ShardView>,
    /// The recent rounds this node started, newest first.
    pub(crate) rounds: Vec<RoundView>,
    /// Whether the store serves: `ok`, or why not, as `/health` says it.
    pub(crate) store_health: String,
    /// Rows the store's quarantine table holds (they failed their check).
    pub(crate) quarantined: u64,
    /// Where the membership comes from and whether that source answers.
    pub(crate) membership: MembershipView,
    /// Shards on the move: old copies kept until the new copy set completes a round.
    pub(crate) moves: Vec<MoveView>,
}

/// The store's health (`ok` or why it cannot fully serve) and the rows it keeps quarantined.
pub(crate) async fn store(node: &Arc<NodeState>) -> Result<(String, u64), Status> {
    let quarantined = blocking(node, |node| node.store.quarantined_count()).await?;
    let health = node.store_fault().unwrap_or_else(|| "ok".to_owned());
    Ok((health, quarantined))
}

/// One member as this node sees it.
#[derive(Debug, Serialize)]
pub(crate) struct MemberView {
    pub(crate) id: String,
    pub(crate) addr: String,
    /// The result of the last liveness probe or call.
    pub(crate) up: bool,
}

/// One (group, shard) this node holds a copy of.
#[derive(Debug, Serialize)]
pub(crate) struct ShardView {
    pub(crate) group: String,
    pub(crate) shard: u32,
    /// Its copies, in placement order.
    pub(crate) copies: Vec<String>,
    /// Start of the last round that reached every copy, unix milliseconds.
    pub(crate) last_complete_round_ms: Option<i64>,
    /// Age of that round in whole seconds.
    pub(crate) last_repair_age_s: Option<i64>,
    /// Members a write to this shard missed, waiting for them to answer again.
    pub(crate) pending_write_misses: u64,
    /// The round running for this shard with this node as origin.
    pub(crate) running_round: Option<String>,
    /// The cutoff the last round that completed for purging gave this copy (unix
    /// milliseconds); `None` until such a round.
    pub(crate) purge_cutoff_ms: Option<i64>,
    /// The purge line this copy last used (unix milliseconds): tombstones below it are gone and
    /// never stored again; `None` before the first purge.
    pub(crate) purged_below_ms: Option<i64>,
    /// Why purging waits for a round (which copies are down, since when); `None` when it does
    /// not.
    pub(crate) purge_blocked: Option<String>,
}

/// One finished round and its trace.
#[derive(Debug, Serialize)]
pub(crate) struct RoundView {
    pub(crate) message_id: String,
    pub(crate) group: String,
    pub(crate) shard: u32,
    pub(crate) outcome: &'static str,
    pub(crate) error: Option<String>,
    pub(crate) reported_by: String,
    pub(crate) started_ms: i64,
    /// The end of its last step (its start when it has none).
    pub(crate) ended_ms: i64,
    pub(crate) spans: Vec<StepView>,
}

/// One sync or skip of a round.
#[derive(Debug, Serialize)]
pub(crate) struct StepView {
    /// `sync` or `skip`.
    pub(crate) kind: &'static str,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) start_ms: i64,
    pub(crate) duration_ms: u64,
    pub(crate) compared: u64,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) applied: u64,
    pub(crate) failed: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) error: Option<String>,
}

/// The name of a round's outcome, as the status page and the exported spans show it.
pub(crate) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Completed => "completed",
        Outcome::NoPeers => "no_peers",
        Outcome::Aborted => "aborted",
        Outcome::Refused => "refused",
        Outcome::TimedOut => "timed_out",
    }
}

/// The name of a step of a round's trace: `sync` or `skip`.
pub(crate) fn step_name(kind: SpanKind) -> &'static str {
    match kind {
        SpanKind::Sync => "sync",
        SpanKind::Skip => "skip",
    }
}

/// Whole seconds from `at_ns` to `now_ns`, never negative.
fn age_seconds(now_ns: i64, at_ns: i64) -> i64 {
    (now_ns.saturating_sub(at_ns) / 1_000_000_000).max(0)
}

/// The members as this node sees them.
pub(crate) fn members(node: &NodeState) -> Vec<MemberView> {
    node.placement()
        .members()
        .iter()
        .map(|member| MemberView {
            id: member.id.clone(),
            addr: member.addr.to_string(),
            up: node.peers.is_up(&member.id),
        })
        .collect()
}

/// Every (group, shard) this node holds, with what it knows of its repair.
pub(crate) async fn shards(
    node: &Arc<NodeState>,
    gossip: &Gossip,
) -> Result<Vec<ShardView>, Status> {
    let keys = node.local_shards();
    let states = {
        let keys = keys.clone();
        blocking(node, move |node| {
            keys.iter()
                .map(|(group, shard)| node.store.purge_state(group, *shard))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?
    };
    let now = now_nanos();
    let grace = node.config.repair.tombstone_grace;
    let mut shards = Vec::with_capacity(keys.len());
    for ((group, shard), state) in keys.into_iter().zip(states) {
        let copies = node
            .placement()
            .group(&group)
            .map(|def| node.node_ids(def, shard))
            .unwrap_or_default();
        let running = gossip.running(&ShardKey {
            group: group.clone(),
            shard,
        });
        let pending_write_misses = lock(&node.misses).pending(&group, shard);
        let last = state.last_complete_round;
        let down: Vec<String> = copies
            .iter()
            .filter(|id| !node.peers.is_up(id))
            .cloned()
            .collect();
        let purge_blocked = purge_blocked(copies.len(), last, now, grace, &down);
        shards.push(ShardView {
            copies,
            last_complete_round_ms: last.map(|at| at / 1_000_000),
            last_repair_age_s: last.map(|at| age_seconds(now, at)),
            pending_write_misses,
            running_round: running.map(|id| id.to_string()),
            purge_cutoff_ms: state.cutoff.map(|cutoff| cutoff / 1_000_000),
            purged_below_ms: (state.purged_below > 0).then_some(state.purged_below / 1_000_000),
            purge_blocked,
            group,
            shard,
        });
    }
    Ok(shards)
}

/// A finished round as the status page draws it.
pub(crate) fn round_view(result: &PropagationResult) -> RoundView {
    let context = &result.context;
    let spans: Vec<StepView> = result
        .trace
        .iter()
        .map(|step| {
            let report = step.report.unwrap_or_default();
            StepView {
                kind: step_name(step.kind),
                from: step.from.clone(),
                to: step.to.clone(),
                start_ms: step.start.0,
                duration_ms: step.duration.as_millis() as u64,
                compared: report.compared,
                sent: report.sent,
                received: report.received,
                applied: report.applied,
                failed: report.failed,
                bytes_sent: report.bytes_sent,
                bytes_received: report.bytes_received,
                error: step.error.clone(),
            }
        })
        .collect();
    let ended_ms = spans
        .iter()
        .map(|step| step.start_ms.saturating_add(step.duration_ms as i64))
        .fold(context.started_at.0, i64::max);
    RoundView {
        message_id: context.message_id.to_string(),
        group: context.key.group.clone(),
        shard: context.key.shard,
        outcome: outcome_name(result.outcome),
        error: result.error.clone(),
        reported_by: result.reported_by.clone(),
        started_ms: context.started_at.0,
        ended_ms,
        spans,
    }
}

/// The whole view: members, shards and the last [`RECENT_ROUNDS`] rounds started here.
pub(crate) async fn cluster_view(
    node: &Arc<NodeState>,
    gossip: &Gossip,
) -> Result<ClusterView, Status> {
    let shards = shards(node, gossip).await?;
    let (store_health, quarantined) = store(node).await?;
    let recent = gossip.recent_results();
    let rounds = recent
        .iter()
        .rev()
        .take(RECENT_ROUNDS)
        .map(round_view)
        .collect();
    Ok(ClusterView {
        node: node.me().to_owned(),
        version: env!("CARGO_PKG_VERSION"),
        now_ms: now_millis(),
        repair_enabled: node.config.repair.enabled,
        repair_paused: node.is_paused(),
        members: members(node),
        shards,
        rounds,
        store_health,
        quarantined,
        membership: lock(&node.membership).clone(),
        moves: lock(&node.moves).views(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use propd_gossip::{Context, MessageId, Millis, SyncReport, TraceSpan};

    use super::*;

    /// One step of a trace; a sync moved 3 properties out and 1 in (900 and 70 bytes).
    pub(crate) fn step(
        kind: SpanKind,
        from: &str,
        to: &str,
        start: i64,
        ms: u64,
        error: Option<&str>,
    ) -> TraceSpan {
        TraceSpan {
            kind,
            from: from.to_owned(),
            to: to.to_owned(),
            start: Millis(start),
            duration: Duration::from_millis(ms),
            report: (kind == SpanKind::Sync).then_some(SyncReport {
                sent: 3,
                received: 1,
                bytes_sent: 900,
                bytes_received: 70,
                ..SyncReport::default()
            }),
            error: error.map(str::to_owned),
            count: 1,
        }
    }

    /// A round of g/2 over n1, n2, n3 that n1 started at 1000 ms.
    pub(crate) fn finished_round(
        outcome: Outcome,
        error: Option<&str>,
        trace: Vec<TraceSpan>,
    ) -> PropagationResult {
        PropagationResult {
            context: Context {
                nodes: vec!["n1".into(), "n2".into(), "n3".into()],
                max_count: 3,
                count: 3,
                origin: "n1".into(),
                message_id: MessageId("n1-1000-1".into()),
                key: ShardKey {
                    group: "g".into(),
                    shard: 2,
                },
                started_at: Millis(1_000),
                preview: false,
            },
            outcome,
            error: error.map(str::to_owned),
            trace,
            reported_by: "n3".into(),
        }
    }

    #[test]
    fn a_round_view_keeps_each_step_and_ends_with_the_last_one() {
        let result = finished_round(
            Outcome::Completed,
            None,
            vec![
                step(SpanKind::Sync, "n1", "n2", 1_010, 40, None),
                step(SpanKind::Sync, "n2", "n3", 1_005, 10, None),
            ],
        );
        let view = round_view(&result);
        assert_eq!(view.outcome, "completed");
        assert_eq!((view.started_ms, view.ended_ms), (1_000, 1_050));
        assert_eq!(view.spans.len(), 2);
        assert_eq!(view.spans[0].kind, "sync");
        assert_eq!(
            (
                view.spans[0].sent,
                view.spans[0].received,
                view.spans[0].bytes_received
            ),
            (3, 1, 70)
        );
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["spans"][1]["from"], "n2");
        assert_eq!(json["error"], serde_json::Value::Null);
    }

    #[test]
    fn ages_are_whole_seconds_and_never_negative() {
        assert_eq!(age_seconds(5_999_999_999, 1_000_000_000), 4);
        assert_eq!(age_seconds(1_000_000_000, 3_000_000_000), 0);
    }
}
