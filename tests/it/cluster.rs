//! Whole-cluster behaviour over real `propd serve` processes on 127.0.0.1: divergence after a
//! node dies, repair by one propagation, skipped nodes, write-miss repair without a trigger,
//! and bad requests that change nothing.

use std::io::Write as _;
use std::net::TcpStream;
use std::time::Duration;

use propd_tests::{Cluster, cli_at, eventually, free_port, http_get};
use serde_json::Value;

/// A group table and background repair off: the tests trigger repair themselves unless they
/// test the automatic triggers.
fn group(name: &str, shard_num: u32, replicas: u32) -> String {
    format!(
        "[[groups]]\nname = \"{name}\"\nshard_num = {shard_num}\nreplicas = {replicas}\n\n[repair]\nenabled = false\n"
    )
}

fn roots(cluster: &Cluster, nodes: &[usize], group: &str, shard: u32) -> Vec<String> {
    let shard = shard.to_string();
    nodes
        .iter()
        .map(|&i| {
            cluster.json(i, &["tree", "--group", group, "--shard", &shard])["root"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

fn local_copy(cluster: &Cluster, i: usize, entity: &str) -> Option<Value> {
    let output = cluster.cli(i, &["get", entity, "--local", "--output", "json"]);
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).expect("get prints JSON"))
}

fn all_equal(values: &[String]) -> bool {
    values.windows(2).all(|w| w[0] == w[1])
}

#[test]
fn a_killed_node_misses_writes_and_one_repair_per_shard_makes_every_copy_equal() {
    // A write answers once `write_acks` copies acknowledged; two, so that the answer counts both
    // live copies.
    let mut cluster = Cluster::start(3, &format!("write_acks = 2\n{}", group("g", 2, 2)));
    for k in 0..10 {
        cluster.json(0, &["put", &format!("g/item/{k}"), "--tag", "round=1"]);
    }
    cluster.kill(2);
    for k in 5..25 {
        let entity = format!("g/item/{k}");
        let put = cluster.json(0, &["put", &entity, "--tag", "round=2"]);
        assert_eq!(put["acknowledged"], 2, "two of three copies are up");
    }
    cluster.json(1, &["delete", "g/item/0"]);
    cluster.restart(2);
    assert_eq!(
        local_copy(&cluster, 2, "g/item/20"),
        None,
        "n3 missed the write while it was down"
    );
    assert_eq!(
        local_copy(&cluster, 2, "g/item/0").unwrap()["delete_time"],
        0,
        "and the delete"
    );
    assert!((0..2).any(|s| !all_equal(&roots(&cluster, &[0, 1, 2], "g", s))));

    for shard in ["0", "1"] {
        let result = cluster.json(1, &["repair", "--group", "g", "--shard", shard, "--wait"]);
        assert_eq!(result["ok"], true, "{result}");
        assert!(result["syncs"].as_array().unwrap().len() >= 2, "{result}");
    }
    for shard in 0..2 {
        assert!(
            all_equal(&roots(&cluster, &[0, 1, 2], "g", shard)),
            "shard {shard} roots differ"
        );
    }
    for k in 1..25 {
        let entity = format!("g/item/{k}");
        let copies: Vec<Value> = (0..3)
            .map(|i| local_copy(&cluster, i, &entity).expect("every copy holds it"))
            .collect();
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "{entity}: {copies:?}"
        );
        let expected = if k >= 5 { "2" } else { "1" };
        assert_eq!(copies[0]["tags"]["round"], expected);
    }
    assert_eq!(
        local_copy(&cluster, 2, "g/item/0"),
        None,
        "the delete reached n3"
    );
}

#[test]
fn five_versions_on_five_nodes_converge_to_the_newest_in_one_propagation() {
    let cluster = Cluster::start(5, &group("g", 1, 4));
    for i in 0..5 {
        let revision = (i + 1).to_string();
        cluster.json(
            i,
            &[
                "put",
                "g/doc/one",
                "--tag",
                &format!("v={revision}"),
                "--local",
                "--revision",
                &revision,
            ],
        );
    }
    // A preview finds the differences and applies nothing.
    let preview = cluster.json(2, &["repair", "--group", "g", "--shard", "0", "--preview"]);
    assert_eq!(preview["ok"], true, "{preview}");
    let found: u64 = preview["syncs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sent"].as_u64().unwrap())
        .sum();
    assert!(found > 0, "the preview saw the differing copies: {preview}");
    assert_eq!(
        local_copy(&cluster, 0, "g/doc/one").unwrap()["mod_revision"],
        1,
        "a preview changes nothing"
    );

    let result = cluster.json(2, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(result["ok"], true, "{result}");
    assert!(
        result["syncs"].as_array().unwrap().len() <= 7,
        "at most 2n - 3 syncs: {result}"
    );
    for i in 0..5 {
        let copy = local_copy(&cluster, i, "g/doc/one").unwrap();
        assert_eq!(copy["mod_revision"], 5, "node {i}: {copy}");
        assert_eq!(copy["tags"]["v"], "5");
    }
    assert!(all_equal(&roots(&cluster, &[0, 1, 2, 3, 4], "g", 0)));
}

#[test]
fn a_node_down_during_a_propagation_is_skipped_and_the_rest_converge() {
    let mut cluster = Cluster::start(4, &group("g", 1, 3));
    for i in 0..4 {
        let revision = (10 + i).to_string();
        cluster.json(i, &["put", "g/doc/x", "--local", "--revision", &revision]);
        cluster.json(
            i,
            &["put", &format!("g/only/{i}"), "--local", "--revision", "1"],
        );
    }
    cluster.kill(1);
    let result = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    let skipped = result["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|s| s["to"] == "n2"),
        "n2 is skipped: {result}"
    );
    for i in [0, 2, 3] {
        assert_eq!(
            local_copy(&cluster, i, "g/doc/x").unwrap()["mod_revision"],
            13,
            "node {i}"
        );
        for j in [0, 2, 3] {
            assert!(
                local_copy(&cluster, i, &format!("g/only/{j}")).is_some(),
                "node {i} has g/only/{j}"
            );
        }
    }
    assert!(all_equal(&roots(&cluster, &[0, 2, 3], "g", 0)));
    let status = cluster.json(0, &["status"]);
    let n2 = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "n2")
        .unwrap()
        .clone();
    assert_eq!(n2["up"], false, "{status}");
}

#[test]
fn a_missed_write_is_repaired_without_a_manual_trigger() {
    // Background rounds every hour: only the write-miss trigger can repair within the test.
    let mut cluster = Cluster::start(
        3,
        "write_acks = 2\n[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = 2\n[repair]\nenabled = true\nperiod = \"1h\"\n",
    );
    cluster.kill(2);
    let put = cluster.json(0, &["put", "g/late/one", "--tag", "k=v"]);
    assert_eq!(put["acknowledged"], 2);
    cluster.restart(2);
    let repaired = eventually(Duration::from_secs(30), || {
        local_copy(&cluster, 2, "g/late/one").is_some_and(|copy| copy["tags"]["k"] == "v")
    });
    assert!(
        repaired,
        "n3 never received the write it missed; n1's log:\n{}",
        cluster.log(0)
    );
    // n1's write-miss trigger, or the restarted node's first scheduled round when it is the
    // shard's designated origin (a fresh round clock runs its first shard at once), started it.
    let metrics: Vec<String> = (0..3)
        .map(|i| http_get(cluster.nodes[i].http, "/metrics").unwrap().1)
        .collect();
    assert!(
        metrics.iter().any(|m| {
            m.contains("propd_propagations_started_total{group=\"g\"} 1")
                || m.contains("propd_propagations_started_total{group=\"g\"} 2")
        }),
        "{metrics:?}"
    );
}

#[test]
fn bad_requests_get_clear_errors_change_nothing_and_the_node_serves_on() {
    let cluster = Cluster::start(
        1,
        &format!("max_property_bytes = 1024\n{}", group("g", 2, 0)),
    );
    cluster.json(0, &["put", "g/ok/1", "--tag", "a=b"]);
    let before: Vec<String> = (0..2)
        .map(|s| roots(&cluster, &[0], "g", s).remove(0))
        .collect();

    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["put".into(), "nogroup/n/i".into()], "unknown group"),
        (
            vec![
                "put".into(),
                "g/n/i".into(),
                "--tag".into(),
                format!("big={}", "x".repeat(2000)),
            ],
            "over the limit",
        ),
        (
            vec![
                "put".into(),
                "g/n/i".into(),
                "--tag".into(),
                "novalue".into(),
            ],
            "KEY=VALUE",
        ),
        (vec!["put".into(), "g//i".into()], "entity"),
        (
            vec![
                "tree".into(),
                "--group".into(),
                "g".into(),
                "--shard".into(),
                "9".into(),
            ],
            "shard",
        ),
        (
            vec![
                "repair".into(),
                "--group".into(),
                "nogroup".into(),
                "--shard".into(),
                "0".into(),
            ],
            "unknown group",
        ),
        (
            vec!["query".into(), "--group".into(), "nogroup".into()],
            "unknown group",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = cluster.cli(0, &args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{args:?}: `{stderr}` should mention {expected}"
        );
    }

    // Garbage on the gRPC port: the connection dies, the node does not.
    let mut stream = TcpStream::connect(cluster.nodes[0].listen).unwrap();
    stream
        .write_all(b"\x00\xffnot http/2 at all\r\n\r\n")
        .unwrap();
    drop(stream);

    let after: Vec<String> = (0..2)
        .map(|s| roots(&cluster, &[0], "g", s).remove(0))
        .collect();
    assert_eq!(before, after, "no bad request changed the store");
    assert_eq!(
        cluster.json(0, &["get", "g/ok/1"])["tags"]["a"],
        "b",
        "the node serves on"
    );

    let dead = format!("127.0.0.1:{}", free_port());
    let output = cli_at(&dead, &["status"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[test]
fn background_rounds_repair_every_shard_within_the_period_unless_paused() {
    let cluster = Cluster::start(
        3,
        "[[groups]]\nname = \"g\"\nshard_num = 3\nreplicas = 2\n[repair]\nenabled = true\nperiod = \"1s\"\n",
    );
    for i in 0..3 {
        cluster.json(i, &["repair", "pause"]);
    }
    // Rounds started before the pause (the first is due at start) finish within milliseconds.
    std::thread::sleep(Duration::from_secs(1));
    // Divergence no coordinator knows about: local writes on one node only.
    for k in 0..6 {
        cluster.json(
            0,
            &["put", &format!("g/bg/{k}"), "--local", "--revision", "7"],
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        (0..6).all(|k| local_copy(&cluster, 1, &format!("g/bg/{k}")).is_none()),
        "paused nodes start no background round"
    );
    for i in 0..3 {
        assert_eq!(cluster.json(i, &["repair", "resume"])["paused"], false);
    }
    let converged = eventually(Duration::from_secs(30), || {
        (0..6).all(|k| (1..3).all(|i| local_copy(&cluster, i, &format!("g/bg/{k}")).is_some()))
    });
    assert!(
        converged,
        "background rounds did not repair every shard; n1's log:\n{}",
        cluster.log(0)
    );
    let recorded = eventually(Duration::from_secs(10), || {
        cluster.json(0, &["status"])["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["last_repair_age_s"].is_number())
    });
    assert!(
        recorded,
        "every shard records a complete round: {}",
        cluster.json(0, &["status"])
    );
}

#[test]
fn a_coordinated_get_returns_the_newest_copy_and_repairs_the_stale_ones() {
    let cluster = Cluster::start(3, &group("g", 1, 2));
    cluster.json(0, &["put", "g/rr/x", "--tag", "v=old", "--revision", "10"]);
    cluster.json(
        2,
        &[
            "put",
            "g/rr/x",
            "--tag",
            "v=new",
            "--revision",
            "11",
            "--local",
        ],
    );
    let read = cluster.json(1, &["get", "g/rr/x"]);
    assert_eq!(read["tags"]["v"], "new", "{read}");
    assert_eq!(read["mod_revision"], 11);
    let repaired = eventually(Duration::from_secs(10), || {
        (0..3).all(|i| local_copy(&cluster, i, "g/rr/x").is_some_and(|c| c["mod_revision"] == 11))
    });
    assert!(repaired, "read repair rewrote the stale copies");
    let listed = cluster.json(0, &["query", "--group", "g"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["tags"]["v"], "new");
}

#[test]
fn sigterm_stops_a_node_cleanly_and_its_data_survives() {
    let mut cluster = Cluster::start(1, &group("g", 1, 0));
    cluster.json(0, &["put", "g/keep/1", "--tag", "a=1"]);
    assert!(
        cluster.terminate(0),
        "propd exits 0 on SIGTERM; log:\n{}",
        cluster.log(0)
    );
    cluster.start_node(0);
    cluster.wait_ready(0);
    assert_eq!(cluster.json(0, &["get", "g/keep/1"])["tags"]["a"], "1");
}
