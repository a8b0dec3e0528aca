//! A query of a whole 1 M-property group, paged against unpaged, on one redb store.
//!
//! The group has 4 shards, so each page merges four shard scans in entity order. `paged_1000`
//! reads every page of 1 000 (each starting after the previous page's last entity, as a
//! coordinator's holder query does); `unpaged` is the query as it was before paging: one answer
//! with every property. Besides criterion's time per whole pass (and properties per second), the
//! bench prints each variant's peak resident memory above what the process held before the pass
//! (Linux: `VmHWM` after resetting it through `/proc/self/clear_refs`).
//!
//! `PROPD_BENCH_QUERY_N` sets the group's size (default 1 000 000).

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured beside criterion's output"
)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use propd_benches::properties::property;
use propd_merkle::{Entity, Property, Shape, shard_of};
use propd_store::{GroupDef, Groups, Query, RedbStore, StoreConfig, TreeUpkeep, WriteDurability};

const GROUP: &str = "bench";
const SHARDS: u32 = 4;
const PAGE: usize = 1000;

fn n() -> u64 {
    std::env::var("PROPD_BENCH_QUERY_N")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000)
}

fn open(dir: &std::path::Path) -> RedbStore {
    let groups = Groups::new([GroupDef::new(GROUP, SHARDS, 1)]).expect("valid groups");
    let mut config = StoreConfig::new(dir, groups, Shape::default());
    // Queries read property rows only: the load skips the tree and the syncs.
    config.tree_upkeep = TreeUpkeep::OffForBenchmarksOnly;
    config.durability = WriteDurability::NotSynced;
    RedbStore::open(config).expect("open")
}

fn load(store: &RedbStore, n: u64) {
    let shard_num = NonZeroU32::new(SHARDS).expect("non-zero");
    let mut batches: Vec<Vec<Property>> = vec![Vec::new(); SHARDS as usize];
    let flush = |shard: usize, batch: &mut Vec<Property>| {
        store
            .repair_apply_batch(GROUP, shard as u32, std::mem::take(batch))
            .expect("valid batch");
    };
    for i in 0..n {
        let p = property(i);
        let entity = Entity::new(&p.group, &p.name, &p.id).expect("entity");
        let shard = shard_of(&entity, shard_num) as usize;
        batches[shard].push(p);
        if batches[shard].len() == 10_000 {
            flush(shard, &mut batches[shard]);
        }
    }
    for (shard, batch) in batches.iter_mut().enumerate() {
        flush(shard, batch);
    }
}

/// Every page of the group; the number of properties read.
fn paged(store: &RedbStore) -> u64 {
    let mut query = Query::group(GROUP);
    query.limit = PAGE;
    let mut count = 0;
    loop {
        let page = store.query_page(&query).expect("page");
        count += page.properties.len() as u64;
        black_box(&page.properties);
        match page.resume_after {
            Some(after) => query.after = Some(after),
            None => return count,
        }
    }
}

fn unpaged(store: &RedbStore) -> u64 {
    let all = store.query(&Query::group(GROUP)).expect("query");
    black_box(&all);
    all.len() as u64
}

/// `VmRSS` or `VmHWM` of this process in KiB, where Linux reports it.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One pass of `run`: its time and its peak resident memory above the resident memory before it.
fn measure(run: impl FnOnce() -> u64) -> (u64, Duration, Option<u64>) {
    // Writing 5 resets the peak (VmHWM) to the current resident set.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let count = run();
    let elapsed = started.elapsed();
    let peak = status_kib("VmHWM:");
    let above = match (reset, before, peak) {
        (true, Some(before), Some(peak)) => Some(peak.saturating_sub(before)),
        _ => None,
    };
    (count, elapsed, above)
}

fn query_group(c: &mut Criterion) {
    let n = n();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let started = Instant::now();
    load(&store, n);
    println!("query: loaded {n} properties in {:.1?}", started.elapsed());

    for (label, run) in [
        ("paged_1000", paged as fn(&RedbStore) -> u64),
        ("unpaged", unpaged),
    ] {
        let (count, elapsed, above) = measure(|| run(&store));
        assert_eq!(count, n, "{label} reads the whole group");
        let rss = above.map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
        );
        println!(
            "query {label}: {n} properties in {elapsed:.2?} ({:.0} properties/s), peak RSS {rss} above the start of the pass",
            n as f64 / elapsed.as_secs_f64()
        );
    }

    let mut group = c.benchmark_group("query_group");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(n));
    group.bench_function(format!("{n}/paged_1000"), |b| b.iter(|| paged(&store)));
    group.bench_function(format!("{n}/unpaged"), |b| b.iter(|| unpaged(&store)));
    group.finish();
}

criterion_group!(benches, query_group);
criterion_main!(benches);
