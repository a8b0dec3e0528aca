//! The checker: given the history and the final state read from every copy, list every
//! anomaly. Pure and deterministic.
//!
//! Invariants (the entity's *acknowledged* writes are the puts and deletes that answered ok,
//! each with the revision it was written with; larger revisions win):
//!
//! - every copy of every shard has the same root, and every copy of an entity the same version;
//! - each copy's version of an entity is the acknowledged write with the greatest revision, or a
//!   write with a greater revision whose outcome was indeterminate (it may or may not have taken
//!   effect; its revision, assigned by the coordinator, is not before it was sent); an entity
//!   whose winning write is a delete is live nowhere (a tombstone or nothing);
//! - no read returned a value no client wrote, nor a value under another revision than the one
//!   its write was acknowledged with.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::history::{Nanos, Op, Outcome, Request, Version};

/// The state read from every copy after the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    /// Entity → the nodes holding its shard → what each holds (`None`: nothing at all).
    pub copies: BTreeMap<String, BTreeMap<String, Option<Version>>>,
    /// (group, shard) → node → root digest (hex).
    pub roots: BTreeMap<(String, u32), BTreeMap<String, String>>,
}

/// Something the run promised and did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// The copies of a shard have different roots.
    DivergentRoots {
        /// The group.
        group: String,
        /// The shard.
        shard: u32,
        /// Node → root.
        roots: BTreeMap<String, String>,
    },
    /// The copies of an entity hold different versions.
    DivergentCopies {
        /// The entity.
        entity: String,
        /// Node → version.
        copies: BTreeMap<String, Option<Version>>,
    },
    /// A copy holds something older than the latest acknowledged put (or nothing).
    LostWrite {
        /// The entity.
        entity: String,
        /// The node.
        node: String,
        /// The acknowledged version that should be there.
        expected: Version,
        /// What is there.
        found: Option<Version>,
    },
    /// The latest acknowledged write is a delete, and a copy holds an older live version.
    Resurrected {
        /// The entity.
        entity: String,
        /// The node.
        node: String,
        /// The acknowledged tombstone.
        deleted: Version,
        /// The live version found.
        found: Version,
    },
    /// A copy holds a version no write could have produced.
    Invented {
        /// The entity.
        entity: String,
        /// The node.
        node: String,
        /// The version found.
        found: Version,
    },
    /// A write acknowledged after an earlier-acknowledged write, with a smaller revision.
    SupersededAck {
        /// The entity.
        entity: String,
        /// The write acknowledged first.
        earlier: Version,
        /// The write sent after that, acknowledged although it lost.
        later: Version,
    },
    /// A get returned what no write could have produced.
    BadRead {
        /// The entity.
        entity: String,
        /// The version returned.
        found: Version,
        /// When the get started.
        start: Nanos,
        /// Why it is wrong.
        why: String,
    },
}

impl Anomaly {
    /// The entity concerned, if one.
    pub fn entity(&self) -> Option<&str> {
        match self {
            Anomaly::DivergentRoots { .. } => None,
            Anomaly::DivergentCopies { entity, .. }
            | Anomaly::LostWrite { entity, .. }
            | Anomaly::Resurrected { entity, .. }
            | Anomaly::Invented { entity, .. }
            | Anomaly::SupersededAck { entity, .. }
            | Anomaly::BadRead { entity, .. } => Some(entity),
        }
    }

    /// A short name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Anomaly::DivergentRoots { .. } => "divergent-roots",
            Anomaly::DivergentCopies { .. } => "divergent-copies",
            Anomaly::LostWrite { .. } => "lost-write",
            Anomaly::Resurrected { .. } => "resurrected",
            Anomaly::Invented { .. } => "invented",
            Anomaly::SupersededAck { .. } => "superseded-ack",
            Anomaly::BadRead { .. } => "bad-read",
        }
    }
}

fn show(version: Option<&Version>) -> String {
    version.map_or_else(|| "nothing".to_owned(), ToString::to_string)
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::DivergentRoots {
                group,
                shard,
                roots,
            } => write!(f, "divergent roots of {group}/{shard}: {roots:?}"),
            Anomaly::DivergentCopies { entity, copies } => {
                let copies: Vec<String> = copies
                    .iter()
                    .map(|(node, v)| format!("{node}={}", show(v.as_ref())))
                    .collect();
                write!(f, "divergent copies of {entity}: {}", copies.join(", "))
            }
            Anomaly::LostWrite {
                entity,
                node,
                expected,
                found,
            } => write!(
                f,
                "lost write of {entity} on {node}: acknowledged {expected}, found {}",
                show(found.as_ref())
            ),
            Anomaly::Resurrected {
                entity,
                node,
                deleted,
                found,
            } => write!(
                f,
                "resurrected {entity} on {node}: acknowledged {deleted}, found live {found}"
            ),
            Anomaly::Invented {
                entity,
                node,
                found,
            } => write!(
                f,
                "invented version of {entity} on {node}: {found} matches no write that could have made it"
            ),
            Anomaly::SupersededAck {
                entity,
                earlier,
                later,
            } => write!(
                f,
                "acknowledged a write of {entity} that had already lost: {later} was acknowledged after {earlier} had been"
            ),
            Anomaly::BadRead {
                entity, found, why, ..
            } => write!(f, "bad read of {entity}: {found}: {why}"),
        }
    }
}

/// Tolerances of the checker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tolerance {
    /// How far before a write was sent its revision may be (the coordinators' clocks against
    /// the clients'; the skew the nemesis injects, plus a margin).
    pub clock_slack_ns: i64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            clock_slack_ns: 1_000_000_000,
        }
    }
}

/// Every anomaly of a run, roots first, then entity by entity, then reads.
pub fn check(ops: &[Op], state: &FinalState, tolerance: Tolerance) -> Vec<Anomaly> {
    let mut anomalies = Vec::new();
    for ((group, shard), roots) in &state.roots {
        let distinct: BTreeSet<&String> = roots.values().collect();
        if distinct.len() > 1 {
            anomalies.push(Anomaly::DivergentRoots {
                group: group.clone(),
                shard: *shard,
                roots: roots.clone(),
            });
        }
    }
    let mut by_entity: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_entity.entry(&op.entity).or_default().push(op);
    }
    for (entity, copies) in &state.copies {
        let distinct: BTreeSet<&Option<Version>> = copies.values().collect();
        if distinct.len() > 1 {
            anomalies.push(Anomaly::DivergentCopies {
                entity: entity.clone(),
                copies: copies.clone(),
            });
        }
        let entity_ops = by_entity
            .get(entity.as_str())
            .map_or(&[][..], Vec::as_slice);
        // Each distinct version once, at the first node holding it.
        let mut seen = BTreeSet::new();
        for (node, found) in copies {
            if !seen.insert(found) {
                continue;
            }
            if let Some(anomaly) = judge_copy(entity, node, found.as_ref(), entity_ops, tolerance) {
                anomalies.push(anomaly);
            }
        }
    }
    for (entity, entity_ops) in &by_entity {
        anomalies.extend(superseded_acks(entity, entity_ops));
    }
    for op in ops {
        if let Outcome::Read { found: Some(found) } = &op.outcome {
            let entity_ops = by_entity
                .get(op.entity.as_str())
                .map_or(&[][..], Vec::as_slice);
            if let Some(why) = judge_read(found, entity_ops, tolerance) {
                anomalies.push(Anomaly::BadRead {
                    entity: op.entity.clone(),
                    found: found.clone(),
                    start: op.start,
                    why,
                });
            }
        }
    }
    anomalies
}

/// The version an acknowledged write left.
fn written(op: &Op) -> Option<Version> {
    let Outcome::Written { revision } = op.outcome else {
        return None;
    };
    let value = match &op.request {
        Request::Put { value } => Some(value.clone()),
        Request::Delete => None,
        Request::Get => return None,
    };
    Some(Version { revision, value })
}

/// Whether an indeterminate write could have left `version`: the same kind and value, and a
/// revision not before it was sent.
fn could_have_written(op: &Op, version: &Version, tolerance: Tolerance) -> bool {
    if !matches!(op.outcome, Outcome::Indeterminate { .. }) {
        return false;
    }
    let same = match (&op.request, &version.value) {
        (Request::Put { value }, Some(found)) => value == found,
        (Request::Delete, None) => true,
        _ => false,
    };
    same && version.revision >= op.start - tolerance.clock_slack_ns
}

fn judge_copy(
    entity: &str,
    node: &str,
    found: Option<&Version>,
    ops: &[&Op],
    tolerance: Tolerance,
) -> Option<Anomaly> {
    let acknowledged: Vec<Version> = ops.iter().filter_map(|op| written(op)).collect();
    let top = acknowledged.iter().map(|v| v.revision).max();
    let winners: Vec<&Version> = acknowledged
        .iter()
        .filter(|v| Some(v.revision) == top)
        .collect();
    let Some(found) = found else {
        // Nothing at all: never written, or a tombstone purged.
        let deleted = winners.is_empty() || winners.iter().any(|v| v.value.is_none());
        let maybe_deleted = ops.iter().any(|op| {
            op.request == Request::Delete && matches!(op.outcome, Outcome::Indeterminate { .. })
        });
        if deleted || maybe_deleted {
            return None;
        }
        return Some(Anomaly::LostWrite {
            entity: entity.to_owned(),
            node: node.to_owned(),
            expected: winners[0].clone(),
            found: None,
        });
    };
    match top {
        Some(top) if found.revision < top => {
            let expected = winners[0].clone();
            Some(if expected.value.is_none() && found.value.is_some() {
                Anomaly::Resurrected {
                    entity: entity.to_owned(),
                    node: node.to_owned(),
                    deleted: expected,
                    found: found.clone(),
                }
            } else {
                Anomaly::LostWrite {
                    entity: entity.to_owned(),
                    node: node.to_owned(),
                    expected,
                    found: Some(found.clone()),
                }
            })
        }
        Some(top) if found.revision == top => {
            // Equal revisions: any acknowledged write of that revision may win the tie.
            (!winners.contains(&found)).then(|| Anomaly::Invented {
                entity: entity.to_owned(),
                node: node.to_owned(),
                found: found.clone(),
            })
        }
        _ => {
            // Newer than every acknowledged write: only an indeterminate one can explain it.
            let explained = ops
                .iter()
                .any(|op| could_have_written(op, found, tolerance));
            (!explained).then(|| Anomaly::Invented {
                entity: entity.to_owned(),
                node: node.to_owned(),
                found: found.clone(),
            })
        }
    }
}

/// Acknowledged writes that had lost when they were sent (see the module's invariants).
fn superseded_acks(entity: &str, ops: &[&Op]) -> Vec<Anomaly> {
    let acknowledged: Vec<(&Op, Version)> = ops
        .iter()
        .filter_map(|op| written(op).map(|v| (*op, v)))
        .collect();
    let mut out = Vec::new();
    for (later_op, later) in &acknowledged {
        let beaten_by = acknowledged
            .iter()
            .filter(|(op, v)| op.end < later_op.start && v.revision > later.revision)
            .map(|(_, v)| v)
            .max();
        if let Some(earlier) = beaten_by {
            out.push(Anomaly::SupersededAck {
                entity: entity.to_owned(),
                earlier: earlier.clone(),
                later: later.clone(),
            });
        }
    }
    out
}

fn judge_read(found: &Version, ops: &[&Op], tolerance: Tolerance) -> Option<String> {
    let Some(value) = &found.value else {
        return Some("a get without tombstones returned a tombstone".to_owned());
    };
    let writes: Vec<&&Op> = ops
        .iter()
        .filter(|op| matches!(&op.request, Request::Put { value: v } if v == value))
        .collect();
    if writes.is_empty() {
        return Some("no client wrote this value".to_owned());
    }
    for op in &writes {
        match op.outcome {
            Outcome::Written { revision } if revision == found.revision => return None,
            Outcome::Written { revision } => {
                return Some(format!(
                    "its write was acknowledged with revision {revision}"
                ));
            }
            Outcome::Indeterminate { .. } if could_have_written(op, found, tolerance) => {
                return None;
            }
            _ => {}
        }
    }
    Some("its only write failed, or was sent after that revision".to_owned())
}

/// The operations of `entity` worth reading to understand an anomaly: every write, and the
/// reads that returned something other than the write before them (in start order).
pub fn entity_history<'a>(ops: &'a [Op], entity: &str) -> Vec<&'a Op> {
    let mut out: Vec<&Op> = ops
        .iter()
        .filter(|op| op.entity == entity)
        .filter(|op| op.is_write() || matches!(op.outcome, Outcome::Read { .. }))
        .collect();
    out.sort_by_key(|op| (op.start, op.client));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: &str = "g0/n/1";

    fn op(start: Nanos, request: Request, outcome: Outcome) -> Op {
        Op {
            client: 0,
            coordinator: 0,
            entity: E.to_owned(),
            request,
            outcome,
            start,
            end: start + 10,
        }
    }

    fn put(start: Nanos, value: &str, outcome: Outcome) -> Op {
        op(
            start,
            Request::Put {
                value: value.to_owned(),
            },
            outcome,
        )
    }

    fn ok(revision: i64) -> Outcome {
        Outcome::Written { revision }
    }

    fn lost() -> Outcome {
        Outcome::Indeterminate {
            error: "timeout".to_owned(),
        }
    }

    fn live(value: &str, revision: i64) -> Option<Version> {
        Some(Version {
            revision,
            value: Some(value.to_owned()),
        })
    }

    fn tomb(revision: i64) -> Option<Version> {
        Some(Version {
            revision,
            value: None,
        })
    }

    /// Every node holds `version`.
    fn everywhere(version: Option<Version>) -> FinalState {
        let copies = ["n1", "n2", "n3"]
            .iter()
            .map(|n| ((*n).to_owned(), version.clone()))
            .collect();
        FinalState {
            copies: [(E.to_owned(), copies)].into_iter().collect(),
            roots: BTreeMap::new(),
        }
    }

    fn kinds(ops: &[Op], state: &FinalState) -> Vec<&'static str> {
        check(ops, state, Tolerance::default())
            .iter()
            .map(Anomaly::kind)
            .collect()
    }

    #[test]
    fn the_latest_acknowledged_put_everywhere_is_clean() {
        let ops = [put(100, "a", ok(100)), put(200, "b", ok(200))];
        assert!(kinds(&ops, &everywhere(live("b", 200))).is_empty());
    }

    #[test]
    fn an_older_version_than_the_latest_acknowledged_is_a_lost_write() {
        let ops = [put(100, "a", ok(100)), put(200, "b", ok(200))];
        assert_eq!(kinds(&ops, &everywhere(live("a", 100))), ["lost-write"]);
        // Nothing at all is lost too.
        assert_eq!(kinds(&ops, &everywhere(None)), ["lost-write"]);
    }

    #[test]
    fn a_live_version_under_an_acknowledged_delete_is_resurrected() {
        let ops = [put(100, "a", ok(100)), op(200, Request::Delete, ok(200))];
        assert_eq!(kinds(&ops, &everywhere(live("a", 100))), ["resurrected"]);
        // A tombstone, or nothing (purged), is what it should be.
        assert!(kinds(&ops, &everywhere(tomb(200))).is_empty());
        assert!(kinds(&ops, &everywhere(None)).is_empty());
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_take_effect() {
        let ops = [put(100, "a", ok(100)), put(200, "b", lost())];
        assert!(kinds(&ops, &everywhere(live("a", 100))).is_empty());
        assert!(kinds(&ops, &everywhere(live("b", 250))).is_empty());
        let ops = [put(100, "a", ok(100)), op(200, Request::Delete, lost())];
        assert!(kinds(&ops, &everywhere(tomb(210))).is_empty());
        assert!(kinds(&ops, &everywhere(None)).is_empty());
    }

    #[test]
    fn an_indeterminate_write_cannot_explain_a_revision_before_it_was_sent() {
        let slack = Tolerance::default().clock_slack_ns;
        let ops = [put(100, "a", ok(100)), put(10 * slack, "b", lost())];
        assert_eq!(kinds(&ops, &everywhere(live("b", 150))), ["invented"]);
    }

    #[test]
    fn values_nobody_wrote_or_whose_write_failed_are_invented() {
        let ops = [
            put(100, "a", ok(100)),
            put(
                200,
                "b",
                Outcome::Failed {
                    error: "invalid".to_owned(),
                },
            ),
        ];
        assert_eq!(kinds(&ops, &everywhere(live("zzz", 300))), ["invented"]);
        assert_eq!(kinds(&ops, &everywhere(live("b", 300))), ["invented"]);
        // The acknowledged value under another revision than it was acknowledged with.
        assert_eq!(kinds(&ops, &everywhere(live("a", 300))), ["invented"]);
        // The right revision with the wrong content.
        assert_eq!(kinds(&ops, &everywhere(tomb(100))), ["invented"]);
        // An entity nobody touched.
        assert_eq!(kinds(&[], &everywhere(live("x", 1))), ["invented"]);
        assert!(kinds(&[], &everywhere(None)).is_empty());
    }

    #[test]
    fn equal_revisions_let_either_acknowledged_write_win() {
        let ops = [put(100, "a", ok(500)), put(101, "b", ok(500))];
        assert!(kinds(&ops, &everywhere(live("a", 500))).is_empty());
        assert!(kinds(&ops, &everywhere(live("b", 500))).is_empty());
    }

    #[test]
    fn copies_and_roots_must_agree() {
        let ops = [put(100, "a", ok(100)), put(200, "b", ok(200))];
        let mut state = everywhere(live("b", 200));
        state
            .copies
            .get_mut(E)
            .unwrap()
            .insert("n3".to_owned(), live("a", 100));
        state.roots.insert(
            ("g0".to_owned(), 0),
            [("n1", "aa"), ("n2", "aa"), ("n3", "bb")]
                .iter()
                .map(|(n, r)| ((*n).to_owned(), (*r).to_owned()))
                .collect(),
        );
        state.roots.insert(
            ("g0".to_owned(), 1),
            [("n1", "cc"), ("n2", "cc")]
                .iter()
                .map(|(n, r)| ((*n).to_owned(), (*r).to_owned()))
                .collect(),
        );
        assert_eq!(
            kinds(&ops, &state),
            ["divergent-roots", "divergent-copies", "lost-write"]
        );
        let anomalies = check(&ops, &state, Tolerance::default());
        assert!(
            anomalies[2].to_string().contains("on n3"),
            "{}",
            anomalies[2]
        );
    }

    #[test]
    fn reads_must_return_written_values_under_their_revisions() {
        let read = |start, value: &str, revision| {
            op(
                start,
                Request::Get,
                Outcome::Read {
                    found: live(value, revision),
                },
            )
        };
        let state = everywhere(live("b", 200));
        let good = [
            put(100, "a", ok(100)),
            put(200, "b", lost()),
            read(150, "a", 100),
            read(250, "b", 200),
        ];
        // "b" was indeterminate but is what the copies hold at 200: fine.
        assert!(kinds(&good, &state).is_empty());
        let bad = [
            put(100, "a", ok(100)),
            put(200, "b", lost()),
            read(150, "nobody", 100),
            read(160, "a", 101),
            op(170, Request::Get, Outcome::Read { found: tomb(100) }),
        ];
        assert_eq!(kinds(&bad, &state), ["bad-read", "bad-read", "bad-read"]);
        // Not-found reads are never anomalies on their own.
        let none = [
            put(100, "a", ok(100)),
            op(150, Request::Get, Outcome::Read { found: None }),
            put(200, "b", ok(200)),
        ];
        assert!(kinds(&none, &state).is_empty());
    }

    #[test]
    fn a_write_acknowledged_after_a_newer_one_was_is_a_superseded_ack() {
        // b is sent after a was acknowledged, yet gets a smaller revision (a coordinator whose
        // clock is behind) and is acknowledged: the copies keep a, and b's "ok" misled.
        let ops = [put(100, "a", ok(500)), put(200, "b", ok(400))];
        assert_eq!(kinds(&ops, &everywhere(live("a", 500))), ["superseded-ack"]);
        // Overlapping writes may be ordered either way.
        let mut overlapping = ops.clone();
        overlapping[0].end = 250;
        assert!(kinds(&overlapping, &everywhere(live("a", 500))).is_empty());
        // An indeterminate later write says nothing.
        let ops = [put(100, "a", ok(500)), put(200, "b", lost())];
        assert!(kinds(&ops, &everywhere(live("a", 500))).is_empty());
    }

    #[test]
    fn the_history_of_an_entity_holds_only_its_operations_in_start_order() {
        let mut other = put(50, "x", ok(50));
        other.entity = "g0/n/2".to_owned();
        let ops = [
            put(200, "b", ok(200)),
            other,
            put(100, "a", ok(100)),
            op(
                150,
                Request::Get,
                Outcome::Indeterminate {
                    error: "timeout".to_owned(),
                },
            ),
        ];
        let history = entity_history(&ops, E);
        let starts: Vec<Nanos> = history.iter().map(|op| op.start).collect();
        assert_eq!(starts, [100, 200]);
        assert!(history[0].describe(0).contains("put a -> ok revision 100"));
    }
}
