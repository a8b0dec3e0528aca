//! The `propd` binary's command line contract: exit codes and one-line errors.

use std::process::Command;

fn propd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_propd"))
        .args(args)
        .output()
        .expect("running propd")
}

#[test]
fn a_dead_address_is_a_one_line_error_and_a_failure() {
    // Port 1 on loopback: nothing listens there.
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
    std::fs::write(&path, "node_id = \"n1\"\n[repair]\nperiod = \"soon\"\n").unwrap();
    let output = propd(&["serve", "--config", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("repair.period"), "{stderr}");
}

#[test]
fn environment_variables_set_config_keys_and_flags_win_over_them() {
    let output = Command::new(env!("CARGO_BIN_EXE_propd"))
        .args(["serve"])
        .env("PROPD_REPAIR_PERIOD", "soon")
        .output()
        .expect("running propd");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("repair.period") && stderr.contains("soon"),
        "{stderr}"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_propd"))
        .args(["serve", "--repair-period", "later"])
        .env("PROPD_REPAIR_PERIOD", "soon")
        .output()
        .expect("running propd");
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
