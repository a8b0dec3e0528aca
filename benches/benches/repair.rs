//! Benches of `propd-repair`, each printing its comparison from the same run (DESIGN §10):
//!
//! - bytes on the wire and round trips to repair d in {1, 10, 1000, 10000} differences among n
//!   properties (`PROPD_BENCH_REPAIR_N`, default 1 000 000) with the default shape at protocol
//!   versions 3 and 2 and the reference's shape (no bucket levels), against the ideal (the
//!   differing records alone) and against the `negentropy` 0.5.3 crate on the same data
//!   (`PROPD_BENCH_NEGENTROPY=0` skips it; `PROPD_BENCH_BANDWIDTH_SHAPES` and
//!   `PROPD_BENCH_BANDWIDTH_D` narrow the shapes and the d's, then the in-sync check). The protocol
//!   runs in memory through `propd_repair::pair`, over a bench store whose tree is a merkle
//!   `LiveTree` and whose properties are generated on demand; the byte counts are the encoded
//!   protobuf sizes of every message, exactly what the tonic driver sends (without the 5-byte
//!   gRPC frame header per message);
//! - repair throughput: 100 000 properties of 2 KB (`PROPD_BENCH_REPAIR_THROUGHPUT_N`) synced
//!   over loopback tonic into an empty redb store, against a local bulk load of the same data
//!   into an empty redb store (both with synced commits, the node's default);
//! - fill (`fill`, criterion groups `fill_2kb` and `fill_small`): an empty replica filled by one
//!   sync over loopback tonic from a full one, the empty side as the client (the bulk path: the
//!   server streams every property, no fingerprint list), against a local key-order bulk load of
//!   the same data into an empty store in the same criterion run, with the process's peak RSS
//!   above its RSS before the sync (both nodes live in this process). `PROPD_BENCH_FILL_N` small
//!   properties (default 1 000 000, ~200 B) and `PROPD_BENCH_FILL_BIG_N` properties of ~2 KB
//!   (default 100 000); 0 skips a size;
//! - restore (`restore`): one replica of a `PROPD_BENCH_RESTORE_N`-property shard (default
//!   10 000 000, ~200 B) wiped and restored by one sync with the node's default timeouts, timed
//!   once with its peak RSS (no comparison: a local load of that size would double the run).

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured"
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use propd_benches::loopback::{self, serve_repair, timed_sync};
use propd_benches::properties::{big_property, property};
use propd_merkle::{
    Entity, InnerNode, Leaf, LiveTree, MemStorage, NodeId, Property, Shape, TagValue, TreeStorage,
    version_order,
};
use propd_repair::Config;
use propd_repair::pair::sync_in_memory;
use propd_store::{LeafKey, RedbStore, RepairOutcome, RepairStore, WriteDurability};

const GROUP: &str = loopback::GROUP;

/// A store of `n` generated properties (`property(i)`), with per-entity overrides; its tree is
/// a `LiveTree` over `MemStorage`, cheap to clone.
#[derive(Clone)]
struct BenchStore {
    shape: Shape,
    tree: Arc<Mutex<LiveTree<MemStorage>>>,
    overrides: Arc<Mutex<HashMap<Entity, Option<Property>>>>,
}

fn index_of(entity: &Entity) -> Option<u64> {
    entity.id().strip_prefix("id-")?.parse().ok()
}

impl BenchStore {
    fn build(shape: Shape, n: u64) -> Self {
        let mut tree = LiveTree::new(shape, MemStorage::new()).expect("shape");
        for i in 0..n {
            let p = property(i);
            let entity = p.entity().expect("entity");
            tree.upsert(&entity, p.leaf_digest(&shape)).expect("upsert");
        }
        tree.flush().expect("flush");
        BenchStore {
            shape,
            tree: Arc::new(Mutex::new(tree)),
            overrides: Arc::default(),
        }
    }

    fn deep_clone(&self) -> Self {
        let tree = self.tree.lock().expect("lock").clone();
        BenchStore {
            shape: self.shape,
            tree: Arc::new(Mutex::new(tree)),
            overrides: Arc::default(),
        }
    }

    fn set(&self, entity: &Entity, property: Option<Property>) {
        let mut tree = self.tree.lock().expect("lock");
        match &property {
            Some(p) => {
                tree.upsert(entity, p.leaf_digest(&self.shape))
                    .expect("upsert");
            }
            None => {
                tree.remove(entity).expect("remove");
            }
        }
        self.overrides
            .lock()
            .expect("lock")
            .insert(entity.clone(), property);
    }

    fn current(&self, entity: &Entity) -> Option<Property> {
        if let Some(over) = self.overrides.lock().expect("lock").get(entity) {
            return over.clone();
        }
        index_of(entity).map(property)
    }

    fn root(&self) -> InnerNode {
        let mut tree = self.tree.lock().expect("lock");
        tree.flush().expect("flush");
        tree.root().expect("root")
    }
}

impl RepairStore for BenchStore {
    type Error = Infallible;

    fn shape(&self) -> Shape {
        self.shape
    }

    fn has_shard(&self, group: &str, shard: u32) -> bool {
        group == GROUP && shard == 0
    }

    fn tree_node(&self, _: &str, _: u32, node: NodeId) -> Result<Option<InnerNode>, Infallible> {
        let mut tree = self.tree.lock().expect("lock");
        tree.flush().expect("flush");
        let inner = tree.node(node).expect("node");
        Ok((inner.leaf_count > 0).then_some(inner))
    }

    fn tree_children(
        &self,
        _: &str,
        _: u32,
        node: NodeId,
    ) -> Result<Vec<(NodeId, InnerNode)>, Infallible> {
        let mut tree = self.tree.lock().expect("lock");
        tree.flush().expect("flush");
        Ok(tree.children(node).expect("children"))
    }

    fn leaves_under(
        &self,
        _: &str,
        _: u32,
        node: NodeId,
        after: Option<&LeafKey>,
        limit: usize,
    ) -> Result<Vec<Leaf>, Infallible> {
        let tree = self.tree.lock().expect("lock");
        let mut out = Vec::new();
        let start = match after {
            Some(key) => key.bucket,
            None => self.shape.bucket_range(node).start,
        };
        let range = start..self.shape.bucket_range(node).end;
        tree.storage()
            .visit_leaves(range, &mut |bucket, entity, digest| {
                if out.len() >= limit {
                    return;
                }
                if let Some(key) = after
                    && (bucket, entity) <= (key.bucket, &key.entity)
                {
                    return;
                }
                out.push(Leaf {
                    bucket,
                    entity: entity.clone(),
                    digest,
                });
            })
            .expect("visit");
        Ok(out)
    }

    /// Sorts every entity of the tree on each call: correct, slow, and only reached when a
    /// bench store is an empty client (the bandwidth bench never syncs one).
    fn properties_after(
        &self,
        _: &str,
        _: u32,
        after: Option<&Entity>,
        limit: usize,
    ) -> Result<Vec<Property>, Infallible> {
        let tree = self.tree.lock().expect("lock");
        let mut entities = Vec::new();
        tree.storage()
            .visit_leaves(
                self.shape.bucket_range(NodeId::ROOT),
                &mut |_, entity, _| {
                    if after.is_none_or(|after| entity > after) {
                        entities.push(entity.clone());
                    }
                },
            )
            .expect("visit");
        drop(tree);
        entities.sort();
        Ok(entities
            .iter()
            .filter_map(|entity| self.current(entity))
            .take(limit)
            .collect())
    }

    fn get_many(
        &self,
        _: &str,
        _: u32,
        entities: &[Entity],
    ) -> Result<Vec<Option<Property>>, Infallible> {
        Ok(entities.iter().map(|e| self.current(e)).collect())
    }

    fn repair_apply_batch(
        &self,
        _: &str,
        _: u32,
        batch: Vec<Property>,
    ) -> Result<Vec<RepairOutcome>, Infallible> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for incoming in batch {
            let entity = incoming.entity().expect("entity");
            let outcome = match self.current(&entity) {
                None => RepairOutcome::Applied,
                Some(ours) => match version_order(&incoming, &ours, &self.shape) {
                    std::cmp::Ordering::Greater => RepairOutcome::Applied,
                    std::cmp::Ordering::Equal => RepairOutcome::Same,
                    std::cmp::Ordering::Less => RepairOutcome::LocalNewer(ours),
                },
            };
            if outcome == RepairOutcome::Applied {
                self.set(&entity, Some(incoming));
            }
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }
}

fn newer(i: u64) -> Property {
    let mut p = property(i);
    p.mod_revision += 1;
    p.tags
        .insert("service".into(), TagValue::Str("changed".into()));
    p
}

/// Makes `d` differences spread over the `n` entities, in four kinds by turn: the client's copy
/// newer, the server's newer, only on the client, only on the server. Returns the ideal bytes:
/// the encoded size of the one record that must move per difference.
fn diverge(a: &BenchStore, b: &BenchStore, n: u64, d: u64) -> u64 {
    use prost::Message;
    let mut ideal = 0u64;
    for k in 0..d {
        let i = k * (n / d) + (k % 7);
        let entity = property(i).entity().expect("entity");
        let moved = match k % 4 {
            0 => {
                a.set(&entity, Some(newer(i)));
                newer(i)
            }
            1 => {
                b.set(&entity, Some(newer(i)));
                newer(i)
            }
            2 => {
                b.set(&entity, None);
                property(i)
            }
            _ => {
                a.set(&entity, None);
                property(i)
            }
        };
        ideal += propd_repair::property_to_proto(&moved).encoded_len() as u64;
    }
    ideal
}

/// The versions of one side as negentropy items: each (entity, version) is one 32-byte id, the
/// SHA-256 of its leaf digest (a different version is a different id, as in our leaf lists).
fn negentropy_ids(store: &BenchStore, n: u64) -> negentropy::NegentropyStorageVector {
    use sha2::Digest as _;
    let shape = store.shape;
    let mut storage = negentropy::NegentropyStorageVector::with_capacity(n as usize + 16);
    let mut add = |p: &Property| {
        let digest = p.leaf_digest(&shape);
        let id: [u8; 32] = sha2::Sha256::digest(digest.as_bytes()).into();
        storage
            .insert(0, negentropy::Id::from_byte_array(id))
            .expect("insert");
    };
    let overrides = store.overrides.lock().expect("lock").clone();
    for i in 0..n {
        let entity = property(i).entity().expect("entity");
        if !overrides.contains_key(&entity) {
            add(&property(i));
        }
    }
    for p in overrides.values().flatten() {
        add(p);
    }
    storage.seal().expect("seal");
    storage
}

/// One negentropy reconciliation between the two sides (the client initiates; no frame
/// limit): round trips, bytes both ways, and the ids found on one side only.
fn negentropy_sync(a: &BenchStore, b: &BenchStore, n: u64) -> (u32, u64, usize) {
    let mut client =
        negentropy::Negentropy::owned(negentropy_ids(a, n), 0).expect("negentropy client");
    let mut server =
        negentropy::Negentropy::owned(negentropy_ids(b, n), 0).expect("negentropy server");
    let mut query = client.initiate().expect("initiate");
    let (mut have, mut need) = (Vec::new(), Vec::new());
    let mut round_trips = 0;
    let mut bytes = 0u64;
    loop {
        let answer = server.reconcile(&query).expect("server reconcile");
        round_trips += 1;
        bytes += (query.len() + answer.len()) as u64;
        match client
            .reconcile_with_ids(&answer, &mut have, &mut need)
            .expect("client reconcile")
        {
            Some(next) => query = next,
            None => break,
        }
    }
    (round_trips, bytes, have.len() + need.len())
}

fn bandwidth(n: u64) {
    println!(
        "\nrepair bandwidth: n = {n} properties (~200 B each), bytes = encoded protobuf sizes, both ways"
    );
    println!(
        "{:<10} {:>6} {:>4} {:>4} {:>12} {:>12} {:>12} {:>12} {:>14} {:>16}",
        "shape",
        "d",
        "v",
        "RT",
        "total B",
        "ideal B",
        "records B",
        "tree B",
        "tree B / diff",
        "beyond ideal/diff"
    );
    // For `cargo xtask bench-report`: one row per (shape, d), at the current protocol.
    let mut rows = Vec::new();
    let negentropy_wanted = std::env::var("PROPD_BENCH_NEGENTROPY").map_or(true, |v| v != "0");
    let mut negentropy_rows = Vec::new();
    // `PROPD_BENCH_BANDWIDTH_SHAPES` and `PROPD_BENCH_BANDWIDTH_D` narrow a run (comma lists;
    // every shape and d by default): at n = 10 M each shape's tree takes minutes to build.
    let listed = |key: &str, all: &str| -> String { std::env::var(key).unwrap_or(all.to_owned()) };
    let shapes = listed("PROPD_BENCH_BANDWIDTH_SHAPES", "default,reference");
    let ds: Vec<u64> = listed("PROPD_BENCH_BANDWIDTH_D", "1,10,1000,10000")
        .split(',')
        .map(|d| {
            d.trim()
                .parse()
                .expect("PROPD_BENCH_BANDWIDTH_D: a comma list of numbers")
        })
        .collect();
    let mut default_base = None;
    for (label, shape) in [
        ("default", Shape::default()),
        ("reference", Shape::reference()),
    ] {
        if !shapes.split(',').any(|s| s.trim() == label) {
            continue;
        }
        let started = Instant::now();
        let base = BenchStore::build(shape, n);
        let built = started.elapsed();
        for &d in &ds {
            // The current protocol (3) and the one before it (2), on the same data.
            for version in [3, 2] {
                if label == "reference" && version == 2 {
                    continue;
                }
                let (a, b) = (base.deep_clone(), base.deep_clone());
                let ideal = diverge(&a, &b, n, d);
                if label == "default" && version == 3 && negentropy_wanted {
                    let (rt, bytes, ids) = negentropy_sync(&a, &b, n);
                    negentropy_rows.push((d, rt, bytes, ids));
                }
                let config = Config {
                    protocol_version: version,
                    ..Config::default()
                };
                let (report, _) = sync_in_memory(&a, &b, GROUP, 0, config).expect("sync");
                assert_eq!(a.root(), b.root(), "the sync must converge");
                assert_eq!(report.protocol_version, version);
                let total = report.bytes_sent + report.bytes_received;
                println!(
                    "{:<10} {:>6} {:>4} {:>4} {:>12} {:>12} {:>12} {:>12} {:>14.1} {:>16.1}",
                    label,
                    d,
                    version,
                    report.round_trips,
                    total,
                    ideal,
                    report.record_bytes,
                    report.tree_bytes(),
                    report.tree_bytes() as f64 / d as f64,
                    total.saturating_sub(ideal) as f64 / d as f64,
                );
                if version == 3 {
                    rows.push(format!(
                        "{{\"shape\":\"{label}\",\"n\":{n},\"d\":{d},\"total\":{total},\"ideal\":{ideal},\"tree\":{},\"round_trips\":{}}}",
                        report.tree_bytes(),
                        report.round_trips
                    ));
                }
            }
        }
        println!("  ({label}: building the {n}-leaf tree took {built:.1?})");
        if label == "default" {
            default_base = Some(base);
        }
    }
    propd_benches::results::record("repair_bandwidth", &format!("[{}]", rows.join(",")));
    // negentropy 0.5.3 on the same data (the default rows' divergence): 32-byte ids, no frame
    // limit. Its round trips find the ids; moving the records would take one more.
    println!("negentropy 0.5.3, same data:");
    println!(
        "{:>6} {:>4} {:>12} {:>14} {:>10}",
        "d", "RT", "bytes", "bytes / diff", "ids found"
    );
    for (d, rt, bytes, ids) in negentropy_rows {
        println!(
            "{:>6} {:>4} {:>12} {:>14.1} {:>10}",
            d,
            rt,
            bytes,
            bytes as f64 / d as f64,
            ids
        );
    }
    // The in-sync check: one round trip, at each version.
    let base = default_base.unwrap_or_else(|| BenchStore::build(Shape::default(), n));
    for version in [3, 2] {
        let config = Config {
            protocol_version: version,
            ..Config::default()
        };
        let (report, _) =
            sync_in_memory(&base.deep_clone(), &base, GROUP, 0, config).expect("sync");
        println!(
            "in sync (v{version}): {} bytes both ways, {} round trip(s), in_sync = {}",
            report.bytes_sent + report.bytes_received,
            report.round_trips,
            report.in_sync
        );
    }
}

fn open(dir: &tempfile::TempDir) -> RedbStore {
    loopback::open(dir.path(), WriteDurability::Immediate)
}

/// Loads `n` large properties in key order, 1024 per synced transaction, then flushes.
fn bulk_load(store: &RedbStore, n: u64) {
    loopback::bulk_load(store, n, 1024, big_property);
}

/// The same load as [`bulk_load`], in the order a sync delivers it: by tree position.
fn bulk_load_tree_order(store: &RedbStore, n: u64, batch: usize) {
    let shape = Shape::default();
    let mut order: Vec<(u64, u64)> = (0..n)
        .map(|i| {
            (
                shape
                    .bucket_of(&property(i).entity().expect("entity"))
                    .index,
                i,
            )
        })
        .collect();
    order.sort_unstable();
    for chunk in order.chunks(batch) {
        let batch = chunk.iter().map(|&(_, i)| big_property(i)).collect();
        store.repair_apply_batch(GROUP, 0, batch).expect("load");
    }
    store.flush(GROUP, 0).expect("flush");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn throughput(n: u64) {
    let runtime = runtime();
    let source_dir = tempfile::tempdir().expect("dir");
    let source = open(&source_dir);
    bulk_load(&source, n);
    let mut local = Vec::new();
    let mut remote = Vec::new();
    let mut in_memory = Vec::new();
    let mut tree_order = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().expect("dir");
        let empty = open(&dir);
        let started = Instant::now();
        bulk_load_tree_order(&empty, n, 1024);
        tree_order.push(started.elapsed());

        let dir = tempfile::tempdir().expect("dir");
        let empty = open(&dir);
        let started = Instant::now();
        let (report, _) =
            sync_in_memory(&source, &empty, GROUP, 0, Config::default()).expect("sync");
        in_memory.push(started.elapsed());
        assert_eq!(report.peer_applied, n);

        let dir = tempfile::tempdir().expect("dir");
        let empty = open(&dir);
        let started = Instant::now();
        bulk_load(&empty, n);
        local.push(started.elapsed());

        let dir = tempfile::tempdir().expect("dir");
        let target = Arc::new(open(&dir));
        let elapsed = runtime.block_on(async {
            let served = serve_repair(Arc::clone(&target), None).await;
            let (elapsed, report) = timed_sync(&served, &source).await;
            assert_eq!(report.peer_applied, n);
            elapsed
        });
        remote.push(elapsed);
        let root = |s: &RedbStore| s.tree_node(GROUP, 0, NodeId::ROOT).expect("root");
        assert_eq!(root(&source), root(&target), "the copy must be complete");
    }
    local.sort();
    remote.sort();
    in_memory.sort();
    tree_order.sort();
    let (l, r) = (local[1], remote[1]);
    println!(
        "\nrepair throughput: the same sync through the in-memory pair (no network): {:.2?}; \
         local bulk load in tree order (the order a sync delivers): {:.2?}",
        in_memory[1], tree_order[1]
    );
    println!(
        "\nrepair throughput: {n} properties of ~2 KB into an empty redb store (median of 3)\n  local bulk load: {l:.2?}   sync over loopback tonic: {r:.2?}   ratio {:.2}x   goal: <= 2x and <= 5 s",
        r.as_secs_f64() / l.as_secs_f64()
    );
    propd_benches::results::record(
        &format!("bootstrap_n{n}"),
        &format!(
            "{{\"n\":{n},\"local_bulk_load_s\":{},\"sync_s\":{}}}",
            l.as_secs_f64(),
            r.as_secs_f64()
        ),
    );
}

/// A line of `/proc/self/status` in kB (`VmRSS`, `VmHWM`), 0 where unavailable.
fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                let rest = line.strip_prefix(key)?.strip_prefix(':')?;
                rest.trim().trim_end_matches("kB").trim().parse().ok()
            })
        })
        .unwrap_or(0)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (Linux `clear_refs`, value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One fill: an empty store, as the client, synced over loopback from `source` served by a
/// `RepairServer` (default transport config: the node's 10-minute idle timeout). Returns the
/// time, the peak RSS above the RSS before (kB) and the report.
fn fill_once(
    runtime: &tokio::runtime::Runtime,
    source: &Arc<RedbStore>,
) -> (Duration, u64, propd_repair::SyncReport) {
    let dir = tempfile::tempdir().expect("dir");
    let empty = open(&dir);
    runtime.block_on(async {
        let served = serve_repair(Arc::clone(source), None).await;
        let idle = status_kb("VmRSS");
        reset_peak_rss();
        let (elapsed, report) = timed_sync(&served, &empty).await;
        let peak = status_kb("VmHWM").saturating_sub(idle);
        let root = |s: &RedbStore| s.tree_node(GROUP, 0, NodeId::ROOT).expect("root");
        assert_eq!(root(source), root(&empty), "the copy must be complete");
        (elapsed, peak, report)
    })
}

/// The untimed source of a fill: `n` properties `make(i)` loaded without syncs.
fn fill_source(
    label: &str,
    n: u64,
    make: fn(u64) -> Property,
) -> (tempfile::TempDir, Arc<RedbStore>) {
    let dir = tempfile::tempdir().expect("dir");
    let source = Arc::new(loopback::open(dir.path(), WriteDurability::NotSynced));
    let started = Instant::now();
    loopback::bulk_load(&source, n, 16_384, make);
    println!(
        "\nfill {label}: loading the {n}-property source (unsynced, untimed) took {:.2?}",
        started.elapsed()
    );
    (dir, source)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Criterion group `fill_{label}`: an empty replica filled over loopback from a source of `n`
/// properties `make(i)` (`sync_into_empty_client`) against a local key-order bulk load of the
/// same data into an empty store (`local_key_order_load`), ten samples of one run each (each
/// run into a fresh store, only the load or the sync timed). Prints the medians of the same
/// runs, their ratio and the sync's peak RSS above its start.
fn fill(c: &mut Criterion, label: &str, n: u64, make: fn(u64) -> Property) {
    if n == 0 {
        return;
    }
    let runtime = runtime();
    let (_source_dir, source) = fill_source(label, n, make);
    let local = RefCell::new(Vec::new());
    let synced = RefCell::new(Vec::new());
    let peaks = RefCell::new(Vec::new());
    let mut group = c.benchmark_group(format!("fill_{label}"));
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(n));
    group.bench_function("local_key_order_load", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let dir = tempfile::tempdir().expect("dir");
                let empty = open(&dir);
                let started = Instant::now();
                loopback::bulk_load(&empty, n, 1024, make);
                let elapsed = started.elapsed();
                local.borrow_mut().push(elapsed);
                total += elapsed;
            }
            total
        });
    });
    group.bench_function("sync_into_empty_client", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let (elapsed, peak, report) = fill_once(&runtime, &source);
                assert_eq!(report.applied, n);
                assert_eq!(report.streamed, n, "every property on the bulk path");
                synced.borrow_mut().push(elapsed);
                peaks.borrow_mut().push(peak);
                total += elapsed;
            }
            total
        });
    });
    group.finish();
    let (l, r) = (median(local.take()), median(synced.take()));
    let runs = peaks.borrow().len();
    println!(
        "fill {label}: {n} properties into an empty replica (median of the {runs} runs criterion \
         made of each side, warm-up included)\n  local key-order bulk load: {l:.2?}   sync over \
         loopback (bulk path): {r:.2?}   ratio {:.2}x   peak RSS above the start of a sync, \
         both nodes: at most {} MB",
        r.as_secs_f64() / l.as_secs_f64(),
        peaks.borrow().iter().max().copied().unwrap_or(0) / 1024,
    );
}

/// One replica of a `n`-property shard wiped and restored by one sync (the one hop of a round
/// that fills it), with the node's default transport config (10-minute idle timeout): timed
/// once, alone (a local load of this size to compare with would double a long run).
fn restore(n: u64) {
    if n == 0 {
        return;
    }
    let runtime = runtime();
    let (_source_dir, source) = fill_source("restore", n, property);
    let (elapsed, peak, report) = fill_once(&runtime, &source);
    assert_eq!(report.applied, n);
    println!(
        "restore: {n} properties (~200 B) into a wiped replica in one sync: {elapsed:.2?} \
         ({:.0} properties/s), streamed {}, fingerprints {}, round trips {}, protocol v{}, \
         {} bytes received; peak RSS above the start of the sync, both nodes: {} MB",
        n as f64 / elapsed.as_secs_f64(),
        report.streamed,
        report.levels.iter().map(|l| l.fingerprints).sum::<u64>(),
        report.round_trips,
        report.protocol_version,
        report.bytes_received,
        peak / 1024,
    );
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects one part.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |part: &str| filter.is_empty() || filter.iter().any(|f| part.contains(f.as_str()));
    if wants("bandwidth") {
        bandwidth(env("PROPD_BENCH_REPAIR_N", 1_000_000));
    }
    if wants("batching") {
        let n = env("PROPD_BENCH_REPAIR_THROUGHPUT_N", 100_000);
        for batch in [1024, 4096, 16_384] {
            let dir = tempfile::tempdir().expect("dir");
            let empty = open(&dir);
            let started = Instant::now();
            bulk_load_tree_order(&empty, n, batch);
            println!(
                "bulk load of {n} properties of ~2 KB in tree order, batches of {batch}: {:.2?}",
                started.elapsed()
            );
        }
    }
    if wants("fill") {
        // Criterion reads the same arguments (its filter selects within `fill_*`).
        let mut c = Criterion::default().configure_from_args();
        fill(
            &mut c,
            "2kb",
            env("PROPD_BENCH_FILL_BIG_N", 100_000),
            big_property,
        );
        fill(
            &mut c,
            "small",
            env("PROPD_BENCH_FILL_N", 1_000_000),
            property,
        );
        c.final_summary();
    }
    if wants("restore") {
        restore(env("PROPD_BENCH_RESTORE_N", 10_000_000));
    }
    if wants("throughput") {
        throughput(env("PROPD_BENCH_REPAIR_THROUGHPUT_N", 100_000));
    }
}
