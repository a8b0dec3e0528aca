//! Criterion benches of `propd-merkle`: building a 1 M-leaf tree from a stream (SHA-512, BLAKE3)
//! against bare hashing of the same stream, one incremental update in a 1 M-leaf live tree
//! against the bare leaf write, and the diff of two 1 M-leaf trees with its bandwidth.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured beside criterion's output"
)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use propd_benches::properties::{fill, property};
use propd_merkle::{
    Algorithm, Entity, LiveTree, MemStorage, Property, Shape, Tree, TreeBuilder, diff,
};

const LEAVES: u64 = 1_000_000;

fn build_tree(shape: Shape, count: u64) -> Tree {
    let mut builder = TreeBuilder::with_capacity(shape, count as usize).expect("valid shape");
    let mut p = Property::default();
    for i in 0..count {
        fill(&mut p, i);
        builder.push_property(&p).expect("valid property");
    }
    builder.finish().expect("unique entities")
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("merkle_build_1m");
    group
        .sample_size(10)
        // Ten one-shot samples: each iteration takes a second or more.
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for algorithm in [Algorithm::Sha512, Algorithm::Blake3] {
        let shape = Shape {
            algorithm,
            ..Shape::default()
        };
        let name = format!("{algorithm:?}").to_lowercase();
        // The comparison: the same stream, canonical bytes and leaf digests only, no tree.
        group.bench_function(format!("{name}/hash_only"), |b| {
            b.iter(|| {
                let mut p = Property::default();
                let mut scratch = Vec::new();
                let mut last = shape.empty_digest();
                for i in 0..LEAVES {
                    fill(&mut p, i);
                    last = p.leaf_digest_with(&shape, &mut scratch);
                }
                black_box(last)
            })
        });
        group.bench_function(format!("{name}/build"), |b| {
            // Freeing the tree is not part of building it.
            b.iter_with_large_drop(|| build_tree(shape, LEAVES))
        });
    }
    group.finish();
}

/// A flushed 1 M-leaf live tree over `MemStorage`.
fn live_tree(shape: Shape) -> LiveTree<MemStorage> {
    let mut live = LiveTree::new(shape, MemStorage::new()).expect("valid shape");
    for leaf in build_tree(shape, LEAVES).leaves() {
        live.upsert(&leaf.entity, leaf.digest).expect("in memory");
    }
    live.flush().expect("in memory");
    live
}

fn incremental(c: &mut Criterion) {
    let shape = Shape::default();
    // Built on first use, so that a filtered run skips the setup of unselected benches
    // (criterion calls a bench's closure several times).
    let mut live: Option<LiveTree<MemStorage>> = None;
    let entity = property(LEAVES / 2).entity().expect("valid");
    let digests = [shape.digest(b"one"), shape.digest(b"two")];

    let mut group = c.benchmark_group("merkle_update_1m");
    group
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut turn = 0;
    // The comparison: the leaf write alone (it marks the bucket dirty; nothing is hashed).
    group.bench_function("upsert_only", |b| {
        let live = live.get_or_insert_with(|| live_tree(shape));
        b.iter(|| {
            turn ^= 1;
            live.upsert(black_box(&entity), digests[turn])
                .expect("in memory")
        });
        live.flush().expect("in memory");
    });
    group.bench_function("upsert_and_flush", |b| {
        let live = live.get_or_insert_with(|| live_tree(shape));
        b.iter(|| {
            turn ^= 1;
            live.upsert(black_box(&entity), digests[turn])
                .expect("in memory");
            live.flush().expect("in memory")
        })
    });
    group.finish();
}

/// A copy of `base` with exactly `d` differences spread over the key space: change `k` removes a
/// leaf when `k % 3 == 0`, changes a leaf's digest when `k % 3 == 1`, adds a leaf otherwise.
fn diverge(base: &Tree, d: u64) -> Tree {
    let shape = *base.shape();
    let step = LEAVES / d.max(1);
    let changed: std::collections::BTreeMap<Entity, u64> = (0..d)
        .filter(|k| k % 3 != 2)
        .map(|k| (property(k * step).entity().expect("valid"), k))
        .collect();
    let mut builder = TreeBuilder::with_capacity(shape, base.leaves().len()).expect("valid shape");
    for leaf in base.leaves() {
        match changed.get(&leaf.entity) {
            None => builder
                .push(leaf.entity.clone(), leaf.digest)
                .expect("valid"),
            Some(k) if k % 3 == 1 => builder
                .push(leaf.entity.clone(), shape.digest(leaf.entity.as_bytes()))
                .expect("valid"),
            Some(_) => {}
        }
    }
    for k in (0..d).filter(|k| k % 3 == 2) {
        builder.push_property(&property(LEAVES + k)).expect("valid");
    }
    builder.finish().expect("unique entities")
}

/// The shapes whose diff cost is compared: the default, the reference's three levels, and a
/// narrow, deep tree with short digests.
fn diff_shapes() -> [(&'static str, Shape); 3] {
    [
        ("default", Shape::default()),
        ("reference", Shape::reference()),
        (
            "narrow",
            Shape {
                fanout: 4,
                depth: 7,
                digest_width: 8,
                ..Shape::default()
            },
        ),
    ]
}

fn diffs(c: &mut Criterion) {
    let mut group = c.benchmark_group("merkle_diff_1m");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (name, shape) in diff_shapes() {
        let mut base: Option<Tree> = None;
        for d in [1, 1000] {
            let mut other: Option<Tree> = None;
            group.bench_function(format!("{name}/d{d}"), |b| {
                let base = base.get_or_insert_with(|| build_tree(shape, LEAVES));
                let other = other.get_or_insert_with(|| {
                    let other = diverge(base, d);
                    let result = diff(base, &other).expect("same shape");
                    println!(
                        "merkle_diff_1m {name} d={d}: {} differences found, tree traffic {} bytes ({} digests), {:.0} bytes per difference",
                        result.len(),
                        result.bytes_sent(),
                        result.digests_sent(),
                        result.bytes_sent() as f64 / result.len().max(1) as f64,
                    );
                    other
                });
                b.iter(|| black_box(diff(base, other).expect("same shape")))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, build, incremental, diffs);
criterion_main!(benches);
