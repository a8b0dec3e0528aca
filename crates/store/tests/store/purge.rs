//! Regression (issue 10, purge starvation): a purge gave redb's writer up to every write that
//! waited, waited up to 50 ms between two of its transactions while any write waited, and then
//! competed for the writer with the writes in no order, so under a steady stream of writes it
//! could go on for ever. Now every write transaction that starts while a purge is in progress
//! carries one step of it: the purge ends within a number of writes bounded by its own size,
//! however the writes come.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use propd_merkle::Property;
use propd_store::{PURGE_PACE, StoreError};

use crate::{live, open};

fn ok<T>(result: Result<T, StoreError>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

const TOMBSTONES: u64 = 800;
const WRITERS: u64 = 2;
/// Above every tombstone's delete time.
const LINE: i64 = 1_000_000;

fn tombstone(k: u64) -> Property {
    let mut property = live("h", "n", &format!("t{k}"), 1, &[]);
    property.delete_time = 10 + k as i64;
    property
}

#[test]
fn a_purge_ends_within_a_bounded_number_of_writes_however_steadily_they_come() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // Unsynced writes (the test configuration): each write is one transaction of its own.
    let store = open(dir.path());
    ok(store.repair_apply_batch("h", 0, (0..TOMBSTONES).map(tombstone).collect()));
    ok(store.flush("h", 0));
    let step = PURGE_PACE.step as u64;
    // Steps the purge needs: one to raise the line, one per `step` tombstones (shard `h`/0
    // holds nothing else, and each step flushes twice as many leaf changes as it removes, so the
    // log never grows), one that finds the end of the shard; and two to spare.
    let steps = 1 + TOMBSTONES.div_ceil(step) + 1 + 2;
    // A write transaction that starts while the purge is in progress carries one of its steps.
    // Those that do not: each writer's write already under way when the purge starts, and its
    // next one if it chose its durability before the purge started (the line is raised only in
    // a synced transaction).
    let bound = steps + 2 * WRITERS;
    // The writers stop after this many writes during the purge, so that a purge they starve
    // ends after them and the test fails rather than hangs.
    let limit = 4 * bound;
    let started = AtomicU64::new(0);
    let during = AtomicU64::new(0);
    let purging = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let (report, written) = std::thread::scope(|scope| {
        for w in 0..WRITERS {
            let (store, started, during, purging, done) =
                (&store, &started, &during, &purging, &done);
            scope.spawn(move || {
                for k in 0.. {
                    if done.load(Ordering::Acquire) || during.load(Ordering::Acquire) >= limit {
                        break;
                    }
                    let property = live("g", "n", &format!("w{w}-{k}"), 1, &[]);
                    ok(store.apply(property));
                    started.fetch_add(1, Ordering::AcqRel);
                    if purging.load(Ordering::Acquire) {
                        during.fetch_add(1, Ordering::AcqRel);
                    }
                }
            });
        }
        // The writers are under way before the purge starts.
        while started.load(Ordering::Acquire) < 2 * WRITERS {
            std::thread::yield_now();
        }
        purging.store(true, Ordering::Release);
        let report = ok(store.purge_tombstones_paced("h", 0, LINE, PURGE_PACE));
        let written = during.load(Ordering::Acquire);
        done.store(true, Ordering::Release);
        (report, written)
    });
    assert_eq!(report.purged, TOMBSTONES, "every tombstone was purged");
    assert!(
        written <= bound,
        "the purge ended after {written} writes, more than the {bound} that carry all its steps"
    );
    assert!(report.ridden > 0, "writes carried steps: {report:?}");
    let snapshot = ok(store.snapshot());
    assert_eq!(
        ok(snapshot.scan("h", 0)).count(),
        0,
        "no tombstone is left in the shard"
    );
}
