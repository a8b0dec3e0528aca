//! The life of a delete, model-based (docs/protocol.md, "The life of a delete"): three in-memory
//! copies of one shard, synced by the real protocol, under random puts, deletes (with client
//! delete times within the skew bound), repair rounds (complete or not, notices lost), purges,
//! crashes and restarts, copies down for longer than the grace, and clocks that differ by up to
//! the skew bound. After every step:
//!
//! - once a delete is acknowledged and a round in which every copy took part has completed after
//!   it, no read (the newest of the copies that are up) returns a live version written before the
//!   delete that is older than its tombstone;
//! - no copy purges the same tombstone twice;
//! - when a copy drops a tombstone (purged, or taken below its purge line), every copy, up or
//!   down, holds a version of the entity at least as new, or has itself dropped one: otherwise an
//!   older live version could come back from it. This is what the cutoff and the complete-round
//!   rule exist for, so a round that counts without every copy, or a cutoff too close to the
//!   round's start, fails here at the purge itself rather than only when a read goes wrong later.
//!
//! The strategy leans towards the edges where those rules matter: client delete times and clock
//! offsets at the bounds, writes that miss a copy, and purges right after time moves past the
//! grace.

use std::collections::BTreeMap;
use std::time::Duration;

use propd_merkle::{Entity, Property, version_order};
use propd_repair::Config;
use propd_repair::pair::sync_in_memory;
use propd_store::{ModelStore, PURGE_CHUNK, purge_line, round_cutoff};
use proptest::prelude::*;

use crate::support::{GROUP, model, prop, small_shape};

const COPIES: usize = 3;
const SECOND: i64 = 1_000_000_000;
/// `max_clock_skew`.
const SKEW: Duration = Duration::from_secs(30);
/// `repair.tombstone_grace`.
const GRACE: Duration = Duration::from_secs(3600);
const IDS: [&str; 2] = ["a", "b"];

#[derive(Debug, Clone)]
enum Op {
    /// A coordinated put; `missed` copies do not get the write.
    Put {
        coordinator: usize,
        id: usize,
        missed: [bool; COPIES],
    },
    /// A coordinated delete; the client chose a delete time `offset` seconds from the
    /// coordinator's clock (`None`: the coordinator's clock).
    Delete {
        coordinator: usize,
        id: usize,
        offset: Option<i64>,
        missed: [bool; COPIES],
    },
    /// A repair round from `origin`; copies in `lost` do not get its notice.
    Round { origin: usize, lost: [bool; COPIES] },
    /// A purge tick on one copy.
    Purge { copy: usize },
    /// A copy stops (its store is durable) or starts again.
    Toggle { copy: usize },
    /// True time moves on.
    Advance { seconds: i64 },
}

/// A client's delete time, seconds from the coordinator's clock: often at the skew bound.
fn delete_offset() -> impl Strategy<Value = Option<i64>> {
    prop_oneof![
        1 => Just(None),
        1 => prop::sample::select(&[-30i64, -29, 29, 30][..]).prop_map(Some),
        1 => (-30i64..=30).prop_map(Some),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let copy = 0..COPIES;
    // Which copies a write misses: often exactly one, the case purging must wait for.
    let mask = prop_oneof![
        1 => prop::array::uniform3(prop::bool::weighted(0.35)),
        1 => (0..COPIES).prop_map(|missed| {
            let mut mask = [false; COPIES];
            mask[missed] = true;
            mask
        }),
    ];
    prop_oneof![
        4 => (copy.clone(), 0..IDS.len(), mask.clone()).prop_map(|(coordinator, id, missed)| Op::Put {
            coordinator,
            id,
            missed,
        }),
        3 => (
            copy.clone(),
            0..IDS.len(),
            delete_offset(),
            mask.clone()
        )
            .prop_map(|(coordinator, id, offset, missed)| Op::Delete {
                coordinator,
                id,
                offset,
                missed,
            }),
        3 => (copy.clone(), mask).prop_map(|(origin, lost)| Op::Round { origin, lost }),
        3 => copy.clone().prop_map(|copy| Op::Purge { copy }),
        2 => copy.prop_map(|copy| Op::Toggle { copy }),
        3 => prop::sample::select(&[1i64, 20, 300, 2 * 3600, 2 * 3600][..])
            .prop_map(|seconds| Op::Advance { seconds }),
    ]
}

/// Three copies, their clocks and what the test has seen happen.
struct World {
    stores: Vec<ModelStore>,
    up: [bool; COPIES],
    /// True time, unix nanos.
    now: i64,
    /// Each copy's clock is `now + offset`; any two differ by at most the skew bound.
    offsets: [i64; COPIES],
    /// Each coordinator's last revision (revisions strictly increase per coordinator).
    last_revision: [i64; COPIES],
    /// Live versions written, with the true time of the write.
    puts: Vec<(Property, i64)>,
    /// Acknowledged deletes: the tombstone and the true time of the acknowledgement.
    deletes: Vec<(Property, i64)>,
    /// True start times of rounds in which every copy took part.
    complete_rounds: Vec<i64>,
    /// How many of each copy's dropped tombstones were checked already.
    checked_purges: [usize; COPIES],
}

impl World {
    fn new(offsets: [i64; COPIES]) -> Self {
        World {
            stores: (0..COPIES).map(|_| model(small_shape(), 1)).collect(),
            up: [true; COPIES],
            now: 1_000_000 * SECOND,
            offsets,
            last_revision: [0; COPIES],
            puts: Vec::new(),
            deletes: Vec::new(),
            complete_rounds: Vec::new(),
            checked_purges: [0; COPIES],
        }
    }

    fn clock(&self, copy: usize) -> i64 {
        self.now + self.offsets[copy]
    }

    fn next_revision(&mut self, coordinator: usize) -> i64 {
        let next = self
            .clock(coordinator)
            .max(self.last_revision[coordinator] + 1);
        self.last_revision[coordinator] = next;
        next
    }

    /// Writes `property` to the copies that are up and not missed; whether any took it.
    fn replicate(&self, property: &Property, missed: [bool; COPIES]) -> bool {
        let mut acknowledged = false;
        for ((store, up), missed) in self.stores.iter().zip(self.up).zip(missed) {
            if up && !missed {
                store
                    .repair_apply(property.clone())
                    .unwrap_or_else(|e| panic!("{e}"));
                acknowledged = true;
            }
        }
        acknowledged
    }

    /// A round along the node list from `origin`: the chain syncs each up copy with the next up
    /// copy, `2m - 3` syncs over `m` up copies (rule 3 of the propagation). It completes for
    /// purging only when every copy took part and nothing failed.
    fn round(&mut self, origin: usize, lost: [bool; COPIES]) -> Result<(), TestCaseError> {
        if !self.up[origin] {
            return Ok(());
        }
        let started_at = self.clock(origin);
        let ring: Vec<usize> = (0..COPIES)
            .map(|k| (origin + k) % COPIES)
            .filter(|&copy| self.up[copy])
            .collect();
        if ring.len() < 2 {
            return Ok(());
        }
        let mut failed = 0;
        for step in 0..2 * ring.len() - 3 {
            let holder = ring[step % ring.len()];
            let peer = ring[(step + 1) % ring.len()];
            let (client, server) = sync_in_memory(
                &self.stores[holder],
                &self.stores[peer],
                GROUP,
                0,
                Config::default(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            failed += client.failed + server.failed;
        }
        prop_assert_eq!(failed, 0, "model stores never fail an apply");
        let every_copy = ring.len() == COPIES;
        if every_copy {
            self.complete_rounds.push(self.now);
        }
        if every_copy && failed == 0 {
            let cutoff = round_cutoff(started_at, SKEW);
            for (store, lost) in self.stores.iter().zip(lost) {
                if !lost {
                    store
                        .record_complete_round(GROUP, 0, started_at, cutoff)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
        Ok(())
    }

    fn purge(&self, copy: usize) {
        let store = &self.stores[copy];
        let state = store
            .purge_state(GROUP, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(line) = purge_line(self.clock(copy), GRACE, COPIES, state.cutoff) {
            store
                .purge_tombstones(GROUP, 0, line, PURGE_CHUNK)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// What a coordinated read returns: the newest version among the copies that are up.
    fn read(&self, entity: &Entity) -> Option<Property> {
        let shape = small_shape();
        (0..COPIES)
            .filter(|&copy| self.up[copy])
            .filter_map(|copy| {
                self.stores[copy]
                    .get(entity)
                    .unwrap_or_else(|e| panic!("{e}"))
            })
            .max_by(|a, b| version_order(a, b, &shape))
    }

    /// Every tombstone a copy dropped since the last check: each copy holds a version of its
    /// entity at least as new, or dropped one itself.
    fn check_purges(&mut self, step: usize) -> Result<(), TestCaseError> {
        let shape = small_shape();
        let purged: Vec<Vec<Property>> = self
            .stores
            .iter()
            .map(|store| store.purged(GROUP, 0).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        for copy in 0..COPIES {
            for tombstone in &purged[copy][self.checked_purges[copy]..] {
                let entity = tombstone.entity().unwrap_or_else(|e| panic!("{e}"));
                for (other, (store, dropped_there)) in self.stores.iter().zip(&purged).enumerate() {
                    let held = store.get(&entity).unwrap_or_else(|e| panic!("{e}"));
                    let holds = held
                        .as_ref()
                        .is_some_and(|p| version_order(p, tombstone, &shape).is_ge());
                    let dropped = dropped_there.iter().any(|p| {
                        p.entity().ok().as_ref() == Some(&entity)
                            && version_order(p, tombstone, &shape).is_ge()
                    });
                    prop_assert!(
                        holds || dropped,
                        "step {}: copy {} dropped {:?} while copy {} holds {:?}",
                        step,
                        copy,
                        tombstone,
                        other,
                        held
                    );
                }
            }
            self.checked_purges[copy] = purged[copy].len();
        }
        Ok(())
    }

    fn check(&self, step: usize) -> Result<(), TestCaseError> {
        let shape = small_shape();
        for id in IDS {
            let entity = Entity::new(GROUP, "n", id).unwrap_or_else(|e| panic!("{e}"));
            let Some(read) = self.read(&entity).filter(|p| !p.is_tombstone()) else {
                continue;
            };
            let written_at = self
                .puts
                .iter()
                .find(|(put, _)| *put == read)
                .map(|(_, at)| *at)
                .unwrap_or_else(|| panic!("step {step}: {read:?} was never written"));
            for (tombstone, acknowledged_at) in &self.deletes {
                let settled = self.complete_rounds.iter().any(|at| at > acknowledged_at);
                let same_entity = tombstone.entity().ok().as_ref() == Some(&entity);
                prop_assert!(
                    !(same_entity
                        && settled
                        && written_at <= *acknowledged_at
                        && version_order(&read, tombstone, &shape).is_lt()),
                    "step {}: {:?} came back after the delete {:?}",
                    step,
                    read,
                    tombstone
                );
            }
        }
        for (copy, store) in self.stores.iter().enumerate() {
            let purged = store.purged(GROUP, 0).unwrap_or_else(|e| panic!("{e}"));
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for tombstone in purged {
                *counts.entry(format!("{tombstone:?}")).or_default() += 1;
            }
            for (tombstone, count) in counts {
                prop_assert!(
                    count <= 1,
                    "step {}: copy {} purged {} {} times",
                    step,
                    copy,
                    tombstone,
                    count
                );
            }
        }
        Ok(())
    }
}

/// One run: the ops in order, the invariants after each.
fn run(offsets: [i64; COPIES], ops: Vec<Op>) -> Result<World, TestCaseError> {
    let mut world = World::new(offsets);
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Put {
                coordinator,
                id,
                missed,
            } => {
                if world.up[coordinator] {
                    let revision = world.next_revision(coordinator);
                    let property = prop(IDS[id], revision, &format!("{step}"), 0);
                    world.replicate(&property, missed);
                    world.puts.push((property, world.now));
                }
            }
            Op::Delete {
                coordinator,
                id,
                offset,
                missed,
            } => {
                if world.up[coordinator] {
                    let revision = world.next_revision(coordinator);
                    let delete_time =
                        world.clock(coordinator) + offset.map_or(0, |seconds| seconds * SECOND);
                    let tombstone = prop(IDS[id], revision, "", delete_time);
                    if world.replicate(&tombstone, missed) {
                        world.deletes.push((tombstone, world.now));
                    }
                }
            }
            Op::Round { origin, lost } => world.round(origin, lost)?,
            Op::Purge { copy } => {
                if world.up[copy] {
                    world.purge(copy);
                }
            }
            Op::Toggle { copy } => world.up[copy] = !world.up[copy],
            Op::Advance { seconds } => world.now += seconds * SECOND,
        }
        world.check_purges(step)?;
        world.check(step)?;
    }
    Ok(world)
}

/// Clock offsets within half the skew bound each, so any two clocks differ by at most the bound;
/// often at its edges.
fn offsets() -> impl Strategy<Value = [i64; COPIES]> {
    let offset = prop_oneof![
        1 => prop::sample::select(&[-15i64, 15][..]),
        1 => -15i64..=15,
    ];
    prop::array::uniform3(offset).prop_map(|seconds| seconds.map(|s| s * SECOND))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn deletes_stay_deleted_and_no_tombstone_is_purged_twice(
        offsets in offsets(),
        ops in prop::collection::vec(op(), 1..100),
    ) {
        run(offsets, ops)?;
    }
}

/// A round from `origin` whose notice reaches every copy.
fn round(origin: usize) -> Op {
    Op::Round {
        origin,
        lost: [false; COPIES],
    }
}

/// A put of `g/n/a` that every copy takes.
fn put_everywhere() -> Op {
    Op::Put {
        coordinator: 0,
        id: 0,
        missed: [false; COPIES],
    }
}

/// A purge tick on every copy that is up.
fn purge_all() -> [Op; COPIES] {
    [0, 1, 2].map(|copy| Op::Purge { copy })
}

/// True time moves on past the grace.
fn past_the_grace() -> Op {
    Op::Advance { seconds: 2 * 3600 }
}

/// The case the rule was written for: a delete acknowledged while one copy is down, the other two
/// purge as soon as they may, and the copy comes back after more than the grace holding the
/// live version. Its first round removes it, and nothing is purged twice.
#[test]
fn a_copy_down_longer_than_the_grace_rejoins_and_the_delete_holds() {
    let ops = [
        vec![
            put_everywhere(),
            round(0),
            Op::Toggle { copy: 2 },
            Op::Delete {
                coordinator: 1,
                id: 0,
                offset: Some(-30),
                missed: [false; COPIES],
            },
            past_the_grace(),
            round(0),
        ],
        purge_all().to_vec(),
        vec![
            past_the_grace(),
            Op::Toggle { copy: 2 },
            round(2),
            past_the_grace(),
        ],
        purge_all().to_vec(),
        vec![round(1), past_the_grace()],
        purge_all().to_vec(),
    ]
    .concat();
    let world = run([0, 15 * SECOND, -15 * SECOND], ops).unwrap_or_else(|e| panic!("{e}"));
    let entity = Entity::new(GROUP, "n", "a").unwrap_or_else(|e| panic!("{e}"));
    for store in &world.stores {
        assert_eq!(store.get(&entity).unwrap_or_else(|e| panic!("{e}")), None);
        let purged = store.purged(GROUP, 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(purged.len(), 1, "each copy purged the tombstone once");
    }
}

/// A delete whose client-chosen time lies before the start of a round that did not carry it (the
/// delete came just after the round, with a delete time in the past): the round's cutoff, three
/// skew bounds below its start, keeps the tombstone until a round carries it to the copy that
/// missed the write.
#[test]
fn a_delete_just_after_a_round_is_not_purged_on_that_rounds_authority() {
    let ops = vec![
        put_everywhere(),
        round(1),
        Op::Delete {
            coordinator: 0,
            id: 0,
            offset: Some(-30),
            missed: [false, false, true],
        },
        past_the_grace(),
        Op::Purge { copy: 0 },
        Op::Purge { copy: 1 },
        round(0),
    ];
    let world = run([-15 * SECOND, 15 * SECOND, 0], ops).unwrap_or_else(|e| panic!("{e}"));
    let entity = Entity::new(GROUP, "n", "a").unwrap_or_else(|e| panic!("{e}"));
    for store in &world.stores {
        let copy = store.get(&entity).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            copy.is_some_and(|p| p.is_tombstone()),
            "every copy holds the tombstone"
        );
    }
}
