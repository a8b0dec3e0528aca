//! The property API (DESIGN §8): the node that receives a request coordinates it. Writes go to
//! every copy of the shard and succeed when `write_acks` copies acknowledge; reads ask every
//! copy and answer by the read rule ([`read_done`]: as soon as `copies - write_acks + 1` copies
//! answered and one holds a version, so that every acknowledged write is seen) with the newest by
//! the version order of those answers, rewriting stale copies (read repair, also of the copies
//! that answer later). No answer waits for a copy the rule does not need, nor for one found hung
//! meanwhile. A write that misses a copy is remembered, and the shard
//! is repaired when that node answers again. `local` requests touch only this node's own copy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use propd_merkle::{Entity, Property, Shape, shard_of, version_order};
use propd_proto::v1;
use propd_proto::v1::property_service_server::PropertyService;
use propd_store::{GroupDef, Query, RepairOutcome, StoreError};
use tonic::{Request, Response, Status};

use crate::convert::{property_from_wire, property_to_wire};
use crate::node::{NodeState, now_nanos};
use crate::pages;
use crate::tombstones::{
    Refused, check_client_delete_time, check_client_revision, check_peer_copy,
};

/// How long one node-to-node call of a coordinated request may take. The client's answer never
/// waits for it: writes answer at `write_acks`, reads by the read rule ([`read_done`]); the
/// calls still running then finish in the background.
pub(crate) const REPLICA_TIMEOUT: Duration = Duration::from_secs(5);
/// Set to `on` to make coordinated gets wait for every copy, as propd did before the read rule:
/// only for measuring what the rule saves (docs/benchmarks.md, "latency").
const READ_EVERY_COPY_VAR: &str = "PROPD_BENCH_READ_EVERY_COPY";

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
    Status::invalid_argument(clip(format!("{field}: {message}")))
}

/// A store error as a status: bad input is `InvalidArgument`, a full disk `ResourceExhausted`,
/// failing writes `Unavailable`, the rest `Internal`.
pub(crate) fn store_status(error: StoreError) -> Status {
    match error.validation() {
        Some(_) => Status::invalid_argument(clip(error.to_string())),
        None if matches!(error, StoreError::DiskFull { .. }) => {
            Status::resource_exhausted(clip(error.to_string()))
        }
        None if matches!(error, StoreError::WritesFailing { .. }) => {
            Status::unavailable(clip(error.to_string()))
        }
        None => {
            tracing::error!(%error, "store failure");
            Status::internal(clip(format!("store: {error}")))
        }
    }
}

/// The longest message a refusal carries: it may echo what it refuses (an id, a name), and a
/// `grpc-message` header of megabytes fails in clients as another error altogether.
const MAX_MESSAGE_CHARS: usize = 256;

/// `message`, or its first [`MAX_MESSAGE_CHARS`] characters, an ellipsis and its full length.
fn clip(message: String) -> String {
    match message.char_indices().nth(MAX_MESSAGE_CHARS) {
        None => message,
        Some((end, _)) => format!("{}… ({} bytes in all)", &message[..end], message.len()),
    }
}

/// What the copies of a coordinated request that did not answer it said.
#[derive(Debug, Default)]
pub(crate) struct Refusals(Vec<Status>);

impl Refusals {
    pub(crate) fn add(&mut self, status: Status) {
        self.0.push(status);
    }

    /// The refusals that say a copy's disk is full (`ResourceExhausted`), joined: a write that
    /// missed `write_acks` because of them is a full disk for the client, not a copy to repair.
    fn disk_full(&self) -> Option<String> {
        let full: Vec<&str> = self
            .0
            .iter()
            .filter(|status| status.code() == tonic::Code::ResourceExhausted)
            .map(Status::message)
            .collect();
        (!full.is_empty()).then(|| full.join("; "))
    }

    /// The refusal every copy gave, when each was reached and refused for the same reason: the
    /// request itself is at fault, and the client gets that reason rather than "unreachable".
    pub(crate) fn common(&self) -> Option<Status> {
        let (first, rest) = self.0.split_first()?;
        let same =
            |status: &Status| status.code() == first.code() && status.message() == first.message();
        (!propd_proto::peer::is_unreachable(first) && rest.iter().all(same))
            .then(|| Status::new(first.code(), first.message()))
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
            .placement()
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

    /// Refuses a write to this node's own copy (a replica write, a `--local` write) of a shard
    /// it does not hold: that data would live where no read or repair looks. An old holder of a
    /// shard on the move still holds it (it is in the node list until the move ends).
    fn check_held(&self, group: &GroupDef, shard: u32) -> Result<(), Status> {
        if self
            .node
            .node_ids(group, shard)
            .iter()
            .any(|id| id == self.node.me())
        {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "{} holds no copy of group {:?} shard {shard} (its copies are on {:?})",
            self.node.me(),
            group.name,
            self.node.node_ids(group, shard)
        )))
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

    /// Writes `property` (live or tombstone) to every copy of its shard at once and returns as
    /// soon as `write_acks` copies acknowledged, or as soon as so many no longer can: the copies that acknowledged by then
    /// (with whether one held a live copy before and whether the write lost to a newer version on
    /// each of them), and what the others said. The calls to the other copies keep running in the background; a
    /// copy that then fails is recorded for write-miss repair like any miss (`write_copy`), and
    /// one that acknowledges later is not counted in the answer.
    async fn replicate(&self, group: &GroupDef, shard: u32, property: Property) -> Replicated {
        let targets = self.node.node_ids(group, shard);
        let copies = targets.len() as u32;
        let required = self.required_acks(copies);
        // One detached task per copy (a `JoinSet` would abort the calls still running when the
        // answer goes out); each sends its answer, and the channel holds all of them.
        let (answer, mut answers) = tokio::sync::mpsc::channel(targets.len().max(1));
        for target in targets {
            let node = Arc::clone(&self.node);
            let property = property.clone();
            let group = group.name.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let acknowledged = write_copy(&node, &target, &group, shard, property).await;
                // The coordinator may have answered the client already; nobody waits then.
                let _ = answer.send(acknowledged).await;
            });
        }
        drop(answer);
        let (mut answered, mut acks, mut refusals) = (0, Vec::new(), Refusals::default());
        while let Some(copy) = answers.recv().await {
            answered += 1;
            match copy {
                Ok(ack) => acks.push(ack),
                Err(status) => refusals.add(status),
            }
            let acknowledged = acks.len() as u32;
            if acknowledged >= required || acknowledged + (copies - answered) < required {
                break;
            }
        }
        Replicated {
            acknowledged: acks.len() as u32,
            copies,
            had_live: acks.iter().any(|ack| ack.had_live),
            superseded: superseded(&acks),
            refusals,
        }
    }

    /// How many acknowledgements a write to `copies` copies needs: `write_acks`, capped at the
    /// number of copies.
    fn required_acks(&self, copies: u32) -> u32 {
        required_acks(self.node.config.write_acks, copies)
    }

    /// How many copies a read of a shard with `copies` copies waits for: `copies - write_acks +
    /// 1`, so that the copies it hears from and the `write_acks` copies that acknowledged any
    /// write share at least one copy, and the read sees every acknowledged write. With
    /// `write_acks` = the number of copies, the first answer; with the default 1, every copy.
    fn read_quorum(&self, copies: usize) -> usize {
        read_quorum(copies, self.node.config.write_acks)
    }

    /// Refuses a replicated write that fewer copies acknowledged than `write_acks` requires
    /// (capped at the number of copies); `what` names what was acknowledged. When no copy
    /// acknowledged and every copy refused for one reason, that reason is the answer.
    fn require_acks(
        &self,
        acknowledged: u32,
        copies: u32,
        refusals: &Refusals,
        what: &str,
    ) -> Result<(), Status> {
        if let Some(status) = refusals.common().filter(|_| acknowledged == 0) {
            return Err(status);
        }
        let required = self.required_acks(copies);
        if acknowledged < required {
            let short = format!(
                "only {acknowledged} of {copies} copies acknowledged {what}, {required} required"
            );
            if let Some(full) = refusals.disk_full() {
                return Err(Status::resource_exhausted(clip(format!("{short}: {full}"))));
            }
            return Err(self.shortfall(format!("{short}; copies that missed it will be repaired")));
        }
        Ok(())
    }

    /// Reads `entity` from the copies of (group, shard) and returns by the read rule
    /// ([`read_done`], with the read quorum; a copy found hung while waiting is not waited for):
    /// the copies that answered by then, with what each holds, and what the
    /// others said. The calls still running go on in the background; once they end, the copies
    /// they show stale are rewritten too ([`late_repair`]).
    async fn read_copies(
        &self,
        group: &GroupDef,
        shard: u32,
        entity: &Entity,
    ) -> (Vec<(String, Option<Property>)>, Refusals) {
        let targets = self.up_copies(self.node.node_ids(group, shard));
        let copies = targets.len();
        let required = if read_every_copy() {
            copies
        } else {
            self.read_quorum(copies)
        };
        // One detached task per copy (a `JoinSet` would abort the calls still running when the
        // answer goes out); each sends its answer, and the channel holds all of them.
        let (answer, mut answers) = tokio::sync::mpsc::channel(copies.max(1));
        for target in targets.iter().cloned() {
            let node = Arc::clone(&self.node);
            let entity = entity.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let copy = read_copy(&node, &target, &entity).await;
                let _ = answer.send((target, copy)).await;
            });
        }
        drop(answer);
        let (mut finished, mut found, mut refusals) = (0, Vec::new(), Refusals::default());
        let mut waiting: Vec<String> = targets.clone();
        loop {
            let hung_found = self.node.peers.hung_found();
            tokio::select! {
                received = answers.recv() => {
                    let Some((target, copy)) = received else { break };
                    finished += 1;
                    waiting.retain(|id| *id != target);
                    match copy {
                        Ok(copy) => found.push((target, copy)),
                        Err(status) => refusals.add(status),
                    }
                }
                () = hung_found => {}
            }
            // A copy found hung meanwhile (its probe timed out) is not waited for any more.
            let given_up = waiting
                .iter()
                .filter(|id| self.node.peers.is_hung(id))
                .count();
            let holding = found.iter().filter(|(_, copy)| copy.is_some()).count();
            if read_done(found.len(), holding, finished + given_up, copies, required) {
                break;
            }
        }
        if finished < copies {
            let api = self.clone();
            let early = found.clone();
            let group = group.name.clone();
            tokio::spawn(async move {
                let mut all = early.clone();
                while let Some((target, copy)) = answers.recv().await {
                    if let Ok(copy) = copy {
                        all.push((target, copy));
                    }
                }
                let shape = api.node.store.shape();
                if let Some(read) = late_repair(early, all, &shape) {
                    api.read_repair(&group, shard, &read.newest, read.stale);
                }
            });
        }
        (found, refusals)
    }

    /// One page of a coordinated query: the copies' pages merged in entity order, the newest
    /// version of each entity, stale copies rewritten (read repair). Each round of page calls
    /// answers by the read rule ([`read_done`] per shard of the query, each answer counted as
    /// holding): once every shard has its read quorum of copies answered, or none is left to
    /// wait for; a copy not waited for (slow past the quorum, or found hung) drops out of the
    /// merge and its call ends in the background, unused.
    async fn coordinated_query(
        &self,
        group: &GroupDef,
        query: Query,
        limit: usize,
        include_deleted: bool,
    ) -> Result<v1::QueryResponse, Status> {
        let shards = match query.shard {
            Some(shard) => shard..shard + 1,
            None => 0..group.shard_num,
        };
        let mut holders: Vec<String> = Vec::new();
        let mut rule = pages::ReadRule { shards: Vec::new() };
        for shard in shards {
            let copies = self.up_copies(self.node.node_ids(group, shard));
            for id in &copies {
                if !holders.contains(id) {
                    holders.push(id.clone());
                }
            }
            let required = if read_every_copy() {
                copies.len()
            } else {
                self.read_quorum(copies.len())
            };
            rule.shards.push((copies, required));
        }
        let (first, refusals) = pages::first_pages(&self.node, &rule, holders, &query).await;
        if let Some(status) = refusals.common().filter(|_| first.is_empty()) {
            return Err(status);
        }
        if first.is_empty() {
            return Err(Status::unavailable(format!(
                "no copy of group {:?} could be reached",
                group.name
            )));
        }
        let shape = self.node.store.shape();
        // Without tag filters, a copy that paged past an entity without it lacks it; with them,
        // it may hold a version the filter does not match.
        let tags_filter = !query.tags.is_empty();
        let copies_of = |entity: &Entity| {
            if tags_filter {
                Vec::new()
            } else {
                self.node.node_ids(group, shard_for(entity, group))
            }
        };
        let mut merge = pages::PageMerge::new(first);
        let mut answer = pages::Answer::default();
        // The last entity decided: where the next page starts when this one ends before an entity.
        let mut decided: Option<Entity> = None;
        loop {
            match merge.step(copies_of) {
                pages::Step::Entity(entity, answers) => {
                    let Some(read) = reconcile(answers, &shape) else {
                        continue;
                    };
                    let visible = include_deleted || !read.newest.is_tombstone();
                    if visible
                        && !answer.fits(&read.newest)?
                        && let Some(last) = &decided
                    {
                        // Over the answer's byte bound: the next page starts with this entity.
                        return Ok(v1::QueryResponse {
                            properties: answer.properties,
                            next_page_token: pages::page_token(last),
                            page_version: pages::PAGE_VERSION,
                        });
                    }
                    self.read_repair(
                        &group.name,
                        shard_for(&entity, group),
                        &read.newest,
                        read.stale,
                    );
                    if visible && answer.push(&read.newest, limit)? {
                        let next_page_token = if merge.exhausted() {
                            String::new()
                        } else {
                            pages::page_token(&entity)
                        };
                        return Ok(v1::QueryResponse {
                            properties: answer.properties,
                            next_page_token,
                            page_version: pages::PAGE_VERSION,
                        });
                    }
                    decided = Some(entity);
                }
                pages::Step::Fetch(fetch) if !fetch.is_empty() => {
                    pages::fetch_pages(&self.node, &rule, &mut merge, fetch, &query).await;
                }
                pages::Step::Fetch(_) | pages::Step::Done => {
                    return Ok(v1::QueryResponse {
                        properties: answer.properties,
                        next_page_token: String::new(),
                        page_version: pages::PAGE_VERSION,
                    });
                }
            }
        }
    }

    /// The copies worth asking in a read: hung members (their last probe or call timed out)
    /// are skipped, so a stopped member does not hold every read for a timeout.
    fn up_copies(&self, targets: Vec<String>) -> Vec<String> {
        targets
            .into_iter()
            .filter(|target| !self.node.peers.is_hung(target))
            .collect()
    }

    /// The status of a coordinated write that too few copies acknowledged: `ResourceExhausted`
    /// when this node's own disk is full (the client must hear it), else `Unavailable`.
    fn shortfall(&self, message: String) -> Status {
        match self.node.store_fault() {
            Some(fault) if self.node.store.writes_failing() => {
                Status::resource_exhausted(format!("{message}; this node: {fault}"))
            }
            _ => Status::unavailable(message),
        }
    }

    /// Rewrites the copies older than `newest` (or missing it) in the background.
    fn read_repair(&self, group: &str, shard: u32, newest: &Property, stale: Vec<String>) {
        for target in stale {
            let node = Arc::clone(&self.node);
            let newest = newest.clone();
            let group = group.to_owned();
            node.metrics
                .read_repairs
                .inc(&node.metrics.labels(&group, shard));
            tokio::spawn(async move {
                if write_copy(&node, &target, &group, shard, newest)
                    .await
                    .is_err()
                {
                    tracing::debug!(peer = %target, group, shard, "read repair did not reach the copy");
                }
            });
        }
    }
}

/// What a coordinated write did on the copies.
#[derive(Debug)]
struct Replicated {
    acknowledged: u32,
    copies: u32,
    /// Whether any copy held a live version before.
    had_live: bool,
    /// The newest revision the write lost to, when it lost on any copy that acknowledged.
    superseded: Option<i64>,
    /// What the copies that refused said.
    refusals: Refusals,
}

/// One copy's answer to a coordinated write.
#[derive(Debug, Clone, Copy)]
struct CopyAck {
    had_live: bool,
    /// The revision of the copy's own newer version, when the write lost to it.
    newer: Option<i64>,
}

impl CopyAck {
    fn of(outcome: &RepairOutcome, had_live: bool) -> Self {
        let newer = match outcome {
            RepairOutcome::LocalNewer(ours) => Some(ours.mod_revision),
            _ => None,
        };
        CopyAck { had_live, newer }
    }
}

/// The revision a write was superseded by: the newest one any acknowledging copy held. One is
/// enough: the version order is total, so that newer version wins on every copy once repair has
/// carried it there, and the write, stored on a copy that lacked it, is lost there too. (With
/// `write_acks` copies out of `n`, `2 * write_acks > n`, the copies acknowledging two writes
/// overlap, so a write acknowledged after another always meets it on one of them.)
fn superseded(acks: &[CopyAck]) -> Option<i64> {
    acks.iter().filter_map(|ack| ack.newer).max()
}

/// Writes one copy on `target`; `Ok(ack)` when it acknowledged. A copy that could not be
/// reached is remembered for write-miss repair.
async fn write_copy(
    node: &Arc<NodeState>,
    target: &str,
    group: &str,
    shard: u32,
    property: Property,
) -> Result<CopyAck, Status> {
    if target == node.me() {
        let result = blocking(node, move |node| {
            let had_live = node
                .store
                .get(&entity_of(&property)?)?
                .is_some_and(|p| !p.is_tombstone());
            Ok(CopyAck::of(&node.store.repair_apply(property)?, had_live))
        })
        .await;
        if let Err(status) = &result {
            tracing::warn!(group, shard, %status, "local copy of a coordinated write failed");
        }
        return result;
    }
    if node.peers.is_hung(target) {
        // Its last probe or call timed out: do not hold the write for a member that does not
        // answer; the write-miss repair brings it the write when it answers again.
        node.record_miss(target, group, shard);
        return Err(Status::unavailable(format!(
            "{target} does not answer (its last call timed out)"
        )));
    }
    let mut client = node
        .peers
        .property_client(target)
        .ok_or_else(|| not_a_member(target))?;
    let mut request = Request::new(v1::ReplicaWriteRequest {
        property: Some(property_to_wire(&property)),
    });
    request.set_timeout(REPLICA_TIMEOUT);
    let answer = client.replica_write(request).await;
    node.peers.saw_call(target, &answer);
    match answer {
        Ok(response) => {
            let response = response.into_inner();
            let newer = (response.outcome
                == v1::replica_write_response::Outcome::LocalNewer as i32)
                .then(|| response.current.map(|current| current.mod_revision))
                .flatten();
            Ok(CopyAck {
                had_live: response.had_live,
                newer,
            })
        }
        Err(status) => {
            tracing::info!(peer = target, group, shard, %status, "a coordinated write missed a copy; it will be repaired");
            node.record_miss(target, group, shard);
            if status.code() == tonic::Code::ResourceExhausted {
                // The copy's disk is full: the client hears which copy.
                return Err(Status::resource_exhausted(format!(
                    "{target}: {}",
                    status.message()
                )));
            }
            Err(status)
        }
    }
}

pub(crate) fn not_a_member(target: &str) -> Status {
    Status::unavailable(format!("{target} is not a known member"))
}

/// A time check's refusal as `InvalidArgument` naming the field.
pub(crate) fn check_time(checked: Result<(), Refused>) -> Result<(), Status> {
    checked.map_err(|refused| invalid(refused.field, refused.message))
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

/// Reads one copy from `target`: `Ok(copy)` when it answered (`copy` may be `None`).
async fn read_copy(
    node: &Arc<NodeState>,
    target: &str,
    entity: &Entity,
) -> Result<Option<Property>, Status> {
    if target == node.me() {
        let entity = entity.clone();
        return blocking(node, move |node| node.store.get(&entity)).await;
    }
    let mut client = node
        .peers
        .property_client(target)
        .ok_or_else(|| not_a_member(target))?;
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
    answer?
        .into_inner()
        .property
        .map(property_from_wire)
        .transpose()
        .map_err(|error| {
            Status::internal(format!("{target} answered a malformed property: {error}"))
        })
}

/// What the copies that answered a read say of one entity: its newest version and the copies to
/// rewrite with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntityRead {
    /// The newest version by the version order (it may be a tombstone).
    pub(crate) newest: Property,
    /// The nodes that answered with an older version or without the entity.
    pub(crate) stale: Vec<String>,
}

/// The read-repair decision over one entity's answers, `(node, copy)` with `None` for a node
/// that answered without it; `None` when no node holds it.
pub(crate) fn reconcile(
    answers: Vec<(String, Option<Property>)>,
    shape: &Shape,
) -> Option<EntityRead> {
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

/// `copies - write_acks + 1` (`write_acks` capped at the copies), at least 1.
fn read_quorum(copies: usize, write_acks: u32) -> usize {
    (copies + 1)
        .saturating_sub((write_acks as usize).min(copies))
        .max(1)
}

/// Whether [`READ_EVERY_COPY_VAR`] is `on` (read once).
fn read_every_copy() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(READ_EVERY_COPY_VAR).is_ok_and(|value| value == "on"))
}

/// The read rule: a coordinated read answers once `required` copies (the read quorum,
/// `PropertyApi::read_quorum`) answered and one of them holds a version, or once every copy
/// asked has finished (answered, failed, or been found hung). An answer without the entity does not end a read while other copies
/// may still answer: a copy that lost its row (quarantined, or a store started empty) must not
/// make a get say "not found".
pub(crate) fn read_done(
    answered: usize,
    holding: usize,
    finished: usize,
    copies: usize,
    required: usize,
) -> bool {
    (answered >= required.max(1) && holding > 0) || finished >= copies
}

/// The read repair still to do once a read's late answers are in: the newest version over all
/// answers, and the copies to rewrite with it, leaving out the early copies the answer's own read
/// repair rewrote already (when the newest did not change). `None` when nothing is left to do.
fn late_repair(
    early: Vec<(String, Option<Property>)>,
    all: Vec<(String, Option<Property>)>,
    shape: &Shape,
) -> Option<EntityRead> {
    let before = reconcile(early, shape);
    let mut after = reconcile(all, shape)?;
    if let Some(before) = before.filter(|before| before.newest == after.newest) {
        after.stale.retain(|node| !before.stale.contains(node));
    }
    (!after.stale.is_empty()).then_some(after)
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
        } else {
            check_time(check_client_revision(
                "property.mod_revision",
                property.mod_revision,
                now_nanos(),
                self.node.config.max_clock_skew,
            ))?;
        }
        self.check_size(&property)?;
        let revision = property.mod_revision;
        if request.local {
            self.check_held(&group, shard)?;
            let outcome = blocking(&self.node, move |node| node.store.apply(property)).await?;
            return Ok(Response::new(v1::ApplyResponse {
                mod_revision: revision,
                acknowledged: 1,
                copies: 1,
                superseded: CopyAck::of(&outcome, false).newer.unwrap_or(0),
            }));
        }
        let Replicated {
            acknowledged,
            copies,
            superseded,
            refusals,
            ..
        } = self.replicate(&group, shard, property).await;
        self.require_acks(
            acknowledged,
            copies,
            &refusals,
            &format!("revision {revision}"),
        )?;
        Ok(Response::new(v1::ApplyResponse {
            mod_revision: revision,
            acknowledged,
            copies,
            superseded: superseded.unwrap_or(0),
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
        let now = now_nanos();
        let skew = self.node.config.max_clock_skew;
        let mod_revision = if request.mod_revision == 0 {
            self.node.next_revision()
        } else {
            check_time(check_client_revision(
                "mod_revision",
                request.mod_revision,
                now,
                skew,
            ))?;
            request.mod_revision
        };
        let delete_time = if request.delete_time == 0 {
            now
        } else {
            check_time(check_client_delete_time(request.delete_time, now, skew))?;
            request.delete_time
        };
        if request.local {
            self.check_held(&group, shard)?;
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
                superseded: CopyAck::of(&outcome.outcome, false).newer.unwrap_or(0),
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
        let Replicated {
            acknowledged,
            copies,
            had_live: found,
            superseded,
            refusals,
        } = self.replicate(&group, shard, tombstone).await;
        self.require_acks(acknowledged, copies, &refusals, "the delete")?;
        Ok(Response::new(v1::DeleteResponse {
            found,
            mod_revision,
            delete_time,
            acknowledged,
            copies,
            superseded: superseded.unwrap_or(0),
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
        let (copies, refusals) = self.read_copies(&group, shard, &entity).await;
        if let Some(status) = refusals.common().filter(|_| copies.is_empty()) {
            return Err(status);
        }
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
        let (query, limit) = pages::store_query(&request, &group)?;
        if request.local {
            let page = blocking(&self.node, move |node| node.store.query_page(&query)).await?;
            return Ok(Response::new(pages::answer(page)?));
        }
        self.coordinated_query(&group, query, limit, request.include_deleted)
            .await
            .map(Response::new)
    }

    async fn import(
        &self,
        request: Request<v1::ImportRequest>,
    ) -> Result<Response<v1::ImportResponse>, Status> {
        crate::import::import(&self.node, request.into_inner())
            .await
            .map(Response::new)
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
        let (_, group, shard) = self.entity(&property.group, &property.name, &property.id)?;
        self.check_held(&group, shard)?;
        self.check_size(&property)?;
        check_time(check_peer_copy(
            &property,
            now_nanos(),
            self.node.config.max_clock_skew,
        ))?;
        let labels = self.node.metrics.labels(&property.group, shard);
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
            self.node.metrics.properties_applied.inc(&labels);
        }
        Ok(Response::new(v1::ReplicaWriteResponse {
            outcome: outcome as i32,
            current,
            had_live,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use propd_proto::v1::property_service_server::PropertyServiceServer;
    use propd_store::{RedbStore, StoreConfig, ValidationError};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio_stream::wrappers::TcpListenerStream;

    use super::*;
    use crate::config::{Member, Partial};
    use crate::node::lock;

    /// Found by the nemesis (seed 1): a write acknowledged by one copy that held a newer version
    /// and by one that lacked it answered ok, and lost.
    #[test]
    fn a_write_that_lost_on_any_acknowledging_copy_is_superseded() {
        let applied = CopyAck {
            had_live: true,
            newer: None,
        };
        let lost = |revision| CopyAck {
            had_live: true,
            newer: Some(revision),
        };
        assert_eq!(superseded(&[applied, applied]), None);
        assert_eq!(superseded(&[applied, lost(7)]), Some(7));
        assert_eq!(superseded(&[lost(5), applied, lost(9)]), Some(9));
        assert_eq!(superseded(&[]), None);
    }

    #[test]
    fn a_refusal_echoes_a_short_prefix_and_the_full_length() {
        let id = "x".repeat(10 * 1024 * 1024);
        let status = invalid("entity", format!("id {id} is refused"));
        let message = status.message();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(message.len() < 1024, "{} bytes", message.len());
        assert!(message.starts_with("entity: id xxx"), "{message}");
        assert!(
            message.ends_with(&format!("… ({} bytes in all)", id.len() + 22)),
            "{message}"
        );
        assert_eq!(
            invalid("group", "unknown group \"g\"").message(),
            "group: unknown group \"g\"",
            "a short message is whole"
        );
        let multibyte = clip("é".repeat(300));
        assert!(
            multibyte.starts_with(&"é".repeat(256)),
            "cut on a character boundary"
        );
    }

    /// The code tells the client what to do: fix the request, free space, try another node or
    /// later, or report a bug.
    #[test]
    fn store_errors_map_to_the_status_a_client_can_act_on() {
        let refused = StoreError::Invalid(ValidationError::UnknownGroup { group: "h".into() });
        let status = store_status(refused);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "unknown group \"h\"");
        let full = StoreError::DiskFull {
            path: "/data/propd.redb".into(),
            detail: "No space left on device".into(),
        };
        let status = store_status(full);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().starts_with("disk full"),
            "{}",
            status.message()
        );
        let failing = StoreError::WritesFailing {
            path: "/data/propd.redb".into(),
            detail: "Input/output error".into(),
        };
        assert_eq!(store_status(failing).code(), tonic::Code::Unavailable);
        let corrupt = StoreError::Corrupt {
            table: "properties".into(),
            detail: "bad length".into(),
        };
        let status = store_status(corrupt);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().starts_with("store: corrupt record"),
            "{}",
            status.message()
        );
    }

    /// A node with members n1, n2 and n3 at addresses nothing listens on, for the checks that
    /// call no copy.
    fn lone_node(me: &str, write_acks: u32, dir: &Path) -> Arc<NodeState> {
        let addrs = [1, 2, 3].map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        node_state(me, addrs, write_acks, dir)
    }

    #[tokio::test]
    async fn a_write_short_of_its_acknowledgements_because_disks_are_full_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let api = PropertyApi::new(lone_node("n1", 2, dir.path()));
        let mut full = Refusals::default();
        full.add(Status::resource_exhausted("disk full: writes to /d fail"));
        full.add(Status::unavailable("connection refused"));
        let status = api
            .require_acks(1, 3, &full, "the write")
            .expect_err("one of two acknowledgements");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert_eq!(
            status.message(),
            "only 1 of 3 copies acknowledged the write, 2 required: disk full: writes to /d fail"
        );
        let mut down = Refusals::default();
        down.add(Status::unavailable("connection refused"));
        down.add(Status::unavailable("connection refused"));
        let status = api
            .require_acks(1, 3, &down, "the write")
            .expect_err("one of two acknowledgements");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().ends_with("will be repaired"), "{status}");
        api.require_acks(2, 3, &down, "the write")
            .expect("two of two acknowledgements");
    }

    #[tokio::test]
    async fn bad_numbers_in_a_write_or_a_delete_are_refused_by_field_and_store_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let node = lone_node("n1", 1, dir.path());
        let api = PropertyApi::new(Arc::clone(&node));
        let field_of = |status: Status| {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            status
                .message()
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        for (mod_revision, delete_time, field) in [
            (-1, 0, "property.mod_revision"),
            (1, 5, "property.delete_time"),
        ] {
            let status = api
                .apply(Request::new(v1::ApplyRequest {
                    property: Some(property_to_wire(&version("a", mod_revision, delete_time))),
                    local: true,
                }))
                .await
                .expect_err("refused");
            assert_eq!(field_of(status), field, "{mod_revision} {delete_time}");
        }
        for (mod_revision, delete_time, field) in [(-1, 0, "mod_revision"), (0, -1, "delete_time")]
        {
            let status = api
                .delete(Request::new(v1::DeleteRequest {
                    mod_revision,
                    delete_time,
                    local: true,
                    ..delete_of("a").into_inner()
                }))
                .await
                .expect_err("refused");
            assert_eq!(field_of(status), field, "{mod_revision} {delete_time}");
        }
        let entity = Entity::new("g", "n", "a").unwrap();
        assert_eq!(node.store.get(&entity).unwrap(), None);
    }

    /// A replica write says what it did to the copy and whether the copy was live before, and
    /// only a write it applied counts in `propd_properties_applied`.
    #[tokio::test]
    async fn a_replica_write_answers_its_outcome_and_counts_only_what_it_applied() {
        use v1::replica_write_response::Outcome;
        let dir = tempfile::tempdir().unwrap();
        let node = lone_node("n1", 1, dir.path());
        let api = PropertyApi::new(Arc::clone(&node));
        let applied = || {
            node.metrics
                .encode()
                .lines()
                .find(|line| line.starts_with("propd_properties_applied_total{"))
                .and_then(|line| line.rsplit(' ').next())
                .map(|count| count.parse::<u64>().unwrap())
                .unwrap_or(0)
        };
        let steps = [
            (version("a", 5, 0), Outcome::Applied, false, None, 1),
            (version("a", 5, 0), Outcome::Same, true, None, 1),
            (version("a", 3, 0), Outcome::LocalNewer, true, Some(5), 1),
            (version("a", 6, 6), Outcome::Applied, true, None, 2),
            (version("a", 7, 0), Outcome::Applied, false, None, 3),
        ];
        for (property, outcome, had_live, current, count) in steps {
            let answer = api
                .replica_write(Request::new(v1::ReplicaWriteRequest {
                    property: Some(property_to_wire(&property)),
                }))
                .await
                .unwrap_or_else(|status| panic!("{status}"))
                .into_inner();
            let what = format!("revision {}", property.mod_revision);
            assert_eq!(answer.outcome, outcome as i32, "{what}");
            assert_eq!(answer.had_live, had_live, "{what}");
            assert_eq!(answer.current.map(|c| c.mod_revision), current, "{what}");
            assert_eq!(applied(), count, "{what}");
        }
    }

    #[tokio::test]
    async fn a_node_refuses_to_write_its_own_copy_of_a_shard_it_does_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let api = PropertyApi::new(lone_node("n1", 1, dir.path()));
        // One copy per shard: each shard lives on one of the three members.
        let single = GroupDef::new("single", 12, 0);
        let (mut held, mut elsewhere) = (0, 0);
        for shard in 0..12 {
            let holders = api.node.node_ids(&single, shard);
            assert_eq!(holders.len(), 1);
            match api.check_held(&single, shard) {
                Ok(()) => {
                    assert_eq!(holders, ["n1"], "shard {shard}");
                    held += 1;
                }
                Err(status) => {
                    assert_ne!(holders, ["n1"], "shard {shard}");
                    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
                    assert!(
                        status.message().starts_with(&format!(
                            "n1 holds no copy of group \"single\" shard {shard} "
                        )),
                        "{status}"
                    );
                    elsewhere += 1;
                }
            }
        }
        assert!(
            held > 0 && elsewhere > 0,
            "{held} held, {elsewhere} elsewhere"
        );
    }

    #[tokio::test]
    async fn a_property_of_the_size_limit_is_taken_and_one_byte_more_refused() {
        let dir = tempfile::tempdir().unwrap();
        let api = PropertyApi::new(lone_node("n1", 1, dir.path()));
        let max = api.node.config.max_property_bytes;
        let mut property = version("a", 1, 0);
        property
            .tags
            .insert("v".into(), propd_merkle::TagValue::Str(String::new()));
        // Grow a tag until the canonical encoding is exactly the limit.
        for _ in 0..4 {
            let size = property.canonical_bytes().len();
            let Some(propd_merkle::TagValue::Str(value)) = property.tags.get_mut("v") else {
                panic!("a string tag");
            };
            let len = (value.len() + max).saturating_sub(size);
            *value = "x".repeat(len);
        }
        assert_eq!(property.canonical_bytes().len(), max);
        api.check_size(&property).expect("at the limit");
        let Some(propd_merkle::TagValue::Str(value)) = property.tags.get_mut("v") else {
            panic!("a string tag");
        };
        value.push('x');
        let status = api.check_size(&property).expect_err("over the limit");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            format!(
                "property: {} bytes is over the limit of {max} bytes",
                max + 1
            )
        );
    }

    #[test]
    fn the_same_refusal_from_every_copy_is_the_answer() {
        let refused = || Status::invalid_argument("tags: too many");
        let mut all = Refusals::default();
        for _ in 0..3 {
            all.add(refused());
        }
        let status = all.common().expect("one reason");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "tags: too many");

        let mut mixed = Refusals::default();
        mixed.add(refused());
        mixed.add(Status::invalid_argument("another reason"));
        assert!(mixed.common().is_none(), "different reasons");

        let mut down = Refusals::default();
        down.add(Status::unavailable("connection refused"));
        down.add(Status::unavailable("connection refused"));
        assert!(
            down.common().is_none(),
            "unreachable copies are not refusals"
        );

        let mut partly = Refusals::default();
        partly.add(refused());
        partly.add(Status::unavailable("connection refused"));
        assert!(partly.common().is_none(), "one copy was not reached");
        assert!(Refusals::default().common().is_none());
    }

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
    fn a_write_is_superseded_when_any_acknowledging_copy_held_a_newer_version() {
        let newer = |revision| CopyAck {
            had_live: true,
            newer: Some(revision),
        };
        let applied = CopyAck {
            had_live: false,
            newer: None,
        };
        assert_eq!(
            superseded(&[newer(7), newer(9), newer(8)]),
            Some(9),
            "the newest version it lost to"
        );
        assert_eq!(
            superseded(&[newer(7), applied]),
            Some(7),
            "stored on one copy, but repair carries the newer version there too"
        );
        assert_eq!(superseded(&[applied, applied]), None);
        assert_eq!(superseded(&[applied]), None);
    }

    #[tokio::test]
    async fn too_few_acknowledgements_are_unavailable_unless_every_copy_refused_alike() {
        let dir = tempfile::tempdir().unwrap();
        // No call is made: the addresses are never used.
        let addrs = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"].map(|a| a.parse().unwrap());
        let api = PropertyApi::new(node_state("n1", addrs, 2, dir.path()));
        let none = Refusals::default();
        assert!(
            api.require_acks(2, 3, &none, "it").is_ok(),
            "write_acks met"
        );
        assert!(api.require_acks(3, 3, &none, "it").is_ok(), "more than met");
        let short = api.require_acks(1, 3, &none, "it").unwrap_err();
        assert_eq!(short.code(), tonic::Code::Unavailable, "{short}");
        assert!(
            short
                .message()
                .starts_with("only 1 of 3 copies acknowledged it, 2 required"),
            "{short}"
        );
        // write_acks = 2 with one copy: one acknowledgement is enough.
        assert!(api.require_acks(1, 1, &none, "it").is_ok(), "capped");
        let mut alike = Refusals::default();
        for _ in 0..3 {
            alike.add(Status::invalid_argument("tags: too many"));
        }
        let refused = api.require_acks(0, 3, &alike, "it").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        // One copy took it: the others' refusal is not the request's fault alone.
        let mut two = Refusals::default();
        two.add(Status::invalid_argument("tags: too many"));
        two.add(Status::invalid_argument("tags: too many"));
        let short = api.require_acks(1, 3, &two, "it").unwrap_err();
        assert_eq!(short.code(), tonic::Code::Unavailable, "{short}");
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
    fn a_read_hears_from_enough_copies_to_meet_every_acknowledged_write() {
        assert_eq!(read_quorum(3, 1), 3);
        assert_eq!(read_quorum(3, 2), 2);
        assert_eq!(read_quorum(3, 3), 1);
        assert_eq!(read_quorum(3, 7), 1, "write_acks is capped at the copies");
        assert_eq!(read_quorum(1, 1), 1);
        assert_eq!(read_quorum(0, 1), 1);
    }

    #[test]
    fn a_read_answers_once_enough_copies_answered_and_one_holds_a_version() {
        // A quorum of 1 (write_acks = copies): the first copy holding a version.
        assert!(read_done(1, 1, 1, 3, 1));
        assert!(
            !read_done(1, 0, 1, 3, 1),
            "an answer without the entity waits for the other copies"
        );
        assert!(read_done(2, 1, 2, 3, 1));
        assert!(read_done(3, 0, 3, 3, 1), "every copy answered: not found");
        assert!(read_done(1, 0, 3, 3, 1), "the others failed");
        // A quorum of 2.
        assert!(!read_done(1, 1, 1, 3, 2));
        assert!(read_done(2, 1, 2, 3, 2));
        assert!(!read_done(0, 0, 0, 3, 1));
    }

    #[test]
    fn late_answers_rewrite_only_what_the_answer_did_not() {
        let (old, new, newer) = (version("a", 1, 0), version("a", 2, 0), version("a", 3, 0));
        let early = vec![
            ("n1".to_owned(), Some(new.clone())),
            ("n2".to_owned(), Some(old.clone())),
        ];
        let with = |late: Option<Property>| {
            let mut all = early.clone();
            all.push(("n3".to_owned(), late));
            all
        };
        let shape = Shape::default();
        let read = late_repair(early.clone(), with(Some(old)), &shape).unwrap();
        assert_eq!((read.newest, read.stale), (new.clone(), nodes(&["n3"])));
        let read = late_repair(early.clone(), with(None), &shape).unwrap();
        assert_eq!(read.stale, nodes(&["n3"]));
        assert_eq!(late_repair(early.clone(), with(Some(new)), &shape), None);
        let read = late_repair(early.clone(), with(Some(newer.clone())), &shape).unwrap();
        assert_eq!(
            (read.newest, read.stale),
            (newer, nodes(&["n1", "n2"])),
            "a newer late copy goes to every copy that answered"
        );
    }

    /// With `write_acks` = 2 a read must hear from two copies: one of them holds every
    /// acknowledged write, here the newer version only n2 has (n1's own copy answers first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_get_hears_from_its_read_quorum_and_answers_the_newest_copy() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        first.store.apply(version("a", 5, 0)).unwrap();
        let newest = version("a", 9, 0);
        second.store.apply(newest.clone()).unwrap();
        let got = PropertyApi::new(Arc::clone(&first))
            .get(get_of("a"))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!(got.property, Some(property_to_wire(&newest)));
        release.send(()).unwrap();
    }

    /// With `write_acks` = 3 a read answers from the first copy that holds a version; the copies
    /// that answer after it are still compared, and an older one is rewritten once every call
    /// has ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_copy_that_answers_after_the_read_is_still_repaired() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third_with(3).await;
        let newest = version("a", 9, 0);
        first.store.apply(newest.clone()).unwrap();
        second.store.apply(version("a", 5, 0)).unwrap();
        let got = PropertyApi::new(Arc::clone(&first))
            .get(get_of("a"))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert!(got.property.is_some());
        // The read cannot have compared n2 with n1 before it answered (it stopped at the first
        // copy that answered); n3's call ends when n3 lets go.
        release.send(()).unwrap();
        let entity = Entity::new("g", "n", "a").unwrap();
        eventually(
            "n2's older copy is rewritten by the late read repair",
            || second.store.get(&entity).unwrap() == Some(newest.clone()),
        )
        .await;
    }

    /// A query without tag filters that reads a copy without an entity another copy holds
    /// rewrites that copy (a copy that paged past the entity lacks it); a query of one shard
    /// reads that shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_rewrites_a_copy_that_lacks_an_entity_and_reads_the_shard_it_names() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        let stored = version("a", 5, 0);
        first.store.apply(stored.clone()).unwrap();
        let api = PropertyApi::new(Arc::clone(&first));
        for shard in [None, Some(0)] {
            let found = api
                .query(Request::new(v1::QueryRequest {
                    group: "g".into(),
                    shard,
                    ..v1::QueryRequest::default()
                }))
                .await
                .unwrap_or_else(|status| panic!("shard {shard:?}: {status}"))
                .into_inner();
            assert_eq!(
                found.properties,
                vec![property_to_wire(&stored)],
                "{shard:?}"
            );
        }
        let entity = Entity::new("g", "n", "a").unwrap();
        eventually("the query's read repair writes n2's missing copy", || {
            second.store.get(&entity).unwrap() == Some(stored.clone())
        })
        .await;
        release.send(()).unwrap();
    }

    fn apply_at(id: &str, mod_revision: i64) -> Request<v1::ApplyRequest> {
        Request::new(v1::ApplyRequest {
            property: Some(property_to_wire(&version(id, mod_revision, 0))),
            local: false,
        })
    }

    fn delete_of(id: &str) -> Request<v1::DeleteRequest> {
        Request::new(v1::DeleteRequest {
            group: "g".into(),
            name: "n".into(),
            id: id.into(),
            ..v1::DeleteRequest::default()
        })
    }

    /// A write that loses, on the coordinator's own copy or on another, to a newer version
    /// says by which revision; a delete finds the entity only where a copy held it live; a
    /// revision past the clock skew is refused by field.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_says_what_superseded_it_and_a_delete_what_it_found() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        let api = PropertyApi::new(Arc::clone(&first));
        first.store.apply(version("mine", 9, 0)).unwrap();
        second.store.apply(version("theirs", 8, 0)).unwrap();
        let answer = api.apply(apply_at("mine", 5)).await.unwrap().into_inner();
        assert_eq!((answer.acknowledged, answer.superseded), (2, 9));
        let answer = api.apply(apply_at("theirs", 5)).await.unwrap().into_inner();
        assert_eq!((answer.acknowledged, answer.superseded), (2, 8));
        let answer = api.apply(apply_at("new", 5)).await.unwrap().into_inner();
        assert_eq!((answer.acknowledged, answer.superseded), (2, 0));

        for node in [&first, &second] {
            node.store.repair_apply(version("gone", 4, 4)).unwrap();
        }
        let answer = api.delete(delete_of("gone")).await.unwrap().into_inner();
        assert!(!answer.found, "only tombstones were there");
        let answer = api.delete(delete_of("new")).await.unwrap().into_inner();
        assert!(answer.found, "both copies held it live");
        let answer = api.delete(delete_of("never")).await.unwrap().into_inner();
        assert!(!answer.found);
        // A delete time and revision the client gives, within the clock skew, are kept.
        let now = now_nanos();
        let answer = api
            .delete(Request::new(v1::DeleteRequest {
                mod_revision: now,
                delete_time: now,
                ..delete_of("given").into_inner()
            }))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!((answer.mod_revision, answer.delete_time), (now, now));

        let ahead = now_nanos() + 3_600 * 1_000_000_000;
        let status = api
            .apply(apply_at("late", ahead))
            .await
            .expect_err("an hour ahead of the clock");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("property.mod_revision: "),
            "{status}"
        );
        release.send(()).unwrap();
    }

    /// A local write of an entity goes to the entity's own shard: taken where this node holds
    /// that shard, refused where it does not.
    #[tokio::test]
    async fn a_local_write_is_checked_against_its_entitys_own_shard() {
        let dir = tempfile::tempdir().unwrap();
        let addrs = [1, 2, 3].map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let single = GroupDef::new("single", 12, 0);
        let node = node_state_of("n1", addrs, 1, dir.path(), vec![single.clone()]);
        let api = PropertyApi::new(Arc::clone(&node));
        let (mut taken, mut refused) = (0, 0);
        for i in 0..40 {
            let mut property = version(&i.to_string(), 0, 0);
            property.group = "single".into();
            let entity = entity_of(&property).unwrap();
            let held = node.node_ids(&single, shard_for(&entity, &single)) == ["n1"];
            let answer = api
                .apply(Request::new(v1::ApplyRequest {
                    property: Some(property_to_wire(&property)),
                    local: true,
                }))
                .await;
            match answer {
                Ok(_) => {
                    assert!(held, "{entity} taken on a node without its shard");
                    assert!(node.store.get(&entity).unwrap().is_some());
                    taken += 1;
                }
                Err(status) => {
                    assert!(!held, "{entity} refused on its own shard's node: {status}");
                    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
                    refused += 1;
                }
            }
        }
        assert!(taken > 0 && refused > 0, "{taken} taken, {refused} refused");
        // Which shards n1 holds, other than shard 0, decided the answers: a node that took
        // every entity as shard 0 would take all or none.
        let shards: std::collections::BTreeSet<u32> = (0..40)
            .map(|i| {
                shard_for(
                    &Entity::new("single", "n", &i.to_string()).unwrap(),
                    &single,
                )
            })
            .collect();
        assert!(shards.len() > 1);
    }

    /// A coordinated query reads the copies' tombstones too: a copy's older live version of an
    /// entity another copy deleted is not answered, nor is the tombstone unless asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_does_not_answer_a_version_another_copy_deleted() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        let tombstone = version("a", 9, 9);
        first.store.repair_apply(tombstone.clone()).unwrap();
        second.store.apply(version("a", 5, 0)).unwrap();
        let api = PropertyApi::new(Arc::clone(&first));
        let query = |include_deleted| {
            Request::new(v1::QueryRequest {
                group: "g".into(),
                include_deleted,
                ..v1::QueryRequest::default()
            })
        };
        let found = api.query(query(false)).await.unwrap().into_inner();
        assert_eq!(found.properties, Vec::new(), "the delete stands");
        let found = api.query(query(true)).await.unwrap().into_inner();
        assert_eq!(found.properties, vec![property_to_wire(&tombstone)]);
        release.send(()).unwrap();
    }

    /// A query whose answer takes several rounds of page calls matches each copy's later
    /// pages to that copy: the stale copy is the one rewritten.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_query_over_several_rounds_repairs_the_copy_its_later_pages_show_stale() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        // Two tombstones first: with a limit of one, "a" comes in the third round of pages.
        tombstones_first(&first, &second);
        first.store.apply(version("a", 5, 0)).unwrap();
        let newest = version("a", 9, 0);
        second.store.apply(newest.clone()).unwrap();
        let found = PropertyApi::new(Arc::clone(&first))
            .query(Request::new(v1::QueryRequest {
                group: "g".into(),
                limit: 1,
                ..v1::QueryRequest::default()
            }))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!(found.properties, vec![property_to_wire(&newest)]);
        let entity = Entity::new("g", "n", "a").unwrap();
        eventually("n1's older copy is rewritten", || {
            first.store.get(&entity).unwrap() == Some(newest.clone())
        })
        .await;
        release.send(()).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_get_and_a_query_answer_while_a_hung_copy_is_still_being_read() {
        // write_acks = 2: a read hears from two of the three copies.
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        let stored = version("a", 5, 0);
        first.store.apply(stored.clone()).unwrap();
        second.store.apply(stored.clone()).unwrap();
        // Two tombstones before it in entity order: a query of one visible property at a time
        // takes three rounds of page calls (each copy pages one entity at a time).
        tombstones_first(&first, &second);
        let api = PropertyApi::new(Arc::clone(&first));

        let got = api
            .get(get_of("a"))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!(got.property, Some(property_to_wire(&stored)));
        let found = api
            .query(Request::new(v1::QueryRequest {
                group: "g".into(),
                limit: 1,
                ..v1::QueryRequest::default()
            }))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!(found.properties, vec![property_to_wire(&stored)]);
        // The copies' pages ended at their limit on "a": they cannot tell it was their last.
        let rest = api
            .query(Request::new(v1::QueryRequest {
                group: "g".into(),
                limit: 1,
                page_token: found.next_page_token,
                ..v1::QueryRequest::default()
            }))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!(
            (rest.properties, rest.next_page_token),
            (Vec::new(), String::new())
        );
        // n3 cannot have answered, and its calls have not timed out yet: a coordinator that
        // waited for them would have seen them fail and marked n3 hung.
        assert!(
            first.peers.is_up("n3") && !first.peers.is_hung("n3"),
            "answered without waiting for n3"
        );
        release.send(()).unwrap();
        eventually("the calls to n3 fail in the background", || {
            !first.peers.is_up("n3")
        })
        .await;
    }

    /// Node `me` of a cluster of n1, n2 and n3 at `addrs`, holding group `g` (one shard, a copy
    /// on every node), with its store in `dir`.
    fn node_state(me: &str, addrs: [SocketAddr; 3], write_acks: u32, dir: &Path) -> Arc<NodeState> {
        node_state_of(me, addrs, write_acks, dir, vec![GroupDef::new("g", 1, 2)])
    }

    /// [`node_state`] holding `groups`.
    fn node_state_of(
        me: &str,
        addrs: [SocketAddr; 3],
        write_acks: u32,
        dir: &Path,
        groups: Vec<GroupDef>,
    ) -> Arc<NodeState> {
        let listen = ["n1", "n2", "n3"]
            .into_iter()
            .zip(addrs)
            .find_map(|(id, addr)| (id == me).then(|| addr.to_string()));
        let members = ["n1", "n2", "n3"]
            .into_iter()
            .zip(addrs)
            .map(|(id, addr)| Member {
                id: id.to_owned(),
                addr,
            })
            .collect();
        let config = Partial {
            node_id: Some(me.to_owned()),
            listen,
            data_dir: Some(dir.to_owned()),
            write_acks: Some(write_acks),
            members: Some(members),
            groups: Some(groups),
            ..Partial::default()
        }
        .resolve()
        .unwrap_or_else(|e| panic!("{e}"));
        let store = StoreConfig::new(dir, config.groups.clone(), Shape::default());
        let store = RedbStore::open(store).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(NodeState::new(config, store))
    }

    /// A listener for a node's property API, bound before its node state exists.
    /// Three copies with `write_acks` = 2: n1 (`first`) is the node under test and is never
    /// dialed, n2 (`second`) serves its property API on loopback, n3 accepts connections and
    /// answers nothing until `release` is sent.
    struct HungThird {
        first: Arc<NodeState>,
        second: Arc<NodeState>,
        release: oneshot::Sender<()>,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    async fn hung_third() -> HungThird {
        hung_third_with(2).await
    }

    /// [`hung_third`] with n1 and n2 at the given `write_acks`.
    async fn hung_third_with(write_acks: u32) -> HungThird {
        let (n1_dir, n2_dir) = (tempfile::tempdir(), tempfile::tempdir());
        let (n1_dir, n2_dir) = (n1_dir.unwrap(), n2_dir.unwrap());
        let (n2_listener, n2) = listener().await;
        let (n3_listener, n3) = listener().await;
        let n1: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let second = node_state("n2", [n1, n2, n3], write_acks, n2_dir.path());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PropertyServiceServer::new(PropertyApi::new(Arc::clone(
                    &second,
                ))))
                .serve_with_incoming(TcpListenerStream::new(n2_listener)),
        );
        let release = hung_peer(n3_listener);
        let first = node_state("n1", [n1, n2, n3], write_acks, n1_dir.path());
        HungThird {
            first,
            second,
            release,
            _dirs: (n1_dir, n2_dir),
        }
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        (listener, addr)
    }

    /// A peer that accepts connections and never answers, until `release` is sent: then it
    /// closes every connection and stops listening, and the calls to it fail.
    fn hung_peer(listener: TcpListener) -> oneshot::Sender<()> {
        let (release, released) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut released = released;
            loop {
                tokio::select! {
                    connection = listener.accept() => {
                        if let Ok((socket, _)) = connection {
                            held.push(socket);
                        }
                    }
                    _ = &mut released => return,
                }
            }
        });
        release
    }

    /// A coordinated get of `g/n/{id}`.
    fn get_of(id: &str) -> Request<v1::GetRequest> {
        Request::new(v1::GetRequest {
            group: "g".into(),
            name: "n".into(),
            id: id.into(),
            local: false,
            include_deleted: false,
        })
    }

    /// Tombstones of `g/n/0` and `g/n/1` on both nodes: before any other id in entity order, so
    /// that a query of one visible property at a time takes two rounds of page calls more.
    fn tombstones_first(first: &NodeState, second: &NodeState) {
        for id in ["0", "1"] {
            let tombstone = version(id, 4, 4);
            first.store.repair_apply(tombstone.clone()).unwrap();
            second.store.repair_apply(tombstone).unwrap();
        }
    }

    fn apply_request(id: &str) -> Request<v1::ApplyRequest> {
        Request::new(v1::ApplyRequest {
            property: Some(property_to_wire(&version(id, 0, 0))),
            local: false,
        })
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..600 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_answers_at_write_acks_while_a_hung_copy_is_still_being_written() {
        let HungThird {
            first,
            second,
            release,
            _dirs,
            ..
        } = hung_third().await;
        let api = PropertyApi::new(Arc::clone(&first));

        let answer = api
            .apply(apply_request("a"))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        // n1 and n2 acknowledged; n3 cannot have answered: it answers nothing until released.
        assert_eq!((answer.acknowledged, answer.copies), (2, 3));
        let entity = Entity::new("g", "n", "a").unwrap();
        for node in [&first, &second] {
            assert!(node.store.get(&entity).unwrap().is_some(), "{}", node.me());
        }
        assert_eq!(
            lock(&first.misses).pending("g", 0),
            0,
            "n3's call still runs"
        );

        // The call to n3 went on in the background; when it fails, the miss is recorded.
        release.send(()).unwrap();
        eventually("the miss of n3 is recorded", || {
            lock(&first.misses).pending("g", 0) == 1
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_every_copy_must_acknowledge_succeeds_when_every_copy_does() {
        let dirs = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let (n2_listener, n2) = listener().await;
        let (n3_listener, n3) = listener().await;
        let n1: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for (me, listener, dir) in [("n2", n2_listener, &dirs[1]), ("n3", n3_listener, &dirs[2])] {
            let state = node_state(me, [n1, n2, n3], 3, dir.path());
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(PropertyServiceServer::new(PropertyApi::new(state)))
                    .serve_with_incoming(TcpListenerStream::new(listener)),
            );
        }
        let first = node_state("n1", [n1, n2, n3], 3, dirs[0].path());
        // write_acks = 3 of three copies: the answer waits for the last one, and does not give
        // up while the copies still out can make it.
        let answer = PropertyApi::new(first)
            .apply(apply_request("c"))
            .await
            .unwrap_or_else(|status| panic!("{status}"))
            .into_inner();
        assert_eq!((answer.acknowledged, answer.copies), (3, 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_can_no_longer_reach_write_acks_fails_without_waiting_for_a_hung_copy() {
        let dir = tempfile::tempdir().unwrap();
        // n2 refuses connections: its port is bound without listening, and held for the test
        // (a closed port could be bound by another test meanwhile). n3 hangs.
        let refusing = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
        refusing
            .bind("127.0.0.1:0".parse().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        let n2 = refusing.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let (n3_listener, n3) = listener().await;
        let release = hung_peer(n3_listener);
        let n1: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = node_state("n1", [n1, n2, n3], 3, dir.path());
        let api = PropertyApi::new(Arc::clone(&first));

        let status = api
            .apply(apply_request("b"))
            .await
            .err()
            .unwrap_or_else(|| panic!("three acknowledgements are out of reach"));
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        // The answer goes out as soon as n2 failed: the local copy may or may not have
        // acknowledged by then.
        assert!(
            ["only 0 of 3 ", "only 1 of 3 "]
                .iter()
                .any(|start| status.message().starts_with(start))
                && status.message().contains("3 required"),
            "{status}"
        );
        // Answered while the call to n3 still hangs: only n2's miss is recorded so far.
        assert_eq!(lock(&first.misses).pending("g", 0), 1);
        let entity = Entity::new("g", "n", "b").unwrap();
        eventually("the local copy is written in the background", || {
            first.store.get(&entity).unwrap().is_some()
        })
        .await;
        release.send(()).unwrap();
        eventually("the miss of n3 is recorded", || {
            lock(&first.misses).pending("g", 0) == 2
        })
        .await;
    }
}
