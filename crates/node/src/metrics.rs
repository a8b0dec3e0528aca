//! The node's metrics (DESIGN §8), kept with the `prometheus-client` crate and exposed at
//! `/metrics` in the OpenMetrics text format.
//!
//! Repair and apply counters carry a `group` label, and a `shard` label too when
//! `metrics.shard_labels` is on (off by default: a group may have thousands of shards). Every
//! name is listed in `docs/operations.md`.

use std::time::Instant;

use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The labels of a repair or apply metric: the group, and the shard when enabled.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct ShardLabels {
    group: String,
    shard: Option<u32>,
}

impl EncodeLabelSet for ShardLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        ("group", self.group.as_str()).encode(encoder.encode_label())?;
        if let Some(shard) = self.shard {
            ("shard", shard).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// The label of an RPC latency: `/package.Service/Method`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
}

/// The labels of a last-repair age: always per shard, as `status` shows it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgeLabels {
    group: String,
    shard: u32,
}

/// A counter per group (and shard, when enabled).
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupCounter(Family<ShardLabels, Counter>);

impl GroupCounter {
    /// Adds one.
    pub(crate) fn inc(&self, labels: &ShardLabels) {
        self.add(labels, 1);
    }

    /// Adds `n`.
    pub(crate) fn add(&self, labels: &ShardLabels, n: u64) {
        self.0.get_or_create(labels).inc_by(n);
    }
}

/// A histogram per group (and shard, when enabled).
#[derive(Clone, Debug)]
pub(crate) struct GroupHistogram(Family<ShardLabels, Histogram, fn() -> Histogram>);

impl GroupHistogram {
    fn new(buckets: fn() -> Histogram) -> Self {
        Self(Family::new_with_constructor(buckets))
    }

    /// Records one observation.
    pub(crate) fn observe(&self, labels: &ShardLabels, value: f64) {
        self.0.get_or_create(labels).observe(value);
    }
}

fn seconds_buckets() -> Histogram {
    // 1 ms to about 4.5 h, by factors of 4.
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

fn rpc_buckets() -> Histogram {
    // 100 µs to about 7 min, by factors of 4.
    Histogram::new(exponential_buckets(0.000_1, 4.0, 12))
}

fn bytes_buckets() -> Histogram {
    // 64 B to 4 GiB, by factors of 4.
    Histogram::new(exponential_buckets(64.0, 4.0, 14))
}

/// Every metric of one node, and the registry that exposes them.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    shard_labels: bool,
    /// Full tree rebuilds started.
    pub(crate) tree_rebuilds_started: GroupCounter,
    /// Full tree rebuilds finished.
    pub(crate) tree_rebuilds_finished: GroupCounter,
    /// Full tree rebuilds that failed.
    pub(crate) tree_rebuilds_failed: GroupCounter,
    /// Total time spent in rebuilds, milliseconds.
    pub(crate) tree_rebuild_millis: GroupCounter,
    /// Rebuilds whose root differed from the live tree (healed).
    pub(crate) verify_mismatches: GroupCounter,
    /// Propagations this node started as origin.
    pub(crate) propagations_started: GroupCounter,
    /// Propagations whose result reached this origin as completed.
    pub(crate) propagations_finished: GroupCounter,
    /// Propagations whose result reached this origin as failed (no peers, aborted, timed out).
    pub(crate) propagations_failed: GroupCounter,
    /// Propagations refused (here, or reported refused to this origin).
    pub(crate) propagations_refused: GroupCounter,
    /// Pairwise syncs this node ran as client.
    pub(crate) syncs: GroupCounter,
    /// Successors skipped as unreachable.
    pub(crate) skips: GroupCounter,
    /// Entities compared in syncs.
    pub(crate) properties_compared: GroupCounter,
    /// Properties sent to peers in syncs.
    pub(crate) properties_sent: GroupCounter,
    /// Properties received from peers in syncs.
    pub(crate) properties_received: GroupCounter,
    /// Properties applied locally by repair (sync, replica writes).
    pub(crate) properties_applied: GroupCounter,
    /// Properties whose repair apply failed.
    pub(crate) properties_failed: GroupCounter,
    /// Repair bytes sent.
    pub(crate) repair_bytes_sent: GroupCounter,
    /// Repair bytes received.
    pub(crate) repair_bytes_received: GroupCounter,
    /// Tombstones purged.
    pub(crate) tombstones_purged: GroupCounter,
    /// Read repairs written to stale copies.
    pub(crate) read_repairs: GroupCounter,
    /// Duration of each pairwise sync this node ran as client.
    pub(crate) sync_duration: GroupHistogram,
    /// Bytes moved (both directions) by each pairwise sync this node ran as client.
    pub(crate) sync_bytes: GroupHistogram,
    /// Duration of each round this node started, from its start to its result.
    pub(crate) round_duration: GroupHistogram,
    rpc_duration: Family<RpcLabels, Histogram, fn() -> Histogram>,
    last_repair_age: Family<AgeLabels, Gauge>,
    /// Calls refused by the auth layer, by gRPC code (no certificate, not a member, too small
    /// a role).
    pub(crate) auth_refusals: AuthRefusals,
    /// TLS handshakes refused (no client certificate, unknown CA, expired, ...).
    pub(crate) tls_handshakes_refused: Counter,
    /// Stored row bytes the scrub reread and checked.
    pub(crate) scrub_bytes: Counter,
    /// Scrub passes over every local shard finished.
    pub(crate) scrub_passes: Counter,
    /// Rows the store quarantined since start (the store counts; [`Metrics::set_store`] copies).
    rows_quarantined: Counter,
    /// 1 when the store serves, 0 when it is damaged or cannot write.
    store_healthy: Gauge,
}

/// The label of an auth refusal: the gRPC code the caller got.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    code: &'static str,
}

/// Calls refused by the auth layer, per gRPC code (`unauthenticated`, `permission_denied`).
#[derive(Clone, Debug, Default)]
pub(crate) struct AuthRefusals(Family<RefusalLabels, Counter>);

impl AuthRefusals {
    /// Counts one refusal answered with `code`.
    pub(crate) fn inc(&self, code: tonic::Code) {
        let code = match code {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "other",
        };
        self.0.get_or_create(&RefusalLabels { code }).inc();
    }
}

impl Metrics {
    /// Registers every metric; `shard_labels` adds the shard label to the per-group ones.
    pub(crate) fn new(shard_labels: bool) -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            shard_labels,
            tree_rebuilds_started: GroupCounter::default(),
            tree_rebuilds_finished: GroupCounter::default(),
            tree_rebuilds_failed: GroupCounter::default(),
            tree_rebuild_millis: GroupCounter::default(),
            verify_mismatches: GroupCounter::default(),
            propagations_started: GroupCounter::default(),
            propagations_finished: GroupCounter::default(),
            propagations_failed: GroupCounter::default(),
            propagations_refused: GroupCounter::default(),
            syncs: GroupCounter::default(),
            skips: GroupCounter::default(),
            properties_compared: GroupCounter::default(),
            properties_sent: GroupCounter::default(),
            properties_received: GroupCounter::default(),
            properties_applied: GroupCounter::default(),
            properties_failed: GroupCounter::default(),
            repair_bytes_sent: GroupCounter::default(),
            repair_bytes_received: GroupCounter::default(),
            tombstones_purged: GroupCounter::default(),
            read_repairs: GroupCounter::default(),
            sync_duration: GroupHistogram::new(seconds_buckets),
            sync_bytes: GroupHistogram::new(bytes_buckets),
            round_duration: GroupHistogram::new(seconds_buckets),
            rpc_duration: Family::new_with_constructor(rpc_buckets),
            last_repair_age: Family::default(),
            auth_refusals: AuthRefusals::default(),
            tls_handshakes_refused: Counter::default(),
            scrub_bytes: Counter::default(),
            scrub_passes: Counter::default(),
            rows_quarantined: Counter::default(),
            store_healthy: Gauge::default(),
        };
        metrics.register();
        metrics
    }

    /// Every per-group counter with its name (without `_total`) and help.
    fn counters(&self) -> [(&'static str, &'static str, &GroupCounter); 20] {
        [
            (
                "propd_tree_rebuilds_started",
                "Full tree rebuilds started.",
                &self.tree_rebuilds_started,
            ),
            (
                "propd_tree_rebuilds_finished",
                "Full tree rebuilds finished.",
                &self.tree_rebuilds_finished,
            ),
            (
                "propd_tree_rebuilds_failed",
                "Full tree rebuilds that failed.",
                &self.tree_rebuilds_failed,
            ),
            (
                "propd_tree_rebuild_milliseconds",
                "Time spent in full tree rebuilds.",
                &self.tree_rebuild_millis,
            ),
            (
                "propd_tree_verify_mismatches",
                "Rebuilds whose root differed from the live tree (healed).",
                &self.verify_mismatches,
            ),
            (
                "propd_propagations_started",
                "Propagations started with this node as origin.",
                &self.propagations_started,
            ),
            (
                "propd_propagations_finished",
                "Propagations reported completed to this origin.",
                &self.propagations_finished,
            ),
            (
                "propd_propagations_failed",
                "Propagations reported failed to this origin.",
                &self.propagations_failed,
            ),
            (
                "propd_propagations_refused",
                "Propagations refused because one was already running.",
                &self.propagations_refused,
            ),
            ("propd_syncs", "Pairwise syncs run as client.", &self.syncs),
            (
                "propd_sync_skips",
                "Unreachable successors skipped.",
                &self.skips,
            ),
            (
                "propd_properties_compared",
                "Entities compared in syncs.",
                &self.properties_compared,
            ),
            (
                "propd_properties_sent",
                "Properties sent to peers in syncs.",
                &self.properties_sent,
            ),
            (
                "propd_properties_received",
                "Properties received from peers in syncs.",
                &self.properties_received,
            ),
            (
                "propd_properties_applied",
                "Properties applied locally by repair.",
                &self.properties_applied,
            ),
            (
                "propd_properties_failed",
                "Properties whose repair apply failed.",
                &self.properties_failed,
            ),
            (
                "propd_repair_bytes_sent",
                "Repair bytes sent.",
                &self.repair_bytes_sent,
            ),
            (
                "propd_repair_bytes_received",
                "Repair bytes received.",
                &self.repair_bytes_received,
            ),
            (
                "propd_tombstones_purged",
                "Tombstones purged.",
                &self.tombstones_purged,
            ),
            (
                "propd_read_repairs",
                "Stale copies rewritten by read repair.",
                &self.read_repairs,
            ),
        ]
    }

    fn register(&mut self) {
        let mut registry = Registry::default();
        for (name, help, counter) in self.counters() {
            registry.register(name, help, counter.0.clone());
        }
        registry.register(
            "propd_sync_duration_seconds",
            "Duration of the pairwise syncs this node ran as client.",
            self.sync_duration.0.clone(),
        );
        registry.register(
            "propd_sync_bytes",
            "Bytes moved in both directions by each pairwise sync this node ran as client.",
            self.sync_bytes.0.clone(),
        );
        registry.register(
            "propd_round_duration_seconds",
            "Duration of the rounds this node started, from start to result.",
            self.round_duration.0.clone(),
        );
        registry.register(
            "propd_rpc_duration_seconds",
            "Time the gRPC server took to answer, per method (unary: the whole call; streams: until the response starts).",
            self.rpc_duration.clone(),
        );
        registry.register(
            "propd_last_repair_age_seconds",
            "Seconds since the last repair round of the shard that reached every copy (-1: never).",
            self.last_repair_age.clone(),
        );
        registry.register(
            "propd_auth_refusals",
            "Calls refused by the auth layer (no client certificate, not a member, or too small a role), by gRPC code.",
            self.auth_refusals.0.clone(),
        );
        registry.register(
            "propd_tls_handshakes_refused",
            "TLS handshakes refused (no, untrusted or expired client certificate).",
            self.tls_handshakes_refused.clone(),
        );
        registry.register(
            "propd_scrub_bytes",
            "Stored row bytes the scrub reread and checked.",
            self.scrub_bytes.clone(),
        );
        registry.register(
            "propd_scrub_passes",
            "Scrub passes over every local shard finished.",
            self.scrub_passes.clone(),
        );
        registry.register(
            "propd_store_rows_quarantined",
            "Stored property rows that failed their check and were quarantined since start.",
            self.rows_quarantined.clone(),
        );
        registry.register(
            "propd_store_healthy",
            "1 when the store serves; 0 when it is damaged or its writes fail (see /health).",
            self.store_healthy.clone(),
        );
        registry.register(
            "propd_build",
            "The propd build this node runs.",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                ("target_arch", std::env::consts::ARCH),
                ("target_os", std::env::consts::OS),
            ]),
        );
        self.registry = registry;
    }

    /// The labels of (group, shard): the shard only when shard labels are enabled.
    pub(crate) fn labels(&self, group: &str, shard: u32) -> ShardLabels {
        ShardLabels {
            group: group.to_owned(),
            shard: self.shard_labels.then_some(shard),
        }
    }

    /// Sets the age of (group, shard)'s last complete round, in seconds (`None`: never, -1).
    pub(crate) fn set_last_repair_age(&self, group: &str, shard: u32, age: Option<i64>) {
        let labels = AgeLabels {
            group: group.to_owned(),
            shard,
        };
        self.last_repair_age
            .get_or_create(&labels)
            .set(age.unwrap_or(-1));
    }

    /// Copies the store's state: the rows it quarantined since start and whether it serves.
    pub(crate) fn set_store(&self, quarantined: u64, healthy: bool) {
        self.rows_quarantined
            .inc_by(quarantined.saturating_sub(self.rows_quarantined.get()));
        self.store_healthy.set(i64::from(healthy));
    }

    /// The OpenMetrics text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A tower layer for the gRPC server that times every call into
/// `propd_rpc_duration_seconds{method}`.
///
/// A call the server does not implement (unknown service or method: `grpc-status` 12 in the
/// response headers) is counted under the method `unimplemented`, so that clients cannot grow
/// the label set.
#[derive(Clone, Debug)]
pub(crate) struct RpcMetricsLayer {
    histogram: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// The layer that records into this node's RPC latency histogram.
    pub(crate) fn rpc_layer(&self) -> RpcMetricsLayer {
        RpcMetricsLayer {
            histogram: self.rpc_duration.clone(),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            histogram: self.histogram.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub(crate) struct RpcMetricsService<S> {
    inner: S,
    histogram: Family<RpcLabels, Histogram, fn() -> Histogram>,
}

/// The `grpc-status` code of an unimplemented method.
const UNIMPLEMENTED: &str = "12";

impl<S, B, R> tower::Service<::http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<::http::Request<B>, Response = ::http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: ::http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_owned();
        let started = Instant::now();
        let call = self.inner.call(request);
        let histogram = self.histogram.clone();
        Box::pin(async move {
            let response = call.await;
            let unimplemented = response.as_ref().is_ok_and(|response| {
                response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|code| code == UNIMPLEMENTED)
            });
            let method = if unimplemented {
                "unimplemented".to_owned()
            } else {
                method
            };
            histogram
                .get_or_create(&RpcLabels { method })
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer as _, Service as _, ServiceExt as _};

    use super::*;

    /// The value of the sample `series` (name and labels, as written) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn counters_histograms_ages_and_build_info_in_openmetrics_text() {
        let metrics = Metrics::new(false);
        let g3 = metrics.labels("g", 3);
        metrics.syncs.add(&g3, 2);
        metrics.syncs.inc(&metrics.labels("g", 4));
        metrics.sync_duration.observe(&g3, 0.003);
        metrics.sync_bytes.observe(&g3, 5_000.0);
        metrics.set_last_repair_age("g", 0, None);
        metrics.set_last_repair_age("g", 1, Some(42));
        let text = metrics.encode();
        assert!(text.contains("# TYPE propd_syncs counter\n"), "{text}");
        assert_eq!(
            sample(&text, "propd_syncs_total{group=\"g\"}"),
            Some(3.0),
            "shards of one group add up without shard labels:\n{text}"
        );
        assert_eq!(
            sample(
                &text,
                "propd_sync_duration_seconds_bucket{le=\"0.004\",group=\"g\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "propd_sync_duration_seconds_bucket{le=\"0.001\",group=\"g\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "propd_sync_bytes_sum{group=\"g\"}"),
            Some(5_000.0)
        );
        assert_eq!(
            sample(
                &text,
                "propd_last_repair_age_seconds{group=\"g\",shard=\"0\"}"
            ),
            Some(-1.0)
        );
        assert_eq!(
            sample(
                &text,
                "propd_last_repair_age_seconds{group=\"g\",shard=\"1\"}"
            ),
            Some(42.0)
        );
        let build = format!(
            "propd_build_info{{version=\"{}\",target_arch=\"{}\",target_os=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::ARCH,
            std::env::consts::OS
        );
        assert_eq!(sample(&text, &build), Some(1.0), "{text}");
        assert!(text.ends_with("# EOF\n"));
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "`{line}` ends in a number");
        }
    }

    /// The names of the series `metrics` exposes, as Prometheus sees them.
    fn exposed_names(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .map(|line| {
                let (name, kind) = line.split_once(' ').unwrap();
                match kind {
                    "counter" => format!("{name}_total"),
                    "info" => format!("{name}_info"),
                    _ => name.to_owned(),
                }
            })
            .collect()
    }

    #[test]
    fn every_metric_is_documented_and_the_dashboard_names_only_real_ones() {
        let docs = include_str!("../../../docs/operations.md");
        let dashboard = include_str!("../../../docs/grafana-dashboard.json");
        // A family shows in the text once it has a series: give each one.
        let metrics = Metrics::new(false);
        let labels = metrics.labels("g", 0);
        for (_, _, counter) in metrics.counters() {
            counter.inc(&labels);
        }
        for histogram in [
            &metrics.sync_duration,
            &metrics.sync_bytes,
            &metrics.round_duration,
        ] {
            histogram.observe(&labels, 1.0);
        }
        metrics
            .rpc_duration
            .get_or_create(&RpcLabels {
                method: "/propd.v1.AdminService/Ping".to_owned(),
            })
            .observe(0.1);
        metrics.set_last_repair_age("g", 0, Some(1));
        metrics.auth_refusals.inc(tonic::Code::Unauthenticated);
        metrics.tls_handshakes_refused.inc();
        let names = exposed_names(&metrics);
        assert_eq!(names.len(), 32, "{names:?}");
        for name in &names {
            assert!(
                docs.contains(&format!("| `{name}` |")),
                "{name} is in the Metrics table of docs/operations.md"
            );
        }
        let mut used = 0;
        for token in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !token.starts_with("propd_") {
                continue;
            }
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| token.strip_suffix(suffix))
                .unwrap_or(token);
            assert!(
                names.iter().any(|name| name == token || name == base),
                "the dashboard's {token} is a metric propd exposes"
            );
            used += 1;
        }
        assert!(used > 10, "the dashboard queries propd's metrics");
    }

    #[test]
    fn shard_labels_when_enabled() {
        let metrics = Metrics::new(true);
        metrics.properties_applied.add(&metrics.labels("g", 3), 7);
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                "propd_properties_applied_total{group=\"g\",shard=\"3\"}"
            ),
            Some(7.0),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_rpc_layer_times_calls_per_method_and_unimplemented_ones_under_one_label() {
        let metrics = Metrics::new(false);
        let routes = tower::service_fn(|request: ::http::Request<()>| async move {
            let mut response = ::http::Response::new(());
            if request.uri().path().ends_with("/Nope") {
                response
                    .headers_mut()
                    .insert("grpc-status", ::http::HeaderValue::from_static("12"));
            }
            Ok::<_, Infallible>(response)
        });
        let mut service = metrics.rpc_layer().layer(routes);
        for path in [
            "/propd.v1.AdminService/Ping",
            "/propd.v1.AdminService/Ping",
            "/x.Y/Nope",
            "/propd.v1.AdminService/Nope",
        ] {
            let request = ::http::Request::builder().uri(path).body(()).unwrap();
            service.ready().await.unwrap().call(request).await.unwrap();
        }
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                "propd_rpc_duration_seconds_count{method=\"/propd.v1.AdminService/Ping\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "propd_rpc_duration_seconds_count{method=\"unimplemented\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert!(!text.contains("Nope"), "{text}");
    }
}
