//! Whole-cluster behaviour over real `propd serve` processes on 127.0.0.1: divergence after a
//! node dies, repair by one propagation, skipped nodes, write-miss repair without a trigger,
//! `write_acks`, read repair, the scheduler's pause and cron window, tombstone purging, graceful
//! shutdown with work in flight, and bad requests that change nothing.
//!
//! No fixed sleep decides an outcome: every wait polls an observable condition with a deadline.

use std::io::Write as _;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use propd_tests::{Cluster, DeadAddr, cli_at, eventually, propd_binary};
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

fn all_equal(values: &[String]) -> bool {
    values.windows(2).all(|w| w[0] == w[1])
}

/// The counter `name` on node `i`, summed over its label sets (every metric is labelled by
/// group); 0 while it has no sample (a labelled family shows nothing until its first). Whole
/// names are compared, so that `…_total 1` is not mistaken for `…_total 12`; the tests that
/// expect 0 of a counter also see it counted elsewhere, so a renamed counter fails them.
fn metric(cluster: &Cluster, i: usize, name: &str) -> u64 {
    let text = cluster
        .http(i, "/metrics")
        .expect("the metrics page answers")
        .1;
    assert!(
        text.contains("# EOF"),
        "node {i}'s metrics page is whole:\n{text}"
    );
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let key = series.split_once('{').map_or(series, |(key, _)| key);
            (key == name).then(|| value.trim().parse::<u64>().expect("a counter value"))
        })
        .sum()
}

/// Waits until the clock is `cutoff` past `time`: a round started then lets go of the
/// tombstones deleted before `time` (its cutoff is its start minus three clock-skew bounds).
fn past_cutoff(time: SystemTime, cutoff: Duration) {
    assert!(
        eventually(Duration::from_secs(10), || time
            .elapsed()
            .is_ok_and(|elapsed| elapsed > cutoff)),
        "the clock moved on"
    );
}

/// Whether every round node `i` started has ended.
fn no_round_in_flight(cluster: &Cluster, i: usize) -> bool {
    let ended = metric(cluster, i, "propd_propagations_finished_total")
        + metric(cluster, i, "propd_propagations_failed_total")
        + metric(cluster, i, "propd_propagations_refused_total");
    metric(cluster, i, "propd_propagations_started_total") == ended
}

/// Node `i`'s `status`: each shard's age of its last complete round (`None`: never).
fn repair_ages(cluster: &Cluster, i: usize) -> Vec<Option<u64>> {
    cluster.json(i, &["status"])["shards"]
        .as_array()
        .expect("status lists shards")
        .iter()
        .map(|s| s["last_repair_age_s"].as_u64())
        .collect()
}

/// The number of leaves (live copies and tombstones) in node `i`'s tree of a shard.
fn leaves(cluster: &Cluster, i: usize, group: &str, shard: u32) -> u64 {
    let shard = shard.to_string();
    cluster.json(i, &["tree", "--group", group, "--shard", &shard])["leaves"]
        .as_u64()
        .expect("a leaf count")
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
        cluster.local_copy(2, "g/item/20"),
        None,
        "n3 missed the write while it was down"
    );
    assert_eq!(
        cluster.local_copy(2, "g/item/0").unwrap()["delete_time"],
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
            .map(|i| cluster.local_copy(i, &entity).expect("every copy holds it"))
            .collect();
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "{entity}: {copies:?}"
        );
        let expected = if k >= 5 { "2" } else { "1" };
        assert_eq!(copies[0]["tags"]["round"], expected);
    }
    assert_eq!(
        cluster.local_copy(2, "g/item/0"),
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
        cluster.local_copy(0, "g/doc/one").unwrap()["mod_revision"],
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
        let copy = cluster.local_copy(i, "g/doc/one").unwrap();
        assert_eq!(copy["mod_revision"], 5, "node {i}: {copy}");
        assert_eq!(copy["tags"]["v"], "5");
    }
    assert!(all_equal(&roots(&cluster, &[0, 1, 2, 3, 4], "g", 0)));
}

#[test]
fn a_node_down_when_a_propagation_starts_is_skipped_and_the_rest_converge() {
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
    assert_eq!(
        result["ok"], true,
        "a skip does not fail the round: {result}"
    );
    let skipped = result["skipped"].as_array().unwrap();
    assert!(
        skipped.iter().any(|s| s["to"] == "n2"),
        "n2 is skipped: {result}"
    );
    for i in [0, 2, 3] {
        assert_eq!(
            cluster.local_copy(i, "g/doc/x").unwrap()["mod_revision"],
            13,
            "node {i}"
        );
        for j in [0, 2, 3] {
            assert!(
                cluster.local_copy(i, &format!("g/only/{j}")).is_some(),
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
    // Background repair is on (the write-miss trigger needs it) with a one-second period, but
    // its cron window never opens (February 31st): only the write-miss trigger can start a
    // round. Group `h` diverges on n1 alone, in every shard (each node originates one), so a
    // scheduled round anywhere would show.
    let mut cluster = Cluster::start(
        3,
        "write_acks = 2\n[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = 2\n\n\
         [[groups]]\nname = \"h\"\nshard_num = 3\nreplicas = 2\n\n\
         [repair]\nenabled = true\nperiod = \"1s\"\ncron = \"0 0 31 2 *\"\n",
    );
    for k in 0..12 {
        cluster.json(
            0,
            &["put", &format!("h/local/{k}"), "--local", "--revision", "3"],
        );
    }
    cluster.kill(2);
    let put = cluster.json(0, &["put", "g/late/one", "--tag", "k=v"]);
    assert_eq!(put["acknowledged"], 2);
    cluster.restart(2);
    let repaired = eventually(Duration::from_secs(30), || {
        cluster
            .local_copy(2, "g/late/one")
            .is_some_and(|copy| copy["tags"]["k"] == "v")
    });
    assert!(
        repaired,
        "n3 never received the write it missed; n1's log:\n{}",
        cluster.log(0)
    );
    // n1 coordinated the write, so it alone starts the write-miss round (again only if the
    // first start was refused).
    let started = metric(&cluster, 0, "propd_propagations_started_total");
    assert!((1..=2).contains(&started), "n1 started {started} rounds");
    assert_eq!(
        metric(&cluster, 1, "propd_propagations_started_total"),
        0,
        "n2 starts no scheduled round outside the cron window"
    );
    assert!(
        (0..12).all(|k| cluster.local_copy(1, &format!("h/local/{k}")).is_none()),
        "no scheduled round repaired group h"
    );
}

#[test]
fn a_write_fails_when_fewer_than_write_acks_copies_acknowledge() {
    // Three copies of every shard; write_acks = 3 on n1 and 2 on n2 (each node's own setting
    // rules the writes it coordinates).
    let mut cluster = Cluster::start(3, &group("g", 1, 2));
    for (i, acks) in [(0, 3), (1, 2), (2, 5)] {
        let config = std::fs::read_to_string(&cluster.nodes[i].config).unwrap();
        std::fs::write(
            &cluster.nodes[i].config,
            format!("write_acks = {acks}\n{config}"),
        )
        .unwrap();
        cluster.restart(i);
    }
    let all = cluster.json(0, &["put", "g/acks/all", "--tag", "a=1"]);
    assert_eq!(all["acknowledged"], 3, "{all}");
    // write_acks = 5 with three copies: capped at the three there are.
    let capped = cluster.json(2, &["put", "g/acks/capped"]);
    assert_eq!(capped["acknowledged"], 3, "{capped}");

    cluster.kill(2);
    let output = cluster.cli(0, &["put", "g/acks/short", "--tag", "a=2"]);
    assert!(!output.status.success(), "two of three acks < write_acks 3");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The answer goes out as soon as three acknowledgements are out of reach: when n3's call
    // failed, whether or not n1 and n2 had acknowledged by then.
    let acknowledged: u32 = stderr
        .split_once("only ")
        .and_then(|(_, rest)| rest.split_once(" of 3 copies acknowledged"))
        .and_then(|(count, _)| count.parse().ok())
        .unwrap_or_else(|| panic!("the refusal counts the acknowledgements: {stderr}"));
    assert!(
        acknowledged < 3 && stderr.contains("3 required"),
        "{stderr}"
    );
    let output = cluster.cli(0, &["delete", "g/acks/all"]);
    assert!(!output.status.success(), "a delete needs write_acks too");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("3 required"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let enough = cluster.json(1, &["put", "g/acks/enough", "--tag", "a=3"]);
    assert_eq!(enough["acknowledged"], 2, "{enough}");
    assert_eq!(enough["copies"], 3, "{enough}");
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

    let dead = DeadAddr::new();
    let output = cli_at(&dead.addr().to_string(), &["status"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
}

#[test]
fn background_rounds_repair_every_shard_within_the_period_unless_paused() {
    const PERIOD_S: u64 = 2;
    let cluster = Cluster::start(
        3,
        &format!(
            "[[groups]]\nname = \"g\"\nshard_num = 3\nreplicas = 2\n[repair]\nenabled = true\nperiod = \"{PERIOD_S}s\"\n"
        ),
    );
    // Every shard completes a background round, then every node is paused and the rounds
    // already started end.
    let recorded = eventually(Duration::from_secs(30), || {
        repair_ages(&cluster, 0).iter().all(Option::is_some)
    });
    assert!(recorded, "{}", cluster.json(0, &["status"]));
    for i in 0..3 {
        assert_eq!(cluster.json(i, &["repair", "pause"])["paused"], true);
    }
    assert!(eventually(Duration::from_secs(30), || {
        (0..3).all(|i| no_round_in_flight(&cluster, i))
    }));
    // Divergence no coordinator knows about: local writes on one node only.
    for k in 0..6 {
        cluster.json(
            0,
            &["put", &format!("g/bg/{k}"), "--local", "--revision", "7"],
        );
    }
    // Paused, no round completes: the last complete round of every shard grows older than two
    // periods (were rounds still starting, this would never hold).
    let idle = eventually(Duration::from_secs(30), || {
        repair_ages(&cluster, 0)
            .iter()
            .all(|age| age.is_some_and(|age| age > 2 * PERIOD_S))
    });
    assert!(idle, "paused nodes start no background round");
    assert!(
        (0..6).all(|k| cluster.local_copy(1, &format!("g/bg/{k}")).is_none()),
        "paused nodes start no background round"
    );
    for i in 0..3 {
        assert_eq!(cluster.json(i, &["repair", "resume"])["paused"], false);
    }
    let resumed = Instant::now();
    // Within one period (plus a scheduler tick, one round's time and the age's rounding),
    // every shard has a fresh complete round.
    let fresh = eventually(Duration::from_secs(30), || {
        repair_ages(&cluster, 0)
            .iter()
            .all(|age| age.is_some_and(|age| age < PERIOD_S))
    });
    assert!(
        fresh,
        "background rounds did not repair every shard; n1's log:\n{}",
        cluster.log(0)
    );
    let took = resumed.elapsed();
    assert!(
        took < Duration::from_secs(PERIOD_S + 3),
        "every shard was repaired {took:?} after resume; the period is {PERIOD_S}s"
    );
    assert!(
        (0..6).all(|k| (1..3).all(|i| cluster.local_copy(i, &format!("g/bg/{k}")).is_some())),
        "background rounds repaired every shard"
    );
}

#[test]
fn a_purge_needs_a_complete_round_newer_than_the_tombstone() {
    // Verification and purging run every second, tombstones are old after two; background
    // rounds are off, so only the rounds below count. A round lets go of the tombstones older
    // than its start minus three clock-skew bounds: 300 ms here.
    let mut cluster = Cluster::start(
        3,
        "max_clock_skew = \"100ms\"\n\
         [[groups]]\nname = \"g\"\nshard_num = 2\nreplicas = 2\n[repair]\nenabled = false\n\
         period = \"1s\"\nverify_interval = \"1s\"\ntombstone_grace = \"2s\"\n",
    );
    for k in 0..16 {
        cluster.json(0, &["put", &format!("g/p/{k}")]);
        cluster.json(0, &["delete", &format!("g/p/{k}")]);
    }
    let deleted = SystemTime::now();
    let tombstones: Vec<u64> = (0..2).map(|s| leaves(&cluster, 0, "g", s)).collect();
    assert!(
        tombstones.iter().all(|&n| n > 0),
        "both shards hold tombstones: {tombstones:?}"
    );
    // Shard 0: a preview, and a round that skips a down node: neither is a complete round.
    let preview = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--preview"]);
    assert_eq!(preview["ok"], true, "{preview}");
    cluster.kill(2);
    let skipping = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(
        skipping["ok"], true,
        "a round with a skip completes: {skipping}"
    );
    assert_eq!(
        skipping["skipped"].as_array().unwrap().len(),
        1,
        "{skipping}"
    );
    cluster.restart(2);
    // Shard 1: a complete round, started past the cutoff of the deletes. Its result is recorded
    // after shard 0's rounds (results are handled in order), so once it shows, shard 0's are
    // settled.
    past_cutoff(deleted, Duration::from_millis(300));
    let complete = cluster.json(0, &["repair", "--group", "g", "--shard", "1", "--wait"]);
    assert_eq!(complete["ok"], true, "{complete}");
    assert!(complete["skipped"].as_array().unwrap().is_empty());
    assert!(eventually(Duration::from_secs(10), || {
        repair_ages(&cluster, 0)[1].is_some()
    }));
    assert_eq!(
        repair_ages(&cluster, 0)[0],
        None,
        "neither a preview nor a round with a skip records a complete round"
    );
    // Shard 1's tombstones are purged on every copy once older than the grace. Each node
    // verifies and purges shard 0 before shard 1 in the same pass, so by then shard 0's purge
    // ran too, and kept everything.
    let purged = eventually(Duration::from_secs(30), || {
        (0..3).all(|i| leaves(&cluster, i, "g", 1) == 0)
    });
    assert!(purged, "n1's log:\n{}", cluster.log(0));
    assert!(metric(&cluster, 0, "propd_tombstones_purged_total") >= tombstones[1]);
    assert_eq!(leaves(&cluster, 0, "g", 0), tombstones[0]);
    assert_eq!(leaves(&cluster, 1, "g", 0), tombstones[0]);
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
        (0..3).all(|i| {
            cluster
                .local_copy(i, "g/rr/x")
                .is_some_and(|c| c["mod_revision"] == 11)
        })
    });
    assert!(repaired, "read repair rewrote the stale copies");
    let listed = cluster.json(0, &["query", "--group", "g"]);
    assert_eq!(
        listed["properties"].as_array().unwrap().len(),
        1,
        "{listed}"
    );
    assert_eq!(listed["properties"][0]["tags"]["v"], "new");
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

#[test]
fn read_repair_spreads_a_newer_tombstone_and_fills_a_missing_copy() {
    let cluster = Cluster::start(3, &group("g", 1, 2));
    // g/rr/gone: live on every copy, then a newer tombstone on n3 alone.
    cluster.json(
        0,
        &["put", "g/rr/gone", "--tag", "v=live", "--revision", "10"],
    );
    cluster.json(2, &["delete", "g/rr/gone", "--local", "--revision", "11"]);
    let output = cluster.cli(1, &["get", "g/rr/gone"]);
    assert!(
        !output.status.success(),
        "the newest copy is a tombstone: the entity is gone"
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("not found"));
    let spread = eventually(Duration::from_secs(10), || {
        (0..2).all(|i| cluster.local_copy(i, "g/rr/gone").is_none())
    });
    assert!(
        spread,
        "read repair rewrote the live copies with the tombstone"
    );
    assert!(all_equal(&roots(&cluster, &[0, 1, 2], "g", 0)));

    // g/rr/half: on n1 and n2 only.
    for i in 0..2 {
        cluster.json(
            i,
            &[
                "put",
                "g/rr/half",
                "--tag",
                "v=1",
                "--local",
                "--revision",
                "5",
            ],
        );
    }
    assert_eq!(cluster.local_copy(2, "g/rr/half"), None);
    let read = cluster.json(2, &["get", "g/rr/half"]);
    assert_eq!(read["mod_revision"], 5, "{read}");
    let filled = eventually(Duration::from_secs(10), || {
        cluster
            .local_copy(2, "g/rr/half")
            .is_some_and(|c| c["tags"]["v"] == "1")
    });
    assert!(filled, "read repair wrote the copy that lacked the entity");
    assert!(all_equal(&roots(&cluster, &[0, 1, 2], "g", 0)));
}

#[test]
fn a_query_merges_copies_that_differ_and_repairs_them() {
    let cluster = Cluster::start(3, &group("g", 2, 2));
    // g/q/a: revision 1 on n1, 2 on n2, absent on n3. g/q/b: on n3 only. g/q/c: deleted on n2
    // by a newer tombstone.
    cluster.json(
        0,
        &[
            "put",
            "g/q/a",
            "--tag",
            "v=old",
            "--local",
            "--revision",
            "1",
        ],
    );
    cluster.json(
        1,
        &[
            "put",
            "g/q/a",
            "--tag",
            "v=new",
            "--local",
            "--revision",
            "2",
        ],
    );
    cluster.json(
        2,
        &["put", "g/q/b", "--tag", "v=b", "--local", "--revision", "1"],
    );
    for i in 0..3 {
        cluster.json(i, &["put", "g/q/c", "--local", "--revision", "1"]);
    }
    cluster.json(1, &["delete", "g/q/c", "--local", "--revision", "3"]);

    let listed = cluster.json(0, &["query", "--group", "g"]);
    let listed = listed["properties"].as_array().unwrap();
    let ids: Vec<&str> = listed.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b"], "{listed:?}");
    assert_eq!(listed[0]["tags"]["v"], "new");
    assert_eq!(listed[0]["mod_revision"], 2);
    assert_eq!(listed[1]["tags"]["v"], "b");

    let repaired = eventually(Duration::from_secs(10), || {
        (0..3).all(|i| {
            cluster
                .local_copy(i, "g/q/a")
                .is_some_and(|c| c["mod_revision"] == 2)
                && cluster.local_copy(i, "g/q/b").is_some()
                && cluster.local_copy(i, "g/q/c").is_none()
        })
    });
    assert!(repaired, "the query's read repair made every copy equal");
    for shard in 0..2 {
        assert!(all_equal(&roots(&cluster, &[0, 1, 2], "g", shard)));
    }
}

#[test]
fn sigterm_with_a_round_in_flight_exits_after_the_grace_and_loses_nothing() {
    // One node's syncs are paced at 2000 bytes a second: after a round that moved some
    // kilobytes, its next sync waits seconds, long enough to stop the node meanwhile.
    let mut cluster = Cluster::start_plaintext(
        3,
        "[[groups]]\nname = \"g\"\nshard_num = 2\nreplicas = 2\n[repair]\nenabled = false\n\
         throttle_bytes_per_second = 2000\n",
    );
    for k in 0..40 {
        cluster.json(
            0,
            &[
                "put",
                &format!("g/slow/{k}"),
                "--tag",
                &format!("pad={}", "x".repeat(300)),
                "--local",
                "--revision",
                "1",
            ],
        );
    }
    let first = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(first["ok"], true, "{first}");
    let moved: u64 = first["syncs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["from"] == "n1")
        .map(|s| s["bytes_sent"].as_u64().unwrap() + s["bytes_received"].as_u64().unwrap())
        .sum();
    assert!(
        moved > 4_000,
        "n1's next sync waits over two seconds: {first}"
    );

    let mut round = Command::new(propd_binary());
    round
        .args([
            "repair", "--group", "g", "--shard", "1", "--wait", "--output", "json",
        ])
        .args(["--server", &cluster.nodes[0].listen.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut round = round.spawn().expect("spawning propd repair");
    assert!(eventually(Duration::from_secs(10), || {
        metric(&cluster, 0, "propd_propagations_started_total") == 2
    }));
    assert!(
        round.try_wait().unwrap().is_none(),
        "the round is still waiting on the throttle"
    );
    cluster.signal_terminate(0);
    let exit = cluster
        .wait_exit(0, Duration::from_secs(45))
        .map(|exit| exit.success());
    let output = round.wait_with_output().unwrap();
    assert_eq!(
        exit,
        Some(true),
        "propd exits 0 within its 30 s grace; log:\n{}",
        cluster.log(0)
    );
    // The round cannot end while n1 stops: the other copies can no longer hand it back. The
    // grace runs out, and the client is told the call broke.
    let log = cluster.log(0);
    assert!(
        log.contains("in-flight work did not finish in time"),
        "{log}"
    );
    assert!(!output.status.success(), "the round did not complete");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    // Nothing is lost: n1 restarts with its data, and the next round finishes the work.
    cluster.start_node(0);
    cluster.wait_ready(0);
    let again = cluster.json(0, &["repair", "--group", "g", "--shard", "1", "--wait"]);
    assert_eq!(again["ok"], true, "{again}");
    for shard in 0..2 {
        assert!(all_equal(&roots(&cluster, &[0, 1, 2], "g", shard)));
    }
    assert!((0..40).all(|k| cluster.local_copy(2, &format!("g/slow/{k}")).is_some()));
}

/// Every JSON field a command prints, as sorted `path` lines (`[]` for an array's elements).
fn shape(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, field) in map {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                out.push(inner.clone());
                if key != "tags" {
                    shape(field, &inner, out);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                shape(item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

fn fields(value: &Value) -> String {
    let mut out = Vec::new();
    shape(value, "", &mut out);
    out.sort();
    out.dedup();
    out.join(" ")
}

/// The JSON type of `value`'s field at `path` (dot-separated; `[0]` for an array's first
/// element): "null", "bool", "number", "string", "array" or "object".
fn kind(value: &Value, path: &str) -> &'static str {
    let mut at = value;
    for step in path.split('.') {
        at = match step.strip_suffix("[0]") {
            Some(key) => &at[key][0],
            None => &at[step],
        };
    }
    match at {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[test]
fn every_command_prints_the_documented_json_fields() {
    // Verification and purging every second, a short grace: the status fields of a purge show
    // with values.
    let mut cluster = Cluster::start(
        2,
        &format!(
            // `group` ends in the [repair] table.
            "max_clock_skew = \"100ms\"\n{}period = \"1s\"\nverify_interval = \"1s\"\n\
             tombstone_grace = \"2s\"\n",
            group("g", 1, 1)
        ),
    );
    const PROPERTY: &str = "delete_time group id mod_revision name tags";
    const WRITE: &str = "acknowledged copies mod_revision superseded";
    let put = cluster.json(0, &["put", "g/j/1", "--tag", "a=b"]);
    assert_eq!(fields(&put), WRITE);
    assert_eq!(kind(&put, "superseded"), "null", "{put}");
    // A write older than the stored version: superseded, with the revision that won, on stdout
    // (and a failure exit).
    let lost = cluster.cli(0, &["put", "g/j/1", "--revision", "1", "--output", "json"]);
    assert!(!lost.status.success(), "a superseded write exits non-zero");
    let lost: Value = serde_json::from_slice(&lost.stdout).expect("JSON on stdout");
    assert_eq!(fields(&lost), WRITE);
    assert_eq!(lost["superseded"], put["mod_revision"], "{lost}");
    let get = cluster.json(0, &["get", "g/j/1"]);
    assert_eq!(fields(&get), PROPERTY);
    let query = cluster.json(0, &["query", "--group", "g"]);
    assert_eq!(
        fields(&query),
        format!(
            "next_page_token properties {}",
            PROPERTY
                .split(' ')
                .map(|f| format!("properties[].{f}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    );
    assert_eq!(kind(&query, "next_page_token"), "null", "the last page");
    // `query --all` and `export` print one JSON object per line, a property's fields each.
    for args in [
        &["query", "--group", "g", "--all", "--output", "json"][..],
        &["export", "--group", "g"][..],
    ] {
        let output = cluster.cli(0, args);
        assert!(output.status.success(), "{args:?}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<Value> = stdout
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stdout}");
        assert_eq!(fields(&lines[0]), PROPERTY, "{args:?}");
    }
    let tree = cluster.json(0, &["tree", "--group", "g", "--shard", "0"]);
    assert_eq!(
        fields(&tree),
        "group leaves revision root shape shape.algorithm shape.depth shape.digest_width \
         shape.fanout shape.format_version shape.slot_count shard slots slots[].digest \
         slots[].leaves slots[].slot"
    );
    const STATUS: &str = "members members[].addr members[].id members[].up membership node \
         quarantined repair_paused shards shards[].group shards[].last_repair_age_s \
         shards[].pending shards[].purge_blocked shards[].purge_cutoff_ns shards[].purged_below_ns \
         shards[].shard store_health";
    let status = cluster.json(0, &["status"]);
    assert_eq!(fields(&status), STATUS);
    // No complete round yet: purging is blocked, with the reason.
    for (field, expected) in [
        ("last_repair_age_s", "null"),
        ("purge_cutoff_ns", "null"),
        ("purged_below_ns", "null"),
        ("purge_blocked", "string"),
    ] {
        assert_eq!(
            kind(&status, &format!("shards[0].{field}")),
            expected,
            "{status}"
        );
    }
    const ROUND: &str = "error message_id ok skipped syncs syncs[].applied \
         syncs[].bytes_received syncs[].bytes_sent syncs[].compared syncs[].error \
         syncs[].failed syncs[].from syncs[].ok syncs[].peer_applied syncs[].peer_failed \
         syncs[].received syncs[].round_trips syncs[].sent syncs[].to";
    let repair = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(repair["ok"], true, "{repair}");
    assert_eq!(fields(&repair), ROUND);
    for field in [
        "applied",
        "peer_applied",
        "failed",
        "peer_failed",
        "compared",
    ] {
        assert_eq!(
            kind(&repair, &format!("syncs[0].{field}")),
            "number",
            "{repair}"
        );
    }
    let preview = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--preview"]);
    assert_eq!(fields(&preview), ROUND);
    let started = cluster.json(0, &["repair", "--group", "g", "--shard", "0"]);
    assert_eq!(fields(&started), "message_id");
    assert_eq!(fields(&cluster.json(0, &["repair", "pause"])), "paused");
    assert_eq!(fields(&cluster.json(0, &["repair", "resume"])), "paused");
    let delete = cluster.json(0, &["delete", "g/j/1"]);
    assert_eq!(
        fields(&delete),
        "acknowledged copies delete_time found mod_revision superseded"
    );
    // A complete round past the delete's cutoff, then the purge past the grace: every status
    // field of the shard has a value.
    past_cutoff(SystemTime::now(), Duration::from_millis(300));
    let round = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    let purged = eventually(Duration::from_secs(30), || {
        kind(&cluster.json(0, &["status"]), "shards[0].purged_below_ns") == "number"
    });
    let status = cluster.json(0, &["status"]);
    assert!(purged, "the tombstone was never purged: {status}");
    assert_eq!(fields(&status), STATUS);
    for field in ["last_repair_age_s", "purge_cutoff_ns", "purged_below_ns"] {
        assert_eq!(
            kind(&status, &format!("shards[0].{field}")),
            "number",
            "{status}"
        );
    }
    // A skip, with the node it skipped.
    cluster.kill(1);
    let skipping = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(skipping["ok"], true, "{skipping}");
    let mut skipped = Vec::new();
    shape(&skipping["skipped"], "skipped", &mut skipped);
    skipped.sort();
    skipped.dedup();
    assert_eq!(
        skipped.join(" "),
        "skipped[].duration_ms skipped[].error skipped[].from skipped[].to",
        "{skipping}"
    );
}
