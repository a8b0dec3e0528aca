//! Write latency while a node purges tombstones, against the same writes with no purge, in one
//! run (docs/protocol.md, "The life of a delete"): a store holding `PROPD_BENCH_PURGE_N`
//! tombstones (default 1 000 000) in the shard the writes go to; synced single writes (a
//! client's acknowledged write) are timed alone, then while `purge_tombstones_paced` removes every
//! tombstone at the node's pace (`PURGE_PACE`, or `PROPD_BENCH_PURGE_PACE`; the writes'
//! transactions carry its steps), then alone again: the writes with no purge are taken half
//! before and half after the purge, so that a machine whose load drifts during the run weighs on
//! both sides. Goal: p99 during the purge within 2x of no purge.
//!
//! Criterion times the write with no purge; the bench prints p50 / p99 / max of both phases and
//! the p99 ratio beside it, and the purge's throughput: during the writes, and then alone (a
//! tenth as many new tombstones, purged with no writes beside them).

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured beside criterion's output"
)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use propd_benches::properties::property;
use propd_merkle::{Property, Shape};
use propd_store::{
    GroupDef, Groups, PURGE_PACE, PurgePace, RedbStore, StoreConfig, WriteDurability,
};

const GROUP: &str = "bench";
/// Every tombstone's delete time is below this line.
const LINE: i64 = 1_800_000_000_000_000_000;
/// The line of the purge with no writes beside it: above every [`late_tombstone`].
const LATE_LINE: i64 = 1_900_000_000_000_000_000;
/// Timed writes with no purge, before the purge and again after it.
const ALONE: usize = 500;

fn tombstones() -> u64 {
    std::env::var("PROPD_BENCH_PURGE_N")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000_000)
}

/// The node's pace, or the one `PROPD_BENCH_PURGE_PACE` gives as `chunk,step,budget_us,yield`
/// (`budget_us` 0: no budget; `yield` 0 or 1), to compare paces.
fn pace() -> PurgePace {
    let Ok(text) = std::env::var("PROPD_BENCH_PURGE_PACE") else {
        return PURGE_PACE;
    };
    let fields: Vec<u64> = text
        .split(',')
        .map(|field| {
            field
                .trim()
                .parse()
                .expect("PROPD_BENCH_PURGE_PACE: numbers")
        })
        .collect();
    let [chunk, step, budget_us, yield_to_writes] = fields[..] else {
        panic!("PROPD_BENCH_PURGE_PACE: chunk,step,budget_us,yield");
    };
    PurgePace {
        chunk: chunk as usize,
        step: step as usize,
        budget: (budget_us > 0).then(|| Duration::from_micros(budget_us)),
        yield_to_writes: yield_to_writes != 0,
    }
}

fn open(dir: &Path, durability: WriteDurability) -> RedbStore {
    let groups = Groups::new([GroupDef::new(GROUP, 1, 2)]).expect("valid groups");
    let mut config = StoreConfig::new(dir, groups, Shape::default());
    config.durability = durability;
    RedbStore::open(config).expect("open")
}

fn tombstone(i: u64) -> Property {
    let mut property = property(i);
    property.tags.clear();
    property.delete_time = property.mod_revision;
    property
}

/// A tombstone deleted above [`LINE`] (once the first purge raised the line to it, a tombstone
/// below it is no longer stored) and below [`LATE_LINE`].
fn late_tombstone(i: u64) -> Property {
    let mut property = tombstone(i);
    property.mod_revision = LINE + i as i64;
    property.delete_time = property.mod_revision;
    property
}

/// Tombstones `0..n` through the repair path, unsynced, then one synced commit.
fn load(dir: &Path, n: u64) {
    let store = open(dir, WriteDurability::NotSynced);
    let started = Instant::now();
    let mut next = 0;
    while next < n {
        let end = (next + 20_000).min(n);
        store
            .repair_apply_batch(GROUP, 0, (next..end).map(tombstone).collect())
            .expect("valid batch");
        next = end;
    }
    store.record_complete_round(GROUP, 0, 1, 1).expect("sync");
    println!(
        "purge: loaded {n} tombstones in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// One synced write of a live property numbered after the tombstones; its latency.
fn write(store: &RedbStore, i: u64) -> Duration {
    let started = Instant::now();
    store.apply(property(i)).expect("write");
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn describe(label: &str, latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    let p99 = percentile(latencies, 0.99);
    println!(
        "purge: {label}: {} writes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(latencies, 0.5).as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    );
    p99
}

fn bench_purge(c: &mut Criterion) {
    let n = tombstones();
    let pace = pace();
    println!("purge: pace {pace:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    load(dir.path(), n);
    let store = Arc::new(open(dir.path(), WriteDurability::Immediate));
    let mut next = n;

    let mut group = c.benchmark_group("purge");
    group.sample_size(20);
    group.bench_function("synced write, no purge", |b| {
        b.iter(|| {
            next += 1;
            write(&store, next)
        });
    });
    group.finish();

    let mut alone: Vec<Duration> = (0..ALONE)
        .map(|_| {
            next += 1;
            write(&store, next)
        })
        .collect();

    let done = Arc::new(AtomicBool::new(false));
    let purger = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let started = Instant::now();
            let report = store
                .purge_tombstones_paced(GROUP, 0, LINE, pace)
                .expect("purge");
            done.store(true, Ordering::Release);
            (report, started.elapsed())
        })
    };
    let mut during = Vec::new();
    while !done.load(Ordering::Acquire) {
        next += 1;
        during.push(write(&store, next));
    }
    let (report, took) = purger.join().expect("purge thread");
    alone.extend((0..ALONE).map(|_| {
        next += 1;
        write(&store, next)
    }));
    assert_eq!(report.purged, n, "every tombstone was purged");
    // The purge's throughput with no writes beside it, over a tenth as many new tombstones.
    let idle = (n / 10).max(1);
    let first = next + 1;
    next += idle;
    let mut at = first;
    while at <= next {
        let end = (at + 20_000).min(next + 1);
        store
            .repair_apply_batch(GROUP, 0, (at..end).map(late_tombstone).collect())
            .expect("valid batch");
        at = end;
    }
    let started = Instant::now();
    let alone_report = store
        .purge_tombstones_paced(GROUP, 0, LATE_LINE, pace)
        .expect("purge");
    let alone_took = started.elapsed();
    assert_eq!(alone_report.purged, idle, "every new tombstone was purged");
    println!(
        "purge: {} tombstones in {} transactions that removed some ({} steps carried by writes), {:.1} s, {:.0} tombstones/s",
        report.purged,
        report.chunks,
        report.ridden,
        took.as_secs_f64(),
        report.purged as f64 / took.as_secs_f64()
    );
    println!(
        "purge: with no writes: {} tombstones in {:.1} s, {:.0} tombstones/s",
        alone_report.purged,
        alone_took.as_secs_f64(),
        alone_report.purged as f64 / alone_took.as_secs_f64()
    );
    let p99_alone = describe("no purge", &mut alone);
    let p99_during = describe("during the purge", &mut during);
    println!(
        "purge: p99 during the purge / p99 with no purge = {:.2} (goal <= 2)",
        p99_during.as_secs_f64() / p99_alone.as_secs_f64()
    );
}

criterion_group!(benches, bench_purge);
criterion_main!(benches);
