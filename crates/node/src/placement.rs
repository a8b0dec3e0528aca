//! Placement (DESIGN §4): which nodes hold the copies of each (group, shard), in a
//! deterministic order that every node computes alike. Health never changes placement.
//!
//! The rule is rendezvous (highest-random-weight) hashing: every member gets a weight
//! `xxh3_64(group, shard, member id)` for each shard, and the shard's copies are the `copies`
//! members of highest weight (listed in id order, rotated by shard). A member's weights do not depend on the other
//! members, so when one joins it takes only the copies where it outweighs a current holder
//! (about `copies / N` of them) and when one leaves only its own copies move.

use xxhash_rust::xxh3::xxh3_64;

use propd_store::{GroupDef, Groups};

use crate::config::{Config, Member};

/// The data nodes, sorted by id, and the groups they serve.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    members: Vec<Member>,
    /// Each member's slot (same index): the name its weights come from, its own id unless it
    /// took another member's place (`member replace`).
    slots: Vec<String>,
    groups: Groups,
}

impl Placement {
    /// Placement for a resolved configuration.
    pub(crate) fn new(config: &Config) -> Self {
        let members = config
            .members
            .iter()
            .map(|m| (m.id.clone(), m.clone()))
            .collect();
        Self::with_slots(members, config.groups.clone())
    }

    /// Placement over `(slot, member)` pairs.
    pub(crate) fn with_slots(mut members: Vec<(String, Member)>, groups: Groups) -> Self {
        members.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        let (slots, members) = members.into_iter().unzip();
        Self {
            members,
            slots,
            groups,
        }
    }

    /// The members, sorted by id.
    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    /// The group with this name.
    pub(crate) fn group(&self, name: &str) -> Option<&GroupDef> {
        self.groups.get(name)
    }

    /// The groups.
    pub(crate) fn group_set(&self) -> &Groups {
        &self.groups
    }

    /// Every group, in name order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &GroupDef> {
        self.groups.iter()
    }

    /// Copies of each shard of `group`: `replicas + 1`, capped at the member count.
    pub(crate) fn copies(&self, group: &GroupDef) -> usize {
        (group.replicas as usize + 1).min(self.members.len())
    }

    /// The node list of (group, shard): the `copies` members of highest [`weight`] (ties,
    /// which need equal 64-bit hashes, go to the smaller id), in id order rotated left by
    /// `(xxh3_64(group) + shard) % copies`. The rotation spreads the first place (the chain's
    /// start, and the designated origin's rotation) over the copies, and where every member
    /// holds a copy the list is the one DESIGN §4's modulo rule gave.
    pub(crate) fn node_list(&self, group: &GroupDef, shard: u32) -> Vec<&Member> {
        let mut ranked: Vec<(u64, &Member)> = self
            .members
            .iter()
            .zip(&self.slots)
            .map(|(m, slot)| (weight(&group.name, shard, slot), m))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let mut chosen: Vec<&Member> = ranked
            .into_iter()
            .take(self.copies(group))
            .map(|(_, m)| m)
            .collect();
        chosen.sort_by(|a, b| a.id.cmp(&b.id));
        let k = chosen.len() as u64;
        if k > 0 {
            let start = (xxh3_64(group.name.as_bytes()) % k + u64::from(shard) % k) % k;
            chosen.rotate_left(start as usize);
        }
        chosen
    }
}

/// The rendezvous weight of member `id` for (group, shard): xxh3 of the three, each
/// length-prefixed so that no two triples share their bytes.
pub(crate) fn weight(group: &str, shard: u32, id: &str) -> u64 {
    let mut bytes = Vec::with_capacity(group.len() + id.len() + 12);
    bytes.extend_from_slice(&(group.len() as u32).to_le_bytes());
    bytes.extend_from_slice(group.as_bytes());
    bytes.extend_from_slice(&shard.to_le_bytes());
    bytes.extend_from_slice(&(id.len() as u32).to_le_bytes());
    bytes.extend_from_slice(id.as_bytes());
    xxh3_64(&bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::Partial;

    fn placement(nodes: usize, replicas: u32) -> Placement {
        let ids: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
        placement_of(&ids, 8, replicas)
    }

    fn placement_of(ids: &[String], shard_num: u32, replicas: u32) -> Placement {
        let members = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Member {
                id: id.clone(),
                addr: format!("127.0.0.1:{}", 7001 + i).parse().unwrap(),
            })
            .collect();
        let config = Partial {
            node_id: ids.first().cloned(),
            members: Some(members),
            groups: Some(vec![GroupDef {
                name: "g".into(),
                shard_num,
                replicas,
            }]),
            ..Partial::default()
        }
        .resolve()
        .unwrap();
        Placement::new(&config)
    }

    /// Every shard's copy set, as ids.
    fn copy_sets(placement: &Placement) -> Vec<BTreeSet<String>> {
        let group = placement.group("g").unwrap().clone();
        (0..group.shard_num)
            .map(|s| {
                placement
                    .node_list(&group, s)
                    .iter()
                    .map(|m| m.id.clone())
                    .collect()
            })
            .collect()
    }

    fn ids(range: std::ops::RangeInclusive<usize>) -> Vec<String> {
        range.map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn node_lists_are_the_members_of_highest_weight_in_rotated_id_order() {
        let placement = placement(5, 2);
        let group = placement.group("g").unwrap().clone();
        for shard in 0..8 {
            let ids: Vec<&str> = placement
                .node_list(&group, shard)
                .iter()
                .map(|m| m.id.as_str())
                .collect();
            let mut heaviest: Vec<(u64, String)> = (1..=5)
                .map(|i| format!("n{i}"))
                .map(|id| (weight("g", shard, &id), id))
                .collect();
            heaviest.sort_by_key(|e| std::cmp::Reverse(e.0));
            let mut expected: Vec<&str> = heaviest[..3].iter().map(|(_, id)| id.as_str()).collect();
            expected.sort_unstable();
            expected.rotate_left(((xxh3_64(b"g") % 3 + u64::from(shard) % 3) % 3) as usize);
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn with_every_member_a_copy_the_list_is_the_modulo_rules() {
        let placement = placement(3, 2);
        let group = placement.group("g").unwrap().clone();
        let offset = (xxh3_64(b"g") % 3) as usize;
        for shard in 0..8 {
            let ids: Vec<String> = placement
                .node_list(&group, shard)
                .iter()
                .map(|m| m.id.clone())
                .collect();
            let expected: Vec<String> = (0..3)
                .map(|r| format!("n{}", (offset + shard as usize + r) % 3 + 1))
                .collect();
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn weights_separate_their_parts() {
        // ("g1", 0, "x") and ("g", 1, "x") would share bytes without the length prefixes.
        assert_ne!(weight("ab", 0, "c"), weight("a", 0, "bc"));
        assert_ne!(weight("g", 0, "n1"), weight("g", 1, "n1"));
    }

    #[test]
    fn copies_are_capped_at_the_member_count() {
        let placement = placement(2, 4);
        let group = placement.group("g").unwrap().clone();
        assert_eq!(placement.node_list(&group, 3).len(), 2);
    }

    #[test]
    fn every_node_leads_some_shard() {
        let placement = placement_of(&ids(1..=4), 64, 1);
        let group = placement.group("g").unwrap().clone();
        let firsts: BTreeSet<String> = (0..64)
            .map(|s| placement.node_list(&group, s)[0].id.clone())
            .collect();
        assert_eq!(firsts.len(), 4);
    }

    #[test]
    fn a_fifth_member_takes_about_a_fifth_of_the_copies_and_nothing_else_moves() {
        let shards = 4096;
        let before = copy_sets(&placement_of(&ids(1..=4), shards, 2));
        let after = copy_sets(&placement_of(&ids(1..=5), shards, 2));
        let total: usize = after.iter().map(BTreeSet::len).sum();
        assert_eq!(total, 3 * shards as usize);
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            let gained: Vec<&String> = new.difference(old).collect();
            // A copy moves only to the new member, and only one per shard.
            assert!(gained.iter().all(|id| *id == "n5"), "{old:?} -> {new:?}");
            assert!(gained.len() <= 1);
            assert_eq!(old.difference(new).count(), gained.len());
            moved += gained.len();
        }
        // The ideal is exactly total / 5 (the new member's fair share); the hash is within a
        // few percent of it. The modulo rule it replaced moved two fifths (the test below).
        let fraction = moved as f64 / total as f64;
        assert!(
            (0.18..=0.22).contains(&fraction),
            "{moved} of {total} copies moved ({fraction:.3})"
        );
    }

    #[test]
    fn removing_a_member_moves_only_its_copies() {
        let shards = 1024;
        let before = copy_sets(&placement_of(&ids(1..=5), shards, 2));
        let remaining: Vec<String> = ids(1..=5).into_iter().filter(|id| id != "n3").collect();
        let after = copy_sets(&placement_of(&remaining, shards, 2));
        let mut moved = 0;
        for (old, new) in before.iter().zip(&after) {
            let lost: Vec<&String> = old.difference(new).collect();
            if old.contains("n3") {
                assert_eq!(lost, vec!["n3"], "{old:?} -> {new:?}");
                assert_eq!(new.difference(old).count(), 1);
                moved += 1;
            } else {
                assert_eq!(old, new);
            }
        }
        let held_by_n3 = before.iter().filter(|set| set.contains("n3")).count();
        assert_eq!(moved, held_by_n3);
    }

    #[test]
    fn a_replacement_in_the_slot_of_a_member_holds_exactly_its_copies() {
        let before = placement_of(&ids(1..=5), 256, 2);
        let members = ids(1..=5)
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let member = Member {
                    id: if id == "n3" {
                        "n9".to_owned()
                    } else {
                        id.clone()
                    },
                    addr: format!("127.0.0.1:{}", 7001 + i).parse().unwrap(),
                };
                (id, member)
            })
            .collect();
        let after = Placement::with_slots(members, before.group_set().clone());
        for (old, new) in copy_sets(&before).iter().zip(copy_sets(&after)) {
            let renamed: BTreeSet<String> = old
                .iter()
                .map(|id| {
                    if id == "n3" {
                        "n9".to_owned()
                    } else {
                        id.clone()
                    }
                })
                .collect();
            assert_eq!(renamed, new);
        }
    }

    #[test]
    fn the_modulo_rule_moved_far_more() {
        // The comparison for the figure above: DESIGN §4's original rule (consecutive members
        // from `(xxh3_64(group) + shard) % N`) on the same change moves two fifths of the
        // copies, twice the new member's share, most of them between old members.
        fn modulo(n: u64, shard: u32) -> BTreeSet<u64> {
            let offset = xxh3_64(b"g") % n;
            (0..3)
                .map(|r| (offset + u64::from(shard) + r) % n)
                .collect()
        }
        let shards = 4096u32;
        let moved: usize = (0..shards)
            .map(|s| modulo(5, s).difference(&modulo(4, s)).count())
            .sum();
        let fraction = moved as f64 / f64::from(3 * shards);
        assert!((0.38..=0.42).contains(&fraction), "{moved} ({fraction:.3})");
    }
}
