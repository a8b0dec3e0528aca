//! Conversions between the domain types and the `propd.v1` gossip messages (the wire edge).

use std::time::Duration;

use propd_proto::v1 as pb;

use crate::types::{
    Context, MessageId, Millis, Outcome, Progress, Propagation, PropagationResult, RoundStep,
    ShardKey, SpanKind, SyncReport, TraceSpan,
};

/// A gossip message that cannot be turned into a domain value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// A required message field is absent.
    #[error("{message}.{field} is missing")]
    Missing {
        /// The message.
        message: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An enum field holds a value this version does not know (or `UNSPECIFIED`).
    #[error("{message}.{field} has unknown value {value}")]
    UnknownEnum {
        /// The message.
        message: &'static str,
        /// The field.
        field: &'static str,
        /// The value received.
        value: i32,
    },
}

impl From<SyncReport> for pb::SyncReport {
    fn from(r: SyncReport) -> Self {
        pb::SyncReport {
            compared: r.compared,
            sent: r.sent,
            received: r.received,
            applied: r.applied,
            failed: r.failed,
            peer_applied: r.peer_applied,
            peer_failed: r.peer_failed,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            round_trips: r.round_trips,
            ..Default::default()
        }
    }
}

impl From<&pb::SyncReport> for SyncReport {
    fn from(r: &pb::SyncReport) -> Self {
        SyncReport {
            compared: r.compared,
            sent: r.sent,
            received: r.received,
            applied: r.applied,
            failed: r.failed,
            peer_applied: r.peer_applied,
            peer_failed: r.peer_failed,
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            round_trips: r.round_trips,
        }
    }
}

impl From<Context> for pb::PropagationContext {
    fn from(c: Context) -> Self {
        pb::PropagationContext {
            nodes: c.nodes,
            max_count: c.max_count,
            count: c.count,
            origin_node: c.origin,
            message_id: c.message_id.0,
            group: c.key.group,
            shard: c.key.shard,
            started_at_ms: c.started_at.0,
            preview: c.preview,
        }
    }
}

impl From<pb::PropagationContext> for Context {
    fn from(c: pb::PropagationContext) -> Self {
        Context {
            nodes: c.nodes,
            max_count: c.max_count,
            count: c.count,
            origin: c.origin_node,
            message_id: MessageId(c.message_id),
            key: ShardKey {
                group: c.group,
                shard: c.shard,
            },
            started_at: Millis(c.started_at_ms),
            preview: c.preview,
        }
    }
}

impl From<TraceSpan> for pb::TraceSpan {
    fn from(s: TraceSpan) -> Self {
        let kind = match s.kind {
            SpanKind::Sync => pb::trace_span::Kind::Sync,
            SpanKind::Skip => pb::trace_span::Kind::Skip,
        };
        pb::TraceSpan {
            kind: kind as i32,
            from: s.from,
            to: s.to,
            start_ms: s.start.0,
            duration_ms: u64::try_from(s.duration.as_millis()).unwrap_or(u64::MAX),
            report: s.report.map(Into::into),
            error: s.error.unwrap_or_default(),
            count: s.count,
        }
    }
}

impl TryFrom<pb::TraceSpan> for TraceSpan {
    type Error = ConvertError;

    fn try_from(s: pb::TraceSpan) -> Result<Self, ConvertError> {
        let kind = match pb::trace_span::Kind::try_from(s.kind) {
            Ok(pb::trace_span::Kind::Sync) => SpanKind::Sync,
            Ok(pb::trace_span::Kind::Skip) => SpanKind::Skip,
            _ => {
                return Err(ConvertError::UnknownEnum {
                    message: "TraceSpan",
                    field: "kind",
                    value: s.kind,
                });
            }
        };
        Ok(TraceSpan {
            kind,
            from: s.from,
            to: s.to,
            start: Millis(s.start_ms),
            duration: Duration::from_millis(s.duration_ms),
            report: s.report.as_ref().map(Into::into),
            error: (!s.error.is_empty()).then_some(s.error),
            count: s.count,
        })
    }
}

/// The context every propagation message must carry.
fn context_from(
    context: Option<pb::PropagationContext>,
    message: &'static str,
) -> Result<Context, ConvertError> {
    context.map(Context::from).ok_or(ConvertError::Missing {
        message,
        field: "context",
    })
}

fn trace_from(trace: Vec<pb::TraceSpan>) -> Result<Vec<TraceSpan>, ConvertError> {
    trace.into_iter().map(TraceSpan::try_from).collect()
}

impl From<Propagation> for pb::PropagationRequest {
    fn from(p: Propagation) -> Self {
        pb::PropagationRequest {
            context: Some(p.context.into()),
            trace: p.trace.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::PropagationRequest> for Propagation {
    type Error = ConvertError;

    fn try_from(r: pb::PropagationRequest) -> Result<Self, ConvertError> {
        let context = context_from(r.context, "PropagationRequest")?;
        Ok(Propagation {
            context,
            trace: trace_from(r.trace)?,
        })
    }
}

impl From<Progress> for pb::PropagationProgress {
    fn from(p: Progress) -> Self {
        pb::PropagationProgress {
            context: Some(p.propagation.context.into()),
            trace: p.propagation.trace.into_iter().map(Into::into).collect(),
            reported_by: p.reported_by,
        }
    }
}

impl TryFrom<pb::PropagationProgress> for Progress {
    type Error = ConvertError;

    fn try_from(p: pb::PropagationProgress) -> Result<Self, ConvertError> {
        Ok(Progress {
            propagation: Propagation {
                context: context_from(p.context, "PropagationProgress")?,
                trace: trace_from(p.trace)?,
            },
            reported_by: p.reported_by,
        })
    }
}

impl From<RoundStep> for pb::RoundStep {
    fn from(s: RoundStep) -> Self {
        pb::RoundStep {
            message_id: s.message_id.0,
            group: s.key.group,
            shard: s.key.shard,
            max_count: s.max_count,
            index: s.index,
            span: Some(s.span.into()),
        }
    }
}

impl From<Outcome> for pb::PropagationOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Completed => pb::PropagationOutcome::Completed,
            Outcome::NoPeers => pb::PropagationOutcome::NoPeers,
            Outcome::Aborted => pb::PropagationOutcome::Aborted,
            Outcome::Refused => pb::PropagationOutcome::Refused,
            Outcome::TimedOut => pb::PropagationOutcome::TimedOut,
        }
    }
}

impl From<PropagationResult> for pb::PropagationResult {
    fn from(r: PropagationResult) -> Self {
        pb::PropagationResult {
            context: Some(r.context.into()),
            outcome: pb::PropagationOutcome::from(r.outcome) as i32,
            error: r.error.unwrap_or_default(),
            trace: r.trace.into_iter().map(Into::into).collect(),
            reported_by: r.reported_by,
        }
    }
}

impl TryFrom<pb::PropagationResult> for PropagationResult {
    type Error = ConvertError;

    fn try_from(r: pb::PropagationResult) -> Result<Self, ConvertError> {
        let context = context_from(r.context, "PropagationResult")?;
        let outcome = match pb::PropagationOutcome::try_from(r.outcome) {
            Ok(pb::PropagationOutcome::Completed) => Outcome::Completed,
            Ok(pb::PropagationOutcome::NoPeers) => Outcome::NoPeers,
            Ok(pb::PropagationOutcome::Aborted) => Outcome::Aborted,
            Ok(pb::PropagationOutcome::Refused) => Outcome::Refused,
            Ok(pb::PropagationOutcome::TimedOut) => Outcome::TimedOut,
            _ => {
                return Err(ConvertError::UnknownEnum {
                    message: "PropagationResult",
                    field: "outcome",
                    value: r.outcome,
                });
            }
        };
        Ok(PropagationResult {
            context,
            outcome,
            error: (!r.error.is_empty()).then_some(r.error),
            trace: trace_from(r.trace)?,
            reported_by: r.reported_by,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> PropagationResult {
        PropagationResult {
            context: Context {
                nodes: vec!["a".into(), "b".into(), "c".into()],
                max_count: 3,
                count: 2,
                origin: "b".into(),
                message_id: MessageId("b-1-1".into()),
                key: ShardKey {
                    group: "g".into(),
                    shard: 4,
                },
                started_at: Millis(1_000),
                preview: true,
            },
            outcome: Outcome::Refused,
            error: Some("busy".into()),
            trace: vec![
                TraceSpan {
                    kind: SpanKind::Sync,
                    from: "a".into(),
                    to: "b".into(),
                    start: Millis(1_001),
                    duration: Duration::from_millis(7),
                    report: Some(SyncReport {
                        compared: 1,
                        sent: 2,
                        received: 3,
                        applied: 4,
                        failed: 5,
                        peer_applied: 8,
                        peer_failed: 9,
                        bytes_sent: 6,
                        bytes_received: 7,
                        round_trips: 10,
                    }),
                    error: None,
                    count: 1,
                },
                TraceSpan {
                    kind: SpanKind::Skip,
                    from: "b".into(),
                    to: "c".into(),
                    start: Millis(1_009),
                    duration: Duration::ZERO,
                    report: None,
                    error: Some("down".into()),
                    count: 2,
                },
            ],
            reported_by: "b".into(),
        }
    }

    #[test]
    fn result_round_trips_through_the_wire_type() {
        let domain = result();
        let wire = pb::PropagationResult::from(domain.clone());
        assert_eq!(PropagationResult::try_from(wire), Ok(domain));
    }

    #[test]
    fn request_round_trips_and_needs_a_context() {
        let r = result();
        let p = Propagation {
            context: r.context,
            trace: r.trace,
        };
        let wire = pb::PropagationRequest::from(p.clone());
        assert_eq!(Propagation::try_from(wire), Ok(p));
        let err = Propagation::try_from(pb::PropagationRequest::default()).unwrap_err();
        assert_eq!(err.to_string(), "PropagationRequest.context is missing");
    }

    #[test]
    fn progress_round_trips_and_needs_a_context() {
        let r = result();
        let progress = Progress {
            propagation: Propagation {
                context: r.context,
                trace: r.trace,
            },
            reported_by: "c".into(),
        };
        let wire = pb::PropagationProgress::from(progress.clone());
        assert_eq!(Progress::try_from(wire), Ok(progress));
        let err = Progress::try_from(pb::PropagationProgress::default()).unwrap_err();
        assert_eq!(err.to_string(), "PropagationProgress.context is missing");
    }

    #[test]
    fn every_outcome_round_trips_through_the_wire_type() {
        for outcome in [
            Outcome::Completed,
            Outcome::NoPeers,
            Outcome::Aborted,
            Outcome::Refused,
            Outcome::TimedOut,
        ] {
            let domain = PropagationResult {
                outcome,
                ..result()
            };
            let wire = pb::PropagationResult::from(domain.clone());
            assert_eq!(PropagationResult::try_from(wire), Ok(domain), "{outcome:?}");
        }
    }

    #[test]
    fn a_round_step_keeps_every_field_on_the_wire() {
        let r = result();
        let span = r.trace[1].clone();
        let step = RoundStep {
            message_id: r.context.message_id.clone(),
            key: r.context.key.clone(),
            max_count: 3,
            index: 1,
            span: span.clone(),
        };
        let wire = pb::RoundStep::from(step);
        assert_eq!(
            (wire.message_id.as_str(), wire.group.as_str(), wire.shard),
            ("b-1-1", "g", 4)
        );
        assert_eq!((wire.max_count, wire.index), (3, 1));
        assert_eq!(wire.span, Some(pb::TraceSpan::from(span)));
    }

    #[test]
    fn unknown_outcome_is_rejected_by_name() {
        let mut wire = pb::PropagationResult::from(result());
        wire.outcome = 0;
        let err = PropagationResult::try_from(wire).unwrap_err();
        assert_eq!(
            err.to_string(),
            "PropagationResult.outcome has unknown value 0"
        );
    }
}
