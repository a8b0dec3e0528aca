//! `cargo xtask demo --join`: a node joins a serving cluster whose membership is in etcd.
//!
//! It starts an etcd (Debian's, installed by `.ci/install-etcd` when missing) and three nodes
//! that take their membership from it, writes through n1, starts n4, shows which copies moved
//! to it (rendezvous placement: about a quarter of them) and waits until the moved shards finished
//! their move by repair; then it compares n4's trees with the other copies'. Everything lives under
//! `target/demo-join/` and is removed first.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::demo::{build_propd, free_port, say};

const GROUP: &str = "demo";
const SHARDS: u32 = 8;
const PROPERTIES: usize = 100;

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct JoinNode {
    id: String,
    listen: String,
    http: String,
    _process: Process,
}

/// Runs the join demo from the workspace root.
pub(crate) fn run() -> Result<()> {
    let (binary, target) = build_propd()?;
    let dir = target.join("demo-join");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let etcd_port = free_port()?;
    let endpoint = format!("http://127.0.0.1:{etcd_port}");
    let _etcd = start_etcd(&dir, etcd_port)?;
    say(&format!("etcd up at {endpoint}"));

    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(start_node(&binary, &dir, &format!("n{i}"), &endpoint)?);
    }
    wait_members(&nodes, 3)?;
    say("three nodes up, membership from etcd:");
    show(&binary, &["member", "list", "--etcd", &endpoint])?;

    say(&format!("writing {PROPERTIES} properties through n1"));
    for k in 0..PROPERTIES {
        cli(
            &binary,
            &[
                "put",
                &format!("{GROUP}/sensor/{k:04}"),
                "--tag",
                &format!("reading={}", k * 7 % 100),
                "--server",
                &nodes[0].listen,
            ],
        )?;
    }
    wait_settled(&nodes)?;
    let before = copies(&nodes)?;

    say("starting n4: it registers in etcd and every node sees it");
    nodes.push(start_node(&binary, &dir, "n4", &endpoint)?);
    wait_members(&nodes, 4)?;
    let started = Instant::now();
    wait_settled(&nodes)?;
    let after = copies(&nodes)?;
    let mut moved = 0;
    for (shard, list) in &after {
        let old = before.get(shard).cloned().unwrap_or_default();
        if list != &old {
            let new: Vec<&String> = list.iter().filter(|id| !old.contains(id)).collect();
            if new.iter().any(|id| id.as_str() != "n4") {
                bail!("shard {shard} moved to another member than n4: {old:?} -> {list:?}");
            }
            moved += new.len();
            say(&format!(
                "  shard {shard}: {} -> {}",
                old.join(","),
                list.join(",")
            ));
        }
    }
    let total: usize = after.values().map(Vec::len).sum();
    say(&format!(
        "{moved} of {total} copies moved, all to n4; the moves ended by repair in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    // n4's trees equal the other copies' trees: it holds exactly what they hold.
    let mut leaves = 0;
    for (shard, list) in after.iter().filter(|(_, l)| l.iter().any(|id| id == "n4")) {
        let shard_text = shard.to_string();
        let mut roots = Vec::new();
        for id in list {
            let node = nodes
                .iter()
                .find(|n| &n.id == id)
                .context("a copy is not running")?;
            let tree: Value = serde_json::from_str(&cli(
                &binary,
                &[
                    "tree",
                    "--group",
                    GROUP,
                    "--shard",
                    &shard_text,
                    "--output",
                    "json",
                    "--server",
                    &node.listen,
                ],
            )?)?;
            if id == "n4" {
                leaves += tree["leaves"].as_u64().unwrap_or_default();
            }
            roots.push(tree["root"].as_str().unwrap_or_default().to_owned());
        }
        if roots.windows(2).any(|w| w[0] != w[1]) {
            bail!("shard {shard}: the copies' trees differ: {roots:?}");
        }
    }
    say(&format!(
        "n4 holds {leaves} properties in its shards, and each of its trees equals the other copies' trees"
    ));
    say("stopping the cluster and etcd");
    Ok(())
}

fn start_etcd(dir: &Path, port: u16) -> Result<Process> {
    crate::tools::ensure_etcd(true)?;
    let peer = free_port()?;
    let log = std::fs::File::create(dir.join("etcd.log"))?;
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--name=demo")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=demo={peer}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting etcd")?;
    let process = Process(child);
    let http = format!("127.0.0.1:{port}");
    if !wait_until(Duration::from_secs(30), || {
        Ok(get(&http, "/health").is_some_and(|b| b.contains("true")))
    })? {
        bail!(
            "etcd did not become healthy; see {}",
            dir.join("etcd.log").display()
        );
    }
    Ok(process)
}

fn start_node(binary: &Path, dir: &Path, id: &str, endpoint: &str) -> Result<JoinNode> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let http = format!("127.0.0.1:{}", free_port()?);
    let config = dir.join(format!("{id}.toml"));
    let text = format!(
        "node_id = \"{id}\"\nlisten = \"{listen}\"\nhttp = \"{http}\"\ndata_dir = {:?}\nwrite_acks = 2\n\n[[groups]]\nname = \"{GROUP}\"\nshard_num = {SHARDS}\nreplicas = 2\n\n[repair]\nperiod = \"2s\"\n\n[etcd]\nendpoints = [\"{endpoint}\"]\n",
        dir.join(id).display().to_string()
    );
    std::fs::write(&config, text)?;
    let log = std::fs::File::create(dir.join(format!("{id}.log")))?;
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting propd serve")?;
    let node = JoinNode {
        id: id.to_owned(),
        listen,
        http,
        _process: Process(child),
    };
    if !wait_until(Duration::from_secs(30), || {
        Ok(get(&node.http, "/health").is_some())
    })? {
        bail!(
            "{} did not start; see {}",
            node.id,
            dir.join(format!("{id}.log")).display()
        );
    }
    Ok(node)
}

/// Waits until no node sees a shard on the move.
fn wait_settled(nodes: &[JoinNode]) -> Result<()> {
    let settled = wait_until(Duration::from_secs(120), || {
        Ok(nodes.iter().all(|n| {
            status(&n.http).is_ok_and(|s| s["moves"].as_array().is_some_and(Vec::is_empty))
        }))
    })?;
    if !settled {
        bail!("the moved shards did not finish their moves within 120 s");
    }
    Ok(())
}

fn wait_members(nodes: &[JoinNode], n: usize) -> Result<()> {
    let ok = wait_until(Duration::from_secs(60), || {
        Ok(nodes.iter().all(|node| {
            status(&node.http).is_ok_and(|s| s["members"].as_array().is_some_and(|m| m.len() == n))
        }))
    })?;
    if !ok {
        bail!("the nodes did not all see {n} members");
    }
    Ok(())
}

/// Every shard's node list, from the nodes that hold it.
fn copies(nodes: &[JoinNode]) -> Result<std::collections::BTreeMap<u32, Vec<String>>> {
    let mut copies = std::collections::BTreeMap::new();
    for node in nodes {
        for shard in status(&node.http)?["shards"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if shard["group"] != GROUP {
                continue;
            }
            let list = shard["copies"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            copies.insert(shard["shard"].as_u64().unwrap_or_default() as u32, list);
        }
    }
    Ok(copies)
}

fn status(http: &str) -> Result<Value> {
    let body = get(http, "/status.json").context("no answer on the HTTP port")?;
    serde_json::from_str(&body).context("status.json is not JSON")
}

/// A bare HTTP/1.1 GET on loopback: the body, or `None` when nothing answers.
fn get(addr: &str, path: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_owned())
}

fn wait_until(limit: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        if condition()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cli(binary: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running the propd CLI")?;
    if !output.status.success() {
        bail!(
            "propd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn show(binary: &Path, args: &[&str]) -> Result<()> {
    for line in cli(binary, args)?.lines() {
        say(&format!("  {line}"));
    }
    Ok(())
}
