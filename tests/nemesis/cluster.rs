//! The cluster under test: `propd serve` processes, each listening on a private port behind the
//! proxy. Node i's config lists every other member j at the proxy's link (i → j), and itself at
//! its own private port; the workload reaches node i through the link (client → i). The
//! nemesis and the final check talk to the private ports directly, so that they see through
//! every network fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::proxy::{Endpoint, Link, Proxy};

/// How the nodes are configured (the parts the run chooses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Groups, by name.
    pub groups: Vec<String>,
    /// Shards per group.
    pub shards: u32,
    /// Extra copies per shard.
    pub replicas: u32,
    /// Copies that must acknowledge a write.
    pub write_acks: u32,
    /// The `[repair]` table, as TOML lines.
    pub repair: String,
}

/// One node's addresses and files.
#[derive(Debug)]
pub struct Node {
    /// Its id (`n1`, ...).
    pub id: String,
    /// Its private gRPC address (behind the proxy).
    pub listen: SocketAddr,
    /// Its HTTP address.
    pub http: SocketAddr,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// Its log (every start appends).
    pub log: PathBuf,
    child: Option<Child>,
    /// The largest resident set any of its processes reached, in kB (from `VmHWM`).
    pub peak_rss_kb: u64,
}

/// The processes, the proxy in front of them, and the folder holding everything.
#[derive(Debug)]
pub struct Cluster {
    /// The run's folder: configs, data, logs.
    pub dir: PathBuf,
    /// The nodes, in id order.
    pub nodes: Vec<Node>,
    /// The proxy.
    pub proxy: Proxy,
    binary: PathBuf,
    libfaketime: Option<PathBuf>,
    /// Data directories that are tmpfs mounts of ours (unmounted on drop).
    mounted: Vec<PathBuf>,
    /// Why the data directories are not small tmpfs mounts, when they were asked to be.
    pub tmpfs_error: Option<String>,
}

/// The file that fills a node's tmpfs.
const FILLER: &str = "nemesis-filler";

impl Cluster {
    /// Writes the configs of `n` nodes into `dir`, starts the proxy and every node, and waits
    /// until each answers `/health`. With `tmpfs_mib`, each data directory is a tmpfs of that
    /// size (so that its disk can be filled); when mounting is not allowed, `tmpfs_error` says
    /// why and the directories are plain.
    pub async fn start(
        binary: &Path,
        dir: &Path,
        n: usize,
        layout: &Layout,
        libfaketime: Option<PathBuf>,
        tmpfs_mib: Option<u64>,
        seed: u64,
    ) -> Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports: Vec<(SocketAddr, SocketAddr)> = (0..n)
            .map(|_| {
                (
                    SocketAddr::from(([127, 0, 0, 1], free_port())),
                    SocketAddr::from(([127, 0, 0, 1], free_port())),
                )
            })
            .collect();
        let mut links = Vec::new();
        for (to, (listen, _)) in ports.iter().enumerate() {
            links.push((
                Link {
                    from: Endpoint::Client,
                    to,
                },
                *listen,
            ));
            for from in (0..n).filter(|&f| f != to) {
                links.push((
                    Link {
                        from: Endpoint::Node(from),
                        to,
                    },
                    *listen,
                ));
            }
        }
        let proxy = Proxy::start(links, seed)
            .await
            .context("starting the proxy")?;
        let groups: String = layout
            .groups
            .iter()
            .map(|g| {
                format!(
                    "[[groups]]\nname = \"{g}\"\nshard_num = {}\nreplicas = {}\n\n",
                    layout.shards, layout.replicas
                )
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, (listen, http)) in ports.iter().enumerate() {
            let id = format!("n{}", i + 1);
            let members: String = (0..n)
                .map(|j| {
                    let addr = if j == i {
                        *listen
                    } else {
                        proxy.addr(Link {
                            from: Endpoint::Node(i),
                            to: j,
                        })
                    };
                    format!("[[members]]\nid = \"n{}\"\naddr = \"{addr}\"\n\n", j + 1)
                })
                .collect();
            let data_dir = dir.join(&id);
            let config = dir.join(format!("{id}.toml"));
            let text = format!(
                "node_id = \"{id}\"\nlisten = \"{listen}\"\nhttp = \"{http}\"\ndata_dir = {:?}\nwrite_acks = {}\n\n{groups}{members}[repair]\n{}\n",
                data_dir.display().to_string(),
                layout.write_acks,
                layout.repair,
            );
            std::fs::write(&config, text)
                .with_context(|| format!("writing {}", config.display()))?;
            nodes.push(Node {
                log: dir.join(format!("{id}.log")),
                id,
                listen: *listen,
                http: *http,
                data_dir,
                config,
                child: None,
                peak_rss_kb: 0,
            });
        }
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            nodes,
            proxy,
            binary: binary.to_owned(),
            libfaketime,
            mounted: Vec::new(),
            tmpfs_error: None,
        };
        if let Some(mib) = tmpfs_mib {
            cluster.mount_tmpfs(mib);
        }
        for i in 0..n {
            cluster.start_node(i, None)?;
        }
        for i in 0..n {
            cluster.wait_ready(i, Duration::from_secs(60)).await?;
        }
        Ok(cluster)
    }

    /// Mounts a tmpfs of `mib` MiB on every data directory; on the first failure unmounts what
    /// it mounted and records why.
    fn mount_tmpfs(&mut self, mib: u64) {
        for i in 0..self.nodes.len() {
            let dir = self.nodes[i].data_dir.clone();
            let mounted = std::fs::create_dir_all(&dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    let output = Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                        .arg(&dir)
                        .output()
                        .map_err(|e| format!("running mount: {e}"))?;
                    if output.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
                    }
                });
            match mounted {
                Ok(()) => self.mounted.push(dir),
                Err(reason) => {
                    self.unmount_all();
                    self.tmpfs_error =
                        Some(format!("mounting a tmpfs on {}: {reason}", dir.display()));
                    return;
                }
            }
        }
    }

    fn unmount_all(&mut self) {
        for dir in self.mounted.drain(..) {
            let _ = Command::new("umount").arg(&dir).status();
        }
    }

    /// Fills node `i`'s tmpfs with a file until the disk is full; returns the bytes written.
    pub fn fill_disk(&self, i: usize) -> Result<u64> {
        use std::io::Write as _;
        let path = self.nodes[i].data_dir.join(FILLER);
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut written = 0_u64;
        for chunk in [1 << 20, 4096, 1] {
            let block = vec![0_u8; chunk];
            while file.write_all(&block).is_ok() {
                written += chunk as u64;
            }
        }
        let _ = file.sync_all();
        Ok(written)
    }

    /// Removes the file that filled node `i`'s disk (nothing when there is none).
    pub fn free_disk(&self, i: usize) -> Result<()> {
        let path = self.nodes[i].data_dir.join(FILLER);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// Empties node `i`'s data directory (which may be a mount point, so it stays).
    pub fn wipe_data(&self, i: usize) -> Result<()> {
        let dir = &self.nodes[i].data_dir;
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            }
            .with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(())
    }

    /// The address through which the workload reaches node `i`.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.proxy.addr(Link {
            from: Endpoint::Client,
            to: i,
        })
    }

    /// Whether clock skew can be injected.
    pub fn can_skew(&self) -> bool {
        self.libfaketime.is_some()
    }

    /// Starts node `i` (which must not be running), its wall clock moved by `skew_s` seconds
    /// when given; does not wait.
    pub fn start_node(&mut self, i: usize, skew_s: Option<i64>) -> Result<()> {
        let node = &mut self.nodes[i];
        if node.child.is_some() {
            bail!("{} is already running", node.id);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .with_context(|| format!("opening {}", node.log.display()))?;
        let mut command = Command::new(&self.binary);
        command
            .args(["serve", "--config"])
            .arg(&node.config)
            .env(
                "RUST_LOG",
                std::env::var("PROPD_NEMESIS_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(offset) = skew_s {
            let Some(lib) = &self.libfaketime else {
                bail!("clock skew asked for but libfaketime is not available");
            };
            command
                .env("LD_PRELOAD", lib)
                .env("FAKETIME", format!("{offset:+}"))
                // Only the wall clock: timers and timeouts keep real time.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_NO_CACHE", "1");
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `i` answers `/health`; fails at once when its process has exited.
    pub async fn wait_ready(&mut self, i: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let http = self.nodes[i].http;
        while Instant::now() < deadline {
            let exited = self.nodes[i]
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                bail!("{} exited while starting ({status})", self.nodes[i].id);
            }
            let healthy = tokio::task::spawn_blocking(move || {
                crate::http_get(http, "/health").is_some_and(|(code, _)| code == 200)
            })
            .await
            .unwrap_or(false);
            if healthy {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} did not answer /health within {limit:?} (see {})",
            self.nodes[i].id,
            self.nodes[i].log.display()
        )
    }

    /// Whether node `i` has a process (running or stopped).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILLs node `i` (a stopped one too) and reaps it.
    pub fn kill(&mut self, i: usize) {
        self.sample_rss(i);
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `i` cleanly (SIGTERM, at most 10 s, then SIGKILL) and reaps it; returns
    /// whether it exited by itself in time.
    pub async fn terminate(&mut self, i: usize) -> bool {
        self.sample_rss(i);
        let Some(mut child) = self.nodes[i].child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Sends SIGSTOP (`stop`) or SIGCONT to node `i`.
    pub fn signal(&self, i: usize, stop: bool) -> Result<()> {
        let Some(child) = &self.nodes[i].child else {
            bail!("{} is not running", self.nodes[i].id);
        };
        let signal = if stop { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill {signal} {} failed", child.id());
        }
        Ok(())
    }

    /// Nodes whose process exited without the nemesis killing it, with how it ended; they are
    /// reaped (and count as not running).
    pub fn reap_unexpected(&mut self) -> Vec<(String, String)> {
        let mut dead = Vec::new();
        for node in &mut self.nodes {
            let exited = node
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            if let Some(status) = exited {
                node.child = None;
                dead.push((node.id.clone(), status.to_string()));
            }
        }
        dead
    }

    /// Updates node `i`'s peak RSS from `/proc`.
    pub fn sample_rss(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let Some(child) = &node.child else {
            return;
        };
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
        let peak = status.ok().and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        });
        if let Some(peak) = peak {
            node.peak_rss_kb = node.peak_rss_kb.max(peak);
        }
    }

    /// The data file of node `i`.
    pub fn data_file(&self, i: usize) -> PathBuf {
        self.nodes[i].data_dir.join("propd.redb")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        self.unmount_all();
    }
}

/// A port of 10000..30000 (below the ephemeral range, so that a restarted node finds its port
/// free) that was free a moment ago. A nemesis run owns the machine's test ports for its
/// duration, so the port is not held until the node binds it.
fn free_port() -> u16 {
    crate::PortHold::new().port()
}
