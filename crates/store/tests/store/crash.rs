//! Crash safety: a child process (this test binary, re-run with an environment variable)
//! acknowledges writes and is killed with SIGKILL at an arbitrary point; reopening shows every
//! acknowledged write, no half-applied batch, and a live tree equal to a rebuild. The child writes
//! from one thread, or from several at once, so that acknowledged writes share group commits.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use propd_merkle::{Entity, Property, Shape, TagValue};
use propd_store::{RedbStore, Snapshot, StoreConfig, VerifyOutcome};

use crate::{groups, live};

const DIR_VAR: &str = "PROPD_STORE_CRASH_DIR";
const START_VAR: &str = "PROPD_STORE_CRASH_START";
/// Set: the child writes from this many threads at once (`concurrent_child`).
const WRITERS_VAR: &str = "PROPD_STORE_CRASH_WRITERS";
const BATCH: usize = 8;

fn synced_config(dir: &Path) -> StoreConfig {
    // The defaults: every acknowledged write is synced before the call returns.
    StoreConfig::new(dir, groups(), Shape::default())
}

fn applied(i: u64) -> Property {
    live(
        "g",
        "n",
        &format!("a{i}"),
        i as i64 + 1,
        &[("v", TagValue::Int(i as i64))],
    )
}

fn tombstone(i: u64) -> Property {
    Property {
        tags: BTreeMap::new(),
        mod_revision: i as i64 + 1_000_000,
        delete_time: i as i64 + 1,
        ..applied(i)
    }
}

fn batch(i: u64) -> Vec<Property> {
    (0..BATCH)
        .map(|k| {
            live(
                "h",
                "b",
                &format!("{i}-{k}"),
                7,
                &[("k", TagValue::Int(k as i64))],
            )
        })
        .collect()
}

fn entity(property: &Property) -> Entity {
    crate::entity_of(property)
}

/// The child's side, run only by the crash tests below (as an ignored test, so that it is not
/// counted as a passing test of its own): in the directory the parent names in
/// `PROPD_STORE_CRASH_DIR` it writes forever (until killed), printing `ack <kind> <i>` after each
/// write returns (`ack <kind> <thread> <i>` with several writer threads).
#[test]
#[ignore = "the child process of the crash tests, which run it"]
fn crash_child_entry_point() {
    let dir = std::env::var(DIR_VAR)
        .unwrap_or_else(|_| panic!("run by the crash tests only, which set {DIR_VAR}"));
    let number =
        |var: &str| -> Option<u64> { std::env::var(var).ok().and_then(|text| text.parse().ok()) };
    let start = number(START_VAR).unwrap_or(0);
    let store = RedbStore::open(synced_config(Path::new(&dir))).unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os(PURGE_VAR).is_some() {
        purging_child(&store, start);
    }
    if let Some(writers) = number(WRITERS_VAR) {
        concurrent_child(&store, start, writers);
    }
    let mut out = std::io::stdout().lock();
    for i in start.. {
        store.apply(applied(i)).unwrap_or_else(|e| panic!("{e}"));
        writeln!(out, "ack apply {i}")
            .and_then(|()| out.flush())
            .unwrap_or_else(|e| panic!("{e}"));
        if i % 7 == 6 {
            let t = tombstone(i);
            store
                .delete(&entity(&t), t.mod_revision, t.delete_time)
                .unwrap_or_else(|e| panic!("{e}"));
            writeln!(out, "ack delete {i}")
                .and_then(|()| out.flush())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if i % 5 == 4 {
            store
                .repair_apply_batch("h", 0, batch(i))
                .unwrap_or_else(|e| panic!("{e}"));
            writeln!(out, "ack batch {i}")
                .and_then(|()| out.flush())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        if i % 3 == 2 {
            // A flush (an unsynced commit of derived digests) may be cut short by the kill too.
            store
                .tree("g", (i % 4) as u32)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

#[derive(Debug, Default)]
struct Acks {
    applies: BTreeSet<u64>,
    deletes: BTreeSet<u64>,
    batches: BTreeSet<u64>,
    /// Per round, the last acknowledged apply: the delete that may follow it was in flight.
    in_flight: BTreeSet<u64>,
}

/// Runs the child (`writers` threads, or the single-threaded workload) until it acknowledged
/// `kill_after` writes, kills it with SIGKILL and returns each acknowledgement: its kind and
/// numbers.
fn run_child(
    dir: &Path,
    start: u64,
    writers: Option<u64>,
    kill_after: usize,
) -> Vec<(String, Vec<u64>)> {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut command = Command::new(exe);
    command
        .args([
            "--exact",
            "crash::crash_child_entry_point",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir)
        .env(START_VAR, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(writers) = writers {
        command.env(WRITERS_VAR, writers.to_string());
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the child: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("child stdout"));
    let mut acks = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_else(|e| panic!("read child: {e}"));
        let mut words = line.split_whitespace();
        if words.next() != Some("ack") {
            continue;
        }
        let kind = words.next().unwrap_or_default().to_owned();
        let numbers: Vec<u64> = words
            .map(|word| {
                word.parse()
                    .unwrap_or_else(|_| panic!("bad ack line {line:?}"))
            })
            .collect();
        acks.push((kind, numbers));
        if acks.len() >= kill_after {
            // `Child::kill` sends SIGKILL on Unix: no destructor, no flush, no clean close.
            child.kill().unwrap_or_else(|e| panic!("kill: {e}"));
            break;
        }
    }
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
    acks
}

/// The single-threaded child's acknowledgements.
fn sequential_acks(lines: Vec<(String, Vec<u64>)>) -> Acks {
    let mut acks = Acks::default();
    for (kind, numbers) in lines {
        let [i] = numbers[..] else {
            panic!("bad ack {kind} {numbers:?}");
        };
        match kind.as_str() {
            "apply" => acks.applies.insert(i),
            "delete" => acks.deletes.insert(i),
            "batch" => acks.batches.insert(i),
            _ => panic!("bad ack {kind} {numbers:?}"),
        };
    }
    acks.in_flight.extend(acks.applies.iter().max());
    acks
}

fn check_after_crash(store: &RedbStore, acks: &Acks, round: usize) {
    for &i in &acks.applies {
        let stored = store
            .get(&entity(&applied(i)))
            .unwrap_or_else(|e| panic!("{e}"));
        if acks.deletes.contains(&i) {
            assert_eq!(
                stored,
                Some(tombstone(i)),
                "round {round}: acknowledged delete {i}"
            );
        } else {
            // The delete right after the last acknowledged apply may have been in flight.
            let ok = stored == Some(applied(i))
                || (acks.in_flight.contains(&i) && i % 7 == 6 && stored == Some(tombstone(i)));
            assert!(
                ok,
                "round {round}: acknowledged apply {i} reads back as {stored:?}"
            );
        }
    }
    let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let stored_h: BTreeMap<String, Property> = snapshot
        .scan("h", 0)
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|p| p.unwrap_or_else(|e| panic!("{e}")))
        .map(|p| (p.id.clone(), p))
        .collect();
    for &i in &acks.batches {
        for property in batch(i) {
            assert_eq!(
                stored_h.get(&property.id),
                Some(&property),
                "round {round}: batch {i}"
            );
        }
    }
    // No half-applied batch: every batch is there whole or not at all.
    let mut per_batch: BTreeMap<&str, usize> = BTreeMap::new();
    for id in stored_h.keys() {
        let prefix = id.split('-').next().unwrap_or_default();
        *per_batch.entry(prefix).or_default() += 1;
    }
    for (prefix, count) in per_batch {
        assert_eq!(count, BATCH, "round {round}: batch {prefix} is whole");
    }
    check_trees(store, &snapshot, round);
}

/// Every shard's live tree equals a rebuild and needs no healing.
fn check_trees(store: &RedbStore, snapshot: &Snapshot, round: usize) {
    for (group, shards) in [("g", 4), ("h", 1)] {
        for shard in 0..shards {
            assert_eq!(
                snapshot
                    .tree(group, shard)
                    .unwrap_or_else(|e| panic!("{e}")),
                snapshot
                    .rebuild_tree(group, shard)
                    .unwrap_or_else(|e| panic!("{e}")),
                "round {round}: live tree of {group}/{shard} equals a rebuild"
            );
            let outcome = store.verify(group, shard).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                !matches!(outcome, VerifyOutcome::Healed { .. }),
                "round {round}: {group}/{shard} needed no healing: {outcome:?}"
            );
        }
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut all = Acks::default();
    for (round, (start, kill_after)) in [(0u64, 23usize), (1000, 41), (2000, 17)]
        .into_iter()
        .enumerate()
    {
        let acks = sequential_acks(run_child(dir.path(), start, None, kill_after));
        assert!(
            !acks.applies.is_empty(),
            "round {round}: the child acknowledged writes"
        );
        all.applies.extend(acks.applies);
        all.deletes.extend(acks.deletes);
        all.batches.extend(acks.batches);
        all.in_flight.extend(acks.in_flight);
        let store =
            RedbStore::open(synced_config(dir.path())).unwrap_or_else(|e| panic!("reopen: {e}"));
        check_after_crash(&store, &all, round);
    }
}

/// The write of thread `t`, step `i`, of the concurrent child.
fn concurrent_applied(t: u64, i: u64) -> Property {
    live(
        "g",
        "c",
        &format!("{t}-{i}"),
        i as i64 + 1,
        &[("v", TagValue::Int(i as i64))],
    )
}

fn concurrent_tombstone(t: u64, i: u64) -> Property {
    Property {
        tags: BTreeMap::new(),
        mod_revision: i as i64 + 1_000_000,
        delete_time: i as i64 + 1,
        ..concurrent_applied(t, i)
    }
}

/// The concurrent child: `writers` threads, each applying its own properties and deleting every
/// fourth right after it, forever (until killed).
fn concurrent_child(store: &RedbStore, start: u64, writers: u64) {
    let ack = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .unwrap_or_else(|e| panic!("{e}"));
    };
    std::thread::scope(|scope| {
        for t in 0..writers {
            scope.spawn(move || {
                for i in start.. {
                    store
                        .apply(concurrent_applied(t, i))
                        .unwrap_or_else(|e| panic!("{e}"));
                    ack(format!("ack apply {t} {i}"));
                    if i % 4 == 3 {
                        let tombstone = concurrent_tombstone(t, i);
                        store
                            .delete(
                                &entity(&tombstone),
                                tombstone.mod_revision,
                                tombstone.delete_time,
                            )
                            .unwrap_or_else(|e| panic!("{e}"));
                        ack(format!("ack delete {t} {i}"));
                    }
                }
            });
        }
    });
}

/// Per thread, the last apply the concurrent child acknowledged: the delete that may follow it
/// was in flight when the child was killed.
fn last_applies(acks: &[(String, Vec<u64>)]) -> BTreeSet<(u64, u64)> {
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for (kind, numbers) in acks {
        if let ("apply", &[t, i]) = (kind.as_str(), &numbers[..]) {
            let at = last.entry(t).or_default();
            *at = (*at).max(i);
        }
    }
    last.into_iter().collect()
}

/// Every write the concurrent child acknowledged reads back after the crash, with its tree
/// entry; a delete in flight (`in_flight`: the thread's last acknowledged apply of a round) may
/// have been applied.
fn check_concurrent_after_crash(
    store: &RedbStore,
    acks: &[(String, Vec<u64>)],
    in_flight: &BTreeSet<(u64, u64)>,
    round: usize,
) {
    let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let shape = store.shape();
    let leaves: BTreeMap<Entity, propd_merkle::Digest> = (0..4)
        .flat_map(|shard| {
            let tree = snapshot.tree("g", shard).unwrap_or_else(|e| panic!("{e}"));
            tree.leaves()
                .iter()
                .map(|leaf| (leaf.entity.clone(), leaf.digest))
                .collect::<Vec<_>>()
        })
        .collect();
    let deleted: BTreeSet<(u64, u64)> = acks
        .iter()
        .filter(|(kind, _)| kind == "delete")
        .map(|(_, numbers)| (numbers[0], numbers[1]))
        .collect();
    let mut checked = 0;
    for (kind, numbers) in acks {
        let [t, i] = numbers[..] else {
            panic!("bad ack {kind} {numbers:?}");
        };
        let applied = concurrent_applied(t, i);
        let stored = store
            .get(&entity(&applied))
            .unwrap_or_else(|e| panic!("{e}"));
        let tombstone = concurrent_tombstone(t, i);
        let ok = if deleted.contains(&(t, i)) {
            stored.as_ref() == Some(&tombstone)
        } else {
            stored.as_ref() == Some(&applied)
                || (in_flight.contains(&(t, i))
                    && i % 4 == 3
                    && stored.as_ref() == Some(&tombstone))
        };
        assert!(
            ok,
            "round {round}: acknowledged {kind} {t} {i} reads back as {stored:?}"
        );
        let stored = stored.unwrap_or_else(|| panic!("checked above"));
        assert_eq!(
            leaves.get(&entity(&stored)),
            Some(&shape.digest(&stored.canonical_bytes())),
            "round {round}: the tree entry of acknowledged {kind} {t} {i}"
        );
        checked += 1;
    }
    assert_eq!(checked, acks.len());
    check_trees(store, &snapshot, round);
}

#[test]
fn acknowledged_concurrent_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut all = Vec::new();
    let mut in_flight = BTreeSet::new();
    for (round, (start, kill_after)) in [(0u64, 160usize), (1000, 90)].into_iter().enumerate() {
        let acks = run_child(dir.path(), start, Some(8), kill_after);
        let threads: BTreeSet<u64> = acks.iter().map(|(_, numbers)| numbers[0]).collect();
        assert!(
            threads.len() > 1,
            "round {round}: several writer threads were acknowledged: {threads:?}"
        );
        in_flight.extend(last_applies(&acks));
        all.extend(acks);
        let store =
            RedbStore::open(synced_config(dir.path())).unwrap_or_else(|e| panic!("reopen: {e}"));
        check_concurrent_after_crash(&store, &all, &in_flight, round);
    }
}

/// Set: the child purges (`purging_child`) instead of the write workloads.
const PURGE_VAR: &str = "PROPD_STORE_CRASH_PURGE";
/// Tombstones the purging child stores per round, and the live properties beside them.
const PURGE_ROUND: u64 = 600;

/// The tombstone `k` of purge round `round`: deleted below that round's line.
fn purge_tombstone(round: u64, k: u64) -> Property {
    Property {
        tags: BTreeMap::new(),
        mod_revision: 5,
        delete_time: purge_line_of(round) - 1 - k as i64,
        ..live("h", "p", &format!("{round}-{k:04}"), 1, &[])
    }
}

/// The live property `k` of purge round `round`, written by the writer thread beside the purge.
fn purge_live(round: u64, k: u64) -> Property {
    live(
        "h",
        "q",
        &format!("{round}-{k}"),
        1,
        &[("k", TagValue::Int(k as i64))],
    )
}

/// The purge line of round `round`: above the delete times of its tombstones and every earlier
/// round's.
fn purge_line_of(round: u64) -> i64 {
    (round as i64 + 1) * 1_000_000
}

/// The purging child: round after round (from `start`), stores `PURGE_ROUND` tombstones and
/// purges them at the node's pace while a second thread writes live properties, printing
/// `ack start <r>` before a purge, `ack round <r>` when it returned and `ack live <r> <k>` after
/// each write; forever, until killed.
fn purging_child(store: &RedbStore, start: u64) {
    let ack = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let round = std::sync::atomic::AtomicU64::new(start);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for k in 0.. {
                let r = round.load(std::sync::atomic::Ordering::Acquire);
                store
                    .apply(purge_live(r, k))
                    .unwrap_or_else(|e| panic!("{e}"));
                ack(format!("ack live {r} {k}"));
            }
        });
        for r in start.. {
            round.store(r, std::sync::atomic::Ordering::Release);
            let tombstones = (0..PURGE_ROUND).map(|k| purge_tombstone(r, k)).collect();
            store
                .repair_apply_batch("h", 0, tombstones)
                .unwrap_or_else(|e| panic!("{e}"));
            ack(format!("ack start {r}"));
            let report = store
                .purge_tombstones_paced("h", 0, purge_line_of(r), propd_store::PURGE_PACE)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(report.purged, PURGE_ROUND);
            ack(format!("ack round {r}"));
        }
    });
}

/// A purge commits unsynced transactions (made durable by the next synced commit); killed at
/// any point, the store reopens with every acknowledged write, a tree equal to a rebuild, the
/// purge line of every purge that started, no tombstone of a purge that returned, and no
/// tombstone below the line that a copy would send or accept; a new purge removes the rest.
#[test]
fn a_purge_cut_short_by_sigkill_leaves_a_consistent_store_and_is_redone() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut lives = BTreeSet::new();
    let mut rounds = BTreeSet::new();
    // Runs: (first round, the purge start after which the child is killed, writes acknowledged
    // after that start before the kill): the kill lands during that purge or just after it, or
    // after `LIVE_CAP` writes whatever the purges did.
    const LIVE_CAP: usize = 400;
    for (run, (start, purge, writes)) in [(0u64, 1usize, 2usize), (100, 3, 0), (200, 2, 5)]
        .into_iter()
        .enumerate()
    {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "crash::crash_child_entry_point",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir.path())
            .env(START_VAR, start.to_string())
            .env(PURGE_VAR, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the child: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("child stdout"));
        let (mut starts, mut after_start, mut written) = (0, 0, 0);
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_else(|e| panic!("read child: {e}"));
            let words: Vec<&str> = line.split_whitespace().collect();
            let number = |word: &str| -> u64 {
                word.parse()
                    .unwrap_or_else(|_| panic!("bad ack line {line:?}"))
            };
            match words[..] {
                ["ack", "live", r, k] => {
                    lives.insert((number(r), number(k)));
                    after_start += usize::from(starts >= purge);
                    written += 1;
                }
                ["ack", "round", r] => {
                    rounds.insert(number(r));
                }
                ["ack", "start", _] => starts += 1,
                _ => continue,
            }
            if (starts >= purge && after_start >= writes) || written >= LIVE_CAP {
                child.kill().unwrap_or_else(|e| panic!("kill: {e}"));
                break;
            }
        }
        let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
        assert!(
            !status.success(),
            "run {run}: the child was killed: {status:?}"
        );

        let store =
            RedbStore::open(synced_config(dir.path())).unwrap_or_else(|e| panic!("reopen: {e}"));
        for &(r, k) in &lives {
            assert_eq!(
                store
                    .get(&entity(&purge_live(r, k)))
                    .unwrap_or_else(|e| panic!("{e}")),
                Some(purge_live(r, k)),
                "run {run}: acknowledged write {r} {k}"
            );
        }
        let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        check_trees(&store, &snapshot, run);
        let line = store
            .purge_state("h", 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .purged_below;
        if let Some(&last) = rounds.iter().max() {
            assert!(
                line >= purge_line_of(last),
                "run {run}: the line of purge {last}, which returned, is durable: {line}"
            );
        }
        let stored: Vec<Property> = snapshot
            .scan("h", 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|p| p.unwrap_or_else(|e| panic!("{e}")))
            .filter(Property::is_tombstone)
            .collect();
        for tombstone in &stored {
            let r = tombstone
                .id
                .split('-')
                .next()
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("a tombstone id: {tombstone:?}"));
            assert!(
                !rounds.contains(&r),
                "run {run}: purge {r} returned, so its tombstone is gone: {tombstone:?}"
            );
        }
        drop(snapshot);
        // Tombstones below the durable line that the crash brought back are neither sent nor
        // accepted again.
        let below: Vec<Entity> = stored
            .iter()
            .filter(|tombstone| tombstone.delete_time < line)
            .map(entity)
            .collect();
        let sent = propd_store::RepairStore::get_many(&store, "h", 0, &below)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            sent.iter().all(Option::is_none),
            "run {run}: no tombstone below the line is sent"
        );
        let listed = propd_store::RepairStore::properties_after(&store, "h", 0, None, usize::MAX)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            listed
                .iter()
                .all(|p| !p.is_tombstone() || p.delete_time >= line),
            "run {run}: no tombstone below the line is listed"
        );
        if let Some(first) = stored.first().filter(|t| t.delete_time < line) {
            let mut again = first.clone();
            again.mod_revision += 1;
            store
                .repair_apply(again.clone())
                .unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(
                store.get(&entity(&again)).unwrap_or_else(|e| panic!("{e}")),
                Some(again),
                "run {run}: a tombstone below the line is not accepted"
            );
        }
        // The next purge at the line removes what the crash brought back.
        store
            .purge_tombstones_paced("h", 0, line, propd_store::PURGE_PACE)
            .unwrap_or_else(|e| panic!("{e}"));
        let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        let left = snapshot
            .scan("h", 0)
            .unwrap_or_else(|e| panic!("{e}"))
            .map(|p| p.unwrap_or_else(|e| panic!("{e}")))
            .filter(|p| p.is_tombstone() && p.delete_time < line)
            .count();
        assert_eq!(left, 0, "run {run}: the purge was redone");
        check_trees(&store, &snapshot, run);
    }
    assert!(!rounds.is_empty(), "some purges returned before a kill");
}
