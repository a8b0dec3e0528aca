//! The `propd` binary's command line contract: exit codes, one-line errors, and configuration
//! checked before anything starts (every key named when wrong, from the file, the environment
//! or a flag).
//!
//! Every run is bounded in time: a `propd serve` that started instead of failing is killed and
//! the test fails saying so.

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `command` for at most 30 s; `None` when it was still running (it is killed).
fn bounded(mut command: Command) -> Option<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running propd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("polling propd").is_some() {
            return Some(child.wait_with_output().expect("collecting output"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn propd_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_propd"));
    command.args(args).env_remove("RUST_LOG");
    // A serve that wrongly starts must not reach anything real.
    for (key, _) in std::env::vars() {
        if key.starts_with("PROPD_") {
            command.env_remove(key);
        }
    }
    command
}

fn propd(args: &[&str]) -> Output {
    bounded(propd_command(args)).unwrap_or_else(|| panic!("propd {args:?} did not exit"))
}

/// A port held by this test: a config that were wrongly accepted could not serve on it either
/// (the bind fails), so it never reaches a port another test uses.
fn held_port() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("an address");
    (listener, addr)
}

/// Asserts that `propd serve` with `args` (and `env`) exits non-zero at once, with an error
/// naming `key` and mentioning `detail`.
fn refused(args: &[&str], env: &[(&str, &str)], key: &str, detail: &str) {
    let mut command = propd_command(args);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = bounded(command).unwrap_or_else(|| {
        panic!("propd {args:?} {env:?} started serving instead of refusing its config")
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{args:?} {env:?} should fail: {stderr}"
    );
    assert!(
        stderr.contains(key) && stderr.contains(detail),
        "{args:?} {env:?}: `{stderr}` should name {key} and {detail}"
    );
}

#[test]
fn a_dead_address_is_a_one_line_error_and_a_failure() {
    // Port 1 on loopback: nothing listens there; no test binds it.
    let output = propd(&["get", "--server", "127.0.0.1:1", "g/n/i"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("cannot reach 127.0.0.1:1"), "{stderr}");
}

#[test]
fn a_malformed_entity_is_refused_before_any_connection() {
    for entity in ["g/n", "/n/i", "g//i", "g/n/"] {
        let output = propd(&["put", "--server", "127.0.0.1:1", entity]);
        assert!(!output.status.success(), "{entity} should be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("entity `{entity}`")), "{stderr}");
        assert!(
            !stderr.contains("cannot reach"),
            "validated before connecting: {stderr}"
        );
    }
}

#[test]
fn a_bad_config_names_the_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    let path = path.to_str().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (_held, addr) = held_port();
    let listen = addr.to_string();
    let (_held_http, http) = held_port();
    for (text, key, detail) in [
        ("[repair]\nperiod = \"soon\"\n", "repair.period", "soon"),
        ("[repair]\nperiod = \"0s\"\n", "repair.period", "zero"),
        (
            "[repair]\nperiod = \"8d\"\n",
            "repair.period",
            "tombstone_grace",
        ),
        (
            "[repair]\nsync_timeout = \"x\"\n",
            "repair.sync_timeout",
            "x",
        ),
        (
            "[repair]\nround_timeout = \"31d\"\n",
            "repair.round_timeout",
            "31d",
        ),
        (
            "[repair]\nverify_interval = \"often\"\n",
            "repair.verify_interval",
            "often",
        ),
        (
            "[repair]\ntombstone_grace = \"-1s\"\n",
            "repair.tombstone_grace",
            "-1s",
        ),
        ("[repair]\ncron = \"* * *\"\n", "repair.cron", "5"),
        ("[repair]\ncron = \"61 * * * *\"\n", "repair.cron", "minute"),
        (
            "write_acks = 0\n",
            "write_acks",
            "0 is outside the accepted 1..=",
        ),
        (
            "max_property_bytes = 0\n",
            "max_property_bytes",
            "0 is outside the accepted",
        ),
        ("http = \"nowhere\"\n", "http", "nowhere"),
        ("node_id = \"\"\n", "node_id", "empty"),
        ("node_id = \"n9\"\n", "node_id", "n9"),
        (
            "[[members]]\nid = \"n1\"\naddr = \"127.0.0.1:7001\"\n[[members]]\nid = \"n1\"\naddr = \"127.0.0.1:7002\"\n",
            "members",
            "twice",
        ),
        (
            "[[groups]]\nname = \"g\"\nshard_num = 0\n",
            "groups.shard_num",
            "",
        ),
        (
            "[[groups]]\nname = \"a/b\"\nshard_num = 1\n",
            "groups.name",
            "",
        ),
        ("nodeid = \"x\"\n", "nodeid", ""),
    ] {
        let members = if text.contains("[[members]]") {
            String::new()
        } else {
            format!("[[members]]\nid = \"n1\"\naddr = \"{listen}\"\n")
        };
        // Top-level keys first, then tables.
        let (top, tables) = if text.starts_with('[') {
            (String::new(), text.to_owned())
        } else {
            (text.to_owned(), String::new())
        };
        let http = if text.starts_with("http") {
            String::new()
        } else {
            format!("http = \"{http}\"\n")
        };
        std::fs::write(
            path,
            format!("listen = \"{listen}\"\n{http}data_dir = {data:?}\n{top}{members}{tables}"),
        )
        .unwrap();
        refused(&["serve", "--config", path], &[], key, detail);
    }
}

#[test]
fn members_and_groups_from_the_environment_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // n1 listens where the members reach it, on held ports: a wrongly accepted config fails to
    // bind instead of serving.
    let (_held, listen) = held_port();
    let (_held_http, http) = held_port();
    let (listen, http) = (listen.to_string(), http.to_string());
    let check = |members: &str, groups: &str, key: &str, detail: &str| {
        let members = members.replace("N1", &listen);
        refused(
            &["serve"],
            &[
                ("PROPD_DATA_DIR", data),
                ("PROPD_NODE_ID", "n1"),
                ("PROPD_LISTEN", &listen),
                ("PROPD_HTTP", &http),
                ("PROPD_MEMBERS", &members),
                ("PROPD_GROUPS", groups),
            ],
            key,
            detail,
        );
    };
    check("n1=N1,n2", "g:1:0", "ID=ADDR", "n2");
    check("n1=N1,n2=nowhere", "g:1:0", "n2=nowhere", "");
    check(
        "n2=127.0.0.1:1,n3=127.0.0.1:2",
        "g:1:0",
        "node_id",
        "n2, n3",
    );
    check("n1=N1,n1=127.0.0.1:2", "g:1:0", "members", "twice");
    check("n1=N1", "g:1", "NAME:SHARD_NUM:REPLICAS", "");
    check("n1=N1", "g:1:0,h:0:0", "groups.shard_num", "");
    check("n1=N1", "g:1:0,g:2:0", "groups.name", "");
}

#[test]
fn environment_variables_set_config_keys_and_flags_win_over_them() {
    refused(
        &["serve"],
        &[("PROPD_REPAIR_PERIOD", "soon")],
        "repair.period",
        "soon",
    );
    let mut command = propd_command(&["serve", "--repair-period", "later"]);
    command.env("PROPD_REPAIR_PERIOD", "soon");
    let output = bounded(command).expect("propd refuses its config");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("later") && !stderr.contains("soon"),
        "the flag wins: {stderr}"
    );
}

#[test]
fn serve_refuses_mistakes_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    for (args, variable, key) in [
        (vec!["--group", "g:100000000:0"], None, "groups.shard_num"),
        (
            vec![],
            Some(("PROPD_REPAIR_VERIFY_INTERVAL", "0s")),
            "repair.verify_interval",
        ),
        (
            vec![
                "--member",
                "n1=127.0.0.1:7001",
                "--member",
                "n2=127.0.0.1:7001",
            ],
            None,
            "members",
        ),
        (
            vec![
                "--member",
                "n1=127.0.0.1:7001",
                "--listen",
                "127.0.0.1:7005",
            ],
            None,
            "listen",
        ),
        (
            vec!["--max-property-bytes", "17000000"],
            None,
            "max_property_bytes",
        ),
        (vec!["--tree-algorithm", "md5"], None, "tree.algorithm"),
        (
            vec!["--etcd", "https://127.0.0.1:1"],
            None,
            "etcd.endpoints",
        ),
        (
            vec!["--etcd", "http://127.0.0.1:1", "--etcd-tls-ca", "ca.pem"],
            None,
            "etcd.endpoints",
        ),
        (
            vec!["--etcd", "https://127.0.0.1:1", "--etcd-tls-ca", "ca.pem"],
            Some(("PROPD_ETCD_TLS_CERT", "c.pem")),
            "etcd.tls_key",
        ),
        // An unreadable file is said at once, not retried as an unreachable etcd.
        (
            vec![
                "--etcd",
                "https://127.0.0.1:1",
                "--etcd-tls-ca",
                "/nonexistent/ca.pem",
            ],
            None,
            "etcd.tls_ca",
        ),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_propd"));
        command.args(["serve", "--data-dir", data_dir]).args(&args);
        if let Some((name, value)) = variable {
            command.env(name, value);
        }
        let output = command.output().expect("running propd");
        assert!(
            !output.status.success(),
            "{args:?} {variable:?} should fail"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("`{key}`")), "{key}: {stderr}");
    }
}
