//! Reading the final state of a run from every copy: what each node holds of each group (every
//! page of a local query, tombstones included) and each shard's Merkle root, assembled per the
//! placement (which nodes hold which shard) into the checker's [`FinalState`].
//!
//! The nemesis run reads the holders each node lists; the membership suite reads the copy sets
//! the nodes agree on after a membership change (the new placement). Both go through here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use propd_proto::v1;
use propd_proto::v1::admin_service_client::AdminServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;

use super::checker::FinalState;
use super::history::Version;
use super::workload;

/// A node to read: its id and its gRPC address (reached directly, in plaintext).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copyholder {
    /// Its id (`n1`, ...).
    pub id: String,
    /// Its gRPC address.
    pub listen: SocketAddr,
}

/// (group, shard) → the indices (into the node list) of the nodes holding it.
pub type Holders = BTreeMap<(String, u32), Vec<usize>>;

/// What every node holds, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Per node (same order as the node list): entity (`group/name/id`) → version.
    pub entities: Vec<BTreeMap<String, Version>>,
    /// (node, group) pairs that could not be read: their copies are unknown, not empty.
    pub unreadable: BTreeSet<(usize, String)>,
}

fn admin(listen: SocketAddr) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::new(workload::channel(listen, Duration::from_secs(90)))
}

/// Reads every entity of `groups` (tombstones included) that each node holds locally; a group
/// a node fails to answer for is marked unreadable and the error is pushed to `problems`.
pub async fn read_held(
    nodes: &[Copyholder],
    groups: &[String],
    problems: &mut Vec<String>,
) -> Held {
    let mut held = Held {
        entities: vec![BTreeMap::new(); nodes.len()],
        unreadable: BTreeSet::new(),
    };
    for (i, (node, found)) in nodes.iter().zip(&mut held.entities).enumerate() {
        let channel = workload::channel(node.listen, Duration::from_secs(90));
        let mut api = PropertyServiceClient::new(channel)
            .max_decoding_message_size(propd_proto::MAX_MESSAGE_BYTES);
        for group in groups {
            // Every page of the copy (a page ends at its limit or about 4 MiB).
            let mut page_token = String::new();
            loop {
                let answer = api
                    .query(v1::QueryRequest {
                        group: group.clone(),
                        limit: 1_000_000,
                        local: true,
                        include_deleted: true,
                        page_token: page_token.clone(),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        for property in answer.properties {
                            let entity =
                                format!("{}/{}/{}", property.group, property.name, property.id);
                            found.insert(entity, workload::version_of(&property));
                        }
                        if answer.next_page_token.is_empty() {
                            break;
                        }
                        page_token = answer.next_page_token;
                    }
                    Err(error) => {
                        held.unreadable.insert((i, group.clone()));
                        problems.push(format!(
                            "{}: reading group {group} failed: {error}",
                            node.id
                        ));
                        break;
                    }
                }
            }
        }
    }
    held
}

/// Every holder's root of every shard: (group, shard) → node id → root (hex).
pub async fn read_roots(
    nodes: &[Copyholder],
    holders: &Holders,
    problems: &mut Vec<String>,
) -> BTreeMap<(String, u32), BTreeMap<String, String>> {
    let mut all = BTreeMap::new();
    for ((group, shard), holding) in holders {
        let mut roots = BTreeMap::new();
        for &n in holding {
            match admin(nodes[n].listen)
                .tree(v1::TreeRequest {
                    group: group.clone(),
                    shard: *shard,
                })
                .await
            {
                Ok(tree) => {
                    roots.insert(nodes[n].id.clone(), hex_of(&tree.into_inner().root));
                }
                Err(error) => problems.push(format!(
                    "{}: tree of {group}/{shard} failed: {error}",
                    nodes[n].id
                )),
            }
        }
        all.insert((group.clone(), *shard), roots);
    }
    all
}

/// The copies of every entity of `entities` and of every entity some node holds, each on the
/// nodes that `holders` says hold its shard (of `shards` per group): what a holder lacks is
/// `None` (nothing at all), which the checker judges; a holder whose group could not be read is
/// left out. Pure.
pub fn assemble(
    nodes: &[Copyholder],
    held: &Held,
    holders: &Holders,
    entities: impl IntoIterator<Item = (String, String, String)>,
    shards: u32,
) -> BTreeMap<String, BTreeMap<String, Option<Version>>> {
    let mut all: BTreeSet<(String, String, String)> = entities.into_iter().collect();
    for found in &held.entities {
        for entity in found.keys() {
            let mut parts = entity.splitn(3, '/');
            if let (Some(g), Some(n), Some(id)) = (parts.next(), parts.next(), parts.next()) {
                all.insert((g.to_owned(), n.to_owned(), id.to_owned()));
            }
        }
    }
    let shards = NonZeroU32::new(shards).unwrap_or(NonZeroU32::MIN);
    let mut copies = BTreeMap::new();
    for (group, name, id) in all {
        let Ok(parsed) = propd_merkle::Entity::new(&group, &name, &id) else {
            continue;
        };
        let shard = propd_merkle::shard_of(&parsed, shards);
        let key = format!("{group}/{name}/{id}");
        let on: BTreeMap<String, Option<Version>> = holders
            .get(&(group.clone(), shard))
            .map(|holding| {
                holding
                    .iter()
                    .filter(|&&n| !held.unreadable.contains(&(n, group.clone())))
                    .map(|&n| (nodes[n].id.clone(), held.entities[n].get(&key).cloned()))
                    .collect()
            })
            .unwrap_or_default();
        copies.insert(key, on);
    }
    copies
}

/// Reads the final state: roots, every copy, roots again. Also returns how many (shard, copy)
/// roots changed while the copies were read (a state read while repair or a purge still moved
/// things).
pub async fn final_state(
    nodes: &[Copyholder],
    groups: &[String],
    shards: u32,
    holders: &Holders,
    entities: impl IntoIterator<Item = (String, String, String)>,
    problems: &mut Vec<String>,
) -> (FinalState, usize) {
    let before = read_roots(nodes, holders, problems).await;
    let held = read_held(nodes, groups, problems).await;
    let copies = assemble(nodes, &held, holders, entities, shards);
    let after = read_roots(nodes, holders, problems).await;
    let moved = after
        .iter()
        .map(|(shard, roots)| {
            roots
                .iter()
                .filter(|(node, root)| {
                    before
                        .get(shard)
                        .and_then(|r| r.get(*node))
                        .is_some_and(|b| b != *root)
                })
                .count()
        })
        .sum();
    (
        FinalState {
            copies,
            roots: after,
        },
        moved,
    )
}

/// The shards whose copies' roots differ.
pub fn differing_shards(state: &FinalState) -> usize {
    state
        .roots
        .values()
        .filter(|roots| roots.values().collect::<BTreeSet<_>>().len() > 1)
        .count()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

#[cfg(test)]
mod tests {
    use super::super::checker::{Anomaly, Tolerance, check};
    use super::super::history::{Op, Outcome, Request};
    use super::*;

    fn nodes(ids: &[&str]) -> Vec<Copyholder> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| Copyholder {
                id: (*id).to_owned(),
                listen: SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16)),
            })
            .collect()
    }

    fn shard(entity: &(String, String, String), shards: u32) -> u32 {
        let parsed = propd_merkle::Entity::new(&entity.0, &entity.1, &entity.2).expect("entity");
        propd_merkle::shard_of(&parsed, NonZeroU32::new(shards).expect("non-zero"))
    }

    fn acknowledged_put(entity: &str, value: &str, revision: i64) -> Op {
        Op {
            client: 0,
            coordinator: 0,
            entity: entity.to_owned(),
            request: Request::Put {
                value: value.to_owned(),
            },
            outcome: Outcome::Written { revision },
            start: revision - 5,
            end: revision + 5,
        }
    }

    /// A shard moved from n1 to n4 (the new placement), and n4 was not filled: the acknowledged
    /// write is lost on the new copy, though the old holder still has it. The check on the new
    /// placement reports it; on the old one it would not.
    #[test]
    fn a_new_copy_missing_an_acknowledged_write_is_a_lost_write() {
        let all = nodes(&["n1", "n2", "n3", "n4"]);
        let entity = ("g".to_owned(), "item".to_owned(), "7".to_owned());
        let s = shard(&entity, 8);
        let version = Version {
            revision: 1_000,
            value: Some("c0-1".to_owned()),
        };
        let mut held = Held {
            entities: vec![BTreeMap::new(); 4],
            unreadable: BTreeSet::new(),
        };
        held.entities[0].insert("g/item/7".to_owned(), version.clone());
        held.entities[1].insert("g/item/7".to_owned(), version.clone());
        let ops = [acknowledged_put("g/item/7", "c0-1", 1_000)];
        let check_on = |holding: Vec<usize>| {
            let holders: Holders = [(("g".to_owned(), s), holding)].into_iter().collect();
            let state = FinalState {
                copies: assemble(&all, &held, &holders, [entity.clone()], 8),
                roots: BTreeMap::new(),
            };
            check(&ops, &state, Tolerance::default())
        };
        assert_eq!(check_on(vec![0, 1]), []);
        let anomalies = check_on(vec![1, 3]);
        assert!(
            matches!(
                anomalies.as_slice(),
                [Anomaly::DivergentCopies { .. }, Anomaly::LostWrite { node, found: None, .. }]
                    if node == "n4"
            ),
            "{anomalies:?}"
        );
    }

    #[test]
    fn entities_held_but_never_written_are_judged_and_unreadable_copies_left_out() {
        let all = nodes(&["n1", "n2"]);
        let stray = ("g".to_owned(), "item".to_owned(), "3".to_owned());
        let s = shard(&stray, 4);
        let mut held = Held {
            entities: vec![BTreeMap::new(); 2],
            unreadable: [(1, "g".to_owned())].into_iter().collect(),
        };
        let version = Version {
            revision: 9,
            value: Some("nobody".to_owned()),
        };
        held.entities[0].insert("g/item/3".to_owned(), version.clone());
        let holders: Holders = [(("g".to_owned(), s), vec![0, 1])].into_iter().collect();
        let copies = assemble(&all, &held, &holders, [], 4);
        let expected: BTreeMap<String, Option<Version>> =
            [("n1".to_owned(), Some(version))].into_iter().collect();
        assert_eq!(copies.get("g/item/3"), Some(&expected));
        let state = FinalState {
            copies,
            roots: BTreeMap::new(),
        };
        let kinds: Vec<&str> = check(&[], &state, Tolerance::default())
            .iter()
            .map(Anomaly::kind)
            .collect();
        assert_eq!(kinds, ["invented"]);
    }

    #[test]
    fn roots_differ_when_two_copies_of_a_shard_disagree() {
        let mut state = FinalState::default();
        let roots = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(n, r)| ((*n).to_owned(), (*r).to_owned()))
                .collect()
        };
        state
            .roots
            .insert(("g".to_owned(), 0), roots(&[("n1", "aa"), ("n2", "aa")]));
        assert_eq!(differing_shards(&state), 0);
        state
            .roots
            .insert(("g".to_owned(), 1), roots(&[("n1", "aa"), ("n2", "bb")]));
        assert_eq!(differing_shards(&state), 1);
        assert_eq!(hex_of(&[0, 0xab, 0x10]), "00ab10");
    }
}
