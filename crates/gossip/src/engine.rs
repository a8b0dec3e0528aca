//! The propagation state machine: inputs in, [`Command`]s out, time as a parameter.
//!
//! One [`Engine`] per node. The caller feeds it what happened (`start`, `handle_propagate`,
//! `handle_sync_done`, `handle_sync_progress`, `handle_hand_off`, `handle_progress`,
//! `handle_report`, `handle_tick`) and
//! then drains the commands it emitted with [`Engine::poll_command`]. The engine owns no
//! socket, spawns no task and reads no clock, so the same code runs under the tonic driver and
//! under the in-memory router of the tests.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::sync::{SyncFailure, SyncOutcome, SyncRequest};
use crate::types::{
    Context, MemberId, MessageId, Millis, Outcome, Progress, Propagation, PropagationResult,
    RoundStep, ShardKey, SpanKind, SyncReport, TraceSpan, max_count, round_steps,
};

/// Timeouts of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A sync that has made no progress for this long (no message either way, as its driver
    /// reports through [`Engine::handle_sync_progress`]) fails the round as timed out; one that
    /// keeps moving runs however long it takes. A round that has made no progress for this
    /// long can be taken over by a new one.
    pub sync_timeout: Duration,
    /// A round older than this (measured from its start at the origin) ends as timed out; the
    /// origin gives up waiting for its result after this long.
    pub round_timeout: Duration,
    /// The bound on clock differences between nodes: a hop whose `started_at` lies further
    /// ahead of this node's clock is refused (it would never time out here).
    pub max_clock_skew: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sync_timeout: Duration::from_secs(10 * 60),
            round_timeout: Duration::from_secs(60 * 60),
            max_clock_skew: Duration::from_secs(30),
        }
    }
}

/// What the origin asks for when it starts a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRequest {
    /// The (group, shard) to repair.
    pub key: ShardKey,
    /// The shard's node list in placement order (computed by the caller).
    pub nodes: Vec<MemberId>,
    /// Compute differences without applying them.
    pub preview: bool,
}

/// A context that cannot be run, at the origin or on a hand-off.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// Fewer than two nodes: there is nothing to propagate.
    #[error("a propagation needs at least 2 nodes, the node list has {count}")]
    TooFewNodes {
        /// The length of the node list.
        count: usize,
    },
    /// A node id appears twice in the node list.
    #[error("node list holds {node:?} more than once")]
    DuplicateNode {
        /// The repeated id.
        node: MemberId,
    },
    /// A member id in the list is empty.
    #[error("node list entry {index} is an empty node id")]
    EmptyMemberId {
        /// Its position in the list.
        index: usize,
    },
    /// The group name is empty.
    #[error("group is empty")]
    EmptyGroup,
    /// The message id is empty.
    #[error("message_id is empty")]
    EmptyMessageId,
    /// The origin node id is empty.
    #[error("origin_node is empty")]
    EmptyOrigin,
    /// The receiving node is not in the node list.
    #[error("node {node:?} is not in the node list {nodes:?}")]
    NotInList {
        /// The receiving node.
        node: MemberId,
        /// The list it was sent.
        nodes: Vec<MemberId>,
    },
    /// `max_count` is not `2n - 3` for the list's length.
    #[error("max_count is {max_count}, expected {expected} for {n} nodes")]
    MaxCountMismatch {
        /// The value received.
        max_count: u32,
        /// `2n - 3`.
        expected: u32,
        /// The length of the node list.
        n: usize,
    },
    /// The count is already spent: the sender should have reported instead of forwarding.
    #[error("count {count} has reached max_count {max_count}")]
    CountSpent {
        /// The count received.
        count: u32,
        /// The round's max count.
        max_count: u32,
    },
    /// The node list is longer than any shard's placement can be.
    #[error("the node list has {count} nodes, more than the limit of {MAX_NODES}")]
    TooManyNodes {
        /// The length of the node list.
        count: usize,
    },
    /// The (group, shard) is not one this node knows (unknown group, shard out of range).
    #[error("group {group:?} shard {shard}: {reason}")]
    UnknownShard {
        /// The group named.
        group: String,
        /// The shard named.
        shard: u32,
        /// Why it is refused, from the placement.
        reason: String,
    },
    /// The node list is not the shard's placement.
    #[error(
        "node list {nodes:?} is not the placement {placement:?} of group {group:?} shard {shard}"
    )]
    NotPlacement {
        /// The group.
        group: String,
        /// The shard.
        shard: u32,
        /// The list received.
        nodes: Vec<MemberId>,
        /// The shard's node list here.
        placement: Vec<MemberId>,
    },
    /// `started_at` lies further ahead of this node's clock than the clock skew bound.
    #[error("started_at {started_at} is more than {skew_ms} ms ahead of this node's clock ({now})")]
    StartedAhead {
        /// The round's start.
        started_at: Millis,
        /// This node's clock.
        now: Millis,
        /// The bound.
        skew_ms: u128,
    },
}

/// The longest node list a propagation may carry: a shard's copies are capped at 255 and at
/// the member count, so a longer list is not a placement (and checking it would cost time).
pub const MAX_NODES: usize = 256;

/// The node list of a (group, shard) as this node places it; `Err` with the reason when the
/// group is unknown or the shard out of range. Supplied by the node (see
/// [`Engine::set_placement`]); without one every well-formed list is admitted.
#[derive(Clone)]
pub struct Placement(std::sync::Arc<PlacementFn>);

type PlacementFn = dyn Fn(&ShardKey) -> Result<Vec<MemberId>, String> + Send + Sync;

impl Placement {
    /// A placement answered by `lookup`.
    pub fn new(
        lookup: impl Fn(&ShardKey) -> Result<Vec<MemberId>, String> + Send + Sync + 'static,
    ) -> Self {
        Placement(std::sync::Arc::new(lookup))
    }

    /// Checks that `context` names a known shard and carries its placement.
    fn check(&self, context: &Context) -> Result<(), ContextError> {
        let key = &context.key;
        let placement = (self.0)(key).map_err(|reason| ContextError::UnknownShard {
            group: key.group.clone(),
            shard: key.shard,
            reason,
        })?;
        if placement != context.nodes {
            return Err(ContextError::NotPlacement {
                group: key.group.clone(),
                shard: key.shard,
                nodes: context.nodes.clone(),
                placement,
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Placement(..)")
    }
}

/// The answer to a propagation handed to this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// This node now holds the round (or already held this very round).
    Accepted,
    /// A round for the same (group, shard) is running here; the sender reports a
    /// [`Outcome::Refused`] result to the origin.
    Refused {
        /// Which round holds the shard, for the origin's result.
        reason: String,
    },
}

/// How a hand-off to the next node ended, as the driver saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandOffOutcome {
    /// The next node accepted the round.
    Accepted,
    /// The next node refused it (a round for the shard is already running there).
    Refused {
        /// The receiver's reason.
        reason: String,
    },
    /// The next node could not be reached (after the driver's retries): it is skipped.
    Unreachable {
        /// What went wrong.
        error: String,
    },
    /// The next node rejected the request as invalid: the round is aborted.
    Rejected {
        /// The receiver's error.
        error: String,
    },
}

/// What the engine asks its driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Run this sync and feed its outcome to [`Engine::handle_sync_done`].
    Sync(SyncRequest),
    /// Stop the sync of `message_id` with `peer`: it timed out or its round was taken over.
    /// Its outcome, if it still arrives, is ignored.
    CancelSync {
        /// The round.
        message_id: MessageId,
        /// The peer of the sync.
        peer: MemberId,
    },
    /// Send the round to `to` and feed the answer to [`Engine::handle_hand_off`].
    HandOff {
        /// The next node.
        to: MemberId,
        /// The round as it leaves this node.
        propagation: Propagation,
    },
    /// Send a round's result to its origin (another node) and feed it to its
    /// [`Engine::handle_report`] there.
    Report {
        /// The origin.
        to: MemberId,
        /// The result.
        result: PropagationResult,
    },
    /// Send a holder's progress on a round to its origin (another node) and feed it to its
    /// [`Engine::handle_progress`] there. Best effort: the result carries the whole trace.
    ReportProgress {
        /// The origin.
        to: MemberId,
        /// The round as it is here after the step.
        progress: Progress,
    },
    /// A step of a round this node started, learnt from a holder's progress (or taken here):
    /// pass it to whoever watches the round. Every step of a round comes out once, in trace
    /// order, before the round's [`Command::Finished`].
    Step(RoundStep),
    /// A round this node started has ended: keep the result and wake whoever waits for it.
    Finished(PropagationResult),
}

/// Where a held round is.
#[derive(Clone, Debug)]
enum HeldState {
    /// Syncing with `peer` since `since`.
    Syncing { peer: MemberId, since: Millis },
    /// Handing the round to `to` since `since`.
    HandingOff { to: MemberId, since: Millis },
}

/// A round this node holds.
#[derive(Clone, Debug)]
struct Held {
    propagation: Propagation,
    /// This node's position in the node list.
    me: usize,
    state: HeldState,
    last_progress: Millis,
}

/// A round this node started and has no result for yet.
#[derive(Clone, Debug)]
struct OriginRound {
    /// The context and trace as the origin last knew them.
    propagation: Propagation,
    /// The node the origin is handing the round to, while it does.
    dispatching_to: Option<usize>,
    /// The steps passed on as [`Command::Step`] so far, in trace order.
    steps: Vec<RoundStep>,
    /// When the origin began its current hand-off (the start of a skip span if it fails).
    dispatched_at: Millis,
}

/// The propagation state machine of one node.
#[derive(Debug)]
pub struct Engine {
    me: MemberId,
    config: Config,
    placement: Option<Placement>,
    sequence: u64,
    held: BTreeMap<ShardKey, Held>,
    origin_rounds: BTreeMap<MessageId, OriginRound>,
    /// The last hops accepted here, as (message id, count), so that a hand-off delivered
    /// twice (a retry after a lost answer) is not run twice.
    accepted: VecDeque<(MessageId, u32)>,
    commands: VecDeque<Command>,
}

/// How many accepted hops [`Engine`] remembers to recognise a repeated hand-off.
const REMEMBERED_HOPS: usize = 1024;

impl Engine {
    /// An engine for node `me`.
    #[must_use]
    pub fn new(me: MemberId, config: Config) -> Self {
        Engine {
            me,
            config,
            placement: None,
            sequence: 0,
            held: BTreeMap::new(),
            origin_rounds: BTreeMap::new(),
            accepted: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }

    /// Checks every admitted round against `placement`: its (group, shard) must be known and
    /// its node list must be that shard's placement.
    pub fn set_placement(&mut self, placement: Placement) {
        self.placement = Some(placement);
    }

    /// This node's id.
    #[must_use]
    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// The engine's timeouts.
    #[must_use]
    pub fn config(&self) -> Config {
        self.config
    }

    /// The next command to carry out, in the order they were emitted.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The round this node holds for `key`, if any.
    #[must_use]
    pub fn running(&self, key: &ShardKey) -> Option<&MessageId> {
        self.held
            .get(key)
            .map(|h| &h.propagation.context.message_id)
    }

    /// The rounds this node started and has no result for yet.
    pub fn pending(&self) -> impl Iterator<Item = &MessageId> {
        self.origin_rounds.keys()
    }

    /// The steps of a round this node started and has no result for yet, as far as they are
    /// known here (each already emitted as a [`Command::Step`]); `None` when it is not pending.
    #[must_use]
    pub fn steps(&self, message_id: &MessageId) -> Option<&[RoundStep]> {
        self.origin_rounds
            .get(message_id)
            .map(|round| round.steps.as_slice())
    }

    /// Starts a round as its origin: builds the context (`max_count = 2n - 3`, a fresh message
    /// id) and hands the round to `nodes[0]`, or holds it here when this node is `nodes[0]`.
    ///
    /// The result arrives later as a [`Command::Finished`]; a refusal or an unreachable node
    /// list ends as a result too, never as an error here.
    pub fn start(&mut self, now: Millis, request: StartRequest) -> Result<MessageId, ContextError> {
        validate_nodes(&request.nodes)?;
        if request.key.group.is_empty() {
            return Err(ContextError::EmptyGroup);
        }
        let n = request.nodes.len();
        let max = max_count(n).ok_or(ContextError::TooFewNodes { count: n })?;
        self.sequence += 1;
        let message_id = MessageId(format!("{}-{}-{}", self.me, now.0, self.sequence));
        let context = Context {
            nodes: request.nodes,
            max_count: max,
            count: 0,
            origin: self.me.clone(),
            message_id: message_id.clone(),
            key: request.key,
            started_at: now,
            preview: request.preview,
        };
        tracing::debug!(
            message_id = %message_id, group = %context.key.group, shard = context.key.shard,
            nodes = n, "starting propagation"
        );
        let propagation = Propagation {
            context,
            trace: Vec::new(),
        };
        self.origin_rounds.insert(
            message_id.clone(),
            OriginRound {
                propagation,
                dispatching_to: None,
                steps: Vec::new(),
                dispatched_at: now,
            },
        );
        self.dispatch(now, &message_id, 0);
        Ok(message_id)
    }

    /// Hands the origin's round to `nodes[index]`, or takes it here when that is this node.
    fn dispatch(&mut self, now: Millis, message_id: &MessageId, index: usize) {
        let Some(round) = self.origin_rounds.get_mut(message_id) else {
            return;
        };
        let target = round.propagation.context.nodes[index].clone();
        if target != self.me {
            round.dispatching_to = Some(index);
            round.dispatched_at = now;
            let propagation = round.propagation.clone();
            self.commands.push_back(Command::HandOff {
                to: target,
                propagation,
            });
            return;
        }
        round.dispatching_to = None;
        let propagation = round.propagation.clone();
        match self.admit(now, propagation.clone()) {
            Ok(Admission::Accepted) => {}
            Ok(Admission::Refused { reason }) => {
                self.report(propagation, Outcome::Refused, Some(reason));
            }
            Err(error) => self.report(propagation, Outcome::Aborted, Some(error.to_string())),
        }
    }

    /// A propagation handed to this node by its predecessor (or its origin).
    ///
    /// Accepts it and starts the sync with the successor, or refuses it when a round for the
    /// same (group, shard) is running here. A running round that has made no progress for
    /// `sync_timeout` is taken over: it ends as [`Outcome::TimedOut`] at its origin.
    ///
    /// A hop whose `started_at` lies more than `max_clock_skew` ahead of `now` is refused: no
    /// origin can have started it yet, and it would never time out here.
    pub fn handle_propagate(
        &mut self,
        now: Millis,
        propagation: Propagation,
    ) -> Result<Admission, ContextError> {
        let started_at = propagation.context.started_at;
        if started_at > now.plus(self.config.max_clock_skew) {
            return Err(ContextError::StartedAhead {
                started_at,
                now,
                skew_ms: self.config.max_clock_skew.as_millis(),
            });
        }
        self.admit(now, propagation)
    }

    /// Admits a propagation handed to this node: checks its context, recognises a hop
    /// delivered twice, settles a round already held for the shard, and then holds the round
    /// and starts its sync with the successor.
    fn admit(&mut self, now: Millis, propagation: Propagation) -> Result<Admission, ContextError> {
        let context = &propagation.context;
        validate_context(context)?;
        if let Some(placement) = &self.placement {
            placement.check(context)?;
        }
        let me = context
            .index_of(&self.me)
            .ok_or_else(|| ContextError::NotInList {
                node: self.me.clone(),
                nodes: context.nodes.clone(),
            })?;
        let hop = (context.message_id.clone(), context.count);
        if self.accepted.contains(&hop) {
            // The same hop delivered twice (a retried hand-off): it is already running or done.
            return Ok(Admission::Accepted);
        }
        if let Some(admission) = self.settle_running(now, context) {
            return Ok(admission);
        }
        self.remember_hop(hop);
        self.hold(now, propagation, me);
        Ok(Admission::Accepted)
    }

    /// Settles the round this node already holds for the shard of `context`, if any, against
    /// the new hop. Returns the admission when the hop is decided here: accepted as an older
    /// hop of the same round, or refused because another round is running and making progress.
    /// Returns `None` when the hop may be held: no round was held, the held entry is superseded
    /// by a later hop of the same round, or a stuck round was taken over (ended as
    /// [`Outcome::TimedOut`]).
    fn settle_running(&mut self, now: Millis, context: &Context) -> Option<Admission> {
        let key = &context.key;
        let running = self.held.get(key)?;
        let running_id = running.propagation.context.message_id.clone();
        let running_count = running.propagation.context.count;
        let idle = now.since(running.last_progress);
        if running_id == context.message_id && context.count <= running_count {
            // An older hop of the round we hold, delivered again: nothing new to do.
            return Some(Admission::Accepted);
        }
        if running_id == context.message_id {
            // The round went all the way round and came back before the answer to our own
            // hand-off arrived: that hand-off was accepted, and this later hop supersedes
            // the entry we still hold (ignoring it would lose the round).
            self.held.remove(key);
        } else if idle < self.config.sync_timeout {
            let reason = format!(
                "propagation {running_id} (origin {}) is already running on {} for group {} shard {}",
                running.propagation.context.origin, self.me, key.group, key.shard
            );
            tracing::info!(
                message_id = %context.message_id, running = %running_id,
                group = %key.group, shard = key.shard, "refusing propagation"
            );
            return Some(Admission::Refused { reason });
        } else {
            let error = format!(
                "no progress for {} ms; taken over on {} by propagation {}",
                idle.as_millis(),
                self.me,
                context.message_id
            );
            tracing::warn!(
                message_id = %running_id, by = %context.message_id,
                group = %key.group, shard = key.shard, "taking over a stuck propagation"
            );
            self.end_held(key, Outcome::TimedOut, Some(error), true);
        }
        None
    }

    /// Remembers an accepted hop, forgetting the oldest beyond [`REMEMBERED_HOPS`].
    fn remember_hop(&mut self, hop: (MessageId, u32)) {
        if self.accepted.len() == REMEMBERED_HOPS {
            self.accepted.pop_front();
        }
        self.accepted.push_back(hop);
    }

    /// Holds an admitted round (this node at position `me` of its list) and starts the sync
    /// with the successor, unless the round is already past its round timeout: then it ends
    /// here as [`Outcome::TimedOut`].
    fn hold(&mut self, now: Millis, propagation: Propagation, me: usize) {
        let key = propagation.context.key.clone();
        let successor = propagation.context.next_index(me);
        let peer = propagation.context.nodes[successor].clone();
        self.held.insert(
            key.clone(),
            Held {
                propagation,
                me,
                state: HeldState::Syncing {
                    peer: peer.clone(),
                    since: now,
                },
                last_progress: now,
            },
        );
        if let Some(error) = self.round_expired(now, &key) {
            self.end_held(&key, Outcome::TimedOut, Some(error), false);
            return;
        }
        self.begin_sync(now, &key, peer);
    }

    /// Why the held round for `key` is past its round timeout, if it is.
    fn round_expired(&self, now: Millis, key: &ShardKey) -> Option<String> {
        let held = self.held.get(key)?;
        let started = held.propagation.context.started_at;
        let age = now.since(started);
        (age >= self.config.round_timeout).then(|| {
            format!(
                "round is {} s old, past its timeout of {} s",
                age.as_secs(),
                self.config.round_timeout.as_secs()
            )
        })
    }

    fn begin_sync(&mut self, now: Millis, key: &ShardKey, peer: MemberId) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        held.state = HeldState::Syncing {
            peer: peer.clone(),
            since: now,
        };
        held.last_progress = now;
        let context = &held.propagation.context;
        self.commands.push_back(Command::Sync(SyncRequest {
            message_id: context.message_id.clone(),
            key: key.clone(),
            peer,
            preview: context.preview,
        }));
    }

    /// The key of the held round with this message id, if this node holds it.
    fn find_held(&self, message_id: &MessageId) -> Option<ShardKey> {
        self.held
            .iter()
            .find(|(_, h)| &h.propagation.context.message_id == message_id)
            .map(|(k, _)| k.clone())
    }

    /// The sync this engine asked for with [`Command::Sync`] is still moving (it sent or
    /// received a message): its sync timeout starts again from `now`. Ignored for a sync that
    /// is no longer current.
    pub fn handle_sync_progress(&mut self, now: Millis, message_id: &MessageId, peer: &str) {
        let Some(key) = self.find_held(message_id) else {
            return;
        };
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        if matches!(&held.state, HeldState::Syncing { peer: syncing, .. } if syncing == peer) {
            held.last_progress = held.last_progress.max(now);
        }
    }

    /// The outcome of a sync this engine asked for with [`Command::Sync`].
    ///
    /// An outcome for a sync that is no longer current (it timed out, or its round was taken
    /// over) is ignored.
    pub fn handle_sync_done(
        &mut self,
        now: Millis,
        message_id: &MessageId,
        peer: &str,
        outcome: SyncOutcome,
    ) {
        let Some(key) = self.find_held(message_id) else {
            tracing::debug!(message_id = %message_id, peer, "ignoring the outcome of a stale sync");
            return;
        };
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        let HeldState::Syncing {
            peer: syncing,
            since,
        } = &held.state
        else {
            return;
        };
        if syncing != peer {
            return;
        }
        let since = *since;
        let span = |kind, report, error| TraceSpan {
            kind,
            from: self.me.clone(),
            to: peer.to_owned(),
            start: since,
            duration: now.since(since),
            report,
            error,
            count: 0,
        };
        match outcome {
            Ok(report) => {
                held.propagation.context.count += 1;
                held.last_progress = now;
                self.record(&key, span(SpanKind::Sync, Some(report), None));
                if self.count_spent(&key) {
                    self.end_held(&key, Outcome::Completed, None, false);
                } else {
                    self.hand_off(now, &key, peer.to_owned());
                }
            }
            Err(SyncFailure::Unreachable { error }) => {
                held.propagation.context.count += 1;
                held.last_progress = now;
                self.record(&key, span(SpanKind::Skip, None, Some(error)));
                self.after_skip(now, &key, peer);
            }
            Err(SyncFailure::Failed { error, report }) => {
                let report: Option<SyncReport> = report;
                self.record(&key, span(SpanKind::Sync, report, Some(error.clone())));
                let error = format!("sync {} -> {peer} failed: {error}", self.me);
                self.end_held(&key, Outcome::Aborted, Some(error), false);
            }
        }
    }

    fn count_spent(&self, key: &ShardKey) -> bool {
        self.held
            .get(key)
            .is_some_and(|h| h.propagation.context.count >= h.propagation.context.max_count)
    }

    /// After `skipped` was skipped: end when the count is spent, else sync with the node after
    /// it, or end with no peers when that is this node again.
    fn after_skip(&mut self, now: Millis, key: &ShardKey, skipped: &str) {
        if self.count_spent(key) {
            self.end_held(key, Outcome::Completed, None, false);
            return;
        }
        let Some(held) = self.held.get(key) else {
            return;
        };
        let context = &held.propagation.context;
        let next = context
            .index_of(skipped)
            .map_or(held.me, |i| context.next_index(i));
        if next == held.me {
            let error = format!("no reachable successor of {} is left", self.me);
            self.end_held(key, Outcome::NoPeers, Some(error), false);
        } else {
            let peer = context.nodes[next].clone();
            self.begin_sync(now, key, peer);
        }
    }

    fn hand_off(&mut self, now: Millis, key: &ShardKey, to: MemberId) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        held.state = HeldState::HandingOff {
            to: to.clone(),
            since: now,
        };
        held.last_progress = now;
        let propagation = held.propagation.clone();
        self.commands
            .push_back(Command::HandOff { to, propagation });
    }

    /// The answer to a hand-off this engine asked for with [`Command::HandOff`].
    pub fn handle_hand_off(
        &mut self,
        now: Millis,
        message_id: &MessageId,
        to: &str,
        outcome: HandOffOutcome,
    ) {
        if self.handle_dispatch_answer(now, message_id, to, &outcome) {
            return;
        }
        let Some(key) = self.find_held(message_id) else {
            return;
        };
        let Some(held) = self.held.get_mut(&key) else {
            return;
        };
        let HeldState::HandingOff { to: target, since } = &held.state else {
            return;
        };
        if target != to {
            return;
        }
        let since = *since;
        match outcome {
            HandOffOutcome::Accepted => {
                tracing::debug!(message_id = %message_id, to, "propagation handed off");
                self.held.remove(&key);
            }
            HandOffOutcome::Refused { reason } => {
                self.end_held(&key, Outcome::Refused, Some(reason), false);
            }
            HandOffOutcome::Rejected { error } => {
                let error = format!("{to} rejected the hand-off: {error}");
                self.end_held(&key, Outcome::Aborted, Some(error), false);
            }
            HandOffOutcome::Unreachable { error } => {
                held.propagation.context.count += 1;
                held.last_progress = now;
                let span = TraceSpan {
                    kind: SpanKind::Skip,
                    from: self.me.clone(),
                    to: to.to_owned(),
                    start: since,
                    duration: now.since(since),
                    report: None,
                    error: Some(format!("hand-off failed: {error}")),
                    count: 0,
                };
                self.record(&key, span);
                self.after_skip(now, &key, to);
            }
        }
    }

    /// Handles the answer to the origin's own hand-off; false when it is not one.
    fn handle_dispatch_answer(
        &mut self,
        now: Millis,
        message_id: &MessageId,
        to: &str,
        outcome: &HandOffOutcome,
    ) -> bool {
        let Some(round) = self.origin_rounds.get_mut(message_id) else {
            return false;
        };
        let Some(index) = round.dispatching_to else {
            return false;
        };
        if round.propagation.context.nodes[index] != to {
            return false;
        }
        round.dispatching_to = None;
        match outcome {
            HandOffOutcome::Accepted => {}
            HandOffOutcome::Refused { reason } => {
                let propagation = round.propagation.clone();
                self.report(propagation, Outcome::Refused, Some(reason.clone()));
            }
            HandOffOutcome::Rejected { error } => {
                let propagation = round.propagation.clone();
                let error = format!("{to} rejected the hand-off: {error}");
                self.report(propagation, Outcome::Aborted, Some(error));
            }
            HandOffOutcome::Unreachable { error } => {
                // The origin's skips are traced but not counted: the skipped node may be cut
                // off from the origin only, and the chain may still reach it (see the docs).
                round.propagation.trace.push(TraceSpan {
                    kind: SpanKind::Skip,
                    from: self.me.clone(),
                    to: to.to_owned(),
                    start: round.dispatched_at,
                    duration: now.since(round.dispatched_at),
                    report: None,
                    error: Some(format!("hand-off failed: {error}")),
                    count: round.propagation.context.count,
                });
                let Propagation { context, trace } = round.propagation.clone();
                self.stream(&context, &trace);
                let Some(round) = self.origin_rounds.get(message_id) else {
                    return true;
                };
                let next = round.propagation.context.next_index(index);
                if next == 0 {
                    let propagation = round.propagation.clone();
                    let error = "no node of the list could be reached".to_owned();
                    self.report(propagation, Outcome::NoPeers, Some(error));
                } else {
                    self.dispatch(now, message_id, next);
                }
            }
        }
        true
    }

    /// Appends a step to the held round for `key`, with the round's count as it is now, and
    /// reports the progress to the origin.
    fn record(&mut self, key: &ShardKey, mut span: TraceSpan) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        span.count = held.propagation.context.count;
        held.propagation.trace.push(span);
        let propagation = held.propagation.clone();
        let origin = propagation.context.origin.clone();
        if origin == self.me {
            self.stream(&propagation.context, &propagation.trace);
        } else {
            self.commands.push_back(Command::ReportProgress {
                to: origin,
                progress: Progress {
                    propagation,
                    reported_by: self.me.clone(),
                },
            });
        }
    }

    /// Emits the steps of `trace` not yet emitted for the pending round of `context`; false
    /// when the round is not pending here.
    fn stream(&mut self, context: &Context, trace: &[TraceSpan]) -> bool {
        let Some(round) = self.origin_rounds.get_mut(&context.message_id) else {
            return false;
        };
        let steps = round_steps(context, trace, round.steps.len());
        round.steps.extend(steps.iter().cloned());
        self.commands.extend(steps.into_iter().map(Command::Step));
        true
    }

    /// A holder's progress on a round this node started: its new steps come out as
    /// [`Command::Step`]s. Returns false (and does nothing) when the round is not pending here.
    pub fn handle_progress(&mut self, _now: Millis, progress: Progress) -> bool {
        let Propagation { context, trace } = &progress.propagation;
        if context.origin != self.me {
            return false;
        }
        self.stream(context, trace)
    }

    /// Ends the held round for `key` and reports it to its origin.
    fn end_held(&mut self, key: &ShardKey, outcome: Outcome, error: Option<String>, cancel: bool) {
        let Some(held) = self.held.remove(key) else {
            return;
        };
        if cancel && let HeldState::Syncing { peer, .. } = &held.state {
            self.commands.push_back(Command::CancelSync {
                message_id: held.propagation.context.message_id.clone(),
                peer: peer.clone(),
            });
        }
        self.report(held.propagation, outcome, error);
    }

    /// Sends a round's result to its origin, or keeps it when this node is the origin.
    fn report(&mut self, propagation: Propagation, outcome: Outcome, error: Option<String>) {
        let Propagation { context, trace } = propagation;
        tracing::debug!(
            message_id = %context.message_id, ?outcome, error = error.as_deref().unwrap_or(""),
            "propagation ended"
        );
        let to = context.origin.clone();
        let result = PropagationResult {
            context,
            outcome,
            error,
            trace,
            reported_by: self.me.clone(),
        };
        if to == self.me {
            self.deliver(result);
        } else {
            self.commands.push_back(Command::Report { to, result });
        }
    }

    fn deliver(&mut self, mut result: PropagationResult) -> bool {
        let Some(round) = self.origin_rounds.remove(&result.context.message_id) else {
            tracing::debug!(
                message_id = %result.context.message_id,
                "ignoring a result for a round that is not pending here"
            );
            return false;
        };
        // What the origin set when it started the round comes from its own record, not from
        // the report: a peer's report must not move the round's start (and with it the purge
        // cutoff of a complete round), nor change its shard, node list or preview flag. Only
        // the count is the reporter's.
        result.context = Context {
            count: result.context.count,
            ..round.propagation.context.clone()
        };
        // Steps whose progress report was lost or is still on its way come out now.
        let missing = round_steps(&result.context, &result.trace, round.steps.len());
        self.commands.extend(missing.into_iter().map(Command::Step));
        self.commands.push_back(Command::Finished(result));
        true
    }

    /// A result sent to this node as the origin of a round. Returns false (and does nothing)
    /// when the round is not pending here: not started here, already ended or timed out.
    pub fn handle_report(&mut self, _now: Millis, result: PropagationResult) -> bool {
        if result.context.origin != self.me {
            return false;
        }
        self.deliver(result)
    }

    /// Lets time pass: ends syncs without progress for the sync timeout and held rounds past the round
    /// timeout (reporting them as [`Outcome::TimedOut`]), and gives up on rounds this node
    /// started that have had no result within the round timeout.
    pub fn handle_tick(&mut self, now: Millis) {
        let keys: Vec<ShardKey> = self.held.keys().cloned().collect();
        for key in keys {
            let Some(held) = self.held.get_mut(&key) else {
                continue;
            };
            if let HeldState::Syncing { peer, since } = &held.state {
                let elapsed = now.since(*since);
                let idle = now.since(held.last_progress);
                if idle >= self.config.sync_timeout {
                    let error = format!(
                        "sync {} -> {peer} timed out after {} s without progress (running {} s)",
                        self.me,
                        idle.as_secs(),
                        elapsed.as_secs()
                    );
                    let span = TraceSpan {
                        kind: SpanKind::Sync,
                        from: self.me.clone(),
                        to: peer.clone(),
                        start: *since,
                        duration: elapsed,
                        report: None,
                        error: Some(error.clone()),
                        count: 0,
                    };
                    self.record(&key, span);
                    self.end_held(&key, Outcome::TimedOut, Some(error), true);
                    continue;
                }
            }
            if let Some(error) = self.round_expired(now, &key) {
                self.end_held(&key, Outcome::TimedOut, Some(error), true);
            }
        }
        let expired: Vec<MessageId> = self
            .origin_rounds
            .iter()
            .filter(|(_, r)| {
                now.since(r.propagation.context.started_at) >= self.config.round_timeout
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(round) = self.origin_rounds.get(&id) else {
                continue;
            };
            let error = format!(
                "no result within the round timeout of {} s",
                self.config.round_timeout.as_secs()
            );
            // The trace as far as the holders' progress told it.
            let context = round.propagation.context.clone();
            let trace = round.steps.iter().map(|step| step.span.clone()).collect();
            self.deliver(PropagationResult {
                context,
                outcome: Outcome::TimedOut,
                error: Some(error),
                trace,
                reported_by: self.me.clone(),
            });
        }
    }
}

/// Checks a received context: a valid node list, a group, a message id and an origin, the
/// `max_count` of its list (`2n - 3`), and a count not yet spent.
fn validate_context(context: &Context) -> Result<(), ContextError> {
    validate_nodes(&context.nodes)?;
    if context.key.group.is_empty() {
        return Err(ContextError::EmptyGroup);
    }
    if context.message_id.0.is_empty() {
        return Err(ContextError::EmptyMessageId);
    }
    if context.origin.is_empty() {
        return Err(ContextError::EmptyOrigin);
    }
    let n = context.nodes.len();
    let expected = max_count(n).ok_or(ContextError::TooFewNodes { count: n })?;
    if context.max_count != expected {
        return Err(ContextError::MaxCountMismatch {
            max_count: context.max_count,
            expected,
            n,
        });
    }
    if context.count >= context.max_count {
        return Err(ContextError::CountSpent {
            count: context.count,
            max_count: context.max_count,
        });
    }
    Ok(())
}

fn validate_nodes(nodes: &[MemberId]) -> Result<(), ContextError> {
    if nodes.len() > MAX_NODES {
        return Err(ContextError::TooManyNodes { count: nodes.len() });
    }
    if nodes.len() < 2 {
        return Err(ContextError::TooFewNodes { count: nodes.len() });
    }
    let mut seen = BTreeSet::new();
    for (index, node) in nodes.iter().enumerate() {
        if node.is_empty() {
            return Err(ContextError::EmptyMemberId { index });
        }
        if !seen.insert(node.as_str()) {
            return Err(ContextError::DuplicateNode { node: node.clone() });
        }
    }
    Ok(())
}
