//! What an operator sees: `repair --wait` reporting each step as the holders finish it, a BLAKE3
//! tree shape from the config, a shape change over existing data refused with the key named,
//! a closed stdout ending a command quietly, and JSON logs.

use std::process::{Command, Stdio};
use std::time::Duration;

use propd_tests::{Cluster, propd_binary, run_bounded};

fn blake3_cluster() -> Cluster {
    Cluster::start(
        3,
        "[tree]\nalgorithm = \"blake3\"\nslot_count = 8\nfanout = 4\ndepth = 2\ndigest_width = 24\n\n[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = 2\n\n[repair]\nenabled = false\n",
    )
}

#[test]
fn a_blake3_cluster_serves_and_repair_wait_reports_each_step_then_the_result() {
    let mut cluster = blake3_cluster();
    cluster.kill(2);
    for k in 0..6 {
        cluster.json(0, &["put", &format!("g/item/{k}"), "--tag", "k=v"]);
    }
    cluster.restart(2);
    let tree = cluster.json(0, &["tree", "--group", "g", "--shard", "0"]);
    assert_eq!(tree["shape"]["algorithm"], "blake3", "{tree}");
    assert_eq!(tree["shape"]["slot_count"], 8, "{tree}");
    assert_eq!(tree["leaves"], 6, "{tree}");

    // stderr is a pipe here, not a terminal: one plain line per step.
    let output = cluster.cli(
        0,
        &[
            "repair", "--group", "g", "--shard", "0", "--wait", "--output", "json",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(result["ok"], true, "{result}");
    let syncs = result["syncs"].as_array().expect("syncs");
    assert_eq!(syncs.len(), 3, "2n - 3 syncs for 3 nodes: {result}");
    let steps: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(steps.len(), syncs.len(), "one line per step: {stderr}");
    for (k, (line, sync)) in steps.iter().zip(syncs).enumerate() {
        let from = sync["from"].as_str().expect("from");
        let to = sync["to"].as_str().expect("to");
        assert!(
            line.starts_with(&format!("step {}/3: sync {from} -> {to}, ", k + 1)),
            "{line} for {sync}"
        );
    }
    // n3 missed six writes: exactly six copies were applied, each counted once, on n3's side.
    let applied: u64 = syncs
        .iter()
        .map(|s| s["applied"].as_u64().unwrap_or(0) + s["peer_applied"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(applied, 6, "{result}");
    let after = cluster.json(2, &["tree", "--group", "g", "--shard", "0"]);
    assert_eq!(after["root"], tree["root"], "n3 converged");
}

#[test]
fn a_tree_shape_change_over_existing_data_is_refused_with_the_key_named() {
    let mut cluster = Cluster::start(1, "");
    cluster.json(0, &["put", "default/n/i"]);
    cluster.kill(0);
    let config = &cluster.nodes[0].config;
    let mut text = std::fs::read_to_string(config).expect("the config");
    text.push_str("\n[tree]\nalgorithm = \"blake3\"\n");
    std::fs::write(config, text).expect("rewriting the config");
    let mut serve = Command::new(propd_binary());
    serve
        .args(["serve", "--config"])
        .arg(config)
        .stdin(Stdio::null());
    let output = run_bounded(serve, Duration::from_secs(60)).expect("serve exits by itself");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "`tree.algorithm`: the store was created with sha512, the configuration gives blake3"
        ),
        "{stderr}"
    );
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let cluster = Cluster::start(1, "");
    for k in 0..50 {
        cluster.json(0, &["put", &format!("default/n/{k:03}"), "--tag", "k=v"]);
    }
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let output = Command::new(propd_binary())
        .args(["query", "--group", "default", "--server"])
        .arg(cluster.nodes[0].listen.to_string())
        .args(cluster.tls_args(0))
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("running propd query");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
}

#[test]
fn log_format_json_writes_one_json_object_per_log_line() {
    let cluster = Cluster::start(1, "log_format = \"json\"\n");
    cluster.json(0, &["status"]);
    let log = cluster.log(0);
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["level"] == "INFO" && e["fields"]["message"] == "serving"),
        "{log}"
    );
    // The other lines are the config printed at start, never a log event in the text format
    // ("<time>  INFO <target>: <message>").
    let text_events: Vec<&str> = log
        .lines()
        .filter(|line| !line.starts_with('{'))
        .filter(|line| {
            [" TRACE ", " DEBUG ", " INFO ", " WARN ", " ERROR "]
                .iter()
                .any(|level| line.contains(level))
        })
        .collect();
    assert!(text_events.is_empty(), "text log lines: {text_events:?}");
}
