//! Snapshots: a scan or tree read sees one consistent state while writes continue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use propd_merkle::{Property, TagValue};
use propd_store::RedbStore;

use crate::{live, open};

/// Ids of `g/n/*` that live in shard 2 of `g`.
fn shard_ids(n: usize) -> Vec<String> {
    let shard_num = std::num::NonZeroU32::new(4).unwrap_or(std::num::NonZeroU32::MIN);
    (0..)
        .map(|i| format!("s{i}"))
        .filter(|id| {
            let entity = propd_merkle::Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}"));
            propd_merkle::shard_of(&entity, shard_num) == 2
        })
        .take(n)
        .collect()
}

fn generation(ids: &[String], generation: i64) -> Vec<Property> {
    ids.iter()
        .map(|id| {
            live(
                "g",
                "n",
                id,
                generation,
                &[("generation_no", TagValue::Int(generation))],
            )
        })
        .collect()
}

#[test]
fn a_snapshot_does_not_see_later_writes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    let ids = shard_ids(5);
    store
        .repair_apply_batch("g", 2, generation(&ids, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let tree_before = snapshot.tree("g", 2).unwrap_or_else(|e| panic!("{e}"));
    store
        .repair_apply_batch("g", 2, generation(&ids, 2))
        .unwrap_or_else(|e| panic!("{e}"));
    store
        .repair_apply(live("g", "n", "new", 1, &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let scanned: Vec<Property> = snapshot
        .scan("g", 2)
        .unwrap_or_else(|e| panic!("{e}"))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(scanned.len(), 5);
    assert!(
        scanned.iter().all(|p| p.mod_revision == 1),
        "the snapshot still reads generation 1"
    );
    assert_eq!(
        snapshot.revision("g", 2).ok(),
        Some(5),
        "five writes when the snapshot was taken"
    );
    assert_eq!(snapshot.tree("g", 2).ok(), Some(tree_before.clone()));
    let now = store.tree("g", 2).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(now.root(), tree_before.root(), "the store itself moved on");
}

#[test]
fn scans_are_consistent_during_concurrent_writes() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Arc::new(open(dir.path()));
    let ids = shard_ids(40);
    store
        .repair_apply_batch("g", 2, generation(&ids, 1))
        .unwrap_or_else(|e| panic!("{e}"));
    // The writer goes on until the reader has read several times, so reads overlap writes
    // whatever the threads' speeds (bounded, in case the reader never runs).
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let writer = {
        let store = Arc::clone(&store);
        let ids = ids.clone();
        let done = Arc::clone(&done);
        let reads = Arc::clone(&reads);
        std::thread::spawn(move || {
            let mut generation_no = 1;
            while generation_no < 40 || reads.load(Ordering::SeqCst) < 20 {
                generation_no += 1;
                assert!(generation_no < 100_000, "the reader never read");
                // One write transaction per generation: every entity moves together.
                store
                    .repair_apply_batch("g", 2, generation(&ids, generation_no))
                    .unwrap_or_else(|e| panic!("{e}"));
                if generation_no % 5 == 0 {
                    store.flush("g", 2).unwrap_or_else(|e| panic!("{e}"));
                }
            }
            done.store(true, Ordering::SeqCst);
            generation_no
        })
    };
    let check = |store: &RedbStore| {
        let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
        let scanned: Vec<Property> = snapshot
            .scan("g", 2)
            .unwrap_or_else(|e| panic!("{e}"))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scanned.len(), ids.len(), "every entity in every snapshot");
        let generation_no = scanned[0].mod_revision;
        assert!(
            scanned.iter().all(|p| p.mod_revision == generation_no),
            "a scan never mixes generations"
        );
        assert_eq!(
            snapshot.revision("g", 2).ok(),
            Some(generation_no as u64 * ids.len() as u64),
            "the revision counts the writes the snapshot holds"
        );
        assert_eq!(
            snapshot.tree("g", 2).unwrap_or_else(|e| panic!("{e}")),
            snapshot
                .rebuild_tree("g", 2)
                .unwrap_or_else(|e| panic!("{e}")),
            "the snapshot's tree matches its properties"
        );
        generation_no
    };
    let mut seen = std::collections::BTreeSet::new();
    while !done.load(Ordering::SeqCst) {
        seen.insert(check(&store));
        reads.fetch_add(1, Ordering::SeqCst);
    }
    let last = writer
        .join()
        .unwrap_or_else(|_| panic!("the writer panicked"));
    assert_eq!(check(&store), last, "after the writer: the last generation");
    assert!(
        seen.len() >= 2,
        "the reads saw the writes move on: generations {seen:?}"
    );
}

#[test]
fn a_snapshot_lists_leaves_of_changes_not_yet_flushed() {
    use propd_merkle::NodeId;
    use propd_store::{LeafKey, StoreConfig, WriteDurability};

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut config = StoreConfig::new(dir.path(), crate::groups(), propd_merkle::Shape::default());
    config.durability = WriteDurability::NotSynced;
    let store = RedbStore::open(config).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..30 {
        store
            .apply(live("h", "n", &format!("{i}"), 1, &[]))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    store.flush("h", 0).unwrap_or_else(|e| panic!("{e}"));
    // Changes after the flush stay in the leaf log: an update, a delete, new leaves.
    store
        .apply(live("h", "n", "3", 2, &[]))
        .unwrap_or_else(|e| panic!("{e}"));
    let gone = crate::entity_of(&live("h", "n", "4", 1, &[]));
    store.delete(&gone, 2, 9).unwrap_or_else(|e| panic!("{e}"));
    for i in 30..40 {
        store
            .apply(live("h", "n", &format!("{i}"), 1, &[]))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let tree = snapshot
        .rebuild_tree("h", 0)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(snapshot.tree("h", 0).ok(), Some(tree.clone()));
    let slots: Vec<NodeId> = tree
        .children(NodeId::ROOT)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for node in std::iter::once(NodeId::ROOT).chain(slots) {
        let mut paged = Vec::new();
        let mut after: Option<LeafKey> = None;
        loop {
            let page = snapshot
                .leaves_under("h", 0, node, after.as_ref(), 4)
                .unwrap_or_else(|e| panic!("{e}"));
            let Some(last) = page.last() else { break };
            after = Some(LeafKey::of(last));
            paged.extend(page);
        }
        assert_eq!(
            paged.as_slice(),
            tree.leaves_under(node),
            "leaves under {node}"
        );
    }
}

/// A cursor from before a node's range lists the node's leaves from its start: never a leaf
/// of an earlier bucket (the flushed tree read from its table).
#[test]
fn a_cursor_before_a_nodes_range_lists_only_the_nodes_leaves() {
    use propd_merkle::NodeId;
    use propd_store::LeafKey;

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = open(dir.path());
    for i in 0..60 {
        store
            .apply(live("h", "n", &format!("{i}"), 1, &[]))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    store.flush("h", 0).unwrap_or_else(|e| panic!("{e}"));
    let snapshot = store.snapshot().unwrap_or_else(|e| panic!("{e}"));
    let tree = snapshot
        .rebuild_tree("h", 0)
        .unwrap_or_else(|e| panic!("{e}"));
    let first = LeafKey::of(&tree.leaves_under(NodeId::ROOT)[0]);
    let slots: Vec<NodeId> = tree
        .children(NodeId::ROOT)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut checked = 0;
    for node in slots {
        let under = tree.leaves_under(node);
        if under.is_empty() || under[0].bucket <= first.bucket {
            continue;
        }
        let listed = snapshot
            .leaves_under("h", 0, node, Some(&first), 1_000)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(listed.as_slice(), under, "leaves under {node}");
        checked += 1;
    }
    assert!(checked > 0, "some slot lies after the first leaf's bucket");
}
