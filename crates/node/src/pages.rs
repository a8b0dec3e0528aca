//! Paged queries (docs/protocol.md, "Paged queries"): the page token, and the coordinator's merge
//! of the copies' answers one page at a time.
//!
//! A coordinated query asks every member holding a shard of the group for one page of what it
//! holds (tombstones included), starting after the client's token, and merges the pages in entity
//! order. An entity is decided once every copy still answering has paged past it; a copy whose
//! page is used up is asked for its next page only then. So the coordinator holds at most one
//! page per copy and the answer, whatever the size of the group, and never rescans: each copy
//! reads from where its last page ended. Each round of page calls answers by the read rule
//! ([`ReadRule`]): once every shard has its read quorum of copies answered; a copy not waited
//! for, or whose page failed, drops out of the merge.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;

use propd_merkle::{Entity, Property};
use propd_proto::v1;
use propd_store::{GroupDef, Query, QueryPage};
use tonic::{Request, Status};

use crate::convert::{property_from_wire, property_to_wire, tag_value_from_wire};
use crate::coordinator::{REPLICA_TIMEOUT, Refusals, blocking, invalid, not_a_member};
use crate::node::NodeState;

/// The query limit when the client gives none.
pub(crate) const DEFAULT_QUERY_LIMIT: u32 = 1000;
/// The largest query limit a client may ask for.
pub(crate) const MAX_QUERY_LIMIT: u32 = 1_000_000;
/// A page ends once its properties reach about this many bytes (a quarter of the largest gRPC
/// message, so that an answer always decodes); a larger single property travels alone.
pub(crate) const PAGE_BYTES: usize = propd_proto::MAX_MESSAGE_BYTES / 4;
/// Room around the properties of an answer (its other fields and the framing).
const ANSWER_HEADROOM: usize = 64 * 1024;
/// The page format this node answers with (`QueryResponse.page_version`).
pub(crate) const PAGE_VERSION: u32 = 1;
/// The prefix of a version-1 page token; the rest is the hex of the last entity answered.
const TOKEN_V1: &str = "1.";

/// The token that resumes a query after `entity`.
pub(crate) fn page_token(entity: &Entity) -> String {
    format!("{TOKEN_V1}{}", hex::encode(entity.as_bytes()))
}

/// The entity a client's `page_token` resumes after (`None` for the first page); refused as
/// `page_token` when it is malformed or names another group.
pub(crate) fn parse_page_token(token: &str, group: &str) -> Result<Option<Entity>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = |why: &str| {
        invalid(
            "page_token",
            format!("{why}; pass the next_page_token of the previous answer unchanged"),
        )
    };
    let Some(hex_part) = token.strip_prefix(TOKEN_V1) else {
        return Err(bad("not a version-1 page token"));
    };
    let bytes = hex::decode(hex_part).map_err(|_| bad("not a page token (bad hex)"))?;
    let entity = Entity::from_bytes(&bytes).map_err(|_| bad("not a page token (no entity)"))?;
    if entity.group() != group {
        return Err(bad(&format!(
            "the token belongs to group {:?}, not {group:?}",
            entity.group()
        )));
    }
    Ok(Some(entity))
}

/// A query request checked: the query each holder is asked (tombstones included when
/// coordinated, since a tombstone may be the newest version), and the client's limit.
pub(crate) fn store_query(
    request: &v1::QueryRequest,
    group: &GroupDef,
) -> Result<(Query, usize), Status> {
    if request.name.contains('/') {
        return Err(invalid(
            "name",
            format!("{:?} must not contain '/'", request.name),
        ));
    }
    if let Some(shard) = request.shard
        && shard >= group.shard_num
    {
        return Err(invalid(
            "shard",
            format!(
                "{shard} is out of range for group {:?} (shard_num {})",
                group.name, group.shard_num
            ),
        ));
    }
    if request.limit > MAX_QUERY_LIMIT {
        return Err(invalid(
            "limit",
            format!(
                "{} is over the largest limit, {MAX_QUERY_LIMIT}; page through the rest with page_token",
                request.limit
            ),
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
        n => n,
    } as usize;
    let query = Query {
        group: group.name.clone(),
        name: (!request.name.is_empty()).then(|| request.name.clone()),
        ids: request.ids.clone(),
        tags,
        limit,
        include_deleted: request.include_deleted || !request.local,
        shard: request.shard,
        after: parse_page_token(&request.page_token, &group.name)?,
        max_bytes: PAGE_BYTES,
    };
    Ok((query, limit))
}

/// The size of a property in an answer, refused when it could not fit in one: a clear error
/// rather than an answer that fails to decode.
fn answer_size(property: &Property) -> Result<usize, Status> {
    let size = property.canonical_bytes().len();
    let max = propd_proto::MAX_MESSAGE_BYTES - ANSWER_HEADROOM;
    if size > max {
        return Err(Status::resource_exhausted(format!(
            "property {}/{}/{} is {size} bytes: over the largest answer ({max} bytes)",
            property.group, property.name, property.id
        )));
    }
    Ok(size)
}

/// A page of this node's own copies as an answer (a `local` query).
pub(crate) fn answer(page: QueryPage) -> Result<v1::QueryResponse, Status> {
    let mut properties = Vec::with_capacity(page.properties.len());
    for property in &page.properties {
        answer_size(property)?;
        properties.push(property_to_wire(property));
    }
    Ok(v1::QueryResponse {
        properties,
        next_page_token: page
            .resume_after
            .as_ref()
            .map(page_token)
            .unwrap_or_default(),
        page_version: PAGE_VERSION,
    })
}

/// How far one copy's pages reach: everything up to and including an entity, or all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reach {
    Upto(Entity),
    All,
}

impl Reach {
    fn of(page: &QueryPage) -> Self {
        page.resume_after.clone().map_or(Reach::All, Reach::Upto)
    }

    fn includes(&self, entity: &Entity) -> bool {
        match self {
            Reach::Upto(last) => entity <= last,
            Reach::All => true,
        }
    }

    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Reach::Upto(a), Reach::Upto(b)) => a.cmp(b),
            (Reach::Upto(_), Reach::All) => Ordering::Less,
            (Reach::All, Reach::Upto(_)) => Ordering::Greater,
            (Reach::All, Reach::All) => Ordering::Equal,
        }
    }
}

/// One copy in a merge: the rest of its current page and how far its pages reach.
#[derive(Debug)]
struct Copy {
    node: String,
    buffer: VecDeque<(Entity, Property)>,
    reach: Reach,
    /// A later page failed: the copy says nothing past its reach.
    failed: bool,
}

/// What the merge needs next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Every answer of this entity is in: `(node, copy)`, `None` for a copy that paged past it
    /// without it.
    Entity(Entity, Vec<(String, Option<Property>)>),
    /// These copies (by index) must fetch their next page (after their reach) first.
    Fetch(Vec<(usize, Entity)>),
    /// Every copy's pages are used up.
    Done,
}

/// The merge of the copies' pages in entity order (pure: the caller fetches).
#[derive(Debug)]
pub(crate) struct PageMerge {
    copies: Vec<Copy>,
}

fn keyed(property: Property) -> Option<(Entity, Property)> {
    let entity = Entity::new(&property.group, &property.name, &property.id).ok()?;
    Some((entity, property))
}

impl PageMerge {
    /// A merge of the first pages of the copies that answered, `(node, page)`.
    pub(crate) fn new(first: Vec<(String, QueryPage)>) -> Self {
        let copies = first
            .into_iter()
            .map(|(node, page)| Copy {
                node,
                reach: Reach::of(&page),
                buffer: page.properties.into_iter().filter_map(keyed).collect(),
                failed: false,
            })
            .collect();
        PageMerge { copies }
    }

    /// The nodes of the copies still in the merge (no later page failed), but for `except` (by
    /// index).
    pub(crate) fn standing(&self, except: &[usize]) -> Vec<String> {
        self.copies
            .iter()
            .enumerate()
            .filter(|(index, copy)| !copy.failed && !except.contains(index))
            .map(|(_, copy)| copy.node.clone())
            .collect()
    }

    /// The node of copy `index`.
    pub(crate) fn node(&self, index: usize) -> &str {
        &self.copies[index].node
    }

    /// Hands copy `index` its next page, or `None` when fetching it failed or was not waited
    /// for.
    pub(crate) fn fill(&mut self, index: usize, page: Option<QueryPage>) {
        let copy = &mut self.copies[index];
        match page {
            Some(page) => {
                copy.reach = Reach::of(&page);
                copy.buffer = page.properties.into_iter().filter_map(keyed).collect();
            }
            None => copy.failed = true,
        }
    }

    /// The next step. `copies_of` names the nodes holding an entity's shard (empty when a copy
    /// without the entity says nothing, as with tag filters).
    pub(crate) fn step(&mut self, copies_of: impl Fn(&Entity) -> Vec<String>) -> Step {
        // How far every copy still answering has paged: an entity up to there is decided.
        let frontier = self
            .copies
            .iter()
            .map(|copy| {
                if copy.failed {
                    &Reach::All
                } else {
                    &copy.reach
                }
            })
            .min_by(|a, b| a.cmp(b))
            .cloned()
            .unwrap_or(Reach::All);
        let head = self
            .copies
            .iter()
            .filter_map(|copy| copy.buffer.front().map(|(entity, _)| entity))
            .min()
            .cloned();
        match head {
            Some(entity) if frontier.includes(&entity) => {
                let holders = copies_of(&entity);
                let mut answers = Vec::new();
                for copy in &mut self.copies {
                    if copy.buffer.front().is_some_and(|(e, _)| *e == entity) {
                        if let Some((_, property)) = copy.buffer.pop_front() {
                            answers.push((copy.node.clone(), Some(property)));
                        }
                    } else if holders.contains(&copy.node)
                        && (!copy.failed || copy.reach.includes(&entity))
                    {
                        answers.push((copy.node.clone(), None));
                    }
                }
                Step::Entity(entity, answers)
            }
            _ => match frontier {
                Reach::All => Step::Done,
                Reach::Upto(last) => Step::Fetch(
                    self.copies
                        .iter()
                        .enumerate()
                        .filter(|(_, copy)| {
                            !copy.failed
                                && copy.buffer.is_empty()
                                && copy.reach == Reach::Upto(last.clone())
                        })
                        .map(|(i, _)| (i, last.clone()))
                        .collect(),
                ),
            },
        }
    }

    /// Whether nothing is left in any copy: no buffered property and every page used up.
    pub(crate) fn exhausted(&self) -> bool {
        self.copies
            .iter()
            .all(|copy| copy.buffer.is_empty() && (copy.failed || copy.reach == Reach::All))
    }
}

/// One page of `query` from holder `target` (this node's own store, or a `local` query to it).
pub(crate) async fn holder_page(
    node: &Arc<NodeState>,
    target: &str,
    query: Query,
) -> Result<QueryPage, Status> {
    if target == node.me() {
        return blocking(node, move |node| node.store.query_page(&query)).await;
    }
    let mut client = node
        .peers
        .property_client(target)
        .ok_or_else(|| not_a_member(target))?;
    let mut request = Request::new(v1::QueryRequest {
        group: query.group.clone(),
        name: query.name.clone().unwrap_or_default(),
        ids: query.ids.clone(),
        tags: query
            .tags
            .iter()
            .map(|(key, value)| v1::TagFilter {
                key: key.clone(),
                value: Some(crate::convert::tag_value_to_wire(value)),
            })
            .collect(),
        limit: query.limit.min(MAX_QUERY_LIMIT as usize) as u32,
        local: true,
        include_deleted: true,
        page_token: query.after.as_ref().map(page_token).unwrap_or_default(),
        shard: query.shard,
    });
    request.set_timeout(REPLICA_TIMEOUT);
    let answer = client.query(request).await;
    node.peers.saw_call(target, &answer);
    let answer = answer?.into_inner();
    if answer.page_version != PAGE_VERSION {
        return Err(Status::failed_precondition(format!(
            "{target} answers queries with page version {} (this node pages with {PAGE_VERSION}): upgrade it",
            answer.page_version
        )));
    }
    let properties = answer
        .properties
        .into_iter()
        .map(property_from_wire)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            Status::internal(format!("{target} answered a malformed property: {error}"))
        })?;
    let resume_after =
        parse_page_token(&answer.next_page_token, &query.group).map_err(|status| {
            Status::internal(format!(
                "{target} answered a bad next_page_token: {}",
                status.message()
            ))
        })?;
    Ok(QueryPage {
        properties,
        resume_after,
    })
}

/// The read rule over the shards of a query (docs/protocol.md, "Paged queries"): the copies
/// asked of each shard (hung members left out) and how many of them make its read quorum
/// (`copies - write_acks + 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadRule {
    /// `(copies, quorum)` of each shard the query covers.
    pub(crate) shards: Vec<(Vec<String>, usize)>,
}

impl ReadRule {
    /// Whether a round of page calls may stop waiting: every shard has its read quorum among
    /// `answered` (each answer counts as holding: a query answer is a list), or none of its
    /// copies is still `waiting` (answered, failed, found hung, or out of the merge).
    pub(crate) fn done(&self, answered: &[String], waiting: &[String]) -> bool {
        self.shards.iter().all(|(copies, required)| {
            let count = |among: &[String]| copies.iter().filter(|id| among.contains(id)).count();
            let answered = count(answered);
            crate::coordinator::read_done(
                answered,
                answered,
                copies.len() - count(waiting),
                copies.len(),
                *required,
            )
        })
    }
}

/// One round of page calls, `(node, query)`, in parallel, each in its own task, waited for by
/// the read rule: until every shard has its quorum among `standing` (copies whose earlier pages
/// still stand in the merge) and the copies that answered in this round, or no call is left to
/// wait for (a member found hung meanwhile is not waited for). What each call that ended by
/// then said; the calls still running go on in the background and their pages are not used.
async fn page_round(
    node: &Arc<NodeState>,
    rule: &ReadRule,
    standing: &[String],
    calls: Vec<(String, Query)>,
) -> Vec<(String, Result<QueryPage, Status>)> {
    let (sender, mut received) = tokio::sync::mpsc::channel(calls.len().max(1));
    let mut pending: Vec<String> = Vec::new();
    for (target, query) in calls {
        pending.push(target.clone());
        let node = Arc::clone(node);
        let sender = sender.clone();
        tokio::spawn(async move {
            let page = holder_page(&node, &target, query).await;
            let _ = sender.send((target, page)).await;
        });
    }
    drop(sender);
    let mut answered: Vec<String> = standing.to_vec();
    let mut ended = Vec::new();
    loop {
        // Created before the hung check, so that no finding is missed in between.
        let hung_found = node.peers.hung_found();
        let waiting: Vec<String> = pending
            .iter()
            .filter(|id| !node.peers.is_hung(id))
            .cloned()
            .collect();
        if waiting.is_empty() || rule.done(&answered, &waiting) {
            break;
        }
        tokio::select! {
            answer = received.recv() => {
                let Some((target, page)) = answer else { break };
                pending.retain(|id| *id != target);
                if page.is_ok() {
                    answered.push(target.clone());
                }
                ended.push((target, page));
            }
            () = hung_found => {}
        }
    }
    for target in &pending {
        tracing::info!(peer = %target, "a copy's query page was not waited for (the read quorum answered, or it is hung); the query goes on without it");
    }
    ended
}

/// The first page of `query` from the holders, in parallel, waited for by the read rule: the
/// pages of those that answered by then, and what the others that ended said.
pub(crate) async fn first_pages(
    node: &Arc<NodeState>,
    rule: &ReadRule,
    holders: Vec<String>,
    query: &Query,
) -> (Vec<(String, QueryPage)>, Refusals) {
    let calls = holders
        .into_iter()
        .map(|target| (target, query.clone()))
        .collect();
    let mut pages = Vec::new();
    let mut refusals = Refusals::default();
    for (target, page) in page_round(node, rule, &[], calls).await {
        match page {
            Ok(page) => pages.push((target, page)),
            Err(status) => refusals.add(status),
        }
    }
    // The merge does not depend on the order the answers came in.
    pages.sort_by(|a, b| a.0.cmp(&b.0));
    (pages, refusals)
}

/// The next pages of the copies `fetch` names into the merge, in parallel, waited for by the
/// read rule: a copy that failed, or was not waited for, drops out of the merge.
pub(crate) async fn fetch_pages(
    node: &Arc<NodeState>,
    rule: &ReadRule,
    merge: &mut PageMerge,
    fetch: Vec<(usize, Entity)>,
    query: &Query,
) {
    let fetched: Vec<usize> = fetch.iter().map(|(index, _)| *index).collect();
    let standing = merge.standing(&fetched);
    let calls = fetch
        .into_iter()
        .map(|(index, after)| {
            let mut query = query.clone();
            query.after = Some(after);
            (merge.node(index).to_owned(), query)
        })
        .collect();
    let mut ended = page_round(node, rule, &standing, calls).await;
    for index in fetched {
        let target = merge.node(index).to_owned();
        let page = match ended.iter().position(|(node, _)| *node == target) {
            Some(at) => match ended.swap_remove(at).1 {
                Ok(page) => Some(page),
                Err(status) => {
                    tracing::info!(peer = %target, %status, "a copy's next query page failed; the query goes on without it");
                    None
                }
            },
            None => None,
        };
        merge.fill(index, page);
    }
}

/// The answer a coordinated query builds: the newest version of each entity in entity order,
/// at most `limit` visible ones and about [`PAGE_BYTES`].
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) properties: Vec<v1::Property>,
    bytes: usize,
}

impl Answer {
    /// Whether `property` still belongs in this answer: an answer never goes over
    /// [`PAGE_BYTES`], except with its first property (refused when even that could not fit).
    pub(crate) fn fits(&self, property: &Property) -> Result<bool, Status> {
        let size = answer_size(property)?;
        Ok(self.properties.is_empty() || self.bytes + size <= PAGE_BYTES)
    }

    /// Adds a visible property; `true` when the answer is full.
    pub(crate) fn push(&mut self, property: &Property, limit: usize) -> Result<bool, Status> {
        let size = answer_size(property)?;
        self.properties.push(property_to_wire(property));
        self.bytes += size;
        Ok(self.properties.len() >= limit || self.bytes >= PAGE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn version(id: &str, mod_revision: i64) -> Property {
        Property {
            group: "g".into(),
            name: "n".into(),
            id: id.into(),
            tags: BTreeMap::new(),
            mod_revision,
            delete_time: 0,
        }
    }

    fn entity(id: &str) -> Entity {
        Entity::new("g", "n", id).unwrap()
    }

    fn page(ids: &[(&str, i64)], more: bool) -> QueryPage {
        let properties: Vec<Property> = ids.iter().map(|(id, r)| version(id, *r)).collect();
        let resume_after = more.then(|| entity(ids.last().unwrap().0));
        QueryPage {
            properties,
            resume_after,
        }
    }

    fn all(_: &Entity) -> Vec<String> {
        vec!["n1".into(), "n2".into()]
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_name_the_field() {
        let e = Entity::new("g", "n", "a/b é").unwrap();
        assert_eq!(
            parse_page_token(&page_token(&e), "g").unwrap(),
            Some(e.clone())
        );
        assert_eq!(parse_page_token("", "g").unwrap(), None);
        for bad in ["x", "1.zz", "2.00", "1.41"] {
            let status = parse_page_token(bad, "g").unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(
                status.message().starts_with("page_token: "),
                "{}",
                status.message()
            );
        }
        let status = parse_page_token(&page_token(&e), "h").unwrap_err();
        assert!(
            status.message().contains("belongs to group \"g\""),
            "{}",
            status.message()
        );
    }

    #[test]
    fn an_entity_waits_until_every_copy_paged_past_it() {
        // n1 pages a, c (more to come); n2 has a, b, d and nothing more.
        let mut merge = PageMerge::new(vec![
            ("n1".into(), page(&[("a", 1), ("c", 1)], true)),
            ("n2".into(), page(&[("a", 2), ("b", 1), ("d", 1)], false)),
        ]);
        let Step::Entity(e, answers) = merge.step(all) else {
            panic!()
        };
        assert_eq!(e, entity("a"));
        assert_eq!(answers.len(), 2);
        let Step::Entity(e, answers) = merge.step(all) else {
            panic!()
        };
        assert_eq!(e, entity("b"));
        assert_eq!(
            answers,
            vec![("n1".into(), None), ("n2".into(), Some(version("b", 1)))],
            "n1 paged past b without it: it lacks b"
        );
        let Step::Entity(e, _) = merge.step(all) else {
            panic!()
        };
        assert_eq!(e, entity("c"));
        // d is past n1's reach (c): n1's next page comes first.
        assert_eq!(merge.step(all), Step::Fetch(vec![(0, entity("c"))]));
        merge.fill(0, Some(page(&[("d", 3)], false)));
        let Step::Entity(e, answers) = merge.step(all) else {
            panic!()
        };
        assert_eq!(e, entity("d"));
        assert_eq!(answers.len(), 2);
        assert!(merge.exhausted());
        assert_eq!(merge.step(all), Step::Done);
    }

    /// A copy that paged past an entity lacks it only if it holds the entity's shard: in a
    /// query over several shards, a copy of another shard is not rewritten with it.
    #[test]
    fn only_a_holder_of_the_entitys_shard_is_judged_to_lack_it() {
        let mut merge = PageMerge::new(vec![
            ("n1".into(), page(&[("a", 1)], false)),
            ("n2".into(), page(&[("b", 1)], false)),
            ("n3".into(), page(&[("b", 1)], false)),
        ]);
        let holders = |entity: &Entity| {
            if *entity == self::entity("a") {
                vec!["n1".to_owned(), "n2".to_owned()]
            } else {
                vec!["n2".to_owned(), "n3".to_owned()]
            }
        };
        assert_eq!(
            merge.step(holders),
            Step::Entity(
                entity("a"),
                vec![("n1".into(), Some(version("a", 1))), ("n2".into(), None)]
            ),
            "n3 holds another shard"
        );
    }

    #[test]
    fn a_copy_that_fails_later_is_not_judged_past_its_reach() {
        let mut merge = PageMerge::new(vec![
            ("n1".into(), page(&[("a", 1)], true)),
            ("n2".into(), page(&[("a", 1), ("b", 1)], false)),
        ]);
        assert!(matches!(merge.step(all), Step::Entity(..)));
        assert_eq!(merge.step(all), Step::Fetch(vec![(0, entity("a"))]));
        merge.fill(0, None);
        let Step::Entity(e, answers) = merge.step(all) else {
            panic!()
        };
        assert_eq!(e, entity("b"));
        assert_eq!(answers, vec![("n2".into(), Some(version("b", 1)))]);
        assert_eq!(merge.step(all), Step::Done);
    }

    #[test]
    fn a_round_of_page_calls_ends_at_each_shards_read_quorum() {
        let names = |ids: &[&str]| ids.iter().map(|id| (*id).to_owned()).collect::<Vec<_>>();
        // Shard 0 on n1, n2, n3 with a quorum of 2; shard 1 on n2, n3, n4 with a quorum of 2.
        let rule = ReadRule {
            shards: vec![
                (names(&["n1", "n2", "n3"]), 2),
                (names(&["n2", "n3", "n4"]), 2),
            ],
        };
        let waiting = names(&["n1", "n2", "n3", "n4"]);
        assert!(!rule.done(&[], &waiting));
        assert!(
            !rule.done(&names(&["n1", "n2"]), &names(&["n3", "n4"])),
            "shard 1 has one answer"
        );
        assert!(rule.done(&names(&["n1", "n2", "n4"]), &names(&["n3"])));
        assert!(
            rule.done(&names(&["n2", "n3"]), &names(&["n1", "n4"])),
            "a copy holding both shards counts for each"
        );
        // Below the quorum, a round waits until no copy of the shard is left to wait for.
        assert!(!rule.done(&names(&["n1", "n4"]), &names(&["n2"])));
        assert!(rule.done(&names(&["n1", "n4"]), &[]));
        // A quorum of every copy (write_acks = 1) waits for all of them.
        let every = ReadRule {
            shards: vec![(names(&["n1", "n2", "n3"]), 3)],
        };
        assert!(!every.done(&names(&["n1", "n2"]), &names(&["n3"])));
        assert!(every.done(&names(&["n1", "n2"]), &[]), "n3 failed or hung");
        // A shard with no copy to ask has nothing to wait for.
        let none = ReadRule {
            shards: vec![(Vec::new(), 1)],
        };
        assert!(none.done(&[], &[]));
    }

    #[test]
    fn copies_still_standing_leave_out_the_failed_and_the_fetched() {
        let mut merge = PageMerge::new(vec![
            ("n1".into(), page(&[("a", 1)], true)),
            ("n2".into(), page(&[("a", 1)], true)),
            ("n3".into(), page(&[("a", 1)], true)),
        ]);
        merge.fill(2, None);
        assert_eq!(merge.standing(&[0]), vec!["n2".to_owned()]);
        assert_eq!(merge.standing(&[]), vec!["n1".to_owned(), "n2".to_owned()]);
    }

    #[test]
    fn limits_over_the_bound_are_refused_naming_the_field() {
        let group = GroupDef::new("g", 1, 0);
        let request = v1::QueryRequest {
            group: "g".into(),
            limit: MAX_QUERY_LIMIT + 1,
            ..Default::default()
        };
        let status = store_query(&request, &group).unwrap_err();
        assert!(
            status.message().starts_with("limit: "),
            "{}",
            status.message()
        );
        let request = v1::QueryRequest {
            group: "g".into(),
            ..Default::default()
        };
        assert_eq!(store_query(&request, &group).unwrap().1, 1000);
        let request = v1::QueryRequest {
            group: "g".into(),
            limit: MAX_QUERY_LIMIT,
            ..Default::default()
        };
        let (query, limit) = store_query(&request, &group).expect("the largest limit");
        assert_eq!(
            (query.limit, limit),
            (MAX_QUERY_LIMIT as usize, MAX_QUERY_LIMIT as usize)
        );
        // Shards are numbered below the group's shard_num.
        let group = GroupDef::new("g", 4, 0);
        for (shard, taken) in [(0, true), (3, true), (4, false), (u32::MAX, false)] {
            let request = v1::QueryRequest {
                group: "g".into(),
                shard: Some(shard),
                ..Default::default()
            };
            match store_query(&request, &group) {
                Ok((query, _)) => {
                    assert!(taken, "shard {shard} taken");
                    assert_eq!(query.shard, Some(shard));
                }
                Err(status) => {
                    assert!(!taken, "shard {shard} refused: {status}");
                    assert!(status.message().starts_with("shard: "), "{status}");
                }
            }
        }
    }

    /// `g/n/{id}` with a string tag that makes its canonical encoding exactly `size` bytes.
    fn sized(id: &str, size: usize) -> Property {
        let mut property = version(id, 1);
        property
            .tags
            .insert("v".into(), propd_merkle::TagValue::Str(String::new()));
        for _ in 0..4 {
            let now = property.canonical_bytes().len();
            let Some(propd_merkle::TagValue::Str(value)) = property.tags.get_mut("v") else {
                panic!("a string tag");
            };
            let len = (value.len() + size).saturating_sub(now);
            *value = "x".repeat(len);
        }
        assert_eq!(property.canonical_bytes().len(), size);
        property
    }

    #[test]
    fn an_answer_fills_to_a_quarter_of_a_message_and_refuses_what_no_answer_could_hold() {
        // Four properties of a sixteenth of a message fill an answer exactly.
        let part = PAGE_BYTES / 4;
        let mut answer = Answer::default();
        for i in 0..4 {
            let property = sized(&i.to_string(), part);
            assert!(answer.fits(&property).unwrap(), "{i} fits");
            let full = answer.push(&property, usize::MAX).unwrap();
            assert_eq!(full, i == 3, "full after the fourth only");
        }
        assert!(
            !answer.fits(&sized("4", 1_000)).unwrap(),
            "nothing more fits"
        );
        // An answer holds at most `limit` properties.
        let mut answer = Answer::default();
        assert!(!answer.push(&sized("a", 100), 2).unwrap());
        assert!(answer.push(&sized("b", 100), 2).unwrap());
        // A property larger than a page goes alone, up to a message less its headroom...
        let largest = propd_proto::MAX_MESSAGE_BYTES - ANSWER_HEADROOM;
        let mut answer = Answer::default();
        let big = sized("big", largest);
        assert!(answer.fits(&big).unwrap());
        assert!(answer.push(&big, usize::MAX).unwrap());
        // ... and the answer that carries it still fits in one message, with a page token.
        let response = v1::QueryResponse {
            properties: std::mem::take(&mut answer.properties),
            next_page_token: page_token(&entity(&"z".repeat(200))),
            page_version: PAGE_VERSION,
        };
        assert!(prost::Message::encoded_len(&response) <= propd_proto::MAX_MESSAGE_BYTES);
        let answer = Answer::default();
        let status = answer
            .fits(&sized("big", largest + 1))
            .expect_err("over the largest answer");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("g/n/big"), "{status}");
    }
}
