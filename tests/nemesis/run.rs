//! One nemesis run: start the cluster, run the workload and the schedule, heal, repair every
//! shard, read every copy, check.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use propd_proto::v1;
use propd_proto::v1::admin_service_client::AdminServiceClient;

use super::checker::{self, Anomaly, FinalState, Tolerance};
use super::cluster::{Cluster, Layout};
use super::copies::{self, Copyholder};
use super::history::{History, Op, Outcome, Version};
use super::proxy::{Endpoint, Link, Rules};
use super::rng::Rng;
use super::schedule::{Direction, Fault, FaultKind, Step, Style, schedule};
use super::workload::{self, Workload};

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `propd` binary.
    pub binary: PathBuf,
    /// The folder for configs, data, logs and reports (created).
    pub out: PathBuf,
    /// Nodes.
    pub nodes: usize,
    /// Length of the faulty part of the run.
    pub seconds: u64,
    /// The seed of the schedule and the workload.
    pub seed: u64,
    /// Fault kinds to draw from.
    pub faults: Vec<FaultKind>,
    /// Concurrent clients.
    pub clients: usize,
    /// Entities.
    pub entities: usize,
    /// Bound on each node's peak resident set, in MiB.
    pub rss_limit_mib: u64,
}

/// The size of each node's data tmpfs when the disk-full fault is on: ample for the workload's
/// few hundred small properties over hours, small enough to fill in a moment.
const TMPFS_MIB: u64 = 128;

/// Where libfaketime may be found (Debian's `faketime` package), or `PROPD_LIBFAKETIME`.
pub fn find_libfaketime() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PROPD_LIBFAKETIME")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(
        [
            "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
            "/usr/lib/faketime/libfaketime.so.1",
        ]
        .map(PathBuf::from),
    );
    candidates.into_iter().find(|path| path.exists())
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Operations recorded.
    pub ops: usize,
    /// Puts and deletes acknowledged.
    pub acknowledged: usize,
    /// Gets answered.
    pub reads: usize,
    /// Operations with an indeterminate outcome.
    pub indeterminate: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Repair rounds started by the nemesis during the run (besides the background ones).
    pub explicit_rounds: usize,
    /// Fault kinds left out, with why.
    pub skipped: Vec<String>,
    /// Every fault begun and healed, with its time.
    pub timeline: Vec<String>,
    /// What the checker found.
    pub anomalies: Vec<Anomaly>,
    /// Other broken promises: a process that died by itself, a shard without a complete
    /// round, a node over the memory bound, a node that could not be read.
    pub problems: Vec<String>,
    /// The report to print: counts, and on failure the seed, timeline and histories.
    pub report: String,
}

impl Summary {
    /// Whether every promise held.
    pub fn passed(&self) -> bool {
        self.anomalies.is_empty() && self.problems.is_empty()
    }
}

/// The cluster's layout for a run: three groups of four shards, three copies, two acks, and
/// repair often enough that tombstones are purged within the run; the grace (5 s) is shorter
/// than the longest fault (6 s), so a node can miss a whole grace period.
fn layout(nodes: usize) -> Layout {
    Layout {
        groups: vec!["g0".to_owned(), "g1".to_owned(), "g2".to_owned()],
        shards: 4,
        replicas: 2,
        write_acks: if nodes >= 3 { 2 } else { 1 },
        repair: "enabled = true\nperiod = \"2s\"\nsync_timeout = \"5s\"\nround_timeout = \"20s\"\nverify_interval = \"3s\"\ntombstone_grace = \"5s\""
            .to_owned(),
    }
}

/// Runs the whole thing. An `Err` means the harness itself failed (the cluster would not start);
/// anomalies are in the summary.
pub async fn run(settings: &Settings) -> Result<Summary> {
    let mut summary = Summary::default();
    let mut kinds = settings.faults.clone();
    let libfaketime = find_libfaketime();
    if kinds.contains(&FaultKind::Skew) && libfaketime.is_none() {
        kinds.retain(|k| *k != FaultKind::Skew);
        summary.skipped.push(
            "skew: libfaketime not found (install Debian's `faketime`, or set PROPD_LIBFAKETIME)"
                .to_owned(),
        );
    }
    let length = Duration::from_secs(settings.seconds);
    let layout = layout(settings.nodes);
    let mut cluster = Cluster::start(
        &settings.binary,
        &settings.out,
        settings.nodes,
        &layout,
        libfaketime,
        kinds.contains(&FaultKind::DiskFull).then_some(TMPFS_MIB),
        settings.seed,
    )
    .await?;
    if let Some(reason) = &cluster.tmpfs_error {
        kinds.retain(|k| *k != FaultKind::DiskFull);
        summary.skipped.push(format!("disk-full: {reason}"));
    }
    let steps = if kinds.is_empty() {
        Vec::new()
    } else {
        schedule(settings.seed, settings.nodes, length, &kinds)
    };

    let workload = Workload {
        clients: settings.clients,
        first_client: 0,
        entities: settings.entities,
        groups: layout.groups.clone(),
        timeout: Duration::from_secs(3),
        seed: settings.seed,
    };
    let history = Arc::new(History::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let coordinators: Vec<_> = (0..settings.nodes)
        .map(|i| cluster.client_addr(i))
        .collect();
    let t0 = super::history::now_nanos();
    let started = Instant::now();
    let clients = {
        let workload = workload.clone();
        let history = Arc::clone(&history);
        let stopped = stopped.clone();
        tokio::spawn(async move { workload::run(&workload, &coordinators, history, stopped).await })
    };
    let rounds = tokio::spawn(explicit_rounds(
        cluster.nodes.iter().map(|n| n.listen).collect(),
        layout.groups.clone(),
        layout.shards,
        settings.seed,
        stopped,
    ));

    let mut nemesis = Nemesis {
        cluster: &mut cluster,
        started,
        seed: settings.seed,
        state: vec![NodeState::Up; settings.nodes],
        summary: &mut summary,
        rss_limit_kb: settings.rss_limit_mib * 1024,
        corrupted: vec![false; settings.nodes],
        filled: vec![false; settings.nodes],
    };
    nemesis.play(&steps, length).await;
    let _ = stop.send(true);
    clients.await.context("the workload task failed")?;
    nemesis.summary.explicit_rounds = rounds.await.context("the explicit rounds task failed")?;
    nemesis.heal().await;
    nemesis.note("healed; repairing every shard".to_owned());

    tokio::time::sleep(Duration::from_secs(2)).await;
    let holders = holders(nemesis.cluster, nemesis.summary).await;
    // One complete round per shard, then read. Copies may still differ by tombstones that one
    // copy has purged and another not yet (each purges on its own verification tick); such a
    // difference must vanish as the purges complete, so rounds and reads are repeated until
    // every shard's copies agree, for at most a minute. Each pass is on the timeline.
    let settle = Instant::now() + Duration::from_secs(60);
    let mut pass = 0;
    let state = loop {
        pass += 1;
        // A node restarted on a damaged file may meet the damage only now (a read, the scrub).
        nemesis.replace_damaged().await;
        let mut found = Summary::default();
        repair_all(nemesis.cluster, &holders, &mut found).await;
        let (state, moved) =
            final_state(nemesis.cluster, &workload, &layout, &holders, &mut found).await;
        let differing = copies::differing_shards(&state);
        let (purging, other) = differing_entities(&state);
        let line = format!(
            "{:>8.3}s pass {pass}: a complete round per shard, then {differing} shards with differing copies \
             ({purging} entities differing only by a tombstone some copies purged, {other} otherwise; \
             {moved} roots changed while the copies were read)",
            started.elapsed().as_secs_f64()
        );
        nemesis.summary.timeline.push(line);
        if differing == 0 || Instant::now() > settle {
            nemesis.summary.problems.extend(found.problems);
            break state;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    for i in 0..cluster.nodes.len() {
        cluster.sample_rss(i);
    }
    let ops = history.ops();
    let slack = if kinds.contains(&FaultKind::Skew) {
        4_000_000_000
    } else {
        1_000_000_000
    };
    summary.anomalies = checker::check(
        &ops,
        &state,
        Tolerance {
            clock_slack_ns: slack,
        },
    );
    for node in &cluster.nodes {
        if node.peak_rss_kb > settings.rss_limit_mib * 1024 {
            summary.problems.push(format!(
                "{} peaked at {} MiB resident, over the bound of {} MiB",
                node.id,
                node.peak_rss_kb / 1024,
                settings.rss_limit_mib
            ));
        }
    }
    counts(&ops, &mut summary);
    write_files(&settings.out, &ops, t0, &summary)?;
    summary.report = report(settings, &cluster, &ops, t0, &summary);
    Ok(summary)
}

/// Until `stop`, every 1–4 s (seeded), asks a random node for a round of a random shard,
/// without waiting (a node that does not hold the shard, or is down, refuses; that is fine).
/// Returns how many rounds were started.
async fn explicit_rounds(
    nodes: Vec<std::net::SocketAddr>,
    groups: Vec<String>,
    shards: u32,
    seed: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let mut rng = Rng::stream(seed, 0xE0E0_0000);
    let mut started = 0;
    loop {
        let pause = Duration::from_millis(rng.between(1_000, 4_000));
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return started,
        }
        if *stop.borrow() {
            return started;
        }
        let node = *rng.pick(&nodes);
        let group = rng.pick(&groups).clone();
        let shard = rng.below(u64::from(shards)) as u32;
        let mut admin = AdminServiceClient::new(workload::channel(node, Duration::from_secs(5)));
        let request = v1::PropagateNowRequest {
            group,
            shard,
            wait: false,
            preview: false,
            timeout_ms: 0,
        };
        if admin.propagate_now(request).await.is_ok() {
            started += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeState {
    Up,
    Paused,
    Down,
    Skewed,
}

struct Nemesis<'a> {
    cluster: &'a mut Cluster,
    started: Instant,
    seed: u64,
    state: Vec<NodeState>,
    summary: &'a mut Summary,
    rss_limit_kb: u64,
    /// Nodes whose data file was damaged and that have not been replaced since.
    corrupted: Vec<bool>,
    /// Nodes whose disk is full.
    filled: Vec<bool>,
}

impl Nemesis<'_> {
    fn note(&mut self, text: String) {
        let line = format!("{:>8.3}s {text}", self.started.elapsed().as_secs_f64());
        self.summary.timeline.push(line);
    }

    /// Plays the steps in time order, then waits out the run's length.
    async fn play(&mut self, steps: &[Step], length: Duration) {
        let mut events: Vec<(Duration, bool, usize)> = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            events.push((step.at, true, i));
            if !step.lasts.is_zero() {
                events.push((step.at + step.lasts, false, i));
            }
        }
        // At equal times, heal before injecting.
        events.sort_by_key(|(at, begin, i)| (*at, *begin, *i));
        for (at, begin, i) in events {
            tokio::time::sleep_until((self.started + at).into()).await;
            self.watch_processes();
            self.replace_damaged().await;
            let step = &steps[i];
            if begin {
                *self
                    .summary
                    .faults
                    .entry(step.fault.kind().name())
                    .or_default() += 1;
                self.note(format!("begin {}", step.fault));
                if let Err(error) = self.inject(i, &step.fault).await {
                    self.note(format!("  could not inject: {error:#}"));
                }
            } else {
                self.note(format!("end   {}", step.fault));
                if let Err(error) = self.undo(&step.fault) {
                    self.note(format!("  could not heal: {error:#}"));
                }
            }
        }
        tokio::time::sleep_until((self.started + length).into()).await;
        self.watch_processes();
    }

    /// Records processes that died without the nemesis, and samples memory. A node whose data
    /// file the nemesis damaged may refuse to start, naming the damage: that is the right
    /// answer, and the nemesis then does what an operator would, replacing the node by an empty
    /// one (its data directory wiped) that repair refills.
    fn watch_processes(&mut self) {
        for (id, status) in self.cluster.reap_unexpected() {
            let index = self.cluster.nodes.iter().position(|n| n.id == id);
            if let Some(i) = index {
                self.state[i] = NodeState::Down;
                if self.corrupted[i] {
                    let tail = log_tail(&self.cluster.nodes[i].log);
                    if let Some(line) = tail.lines().rev().find(|l| {
                        // The store names the damage: "corrupt" from redb's own checks,
                        // "damaged database file" where redb panicked opening it.
                        let l = l.to_lowercase();
                        l.contains("corrupt") || l.contains("damaged database file")
                    }) {
                        self.note(format!(
                            "{id} refused its damaged data file ({status}): {line}"
                        ));
                        self.note(format!("  replacing {id} by an empty node"));
                        self.corrupted[i] = false;
                        *self.summary.faults.entry("replace").or_default() += 1;
                        let restarted = self.cluster.wipe_data(i).and_then(|()| self.revive(i));
                        if let Err(error) = restarted {
                            let problem = format!("replacing {id}: {error:#}");
                            self.note(problem.clone());
                            self.summary.problems.push(problem);
                        }
                        continue;
                    }
                }
            }
            let problem = format!("{id} exited by itself ({status}); see its log");
            self.note(problem.clone());
            self.summary.problems.push(problem);
        }
        for i in 0..self.cluster.nodes.len() {
            self.cluster.sample_rss(i);
            let peak = self.cluster.nodes[i].peak_rss_kb;
            if peak > self.rss_limit_kb {
                let id = self.cluster.nodes[i].id.clone();
                self.note(format!("{id} is at {} MiB resident", peak / 1024));
            }
        }
    }

    /// Replaces every node whose data file the nemesis damaged and that now reports the damage
    /// on `/health` (503, `store damaged`: a read met a damaged page after the file opened
    /// cleanly), as docs/operations.md tells an operator to: stop it, remove its data, start it
    /// empty and let repair refill it. Returns how many it replaced.
    async fn replace_damaged(&mut self) -> usize {
        let mut replaced = 0;
        for i in 0..self.corrupted.len() {
            if !self.corrupted[i] || self.state[i] != NodeState::Up || !self.cluster.is_running(i) {
                continue;
            }
            let http = self.cluster.nodes[i].http;
            let health = tokio::task::spawn_blocking(move || crate::http_get(http, "/health"))
                .await
                .ok()
                .flatten();
            let Some((503, body)) = health else { continue };
            if !body.contains("store damaged") {
                continue;
            }
            let id = self.cluster.nodes[i].id.clone();
            self.note(format!(
                "{id} reports its damaged data file: {}",
                body.trim()
            ));
            self.note(format!("  replacing {id} by an empty node"));
            self.corrupted[i] = false;
            *self.summary.faults.entry("replace").or_default() += 1;
            self.cluster.kill(i);
            self.state[i] = NodeState::Down;
            let mut restarted = self.cluster.wipe_data(i).and_then(|()| self.revive(i));
            if restarted.is_ok() {
                restarted = self.cluster.wait_ready(i, Duration::from_secs(60)).await;
            }
            if let Err(error) = restarted {
                let problem = format!("replacing {id}: {error:#}");
                self.note(problem.clone());
                self.summary.problems.push(problem);
            }
            replaced += 1;
        }
        replaced
    }

    async fn inject(&mut self, step: usize, fault: &Fault) -> Result<()> {
        let proxy = &self.cluster.proxy;
        match fault {
            Fault::Kill { node } => {
                self.cluster.kill(*node);
                self.state[*node] = NodeState::Down;
            }
            Fault::Pause { node } => {
                self.cluster.signal(*node, true)?;
                self.state[*node] = NodeState::Paused;
            }
            Fault::Skew { node, offset_s } => {
                self.cluster.kill(*node);
                self.state[*node] = NodeState::Down;
                self.cluster.start_node(*node, Some(*offset_s))?;
                self.state[*node] = NodeState::Skewed;
            }
            Fault::Corrupt {
                node,
                bytes,
                in_values,
            } => {
                // A clean stop: redb then opens the file without a repair pass (which would
                // check page checksums), as after an orderly restart.
                let clean = self.cluster.terminate(*node).await;
                self.state[*node] = NodeState::Down;
                if !clean {
                    self.note(format!(
                        "  n{} did not stop within 10 s of SIGTERM; killed",
                        node + 1
                    ));
                }
                let mut rng = Rng::stream(self.seed, 0xC0DE_0000 + step as u64);
                let flipped =
                    flip_bytes(&self.cluster.data_file(*node), *bytes, *in_values, &mut rng)?;
                self.corrupted[*node] = true;
                self.note(format!("  flipped bytes at offsets {flipped:?}"));
            }
            Fault::DiskFull { node } => {
                let written = self.cluster.fill_disk(*node)?;
                self.filled[*node] = true;
                self.note(format!(
                    "  wrote {} MiB until the disk was full",
                    written >> 20
                ));
            }
            Fault::Partition {
                side,
                direction,
                style,
            } => {
                let rest: Vec<usize> = (0..self.cluster.nodes.len())
                    .filter(|n| !side.contains(n))
                    .collect();
                for &a in side {
                    for &b in &rest {
                        if matches!(direction, Direction::Both | Direction::FromSide) {
                            block(proxy, a, b, *style);
                        }
                        if matches!(direction, Direction::Both | Direction::ToSide) {
                            block(proxy, b, a, *style);
                        }
                    }
                }
            }
            Fault::Cut { node } => {
                for link in touching(proxy.links(), *node) {
                    proxy.cut(link);
                }
            }
            Fault::Delay {
                node,
                delay,
                jitter,
            } => {
                for link in touching(proxy.links(), *node) {
                    proxy.update(link, |r| {
                        r.delay = *delay;
                        r.jitter = *jitter;
                    });
                }
            }
            Fault::Bandwidth {
                node,
                bytes_per_second,
            } => {
                for link in touching(proxy.links(), *node) {
                    proxy.update(link, |r| r.bandwidth = *bytes_per_second);
                }
            }
            Fault::Refuse { node } => {
                for link in proxy.links().filter(|l| l.to == *node) {
                    proxy.update(link, |r| r.refuse = true);
                }
            }
        }
        Ok(())
    }

    fn undo(&mut self, fault: &Fault) -> Result<()> {
        match fault {
            Fault::Kill { node } | Fault::Corrupt { node, .. } => self.revive(*node),
            Fault::Pause { node } => {
                self.cluster.signal(*node, false)?;
                self.state[*node] = NodeState::Up;
                Ok(())
            }
            Fault::DiskFull { node } => {
                self.filled[*node] = false;
                self.cluster.free_disk(*node)
            }
            Fault::Skew { node, .. } => {
                self.cluster.kill(*node);
                self.state[*node] = NodeState::Down;
                self.revive(*node)
            }
            Fault::Partition { .. }
            | Fault::Cut { .. }
            | Fault::Delay { .. }
            | Fault::Bandwidth { .. }
            | Fault::Refuse { .. } => {
                self.cluster.proxy.heal_all();
                Ok(())
            }
        }
    }

    fn revive(&mut self, node: usize) -> Result<()> {
        if !self.cluster.is_running(node) {
            self.cluster.start_node(node, None)?;
        }
        self.state[node] = NodeState::Up;
        Ok(())
    }

    /// Ends every fault: the network passes everything, every node runs with its real clock.
    async fn heal(&mut self) {
        self.watch_processes();
        self.cluster.proxy.heal_all();
        for node in 0..self.filled.len() {
            if self.filled[node] {
                self.filled[node] = false;
                if let Err(error) = self.cluster.free_disk(node) {
                    self.summary
                        .problems
                        .push(format!("healing n{}: {error:#}", node + 1));
                }
            }
        }
        for node in 0..self.state.len() {
            let result = match self.state[node] {
                NodeState::Up => Ok(()),
                NodeState::Paused => self.cluster.signal(node, false),
                NodeState::Down => self.revive(node),
                NodeState::Skewed => {
                    self.cluster.kill(node);
                    self.revive(node)
                }
            };
            self.state[node] = NodeState::Up;
            if let Err(error) = result {
                let problem = format!("healing n{}: {error:#}", node + 1);
                self.summary.problems.push(problem);
            }
        }
        for node in 0..self.state.len() {
            if self
                .cluster
                .wait_ready(node, Duration::from_secs(60))
                .await
                .is_err()
            {
                // Perhaps it refused a damaged file, or reports one, and is replaced now; else
                // a problem.
                self.watch_processes();
                self.replace_damaged().await;
                if let Err(error) = self.cluster.wait_ready(node, Duration::from_secs(60)).await {
                    self.summary
                        .problems
                        .push(format!("after the heal: {error:#}"));
                }
            }
        }
        self.watch_processes();
    }
}

/// The last few kB of a log.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    String::from_utf8_lossy(&text[start..]).into_owned()
}

/// Stops node `from` from sending to node `to`, in `style`.
fn block(proxy: &super::proxy::Proxy, from: usize, to: usize, style: Style) {
    let forward = Link {
        from: Endpoint::Node(from),
        to,
    };
    let backward = Link {
        from: Endpoint::Node(to),
        to: from,
    };
    match style {
        Style::Blackhole => proxy.update(forward, |r| r.hold_requests = true),
        Style::Reject => {
            proxy.update(forward, |r| r.refuse = true);
            proxy.cut(forward);
        }
    }
    proxy.update(backward, |r: &mut Rules| r.hold_responses = true);
}

/// The links to or from `node` (clients' included).
fn touching(links: impl Iterator<Item = Link>, node: usize) -> Vec<Link> {
    links
        .filter(|l| l.to == node || l.from == Endpoint::Node(node))
        .collect()
}

/// Changes `count` bytes of `file` (in stored values when `in_values`); returns the offsets.
fn flip_bytes(file: &Path, count: u32, in_values: bool, rng: &mut Rng) -> Result<Vec<usize>> {
    let mut data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let flips = super::corrupt::plan(&data, count, in_values, rng);
    for flip in &flips {
        data[flip.offset] = flip.to;
    }
    std::fs::write(file, &data).with_context(|| format!("writing {}", file.display()))?;
    Ok(flips.iter().map(|f| f.offset).collect())
}

fn admin(cluster: &Cluster, i: usize) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::new(workload::channel(
        cluster.nodes[i].listen,
        Duration::from_secs(90),
    ))
}

/// (group, shard) → the nodes holding it, from each node's status.
async fn holders(cluster: &Cluster, summary: &mut Summary) -> BTreeMap<(String, u32), Vec<usize>> {
    let mut holders: BTreeMap<(String, u32), Vec<usize>> = BTreeMap::new();
    for i in 0..cluster.nodes.len() {
        match admin(cluster, i).status(v1::StatusRequest {}).await {
            Ok(status) => {
                for shard in status.into_inner().shards {
                    holders
                        .entry((shard.group, shard.shard))
                        .or_default()
                        .push(i);
                }
            }
            Err(error) => summary.problems.push(format!(
                "{}: status failed after the heal: {error}",
                cluster.nodes[i].id
            )),
        }
    }
    holders
}

/// Runs one complete round per shard, from its first holder (a few attempts each: a round
/// refused because a background one runs is retried).
async fn repair_all(
    cluster: &Cluster,
    holders: &BTreeMap<(String, u32), Vec<usize>>,
    summary: &mut Summary,
) {
    for ((group, shard), nodes) in holders {
        let origin = nodes[0];
        let mut last = String::new();
        let mut completed = false;
        for _attempt in 0..10 {
            let answer = admin(cluster, origin)
                .propagate_now(v1::PropagateNowRequest {
                    group: group.clone(),
                    shard: *shard,
                    wait: true,
                    preview: false,
                    timeout_ms: 60_000,
                })
                .await;
            match answer.map(|a| a.into_inner().result) {
                Ok(Some(result)) if result.outcome == v1::PropagationOutcome::Completed as i32 => {
                    completed = true;
                    break;
                }
                Ok(Some(result)) => {
                    last = format!("outcome {:?}: {}", result.outcome(), result.error);
                }
                Ok(None) => last = "no result within the wait".to_owned(),
                Err(error) => last = error.to_string(),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !completed {
            summary.problems.push(format!(
                "no complete repair round for {group}/{shard} from {}: {last}",
                cluster.nodes[origin].id
            ));
        }
    }
}

/// Reads every copy of every entity, and every shard's root, from each node directly; also
/// returns how many (shard, copy) roots changed while the copies were read.
async fn final_state(
    cluster: &Cluster,
    workload: &Workload,
    layout: &Layout,
    holders: &BTreeMap<(String, u32), Vec<usize>>,
    summary: &mut Summary,
) -> (FinalState, usize) {
    let nodes: Vec<Copyholder> = cluster
        .nodes
        .iter()
        .map(|node| Copyholder {
            id: node.id.clone(),
            listen: node.listen,
        })
        .collect();
    copies::final_state(
        &nodes,
        &layout.groups,
        layout.shards,
        holders,
        (0..workload.entities).map(|i| workload.entity(i)),
        &mut summary.problems,
    )
    .await
}

/// Entities whose copies differ: `(only by tombstones present on some copies and purged on
/// others, in any other way)`.
fn differing_entities(state: &FinalState) -> (usize, usize) {
    let mut purging = 0;
    let mut other = 0;
    for copies in state.copies.values() {
        let distinct: BTreeSet<&Option<Version>> = copies.values().collect();
        if distinct.len() < 2 {
            continue;
        }
        let tombstones: BTreeSet<i64> = distinct
            .iter()
            .filter_map(|v| v.as_ref())
            .filter(|v| v.value.is_none())
            .map(|v| v.revision)
            .collect();
        let only_purge = distinct
            .iter()
            .all(|v| v.as_ref().is_none_or(|v| v.value.is_none()))
            && tombstones.len() == 1;
        if only_purge {
            purging += 1;
        } else {
            other += 1;
        }
    }
    (purging, other)
}

fn counts(ops: &[Op], summary: &mut Summary) {
    summary.ops = ops.len();
    summary.acknowledged = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Written { .. }))
        .count();
    summary.reads = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Read { .. }))
        .count();
    summary.indeterminate = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Indeterminate { .. }))
        .count();
}

fn write_files(out: &Path, ops: &[Op], t0: i64, summary: &Summary) -> Result<()> {
    let mut history = String::new();
    for op in ops {
        let _ = writeln!(history, "{} {}", op.entity, op.describe(t0));
    }
    std::fs::write(out.join("history.txt"), history).context("writing history.txt")?;
    std::fs::write(out.join("timeline.txt"), summary.timeline.join("\n") + "\n")
        .context("writing timeline.txt")?;
    Ok(())
}

fn report(
    settings: &Settings,
    cluster: &Cluster,
    ops: &[Op],
    t0: i64,
    summary: &Summary,
) -> String {
    let counted = summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "nemesis: seed {} | {} nodes | {} s | faults {}",
        settings.seed,
        settings.nodes,
        settings.seconds,
        settings
            .faults
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = writeln!(
        out,
        "operations {} | acknowledged writes {} | reads answered {} | indeterminate {}",
        counted.ops, counted.acknowledged, counted.reads, counted.indeterminate
    );
    let injected: Vec<String> = summary
        .faults
        .iter()
        .map(|(kind, n)| format!("{kind} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "faults injected {} ({})",
        summary.faults.values().sum::<usize>(),
        injected.join(", ")
    );
    let _ = writeln!(
        out,
        "explicit repair rounds started during the run {}",
        summary.explicit_rounds
    );
    for skipped in &summary.skipped {
        let _ = writeln!(out, "skipped {skipped}");
    }
    let peaks: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("{} {} MiB", n.id, n.peak_rss_kb / 1024))
        .collect();
    let _ = writeln!(out, "peak resident memory: {}", peaks.join(", "));
    let _ = writeln!(
        out,
        "anomalies {} | other problems {}",
        summary.anomalies.len(),
        summary.problems.len()
    );
    if summary.passed() {
        let _ = writeln!(
            out,
            "PASSED; logs and history in {}",
            settings.out.display()
        );
        return out;
    }
    let _ = writeln!(
        out,
        "\nFAILED with seed {} (rerun: --seed {})",
        settings.seed, settings.seed
    );
    let _ = writeln!(out, "\nfault timeline:");
    for line in &summary.timeline {
        let _ = writeln!(out, "  {line}");
    }
    for problem in &summary.problems {
        let _ = writeln!(out, "\nproblem: {problem}");
    }
    let mut shown = BTreeSet::new();
    for anomaly in &summary.anomalies {
        let _ = writeln!(out, "\nanomaly ({}): {anomaly}", anomaly.kind());
        if let Some(entity) = anomaly.entity() {
            if shown.insert(entity.to_owned()) {
                let _ = writeln!(out, "  history of {entity}:");
                for op in checker::entity_history(ops, entity) {
                    let _ = writeln!(out, "    {}", op.describe(t0));
                }
            } else {
                let _ = writeln!(out, "  (history of {entity} above)");
            }
        }
    }
    let _ = writeln!(
        out,
        "\nnode logs, configs, data, history.txt and timeline.txt are in {}",
        settings.out.display()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nemesis::proxy::Proxy;

    fn links(n: usize) -> Vec<(Link, std::net::SocketAddr)> {
        let target: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut out = Vec::new();
        for to in 0..n {
            out.push((
                Link {
                    from: Endpoint::Client,
                    to,
                },
                target,
            ));
            for from in (0..n).filter(|&f| f != to) {
                out.push((
                    Link {
                        from: Endpoint::Node(from),
                        to,
                    },
                    target,
                ));
            }
        }
        out
    }

    fn node(from: usize, to: usize) -> Link {
        Link {
            from: Endpoint::Node(from),
            to,
        }
    }

    #[tokio::test]
    async fn blocking_one_way_holds_its_requests_and_the_answers_to_the_other_way() {
        let proxy = Proxy::start(links(3), 1).await.unwrap();
        block(&proxy, 0, 1, Style::Blackhole);
        assert!(proxy.rules(node(0, 1)).hold_requests);
        assert!(!proxy.rules(node(0, 1)).hold_responses);
        assert!(proxy.rules(node(1, 0)).hold_responses);
        assert!(!proxy.rules(node(1, 0)).hold_requests);
        for link in [node(0, 2), node(2, 0), node(1, 2), node(2, 1)] {
            assert_eq!(proxy.rules(link), Rules::default(), "{link:?}");
        }
        proxy.heal_all();
        block(&proxy, 2, 0, Style::Reject);
        assert!(proxy.rules(node(2, 0)).refuse);
        assert!(proxy.rules(node(0, 2)).hold_responses);
        assert_eq!(
            proxy.rules(Link {
                from: Endpoint::Client,
                to: 0
            }),
            Rules::default()
        );
    }

    #[tokio::test]
    async fn a_node_s_links_are_those_to_it_and_from_it_clients_included() {
        let proxy = Proxy::start(links(3), 1).await.unwrap();
        let mut found = touching(proxy.links(), 1);
        found.sort();
        let mut expected = vec![
            Link {
                from: Endpoint::Client,
                to: 1,
            },
            node(0, 1),
            node(2, 1),
            node(1, 0),
            node(1, 2),
        ];
        expected.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn differing_copies_are_told_apart_from_purge_lag() {
        let tomb = |revision| {
            Some(Version {
                revision,
                value: None,
            })
        };
        let live = Some(Version {
            revision: 5,
            value: Some("c1-1".to_owned()),
        });
        let entity = |copies: Vec<Option<Version>>| -> BTreeMap<String, Option<Version>> {
            copies
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("n{}", i + 1), v))
                .collect()
        };
        let mut state = FinalState::default();
        state
            .copies
            .insert("a".to_owned(), entity(vec![tomb(7), None, tomb(7)]));
        state
            .copies
            .insert("b".to_owned(), entity(vec![live.clone(), None, None]));
        state
            .copies
            .insert("c".to_owned(), entity(vec![tomb(7), tomb(8), None]));
        state.copies.insert(
            "d".to_owned(),
            entity(vec![live.clone(), live.clone(), live]),
        );
        assert_eq!(differing_entities(&state), (1, 2));
    }
}
