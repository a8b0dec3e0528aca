//! The client state machine: it holds the propagation, sends its tree level by level and its copies.

use std::collections::{HashMap, HashSet, VecDeque};

use pb::repair_request::Msg as Out;
use pb::repair_response::Msg as In;
use propd_merkle::{NodeId, Shape};
use propd_proto::v1 as pb;
use prost::Message;

use crate::common::{Applier, CopyQueue, Listed};
use crate::config::Config;
use crate::descent::{self, Expanded, Side, StepRules, ToCompare};
use crate::error::{ProtocolError, SyncError, malformed};
use crate::report::SyncReport;
use crate::store_api::{LeafKey, RepairStore, leaf_key};
use crate::wire;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitRootCompare,
    Descent,
    AwaitSyncEnd,
    Done,
    Failed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitRootCompare => "awaiting RootCompare",
            Phase::Descent => "descending the tree",
            Phase::AwaitSyncEnd => "awaiting SyncEnd",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }
}

/// A leaf merge in progress: the server's fingerprints under a node (or, from version 2, under
/// one chunk of its list: a leaf-key range of the node) against our leaves in the same range.
#[derive(Debug)]
struct Merge {
    node: NodeId,
    theirs: HashSet<u64>,
    /// Our scan cursor; starts at the chunk's start.
    after: Option<LeafKey>,
    /// The chunk's range: exclusive start and inclusive end (`None`: the node's start or end).
    start: Option<LeafKey>,
    until: Option<LeafKey>,
    /// Fingerprints the server listed in the chunk: what resolving a request for it costs the
    /// server at most, charged against a request page.
    listed: usize,
    /// The half-trip depth of the list (for the round-trip count).
    depth: u32,
}

/// Server versions to ask for under one listed chunk.
#[derive(Debug)]
struct Missing {
    node: NodeId,
    fingerprints: Vec<u64>,
    start: Option<LeafKey>,
    until: Option<LeafKey>,
    listed: usize,
}

/// A frontier parent of a sent `LevelDigests` page and the presence bitmap of its children we
/// sent (a clear bit is a child we lack).
type SentParent = (NodeId, Vec<u8>);

/// A sent `LevelDigests` page awaiting its `LevelDiff`: its parents, whether it was the last
/// page of its level, and its half-trip depth.
type SentPage = (Vec<SentParent>, bool, u32);

/// Whether `leaf` lies beyond the inclusive end `until` of a chunk.
fn beyond(leaf: &propd_merkle::Leaf, until: Option<&LeafKey>) -> bool {
    until.is_some_and(|until| (leaf.bucket, &leaf.entity) > (until.bucket, &until.entity))
}

/// The client side of one sync of one (group, shard). Pure: it owns no socket and reads no clock;
/// the store is passed to each call.
///
/// Drive it with [`Client::poll_transmit`] (the next message to send, if any) and
/// [`Client::handle`] (a message from the server) until [`Client::is_done`]; then
/// [`Client::report`]. Any error ends the sync: later calls do nothing.
#[derive(Debug)]
pub struct Client {
    config: Config,
    group: String,
    shard: u32,
    shape: Shape,
    wire_width: usize,
    /// The protocol version of the sync (known from `RootCompare`).
    version: u32,
    /// Our tree was empty when the sync started (the server may then stream the whole shard).
    empty: bool,
    phase: Phase,
    out: VecDeque<pb::RepairRequest>,
    /// The level whose digests are being sent (1 = slots).
    level: u32,
    /// Parents at `level - 1` whose children are still to be sent.
    frontier: VecDeque<NodeId>,
    /// Whether the last page of `level` has been sent.
    level_sent: bool,
    /// Parents of each sent page awaiting its LevelDiff (each with the presence bitmap of its
    /// children we sent), whether it was the last page, and its depth.
    awaiting_diff: VecDeque<SentPage>,
    next_frontier: Vec<NodeId>,
    /// Depth of the next `LevelDigests` page (version 1 and 2).
    frontier_depth: u32,
    /// Version 3: nodes we expanded, awaiting the server's verdict, in the order sent.
    awaiting: VecDeque<Expanded>,
    /// Version 3: nodes the server expanded, for us to compare and answer.
    to_compare: VecDeque<ToCompare>,
    /// Version 3: buckets we settled by the server's leaf hints; the server lists them all in
    /// full after our `NoMorePropertySync` when one check failed.
    hinted: Vec<NodeId>,
    /// Nodes whose leaf lists the server announced or will send and has not begun, with the
    /// depth at which each list arrives.
    expected: HashMap<NodeId, u32>,
    /// The node whose list is in progress (more chunks follow), and the list's depth.
    listing: Option<(NodeId, u32)>,
    partial: HashSet<u64>,
    /// Version 2: where the next chunk of the front expected node's list starts.
    chunk_start: Option<LeafKey>,
    listed: Listed,
    merges: VecDeque<Merge>,
    copies: CopyQueue,
    missing: VecDeque<Missing>,
    missing_count: usize,
    applier: Applier,
    report: SyncReport,
    /// Half-trip depths (docs/protocol.md, "Round trips"): TreeRoot is 0, its answer 1. The
    /// deepest server message that decided what we send, the deepest message we sent, and the
    /// depth of the copies and requests due (one more than the deepest list merged).
    recv_depth: u32,
    sent_depth: u32,
    reply_depth: u32,
}

impl Client {
    /// Starts a sync of (group, shard): reads the local root and queues `TreeRoot`.
    pub fn new<S: RepairStore>(
        store: &S,
        group: &str,
        shard: u32,
        config: Config,
    ) -> Result<Self, SyncError> {
        config.validate()?;
        let shape = store.shape();
        if config.wire_digest_width > shape.digest_width {
            return Err(SyncError::Config {
                field: "wire_digest_width",
                value: config.wire_digest_width as u64,
                reason: "must not exceed the shape's digest_width",
            });
        }
        if !store.has_shard(group, shard) {
            return Err(SyncError::NoLocalTree {
                group: group.to_owned(),
                shard,
            });
        }
        let root = store
            .tree_node(group, shard, NodeId::ROOT)
            .map_err(SyncError::store("reading the root"))?;
        let (root_digest, leaf_count) = match root {
            Some(node) => (node.digest, node.leaf_count),
            None => (shape.empty_digest(), 0),
        };
        let mut report = SyncReport::with_levels(shape.bucket_level() + 2);
        report.preview = config.preview;
        // Version 3: the slots travel with the root, so the server's first answer already
        // descends (a version-2 server ignores them).
        let mut awaiting = VecDeque::new();
        let mut slots = Vec::new();
        // An empty tree sends its empty expansion too (a bitmap of no slots): a preview of a
        // wiped replica descends from the server's slots like any other sync.
        if config.protocol_version >= wire::STEP_VERSION {
            let width = config.wire_digest_width as usize;
            let (present, digests, count) =
                descent::expand(store, &shape, group, shard, NodeId::ROOT, width)?;
            slots.extend_from_slice(&present);
            slots.extend_from_slice(&digests);
            if let Some(level) = report.level_mut(1) {
                level.digests += count;
            }
            awaiting.push_back(Expanded {
                node: NodeId::ROOT,
                present,
                depth: 0,
                hints: None,
            });
        }
        let mut client = Client {
            wire_width: config.wire_digest_width as usize,
            group: group.to_owned(),
            shard,
            shape,
            version: 1,
            empty: leaf_count == 0,
            phase: Phase::AwaitRootCompare,
            out: VecDeque::new(),
            level: 0,
            frontier: VecDeque::new(),
            level_sent: true,
            awaiting_diff: VecDeque::new(),
            next_frontier: Vec::new(),
            frontier_depth: 0,
            awaiting,
            to_compare: VecDeque::new(),
            hinted: Vec::new(),
            expected: HashMap::new(),
            listing: None,
            partial: HashSet::new(),
            chunk_start: None,
            listed: Listed::default(),
            merges: VecDeque::new(),
            copies: CopyQueue::default(),
            missing: VecDeque::new(),
            missing_count: 0,
            applier: Applier::default(),
            report,
            config,
            recv_depth: 0,
            sent_depth: 0,
            reply_depth: 0,
        };
        client.out.push_back(pb::RepairRequest {
            msg: Some(Out::TreeRoot(pb::TreeRoot {
                group: client.group.clone(),
                shard,
                shape: Some(wire::shape_to_proto(&shape)),
                root: root_digest.as_bytes().to_vec(),
                leaf_count,
                preview: client.config.preview,
                wire_digest_width: client.wire_width as u32,
                protocol_version: client.config.protocol_version,
                slots,
            })),
        });
        Ok(client)
    }

    /// Whether the sync has ended successfully.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Whether the sync has ended with an error.
    pub fn is_failed(&self) -> bool {
        self.phase == Phase::Failed
    }

    /// The account so far (final once [`Client::is_done`]).
    pub fn report(&self) -> &SyncReport {
        &self.report
    }

    /// Consumes the client and returns its account.
    pub fn into_report(self) -> SyncReport {
        self.report
    }

    /// The next message to send, reading the store as needed; `None` when the client waits for
    /// the server (or is finished). Each call does a bounded amount of work.
    pub fn poll_transmit<S: RepairStore>(
        &mut self,
        store: &S,
    ) -> Result<Option<pb::RepairRequest>, SyncError> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return Ok(None);
        }
        let result = self.next_message(store);
        match result {
            Ok(Some(msg)) => {
                self.count_sent(&msg);
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(err) => {
                self.phase = Phase::Failed;
                Err(err)
            }
        }
    }

    /// Handles one message from the server. A protocol violation fails the sync and applies
    /// nothing from that message.
    pub fn handle<S: RepairStore>(
        &mut self,
        store: &S,
        msg: pb::RepairResponse,
    ) -> Result<(), SyncError> {
        if self.phase == Phase::Failed {
            return Ok(());
        }
        let len = msg.encoded_len() as u64;
        self.report.bytes_received += len;
        let result = self.dispatch(store, msg, len);
        if result.is_err() {
            self.phase = Phase::Failed;
        }
        result
    }

    fn dispatch<S: RepairStore>(
        &mut self,
        store: &S,
        msg: pb::RepairResponse,
        len: u64,
    ) -> Result<(), SyncError> {
        let kind = wire::response_kind(&msg);
        let unexpected = |phase: Phase| ProtocolError::Unexpected {
            phase: phase.name(),
            message: kind,
        };
        let Some(body) = msg.msg else {
            return Err(ProtocolError::Empty.into());
        };
        match (self.phase, body) {
            (Phase::AwaitRootCompare, In::RootCompare(answer)) => {
                if let Some(level) = self.report.level_mut(0) {
                    level.bytes_received += len;
                }
                self.on_root_compare(answer)
            }
            (Phase::Descent, In::LevelDiff(diff)) => {
                if let Some(level) = self.report.level_mut(diff.level) {
                    level.bytes_received += len;
                }
                self.on_level_diff(diff).map_err(Into::into)
            }
            (Phase::Descent, In::DifferTreeSummary(summary)) => {
                self.on_summary(summary, len).map_err(Into::into)
            }
            (Phase::AwaitSyncEnd, In::DifferTreeSummary(summary)) if !self.hinted.is_empty() => {
                self.recheck_hinted(store);
                self.on_summary(summary, len).map_err(Into::into)
            }
            (Phase::Descent, In::TreeStep(page)) if self.version >= wire::STEP_VERSION => {
                self.on_step(page, len).map_err(Into::into)
            }
            (Phase::Descent | Phase::AwaitSyncEnd, In::PropertySync(page))
                if !self.config.preview =>
            {
                self.on_copies(store, page)
            }
            (Phase::Descent | Phase::AwaitSyncEnd, In::BulkSync(page)) if self.bulk() => {
                let count = page.properties.len() as u64;
                self.on_copies(store, page)?;
                self.report.streamed += count;
                Ok(())
            }
            (Phase::AwaitSyncEnd, In::SyncEnd(end)) => {
                self.apply_pending(store);
                self.report.peer_applied = end.applied;
                self.report.peer_failed = end.failed;
                // SyncEnd answers our last message.
                self.saw(self.sent_depth + 1);
                self.phase = Phase::Done;
                Ok(())
            }
            (phase, _) => Err(unexpected(phase).into()),
        }
    }

    /// A hinted bucket's check failed on the server, which lists every hinted bucket in full in
    /// answer to our `NoMorePropertySync`: they are merged as any listed node, and the sync
    /// ends with our next `NoMorePropertySync`. The server's copies received so far are applied
    /// first, so that the merge sees them.
    fn recheck_hinted<S: RepairStore>(&mut self, store: &S) {
        self.apply_pending(store);
        let depth = self.sent_depth + 1;
        for node in self.hinted.drain(..) {
            self.expected.insert(node, depth);
        }
        self.report.rechecked += self.expected.len() as u64;
        self.phase = Phase::Descent;
    }

    /// Records a server message of half-trip `depth` that decides what we send next.
    fn saw(&mut self, depth: u32) {
        self.recv_depth = self.recv_depth.max(depth);
        self.report.round_trips = self.report.round_trips.max(depth.div_ceil(2));
    }

    /// Whether listed nodes we lack come by the bulk path (the server decides the same way).
    fn bulk(&self) -> bool {
        self.version >= wire::BULK_VERSION && !self.config.preview
    }

    /// A page of the server's copies: checked, queued, applied once a batch is full.
    fn on_copies<S: RepairStore>(
        &mut self,
        store: &S,
        page: pb::PropertySync,
    ) -> Result<(), SyncError> {
        self.report.record_bytes += page
            .properties
            .iter()
            .map(|p| p.encoded_len() as u64)
            .sum::<u64>();
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

    fn apply_pending<S: RepairStore>(&mut self, store: &S) {
        let done = self.applier.flush(store, &self.group, self.shard);
        self.report.applied += done.applied;
        self.report.failed += done.failed;
        // A copy of ours newer than the one the server sent was already sent to the server,
        // which applied it: nothing to send back.
    }

    fn on_root_compare(&mut self, answer: pb::RootCompare) -> Result<(), SyncError> {
        if !answer.tree_found {
            return Err(SyncError::TreeNotFound {
                group: self.group.clone(),
                shard: self.shard,
                reason: answer.error,
            });
        }
        if !answer.shape_ok {
            let theirs = answer
                .server_shape
                .as_ref()
                .and_then(|s| wire::shape_from_proto(s).ok());
            return Err(SyncError::ShapeMismatch {
                ours: self.shape,
                theirs,
            });
        }
        if !answer.error.is_empty() {
            return Err(SyncError::Refused {
                reason: answer.error,
            });
        }
        self.version = wire::negotiate(answer.protocol_version, &self.config)?;
        self.report.protocol_version = self.version;
        self.saw(1);
        if self.version < wire::STEP_VERSION {
            // The server ignored the slots: the descent goes level by level.
            self.awaiting.clear();
        }
        if answer.root_match {
            self.report.in_sync = true;
            self.phase = Phase::Done;
            return Ok(());
        }
        self.phase = Phase::Descent;
        if answer.whole_shard {
            if !(self.bulk() && self.empty) {
                return Err(ProtocolError::Unexpected {
                    phase: "a sync with a non-empty client tree, a preview or version 1",
                    message: "RootCompare.whole_shard",
                }
                .into());
            }
            // No descent: the whole shard comes as BulkSync pages.
            self.awaiting.clear();
            self.listed.insert(NodeId::ROOT);
            self.start_level(1, Vec::new());
            return Ok(());
        }
        if self.version >= wire::STEP_VERSION {
            if self.awaiting.is_empty() {
                return Err(ProtocolError::Unexpected {
                    phase: "a version-3 sync whose client sent no slots",
                    message: "RootCompare without root_match or whole_shard",
                }
                .into());
            }
            // The server's TreeStep answering the slots follows.
            self.start_level(1, Vec::new());
            return Ok(());
        }
        self.frontier_depth = 2;
        self.start_level(1, vec![NodeId::ROOT]);
        Ok(())
    }

    /// Version 3: a server step, checked as a whole, then taken in: its verdicts settle or
    /// descend our expanded nodes, and its expansions queue for our answer.
    fn on_step(&mut self, page: pb::TreeStep, len: u64) -> Result<(), ProtocolError> {
        let read = descent::read_step(
            &page,
            &self.awaiting,
            &self.shape,
            self.wire_width,
            Side::Client,
        )?;
        let level = self.awaiting.front().map_or(1, |e| e.node.level + 1);
        if let Some(level) = self.report.level_mut(level) {
            level.bytes_received += len;
        }
        self.awaiting.drain(..read.answered);
        let bulk = self.bulk();
        for settled in read.settled {
            self.listed.insert(settled.node);
            // A node we lack comes as a stream of properties, any other as a list.
            if !bulk || settled.client_has {
                self.expected.insert(settled.node, read.depth);
            }
        }
        for item in &read.to_compare {
            let count = item
                .present
                .iter()
                .map(|b| b.count_ones() as u64)
                .sum::<u64>();
            if let Some(level) = self.report.level_mut(item.node.level + 1) {
                level.digests += count;
            }
        }
        self.to_compare.extend(read.to_compare);
        self.saw(read.depth);
        Ok(())
    }

    /// Version 3: our next step page, answering the server's expansions at the front.
    fn step_page<S: RepairStore>(&mut self, store: &S) -> Result<pb::RepairRequest, SyncError> {
        let rules = StepRules {
            side: Side::Client,
            width: self.wire_width,
            page_items: self.config.page_items,
            leaf_list_max: self.config.leaf_list_max,
            hint_after: None,
        };
        let built = descent::build_step(
            store,
            &self.shape,
            &self.group,
            self.shard,
            &mut self.to_compare,
            &rules,
        )?
        .ok_or(SyncError::Protocol(ProtocolError::Unexpected {
            phase: "nothing to compare",
            message: "TreeStep",
        }))?;
        let bulk = self.bulk();
        for settled in &built.settled {
            self.listed.insert(settled.node);
            // The server lists it in its answer, or streams it when we lack it.
            if !bulk || settled.client_has {
                self.expected.insert(settled.node, built.depth + 1);
            }
        }
        for node in &built.hinted {
            // Settled here: our copies go now, the server's answer with SyncEnd.
            self.listed.insert(*node);
        }
        self.hinted.extend(built.hinted);
        self.report.compared += built.compared;
        self.report.requested += built.unmatched;
        if !built.copies.is_empty() {
            self.reply_depth = self.reply_depth.max(built.depth);
            self.copies.entities.extend(built.copies);
        }
        self.awaiting.extend(built.expanded);
        self.sent_depth = self.sent_depth.max(built.depth);
        let msg = pb::RepairRequest {
            msg: Some(Out::TreeStep(built.page)),
        };
        if let Some(level) = self.report.level_mut(built.level + 1) {
            level.digests += built.digests;
        }
        if let Some(level) = self.report.level_mut(built.level) {
            level.bytes_sent += msg.encoded_len() as u64;
        }
        Ok(msg)
    }

    fn start_level(&mut self, level: u32, parents: Vec<NodeId>) {
        self.level = level;
        self.frontier = parents.into();
        self.level_sent = self.frontier.is_empty();
    }

    fn on_level_diff(&mut self, diff: pb::LevelDiff) -> Result<(), ProtocolError> {
        if diff.level != self.level {
            return Err(ProtocolError::Level {
                message: "LevelDiff",
                expected: self.level,
                found: diff.level,
            });
        }
        let Some((parents, last, depth)) = self.awaiting_diff.pop_front() else {
            return Err(ProtocolError::Unexpected {
                phase: "no LevelDigests page awaits an answer",
                message: "LevelDiff",
            });
        };
        if diff.last_page != last {
            return Err(malformed(
                "LevelDiff.last_page",
                format!("is {}, the answered page's is {last}", diff.last_page),
            ));
        }
        let bucket_level = self.shape.bucket_level();
        let bulk = self.bulk();
        let depth = depth + 1;
        let mut reader = wire::Reader::new("LevelDiff.packed", &diff.packed);
        for (parent, present) in parents {
            let range = self.shape.child_range(parent);
            let n = (range.end - range.start) as usize;
            let differ = reader.take(wire::bitmap_len(n))?;
            let leaves = reader.take(wire::bitmap_len(n))?;
            wire::check_bitmap("LevelDiff.packed", differ, n)?;
            for (d, l) in differ.iter().zip(leaves) {
                if l & !d != 0 {
                    return Err(malformed(
                        "LevelDiff.packed",
                        "a listed child is not marked differing",
                    ));
                }
            }
            for i in 0..n {
                if !wire::bit(differ, i) {
                    continue;
                }
                let child = NodeId::new(self.level, range.start + i as u64);
                if wire::bit(leaves, i) {
                    // A node we lack comes as a stream of properties, any other as a list.
                    if !bulk || wire::bit(&present, i) {
                        self.expected.insert(child, depth);
                    }
                    self.listed.insert(child);
                } else if self.level == bucket_level {
                    return Err(malformed(
                        "LevelDiff.packed",
                        format!("asks to descend below bucket {child}"),
                    ));
                } else {
                    self.next_frontier.push(child);
                }
            }
        }
        reader.finish()?;
        self.saw(depth);
        if last {
            self.frontier_depth = depth + 1;
            let next = std::mem::take(&mut self.next_frontier);
            if next.is_empty() {
                self.level_sent = true;
                self.frontier.clear();
            } else {
                self.start_level(self.level + 1, next);
            }
        }
        Ok(())
    }

    fn on_summary(
        &mut self,
        summary: pb::DifferTreeSummary,
        len: u64,
    ) -> Result<(), ProtocolError> {
        let mut attributed = false;
        for node in summary.nodes {
            let id = NodeId::new(node.level, node.index);
            // Each node must be the one whose list is in progress, or, when none is, one the
            // descent settled and whose list has not begun.
            let depth = match self.listing {
                Some((listing, depth)) if listing == id => depth,
                None if self.expected.contains_key(&id) => self.expected[&id],
                _ => {
                    return Err(ProtocolError::UnlistedNode {
                        message: "NodeLeaves",
                        level: node.level,
                        index: node.index,
                    });
                }
            };
            let fps = wire::fingerprints("NodeLeaves.fingerprints", &node.fingerprints)?;
            if !node.exists && (!fps.is_empty() || node.more) {
                return Err(malformed(
                    "NodeLeaves.exists",
                    "false, yet fingerprints follow",
                ));
            }
            let until = wire::leaf_key_from_bytes("NodeLeaves.until", &node.until)?;
            if self.version >= wire::BULK_VERSION && node.more != until.is_some() {
                return Err(malformed(
                    "NodeLeaves.until",
                    "must be set exactly when more chunks follow",
                ));
            }
            self.expected.remove(&id);
            self.listing = node.more.then_some((id, depth));
            self.saw(depth);
            if let Some(level) = self.report.level_mut(id.level) {
                level.fingerprints += fps.len() as u64;
                if !attributed {
                    level.bytes_received += len;
                    attributed = true;
                }
            }
            if self.version >= wire::BULK_VERSION {
                // Each chunk is merged and requested on its own, over its key range.
                let listed = fps.len();
                let start = if node.more {
                    std::mem::replace(&mut self.chunk_start, until.clone())
                } else {
                    self.chunk_start.take()
                };
                self.merges.push_back(Merge {
                    node: id,
                    theirs: fps.into_iter().collect(),
                    after: start.clone(),
                    start,
                    until,
                    listed,
                    depth,
                });
                continue;
            }
            self.partial.extend(fps);
            if !node.more {
                let theirs = std::mem::take(&mut self.partial);
                self.merges.push_back(Merge {
                    node: id,
                    listed: theirs.len(),
                    theirs,
                    after: None,
                    start: None,
                    until: None,
                    depth,
                });
            }
        }
        Ok(())
    }

    fn descent_answered(&self) -> bool {
        self.level_sent
            && self.frontier.is_empty()
            && self.awaiting_diff.is_empty()
            && self.awaiting.is_empty()
            && self.to_compare.is_empty()
            && self.expected.is_empty()
            && self.listing.is_none()
    }

    fn backlog(&self) -> usize {
        self.copies.len()
            + self.missing_count
            + self
                .merges
                .iter()
                .map(|m| m.theirs.len().max(1))
                .sum::<usize>()
    }

    fn next_message<S: RepairStore>(
        &mut self,
        store: &S,
    ) -> Result<Option<pb::RepairRequest>, SyncError> {
        if let Some(msg) = self.out.pop_front() {
            return Ok(Some(msg));
        }
        if self.phase != Phase::Descent {
            return Ok(None);
        }
        let page_items = self.config.page_items;
        while !self.merges.is_empty()
            && self.copies.len() < page_items
            && self.missing_count < page_items
        {
            self.merge_step(store)?;
        }
        let quiet = self.descent_answered() && self.merges.is_empty();
        // Under pressure (too much pending to start the next level) partial pages go out too,
        // or the descent would wait for pages that cannot fill.
        let pressure = self.backlog() >= self.config.max_backlog;
        let flush = quiet || pressure;
        let missing_due = self.missing_count >= page_items || (flush && self.missing_count > 0);
        let copies_due =
            self.copies.len() >= page_items || ((flush || missing_due) && !self.copies.is_empty());
        if copies_due {
            let page = self.copies.next_page(
                store,
                &self.group,
                self.shard,
                page_items,
                self.config.page_bytes,
            )?;
            if let Some((page, record_bytes)) = page {
                self.report.sent += page.properties.len() as u64;
                self.report.record_bytes += record_bytes;
                self.sent_depth = self.sent_depth.max(self.reply_depth);
                return Ok(Some(pb::RepairRequest {
                    msg: Some(Out::PropertySync(page)),
                }));
            }
        }
        if missing_due {
            self.sent_depth = self.sent_depth.max(self.reply_depth);
            return Ok(Some(self.missing_page()));
        }
        if !self.level_sent && !pressure {
            return self.digest_page(store).map(Some);
        }
        if !self.to_compare.is_empty() && !pressure {
            return self.step_page(store).map(Some);
        }
        if quiet && self.copies.is_empty() && self.missing_count == 0 {
            self.phase = Phase::AwaitSyncEnd;
            // Sent once everything the server announced has come in.
            self.sent_depth = self.sent_depth.max(self.recv_depth + 1);
            return Ok(Some(pb::RepairRequest {
                msg: Some(Out::NoMorePropertySync(pb::NoMorePropertySync {})),
            }));
        }
        Ok(None)
    }

    /// Compares up to one page of our leaves under the front merge's node with the server's.
    fn merge_step<S: RepairStore>(&mut self, store: &S) -> Result<(), SyncError> {
        let limit = self.config.page_items;
        let Some(merge) = self.merges.front_mut() else {
            return Ok(());
        };
        self.reply_depth = self.reply_depth.max(merge.depth + 1);
        let leaves = store
            .leaves_under(
                &self.group,
                self.shard,
                merge.node,
                merge.after.as_ref(),
                limit,
            )
            .map_err(SyncError::store("reading leaves to merge"))?;
        let mut past_end = false;
        for leaf in &leaves {
            if beyond(leaf, merge.until.as_ref()) {
                past_end = true;
                break;
            }
            self.report.compared += 1;
            if !merge.theirs.remove(&wire::fingerprint(&leaf.digest)) {
                self.report.sent += u64::from(self.config.preview);
                if !self.config.preview {
                    self.copies.entities.push_back(leaf.entity.clone());
                }
            }
        }
        merge.after = leaves.last().map(leaf_key);
        if past_end || leaves.len() < limit {
            let Some(done) = self.merges.pop_front() else {
                return Ok(());
            };
            let wanted = done.theirs.len();
            self.report.compared += wanted as u64;
            self.report.requested += wanted as u64;
            if wanted > 0 && !self.config.preview {
                let mut fps: Vec<u64> = done.theirs.into_iter().collect();
                fps.sort_unstable();
                self.missing_count += fps.len();
                self.missing.push_back(Missing {
                    node: done.node,
                    fingerprints: fps,
                    start: done.start,
                    until: done.until,
                    listed: done.listed,
                });
            }
        }
        Ok(())
    }

    /// One `PropertyMissing` page: at most `page_items` fingerprints, and chunks whose listed
    /// sizes add up to at most `page_items` (the first always fits), so that the server's scans
    /// to answer one page stay within a few pages of leaves.
    fn missing_page(&mut self) -> pb::RepairRequest {
        let mut budget = self.config.page_items;
        let mut cost = 0usize;
        let mut nodes = Vec::new();
        while budget > 0 {
            let Some(front) = self.missing.front_mut() else {
                break;
            };
            if !nodes.is_empty() && cost + front.listed > self.config.page_items {
                break;
            }
            cost += front.listed;
            let take = front.fingerprints.len().min(budget);
            let chunk: Vec<u64> = front.fingerprints.drain(..take).collect();
            let node = front.node;
            let after = front
                .start
                .as_ref()
                .map(wire::leaf_key_to_bytes)
                .unwrap_or_default();
            let until = front
                .until
                .as_ref()
                .map(wire::leaf_key_to_bytes)
                .unwrap_or_default();
            if front.fingerprints.is_empty() {
                self.missing.pop_front();
            }
            budget -= take;
            self.missing_count -= take;
            let mut bytes = Vec::with_capacity(take * wire::FINGERPRINT_BYTES);
            for fp in &chunk {
                bytes.extend_from_slice(&fp.to_le_bytes());
            }
            nodes.push(pb::MissingLeaves {
                level: node.level,
                index: node.index,
                fingerprints: bytes,
                after,
                until,
            });
        }
        let requested: u64 = nodes
            .iter()
            .map(|n| (n.fingerprints.len() / wire::FINGERPRINT_BYTES) as u64)
            .sum();
        let msg = pb::RepairRequest {
            msg: Some(Out::PropertyMissing(pb::PropertyMissing { nodes })),
        };
        let leaves_level = self.shape.bucket_level() + 1;
        let len = msg.encoded_len() as u64;
        if let Some(level) = self.report.level_mut(leaves_level) {
            level.fingerprints += requested;
            level.bytes_sent += len;
        }
        msg
    }

    /// One page of child digests of the frontier.
    fn digest_page<S: RepairStore>(&mut self, store: &S) -> Result<pb::RepairRequest, SyncError> {
        let mut packed = Vec::new();
        let mut parents = Vec::new();
        let mut digests = 0u64;
        while let Some(&parent) = self.frontier.front() {
            let range = self.shape.child_range(parent);
            let n = (range.end - range.start) as usize;
            if !parents.is_empty()
                && (digests as usize + n > self.config.page_items
                    || packed.len() + wire::bitmap_len(n) + n * self.wire_width
                        > self.config.page_bytes)
            {
                break;
            }
            self.frontier.pop_front();
            let children = store
                .tree_children(&self.group, self.shard, parent)
                .map_err(SyncError::store("reading child digests"))?;
            let mut bitmap = vec![0u8; wire::bitmap_len(n)];
            let mut body = Vec::with_capacity(children.len() * self.wire_width);
            for (child, node) in &children {
                if node.leaf_count == 0 || !range.contains(&child.index) {
                    continue;
                }
                wire::set_bit(&mut bitmap, (child.index - range.start) as usize);
                body.extend_from_slice(&node.digest.as_bytes()[..self.wire_width]);
                digests += 1;
            }
            packed.extend_from_slice(&bitmap);
            packed.extend_from_slice(&body);
            parents.push((parent, bitmap));
        }
        let last = self.frontier.is_empty();
        self.level_sent = last;
        let msg = pb::RepairRequest {
            msg: Some(Out::LevelDigests(pb::LevelDigests {
                level: self.level,
                last_page: last,
                parents: parents.len() as u32,
                packed,
            })),
        };
        if let Some(level) = self.report.level_mut(self.level) {
            level.digests += digests;
        }
        self.sent_depth = self.sent_depth.max(self.frontier_depth);
        self.awaiting_diff
            .push_back((parents, last, self.frontier_depth));
        Ok(msg)
    }

    fn count_sent(&mut self, msg: &pb::RepairRequest) {
        let len = msg.encoded_len() as u64;
        self.report.bytes_sent += len;
        let level = match &msg.msg {
            Some(Out::TreeRoot(_)) => Some(0),
            Some(Out::LevelDigests(page)) => Some(page.level),
            _ => None,
        };
        if let Some(level) = level.and_then(|l| self.report.level_mut(l)) {
            level.bytes_sent += len;
        }
    }
}
