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
    // The removal steps the purge needs once its line is raised (shard `h`/0 holds nothing but
    // the tombstones): a write transaction that starts after that carries one of them.
    let steps = TOMBSTONES.div_ceil(PURGE_PACE.step as u64);
    // Writes started once the line was raised (after the one that raised it, or the purge's
    // own transaction), and whether the writers count them.
    let counted = AtomicU64::new(0);
    let counting = AtomicBool::new(false);
    let (report, left) = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, counted, counting) = (&store, &counted, &counting);
                scope.spawn(move || {
                    for k in 0.. {
                        let counts = counting.load(Ordering::Acquire);
                        if counts && counted.load(Ordering::Acquire) >= steps {
                            break;
                        }
                        ok(store.apply(live("g", "n", &format!("w{w}-{k}"), 1, &[])));
                        if counts {
                            counted.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                })
            })
            .collect();
        let purge = scope.spawn(|| ok(store.purge_tombstones_paced("h", 0, LINE, PURGE_PACE)));
        // The writes count from the moment the raised line is visible: each of them starts while
        // the purge is in progress, with its line durable.
        while ok(store.purge_state("h", 0)).purged_below < LINE {
            std::thread::yield_now();
        }
        counting.store(true, Ordering::Release);
        for writer in writers {
            writer.join().unwrap_or_else(|_| panic!("a writer failed"));
        }
        // The writers stopped after `steps` counted writes (a purge they starved ends after
        // them, so the test fails rather than hangs): the tombstones are gone already.
        let snapshot = ok(store.snapshot());
        let left = ok(snapshot.scan("h", 0)).count();
        let report = purge.join().unwrap_or_else(|_| panic!("the purge failed"));
        (report, left)
    });
    assert_eq!(
        left,
        0,
        "tombstones left after {} writes that started during the purge, {steps} steps",
        counted.load(Ordering::Acquire)
    );
    assert_eq!(report.purged, TOMBSTONES, "every tombstone was purged");
    assert!(report.ridden > 0, "writes carried steps: {report:?}");
}
