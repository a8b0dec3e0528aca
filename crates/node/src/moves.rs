//! Shards on the move (pure): when the placement changes, the members that held a shard's copy
//! and no longer do keep it — they stay in the shard's node list, so writes, reads and repair
//! rounds reach the old and the new copy sets together — until a round that covered both sets
//! completes (every sync succeeded and applied everything). Then the new copies hold everything
//! the old ones did, and the old ones leave the node list: a move never loses a copy.
//!
//! With membership in etcd the moves are kept there (`P/moves/<group>/<shard>`), written in the
//! same transaction as the membership change that causes them and deleted by the origin of the
//! round that ends them, so that every node — one restarted mid-move, one that just joined —
//! sees the same node lists. Each node holds the copy it last read here.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::placement::Placement;

/// The old copies still kept, by (group, shard).
#[derive(Debug, Default)]
pub(crate) struct Moves {
    leaving: BTreeMap<(String, u32), Vec<String>>,
}

/// One shard on the move, for `status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct MoveView {
    pub(crate) group: String,
    pub(crate) shard: u32,
    /// The members that held a copy and keep it until the new copies completed a round.
    pub(crate) leaving: Vec<String>,
}

/// One shard on the move as etcd keeps it (`P/moves/<group>/<shard>`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct MoveRecord {
    pub(crate) group: String,
    pub(crate) shard: u32,
    /// The old holders kept until the new copies complete a round.
    pub(crate) leaving: Vec<String>,
}

impl Moves {
    /// The moves of these records.
    pub(crate) fn from_records(records: &[MoveRecord]) -> Self {
        Self {
            leaving: records
                .iter()
                .filter(|r| !r.leaving.is_empty())
                .map(|r| ((r.group.clone(), r.shard), r.leaving.clone()))
                .collect(),
        }
    }

    /// Every shard on the move, as records.
    pub(crate) fn records(&self) -> Vec<MoveRecord> {
        self.leaving
            .iter()
            .map(|((group, shard), leaving)| MoveRecord {
                group: group.clone(),
                shard: *shard,
                leaving: leaving.clone(),
            })
            .collect()
    }

    /// Records the moves from `old` to `new`: every member of a shard's old node list (and of
    /// a move still pending) that is not in its new list and is still a member (`members`)
    /// keeps its copy for now.
    pub(crate) fn placement_changed(
        &mut self,
        old: &Placement,
        new: &Placement,
        members: &BTreeSet<String>,
    ) {
        let mut leaving = BTreeMap::new();
        for group in new.groups() {
            let Some(old_group) = old.group(&group.name) else {
                continue;
            };
            for shard in 0..group.shard_num {
                let now: BTreeSet<&str> = new
                    .node_list(group, shard)
                    .iter()
                    .map(|m| m.id.as_str())
                    .collect();
                let before = old
                    .node_list(old_group, shard)
                    .into_iter()
                    .map(|m| m.id.clone())
                    .chain(
                        self.leaving
                            .get(&(group.name.clone(), shard))
                            .into_iter()
                            .flatten()
                            .cloned(),
                    );
                let mut kept: Vec<String> = before
                    .filter(|id| !now.contains(id.as_str()) && members.contains(id))
                    .collect();
                kept.sort();
                kept.dedup();
                if !kept.is_empty() {
                    leaving.insert((group.name.clone(), shard), kept);
                }
            }
        }
        self.leaving = leaving;
    }

    /// The old copies (group, shard) still keeps.
    pub(crate) fn leaving(&self, group: &str, shard: u32) -> &[String] {
        self.leaving
            .get(&(group.to_owned(), shard))
            .map_or(&[], Vec::as_slice)
    }

    /// A round over `covered` completed for (group, shard) whose node list is now `list` (new
    /// copies and old): the move is over when the round covered all of them. Returns whether a
    /// move ended.
    pub(crate) fn round_completed(
        &mut self,
        group: &str,
        shard: u32,
        covered: &[String],
        list: &[String],
    ) -> bool {
        let key = (group.to_owned(), shard);
        if !self.leaving.contains_key(&key) {
            return false;
        }
        if list.iter().all(|id| covered.contains(id)) {
            self.leaving.remove(&key);
            return true;
        }
        false
    }

    /// Every shard on the move.
    pub(crate) fn views(&self) -> Vec<MoveView> {
        self.leaving
            .iter()
            .map(|((group, shard), leaving)| MoveView {
                group: group.clone(),
                shard: *shard,
                leaving: leaving.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use propd_store::{GroupDef, Groups};

    use super::*;
    use crate::config::Member;

    fn placement(ids: &[&str]) -> Placement {
        let members = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                (
                    (*id).to_owned(),
                    Member {
                        id: (*id).to_owned(),
                        addr: format!("127.0.0.1:{}", 7001 + i).parse().unwrap(),
                    },
                )
            })
            .collect();
        Placement::with_slots(members, Groups::new([GroupDef::new("g", 64, 1)]).unwrap())
    }

    fn ids(ids: &[&str]) -> BTreeSet<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    fn list(placement: &Placement, shard: u32, moves: &Moves) -> Vec<String> {
        let group = placement.group("g").unwrap();
        let mut list: Vec<String> = placement
            .node_list(group, shard)
            .iter()
            .map(|m| m.id.clone())
            .collect();
        list.extend(moves.leaving("g", shard).iter().cloned());
        list
    }

    #[test]
    fn a_joining_member_keeps_the_old_copies_until_a_round_covers_both_sets() {
        let old = placement(&["a", "b", "c"]);
        let new = placement(&["a", "b", "c", "d"]);
        let mut moves = Moves::default();
        moves.placement_changed(&old, &new, &ids(&["a", "b", "c", "d"]));
        let moved: Vec<u32> = (0..64)
            .filter(|s| !moves.leaving("g", *s).is_empty())
            .collect();
        assert!(!moved.is_empty(), "d takes some shards");
        let group = new.group("g").unwrap();
        for shard in 0..64 {
            let now: Vec<String> = new
                .node_list(group, shard)
                .iter()
                .map(|m| m.id.clone())
                .collect();
            let before: Vec<String> = old
                .node_list(old.group("g").unwrap(), shard)
                .iter()
                .map(|m| m.id.clone())
                .collect();
            // Every old copy is still in the node list, and so is every new one.
            let list = list(&new, shard, &moves);
            assert!(
                before.iter().all(|id| list.contains(id)),
                "{shard}: {list:?}"
            );
            assert!(now.iter().all(|id| list.contains(id)));
        }
        let shard = moved[0];
        let full = list(&new, shard, &moves);
        // A round that missed one of them ends nothing.
        assert!(!moves.round_completed("g", shard, &full[1..], &full));
        assert!(!moves.leaving("g", shard).is_empty());
        assert!(moves.round_completed("g", shard, &full, &full));
        assert!(moves.leaving("g", shard).is_empty());
        assert_eq!(moves.views().len(), moved.len() - 1);
    }

    #[test]
    fn pending_moves_accumulate_and_forget_removed_members() {
        let first = placement(&["a", "b", "c"]);
        let second = placement(&["a", "b", "c", "d"]);
        let third = placement(&["a", "b", "c", "d", "e"]);
        let mut moves = Moves::default();
        moves.placement_changed(&first, &second, &ids(&["a", "b", "c", "d"]));
        let pending = moves.views();
        moves.placement_changed(&second, &third, &ids(&["a", "b", "c", "d", "e"]));
        for view in &pending {
            let now = third.node_list(third.group("g").unwrap(), view.shard);
            for id in &view.leaving {
                assert!(
                    now.iter().any(|m| &m.id == id) || moves.leaving("g", view.shard).contains(id),
                    "{id} of shard {} was dropped before a round",
                    view.shard
                );
            }
        }
        // A member that left the membership (removed) is no longer waited for.
        moves.placement_changed(&third, &third, &ids(&["d", "e"]));
        assert!(
            moves
                .views()
                .iter()
                .all(|v| v.leaving.iter().all(|id| id == "d" || id == "e"))
        );
    }
}
