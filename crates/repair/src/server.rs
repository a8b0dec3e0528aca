//! The server state machine: it answers the client's tree pages, lists leaves and applies copies.

use std::collections::{HashMap, HashSet, VecDeque};

use pb::repair_request::Msg as In;
use pb::repair_response::Msg as Out;
use propd_merkle::{Entity, InnerNode, NodeId, Property, Shape};
use propd_proto::v1 as pb;
use prost::Message;

use crate::common::{Applier, CopyQueue, Listed};
use crate::config::Config;
use crate::descent::{self, Expanded, Side, StepRules, ToCompare};
use crate::error::{ProtocolError, SyncError, malformed};
use crate::report::ServerReport;
use crate::store_api::{LeafKey, RepairStore, leaf_key};
use crate::wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitTreeRoot,
    Descent,
    Draining,
    Done,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitTreeRoot => "awaiting TreeRoot",
            Phase::Descent => "answering the descent",
            Phase::Draining => "draining after NoMorePropertySync",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

/// Work queued for output, in the order the client must see it.
#[derive(Debug)]
enum Job {
    Message(pb::RepairResponse),
    /// List the leaves of these nodes (a cursor into the front one).
    Leaves {
        nodes: VecDeque<NodeId>,
        after: Option<LeafKey>,
    },
    /// Find the versions the client asked for, then send them.
    Resolve(Vec<Wanted>),
    Copies(CopyQueue),
    /// Stream properties the client lacks as `BulkSync` pages: the bulk path of version 2.
    Stream(Stream),
}

/// What a bulk stream sends, and where it resumes.
#[derive(Debug)]
enum Stream {
    /// The whole shard in entity order (the client's tree is empty), after the entity.
    Shard { after: Option<Entity> },
    /// Every property under these nodes (the client lacks them), after the cursor in the front
    /// one, in `(bucket, entity)` order.
    Nodes {
        nodes: VecDeque<NodeId>,
        after: Option<LeafKey>,
    },
}

/// A stream's cursor after one property.
enum Cursor {
    Entity(Entity),
    Leaf(LeafKey),
}

/// A batch read from a stream: each property (`None`: deleted since its leaf was read) with its
/// cursor, and whether the batch ends the current part (the shard, or the front node).
type StreamBatch = (Vec<(Cursor, Option<Property>)>, bool);

impl Stream {
    /// The next at most `want` properties of the current part; `None` when nothing is left.
    fn read<S: RepairStore>(
        &self,
        store: &S,
        group: &str,
        shard: u32,
        want: usize,
    ) -> Result<Option<StreamBatch>, SyncError> {
        match self {
            Stream::Shard { after } => {
                let found = store
                    .properties_after(group, shard, after.as_ref(), want)
                    .map_err(SyncError::store("reading the shard to stream"))?;
                let ends = found.len() < want;
                let mut batch = Vec::with_capacity(found.len());
                for property in found {
                    let entity = property
                        .entity()
                        .map_err(SyncError::store("reading the shard to stream"))?;
                    batch.push((Cursor::Entity(entity), Some(property)));
                }
                Ok(Some((batch, ends)))
            }
            Stream::Nodes { nodes, after } => {
                let Some(&node) = nodes.front() else {
                    return Ok(None);
                };
                let leaves = store
                    .leaves_under(group, shard, node, after.as_ref(), want)
                    .map_err(SyncError::store("listing leaves to stream"))?;
                let entities: Vec<Entity> = leaves.iter().map(|leaf| leaf.entity.clone()).collect();
                let found = store
                    .get_many(group, shard, &entities)
                    .map_err(SyncError::store("reading properties to stream"))?;
                let ends = leaves.len() < want;
                let batch = leaves
                    .iter()
                    .map(|leaf| Cursor::Leaf(leaf_key(leaf)))
                    .zip(found)
                    .collect();
                Ok(Some((batch, ends)))
            }
        }
    }

    fn advance(&mut self, cursor: Cursor) {
        match (self, cursor) {
            (Stream::Shard { after }, Cursor::Entity(entity)) => *after = Some(entity),
            (Stream::Nodes { after, .. }, Cursor::Leaf(key)) => *after = Some(key),
            _ => {}
        }
    }

    /// Moves past the finished part; false when the stream is spent.
    fn next_part(&mut self) -> bool {
        match self {
            Stream::Shard { .. } => false,
            Stream::Nodes { nodes, after } => {
                nodes.pop_front();
                *after = None;
                !nodes.is_empty()
            }
        }
    }
}

/// Versions the client asked for under one listed node, and where to look for them: the
/// leaf-key range of the listing chunk they came from (version 2), or the whole node.
#[derive(Debug)]
struct Wanted {
    node: NodeId,
    fingerprints: HashSet<u64>,
    /// Exclusive start; `None` is the node's start.
    after: Option<LeafKey>,
    /// Inclusive end; `None` is the node's end.
    until: Option<LeafKey>,
}

/// The answer to one `LevelDigests` page, computed before the page changes any state.
#[derive(Debug, Default)]
struct LevelAnswer {
    /// Per parent of the page, in order: its `differ` bitmap, then its `leaves` bitmap.
    packed: Vec<u8>,
    /// Differing children whose leaves are listed now.
    to_list: VecDeque<NodeId>,
    /// Differing children the client lacks, streamed as properties (version 2).
    to_stream: VecDeque<NodeId>,
    /// Differing children the descent goes into at the next level.
    descend: Vec<NodeId>,
}

/// The server side of one sync. Pure, like [`crate::Client`]: drive it with [`Server::handle`]
/// and [`Server::poll_transmit`]. To bound its memory, a driver reads the next client message
/// only when `poll_transmit` returns `None`.
#[derive(Debug)]
pub struct Server {
    config: Config,
    phase: Phase,
    group: String,
    shard: u32,
    shape: Shape,
    preview: bool,
    wire_width: usize,
    /// The protocol version of this sync (set by `TreeRoot`).
    version: u32,
    level: u32,
    /// Parents at `level - 1` the client must send the children of, in order.
    frontier: VecDeque<NodeId>,
    next_frontier: Vec<NodeId>,
    /// Version 3: nodes we expanded, awaiting the client's verdict, in the order sent.
    awaiting: VecDeque<Expanded>,
    /// Version 3: nodes the client expanded, for us to compare and answer.
    to_compare: VecDeque<ToCompare>,
    /// Version 3: nodes we expanded so far (leaf hints go only with the first few).
    expanded: usize,
    /// Version 3: buckets the client settled by our leaf hints, our leaves to send under those
    /// whose check held (sent once the client's copies are applied), and whether a check failed
    /// (then every hinted bucket is listed in full instead).
    hinted: Vec<NodeId>,
    hinted_wanted: Vec<Wanted>,
    recheck: bool,
    listed: Listed,
    /// Entities we sent back as newer: not to be sent again when the client asks for them.
    returned: HashSet<Entity>,
    out: VecDeque<Job>,
    applier: Applier,
    report: ServerReport,
}

impl Server {
    /// A server waiting for `TreeRoot`. The store is given to each call.
    pub fn new(config: Config) -> Result<Self, SyncError> {
        config.validate()?;
        Ok(Server {
            config,
            phase: Phase::AwaitTreeRoot,
            group: String::new(),
            shard: 0,
            shape: Shape::default(),
            preview: false,
            wire_width: 8,
            version: 1,
            level: 0,
            frontier: VecDeque::new(),
            next_frontier: Vec::new(),
            awaiting: VecDeque::new(),
            to_compare: VecDeque::new(),
            expanded: 0,
            hinted: Vec::new(),
            hinted_wanted: Vec::new(),
            recheck: false,
            listed: Listed::default(),
            returned: HashSet::new(),
            out: VecDeque::new(),
            applier: Applier::default(),
            report: ServerReport::default(),
        })
    }

    /// The group and shard of the sync (empty before `TreeRoot`).
    pub fn target(&self) -> (&str, u32) {
        (&self.group, self.shard)
    }

    /// Whether the sync has ended (its last message has been returned by `poll_transmit`).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the sync has ended with an error.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// The account so far.
    pub fn report(&self) -> &ServerReport {
        &self.report
    }

    /// Handles one client message. A protocol violation fails the sync and applies nothing
    /// from that message.
    pub fn handle<S: RepairStore>(
        &mut self,
        store: &S,
        msg: pb::RepairRequest,
    ) -> Result<(), SyncError> {
        if self.phase == Phase::Failed {
            return Ok(());
        }
        self.report.bytes_received += msg.encoded_len() as u64;
        let result = self.dispatch(store, msg);
        if result.is_err() {
            self.phase = Phase::Failed;
            self.out.clear();
        }
        result
    }

    /// The next message to send; `None` when waiting for the client or finished.
    pub fn poll_transmit<S: RepairStore>(
        &mut self,
        store: &S,
    ) -> Result<Option<pb::RepairResponse>, SyncError> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return Ok(None);
        }
        match self.next_message(store) {
            Ok(Some(msg)) => {
                self.report.bytes_sent += msg.encoded_len() as u64;
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(err) => {
                self.phase = Phase::Failed;
                Err(err)
            }
        }
    }

    fn dispatch<S: RepairStore>(
        &mut self,
        store: &S,
        msg: pb::RepairRequest,
    ) -> Result<(), SyncError> {
        let kind = wire::request_kind(&msg);
        let unexpected = |phase: Phase| ProtocolError::Unexpected {
            phase: phase.name(),
            message: kind,
        };
        let Some(body) = msg.msg else {
            return Err(ProtocolError::Empty.into());
        };
        match (self.phase, body) {
            (Phase::AwaitTreeRoot, In::TreeRoot(root)) => self.on_tree_root(store, root),
            (Phase::Descent, In::LevelDigests(page))
                if self.version < wire::STEP_VERSION && self.level_open() =>
            {
                self.on_level_digests(store, page)
            }
            (Phase::Descent, In::TreeStep(page)) if self.version >= wire::STEP_VERSION => {
                self.on_step(page).map_err(Into::into)
            }
            (Phase::Descent, In::PropertySync(page)) if !self.preview => {
                self.report.received += page.properties.len() as u64;
                self.applier
                    .push_page(&self.shape, &self.group, &self.listed, page)?;
                if self
                    .applier
                    .is_full(self.config.apply_batch, 4 * self.config.page_bytes)
                {
                    self.apply_pending(store);
                }
                Ok(())
            }
            (Phase::Descent, In::PropertyMissing(request)) if !self.preview => {
                let wanted = self.check_missing(request)?;
                // Copies received before the request are stored first: a copy that replaced
                // ours makes our old version unresolvable, and one we answered as newer is
                // remembered in `returned`, so no version is sent twice.
                self.apply_pending(store);
                self.out.push_back(Job::Resolve(wanted));
                Ok(())
            }
            (Phase::Descent, In::NoMorePropertySync(_))
                if self.frontier.is_empty()
                    && self.awaiting.is_empty()
                    && self.to_compare.is_empty() =>
            {
                self.apply_pending(store);
                self.end_hinted();
                Ok(())
            }
            (phase, _) => Err(unexpected(phase).into()),
        }
    }

    /// At the client's `NoMorePropertySync`, with its copies applied: when every check of a
    /// hinted bucket held, our leaves under them that the client matched none of are sent and
    /// the sync drains; when one failed, every hinted bucket is listed in full and the sync goes
    /// on until the client's next `NoMorePropertySync`.
    fn end_hinted(&mut self) {
        if self.recheck {
            self.recheck = false;
            self.hinted_wanted.clear();
            let nodes: VecDeque<NodeId> = std::mem::take(&mut self.hinted).into();
            self.report.rechecked += nodes.len() as u64;
            self.out.push_back(Job::Leaves { nodes, after: None });
            return;
        }
        self.hinted.clear();
        let wanted = std::mem::take(&mut self.hinted_wanted);
        if !wanted.is_empty() {
            self.out.push_back(Job::Resolve(wanted));
        }
        self.phase = Phase::Draining;
    }

    fn apply_pending<S: RepairStore>(&mut self, store: &S) {
        let done = self.applier.flush(store, &self.group, self.shard);
        self.report.applied += done.applied;
        self.report.failed += done.failed;
        if !done.newer_here.is_empty() {
            let mut queue = CopyQueue::default();
            for property in &done.newer_here {
                if let Ok(entity) = property.entity() {
                    self.returned.insert(entity);
                }
                queue.ready.push_back(wire::property_to_proto(property));
            }
            self.out.push_back(Job::Copies(queue));
        }
    }

    /// Whether the client may still send pages of `level` (some parents were announced).
    fn level_open(&self) -> bool {
        !self.frontier.is_empty()
    }

    fn on_tree_root<S: RepairStore>(
        &mut self,
        store: &S,
        root: pb::TreeRoot,
    ) -> Result<(), SyncError> {
        self.group = root.group.clone();
        self.shard = root.shard;
        self.preview = root.preview;
        self.report.preview = root.preview;
        let negotiated = wire::negotiate(root.protocol_version, &self.config);
        self.version = match negotiated {
            Ok(version) => version,
            Err(refused) => refused.peer.min(refused.max),
        };
        self.report.protocol_version = self.version;
        let ours = store.shape();
        let mut answer = pb::RootCompare {
            server_shape: Some(wire::shape_to_proto(&ours)),
            protocol_version: self.version,
            ..pb::RootCompare::default()
        };
        let done = |this: &mut Server, answer: pb::RootCompare| {
            this.out.push_back(Job::Message(pb::RepairResponse {
                msg: Some(Out::RootCompare(answer)),
            }));
            this.phase = Phase::Draining;
        };
        if let Err(refused) = negotiated {
            // Refused before anything is read. The tree and shape flags are set so that a
            // client of any version reports a refusal (not a missing tree, which it would skip).
            answer.tree_found = true;
            answer.shape_ok = true;
            answer.error = format!(
                "the client speaks protocol version {} at most, this node speaks versions {}..={}",
                refused.peer, refused.min, refused.max
            );
            done(self, answer);
            return Ok(());
        }
        if root.group.is_empty()
            || root.group.contains('/')
            || !store.has_shard(&root.group, root.shard)
        {
            answer.error = format!("no tree for group {:?} shard {}", root.group, root.shard);
            done(self, answer);
            return Ok(());
        }
        answer.tree_found = true;
        let theirs = root.shape.as_ref().map(wire::shape_from_proto);
        if !matches!(theirs, Some(Ok(shape)) if shape == ours) {
            answer.error = format!("tree shape differs: the server's is {ours:?}");
            done(self, answer);
            return Ok(());
        }
        answer.shape_ok = true;
        let width = if root.wire_digest_width == 0 {
            ours.digest_width
        } else {
            root.wire_digest_width
        };
        if width < 8 || width > ours.digest_width {
            answer.error = format!(
                "wire_digest_width {width} is outside 8..={}",
                ours.digest_width
            );
            done(self, answer);
            return Ok(());
        }
        self.shape = ours;
        self.wire_width = width as usize;
        if self.version >= wire::STEP_VERSION {
            // The shapes match: the client needs ours only to report a mismatch.
            answer.server_shape = None;
        }
        let node = store
            .tree_node(&self.group, self.shard, NodeId::ROOT)
            .map_err(SyncError::store("reading the root"))?;
        let (digest, count) = match node {
            Some(node) => (node.digest, node.leaf_count),
            None => (ours.empty_digest(), 0),
        };
        answer.leaf_count = count;
        answer.root_match = digest.as_bytes() == root.root.as_slice();
        if answer.root_match {
            self.report.in_sync = true;
            done(self, answer);
            return Ok(());
        }
        if root.leaf_count == 0 && self.streams(false) {
            // A wiped replica: no descent, the whole shard in the order its store writes fastest.
            answer.whole_shard = true;
            self.out.push_back(Job::Message(pb::RepairResponse {
                msg: Some(Out::RootCompare(answer)),
            }));
            self.listed.insert(NodeId::ROOT);
            self.out
                .push_back(Job::Stream(Stream::Shard { after: None }));
            self.phase = Phase::Descent;
            // Level 1 with an empty frontier: no LevelDigests is accepted, and the sync ends
            // with SyncEnd after the client's NoMorePropertySync.
            self.level = 1;
            return Ok(());
        }
        if self.version >= wire::STEP_VERSION {
            // The slots came with the root: our first TreeStep answers them.
            let mut reader = wire::Reader::new("TreeRoot.slots", &root.slots);
            let (present, digests) = descent::read_expansion(
                &mut reader,
                &self.shape,
                NodeId::ROOT,
                self.wire_width,
                "TreeRoot.slots",
            )?;
            reader.finish()?;
            self.to_compare.push_back(ToCompare {
                node: NodeId::ROOT,
                present,
                digests,
                depth: 0,
                hints: None,
            });
            self.out.push_back(Job::Message(pb::RepairResponse {
                msg: Some(Out::RootCompare(answer)),
            }));
            self.phase = Phase::Descent;
            self.level = 1;
            return Ok(());
        }
        self.out.push_back(Job::Message(pb::RepairResponse {
            msg: Some(Out::RootCompare(answer)),
        }));
        self.phase = Phase::Descent;
        self.level = 1;
        self.frontier = VecDeque::from([NodeId::ROOT]);
        Ok(())
    }

    /// Version 3: a client step, checked as a whole, then taken in: the nodes it settles are
    /// listed or streamed now, its expansions queue for our answer.
    fn on_step(&mut self, page: pb::TreeStep) -> Result<(), ProtocolError> {
        let read = descent::read_step(
            &page,
            &self.awaiting,
            &self.shape,
            self.wire_width,
            Side::Server,
        )?;
        self.awaiting.drain(..read.answered);
        let (to_list, to_stream) = self.settle(&read.settled);
        self.queue_leaves(to_list, to_stream);
        for check in read.hinted {
            // The client's copies under it follow this step.
            self.listed.insert(check.node);
            self.hinted.push(check.node);
            self.recheck |= !check.holds;
            if !check.unmatched.is_empty() {
                self.hinted_wanted.push(Wanted {
                    node: check.node,
                    fingerprints: check.unmatched.into_iter().collect(),
                    after: None,
                    until: None,
                });
            }
        }
        self.to_compare.extend(read.to_compare);
        Ok(())
    }

    /// Splits settled nodes into those whose leaves we list and those we stream (the client
    /// lacks them), and remembers them as listed.
    fn settle(&mut self, settled: &[descent::Settled]) -> (VecDeque<NodeId>, VecDeque<NodeId>) {
        let mut to_list = VecDeque::new();
        let mut to_stream = VecDeque::new();
        for node in settled {
            self.listed.insert(node.node);
            if self.streams(node.client_has) {
                to_stream.push_back(node.node);
            } else {
                to_list.push_back(node.node);
            }
        }
        (to_list, to_stream)
    }

    fn queue_leaves(&mut self, to_list: VecDeque<NodeId>, to_stream: VecDeque<NodeId>) {
        if !to_list.is_empty() {
            self.out.push_back(Job::Leaves {
                nodes: to_list,
                after: None,
            });
        }
        // After the lists, so that the client merges them while the stream flows.
        if !to_stream.is_empty() {
            self.out.push_back(Job::Stream(Stream::Nodes {
                nodes: to_stream,
                after: None,
            }));
        }
    }

    /// Version 3: our next step page, answering the client's expansions at the front, queued
    /// with the lists and streams of the nodes it settles.
    fn step_page<S: RepairStore>(&mut self, store: &S) -> Result<(), SyncError> {
        let rules = StepRules {
            side: Side::Server,
            width: self.wire_width,
            page_items: self.config.page_items,
            leaf_list_max: self.config.leaf_list_max,
            hint_after: (!self.preview).then_some(self.expanded),
        };
        let Some(built) = descent::build_step(
            store,
            &self.shape,
            &self.group,
            self.shard,
            &mut self.to_compare,
            &rules,
        )?
        else {
            return Ok(());
        };
        let (to_list, to_stream) = self.settle(&built.settled);
        self.expanded += built.expanded.len();
        self.awaiting.extend(built.expanded);
        self.out.push_back(Job::Message(pb::RepairResponse {
            msg: Some(Out::TreeStep(built.page)),
        }));
        self.queue_leaves(to_list, to_stream);
        Ok(())
    }

    /// One `LevelDigests` page: checked and compared against our children as a whole before any
    /// state changes, then answered with a `LevelDiff` (and the leaf lists it announces).
    fn on_level_digests<S: RepairStore>(
        &mut self,
        store: &S,
        page: pb::LevelDigests,
    ) -> Result<(), SyncError> {
        self.check_level_page(&page)?;
        let answer = self.compare_level_page(store, &page)?;
        self.check_last_page(&page)?;
        self.accept_level_page(&page, answer);
        Ok(())
    }

    /// Rejects a page of another level than the one in progress, or naming more parents than
    /// the frontier has left.
    fn check_level_page(&self, page: &pb::LevelDigests) -> Result<(), ProtocolError> {
        if page.level != self.level {
            return Err(ProtocolError::Level {
                message: "LevelDigests",
                expected: self.level,
                found: page.level,
            });
        }
        if page.parents as usize > self.frontier.len() {
            return Err(malformed(
                "LevelDigests.parents",
                format!("{} parents, {} remain", page.parents, self.frontier.len()),
            ));
        }
        Ok(())
    }

    /// Rejects a page whose `last_page` flag disagrees with the parents left after it.
    fn check_last_page(&self, page: &pb::LevelDigests) -> Result<(), ProtocolError> {
        let remaining = self.frontier.len() - page.parents as usize;
        if page.last_page != (remaining == 0) {
            return Err(malformed(
                "LevelDigests.last_page",
                format!("is {} with {remaining} parents left", page.last_page),
            ));
        }
        Ok(())
    }

    /// Parses the page's packed children of the next `page.parents` frontier parents and
    /// compares them with ours, changing no state.
    fn compare_level_page<S: RepairStore>(
        &self,
        store: &S,
        page: &pb::LevelDigests,
    ) -> Result<LevelAnswer, SyncError> {
        let mut reader = wire::Reader::new("LevelDigests.packed", &page.packed);
        let mut answer = LevelAnswer::default();
        for parent in self.frontier.iter().take(page.parents as usize) {
            self.compare_children(store, *parent, &mut reader, &mut answer)?;
        }
        reader.finish()?;
        Ok(answer)
    }

    /// Reads the client's children of `parent` (a presence bitmap, then a digest per present
    /// child) and appends to `answer` the `differ` and `leaves` bitmaps of that parent and the
    /// differing children, sorted into those listed now and those descended into.
    fn compare_children<S: RepairStore>(
        &self,
        store: &S,
        parent: NodeId,
        reader: &mut wire::Reader<'_>,
        answer: &mut LevelAnswer,
    ) -> Result<(), SyncError> {
        let range = self.shape.child_range(parent);
        let n = (range.end - range.start) as usize;
        let present = reader.take(wire::bitmap_len(n))?;
        wire::check_bitmap("LevelDigests.packed", present, n)?;
        let count = present
            .iter()
            .map(|b| b.count_ones() as usize)
            .sum::<usize>();
        let digests = reader.take(count * self.wire_width)?;
        let ours: HashMap<u64, InnerNode> = store
            .tree_children(&self.group, self.shard, parent)
            .map_err(SyncError::store("reading child digests"))?
            .into_iter()
            .filter(|(_, node)| node.leaf_count > 0)
            .map(|(child, node)| (child.index, node))
            .collect();
        let mut differ = vec![0u8; wire::bitmap_len(n)];
        let mut leaves = vec![0u8; wire::bitmap_len(n)];
        let mut next = 0usize;
        for i in 0..n {
            let theirs = if wire::bit(present, i) {
                let d = &digests[next * self.wire_width..(next + 1) * self.wire_width];
                next += 1;
                Some(d)
            } else {
                None
            };
            let index = range.start + i as u64;
            let mine = ours.get(&index);
            let same = match (theirs, mine) {
                (None, None) => true,
                (Some(t), Some(m)) => &m.digest.as_bytes()[..self.wire_width] == t,
                _ => false,
            };
            if same {
                continue;
            }
            wire::set_bit(&mut differ, i);
            let child = NodeId::new(self.level, index);
            if self.streams(theirs.is_some()) {
                wire::set_bit(&mut leaves, i);
                answer.to_stream.push_back(child);
            } else if self.lists_now(theirs.is_some(), mine) {
                wire::set_bit(&mut leaves, i);
                answer.to_list.push_back(child);
            } else {
                answer.descend.push(child);
            }
        }
        answer.packed.extend_from_slice(&differ);
        answer.packed.extend_from_slice(&leaves);
        Ok(())
    }

    /// Whether a differing child goes by the bulk path: the client lacks it (so we hold it), the
    /// sync speaks version 2 and applies. It is marked in the `leaves` bitmap like a listed node;
    /// the client, knowing it sent no digest for it, expects properties instead of fingerprints.
    fn streams(&self, theirs_exists: bool) -> bool {
        !theirs_exists && !self.preview && self.version >= wire::BULK_VERSION
    }

    /// Whether a differing child of the current level has its leaves listed now rather than
    /// joining the next frontier (adaptive descent): it is a bucket, the client lacks it, we
    /// lack it, or it holds at most `leaf_list_max` leaves here.
    fn lists_now(&self, theirs_exists: bool, mine: Option<&InnerNode>) -> bool {
        self.level == self.shape.bucket_level()
            || !theirs_exists
            || mine.is_none_or(|m| m.leaf_count <= self.config.leaf_list_max)
    }

    /// Takes a checked and compared page in: its parents leave the frontier, its listed nodes
    /// are remembered, the `LevelDiff` and the leaf lists are queued, and the last page of a
    /// level opens the next one.
    fn accept_level_page(&mut self, page: &pb::LevelDigests, answer: LevelAnswer) {
        let LevelAnswer {
            packed,
            to_list,
            to_stream,
            descend,
        } = answer;
        self.frontier.drain(..page.parents as usize);
        for node in to_list.iter().chain(&to_stream) {
            self.listed.insert(*node);
        }
        self.next_frontier.extend(descend);
        self.out.push_back(Job::Message(pb::RepairResponse {
            msg: Some(Out::LevelDiff(pb::LevelDiff {
                level: self.level,
                last_page: page.last_page,
                packed,
            })),
        }));
        self.queue_leaves(to_list, to_stream);
        if page.last_page {
            self.frontier = std::mem::take(&mut self.next_frontier).into();
            self.level += 1;
        }
    }

    fn check_missing(&self, request: pb::PropertyMissing) -> Result<Vec<Wanted>, ProtocolError> {
        let mut wanted = Vec::with_capacity(request.nodes.len());
        let mut total = 0usize;
        for node in request.nodes {
            let id = NodeId::new(node.level, node.index);
            if !self.listed.contains(id) {
                return Err(ProtocolError::UnlistedNode {
                    message: "PropertyMissing",
                    level: node.level,
                    index: node.index,
                });
            }
            let fps = wire::fingerprints("MissingLeaves.fingerprints", &node.fingerprints)?;
            total += fps.len();
            let after = wire::leaf_key_from_bytes("MissingLeaves.after", &node.after)?;
            let until = wire::leaf_key_from_bytes("MissingLeaves.until", &node.until)?;
            wanted.push(Wanted {
                node: id,
                fingerprints: fps.into_iter().collect(),
                after,
                until,
            });
        }
        if total > wire::MAX_PAGE_ITEMS {
            return Err(ProtocolError::PageTooLarge {
                field: "PropertyMissing.nodes",
                count: total,
                max: wire::MAX_PAGE_ITEMS,
            });
        }
        Ok(wanted)
    }

    /// The next message to send: jobs are taken from the front of the queue until one yields a
    /// message; with nothing queued, a draining sync ends.
    fn next_message<S: RepairStore>(
        &mut self,
        store: &S,
    ) -> Result<Option<pb::RepairResponse>, SyncError> {
        loop {
            if self.out.is_empty() && !self.to_compare.is_empty() {
                self.step_page(store)?;
            }
            let Some(job) = self.out.pop_front() else {
                break;
            };
            let msg = match job {
                Job::Message(msg) => Some(msg),
                Job::Leaves { nodes, after } => Some(self.list_leaves(store, nodes, after)?),
                Job::Resolve(wanted) => {
                    self.resolve_requested(store, wanted)?;
                    None
                }
                Job::Copies(queue) => self.send_copies(store, queue)?,
                Job::Stream(stream) => self.stream_page(store, stream)?,
            };
            if msg.is_some() {
                return Ok(msg);
            }
        }
        Ok(self.finish())
    }

    /// With nothing left to send: a draining sync is done, and ends with `SyncEnd` unless it
    /// ended at the root compare (which sends none).
    fn finish(&mut self) -> Option<pb::RepairResponse> {
        if self.phase != Phase::Draining {
            return None;
        }
        self.phase = Phase::Done;
        if self.level == 0 {
            return None;
        }
        Some(pb::RepairResponse {
            msg: Some(Out::SyncEnd(pb::SyncEnd {
                applied: self.report.applied,
                failed: self.report.failed,
            })),
        })
    }

    /// One `DifferTreeSummary` of at most `page_items` leaf fingerprints under `nodes`, in
    /// order, resuming after `after` in the front node. The nodes not finished go back to the
    /// front of the queue.
    fn list_leaves<S: RepairStore>(
        &mut self,
        store: &S,
        mut nodes: VecDeque<NodeId>,
        mut after: Option<LeafKey>,
    ) -> Result<pb::RepairResponse, SyncError> {
        let limit = self.config.page_items;
        let mut entries = Vec::new();
        let mut budget = limit;
        while budget > 0 && entries.len() < limit {
            let Some(&node) = nodes.front() else { break };
            let leaves = store
                .leaves_under(&self.group, self.shard, node, after.as_ref(), budget)
                .map_err(SyncError::store("listing leaves"))?;
            let more = leaves.len() == budget;
            let mut fps = Vec::with_capacity(leaves.len() * wire::FINGERPRINT_BYTES);
            for leaf in &leaves {
                fps.extend_from_slice(&wire::fingerprint(&leaf.digest).to_le_bytes());
            }
            budget -= leaves.len();
            let exists = !leaves.is_empty() || after.is_some();
            let mut until = Vec::new();
            if more {
                after = leaves.last().map(leaf_key);
                if self.version >= wire::BULK_VERSION
                    && let Some(key) = &after
                {
                    until = wire::leaf_key_to_bytes(key);
                }
            } else {
                after = None;
                nodes.pop_front();
            }
            entries.push(pb::NodeLeaves {
                level: node.level,
                index: node.index,
                exists,
                fingerprints: fps,
                more,
                until,
            });
        }
        if !nodes.is_empty() {
            self.out.push_front(Job::Leaves { nodes, after });
        }
        Ok(pb::RepairResponse {
            msg: Some(Out::DifferTreeSummary(pb::DifferTreeSummary {
                nodes: entries,
            })),
        })
    }

    /// Finds, under each requested node, the leaves whose fingerprints the client asked for,
    /// and queues their entities to be sent ahead of the other jobs (except those already sent
    /// back as newer). Each request is looked for in its listing chunk's range only, and the scan
    /// stops as soon as every fingerprint is found, so answering all the requests of a node reads
    /// its leaves a bounded number of times, never once per request page from the node's start.
    fn resolve_requested<S: RepairStore>(
        &mut self,
        store: &S,
        wanted: Vec<Wanted>,
    ) -> Result<(), SyncError> {
        let mut queue = CopyQueue::default();
        for Wanted {
            node,
            fingerprints: mut fps,
            mut after,
            until,
        } in wanted
        {
            'scan: while !fps.is_empty() {
                let leaves = store
                    .leaves_under(
                        &self.group,
                        self.shard,
                        node,
                        after.as_ref(),
                        self.config.page_items,
                    )
                    .map_err(SyncError::store("finding requested leaves"))?;
                for leaf in &leaves {
                    if until.as_ref().is_some_and(|until| {
                        (leaf.bucket, &leaf.entity) > (until.bucket, &until.entity)
                    }) {
                        break 'scan;
                    }
                    if fps.remove(&wire::fingerprint(&leaf.digest))
                        && !self.returned.contains(&leaf.entity)
                    {
                        queue.entities.push_back(leaf.entity.clone());
                    }
                }
                if leaves.len() < self.config.page_items {
                    break;
                }
                after = leaves.last().map(leaf_key);
            }
        }
        if !queue.is_empty() {
            self.out.push_front(Job::Copies(queue));
        }
        Ok(())
    }

    /// One `BulkSync` page of `stream`: at most `page_items` properties and about `page_bytes`
    /// bytes, read one store batch at a time (a larger single property travels alone). The
    /// stream goes back to the front of the queue unless it is spent; `None` once it is.
    fn stream_page<S: RepairStore>(
        &mut self,
        store: &S,
        mut stream: Stream,
    ) -> Result<Option<pb::RepairResponse>, SyncError> {
        const READ_BATCH: usize = 64;
        let limit = self.config.page_items;
        let mut page: Vec<pb::Property> = Vec::new();
        let mut bytes = 0usize;
        let mut spent = false;
        'fill: while page.len() < limit && bytes < self.config.page_bytes {
            let want = (limit - page.len()).min(READ_BATCH);
            let Some((batch, ends_part)) = stream.read(store, &self.group, self.shard, want)?
            else {
                spent = true;
                break;
            };
            for (cursor, property) in batch {
                stream.advance(cursor);
                // Deleted or purged since the leaf was read: nothing to send.
                let Some(property) = property else { continue };
                let property = wire::property_to_proto(&property);
                bytes += property.encoded_len();
                page.push(property);
                if bytes >= self.config.page_bytes {
                    // The stream resumes after this property.
                    break 'fill;
                }
            }
            if ends_part && !stream.next_part() {
                spent = true;
                break;
            }
        }
        if !spent {
            self.out.push_front(Job::Stream(stream));
        }
        if page.is_empty() {
            return Ok(None);
        }
        self.report.sent += page.len() as u64;
        self.report.streamed += page.len() as u64;
        Ok(Some(pb::RepairResponse {
            msg: Some(Out::BulkSync(pb::PropertySync { properties: page })),
        }))
    }

    /// The next `PropertySync` page of `queue`, which goes back to the front of the queue;
    /// `None` once the queue is spent.
    fn send_copies<S: RepairStore>(
        &mut self,
        store: &S,
        mut queue: CopyQueue,
    ) -> Result<Option<pb::RepairResponse>, SyncError> {
        let page = queue.next_page(
            store,
            &self.group,
            self.shard,
            self.config.page_items,
            self.config.page_bytes,
        )?;
        let Some((page, _)) = page else {
            return Ok(None);
        };
        self.report.sent += page.properties.len() as u64;
        self.out.push_front(Job::Copies(queue));
        Ok(Some(pb::RepairResponse {
            msg: Some(Out::PropertySync(page)),
        }))
    }
}
