//! Placement (DESIGN §4): which nodes hold the copies of each (group, shard), in a
//! deterministic order that every node computes alike. Health never changes placement.

use xxhash_rust::xxh3::xxh3_64;

use propd_store::{GroupDef, Groups};

use crate::config::{Config, Member};

/// The configured data nodes, sorted by id, and the groups they serve.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    members: Vec<Member>,
    groups: Groups,
}

impl Placement {
    /// Placement for a resolved configuration.
    pub(crate) fn new(config: &Config) -> Self {
        let mut members = config.members.clone();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            members,
            groups: config.groups.clone(),
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

    /// Every group, in name order.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &GroupDef> {
        self.groups.iter()
    }

    /// Copies of each shard of `group`: `replicas + 1`, capped at the member count.
    pub(crate) fn copies(&self, group: &GroupDef) -> usize {
        (group.replicas as usize + 1).min(self.members.len())
    }

    /// The node list of (group, shard):
    /// `[members[(offset(group) + shard + r) % N] for r in 0..copies]` with
    /// `offset(group) = xxh3_64(group) % N`.
    pub(crate) fn node_list(&self, group: &GroupDef, shard: u32) -> Vec<&Member> {
        let n = self.members.len() as u64;
        let offset = xxh3_64(group.name.as_bytes()) % n;
        (0..self.copies(group) as u64)
            .map(|r| &self.members[((offset + u64::from(shard) + r) % n) as usize])
            .collect()
    }

    /// Whether `node` holds a copy of (group, shard).
    pub(crate) fn holds(&self, node: &str, group: &GroupDef, shard: u32) -> bool {
        self.node_list(group, shard).iter().any(|m| m.id == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Partial;

    fn placement(nodes: usize, replicas: u32) -> Placement {
        let members = (1..=nodes)
            .map(|i| Member {
                id: format!("n{i}"),
                addr: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
            })
            .collect();
        let config = Partial {
            members: Some(members),
            groups: Some(vec![GroupDef {
                name: "g".into(),
                shard_num: 8,
                replicas,
            }]),
            ..Partial::default()
        }
        .resolve()
        .unwrap();
        Placement::new(&config)
    }

    #[test]
    fn node_lists_are_distinct_consecutive_members() {
        let placement = placement(5, 2);
        let group = placement.group("g").unwrap().clone();
        let offset = (xxh3_64(b"g") % 5) as usize;
        for shard in 0..8 {
            let ids: Vec<&str> = placement
                .node_list(&group, shard)
                .iter()
                .map(|m| m.id.as_str())
                .collect();
            let expected: Vec<String> = (0..3)
                .map(|r| format!("n{}", (offset + shard as usize + r) % 5 + 1))
                .collect();
            assert_eq!(ids, expected);
        }
    }

    #[test]
    fn copies_are_capped_at_the_member_count() {
        let placement = placement(2, 4);
        let group = placement.group("g").unwrap().clone();
        assert_eq!(placement.node_list(&group, 3).len(), 2);
    }

    #[test]
    fn every_node_leads_some_shard() {
        let placement = placement(4, 1);
        let group = placement.group("g").unwrap().clone();
        let firsts: std::collections::BTreeSet<String> = (0..8)
            .map(|s| placement.node_list(&group, s)[0].id.clone())
            .collect();
        assert_eq!(firsts.len(), 4);
    }
}
