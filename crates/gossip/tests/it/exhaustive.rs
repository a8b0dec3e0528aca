//! Exhaustive convergence: for n = 2..6, every set of down nodes leaving at least two up, every
//! up node as origin and every assignment of versions to the up nodes, one propagation leaves
//! every up node equal.
//!
//! Which syncs run never depends on the versions (the toy sync only takes the maximum), and the
//! maximum commutes with every non-decreasing map `f`: `max(f(x), f(y)) = f(max(x, y))`. So if a
//! round leaves all up nodes equal for the versions `p`, it does so for `f(p)` too. For n <= 5 the
//! test still runs every assignment of `1..=m` to the `m` up nodes (every order pattern, ties
//! included); for n = 6 it runs every permutation of `1..=m`, which covers every assignment
//! through some `f` (break ties in any order) and keeps the run short.

use std::time::Duration;

use propd_gossip::{Config, Outcome, SpanKind, max_count};

use crate::router::{Kind, Router, key, spans};

/// How long each sync takes in [`check_round`].
const SYNC_TIME: Duration = Duration::from_secs(1);

#[test]
fn one_round_converges_every_reachable_node_for_n_up_to_6() {
    let mut rounds = 0u64;
    for n in 2..=6usize {
        let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let max = max_count(n).expect("n >= 2");
        for down_mask in 0u32..(1 << n) {
            let up: Vec<&str> = (0..n)
                .filter(|i| down_mask & (1 << i) == 0)
                .map(|i| id_refs[i])
                .collect();
            let m = up.len();
            if m < 2 {
                continue;
            }
            let assignments: Vec<Vec<u64>> = if n <= 5 {
                all_assignments(m)
            } else {
                permutations(m)
            };
            for versions in assignments {
                for &origin in &up {
                    rounds += 1;
                    check_round(&id_refs, &up, &versions, origin, max, down_mask);
                }
            }
        }
    }
    assert!(rounds > 30_000, "only {rounds} rounds ran");
}

fn check_round(ids: &[&str], up: &[&str], versions: &[u64], origin: &str, max: u32, mask: u32) {
    let mut router = Router::new(ids, Config::default());
    // Every sync takes one second of the router's clock; hand-offs take none.
    router.set_delay(|e| {
        if e.kind == Kind::Sync {
            SYNC_TIME
        } else {
            Duration::ZERO
        }
    });
    for (i, id) in ids.iter().enumerate() {
        if mask & (1 << i) != 0 {
            router.down.insert((*id).to_owned());
        }
    }
    for (id, v) in up.iter().zip(versions) {
        router.set_versions(&[(id, *v)]);
    }
    let top = versions.iter().copied().max().unwrap_or(0);
    let id = router
        .start(origin, &key(0), ids)
        .expect("a valid node list");
    router.run();
    let case = || format!("ids {ids:?} up {up:?} versions {versions:?} origin {origin}");
    for node in up {
        assert_eq!(
            router.version(node),
            top,
            "{node} did not converge: {}",
            case()
        );
    }
    let result = router.result(&id);
    assert_eq!(
        result.outcome,
        Outcome::Completed,
        "{}: {:?}",
        case(),
        result.error
    );
    assert_eq!(result.context.count, max, "{}", case());
    assert!(
        result.syncs() <= max as usize,
        "{} syncs: {}",
        result.syncs(),
        case()
    );
    assert_eq!(router.syncs_run, result.syncs(), "{}", case());
    // The origin's own skips of the down nodes ahead of the first up node are traced, not
    // counted.
    let origin_skips = ids.iter().position(|i| up.contains(i)).unwrap_or(0);
    assert!(
        result.trace[..origin_skips]
            .iter()
            .all(|s| s.kind == SpanKind::Skip && s.from == origin)
    );
    let counted = result.trace.len() - origin_skips;
    assert_eq!(counted, max as usize, "{}", case());
    assert_eq!(
        spans(result),
        router.steps(&id),
        "trace differs from what happened: {}",
        case()
    );
    assert!(
        result
            .trace
            .iter()
            .filter(|s| s.kind == SpanKind::Sync)
            .all(|s| s.duration == SYNC_TIME),
        "a sync span lasts as long as its sync: {}",
        case()
    );
}

/// Every assignment of `1..=m` to `m` nodes.
fn all_assignments(m: usize) -> Vec<Vec<u64>> {
    (0..m.pow(m as u32))
        .map(|mut digits| {
            (0..m)
                .map(|_| {
                    let v = (digits % m) as u64 + 1;
                    digits /= m;
                    v
                })
                .collect()
        })
        .collect()
}

/// Every permutation of `1..=m`.
fn permutations(m: usize) -> Vec<Vec<u64>> {
    fn extend(prefix: &mut Vec<u64>, m: usize, out: &mut Vec<Vec<u64>>) {
        if prefix.len() == m {
            out.push(prefix.clone());
            return;
        }
        for v in 1..=m as u64 {
            if !prefix.contains(&v) {
                prefix.push(v);
                extend(prefix, m, out);
                prefix.pop();
            }
        }
    }
    let mut out = Vec::new();
    extend(&mut Vec::new(), m, &mut out);
    out
}
