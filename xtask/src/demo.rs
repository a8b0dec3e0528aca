//! `cargo xtask demo`: a local three-node cluster that drifts apart and repairs itself.
//!
//! It builds `propd`, starts three nodes on free loopback ports, writes through one node while
//! another is stopped, shows the trees disagree, runs one repair round per shard and shows the
//! trees agree again — with the properties repaired, the bytes moved and the time taken — then
//! stops the cluster. Everything lives under `target/demo/` and is removed first.
//!
//! The cluster runs with mutual TLS: `propd cert` makes a development CA, a certificate per
//! node and an `admin` client certificate in `target/demo/certs/`; the nodes dial each other
//! with theirs and the demo's CLI calls present the client's.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const GROUP: &str = "demo";
const SHARDS: u32 = 2;
const PROPERTIES: usize = 200;

struct Node {
    id: String,
    listen: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

struct Demo {
    binary: PathBuf,
    nodes: Vec<Node>,
    certs: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            stop(node);
        }
    }
}

fn stop(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Builds `propd` (debug); returns the binary and the target directory.
pub(crate) fn build_propd() -> Result<(PathBuf, PathBuf)> {
    say("building propd");
    let status = Command::new("cargo")
        .args([
            "build",
            "--quiet",
            "--package",
            "propd-node",
            "--bin",
            "propd",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building propd failed");
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    Ok((target.join("debug").join("propd"), target))
}

/// Runs the demo from the workspace root.
pub(crate) fn run() -> Result<()> {
    let (binary, target) = build_propd()?;
    let dir = target.join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let nodes = write_configs(&dir)?;
    let certs = dir.join("certs");
    issue_certs(&binary, &nodes, &certs)?;
    say(&format!(
        "mutual TLS on: CA, node and client certificates in {}",
        certs.display()
    ));
    let mut demo = Demo {
        binary,
        nodes,
        certs,
    };
    for i in 0..demo.nodes.len() {
        demo.start(i)?;
    }
    for i in 0..demo.nodes.len() {
        demo.wait_ready(i)?;
    }
    say(&format!(
        "three nodes up: {}",
        demo.nodes
            .iter()
            .map(|n| format!("{} at {}", n.id, n.listen))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Keep background repair out of the way so the divergence stays visible until we repair.
    for i in 0..demo.nodes.len() {
        demo.cli(i, &["repair", "pause"])?;
    }

    say(&format!(
        "writing {PROPERTIES} properties through n1 while n3 is stopped"
    ));
    stop(&mut demo.nodes[2]);
    for k in 0..PROPERTIES {
        let entity = format!("{GROUP}/sensor/{k:04}");
        let tag = format!("reading={}", k * 7 % 100);
        demo.cli(0, &["put", &entity, "--tag", &tag])?;
    }
    demo.start(2)?;
    demo.wait_ready(2)?;
    demo.cli(2, &["repair", "pause"])?;

    say("tree roots before repair (n3 missed every write):");
    demo.show_roots()?;

    let started = Instant::now();
    let mut repaired = 0;
    let mut bytes = 0;
    for shard in 0..SHARDS {
        let shard_text = shard.to_string();
        let result = demo.json(
            0,
            &["repair", "--group", GROUP, "--shard", &shard_text, "--wait"],
        )?;
        let syncs = result["syncs"].as_array().cloned().unwrap_or_default();
        for sync in &syncs {
            let count = |key: &str| sync[key].as_u64().unwrap_or(0);
            let from = sync["from"].as_str().unwrap_or("?");
            let to = sync["to"].as_str().unwrap_or("?");
            // Each copy applied is counted once, on the side that applied it.
            repaired += count("applied") + count("peer_applied");
            let moved = count("bytes_sent") + count("bytes_received");
            bytes += moved;
            say(&format!(
                "  shard {shard}: sync {from} -> {to}: compared {}; {from} sent {} ({to} applied {}); {from} received {} (applied {}); {moved} bytes",
                count("compared"),
                count("sent"),
                count("peer_applied"),
                count("received"),
                count("applied"),
            ));
        }
        if result["ok"] != Value::Bool(true) {
            bail!("the repair round of shard {shard} did not complete: {result}");
        }
    }
    let took = started.elapsed();

    say("tree roots after repair:");
    let equal = demo.show_roots()?;
    say(&format!(
        "repaired {repaired} property copies, moved {bytes} bytes of repair traffic, in {:.2}s",
        took.as_secs_f64()
    ));
    let sample = demo.json(2, &["get", &format!("{GROUP}/sensor/0042"), "--local"])?;
    say(&format!("n3's own copy of {GROUP}/sensor/0042: {sample}"));
    if !equal {
        bail!("the trees still differ after repair");
    }
    say("all copies identical; stopping the cluster");
    Ok(())
}

fn write_configs(dir: &Path) -> Result<Vec<Node>> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_>>()?;
    let members: String = ports
        .iter()
        .enumerate()
        .map(|(i, (grpc, _))| {
            format!(
                "[[members]]\nid = \"n{}\"\naddr = \"127.0.0.1:{grpc}\"\n\n",
                i + 1
            )
        })
        .collect();
    let mut nodes = Vec::new();
    for (i, (grpc, http)) in ports.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let config = dir.join(format!("{id}.toml"));
        let data_dir = dir.join(&id);
        let text = format!(
            "node_id = \"{id}\"\nlisten = \"127.0.0.1:{grpc}\"\nhttp = \"127.0.0.1:{http}\"\ndata_dir = {:?}\n\n{members}[[groups]]\nname = \"{GROUP}\"\nshard_num = {SHARDS}\nreplicas = 2\n",
            data_dir.display().to_string()
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        nodes.push(Node {
            id: id.clone(),
            listen: format!("127.0.0.1:{grpc}"),
            config,
            log: dir.join(format!("{id}.log")),
            child: None,
        });
    }
    Ok(nodes)
}

/// `propd cert` for the members of n1's config and an `admin` client, then a `[tls]` table in
/// every node's config.
fn issue_certs(binary: &Path, nodes: &[Node], certs: &Path) -> Result<()> {
    let output = Command::new(binary)
        .args(["cert", "--client", "admin=admin", "--out"])
        .arg(certs)
        .arg("--config")
        .arg(&nodes[0].config)
        .stdin(Stdio::null())
        .output()
        .context("running propd cert")?;
    if !output.status.success() {
        bail!(
            "propd cert failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    for node in nodes {
        let mut text = std::fs::read_to_string(&node.config)?;
        let path = |name: String| certs.join(name).display().to_string();
        text.push_str(&format!(
            "\n[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
            path(format!("{}.pem", node.id)),
            path(format!("{}.key", node.id)),
            path("ca.pem".to_owned()),
        ));
        std::fs::write(&node.config, text)
            .with_context(|| format!("writing {}", node.config.display()))?;
    }
    Ok(())
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn say(text: &str) {
    println!("demo: {text}");
}

impl Demo {
    fn start(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.binary)
            .args(["serve", "--config"])
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting propd serve")?;
        node.child = Some(child);
        Ok(())
    }

    fn wait_ready(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cli(i, &["status"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        bail!("{} did not start; its log:\n{log}", self.nodes[i].id)
    }

    fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        let output = Command::new(&self.binary)
            .args(args)
            .args(["--server", &self.nodes[i].listen])
            .env("PROPD_CA", self.certs.join("ca.pem"))
            .env("PROPD_CERT", self.certs.join("admin.pem"))
            .env("PROPD_KEY", self.certs.join("admin.key"))
            .env("PROPD_SERVER_NAME", &self.nodes[i].id)
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

    fn json(&self, i: usize, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let text = self.cli(i, &all)?;
        serde_json::from_str(&text)
            .with_context(|| format!("parsing the output of propd {}", all.join(" ")))
    }

    /// Prints each node's root per shard; returns whether every shard's roots agree.
    fn show_roots(&self) -> Result<bool> {
        let mut all_equal = true;
        for shard in 0..SHARDS {
            let shard_text = shard.to_string();
            let mut roots = Vec::new();
            for i in 0..self.nodes.len() {
                let tree = self.json(i, &["tree", "--group", GROUP, "--shard", &shard_text])?;
                let root = tree["root"].as_str().unwrap_or_default().to_owned();
                say(&format!(
                    "  shard {shard} on {}: root {}… leaves {}",
                    self.nodes[i].id,
                    &root[..root.len().min(16)],
                    tree["leaves"]
                ));
                roots.push(root);
            }
            all_equal &= roots.windows(2).all(|w| w[0] == w[1]);
        }
        Ok(all_equal)
    }
}
