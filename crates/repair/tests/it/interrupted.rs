//! A sync cut off at any step (a dropped peer, a cancelled future) leaves both stores consistent
//! (each tree matches its data), and the next sync completes the repair.

use propd_merkle::{Shape, TreeBuilder};
use propd_repair::pair::{Pair, sync_in_memory};
use propd_store::RepairStore;

use crate::support::*;

/// The root a tree built from scratch over the store's data would have.
fn rebuilt_root<S: RepairStore>(store: &S, shape: Shape) -> Option<Vec<u8>> {
    let mut builder = TreeBuilder::new(shape).expect("shape");
    let mut properties = contents(store, 0);
    properties.sort_by_key(|p| p.entity().expect("entity"));
    for p in &properties {
        builder.push_property(p).expect("push");
    }
    let tree = builder.finish().expect("tree");
    let root = tree.root();
    (root.leaf_count > 0).then(|| root.digest.as_bytes().to_vec())
}

#[test]
fn a_sync_cut_at_every_step_leaves_consistent_stores_and_the_next_sync_finishes_it() {
    let shape = small_shape();
    let config = tiny_pages();
    let seed = |a: &dyn Fn(Vec<propd_merkle::Property>),
                b: &dyn Fn(Vec<propd_merkle::Property>)| {
        a((0..16)
            .map(|i| prop(&format!("k{i}"), 1 + i % 3, "a", 0))
            .collect());
        b((8..24)
            .map(|i| prop(&format!("k{i}"), 2, "b", if i % 5 == 0 { 3 } else { 0 }))
            .collect());
    };
    let steps = {
        let (a, b) = (model(shape, 1), model(shape, 1));
        seed(&|p| put(&a, 0, p), &|p| put(&b, 0, p));
        let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
        pair.drive_bounded(100_000).expect("clean sync");
        pair.steps()
    };
    for cut in 0..steps {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (redb(&dir, shape, 1), model(shape, 1));
        seed(&|p| put(&a, 0, p), &|p| put(&b, 0, p));
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
        {
            let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
            for _ in 0..cut {
                pair.step().expect("step");
            }
            // The pair is dropped here with messages in flight and copies not yet applied.
        }
        assert_eq!(
            root(&a, 0),
            rebuilt_root(&a, shape),
            "client tree after a cut at step {cut}"
        );
        assert_eq!(
            root(&b, 0),
            rebuilt_root(&b, shape),
            "server tree after a cut at step {cut}"
        );
        sync_in_memory(&a, &b, GROUP, 0, config.clone()).expect("the next sync");
        assert_eq!(contents(&a, 0), expected, "after a cut at step {cut}");
        assert_eq!(contents(&b, 0), expected);
    }
}
