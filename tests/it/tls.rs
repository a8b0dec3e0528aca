//! Mutual TLS over real processes: a cluster with `[tls]` serves and repairs; clients without a
//! certificate, with one from another CA, with an expired one or with too small a role are
//! refused and change nothing; a certificate that names no member cannot write a replica or
//! open a repair stream; a node's certificate rotated mid-run keeps the cluster serving.

use std::time::Duration;

use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_proto::v1::repair_service_client::RepairServiceClient;
use propd_tests::{Certs, Cluster, cli_at, eventually, http_get, https_get};
use serde_json::Value;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn group(name: &str, shard_num: u32, replicas: u32) -> String {
    format!(
        "[[groups]]\nname = \"{name}\"\nshard_num = {shard_num}\nreplicas = {replicas}\n\n[repair]\nenabled = false\n"
    )
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn metric(cluster: &Cluster, i: usize, name: &str) -> u64 {
    let (_, body) = cluster.http(i, "/metrics").expect("metrics over TLS");
    body.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{body}"))
}

#[test]
fn a_mutual_tls_cluster_serves_puts_gets_and_a_repair_round() {
    let cluster = Cluster::start_tls(3, &group("g", 1, 2));
    let put = cluster.cli_as(0, "writer", &["put", "g/p/1", "--tag", "k=v"]);
    assert!(put.status.success(), "{}", stderr(&put));
    let get = cluster.cli_as(1, "reader", &["get", "g/p/1", "--output", "json"]);
    assert!(get.status.success(), "{}", stderr(&get));
    assert!(String::from_utf8_lossy(&get.stdout).contains("\"k\""));

    // One copy only, then a round repairs the others over mutual TLS between the nodes.
    let local = cluster.cli_as(2, "writer", &["put", "g/p/2", "--local"]);
    assert!(local.status.success(), "{}", stderr(&local));
    let round = cluster.cli(2, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert!(round.status.success(), "{}", stderr(&round));
    assert!(
        eventually(Duration::from_secs(20), || (0..3)
            .all(|i| cluster.local_copy(i, "g/p/2").is_some())),
        "the round did not reach every copy"
    );

    // Both ports speak only TLS: a plaintext client gets nothing from either.
    let plain = cli_at(&cluster.nodes[0].listen.to_string(), &["status"]);
    assert!(!plain.status.success());
    assert_eq!(http_get(cluster.nodes[0].http, "/health"), None);
    let (code, body) = cluster.http(0, "/health").unwrap();
    assert_eq!(code, 200, "{body}");
}

#[test]
fn clients_without_a_good_certificate_or_role_are_refused_and_change_nothing() {
    let cluster = Cluster::start_tls(1, &group("g", 1, 0));
    let certs = cluster.certs.clone().unwrap();
    let server = cluster.nodes[0].listen.to_string();
    let put = |extra: &[String]| {
        let mut args: Vec<String> = ["put", "g/p/x", "--tag", "k=v"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_at(&server, &args)
    };

    // No client certificate: the handshake is refused.
    let ca_only = put(&[
        "--ca".into(),
        certs.ca().display().to_string(),
        "--server-name".into(),
        "n1".into(),
    ]);
    assert!(!ca_only.status.success());

    // A certificate from another CA.
    let other = Certs {
        dir: cluster.dir.path().join("other-ca"),
    };
    other.issue(&["--client", "mallory=admin"]);
    let mut args = other.client_args("mallory", "n1");
    args[1] = certs.ca().display().to_string();
    assert!(!put(&args).status.success());

    // An expired certificate from the right CA.
    certs.issue(&["--client", "late=admin", "--days", "-1"]);
    assert!(!put(&certs.client_args("late", "n1")).status.success());
    let handshakes = metric(&cluster, 0, "propd_tls_handshakes_refused_total");
    assert!(handshakes >= 3, "{handshakes} handshakes refused");

    // The right CA, too small a role: refused by the node, naming the role it needs.
    let reader = put(&certs.client_args("reader", "n1"));
    assert!(!reader.status.success());
    let message = stderr(&reader);
    assert!(message.contains("needs role `write`"), "{message}");
    let pause = cluster.cli_as(0, "writer", &["repair", "pause"]);
    assert!(!pause.status.success());
    assert!(
        stderr(&pause).contains("needs role `admin`"),
        "{}",
        stderr(&pause)
    );
    assert_eq!(
        metric(
            &cluster,
            0,
            "propd_auth_refusals_total{code=\"permission_denied\"}"
        ),
        2
    );

    // Nothing changed: the property is not there and repair is not paused.
    let get = cluster.cli_as(0, "reader", &["get", "g/p/x"]);
    assert!(
        !get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stdout)
    );
    let status = cluster.json(0, &["status"]);
    assert_eq!(status["repair_paused"], Value::Bool(false), "{status}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_certificate_that_names_no_member_cannot_write_a_replica_or_open_a_repair_stream() {
    let cluster = Cluster::start_tls(2, &group("g", 1, 1));
    let certs = cluster.certs.clone().unwrap();
    // A node certificate from the cluster CA for a node that is not in the config.
    certs.issue(&["--member", "n9=127.0.0.1:1"]);
    let read = |path| std::fs::read(path).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(certs.ca())))
        .identity(Identity::from_pem(
            read(certs.cert("n9")),
            read(certs.key("n9")),
        ))
        .domain_name("n1");
    let uri = format!("https://{}", cluster.nodes[0].listen);
    let property = v1::Property {
        group: "g".into(),
        name: "p".into(),
        id: "forged".into(),
        tags: Vec::new(),
        mod_revision: i64::MAX,
        delete_time: 0,
    };
    runtime().block_on(async {
        let channel = Endpoint::from_shared(uri)
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let refused = PropertyServiceClient::new(channel.clone())
            .replica_write(v1::ReplicaWriteRequest {
                property: Some(property),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("members only"),
            "{}",
            refused.message()
        );

        let request = v1::RepairRequest {
            msg: Some(v1::repair_request::Msg::TreeRoot(v1::TreeRoot {
                group: "g".into(),
                shard: 0,
                ..v1::TreeRoot::default()
            })),
        };
        let stream = tokio_stream_once(request);
        let refused = RepairServiceClient::new(channel)
            .repair(stream)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    });
    for i in 0..2 {
        let get = cluster.cli(i, &["get", "g/p/forged", "--local"]);
        assert!(
            !get.status.success(),
            "the forged write landed on n{}",
            i + 1
        );
    }
}

/// A request stream of one message that then stays open (as a repair client's would).
fn tokio_stream_once(
    request: v1::RepairRequest,
) -> impl tokio_stream::Stream<Item = v1::RepairRequest> + Send + 'static {
    use tokio_stream::StreamExt as _;
    tokio_stream::iter([request]).chain(tokio_stream::pending())
}

#[test]
fn a_node_certificate_rotated_mid_run_keeps_the_cluster_serving() {
    let cluster = Cluster::start_tls(3, &group("g", 1, 2));
    let certs = cluster.certs.clone().unwrap();
    let put = cluster.cli(0, &["put", "g/p/before"]);
    assert!(put.status.success(), "{}", stderr(&put));

    // New key and certificate for n2, written in place while it runs. Its dials use them once
    // it has remade its channels; its port serves them from the next connection on.
    certs.issue(&["--member", &format!("n2={}", cluster.nodes[1].listen)]);
    assert!(
        eventually(Duration::from_secs(10), || cluster
            .log(1)
            .contains("channels to members remade")),
        "n2 did not remake its channels:\n{}",
        cluster.log(1)
    );
    let status = cluster.cli(1, &["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        cluster.log(1).contains("TLS certificate reloaded"),
        "n2 did not reload its certificate:\n{}",
        cluster.log(1)
    );
    // New connections to n2, from a client and from the other nodes, and n2's own dials work.
    for (i, entity) in [(1, "g/p/after-1"), (0, "g/p/after-0"), (2, "g/p/after-2")] {
        let put = cluster.cli(i, &["put", entity]);
        assert!(put.status.success(), "{}", stderr(&put));
    }
    let round = cluster.cli(1, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert!(round.status.success(), "{}", stderr(&round));
    assert!(https_get(cluster.nodes[1].http, "/health", &certs, "reader").is_some());
    for i in 0..3 {
        assert!(
            cluster.local_copy(i, "g/p/after-1").is_some(),
            "n{} misses it",
            i + 1
        );
    }
}
