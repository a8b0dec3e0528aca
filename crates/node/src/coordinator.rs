//! The property API (DESIGN §8): the node that receives a request coordinates it. Writes go to
//! every copy of the shard and succeed when `write_acks` copies acknowledge; reads ask every
//! copy, answer with the newest by the version order and rewrite stale copies (read repair). A
//! write that misses a copy is remembered, and the shard is repaired when that node answers
//! again. `local` requests touch only this node's own copy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use propd_merkle::{Entity, Property, Shape, TagValue, shard_of, version_order};
use propd_proto::v1;
use propd_proto::v1::property_service_server::PropertyService;
use propd_store::{GroupDef, Query, RepairOutcome, StoreError};
use tonic::{Request, Response, Status};

use crate::convert::{property_from_wire, property_to_wire, tag_value_from_wire};
use crate::node::{NodeState, now_nanos};

/// How long one node-to-node call of a coordinated request may take.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
/// The query limit when the client gives none.
pub(crate) const DEFAULT_QUERY_LIMIT: usize = 1000;

/// The `PropertyService` of one node.
#[derive(Debug, Clone)]
pub(crate) struct PropertyApi {
    node: Arc<NodeState>,
}

impl PropertyApi {
    /// The service over a node's state.
    pub(crate) fn new(node: Arc<NodeState>) -> Self {
        Self { node }
    }
}

/// A refused request: `InvalidArgument` naming the field.
pub(crate) fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// A store error as a status: bad input is `InvalidArgument`, the rest `Internal`.
pub(crate) fn store_status(error: StoreError) -> Status {
    match error.validation() {
        Some(_) => Status::invalid_argument(error.to_string()),
        None => {
            tracing::error!(%error, "store failure");
            Status::internal(format!("store: {error}"))
        }
    }
}

/// Runs a blocking store call off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    node: &Arc<NodeState>,
    work: impl FnOnce(&NodeState) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || work(&node))
        .await
        .map_err(|error| Status::internal(format!("store task failed: {error}")))?
        .map_err(store_status)
}

impl PropertyApi {
    fn group(&self, name: &str) -> Result<GroupDef, Status> {
        self.node
            .placement
            .group(name)
            .cloned()
            .ok_or_else(|| invalid("group", format!("unknown group {name:?}")))
    }

    fn entity(&self, group: &str, name: &str, id: &str) -> Result<(Entity, GroupDef, u32), Status> {
        let entity = Entity::new(group, name, id).map_err(|error| invalid("entity", error))?;
        let config = self.group(group)?;
        let shard = shard_for(&entity, &config);
        Ok((entity, config, shard))
    }

    fn check_size(&self, property: &Property) -> Result<(), Status> {
        let size = property.canonical_bytes().len();
        let max = self.node.config.max_property_bytes;
        if size > max {
            return Err(invalid(
                "property",
                format!("{size} bytes is over the limit of {max} bytes"),
            ));
        }
        Ok(())
    }

    /// Writes `property` (live or tombstone) to every copy of its shard; returns the copies that
    /// acknowledged and whether any held a live copy before.
    async fn replicate(
        &self,
        group: &GroupDef,
        shard: u32,
        property: Property,
    ) -> (u32, u32, bool) {
        let targets = self.node.node_ids(group, shard);
        let copies = targets.len() as u32;
        let mut calls = tokio::task::JoinSet::new();
        for target in targets {
            let node = Arc::clone(&self.node);
            let property = property.clone();
            let group = group.name.clone();
            calls.spawn(async move { write_copy(&node, &target, &group, shard, property).await });
        }
        let mut acknowledged = 0;
        let mut had_live = false;
        while let Some(joined) = calls.join_next().await {
            if let Ok(Some(live_before)) = joined {
                acknowledged += 1;
                had_live |= live_before;
            }
        }
        (acknowledged, copies, had_live)
    }

    fn required_acks(&self, copies: u32) -> u32 {
        required_acks(self.node.config.write_acks, copies)
    }

    /// Every copy of (group, shard) that answers, with what it holds of `entity`.
    async fn read_copies(
        &self,
        group: &GroupDef,
        shard: u32,
        entity: &Entity,
    ) -> Vec<(String, Option<Property>)> {
        let mut calls = tokio::task::JoinSet::new();
        for target in self.node.node_ids(group, shard) {
            let node = Arc::clone(&self.node);
            let entity = entity.clone();
            calls.spawn(async move {
                let copy = read_copy(&node, &target, &entity).await;
                copy.map(|copy| (target, copy))
            });
        }
        let mut copies = Vec::new();
        while let Some(joined) = calls.join_next().await {
            if let Ok(Some(answer)) = joined {
                copies.push(answer);
            }
        }
        copies
    }

    /// Runs `query` on every member holding a shard of `group`: what each that answered holds.
    async fn query_holders(&self, group: &GroupDef, query: Query) -> Vec<(String, Vec<Property>)> {
        let mut holders: Vec<String> = Vec::new();
        for shard in 0..group.shard_num {
            for id in self.node.node_ids(group, shard) {
                if !holders.contains(&id) {
                    holders.push(id);
                }
            }
        }
        let mut calls = tokio::task::JoinSet::new();
        for target in holders {
            let node = Arc::clone(&self.node);
            let query = query.clone();
            calls.spawn(async move {
                query_copy(&node, &target, query)
                    .await
                    .map(|found| (target, found))
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = calls.join_next().await {
            if let Ok(Some(answer)) = joined {
                answers.push(answer);
            }
        }
        answers
    }

    /// Rewrites the copies older than `newest` (or missing it) in the background.
    fn read_repair(&self, group: &str, shard: u32, newest: &Property, stale: Vec<String>) {
        for target in stale {
            let node = Arc::clone(&self.node);
            let newest = newest.clone();
            let group = group.to_owned();
            node.metrics.read_repairs.inc();
            tokio::spawn(async move {
                if write_copy(&node, &target, &group, shard, newest)
                    .await
                    .is_none()
                {
                    tracing::debug!(peer = %target, group, shard, "read repair did not reach the copy");
                }
            });
        }
    }
}

/// Writes one copy on `target`; `Some(had_live)` when it acknowledged. A copy that could not be
/// reached is remembered for write-miss repair.
async fn write_copy(
    node: &Arc<NodeState>,
    target: &str,
    group: &str,
    shard: u32,
    property: Property,
) -> Option<bool> {
    if target == node.me() {
        let result = blocking(node, move |node| {
            let had_live = node
                .store
                .get(&entity_of(&property)?)?
                .is_some_and(|p| !p.is_tombstone());
            node.store.repair_apply(property)?;
            Ok(had_live)
        })
        .await;
        return match result {
            Ok(had_live) => Some(had_live),
            Err(status) => {
                tracing::warn!(group, shard, %status, "local copy of a coordinated write failed");
                None
            }
        };
    }
    let mut client = node.peers.property_client(target)?;
    let mut request = Request::new(v1::ReplicaWriteRequest {
        property: Some(property_to_wire(&property)),
    });
    request.set_timeout(REPLICA_TIMEOUT);
    let answer = client.replica_write(request).await;
    node.peers.saw_call(target, &answer);
    match answer {
        Ok(response) => Some(response.into_inner().had_live),
        Err(status) => {
            tracing::info!(peer = target, group, shard, %status, "a coordinated write missed a copy; it will be repaired");
            node.record_miss(target, group, shard);
            None
        }
    }
}

/// How many copies must acknowledge a coordinated write: `write_acks`, capped at the copies
/// there are.
fn required_acks(write_acks: u32, copies: u32) -> u32 {
    write_acks.min(copies)
}

/// The shard of an entity in a validated group.
fn shard_for(entity: &Entity, group: &GroupDef) -> u32 {
    let shard_num = std::num::NonZeroU32::new(group.shard_num).unwrap_or(std::num::NonZeroU32::MIN);
    shard_of(entity, shard_num)
}

fn entity_of(property: &Property) -> Result<Entity, StoreError> {
    Entity::new(&property.group, &property.name, &property.id)
        .map_err(|error| StoreError::Invalid(propd_store::ValidationError::Entity(error)))
}

/// Reads one copy from `target`: `Some(copy)` when it answered (`copy` may be `None`).
async fn read_copy(
    node: &Arc<NodeState>,
    target: &str,
    entity: &Entity,
) -> Option<Option<Property>> {
    if target == node.me() {
        let entity = entity.clone();
        return blocking(node, move |node| node.store.get(&entity))
            .await
            .ok();
    }
    let mut client = node.peers.property_client(target)?;
    let mut request = Request::new(v1::GetRequest {
        group: entity.group().to_owned(),
        name: entity.name().to_owned(),
        id: entity.id().to_owned(),
        local: true,
        include_deleted: true,
    });
    request.set_timeout(REPLICA_TIMEOUT);
    let answer = client.get(request).await;
    node.peers.saw_call(target, &answer);
    answer
        .ok()?
        .into_inner()
        .property
        .map(property_from_wire)
        .transpose()
        .ok()
}

/// A query request checked and turned into the store's query (group-wide requests ask every
/// holder for all it has, tombstones included), with the client's limit.
fn store_query(request: &v1::QueryRequest, group: &GroupDef) -> Result<(Query, usize), Status> {
    if request.name.contains('/') {
        return Err(invalid(
            "name",
            format!("{:?} must not contain '/'", request.name),
        ));
    }
    let mut tags = Vec::new();
    for filter in &request.tags {
        let value = tag_value_from_wire(filter.value.clone())
            .ok_or_else(|| invalid(&format!("tags.{}", filter.key), "the filter has no value"))?;
        tags.push((filter.key.clone(), value));
    }
    let limit = match request.limit {
        0 => DEFAULT_QUERY_LIMIT,
        n => n as usize,
    };
    let query = Query {
        group: group.name.clone(),
        name: (!request.name.is_empty()).then(|| request.name.clone()),
        ids: request.ids.clone(),
        tags,
        limit: if request.local { limit } else { usize::MAX },
        include_deleted: request.include_deleted || !request.local,
    };
    Ok((query, limit))
}

/// What the copies that answered a read say of one entity: its newest version and the copies to
/// rewrite with it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EntityRead {
    /// The newest version by the version order (it may be a tombstone).
    newest: Property,
    /// The nodes that answered with an older version or without the entity.
    stale: Vec<String>,
}

/// The read-repair decision over one entity's answers, `(node, copy)` with `None` for a node
/// that answered without it; `None` when no node holds it.
fn reconcile(answers: Vec<(String, Option<Property>)>, shape: &Shape) -> Option<EntityRead> {
    let newest = answers
        .iter()
        .filter_map(|(_, copy)| copy.as_ref())
        .max_by(|a, b| version_order(a, b, shape))?
        .clone();
    let stale = answers
        .into_iter()
        .filter(|(_, copy)| copy.as_ref() != Some(&newest))
        .map(|(node, _)| node)
        .collect();
    Some(EntityRead { newest, stale })
}

/// Merges the answers of a group-wide query, `(node, properties it holds)`, into one read per
/// entity in entity order. `holders` names the nodes whose answer must include a property's
/// entity (its copies); those that answered without it are stale too.
fn merge_answers(
    answers: Vec<(String, Vec<Property>)>,
    holders: impl Fn(&Property) -> Vec<String>,
    shape: &Shape,
) -> Vec<EntityRead> {
    let responders: Vec<String> = answers.iter().map(|(node, _)| node.clone()).collect();
    // By `group/name/id`, the order queries answer in.
    let mut by_entity: BTreeMap<String, Vec<(String, Option<Property>)>> = BTreeMap::new();
    for (node, found) in answers {
        for property in found {
            let key = format!("{}/{}/{}", property.group, property.name, property.id);
            by_entity
                .entry(key)
                .or_default()
                .push((node.clone(), Some(property)));
        }
    }
    by_entity
        .into_values()
        .filter_map(|mut copies| {
            let first = copies.iter().find_map(|(_, copy)| copy.clone())?;
            for holder in holders(&first) {
                if responders.contains(&holder) && !copies.iter().any(|(node, _)| *node == holder) {
                    copies.push((holder, None));
                }
            }
            reconcile(copies, shape)
        })
        .collect()
}

#[tonic::async_trait]
impl PropertyService for PropertyApi {
    async fn apply(
        &self,
        request: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyResponse>, Status> {
        let request = request.into_inner();
        let wire = request
            .property
            .ok_or_else(|| invalid("property", "missing"))?;
        let mut property = property_from_wire(wire).map_err(|error| invalid("property", error))?;
        let (_, group, shard) = self.entity(&property.group, &property.name, &property.id)?;
        if property.delete_time != 0 {
            return Err(invalid(
                "property.delete_time",
                "must be 0 in an apply; use delete",
            ));
        }
        if property.mod_revision < 0 {
            return Err(invalid(
                "property.mod_revision",
                format!("{} must be >= 0", property.mod_revision),
            ));
        }
        if property.mod_revision == 0 {
            property.mod_revision = self.node.next_revision();
        }
        self.check_size(&property)?;
        let revision = property.mod_revision;
        if request.local {
            blocking(&self.node, move |node| node.store.apply(property)).await?;
            return Ok(Response::new(v1::ApplyResponse {
                mod_revision: revision,
                acknowledged: 1,
                copies: 1,
            }));
        }
        let (acknowledged, copies, _) = self.replicate(&group, shard, property).await;
        let required = self.required_acks(copies);
        if acknowledged < required {
            return Err(Status::unavailable(format!(
                "only {acknowledged} of {copies} copies acknowledged revision {revision}, {required} required; \
                 copies that missed it will be repaired"
            )));
        }
        Ok(Response::new(v1::ApplyResponse {
            mod_revision: revision,
            acknowledged,
            copies,
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let request = request.into_inner();
        let (entity, group, shard) = self.entity(&request.group, &request.name, &request.id)?;
        if request.mod_revision < 0 {
            return Err(invalid(
                "mod_revision",
                format!("{} must be >= 0", request.mod_revision),
            ));
        }
        if request.delete_time < 0 {
            return Err(invalid(
                "delete_time",
                format!("{} must be >= 0", request.delete_time),
            ));
        }
        let mod_revision = if request.mod_revision == 0 {
            self.node.next_revision()
        } else {
            request.mod_revision
        };
        let delete_time = if request.delete_time == 0 {
            now_nanos()
        } else {
            request.delete_time
        };
        if request.local {
            let outcome = blocking(&self.node, move |node| {
                node.store.delete(&entity, mod_revision, delete_time)
            })
            .await?;
            return Ok(Response::new(v1::DeleteResponse {
                found: outcome.found,
                mod_revision,
                delete_time,
                acknowledged: 1,
                copies: 1,
            }));
        }
        let tombstone = Property {
            group: request.group,
            name: request.name,
            id: request.id,
            tags: BTreeMap::new(),
            mod_revision,
            delete_time,
        };
        let (acknowledged, copies, found) = self.replicate(&group, shard, tombstone).await;
        let required = self.required_acks(copies);
        if acknowledged < required {
            return Err(Status::unavailable(format!(
                "only {acknowledged} of {copies} copies acknowledged the delete, {required} required; \
                 copies that missed it will be repaired"
            )));
        }
        Ok(Response::new(v1::DeleteResponse {
            found,
            mod_revision,
            delete_time,
            acknowledged,
            copies,
        }))
    }

    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        let request = request.into_inner();
        let (entity, group, shard) = self.entity(&request.group, &request.name, &request.id)?;
        let visible = |property: Option<Property>| {
            property
                .filter(|p| request.include_deleted || !p.is_tombstone())
                .map(|p| property_to_wire(&p))
        };
        if request.local {
            let copy = blocking(&self.node, move |node| node.store.get(&entity)).await?;
            return Ok(Response::new(v1::GetResponse {
                property: visible(copy),
            }));
        }
        let copies = self.read_copies(&group, shard, &entity).await;
        if copies.is_empty() {
            return Err(Status::unavailable(format!(
                "no copy of {entity} could be reached"
            )));
        }
        let shape = self.node.store.shape();
        let Some(read) = reconcile(copies, &shape) else {
            return Ok(Response::new(v1::GetResponse { property: None }));
        };
        self.read_repair(&group.name, shard, &read.newest, read.stale);
        let newest = read.newest;
        Ok(Response::new(v1::GetResponse {
            property: visible(Some(newest)),
        }))
    }

    async fn query(
        &self,
        request: Request<v1::QueryRequest>,
    ) -> Result<Response<v1::QueryResponse>, Status> {
        let request = request.into_inner();
        let group = self.group(&request.group)?;
        let (query, limit) = store_query(&request, &group)?;
        if request.local {
            let found = blocking(&self.node, move |node| node.store.query(&query)).await?;
            return Ok(Response::new(v1::QueryResponse {
                properties: found.iter().map(property_to_wire).collect(),
            }));
        }
        let tags_filter = !query.tags.is_empty();
        let answers = self.query_holders(&group, query).await;
        if answers.is_empty() {
            return Err(Status::unavailable(format!(
                "no copy of group {:?} could be reached",
                group.name
            )));
        }
        let shape = self.node.store.shape();
        // Without tag filters, a holder that answered without an entity lacks it; with them, it
        // may hold a version the filter does not match.
        let holders = |property: &Property| match entity_of(property) {
            Ok(entity) if !tags_filter => self.node.node_ids(&group, shard_for(&entity, &group)),
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for read in merge_answers(answers, holders, &shape) {
            let Ok(entity) = entity_of(&read.newest) else {
                continue;
            };
            self.read_repair(
                &group.name,
                shard_for(&entity, &group),
                &read.newest,
                read.stale,
            );
            if request.include_deleted || !read.newest.is_tombstone() {
                out.push(property_to_wire(&read.newest));
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(Response::new(v1::QueryResponse { properties: out }))
    }

    async fn replica_write(
        &self,
        request: Request<v1::ReplicaWriteRequest>,
    ) -> Result<Response<v1::ReplicaWriteResponse>, Status> {
        let wire = request
            .into_inner()
            .property
            .ok_or_else(|| invalid("property", "missing"))?;
        let property = property_from_wire(wire).map_err(|error| invalid("property", error))?;
        self.entity(&property.group, &property.name, &property.id)?;
        self.check_size(&property)?;
        let (outcome, had_live) = blocking(&self.node, move |node| {
            let had_live = node
                .store
                .get(&entity_of(&property)?)?
                .is_some_and(|p| !p.is_tombstone());
            Ok((node.store.repair_apply(property)?, had_live))
        })
        .await?;
        let (outcome, current) = match outcome {
            RepairOutcome::Applied => (v1::replica_write_response::Outcome::Applied, None),
            RepairOutcome::Same => (v1::replica_write_response::Outcome::Same, None),
            RepairOutcome::LocalNewer(ours) => (
                v1::replica_write_response::Outcome::LocalNewer,
                Some(property_to_wire(&ours)),
            ),
        };
        if outcome == v1::replica_write_response::Outcome::Applied {
            self.node.metrics.properties_applied.inc();
        }
        Ok(Response::new(v1::ReplicaWriteResponse {
            outcome: outcome as i32,
            current,
            had_live,
        }))
    }
}

/// Runs `query` on one holder: `Some(found)` when it answered.
async fn query_copy(node: &Arc<NodeState>, target: &str, query: Query) -> Option<Vec<Property>> {
    if target == node.me() {
        return blocking(node, move |node| node.store.query(&query))
            .await
            .ok();
    }
    let mut client = node.peers.property_client(target)?;
    let mut request = Request::new(v1::QueryRequest {
        group: query.group,
        name: query.name.unwrap_or_default(),
        ids: query.ids,
        tags: query
            .tags
            .iter()
            .map(|(key, value)| v1::TagFilter {
                key: key.clone(),
                value: Some(tag_wire(value)),
            })
            .collect(),
        limit: u32::MAX,
        local: true,
        include_deleted: true,
    });
    request.set_timeout(REPLICA_TIMEOUT);
    let answer = client.query(request).await;
    node.peers.saw_call(target, &answer);
    answer
        .ok()?
        .into_inner()
        .properties
        .into_iter()
        .map(property_from_wire)
        .collect::<Result<_, _>>()
        .ok()
}

fn tag_wire(value: &TagValue) -> v1::TagValue {
    crate::convert::tag_value_to_wire(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: &str, mod_revision: i64, delete_time: i64) -> Property {
        Property {
            group: "g".into(),
            name: "n".into(),
            id: id.into(),
            tags: BTreeMap::new(),
            mod_revision,
            delete_time,
        }
    }

    fn nodes(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|id| (*id).to_owned()).collect()
    }

    #[test]
    fn write_acks_is_capped_at_the_number_of_copies() {
        assert_eq!(required_acks(1, 3), 1);
        assert_eq!(required_acks(2, 3), 2);
        assert_eq!(required_acks(3, 3), 3);
        assert_eq!(required_acks(5, 3), 3, "capped");
        assert_eq!(required_acks(2, 1), 1, "one copy needs one ack");
    }

    #[test]
    fn the_newest_copy_wins_and_older_ones_are_rewritten() {
        let read = reconcile(
            vec![
                ("n1".into(), Some(version("a", 1, 0))),
                ("n2".into(), Some(version("a", 3, 0))),
                ("n3".into(), Some(version("a", 3, 0))),
            ],
            &Shape::default(),
        )
        .unwrap();
        assert_eq!(read.newest, version("a", 3, 0));
        assert_eq!(read.stale, nodes(&["n1"]));
    }

    #[test]
    fn a_copy_without_the_entity_is_rewritten_and_no_copy_means_nothing() {
        let read = reconcile(
            vec![("n1".into(), None), ("n2".into(), Some(version("a", 2, 0)))],
            &Shape::default(),
        )
        .unwrap();
        assert_eq!(read.stale, nodes(&["n1"]));
        assert_eq!(
            reconcile(vec![("n1".into(), None)], &Shape::default()),
            None
        );
    }

    #[test]
    fn a_newer_tombstone_wins_over_a_live_copy() {
        let tombstone = version("a", 5, 1_000);
        let read = reconcile(
            vec![
                ("n1".into(), Some(version("a", 4, 0))),
                ("n2".into(), Some(tombstone.clone())),
            ],
            &Shape::default(),
        )
        .unwrap();
        assert!(read.newest.is_tombstone());
        assert_eq!(read.newest, tombstone);
        assert_eq!(read.stale, nodes(&["n1"]));
    }

    #[test]
    fn a_query_merges_per_entity_and_holders_that_lack_it_are_stale() {
        let answers = vec![
            (
                "n1".to_owned(),
                vec![version("a", 2, 0), version("b", 1, 0)],
            ),
            ("n2".to_owned(), vec![version("a", 1, 0)]),
        ];
        // n3 holds every entity but did not answer: it is not judged.
        let reads = merge_answers(
            answers.clone(),
            |_| nodes(&["n1", "n2", "n3"]),
            &Shape::default(),
        );
        assert_eq!(
            reads,
            vec![
                EntityRead {
                    newest: version("a", 2, 0),
                    stale: nodes(&["n2"]),
                },
                EntityRead {
                    newest: version("b", 1, 0),
                    stale: nodes(&["n2"]),
                },
            ]
        );
        // With tag filters no holder is named: an answer without the entity says nothing.
        let reads = merge_answers(answers, |_| Vec::new(), &Shape::default());
        assert_eq!(reads[1].stale, Vec::<String>::new());
        assert_eq!(reads[0].stale, nodes(&["n2"]));
    }
}
