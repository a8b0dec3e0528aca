//! Round traces out as OpenTelemetry spans: with `[telemetry] otlp_endpoint` set, every round
//! this node started is exported over OTLP/gRPC as one span for the round and, under it, one
//! span per sync or skip of its trace.
//!
//! The spans are built from the finished round's trace (its steps carry their start and
//! duration), not recorded live, and handed to `opentelemetry-otlp`'s exporter on one task.
//! The trace id is derived from the round's message id, so the same round always has the same
//! trace id.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use propd_gossip::{Millis, Outcome, PropagationResult, TraceSpan};
use tokio::sync::mpsc;

use crate::status::{outcome_name, step_name};

/// Rounds waiting for export; more are dropped (and logged) rather than held.
const QUEUE: usize = 256;
/// Bound on one export call.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting up the OTLP exporter for {endpoint}: {source}")]
pub(crate) struct ExportSetupError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Hands finished rounds to the export task.
#[derive(Debug, Clone)]
pub(crate) struct TraceExport {
    rounds: mpsc::Sender<PropagationResult>,
}

impl TraceExport {
    /// Starts the export task for `endpoint` (an `http://host:port` URL); spans name `node` as
    /// the service instance. Must run inside the tokio runtime.
    pub(crate) fn start(endpoint: &str, node: &str) -> Result<Self, ExportSetupError> {
        let mut exporter = SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|source| ExportSetupError {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        exporter.set_resource(
            &Resource::builder()
                .with_service_name("propd")
                .with_attribute(KeyValue::new("service.instance.id", node.to_owned()))
                .build(),
        );
        let (rounds, mut queue) = mpsc::channel::<PropagationResult>(QUEUE);
        let endpoint = endpoint.to_owned();
        tokio::spawn(async move {
            while let Some(result) = queue.recv().await {
                let message_id = result.context.message_id.to_string();
                if let Err(error) = exporter.export(round_spans(&result)).await {
                    tracing::warn!(endpoint, message_id, %error, "exporting a round's trace failed");
                }
            }
        });
        Ok(Self { rounds })
    }

    /// Queues a finished round for export.
    pub(crate) fn export(&self, result: &PropagationResult) {
        if self.rounds.try_send(result.clone()).is_err() {
            tracing::warn!(
                message_id = %result.context.message_id,
                "trace export queue full or closed; this round's trace is dropped"
            );
        }
    }
}

/// The spans of one finished round: the round's span first, then one child per step.
pub(crate) fn round_spans(result: &PropagationResult) -> Vec<SpanData> {
    let context = &result.context;
    let message_id = context.message_id.to_string();
    let hash = xxhash_rust::xxh3::xxh3_128(message_id.as_bytes()).max(1);
    let trace_id = TraceId::from_bytes(hash.to_be_bytes());
    let span_id = |index: u64| {
        let id = xxhash_rust::xxh3::xxh3_64_with_seed(message_id.as_bytes(), index).max(1);
        SpanId::from_bytes(id.to_be_bytes())
    };
    let round_id = span_id(0);
    let scope = InstrumentationScope::builder("propd")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let ended = result
        .trace
        .iter()
        .map(|step| step.start.plus(step.duration))
        .max()
        .unwrap_or(context.started_at)
        .max(context.started_at);
    let span = |span_id: SpanId, parent: SpanId, name: &'static str| SpanData {
        span_context: SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: false,
        span_kind: SpanKind::Internal,
        name: Cow::Borrowed(name),
        start_time: UNIX_EPOCH,
        end_time: UNIX_EPOCH,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    };
    let mut round = span(round_id, SpanId::INVALID, "repair round");
    round.start_time = system_time(context.started_at);
    round.end_time = system_time(ended);
    round.attributes = vec![
        KeyValue::new("propd.message_id", message_id.clone()),
        KeyValue::new("propd.group", context.key.group.clone()),
        KeyValue::new("propd.shard", i64::from(context.key.shard)),
        KeyValue::new("propd.origin", context.origin.clone()),
        KeyValue::new("propd.outcome", outcome_name(result.outcome)),
        KeyValue::new("propd.preview", context.preview),
        KeyValue::new("propd.syncs", result.syncs() as i64),
        KeyValue::new("propd.skips", result.skips() as i64),
    ];
    round.status = match (&result.error, result.outcome) {
        (_, Outcome::Completed) => Status::Ok,
        (error, _) => Status::error(error.clone().unwrap_or_default()),
    };
    let mut spans = vec![round];
    for (index, step) in result.trace.iter().enumerate() {
        let mut child = span(span_id(index as u64 + 1), round_id, step_name(step.kind));
        child.start_time = system_time(step.start);
        child.end_time = system_time(step.start.plus(step.duration));
        child.attributes = step_attributes(step);
        child.status = match &step.error {
            None => Status::Ok,
            Some(error) => Status::error(error.clone()),
        };
        spans.push(child);
    }
    spans
}

fn step_attributes(step: &TraceSpan) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("propd.from", step.from.clone()),
        KeyValue::new("propd.to", step.to.clone()),
    ];
    if let Some(report) = step.report {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        attributes.extend([
            KeyValue::new("propd.compared", count(report.compared)),
            KeyValue::new("propd.sent", count(report.sent)),
            KeyValue::new("propd.received", count(report.received)),
            KeyValue::new("propd.applied", count(report.applied)),
            KeyValue::new("propd.failed", count(report.failed)),
            KeyValue::new("propd.bytes_sent", count(report.bytes_sent)),
            KeyValue::new("propd.bytes_received", count(report.bytes_received)),
            KeyValue::new("propd.round_trips", i64::from(report.round_trips)),
        ]);
    }
    attributes
}

fn system_time(at: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(at.0).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use propd_gossip::SpanKind;

    use super::*;
    use crate::status::tests::{finished_round, step};

    #[test]
    fn a_round_becomes_one_root_span_with_one_child_per_step() {
        let result = finished_round(
            Outcome::NoPeers,
            Some("no reachable successor"),
            vec![
                step(SpanKind::Sync, "n1", "n2", 1_005, 20, None),
                step(
                    SpanKind::Skip,
                    "n2",
                    "n3",
                    1_030,
                    5,
                    Some("connection refused"),
                ),
            ],
        );
        let spans = round_spans(&result);
        assert_eq!(spans.len(), 3);
        let round = &spans[0];
        assert_eq!(round.name, "repair round");
        assert_eq!(round.parent_span_id, SpanId::INVALID);
        assert_eq!(round.start_time, UNIX_EPOCH + Duration::from_millis(1_000));
        assert_eq!(round.end_time, UNIX_EPOCH + Duration::from_millis(1_035));
        assert_eq!(
            round.status,
            Status::error("no reachable successor"),
            "a round that did not complete is an error"
        );
        let trace_id = round.span_context.trace_id();
        assert_ne!(trace_id, TraceId::INVALID);
        assert_eq!(
            round_spans(&result)[0].span_context.trace_id(),
            trace_id,
            "the same round always has the same trace id"
        );
        let (sync, skip) = (&spans[1], &spans[2]);
        assert_eq!((sync.name.as_ref(), skip.name.as_ref()), ("sync", "skip"));
        for child in [sync, skip] {
            assert_eq!(child.parent_span_id, round.span_context.span_id());
            assert_eq!(child.span_context.trace_id(), trace_id);
            assert_ne!(child.span_context.span_id(), round.span_context.span_id());
        }
        assert_ne!(sync.span_context.span_id(), skip.span_context.span_id());
        assert_eq!(sync.start_time, UNIX_EPOCH + Duration::from_millis(1_005));
        assert_eq!(sync.end_time, UNIX_EPOCH + Duration::from_millis(1_025));
        assert_eq!(sync.status, Status::Ok);
        assert!(
            sync.attributes
                .contains(&KeyValue::new("propd.bytes_sent", 900_i64))
        );
        assert!(sync.attributes.contains(&KeyValue::new("propd.to", "n2")));
        assert_eq!(skip.status, Status::error("connection refused"));
        assert!(
            !skip
                .attributes
                .iter()
                .any(|kv| kv.key.as_str() == "propd.sent"),
            "a skip moved nothing"
        );
    }
}
