//! Mutual TLS over real processes: a cluster with `[tls]` serves and repairs; clients without a
//! certificate, with one from another CA, with an expired one or with too small a role are
//! refused and change nothing; a certificate that names no member cannot write a replica or
//! open a repair stream; a node's certificate rotated mid-run keeps the cluster serving; a node
//! dials only the member it meant to reach; the HTTP port checks roles; TLS and its client
//! flags come from `PROPD_*` variables too; plaintext off loopback must be asked for. And what a
//! member may send is checked: repair streams for shards not held are refused at admission,
//! copies from beyond the clock-skew bound are neither stored nor spread.

use std::time::Duration;

use propd_proto::v1;
use propd_proto::v1::gossip_service_client::GossipServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_proto::v1::repair_service_client::RepairServiceClient;
use propd_tests::{Certs, Cluster, cli_at, eventually, http_get, https_get, https_get_as};
use serde_json::Value;

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
    runtime().block_on(async {
        let channel = member_channel(&cluster, 0, "n9").await;
        let refused = refused_replica_write(&channel, "forged", i64::MAX).await;
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("members only"),
            "{}",
            refused.message()
        );

        let stream = tokio_stream_once(tree_root("g", 0, 0));
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

/// Writes `g/p/ID` at `mod_revision` as a replica through `channel`, which must refuse it:
/// the refusal.
async fn refused_replica_write(
    channel: &tonic::transport::Channel,
    id: &str,
    mod_revision: i64,
) -> tonic::Status {
    let property = v1::Property {
        group: "g".into(),
        name: "p".into(),
        id: id.into(),
        tags: Vec::new(),
        mod_revision,
        delete_time: 0,
    };
    PropertyServiceClient::new(channel.clone())
        .replica_write(v1::ReplicaWriteRequest {
            property: Some(property),
        })
        .await
        .expect_err("the replica write is refused")
}

/// A channel to node `i` as the member `member` (its own certificate from the cluster CA).
async fn member_channel(cluster: &Cluster, i: usize, member: &str) -> tonic::transport::Channel {
    cluster.endpoint_as(i, member).connect().await.unwrap()
}

/// Three TLS nodes and one copy of `g` (one shard), holding `g/p/1` written through n1: the
/// cluster, the node holding the copy, a node that does not, and the holder's id (a member that
/// could send the shard's messages).
fn one_copy_cluster() -> (Cluster, usize, usize, String) {
    let cluster = Cluster::start_tls(3, &group("g", 1, 0));
    let put = cluster.cli(0, &["put", "g/p/1"]);
    assert!(put.status.success(), "{}", stderr(&put));
    let holder = (0..3)
        .find(|&i| cluster.local_copy(i, "g/p/1").is_some())
        .expect("one node holds the copy");
    let sender = cluster.nodes[holder].id.clone();
    (cluster, holder, (holder + 1) % 3, sender)
}

#[test]
fn peer_messages_are_checked_against_what_a_member_could_send() {
    let (cluster, _, other, sender) = one_copy_cluster();

    // A `--local` write to a node that does not hold the shard is refused.
    let local = cluster.cli_as(other, "writer", &["put", "g/p/2", "--local"]);
    assert!(!local.status.success());
    assert!(
        stderr(&local).contains("holds no copy"),
        "{}",
        stderr(&local)
    );

    runtime().block_on(async {
        let channel = member_channel(&cluster, other, &sender).await;
        // A replica write from a member, for a shard the receiver does not hold.
        let refused = refused_replica_write(&channel, "3", 1).await;
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("holds no copy"),
            "{}",
            refused.message()
        );

        // Gossip hand-offs: a node list that is not the shard's placement, an unknown group, an
        // out-of-range shard and a start far in the future are refused at admission.
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        let hop = |nodes: Vec<String>, group: &str, shard: u32, started_at_ms: i64| {
            let n = u32::try_from(nodes.len()).unwrap();
            v1::PropagationRequest {
                context: Some(v1::PropagationContext {
                    nodes,
                    max_count: 2 * n - 3,
                    count: 0,
                    origin_node: sender.clone(),
                    message_id: format!("{sender}-forged"),
                    group: group.to_owned(),
                    shard,
                    started_at_ms,
                    preview: false,
                }),
                trace: Vec::new(),
            }
        };
        let all: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
        let mut gossip = GossipServiceClient::new(channel);
        for (request, expected) in [
            (hop(all.clone(), "g", 0, now_ms), "is not the placement"),
            (hop(all.clone(), "nope", 0, now_ms), "unknown group"),
            (hop(all.clone(), "g", 7, now_ms), "out of range"),
            (
                hop(all.clone(), "g", 0, now_ms + 3_600_000),
                "ahead of this node's clock",
            ),
        ] {
            let refused = gossip.propagate(request).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(
                refused.message().contains(expected),
                "{expected}: {}",
                refused.message()
            );
        }
    });
    for i in 0..3 {
        for entity in ["g/p/2", "g/p/3"] {
            assert!(
                cluster.local_copy(i, entity).is_none(),
                "{entity} landed on n{}",
                i + 1
            );
        }
    }
}

/// An opening `TreeRoot` for (group, shard) at `protocol_version` (2: the bulk path).
fn tree_root(group: &str, shard: u32, protocol_version: u32) -> v1::RepairRequest {
    v1::RepairRequest {
        msg: Some(v1::repair_request::Msg::TreeRoot(v1::TreeRoot {
            group: group.into(),
            shard,
            protocol_version,
            ..v1::TreeRoot::default()
        })),
    }
}

#[test]
fn a_repair_stream_for_a_shard_this_node_does_not_hold_is_refused_at_admission() {
    let (cluster, holder, other, sender) = one_copy_cluster();
    runtime().block_on(async {
        let channel = member_channel(&cluster, other, &sender).await;
        let mut repair = RepairServiceClient::new(channel);
        // The descent (version 1) and the bulk path (version 2) open the same way.
        for version in [1, 2] {
            let refused = repair
                .repair(tokio_stream_once(tree_root("g", 0, version)))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
            assert!(
                refused
                    .message()
                    .contains("holds no copy of group \"g\" shard 0"),
                "{}",
                refused.message()
            );
        }
        for (root, expected) in [
            (tree_root("nope", 0, 2), "unknown group \"nope\""),
            (tree_root("g", 5, 2), "group \"g\" shard 5 is out of range"),
        ] {
            let refused = repair.repair(tokio_stream_once(root)).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(
                refused.message().contains(expected),
                "{expected}: {}",
                refused.message()
            );
        }
    });
    // The holder itself still serves a stream for its shard: it answers the opening.
    runtime().block_on(async {
        let channel = member_channel(&cluster, holder, &sender).await;
        let mut answers = RepairServiceClient::new(channel)
            .repair(tokio_stream_once(tree_root("g", 0, 2)))
            .await
            .expect("the holder admits the stream")
            .into_inner();
        let first = answers.message().await.expect("an answer");
        assert!(
            matches!(
                first.and_then(|m| m.msg),
                Some(v1::repair_response::Msg::RootCompare(v1::RootCompare {
                    tree_found: true,
                    ..
                }))
            ),
            "the holder answers with its root"
        );
    });
}

#[test]
fn copies_from_beyond_the_clock_skew_bound_are_neither_stored_nor_spread() {
    // n1 accepts revisions up to a day ahead; n2 keeps the default bound of 30 s (a copy may lie
    // at most twice that ahead of its clock: a client-chosen revision on a coordinator whose
    // clock leads by the bound).
    let mut cluster = Cluster::configure(2, &group("g", 1, 1));
    let first = std::fs::read_to_string(&cluster.nodes[0].config).unwrap();
    std::fs::write(
        &cluster.nodes[0].config,
        format!("max_clock_skew = \"24h\"\n{first}"),
    )
    .unwrap();
    for i in 0..2 {
        cluster.start_node(i);
    }
    for i in 0..2 {
        cluster.wait_ready(i);
    }
    let ahead = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
        + 2 * 3_600 * 1_000_000_000;
    let ahead = ahead.to_string();

    // A coordinated write through n1: n1 takes it, n2 refuses its replica write.
    let put = cluster.cli(0, &["put", "g/p/replica", "--revision", &ahead]);
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(cluster.local_copy(0, "g/p/replica").is_some());
    // The refusal names the field (the replica write as n1 sends it).
    runtime().block_on(async {
        let channel = cluster.endpoint(1).connect().await.unwrap();
        let refused = PropertyServiceClient::new(channel)
            .replica_write(v1::ReplicaWriteRequest {
                property: Some(v1::Property {
                    group: "g".into(),
                    name: "p".into(),
                    id: "replica".into(),
                    tags: Vec::new(),
                    mod_revision: ahead.parse().unwrap(),
                    delete_time: 0,
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains("property.mod_revision"),
            "{}",
            refused.message()
        );
    });

    // Copies only n1 holds (a live one and a tombstone), then rounds from either side: the
    // repair stream carries them to n2 (n2 serves the sync, then n2 runs it) and n2 refuses
    // them.
    for args in [
        vec!["put", "g/p/stream", "--local", "--revision", &ahead],
        vec!["delete", "g/p/gone", "--local", "--revision", &ahead],
    ] {
        let output = cluster.cli(0, &args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    }
    // A round from each node. Which node runs the sync follows the shard's node list: where n1
    // runs it, n2 serves and applies what n1 sends (its refusals come back as `peer_failed`);
    // where n2 runs it, n2 applies what n1 answers (`failed`).
    for origin in [0, 1] {
        let round = cluster.cli(
            origin,
            &[
                "repair", "--group", "g", "--shard", "0", "--wait", "--output", "json",
            ],
        );
        let result: Value = serde_json::from_slice(&round.stdout)
            .unwrap_or_else(|error| panic!("{error}: {}", stderr(&round)));
        let sync = &result["syncs"][0];
        let field = if sync["from"] == "n2" {
            "failed"
        } else {
            "peer_failed"
        };
        assert_eq!(sync[field], 3, "the three copies are refused: {result}");
        assert_eq!(sync["applied"], 0, "{result}");
        assert_eq!(sync["peer_applied"], 0, "{result}");
    }
    let log = cluster.log(1);
    assert!(
        log.contains("refused: property.mod_revision"),
        "n2 did not name the field:\n{log}"
    );
    for entity in ["g/p/replica", "g/p/stream", "g/p/gone"] {
        assert!(
            cluster.local_copy(1, entity).is_none(),
            "{entity} reached n2"
        );
    }
}

#[test]
fn the_http_port_answers_health_to_anyone_and_the_rest_to_readers_and_members() {
    let cluster = Cluster::start_tls(2, &group("g", 1, 1));
    let certs = cluster.certs.clone().unwrap();
    // A certificate from the cluster CA that names no member and carries no role.
    certs.issue(&["--member", "n9=127.0.0.1:1"]);
    let http = cluster.nodes[0].http;

    // `/health`: any TLS client, with or without a certificate (probes cannot present one).
    for client in [None, Some("n9"), Some("reader")] {
        let (code, body) = https_get_as(http, "/health", &certs, client).expect("an answer");
        assert_eq!(code, 200, "as {client:?}: {body}");
        assert!(body.starts_with("ok node n1"), "as {client:?}: {body}");
    }
    // Everything else: a `read` role or more, or a member.
    for path in ["/", "/status.json", "/metrics"] {
        for client in ["reader", "writer", "admin", "n2"] {
            let (code, body) = https_get_as(http, path, &certs, Some(client)).expect("an answer");
            assert_eq!(code, 200, "{path} as {client}: {body}");
        }
        let (code, body) = https_get_as(http, path, &certs, None).expect("an answer");
        assert_eq!(code, 401, "{path} without a certificate: {body}");
        assert!(
            body.contains(&format!(
                "GET {path} needs a client certificate (role `read`)"
            )),
            "{body}"
        );
        let (code, body) = https_get_as(http, path, &certs, Some("n9")).expect("an answer");
        assert_eq!(code, 403, "{path} as a non-member without a role: {body}");
        assert!(body.contains("no `propd:role:*` URI"), "{body}");
    }
    let refusals = |code: &str| {
        metric(
            &cluster,
            0,
            &format!("propd_auth_refusals_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(
        (refusals("unauthenticated"), refusals("permission_denied")),
        (3, 3)
    );

    // A certificate from another CA, or an expired one, gets no answer at all, not even health.
    let other = Certs {
        dir: cluster.dir.path().join("other-ca"),
    };
    other.issue(&["--client", "mallory=admin"]);
    std::fs::copy(other.cert("mallory"), certs.cert("mallory")).unwrap();
    std::fs::copy(other.key("mallory"), certs.key("mallory")).unwrap();
    certs.issue(&["--client", "late=admin", "--days", "-1"]);
    for client in ["mallory", "late"] {
        assert_eq!(
            https_get_as(http, "/health", &certs, Some(client)),
            None,
            "{client}"
        );
    }
}

#[test]
fn a_node_dials_only_the_member_it_meant_to_reach() {
    let mut cluster = Cluster::start_tls(2, &format!("write_acks = 2\n{}", group("g", 1, 1)));
    let certs = cluster.certs.clone().unwrap();
    let put = cluster.cli(0, &["put", "g/p/1"]);
    assert!(put.status.success(), "{}", stderr(&put));

    // n2 comes back presenting n1's certificate (a good certificate from the cluster CA, for
    // the wrong member): n1's dials to n2 check the name and refuse it.
    cluster.kill(1);
    std::fs::copy(certs.cert("n1"), certs.cert("n2")).unwrap();
    std::fs::copy(certs.key("n1"), certs.key("n2")).unwrap();
    cluster.start_node(1);
    cluster.wait_ready(1);
    let put = cluster.cli(0, &["put", "g/p/2"]);
    assert!(
        !put.status.success(),
        "a copy at the wrong member acknowledged"
    );
    // n1's own copy may or may not have answered when n2's refusal ends the wait (a write that
    // can no longer reach `write_acks` gives up at once).
    assert!(
        [
            "only 0 of 2 copies acknowledged",
            "only 1 of 2 copies acknowledged"
        ]
        .iter()
        .any(|said| stderr(&put).contains(said)),
        "{}",
        stderr(&put)
    );
    assert!(cluster.local_copy(1, "g/p/2").is_none());

    // With its own certificate again, n2 takes writes.
    cluster.kill(1);
    certs.issue(&["--member", &format!("n2={}", cluster.nodes[1].listen)]);
    cluster.start_node(1);
    cluster.wait_ready(1);
    assert!(
        eventually(Duration::from_secs(20), || cluster
            .cli(0, &["put", "g/p/3"])
            .status
            .success()),
        "n1 does not reach n2 with its own certificate:\n{}",
        cluster.log(0)
    );
}

#[test]
fn tls_comes_from_propd_variables_for_the_node_and_the_cli() {
    let mut cluster = Cluster::configure(1, &group("g", 1, 0));
    let certs = Certs {
        dir: cluster.dir.path().join("certs"),
    };
    let listen = cluster.nodes[0].listen.to_string();
    certs.issue(&[
        "--member",
        &format!("n1={listen}"),
        "--client",
        "admin=admin",
    ]);
    let path = |p: std::path::PathBuf| p.display().to_string();
    cluster.env = vec![
        ("PROPD_TLS_CERT".into(), path(certs.cert("n1"))),
        ("PROPD_TLS_KEY".into(), path(certs.key("n1"))),
        ("PROPD_TLS_CA".into(), path(certs.ca())),
    ];
    // The harness's own calls (readiness, `cli`) speak TLS as `admin`.
    cluster.certs = Some(certs.clone());
    cluster.start_node(0);
    cluster.wait_ready(0);

    let plain = cli_at(&listen, &["status"]);
    assert!(!plain.status.success(), "the node serves plaintext");
    let mut command = std::process::Command::new(propd_tests::propd_binary());
    command
        .args(["put", "g/p/env", "--server", &listen])
        .env("PROPD_CA", certs.ca())
        .env("PROPD_CERT", certs.cert("admin"))
        .env("PROPD_KEY", certs.key("admin"))
        .env("PROPD_SERVER_NAME", "n1")
        .stdin(std::process::Stdio::null());
    let put = propd_tests::run_bounded(command, Duration::from_secs(60)).unwrap();
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(cluster.local_copy(0, "g/p/env").is_some());
}

#[test]
fn plaintext_off_loopback_must_be_asked_for_and_then_warns_at_every_start() {
    let mut cluster = Cluster::configure(1, &group("g", 1, 0));
    let spec = &cluster.nodes[0];
    let config = std::fs::read_to_string(&spec.config).unwrap();
    // Refused before anything is bound.
    let open = config.replace(
        &format!("listen = \"{}\"", spec.listen),
        &format!("listen = \"0.0.0.0:{}\"", spec.listen.port()),
    );
    let open_file = cluster.dir.path().join("open.toml");
    std::fs::write(&open_file, open).unwrap();
    let mut command = std::process::Command::new(propd_tests::propd_binary());
    command
        .args(["serve", "--config"])
        .arg(&open_file)
        .stdin(std::process::Stdio::null());
    let refused = propd_tests::run_bounded(command, Duration::from_secs(30)).unwrap();
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("is not a loopback address") && message.contains("insecure = true"),
        "{message}"
    );

    // `insecure = true` (here on loopback, so nothing is exposed) warns at each start.
    std::fs::write(&spec.config, format!("insecure = true\n{config}")).unwrap();
    cluster.start_node(0);
    cluster.wait_ready(0);
    cluster.restart(0);
    let warnings = cluster
        .log(0)
        .matches("insecure = true: serving plaintext without authentication")
        .count();
    assert_eq!(warnings, 2, "{}", cluster.log(0));
}
