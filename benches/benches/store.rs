//! Criterion benches of `propd-store`, each claim measured against its comparison in the same
//! run (DESIGN §10):
//!
//! - write throughput with the live tree against the same writes with tree upkeep switched off
//!   (`TreeUpkeep::OffForBenchmarksOnly`), for synced single writes (a client's acknowledged
//!   write) and synced batches of 1000 (the repair path); goal: live >= 90% of off;
//! - a full rebuild of one shard's tree from a snapshot scan against a bare redb scan + SHA-512
//!   of the same rows; goal: within 1.5x. The shard holds `PROPD_BENCH_STORE_N` properties
//!   (default 1 000 000);
//! - point reads (`get`) and shard scans with every row checked against its check digest against
//!   the same reads with the check off (`ReadCheck::OffForBenchmarksOnly`); goal: the check costs
//!   at most 10%. Both sides read the same `READ_N` properties, each in its own store;
//! - acknowledged writes per second and p50/p99 latency with 1, 8, 50 and 200 concurrent
//!   writers, group commit against one sync per write (`StoreConfig::group_commit` off); goal:
//!   with 50 writers at least 10x the throughput, p99 no worse; one writer no slower.
//!
//! Each claim prints its ratio from interleaved timed rounds (the median of each side) beside
//! criterion's figures.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured beside criterion's output"
)]

use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use propd_benches::acks;
use propd_benches::properties::property;
use propd_merkle::Entity;
use propd_merkle::{Property, Shape};
use propd_store::{
    GroupDef, Groups, ReadCheck, RedbStore, StoreConfig, TreeUpkeep, WriteDurability,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest as _, Sha512};

const GROUP: &str = "bench";
/// Properties already in the store before the write benches start.
const PRELOAD: u64 = 20_000;

fn rebuild_n() -> u64 {
    std::env::var("PROPD_BENCH_STORE_N")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000)
}

fn config(dir: &Path, upkeep: TreeUpkeep, durability: WriteDurability) -> StoreConfig {
    let groups = Groups::new([GroupDef::new(GROUP, 1, 2)]).expect("valid groups");
    let mut config = StoreConfig::new(dir, groups, Shape::default());
    config.tree_upkeep = upkeep;
    config.durability = durability;
    if let Some(threshold) = std::env::var("PROPD_BENCH_FLUSH_THRESHOLD")
        .ok()
        .and_then(|text| text.parse().ok())
    {
        config.flush_threshold = threshold;
    }
    config
}

fn load(store: &RedbStore, range: std::ops::Range<u64>, batch: u64) {
    let mut next = range.start;
    while next < range.end {
        let end = (next + batch).min(range.end);
        let copies: Vec<Property> = (next..end).map(property).collect();
        store
            .repair_apply_batch(GROUP, 0, copies)
            .expect("valid batch");
        next = end;
    }
}

/// A store for the write benches: `PRELOAD` properties in, writes continue after them.
struct Writer {
    store: RedbStore,
    next: u64,
    _dir: tempfile::TempDir,
}

impl Writer {
    fn new(upkeep: TreeUpkeep) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store =
            RedbStore::open(config(dir.path(), upkeep, WriteDurability::Immediate)).expect("open");
        load(&store, 0..PRELOAD, 5_000);
        Writer {
            store,
            next: PRELOAD,
            _dir: dir,
        }
    }

    /// Writes `batch` new properties: one synced `apply` when `batch` is 1, else one synced
    /// batch.
    fn write(&mut self, batch: u64) {
        if batch == 1 {
            self.store.apply(property(self.next)).expect("apply");
        } else {
            load(&self.store, self.next..self.next + batch, batch);
        }
        self.next += batch;
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn writes(c: &mut Criterion) {
    let scenarios = [
        ("apply_synced", 1u64, 200u64),
        ("batch1000_synced", 1000, 20),
    ];
    let upkeeps = [
        ("live_tree", TreeUpkeep::Live),
        ("no_tree", TreeUpkeep::OffForBenchmarksOnly),
    ];
    let mut group = c.benchmark_group("store_write");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (scenario, batch, _) in scenarios {
        for (label, upkeep) in upkeeps {
            let mut writer: Option<Writer> = None;
            group.bench_function(format!("{scenario}/{label}"), |b| {
                let writer = writer.get_or_insert_with(|| Writer::new(upkeep));
                b.iter(|| writer.write(batch))
            });
        }
    }
    group.finish();

    // The claim: interleaved rounds, each writing the same number of properties per setting and
    // then making the tree current (a flush: a no-op without upkeep), so that the tree's whole
    // cost is in the figure; the writes alone are printed too.
    for (scenario, batch, calls) in scenarios {
        let mut writers = [Writer::new(upkeeps[0].1), Writer::new(upkeeps[1].1)];
        let mut rates = [Vec::new(), Vec::new()];
        let mut write_only = [Vec::new(), Vec::new()];
        for _round in 0..5 {
            for (side, writer) in writers.iter_mut().enumerate() {
                let start = Instant::now();
                for _ in 0..calls {
                    writer.write(batch);
                }
                let written = start.elapsed().as_secs_f64();
                writer.store.flush(GROUP, 0).expect("flush");
                let seconds = start.elapsed().as_secs_f64();
                rates[side].push((batch * calls) as f64 / seconds);
                write_only[side].push((batch * calls) as f64 / written);
            }
        }
        let [live, off] = rates.map(median);
        let [live_writes, off_writes] = write_only.map(median);
        println!(
            "store_write/{scenario}: live tree {live:.0} properties/s, no tree {off:.0} properties/s, \
             ratio live/off = {:.1}% (goal >= 90%); writes alone before the round's flush: \
             {live_writes:.0} vs {off_writes:.0} properties/s = {:.1}%",
            100.0 * live / off,
            100.0 * live_writes / off_writes
        );
    }
}

/// The rebuild bench's data: `n` properties in shard 0 of one group, loaded once.
struct Loaded {
    dir: tempfile::TempDir,
    n: u64,
}

impl Loaded {
    fn new(n: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = Instant::now();
        {
            // Loaded without tree upkeep and without syncs: only the properties matter here.
            let store = RedbStore::open(config(
                dir.path(),
                TreeUpkeep::OffForBenchmarksOnly,
                WriteDurability::NotSynced,
            ))
            .expect("open");
            load(&store, 0..n, 20_000);
            // One synced commit makes everything durable before the store closes.
            store.record_complete_round(GROUP, 0, 1, 0).expect("sync");
        }
        println!(
            "store_rebuild: loaded {n} properties in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Loaded { dir, n }
    }

    fn store(&self) -> RedbStore {
        RedbStore::open(config(
            self.dir.path(),
            TreeUpkeep::Live,
            WriteDurability::Immediate,
        ))
        .expect("open")
    }

    fn raw(&self) -> redb::Database {
        redb::Database::open(self.dir.path().join(propd_store::DATABASE_FILE)).expect("open raw")
    }
}

fn rebuild_once(store: &RedbStore) -> u64 {
    let snapshot = store.snapshot().expect("snapshot");
    let tree = snapshot.rebuild_tree(GROUP, 0).expect("rebuild");
    black_box(tree.root());
    tree.leaf_count()
}

/// The comparison: a bare redb scan of the same table, SHA-512 of every row's key and value.
fn scan_hash_once(db: &redb::Database) -> u64 {
    let definition: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("props/bench/0");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(definition).expect("table");
    let mut rows = 0;
    for row in table.iter().expect("iter") {
        let (key, value) = row.expect("row");
        let mut hasher = Sha512::new();
        hasher.update(key.value().as_bytes());
        hasher.update(value.value());
        black_box(hasher.finalize());
        rows += 1;
    }
    rows
}

fn rebuild(c: &mut Criterion) {
    let n = rebuild_n();
    let mut loaded: Option<Loaded> = None;
    let mut group = c.benchmark_group("store_rebuild");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function(format!("{n}/rebuild_tree"), |b| {
        let loaded = loaded.get_or_insert_with(|| Loaded::new(n));
        let store = loaded.store();
        b.iter(|| rebuild_once(&store))
    });
    group.bench_function(format!("{n}/redb_scan_sha512"), |b| {
        let loaded = loaded.get_or_insert_with(|| Loaded::new(n));
        let db = loaded.raw();
        b.iter(|| scan_hash_once(&db))
    });
    group.finish();

    let loaded = loaded.get_or_insert_with(|| Loaded::new(n));
    let mut times = [Vec::new(), Vec::new()];
    for _round in 0..3 {
        let store = loaded.store();
        let start = Instant::now();
        assert_eq!(rebuild_once(&store), loaded.n);
        times[0].push(start.elapsed().as_secs_f64());
        drop(store);
        let db = loaded.raw();
        let start = Instant::now();
        assert_eq!(scan_hash_once(&db), loaded.n);
        times[1].push(start.elapsed().as_secs_f64());
    }
    let [rebuild, scan] = times.map(median);
    println!(
        "store_rebuild/{n}: rebuild {rebuild:.2} s, bare scan + SHA-512 {scan:.2} s, \
         ratio = {:.2}x (goal <= 1.5x)",
        rebuild / scan
    );
}

/// A synced store for the concurrent write bench, group commit on or off, and the number of the
/// next property to write.
struct Concurrent {
    store: RedbStore,
    next: AtomicU64,
    _dir: tempfile::TempDir,
}

impl Concurrent {
    fn new(group_commit: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config(dir.path(), TreeUpkeep::Live, WriteDurability::Immediate);
        config.group_commit = group_commit;
        Concurrent {
            store: RedbStore::open(config).expect("open"),
            next: AtomicU64::new(0),
            _dir: dir,
        }
    }

    /// `writers` threads write new properties, one synced `apply` at a time, until `done` says
    /// so (given the writes this thread made); returns every write's latency and the time taken.
    fn run(&self, writers: usize, done: impl Fn(u64) -> bool + Sync) -> (Vec<Duration>, Duration) {
        let start = Instant::now();
        let latencies = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..writers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        while !done(mine.len() as u64) {
                            let i = self.next.fetch_add(1, Ordering::Relaxed);
                            let sent = Instant::now();
                            self.store.apply(property(i)).expect("apply");
                            mine.push(sent.elapsed());
                        }
                        mine
                    })
                })
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| thread.join().expect("a writer thread"))
                .collect::<Vec<_>>()
        });
        (latencies, start.elapsed())
    }
}

fn concurrent_writes(c: &mut Criterion) {
    let sides = [("group_commit", true), ("sync_per_write", false)];
    let mut group = c.benchmark_group("store_concurrent_write");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for writers in [1, 50] {
        for (label, group_commit) in sides {
            let mut store: Option<Concurrent> = None;
            group.bench_function(format!("{writers}_writers/{label}"), |b| {
                let store = store.get_or_insert_with(|| Concurrent::new(group_commit));
                // Time per acknowledged write: `iters` writes shared by the writers.
                b.iter_custom(|iters| {
                    acks::time_writes(iters, writers, |share| {
                        store.run(writers, |made| made >= share).1
                    })
                })
            });
        }
    }
    group.finish();

    for writers in acks::WRITERS {
        let stores = sides.map(|(_, group_commit)| Concurrent::new(group_commit));
        acks::claim("store_concurrent_write", writers, |side, deadline| {
            stores[side].run(writers, |_| Instant::now() >= deadline)
        });
    }
}

/// Properties in each store of the read benches.
const READ_N: u64 = 100_000;
/// Point reads per timed call.
const GETS: u64 = 1_000;

/// A store of `READ_N` properties opened with one read-check setting.
struct Reader {
    store: RedbStore,
    _dir: tempfile::TempDir,
}

impl Reader {
    fn new(check: ReadCheck) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = config(dir.path(), TreeUpkeep::Live, WriteDurability::NotSynced);
        config.read_check = check;
        let store = RedbStore::open(config).expect("open");
        load(&store, 0..READ_N, 20_000);
        store.flush(GROUP, 0).expect("flush");
        Reader { store, _dir: dir }
    }

    /// `GETS` point reads spread over the key space (a fixed stride, so both sides read the
    /// same entities).
    fn gets(&self, entities: &[Entity]) -> u64 {
        let mut found = 0;
        for entity in entities {
            found += u64::from(self.store.get(entity).expect("get").is_some());
        }
        found
    }

    /// One scan of the whole shard, every row decoded.
    fn scan(&self) -> u64 {
        let snapshot = self.store.snapshot().expect("snapshot");
        let mut rows = 0;
        for property in snapshot.scan(GROUP, 0).expect("scan") {
            black_box(property.expect("row"));
            rows += 1;
        }
        rows
    }
}

fn reads(c: &mut Criterion) {
    let entities: Vec<Entity> = (0..GETS)
        .map(|i| property(i * (READ_N / GETS) + 7).entity().expect("entity"))
        .collect();
    let sides = [
        ("checked", ReadCheck::On),
        ("unchecked", ReadCheck::OffForBenchmarksOnly),
    ];
    let readers = sides.map(|(_, check)| Reader::new(check));
    let mut group = c.benchmark_group("store_read");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for ((label, _), reader) in sides.iter().zip(&readers) {
        group.bench_function(format!("get_{GETS}/{label}"), |b| {
            b.iter(|| reader.gets(&entities))
        });
        group.bench_function(format!("scan_{READ_N}/{label}"), |b| {
            b.iter(|| reader.scan())
        });
    }
    group.finish();

    // The claim: interleaved rounds of both sides, the median of each.
    let mut get_times = [Vec::new(), Vec::new()];
    let mut scan_times = [Vec::new(), Vec::new()];
    for _round in 0..15 {
        for (side, reader) in readers.iter().enumerate() {
            let start = Instant::now();
            assert_eq!(reader.gets(&entities), GETS);
            get_times[side].push(start.elapsed().as_secs_f64());
            let start = Instant::now();
            assert_eq!(reader.scan(), READ_N);
            scan_times[side].push(start.elapsed().as_secs_f64());
        }
    }
    let [get_checked, get_unchecked] = get_times.map(median);
    let [scan_checked, scan_unchecked] = scan_times.map(median);
    println!(
        "store_read: get {:.2} us checked vs {:.2} us unchecked = {:+.1}% (goal <= +10%); \
         scan of {READ_N} rows {:.1} ms checked vs {:.1} ms unchecked = {:+.1}%",
        get_checked / GETS as f64 * 1e6,
        get_unchecked / GETS as f64 * 1e6,
        100.0 * (get_checked / get_unchecked - 1.0),
        scan_checked * 1e3,
        scan_unchecked * 1e3,
        100.0 * (scan_checked / scan_unchecked - 1.0),
    );
}

criterion_group!(benches, writes, concurrent_writes, rebuild, reads);
criterion_main!(benches);
