//! Crash safety: a child process (this test binary, re-run with an environment variable)
//! acknowledges writes and is killed with SIGKILL at an arbitrary point; reopening shows every
//! acknowledged write, no half-applied batch, and a live tree equal to a rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use propd_merkle::{Entity, Property, Shape, TagValue};
use propd_store::{RedbStore, StoreConfig, VerifyOutcome};

use crate::{groups, live};

const DIR_VAR: &str = "PROPD_STORE_CRASH_DIR";
const START_VAR: &str = "PROPD_STORE_CRASH_START";
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

/// The child's side. It does nothing unless the parent test set `PROPD_STORE_CRASH_DIR`: then it
/// writes forever (until killed), printing `ack <kind> <i>` after each write returns.
#[test]
fn crash_child_entry_point() {
    let Ok(dir) = std::env::var(DIR_VAR) else {
        return;
    };
    let start: u64 = std::env::var(START_VAR)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(0);
    let store = RedbStore::open(synced_config(Path::new(&dir))).unwrap_or_else(|e| panic!("{e}"));
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

fn run_child(dir: &Path, start: u64, kill_after: usize) -> Acks {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash::crash_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_VAR, dir)
        .env(START_VAR, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the child: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("child stdout"));
    let mut acks = Acks::default();
    let mut seen = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_else(|e| panic!("read child: {e}"));
        let mut words = line.split_whitespace();
        if words.next() != Some("ack") {
            continue;
        }
        let kind = words.next().unwrap_or_default().to_owned();
        let i: u64 = words
            .next()
            .and_then(|word| word.parse().ok())
            .unwrap_or_else(|| panic!("bad ack line {line:?}"));
        match kind.as_str() {
            "apply" => acks.applies.insert(i),
            "delete" => acks.deletes.insert(i),
            "batch" => acks.batches.insert(i),
            _ => panic!("bad ack line {line:?}"),
        };
        seen += 1;
        if seen >= kill_after {
            // `Child::kill` sends SIGKILL on Unix: no destructor, no flush, no clean close.
            child.kill().unwrap_or_else(|e| panic!("kill: {e}"));
            break;
        }
    }
    acks.in_flight.extend(acks.applies.iter().max());
    let status = child.wait().unwrap_or_else(|e| panic!("wait: {e}"));
    assert!(
        !status.success(),
        "the child was killed, not finished: {status:?}"
    );
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
        let acks = run_child(dir.path(), start, kill_after);
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
