//! Membership on etcd over real processes and a real etcd: a cluster grows under a write load,
//! a member drains, a wiped node is refilled (same id, then in another's place), and etcd
//! restarts while the nodes serve; a node restarted mid-move resumes the move, old holders drop
//! their copies once it ends, a group created while the cluster runs is served at once, with
//! mutual TLS a member that joins is let in and one removed is not, and an etcd serving TLS
//! with client certificates is reached only with them. Each test says SKIPPED and returns only
//! where etcd cannot be installed on the machine.
//!
//! The first four run the nemesis workload through the change and judge its history with the
//! nemesis checker against every copy of the new placement ([`check_history`]).
//!
//! The suite runs plaintext clusters (its own clients speak plaintext) also under
//! `PROPD_TEST_TLS=1`, except the TLS test, which always runs with mutual TLS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use propd_tests::etcd::Etcd;
use propd_tests::nemesis::checker::{self, Tolerance};
use propd_tests::nemesis::copies::{self, Copyholder, Holders};
use propd_tests::nemesis::history::{History, Nanos, Outcome, Request, now_nanos};
use propd_tests::nemesis::workload::{self, Workload};
use propd_tests::{
    Certs, Cluster, PortHold, cli_at, eventually, http_get, https_get, propd_binary, run_bounded,
};
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
    /// Starts `id` with `shared` (and a data directory in `dir`) and waits until it is healthy.
    fn start(dir: &Path, id: &str, shared: &str) -> Extra {
        let extra = Extra::spawn(dir, id, [PortHold::new(), PortHold::new()], shared);
        assert!(
            eventually(Duration::from_secs(30), || {
                http_get(extra.http, "/health").is_some_and(|(code, _)| code == 200)
            }),
            "{id} did not become healthy: {}",
            extra.log()
        );
        extra
    }

    /// Writes `id`'s config (its gRPC and HTTP ports from `holds`, released just before it
    /// starts, then `shared`) and starts it without waiting.
    fn spawn(dir: &Path, id: &str, mut holds: [PortHold; 2], shared: &str) -> Extra {
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
        Extra {
            id: id.to_owned(),
            listen,
            http,
            dir: dir.to_owned(),
            child: Some(child),
        }
    }

    fn addrs(&self) -> Addrs {
        Addrs {
            listen: self.listen,
            http: self.http,
        }
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

/// `value[list][*][field]` as strings (the ids of `member list`, the names of `group list`).
fn field_of_each<'a>(value: &'a Value, list: &str, field: &str) -> Vec<&'a str> {
    value[list]
        .as_array()
        .unwrap_or_else(|| panic!("no array `{list}` in {value}"))
        .iter()
        .filter_map(|item| item[field].as_str())
        .collect()
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

/// Entities of `g` the load works on.
const ENTITIES: usize = 60;
/// Concurrent clients of one load.
const CLIENTS: usize = 3;

/// The nemesis workload on `g`, its clients numbered from `first_client`.
fn workload(first_client: usize) -> Workload {
    Workload {
        clients: CLIENTS,
        first_client,
        entities: ENTITIES,
        groups: vec!["g".to_owned()],
        timeout: Duration::from_secs(5),
        seed: 15 + first_client as u64,
    }
}

/// The nemesis workload (puts, deletes and gets of the `ENTITIES` entities of `g` through
/// `coordinators`), run on a thread of its own while the membership changes. Every operation
/// goes into a history that [`check_history`] judges with the nemesis checker at the end.
struct Load {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts `CLIENTS` clients numbered from `first_client` (loads sharing a history number
    /// their clients apart, so that every value written is unique).
    fn start(history: &Arc<History>, coordinators: Vec<SocketAddr>, first_client: usize) -> Load {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let history = Arc::clone(history);
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(workload::run(
                    &workload(first_client),
                    &coordinators,
                    history,
                    stopped,
                ));
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the clients and waits for their last operations to be recorded.
    fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the load's thread");
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.end();
    }
}

/// Operations of `history` sent at or after `since` that ended as `outcome` says.
fn count_since(history: &History, since: Nanos, outcome: fn(&Outcome) -> bool) -> usize {
    history
        .ops()
        .iter()
        .filter(|op| op.start >= since && outcome(&op.outcome))
        .count()
}

fn acknowledged(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Written { .. })
}

/// Waits until the load got `n` writes acknowledged that it sent at or after `since`.
fn wait_for_writes(history: &History, since: Nanos, n: usize, when: &str) {
    assert!(
        eventually(Duration::from_secs(60), || count_since(
            history,
            since,
            acknowledged
        ) >= n),
        "the load got fewer than {n} writes acknowledged {when}: {} since",
        count_since(history, since, acknowledged)
    );
}

/// The copy sets of `g` that the running `nodes` agree on, as the checker's holders (indices
/// into `nodes`' order); an error while they disagree, lack a shard, or name a node not running.
fn placement(nodes: &BTreeMap<String, Addrs>) -> Result<Holders, String> {
    let all: Vec<Addrs> = nodes.values().copied().collect();
    let agreed = agreed_copies(&all).ok_or("the nodes disagree on the copies")?;
    if agreed.len() != SHARDS as usize {
        return Err(format!("not every shard is held: {agreed:?}"));
    }
    let ids: Vec<&String> = nodes.keys().collect();
    let mut holders = Holders::new();
    for (shard, copies) in agreed {
        let on = copies
            .iter()
            .map(|id| {
                ids.iter()
                    .position(|known| *known == id)
                    .ok_or_else(|| format!("copy {id} of shard {shard} is not a running node"))
            })
            .collect::<Result<Vec<usize>, String>>()?;
        holders.insert(("g".to_owned(), shard), on);
    }
    Ok(holders)
}

/// Judges the history of a stopped load against the copies on the placement the running
/// `nodes` agree on (the new placement after a membership change): once every shard's copies
/// there have one root (repair and purges have run; rounds every two seconds), reads every
/// copy of every entity and asserts that the nemesis checker finds no anomaly (an acknowledged
/// write missing or older on a copy, a delete undone, a read of a value no write made, ...).
fn check_history(history: &History, nodes: &BTreeMap<String, Addrs>) {
    let ops = history.ops();
    let puts = ops
        .iter()
        .filter(|op| matches!(op.request, Request::Put { .. }) && acknowledged(&op.outcome))
        .count();
    let deletes = ops
        .iter()
        .filter(|op| op.request == Request::Delete && acknowledged(&op.outcome))
        .count();
    assert!(
        puts > 0 && deletes > 0,
        "the history holds acknowledged puts ({puts}) and deletes ({deletes}) to check"
    );
    let readers: Vec<Copyholder> = nodes
        .iter()
        .map(|(id, addrs)| Copyholder {
            id: id.clone(),
            listen: addrs.listen,
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut last = String::new();
    let mut state = None;
    let converged = eventually(SETTLE, || {
        let holders = match placement(nodes) {
            Ok(holders) => holders,
            Err(why) => {
                last = why;
                return false;
            }
        };
        let mut problems = Vec::new();
        let (read, moved) = runtime.block_on(copies::final_state(
            &readers,
            &["g".to_owned()],
            SHARDS,
            &holders,
            (0..ENTITIES).map(|i| workload(0).entity(i)),
            &mut problems,
        ));
        let differing = copies::differing_shards(&read);
        if problems.is_empty() && moved == 0 && differing == 0 {
            state = Some(read);
            return true;
        }
        last = format!(
            "{differing} shards with differing roots, {moved} roots changed while reading, \
             problems: {problems:?}"
        );
        false
    });
    assert!(converged, "the copies did not converge: {last}");
    let state = state.expect("the converged state");
    let anomalies = checker::check(&ops, &state, Tolerance::default());
    let t0 = ops.first().map_or(0, |op| op.start);
    let report: Vec<String> = anomalies
        .iter()
        .map(|anomaly| {
            let history: Vec<String> = anomaly
                .entity()
                .map(|entity| {
                    checker::entity_history(&ops, entity)
                        .iter()
                        .map(|op| format!("    {}", op.describe(t0)))
                        .collect()
                })
                .unwrap_or_default();
            format!("{anomaly}\n{}", history.join("\n"))
        })
        .collect();
    assert!(
        anomalies.is_empty(),
        "the checker found {} anomalies in {} operations:\n{}",
        anomalies.len(),
        ops.len(),
        report.join("\n")
    );
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
    let cluster = Cluster::start_plaintext(3, &shared);
    let mut nodes = by_id(&cluster);
    settle(&addrs(&cluster), &["n1", "n2", "n3"]);
    let before = copies(&addrs(&cluster));

    // The nemesis workload runs through n1..n3 while n4 joins; the checker judges its history.
    let history = Arc::new(History::default());
    let load = Load::start(
        &history,
        cluster.nodes.iter().map(|n| n.listen).collect(),
        0,
    );
    // Some writes land before the join, more while it happens and after it.
    wait_for_writes(&history, 0, 20, "before the join");
    let n4 = Extra::start(cluster.dir.path(), "n4", &shared);
    nodes.insert("n4".to_owned(), n4.addrs());
    let all: Vec<Addrs> = nodes.values().copied().collect();
    settle(&all, &["n1", "n2", "n3", "n4"]);
    wait_for_writes(&history, now_nanos(), 20, "after the join");
    load.stop();
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
    // Every acknowledged write on every copy of the new placement, n4's included.
    check_history(&history, &nodes);
    drop(n4);
}

#[test]
fn a_drained_member_hands_over_every_shard_and_then_may_be_removed() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = Cluster::start_plaintext(4, &shared(&etcd, 1));
    let nodes = by_id(&cluster);
    let all = addrs(&cluster);
    settle(&all, &["n1", "n2", "n3", "n4"]);
    // The nemesis workload runs through all four (n4 coordinates while it drains).
    let history = Arc::new(History::default());
    let load = Load::start(
        &history,
        cluster.nodes.iter().map(|n| n.listen).collect(),
        0,
    );
    wait_for_writes(&history, 0, 20, "before the drain");

    // An active member may not be removed: the refusal names the rule.
    let refused = etcd_cli(&etcd, &["member", "remove", "n4"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("drain"), "{message}");

    let drained = etcd_json(&etcd, &["member", "drain", "n4"]);
    assert_eq!(drained["state"], "draining", "{drained}");
    // The members that hold copies: n4 serves on, but no longer holds any once moves end.
    settle(&all, &["n1", "n2", "n3"]);
    wait_for_writes(&history, now_nanos(), 20, "after the drain");
    load.stop();
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
    // n4 still runs but holds no copy: the new placement is on n1..n3.
    check_history(&history, &nodes);

    let removed = etcd_json(&etcd, &["member", "remove", "n4"]);
    assert_eq!(removed["removed"], true);
    let list = etcd_json(&etcd, &["member", "list"]);
    let ids = field_of_each(&list, "members", "id");
    assert_eq!(ids, ["n1", "n2", "n3"], "{list}");
    settle(&all[..3], &["n1", "n2", "n3"]);
    drop(cluster);
}

#[test]
fn a_wiped_node_is_refilled_by_repair_under_its_own_id_and_in_another_nodes_place() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = shared(&etcd, 2);
    let mut cluster = Cluster::start_plaintext(3, &shared);
    let mut nodes = by_id(&cluster);
    settle(&addrs(&cluster), &["n1", "n2", "n3"]);
    // The nemesis workload runs through the three (n3 too, while it is down and once back).
    let history = Arc::new(History::default());
    let load = Load::start(
        &history,
        cluster.nodes.iter().map(|n| n.listen).collect(),
        0,
    );
    wait_for_writes(&history, 0, 20, "before the wipe");

    // Same id, empty disk: repair fills it (every shard has a copy on each of the three).
    cluster.kill(2);
    std::fs::remove_dir_all(cluster.dir.path().join("n3")).expect("wiping n3");
    cluster.start_node(2);
    cluster.wait_ready(2);
    wait_for_writes(&history, now_nanos(), 20, "after n3 came back empty");
    load.stop();
    // n3's copies hold every acknowledged write again.
    check_history(&history, &nodes);

    // n3 dies for good; n5 takes its place and holds exactly its copies once repair ran. A
    // second load (its clients numbered after the first's) writes through n1 and n2 meanwhile.
    let load = Load::start(
        &history,
        cluster.nodes[..2].iter().map(|n| n.listen).collect(),
        CLIENTS,
    );
    cluster.kill(2);
    let replaced = etcd_json(&etcd, &["member", "replace", "n3", "n5"]);
    assert_eq!(replaced["slot"], "n3", "{replaced}");
    let n5 = Extra::start(cluster.dir.path(), "n5", &shared);
    nodes.remove("n3");
    nodes.insert("n5".to_owned(), n5.addrs());
    let all: Vec<Addrs> = nodes.values().copied().collect();
    settle(&all, &["n1", "n2", "n5"]);
    wait_for_writes(&history, now_nanos(), 20, "after n5 took n3's place");
    load.stop();
    // The whole history, both loads, on the new placement: n5 holds n3's copies.
    let placed = copies(&all);
    assert!(
        placed.values().all(|on| on.contains(&"n5".to_owned())),
        "n5 holds every shard as n3 did: {placed:?}"
    );
    check_history(&history, &nodes);
}

#[test]
fn nodes_keep_serving_while_etcd_is_down_and_catch_up_when_it_returns() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let cluster = Cluster::start_plaintext(3, &shared(&etcd, 2));
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

    // The nemesis workload runs through the three from before etcd stops to after it returns.
    let history = Arc::new(History::default());
    let load = Load::start(
        &history,
        cluster.nodes.iter().map(|n| n.listen).collect(),
        0,
    );
    wait_for_writes(&history, 0, 10, "before etcd stopped");
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
    // Writes and reads go on, on the last membership seen: the load gets writes acknowledged
    // and reads answered that it sent once every node had lost etcd (and before it returns).
    let lost = now_nanos();
    wait_for_writes(&history, lost, 20, "while etcd was down");
    assert!(
        eventually(Duration::from_secs(60), || count_since(
            &history,
            lost,
            |o| { matches!(o, Outcome::Read { found: Some(_) }) }
        ) >= 10),
        "reads are answered while etcd is down"
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
    settle(&all, &["n1", "n2", "n3"]);
    wait_for_writes(&history, now_nanos(), 20, "after the copies moved");
    load.stop();
    // Every acknowledged write, from before, during and after etcd's absence, on the two
    // copies each shard now has.
    check_history(&history, &by_id(&cluster));
}

/// The moves every node lists: `None` while the nodes disagree.
fn agreed_moves(nodes: &[Addrs]) -> Option<Value> {
    let mut seen: Option<Value> = None;
    for node in nodes {
        let status = status_json(node.http)?;
        let moves = status["moves"].clone();
        if seen.as_ref().is_some_and(|known| known != &moves) {
            return None;
        }
        seen = Some(moves);
    }
    seen
}

fn holds_locally(node: &Addrs, entity: &str) -> bool {
    cli_at(
        &node.listen.to_string(),
        &["get", entity, "--local", "--output", "json"],
    )
    .status
    .success()
}

/// Runs a round (`propd repair --wait`, through the first node) over every shard that a node
/// lists on the move, until none does.
fn finish_moves(nodes: &[Addrs]) {
    let done = eventually(SETTLE, || {
        let mut moving = BTreeSet::new();
        for node in nodes {
            let Some(status) = status_json(node.http) else {
                return false;
            };
            for m in status["moves"].as_array().into_iter().flatten() {
                moving.insert(m["shard"].as_u64().unwrap_or_default());
            }
        }
        for shard in &moving {
            let shard = shard.to_string();
            cli_at(
                &nodes[0].listen.to_string(),
                &["repair", "--group", "g", "--shard", &shard, "--wait"],
            );
        }
        moving.is_empty()
    });
    assert!(done, "the moves ended");
}

#[test]
fn a_node_restarted_mid_move_resumes_it_and_old_holders_drop_their_copies_when_it_ends() {
    let Some(etcd) = Etcd::start() else { return };
    // No background rounds: the moves stay pending until this test runs their rounds.
    let shared = format!(
        "{}\n[repair]\nenabled = false\n",
        shared(&etcd, 1).replace("[repair]\nperiod = \"2s\"\n", "")
    );
    let mut cluster = Cluster::start_plaintext(3, &shared);
    let mut nodes = by_id(&cluster);
    // The three registered one after the other: the moves between them end by rounds.
    finish_moves(&addrs(&cluster));
    settle(&addrs(&cluster), &["n1", "n2", "n3"]);
    let writes = write_all(cluster.nodes[0].listen, "move", 40);

    let n4 = Extra::start(cluster.dir.path(), "n4", &shared);
    nodes.insert("n4".to_owned(), n4.addrs());
    let all: Vec<Addrs> = nodes.values().copied().collect();
    let mut moves = Value::Null;
    assert!(
        eventually(SETTLE, || {
            moves = agreed_moves(&all).unwrap_or(Value::Null);
            moves.as_array().is_some_and(|m| !m.is_empty())
        }),
        "the four nodes list the same moves: {:?}",
        all.iter().map(|n| status_json(n.http)).collect::<Vec<_>>()
    );
    let listed = copies(&all);

    // n1 restarts in the middle: it lists the same moves and node lists as the others.
    cluster.restart(0);
    assert!(
        eventually(SETTLE, || agreed_moves(&all).as_ref() == Some(&moves)
            && agreed_copies(&all).as_ref() == Some(&listed)),
        "n1 resumed the moves {moves} after its restart: {:?}",
        agreed_moves(&all)
    );

    // A round over each moving shard ends its move; the old holders then drop their copies.
    let moving: Vec<(u64, Vec<String>)> = moves
        .as_array()
        .expect("moves")
        .iter()
        .map(|m| {
            let leaving = m["leaving"]
                .as_array()
                .expect("leaving")
                .iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect();
            (m["shard"].as_u64().expect("shard"), leaving)
        })
        .collect();
    for (shard, _) in &moving {
        let shard = shard.to_string();
        let output = cli_at(
            &cluster.nodes[1].listen.to_string(),
            &["repair", "--group", "g", "--shard", &shard, "--wait"],
        );
        assert!(
            output.status.success(),
            "repair of shard {shard}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    settle(&all, &["n1", "n2", "n3", "n4"]);
    check_placement(&nodes, &writes);
    let after = copies(&all);
    for (shard, leaving) in &moving {
        let shard = *shard as u32;
        for id in leaving {
            assert!(
                !after[&shard].contains(id),
                "{id} left shard {shard}: {after:?}"
            );
            let entities: Vec<&String> = writes.keys().filter(|e| shard_of(e) == shard).collect();
            assert!(
                eventually(SETTLE, || entities
                    .iter()
                    .all(|e| !holds_locally(&nodes[id], e))),
                "{id} dropped its copy of shard {shard} after the move"
            );
        }
    }
    drop(n4);
}

#[test]
fn a_group_created_while_the_cluster_runs_is_served_at_once() {
    let Some(etcd) = Etcd::start() else { return };
    let cluster = Cluster::start_plaintext(3, &shared(&etcd, 1));
    let all = addrs(&cluster);
    settle(&all, &["n1", "n2", "n3"]);
    // Before the group exists, a write to it is refused.
    assert!(put(cluster.nodes[0].listen, "h/x/0").is_none());

    let created = etcd_json(
        &etcd,
        &["group", "create", "h", "--shards", "4", "--replicas", "1"],
    );
    assert_eq!(created["shard_num"], 4, "{created}");
    let listed = etcd_json(&etcd, &["group", "list"]);
    let names = field_of_each(&listed, "groups", "name");
    assert_eq!(names, ["g", "h"], "{listed}");
    let mut written = BTreeMap::new();
    assert!(
        eventually(SETTLE, || {
            let entity = format!("h/x/{}", written.len());
            if let Some(revision) = put(cluster.nodes[0].listen, &entity) {
                written.insert(entity, revision);
            }
            written.len() >= 8
        }),
        "writes to the new group went through; n1's log:\n{}",
        cluster.log(0)
    );
    for (entity, revision) in &written {
        let read = cluster.json(2, &["get", entity]);
        assert_eq!(read["mod_revision"].as_i64(), Some(*revision), "{read}");
    }
    for node in &all {
        let status = status_json(node.http).expect("status");
        assert!(
            status["membership"]["groups_waiting_for_restart"]
                .as_array()
                .is_some_and(Vec::is_empty),
            "{status}"
        );
    }
    // Every shard of h is held, and the nodes agree on its copies.
    assert!(
        eventually(SETTLE, || {
            nodes_agree_on_group(&all, "h").is_some_and(|copies| copies.len() == 4)
        }),
        "the nodes list every shard of h"
    );
}

/// Every shard of `group` with its copies, as the nodes holding it list them; `None` while
/// they disagree.
fn nodes_agree_on_group(nodes: &[Addrs], group: &str) -> Option<BTreeMap<u32, Value>> {
    let mut copies = BTreeMap::new();
    for node in nodes {
        let status = status_json(node.http)?;
        for shard in status["shards"].as_array()? {
            if shard["group"] != group {
                continue;
            }
            let number = shard["shard"].as_u64()? as u32;
            if copies
                .insert(number, shard["copies"].clone())
                .is_some_and(|known| known != shard["copies"])
            {
                return None;
            }
        }
    }
    Some(copies)
}

/// Pings node `i` of `cluster` as a member with the certificate `name` of its certificates
/// (the ping is for members only): `Ok` or the refusal's code.
fn ping_as(cluster: &Cluster, name: &str, i: usize) -> Result<(), tonic::Code> {
    let endpoint = cluster.endpoint_as(i, name);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async move {
            let channel = endpoint
                .connect()
                .await
                .map_err(|_| tonic::Code::Unavailable)?;
            let mut client =
                propd_proto::v1::admin_service_client::AdminServiceClient::new(channel);
            client
                .ping(propd_proto::v1::PingRequest {})
                .await
                .map(drop)
                .map_err(|status| status.code())
        })
}

#[test]
fn with_tls_a_joined_member_is_let_in_and_a_removed_one_is_not() {
    let Some(etcd) = Etcd::start() else { return };
    let shared = shared(&etcd, 1);
    let cluster = Cluster::start_tls(3, &shared);
    let certs = cluster.certs.clone().expect("a TLS cluster");
    // n4's member certificate, from the cluster's CA, before n4 exists anywhere.
    let holds = [PortHold::new(), PortHold::new()];
    let listen = SocketAddr::from(([127, 0, 0, 1], holds[0].port()));
    certs.issue(&["--member", &format!("n4={listen}")]);
    assert_eq!(
        ping_as(&cluster, "n4", 0),
        Err(tonic::Code::PermissionDenied),
        "n4 is no member yet"
    );

    let with_tls = format!(
        "{shared}\n[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
        certs.cert("n4").display().to_string(),
        certs.key("n4").display().to_string(),
        certs.ca().display().to_string(),
    );
    let _n4 = Extra::spawn(cluster.dir.path(), "n4", holds, &with_tls);
    // Once n1 saw n4 join, n4's certificate is a member's there.
    assert!(
        eventually(SETTLE, || ping_as(&cluster, "n4", 0).is_ok()),
        "n1 let the joined n4 in; n1's log:\n{}",
        cluster.log(0)
    );
    // n4 works as a member: a round it starts reaches the others.
    let status = |i: usize| -> Option<Value> {
        https_get(cluster.nodes[i].http, "/status.json", &certs, "admin")
            .and_then(|(code, body)| (code == 200).then(|| serde_json::from_str(&body).ok())?)
    };
    assert!(
        eventually(SETTLE, || (0..3).all(|i| status(i)
            .is_some_and(|s| s["moves"].as_array().is_some_and(Vec::is_empty)
                && s["members"].as_array().is_some_and(|m| m.len() == 4)))),
        "the moves to n4 ended (its rounds and the others' reached every copy): {:?}",
        status(0)
    );

    // Drained and removed, n4's certificate is no member's any more.
    let drained = etcd_json(&etcd, &["member", "drain", "n4"]);
    assert_eq!(drained["state"], "draining");
    assert!(
        eventually(SETTLE, || etcd_cli(&etcd, &["member", "remove", "n4"])
            .status
            .success()),
        "n4 could be removed once its shards moved away"
    );
    assert!(
        eventually(SETTLE, || ping_as(&cluster, "n4", 0)
            == Err(tonic::Code::PermissionDenied)),
        "n1 refuses the removed n4 as a member"
    );
}

#[test]
fn with_etcd_over_tls_nodes_and_the_cli_need_its_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = Certs {
        dir: dir.path().to_owned(),
    };
    let Some(etcd) = Etcd::start_tls(&certs) else {
        return;
    };
    let path = |p: PathBuf| p.display().to_string();
    let (ca, cert, key) = (
        path(certs.ca()),
        path(certs.cert("etcd-client")),
        path(certs.key("etcd-client")),
    );
    // The nodes reach etcd with its CA and a client certificate (the `[etcd]` table is last).
    let shared = format!(
        "{}tls_ca = {ca:?}\ntls_cert = {cert:?}\ntls_key = {key:?}\n",
        shared(&etcd, 1)
    );
    let cluster = Cluster::start_plaintext(2, &shared);
    settle(&addrs(&cluster), &["n1", "n2"]);
    let listed = etcd_json(
        &etcd,
        &[
            "member",
            "list",
            "--etcd-tls-ca",
            &ca,
            "--etcd-tls-cert",
            &cert,
            "--etcd-tls-key",
            &key,
        ],
    );
    let ids = field_of_each(&listed, "members", "id");
    assert_eq!(ids, ["n1", "n2"], "{listed}");

    // Without a client certificate etcd refuses the connection; without the CA an https://
    // endpoint is refused by name before anything is sent.
    let refused = etcd_cli(&etcd, &["member", "list", "--etcd-tls-ca", &ca]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains(&format!("etcd at {}", etcd.endpoint())),
        "{message}"
    );
    let refused = etcd_cli(&etcd, &["member", "list"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("etcd.tls_ca"), "{message}");
}
