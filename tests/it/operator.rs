//! The operator's view of a running cluster: the status page in a real browser (headless
//! Chromium), the metrics, the standard gRPC health and reflection services, and round traces
//! exported over OTLP to a receiver in this test.

#![allow(
    clippy::print_stdout,
    reason = "a skipped browser test says why, and the screenshot's path is printed"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use propd_tests::{Cluster, eventually, http_get, run_bounded};
use serde_json::Value;

/// Three copies of every shard, background repair off: each test triggers its own round.
const THREE_COPIES: &str =
    "[[groups]]\nname = \"g\"\nshard_num = 2\nreplicas = 2\n\n[repair]\nenabled = false\n";

/// Writes a few properties to node 0's copy alone, then repairs shard 0 from node 0 and returns
/// the round's result as the CLI prints it.
fn diverge_and_repair(cluster: &Cluster) -> Value {
    for k in 0..12 {
        cluster.json(
            0,
            &["put", &format!("g/item/{k}"), "--tag", "k=v", "--local"],
        );
    }
    let result = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(result["ok"], true, "{result}");
    result
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The value of the sample `name{labels}` in a metrics text, when present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

#[test]
fn metrics_have_histograms_group_labels_build_info_and_ages_that_agree_with_status_on_every_copy() {
    let cluster = Cluster::start(3, THREE_COPIES);
    diverge_and_repair(&cluster);
    let origin = http_get(cluster.nodes[0].http, "/metrics").unwrap().1;
    for series in [
        "propd_propagations_started_total{group=\"g\"}",
        "propd_propagations_finished_total{group=\"g\"}",
        "propd_round_duration_seconds_count{group=\"g\"}",
    ] {
        assert_eq!(sample(&origin, series), Some(1.0), "{series} in\n{origin}");
    }
    assert!(
        sample(&origin, "propd_sync_duration_seconds_count{group=\"g\"}").unwrap_or(0.0) >= 1.0,
        "{origin}"
    );
    assert!(
        sample(&origin, "propd_sync_bytes_sum{group=\"g\"}").unwrap_or(0.0) > 0.0,
        "{origin}"
    );
    assert!(
        sample(
            &origin,
            "propd_rpc_duration_seconds_count{method=\"/propd.v1.AdminService/PropagateNow\"}"
        ) == Some(1.0),
        "{origin}"
    );
    assert!(origin.contains("propd_build_info{version=\""), "{origin}");
    assert!(origin.ends_with("# EOF\n"), "{origin}");

    // Every copy learned of the complete round: its gauge and its `status` agree.
    for i in 0..3 {
        let age_in_status = || {
            let status = cluster.json(i, &["status"]);
            status["shards"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["group"] == "g" && s["shard"] == 0)
                .and_then(|shard| shard["last_repair_age_s"].as_i64())
        };
        // The origin sends the complete-round notice to the copies after the round's result.
        assert!(
            eventually(Duration::from_secs(10), || age_in_status().is_some()),
            "n{} never learned of the complete round; log:\n{}",
            i + 1,
            cluster.log(i)
        );
        let age = age_in_status().unwrap();
        let metrics = http_get(cluster.nodes[i].http, "/metrics").unwrap().1;
        let gauge = sample(
            &metrics,
            "propd_last_repair_age_seconds{group=\"g\",shard=\"0\"}",
        )
        .unwrap_or_else(|| panic!("n{} exports the age of g/0:\n{metrics}", i + 1));
        assert!(
            (gauge - age as f64).abs() <= 1.0 && gauge >= 0.0,
            "n{}: gauge {gauge}, status {age}",
            i + 1
        );
        assert_eq!(
            sample(
                &metrics,
                "propd_last_repair_age_seconds{group=\"g\",shard=\"1\"}"
            ),
            Some(-1.0),
            "n{}: g/1 was never repaired",
            i + 1
        );
    }
}

/// The Chromium binary, installed by the project's script when missing; `None` (with the reason
/// printed) only when it cannot be installed on this machine.
fn chromium() -> Option<PathBuf> {
    let find = || {
        ["chromium", "chromium-browser"].iter().find_map(|name| {
            let output = Command::new("which").arg(name).output().ok()?;
            output
                .status
                .success()
                .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
        })
    };
    if let Some(found) = find() {
        return Some(found);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/install-chromium");
    let mut command = Command::new("bash");
    command.arg(&script);
    match run_bounded(command, Duration::from_secs(900)) {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            println!(
                "SKIPPED: chromium is not installed and {} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            return None;
        }
        Err(error) => {
            println!("SKIPPED: chromium could not be installed: {error}");
            return None;
        }
    }
    let found = find();
    if found.is_none() {
        println!(
            "SKIPPED: {} ran but no chromium is on the PATH",
            script.display()
        );
    }
    found
}

/// Where test artifacts go: `target/test-artifacts/` of this build.
fn artifacts_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test binary>
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary lives in target/<profile>/deps");
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("creating the artifacts directory");
    dir
}

/// Runs headless Chromium on `url` with `extra` arguments (bounded in time).
fn headless(chromium: &Path, profile: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,1100",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
    run_bounded(command, Duration::from_secs(120)).unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn the_status_page_shows_members_shards_and_the_rounds_trace_in_a_browser() {
    let Some(chromium) = chromium() else {
        return;
    };
    let cluster = Cluster::start(3, THREE_COPIES);
    let result = diverge_and_repair(&cluster);
    let message_id = result["message_id"].as_str().unwrap().to_owned();
    let url = format!("http://{}/", cluster.nodes[0].http);

    let (code, json) = http_get(cluster.nodes[0].http, "/status.json").unwrap();
    assert_eq!(code, 200, "{json}");
    let view: Value = serde_json::from_str(&json).expect("status.json is JSON");
    assert_eq!(view["node"], "n1");
    assert_eq!(
        view["rounds"][0]["message_id"],
        message_id.as_str(),
        "{view}"
    );

    let profile = tempfile::tempdir().expect("a browser profile directory");
    let dom = headless(&chromium, profile.path(), &url, &["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    for member in ["n1", "n2", "n3"] {
        assert!(
            dom.contains(&format!("<tr data-member=\"{member}\">")),
            "member {member} listed:\n{dom}"
        );
    }
    assert_eq!(
        dom.matches("<td class=\"up\">up</td>").count(),
        3,
        "every member is up:\n{dom}"
    );
    for shard in ["g/0", "g/1"] {
        assert!(
            dom.contains(&format!("<tr data-shard=\"{shard}\">")),
            "shard {shard} listed:\n{dom}"
        );
    }
    assert!(dom.contains("propd — node n1"), "{dom}");
    assert!(
        dom.contains(&format!("data-round=\"{message_id}\"")),
        "the round is drawn:\n{dom}"
    );
    let bars = dom.matches("class=\"bar sync\"").count();
    assert_eq!(bars, 3, "one bar per sync of a 3-copy round:\n{dom}");
    assert!(dom.contains("completed"), "{dom}");
    let moved: u64 = result["syncs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sync| sync["sent"].as_u64().unwrap() + sync["received"].as_u64().unwrap())
        .sum();
    assert!(moved > 0, "the round moved what node 0 alone had: {result}");
    assert!(
        dom.contains(&format!("{moved} properties moved")),
        "the round's header counts {moved} properties moved:\n{dom}"
    );
    assert!(
        dom.contains("no purge (no complete round yet)"),
        "g/1 never had a complete round:\n{dom}"
    );
    assert!(
        dom.contains("tombstones deleted before"),
        "g/0 has a purge cutoff:\n{dom}"
    );

    let screenshot = artifacts_dir().join("status-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = headless(
        &chromium,
        profile.path(),
        &url,
        &[&format!("--screenshot={}", screenshot.display())],
    );
    assert!(
        screenshot.metadata().is_ok_and(|m| m.len() > 10_000),
        "chromium wrote a screenshot: {}",
        String::from_utf8_lossy(&shot.stderr)
    );
    println!("status page screenshot: {}", screenshot.display());
}

const PROPD_SERVICES: [&str; 4] = [
    "propd.v1.PropertyService",
    "propd.v1.GossipService",
    "propd.v1.RepairService",
    "propd.v1.AdminService",
];

#[test]
fn health_and_reflection_answer_for_every_service() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start(1, THREE_COPIES);
    let endpoint = format!("http://{}", cluster.nodes[0].listen);
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .expect("connecting to the node");
        let mut health = HealthClient::new(channel.clone());
        for service in std::iter::once("").chain(PROPD_SERVICES) {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .unwrap_or_else(|status| panic!("health of {service:?}: {status}"))
                .into_inner();
            assert_eq!(
                answer.status,
                ServingStatus::Serving as i32,
                "{service:?} serves"
            );
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "no.such.Service".to_owned(),
            })
            .await
            .expect_err("an unknown service has no health");
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers
            .message()
            .await
            .expect("a reflection answer")
            .expect("one answer");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("a list of services: {answer:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for service in PROPD_SERVICES.into_iter().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ]) {
            assert!(
                names.iter().any(|name| name == service),
                "{service} listed in {names:?}"
            );
        }
    });
}

#[test]
fn health_turns_not_serving_as_soon_as_shutdown_begins() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let mut cluster = Cluster::start(1, THREE_COPIES);
    let endpoint = format!("http://{}", cluster.nodes[0].listen);
    let runtime = runtime();
    let mut watch = runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .expect("connecting to the node");
        let mut watch = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: "propd.v1.PropertyService".to_owned(),
            })
            .await
            .expect("watching the health of the property service")
            .into_inner();
        let first = watch.message().await.unwrap().expect("a first state");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        watch
    });
    std::thread::scope(|scope| {
        // The open watch is an in-flight call: the node drains it, so it exits once the watch is
        // dropped below.
        let stopping = scope.spawn(|| cluster.terminate(0));
        let next = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), watch.message()).await
        });
        let next = next
            .expect("a state change within 20 s of SIGTERM")
            .expect("the watch goes on during shutdown")
            .expect("a state");
        assert_eq!(next.status, ServingStatus::NotServing as i32);
        // Dropping the runtime closes the connection, which ends the watch on the node's side.
        drop(watch);
        drop(runtime);
        assert!(
            stopping.join().unwrap(),
            "the node exits cleanly after shutdown"
        );
    });
}

/// A minimal OTLP/gRPC trace receiver: it keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Any::StringValue(s) => Some(s.clone()),
        Any::IntValue(i) => Some(i.to_string()),
        Any::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[test]
fn every_round_is_exported_as_otlp_spans_one_per_sync_under_the_round() {
    let receiver = Receiver::default();
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // The kernel picks the receiver's port: no other test can hold it.
    let listener = server_runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("binding the receiver");
    let addr = listener.local_addr().expect("the receiver's address");
    server_runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let config = format!("{THREE_COPIES}\n[telemetry]\notlp_endpoint = \"http://{addr}\"\n");
    let cluster = Cluster::start(3, &config);
    let result = diverge_and_repair(&cluster);
    let message_id = result["message_id"].as_str().unwrap().to_owned();
    let syncs = result["syncs"].as_array().unwrap().len();
    assert_eq!(syncs, 3, "a 3-copy round runs 2n - 3 = 3 syncs: {result}");

    let exported = eventually(Duration::from_secs(20), || {
        receiver.spans.lock().unwrap().len() > syncs
    });
    assert!(
        exported,
        "the round's spans never arrived; log:\n{}",
        cluster.log(0)
    );
    let spans = receiver.spans.lock().unwrap().clone();
    let rounds: Vec<&Span> = spans.iter().filter(|s| s.name == "repair round").collect();
    assert_eq!(rounds.len(), 1, "one span for the one round: {spans:?}");
    let round = rounds[0];
    assert_eq!(
        attribute(round, "propd.message_id").as_deref(),
        Some(message_id.as_str())
    );
    assert_eq!(attribute(round, "propd.group").as_deref(), Some("g"));
    assert_eq!(
        attribute(round, "propd.outcome").as_deref(),
        Some("completed")
    );
    assert!(
        round.parent_span_id.is_empty(),
        "the round's span is a root"
    );
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == round.span_id)
        .collect();
    assert_eq!(children.len(), syncs, "one span per sync: {spans:?}");
    for (child, sync) in children.iter().zip(result["syncs"].as_array().unwrap()) {
        assert_eq!(child.name, "sync");
        assert_eq!(child.trace_id, round.trace_id);
        assert_eq!(
            attribute(child, "propd.from").as_deref(),
            sync["from"].as_str()
        );
        assert_eq!(attribute(child, "propd.to").as_deref(), sync["to"].as_str());
        assert_eq!(
            attribute(child, "propd.bytes_sent"),
            Some(sync["bytes_sent"].to_string())
        );
        assert!(child.start_time_unix_nano >= round.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= round.end_time_unix_nano);
    }
    drop(cluster);
    server_runtime.shutdown_background();
}
