//! Membership on etcd over real processes and a real etcd: a cluster grows under a write load,
//! a member drains, a wiped node is refilled (same id, then in another's place), and etcd
//! restarts while the nodes serve. Each test says SKIPPED and returns only where etcd cannot be
//! installed on the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use propd_tests::etcd::Etcd;
use propd_tests::{Cluster, PortHold, cli_at, eventually, http_get, propd_binary, run_bounded};
use serde_json::Value;

const SHARDS: u32 = 8;
/// How long membership changes, moves and repair may take to settle.
const SETTLE: Duration = Duration::from_secs(90);

/// The shared config: one group of `SHARDS` shards, writes acknowledged by two copies,
/// background rounds every two seconds (moves finish by rounds), membership from `etcd`.
fn shared(etcd: &Etcd, replicas: u32) -> String {
    format!(
        "write_acks = 2\n\n[[groups]]\nname = \"g\"\nshard_num = {SHARDS}\nreplicas = {replicas}\n\n[repair]\nperiod = \"2s\"\n\n[etcd]\nendpoints = [\"{}\"]\nprefix = \"/test\"\n",
        etcd.endpoint()
    )
}

/// A node started outside the `Cluster` (a newcomer), killed on drop.
struct Extra {
    id: String,
    listen: SocketAddr,
    http: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Extra {
    fn start(dir: &Path, id: &str, shared: &str) -> Extra {
        let mut holds = [PortHold::new(), PortHold::new()];
        let listen = SocketAddr::from(([127, 0, 0, 1], holds[0].port()));
        let http = SocketAddr::from(([127, 0, 0, 1], holds[1].port()));
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{id}\"\nlisten = \"{listen}\"\nhttp = \"{http}\"\ndata_dir = {:?}\n{shared}",
                dir.join(id).display().to_string()
            ),
        )
        .expect("writing a config");
        let log = std::fs::File::create(dir.join(format!("{id}.log"))).expect("a log file");
        for hold in &mut holds {
            hold.release();
        }
        let child = Command::new(propd_binary())
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning propd serve");
        let extra = Extra {
            id: id.to_owned(),
            listen,
            http,
            dir: dir.to_owned(),
            child: Some(child),
        };
        assert!(
            eventually(Duration::from_secs(30), || {
                http_get(http, "/health").is_some_and(|(code, _)| code == 200)
            }),
            "{id} did not become healthy: {}",
            extra.log()
        );
        extra
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.id))).unwrap_or_default()
    }
}

impl Drop for Extra {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A node's gRPC and HTTP addresses.
#[derive(Clone, Copy)]
struct Addrs {
    listen: SocketAddr,
    http: SocketAddr,
}

fn addrs(cluster: &Cluster) -> Vec<Addrs> {
    cluster
        .nodes
        .iter()
        .map(|n| Addrs {
            listen: n.listen,
            http: n.http,
        })
        .collect()
}

fn status_json(http: SocketAddr) -> Option<Value> {
    let (code, body) = http_get(http, "/status.json")?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// `propd member|group ... --etcd E --output json`.
fn etcd_cli(etcd: &Etcd, args: &[&str]) -> Output {
    let mut command = Command::new(propd_binary());
    command
        .args(args)
        .args(["--etcd", &etcd.endpoint(), "--etcd-prefix", "/test"])
        .args(["--output", "json"])
        .stdin(Stdio::null());
    run_bounded(command, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

fn etcd_json(etcd: &Etcd, args: &[&str]) -> Value {
    let output = etcd_cli(etcd, args);
    assert!(
        output.status.success(),
        "propd {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// Waits until every node sees exactly `members` (ids) in its membership from etcd, and no
/// shard is on the move any more.
fn settle(nodes: &[Addrs], members: &[&str]) {
    let want: BTreeSet<&str> = members.iter().copied().collect();
    let mut last = Value::Null;
    let settled = eventually(SETTLE, || {
        nodes.iter().all(|node| {
            let Some(status) = status_json(node.http) else {
                return false;
            };
            let seen: BTreeSet<&str> = status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_str())
                .collect();
            let ok = seen == want
                && status["membership"]["connected"] == true
                && status["moves"].as_array().is_some_and(Vec::is_empty);
            if !ok {
                last = status;
            }
            ok
        })
    });
    assert!(settled, "the nodes did not settle on {members:?}: {last}");
}

/// Every shard's copies, as the nodes holding it report them; `None` while they disagree.
fn agreed_copies(nodes: &[Addrs]) -> Option<BTreeMap<u32, Vec<String>>> {
    let mut copies: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for node in nodes {
        let status = status_json(node.http)?;
        for shard in status["shards"].as_array().into_iter().flatten() {
            if shard["group"] != "g" {
                continue;
            }
            let number = shard["shard"].as_u64()? as u32;
            let list: Vec<String> = shard["copies"]
                .as_array()?
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            if copies.get(&number).is_some_and(|known| known != &list) {
                return None;
            }
            copies.insert(number, list);
        }
    }
    Some(copies)
}

/// Every shard's copies, as the nodes holding it report them (they must agree).
fn copies(nodes: &[Addrs]) -> BTreeMap<u32, Vec<String>> {
    agreed_copies(nodes).expect("the nodes agree on every shard's copies")
}

fn shard_of(entity: &str) -> u32 {
    let parsed = propd_merkle::Entity::parse(entity).expect("entity");
    propd_merkle::shard_of(&parsed, NonZeroU32::new(SHARDS).expect("non-zero"))
}

/// Asserts that every acknowledged write (entity → revision) is on every copy of its shard.
fn check_placement(nodes: &BTreeMap<String, Addrs>, writes: &BTreeMap<String, i64>) {
    let all: Vec<Addrs> = nodes.values().copied().collect();
    let copies = copies(&all);
    assert_eq!(
        copies.len(),
        SHARDS as usize,
        "every shard is held: {copies:?}"
    );
    for (entity, revision) in writes {
        let shard = shard_of(entity);
        for id in &copies[&shard] {
            let node = nodes
                .get(id)
                .unwrap_or_else(|| panic!("copy {id} is not a running node"));
            let output = cli_at(
                &node.listen.to_string(),
                &["get", entity, "--local", "--output", "json"],
            );
            assert!(
                output.status.success(),
                "{entity} (shard {shard}) is missing on its copy {id}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let copy: Value = serde_json::from_slice(&output.stdout).expect("JSON");
            assert!(
                copy["mod_revision"].as_i64() >= Some(*revision),
                "{entity} on {id}: {copy} is older than the acknowledged {revision}"
            );
        }
    }
}

/// Puts `entity` through `server`; its revision when acknowledged (by `write_acks` copies).
fn put(server: SocketAddr, entity: &str) -> Option<i64> {
    let output = cli_at(
        &server.to_string(),
        &["put", entity, "--tag", "k=v", "--output", "json"],
    );
    if !output.status.success() {
        return None;
    }
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    answer["mod_revision"].as_i64()
}

fn write_all(server: SocketAddr, prefix: &str, n: usize) -> BTreeMap<String, i64> {
    (0..n)
        .map(|k| {
            let entity = format!("g/{prefix}/{k}");
            let revision = put(server, &entity).unwrap_or_else(|| panic!("put {entity}"));
            (entity, revision)
        })
        .collect()
}

fn by_id(cluster: &Cluster) -> BTreeMap<String, Addrs> {
    cluster
        .nodes
        .iter()
        .zip(addrs(cluster))
        .map(|(n, a)| (n.id.clone(), a))
        .collect()
}

#[test]
fn a_fourth_member_joins_under_writes_and_every_acknowledged_write_is_on_its_new_copies() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = shared(&etcd, 1);
    let cluster = Cluster::start(3, &shared);
    let mut nodes = by_id(&cluster);
    settle(&addrs(&cluster), &["n1", "n2", "n3"]);
    let before = copies(&addrs(&cluster));

    // A writer keeps writing through n1 while n4 joins; it records what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let stop = Arc::clone(&stop);
        let count = Arc::clone(&count);
        let server = cluster.nodes[0].listen;
        std::thread::spawn(move || {
            let mut acknowledged = BTreeMap::new();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) && k < 2000 {
                let entity = format!("g/load/{k}");
                if let Some(revision) = put(server, &entity) {
                    acknowledged.insert(entity, revision);
                    count.fetch_add(1, Ordering::Relaxed);
                }
                k += 1;
            }
            acknowledged
        })
    };
    // Some writes land before the join, more while it happens.
    assert!(
        eventually(Duration::from_secs(60), || count.load(Ordering::Relaxed)
            >= 20),
        "the writer got no writes through"
    );
    let n4 = Extra::start(cluster.dir.path(), "n4", &shared);
    nodes.insert(
        "n4".to_owned(),
        Addrs {
            listen: n4.listen,
            http: n4.http,
        },
    );
    let all: Vec<Addrs> = nodes.values().copied().collect();
    settle(&all, &["n1", "n2", "n3", "n4"]);
    let at_join = count.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(60), || count.load(Ordering::Relaxed)
            >= at_join + 20),
        "writes go on after the join"
    );
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().expect("the writer");
    assert!(!writes.is_empty(), "the writer got writes acknowledged");
    // Rounds after the last writes: every copy holds them.
    settle(&all, &["n1", "n2", "n3", "n4"]);
    let after = copies(&all);
    let moved: usize = before
        .iter()
        .map(|(shard, old)| after[shard].iter().filter(|id| !old.contains(id)).count())
        .sum();
    assert!(moved > 0, "n4 took some copies: {before:?} -> {after:?}");
    assert!(
        after
            .values()
            .flatten()
            .filter(|id| id.as_str() == "n4")
            .count()
            == moved,
        "every moved copy went to n4: {before:?} -> {after:?}"
    );
    let rounds_ok = eventually(SETTLE, || {
        // Background rounds every 2 s: wait until the last writes reached every copy.
        let copies = copies(&all);
        writes.keys().all(|entity| {
            copies[&shard_of(entity)].iter().all(|id| {
                cli_at(
                    &nodes[id].listen.to_string(),
                    &["get", entity, "--local", "--output", "json"],
                )
                .status
                .success()
            })
        })
    });
    assert!(
        rounds_ok,
        "repair rounds did not bring every write to its copies"
    );
    check_placement(&nodes, &writes);
    drop(n4);
}

#[test]
fn a_drained_member_hands_over_every_shard_and_then_may_be_removed() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = Cluster::start(4, &shared(&etcd, 1));
    let nodes = by_id(&cluster);
    let all = addrs(&cluster);
    settle(&all, &["n1", "n2", "n3", "n4"]);
    let writes = write_all(cluster.nodes[0].listen, "drain", 40);

    // An active member may not be removed: the refusal names the rule.
    let refused = etcd_cli(&etcd, &["member", "remove", "n4"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("drain"), "{message}");

    let drained = etcd_json(&etcd, &["member", "drain", "n4"]);
    assert_eq!(drained["state"], "draining", "{drained}");
    // The members that hold copies: n4 serves on, but no longer holds any once moves end.
    settle(&all, &["n1", "n2", "n3"]);
    let copies = copies(&all);
    assert!(
        copies.values().flatten().all(|id| id != "n4"),
        "n4 holds nothing after its drain: {copies:?}"
    );
    let n4 = status_json(cluster.nodes[3].http).expect("n4 status");
    assert!(
        n4["shards"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["group"] != "g")),
        "n4 stopped serving every shard of g: {n4}"
    );
    let remaining: BTreeMap<String, Addrs> =
        nodes.into_iter().filter(|(id, _)| id != "n4").collect();
    check_placement(&remaining, &writes);

    let removed = etcd_json(&etcd, &["member", "remove", "n4"]);
    assert_eq!(removed["removed"], true);
    let list = etcd_json(&etcd, &["member", "list"]);
    let ids: Vec<&str> = list["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["n1", "n2", "n3"], "{list}");
    settle(&all[..3], &["n1", "n2", "n3"]);
    drop(cluster);
}

#[test]
fn a_wiped_node_is_refilled_by_repair_under_its_own_id_and_in_another_nodes_place() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = shared(&etcd, 2);
    let mut cluster = Cluster::start(3, &shared);
    let mut nodes = by_id(&cluster);
    settle(&addrs(&cluster), &["n1", "n2", "n3"]);
    let writes = write_all(cluster.nodes[0].listen, "wipe", 30);

    // Same id, empty disk: repair fills it (every shard has a copy on each of the three).
    cluster.kill(2);
    std::fs::remove_dir_all(cluster.dir.path().join("n3")).expect("wiping n3");
    cluster.start_node(2);
    cluster.wait_ready(2);
    let n3 = cluster.nodes[2].listen.to_string();
    assert!(
        eventually(SETTLE, || writes.keys().all(|e| cli_at(
            &n3,
            &["get", e, "--local", "--output", "json"]
        )
        .status
        .success())),
        "repair did not refill the wiped n3"
    );
    check_placement(&nodes, &writes);

    // n3 dies for good; n5 takes its place and holds exactly its copies once repair ran.
    cluster.kill(2);
    let replaced = etcd_json(&etcd, &["member", "replace", "n3", "n5"]);
    assert_eq!(replaced["slot"], "n3", "{replaced}");
    let n5 = Extra::start(cluster.dir.path(), "n5", &shared);
    nodes.remove("n3");
    nodes.insert(
        "n5".to_owned(),
        Addrs {
            listen: n5.listen,
            http: n5.http,
        },
    );
    let all: Vec<Addrs> = nodes.values().copied().collect();
    settle(&all, &["n1", "n2", "n5"]);
    let n5_addr = n5.listen.to_string();
    assert!(
        eventually(SETTLE, || writes.keys().all(|e| cli_at(
            &n5_addr,
            &["get", e, "--local", "--output", "json"]
        )
        .status
        .success())),
        "repair did not fill n5"
    );
    check_placement(&nodes, &writes);
}

#[test]
fn nodes_keep_serving_while_etcd_is_down_and_catch_up_when_it_returns() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let cluster = Cluster::start(3, &shared(&etcd, 2));
    let all = addrs(&cluster);
    settle(&all, &["n1", "n2", "n3"]);

    // Group rules: the shard count never changes, a group is created once.
    let refused = etcd_cli(
        &etcd,
        &["group", "alter", "g", "--replicas", "2", "--shards", "16"],
    );
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("keeps them"), "{message}");
    let refused = etcd_cli(&etcd, &["group", "create", "g", "--shards", "8"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("exists"));

    etcd.stop();
    for node in &all {
        assert!(
            eventually(Duration::from_secs(30), || http_get(node.http, "/health")
                .is_some_and(
                    |(code, body)| code == 200 && body.contains("etcd unreachable")
                )),
            "/health at {} says etcd is lost",
            node.http
        );
    }
    let status = cluster.json(0, &["status"]);
    assert!(
        status["membership"]
            .as_str()
            .is_some_and(|m| m.contains("etcd unreachable")),
        "{status}"
    );
    // Writes and reads go on, on the last membership seen.
    let writes = write_all(cluster.nodes[1].listen, "down", 10);
    let read = cluster.json(2, &["get", "g/down/3"]);
    assert_eq!(
        read["mod_revision"].as_i64(),
        writes.get("g/down/3").copied()
    );

    etcd.resume();
    settle(&all, &["n1", "n2", "n3"]);
    for node in &all {
        let (_, body) = http_get(node.http, "/health").expect("health");
        assert!(body.contains("membership from etcd"), "{body}");
    }
    // A change made after the return reaches every node.
    let altered = etcd_json(&etcd, &["group", "alter", "g", "--replicas", "1"]);
    assert_eq!(altered["replicas"], 1);
    assert!(
        eventually(SETTLE, || agreed_copies(&all).is_some_and(|copies| {
            copies.len() == SHARDS as usize && copies.values().all(|c| c.len() == 2)
        })),
        "the nodes took the new replicas: {:?}",
        agreed_copies(&all)
    );
}
