//! An in-memory router of N engines with a manual clock, drop / delay / partition filters and a
//! toy sync that leaves both sides with the larger of their two versions.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use propd_gossip::{
    Admission, Command, Config, ContextError, Engine, HandOffOutcome, MemberId, MessageId, Millis,
    Progress, Propagation, PropagationResult, RoundStep, ShardKey, SpanKind, StartRequest,
    SyncFailure, SyncReport,
};

/// What a message between two nodes is, for the filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Sync,
    HandOff,
    Report,
    Progress,
}

/// A message between two nodes, as the filters see it.
#[derive(Clone, Debug)]
pub(crate) struct Envelope {
    pub(crate) kind: Kind,
    pub(crate) from: MemberId,
    pub(crate) to: MemberId,
}

/// A sync or skip as the router saw it happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) message_id: MessageId,
    pub(crate) kind: SpanKind,
    pub(crate) from: MemberId,
    pub(crate) to: MemberId,
}

#[derive(Debug)]
enum Event {
    SyncDone {
        node: MemberId,
        message_id: MessageId,
        peer: MemberId,
        failure: Option<SyncFailure>,
    },
    HandOff {
        from: MemberId,
        to: MemberId,
        propagation: Propagation,
    },
    Answer {
        node: MemberId,
        message_id: MessageId,
        to: MemberId,
        outcome: HandOffOutcome,
    },
    Report {
        to: MemberId,
        result: PropagationResult,
    },
    Progress {
        to: MemberId,
        progress: Progress,
    },
}

type Filter<T> = Box<dyn FnMut(&Envelope) -> T>;

/// N engines and the network between them.
pub(crate) struct Router {
    pub(crate) now: Millis,
    pub(crate) engines: BTreeMap<MemberId, Engine>,
    pub(crate) versions: BTreeMap<MemberId, u64>,
    /// Nodes nothing can reach.
    pub(crate) down: BTreeSet<MemberId>,
    /// Links cut both ways.
    cut: BTreeSet<(MemberId, MemberId)>,
    drop: Option<Filter<bool>>,
    delay: Option<Filter<Duration>>,
    /// Syncs from -> to that fail with this failure.
    pub(crate) sync_failures: BTreeMap<(MemberId, MemberId), SyncFailure>,
    /// Syncs from -> to that never return.
    pub(crate) stuck: BTreeSet<(MemberId, MemberId)>,
    queue: BTreeMap<(Millis, u64), Event>,
    sequence: u64,
    /// Every sync and skip, in the order they happened.
    pub(crate) log: Vec<Step>,
    /// Every result that reached its origin, with the origin.
    pub(crate) results: Vec<(MemberId, PropagationResult)>,
    /// Reports lost on the way to their origin.
    pub(crate) lost_reports: usize,
    /// Every step an origin passed on to its watchers, with the origin, in order.
    pub(crate) steps: Vec<(MemberId, RoundStep)>,
    /// Syncs actually run (the toy exchange happened).
    pub(crate) syncs_run: usize,
}

impl Router {
    pub(crate) fn new(ids: &[&str], config: Config) -> Router {
        let engines = ids
            .iter()
            .map(|id| ((*id).to_owned(), Engine::new((*id).to_owned(), config)));
        Router {
            now: Millis(1_000_000),
            engines: engines.collect(),
            versions: ids.iter().map(|id| ((*id).to_owned(), 0)).collect(),
            down: BTreeSet::new(),
            cut: BTreeSet::new(),
            drop: None,
            delay: None,
            sync_failures: BTreeMap::new(),
            stuck: BTreeSet::new(),
            queue: BTreeMap::new(),
            sequence: 0,
            log: Vec::new(),
            results: Vec::new(),
            lost_reports: 0,
            steps: Vec::new(),
            syncs_run: 0,
        }
    }

    pub(crate) fn set_versions(&mut self, versions: &[(&str, u64)]) {
        for (id, v) in versions {
            self.versions.insert((*id).to_owned(), *v);
        }
    }

    pub(crate) fn version(&self, id: &str) -> u64 {
        self.versions[id]
    }

    pub(crate) fn partition(&mut self, a: &str, b: &str) {
        self.cut.insert((a.to_owned(), b.to_owned()));
        self.cut.insert((b.to_owned(), a.to_owned()));
    }

    pub(crate) fn set_drop(&mut self, filter: impl FnMut(&Envelope) -> bool + 'static) {
        self.drop = Some(Box::new(filter));
    }

    pub(crate) fn set_delay(&mut self, filter: impl FnMut(&Envelope) -> Duration + 'static) {
        self.delay = Some(Box::new(filter));
    }

    /// Whether `to` can be reached from `from`, and the envelope is not dropped.
    fn passes(&mut self, envelope: &Envelope) -> bool {
        if !self.engines.contains_key(&envelope.to) || self.down.contains(&envelope.to) {
            return false;
        }
        if self
            .cut
            .contains(&(envelope.from.clone(), envelope.to.clone()))
        {
            return false;
        }
        !self.drop.as_mut().is_some_and(|f| f(envelope))
    }

    fn delay_of(&mut self, envelope: &Envelope) -> Duration {
        self.delay.as_mut().map_or(Duration::ZERO, |f| f(envelope))
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.sequence += 1;
        self.queue
            .insert((self.now.plus(after), self.sequence), event);
    }

    pub(crate) fn start(
        &mut self,
        origin: &str,
        key: &ShardKey,
        nodes: &[&str],
    ) -> Result<MessageId, ContextError> {
        let request = StartRequest {
            key: key.clone(),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            preview: false,
        };
        let now = self.now;
        let id = self.engine(origin).start(now, request)?;
        self.drain(origin);
        Ok(id)
    }

    pub(crate) fn engine(&mut self, id: &str) -> &mut Engine {
        self.engines
            .get_mut(id)
            .expect("the router knows this node")
    }

    /// Carries out the commands node `id` emitted.
    pub(crate) fn drain(&mut self, id: &str) {
        while let Some(command) = self.engine(id).poll_command() {
            self.execute(id, command);
        }
    }

    fn execute(&mut self, node: &str, command: Command) {
        let envelope = |kind, to: &str| Envelope {
            kind,
            from: node.to_owned(),
            to: to.to_owned(),
        };
        match command {
            Command::Sync(request) => {
                let env = envelope(Kind::Sync, &request.peer);
                let pair = (node.to_owned(), request.peer.clone());
                if self.stuck.contains(&pair) {
                    return;
                }
                let failure = if !self.passes(&env) {
                    Some(SyncFailure::Unreachable {
                        error: format!("{} is unreachable", request.peer),
                    })
                } else {
                    self.sync_failures.get(&pair).cloned()
                };
                let after = self.delay_of(&env);
                self.schedule(
                    after,
                    Event::SyncDone {
                        node: node.to_owned(),
                        message_id: request.message_id,
                        peer: request.peer,
                        failure,
                    },
                );
            }
            Command::CancelSync { message_id, peer } => {
                self.queue.retain(|_, e| {
                    !matches!(e, Event::SyncDone { node: n, message_id: m, peer: p, .. }
                        if n == node && *m == message_id && *p == peer)
                });
            }
            Command::HandOff { to, propagation } => {
                let env = envelope(Kind::HandOff, &to);
                let after = self.delay_of(&env);
                if self.passes(&env) {
                    self.schedule(
                        after,
                        Event::HandOff {
                            from: node.to_owned(),
                            to,
                            propagation,
                        },
                    );
                } else {
                    let outcome = HandOffOutcome::Unreachable {
                        error: format!("{to} is unreachable"),
                    };
                    let message_id = propagation.context.message_id;
                    self.schedule(
                        after,
                        Event::Answer {
                            node: node.to_owned(),
                            message_id,
                            to,
                            outcome,
                        },
                    );
                }
            }
            Command::Report { to, result } => {
                let env = envelope(Kind::Report, &to);
                let after = self.delay_of(&env);
                if self.passes(&env) {
                    self.schedule(after, Event::Report { to, result });
                } else {
                    self.lost_reports += 1;
                }
            }
            Command::ReportProgress { to, progress } => {
                let env = envelope(Kind::Progress, &to);
                let after = self.delay_of(&env);
                if self.passes(&env) {
                    self.schedule(after, Event::Progress { to, progress });
                }
            }
            Command::Step(step) => self.steps.push((node.to_owned(), step)),
            Command::Finished(result) => self.results.push((node.to_owned(), result)),
        }
    }

    fn process(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::SyncDone {
                node,
                message_id,
                peer,
                failure,
            } => {
                let outcome = match failure {
                    Some(failure) => {
                        let kind = match failure {
                            SyncFailure::Unreachable { .. } => SpanKind::Skip,
                            _ => SpanKind::Sync,
                        };
                        self.log_step(&message_id, kind, &node, &peer);
                        Err(failure)
                    }
                    None => {
                        self.log_step(&message_id, SpanKind::Sync, &node, &peer);
                        Ok(self.exchange(&node, &peer))
                    }
                };
                self.engine(&node)
                    .handle_sync_done(now, &message_id, &peer, outcome);
                self.drain(&node);
            }
            Event::HandOff {
                from,
                to,
                propagation,
            } => {
                let message_id = propagation.context.message_id.clone();
                let outcome = match self.engine(&to).handle_propagate(now, propagation) {
                    Ok(Admission::Accepted) => HandOffOutcome::Accepted,
                    Ok(Admission::Refused { reason }) => HandOffOutcome::Refused { reason },
                    Err(error) => HandOffOutcome::Rejected {
                        error: error.to_string(),
                    },
                };
                self.drain(&to);
                let env = Envelope {
                    kind: Kind::HandOff,
                    from: to.clone(),
                    to: from.clone(),
                };
                let after = self.delay_of(&env);
                self.schedule(
                    after,
                    Event::Answer {
                        node: from,
                        message_id,
                        to,
                        outcome,
                    },
                );
            }
            Event::Answer {
                node,
                message_id,
                to,
                outcome,
            } => {
                if matches!(outcome, HandOffOutcome::Unreachable { .. }) {
                    self.log_step(&message_id, SpanKind::Skip, &node, &to);
                }
                self.engine(&node)
                    .handle_hand_off(now, &message_id, &to, outcome);
                self.drain(&node);
            }
            Event::Report { to, result } => {
                self.engine(&to).handle_report(now, result);
                self.drain(&to);
            }
            Event::Progress { to, progress } => {
                self.engine(&to).handle_progress(now, progress);
                self.drain(&to);
            }
        }
    }

    fn log_step(&mut self, message_id: &MessageId, kind: SpanKind, from: &str, to: &str) {
        self.log.push(Step {
            message_id: message_id.clone(),
            kind,
            from: from.to_owned(),
            to: to.to_owned(),
        });
    }

    /// The toy sync: both sides end with the larger version.
    fn exchange(&mut self, a: &str, b: &str) -> SyncReport {
        self.syncs_run += 1;
        let (va, vb) = (self.versions[a], self.versions[b]);
        let top = va.max(vb);
        self.versions.insert(a.to_owned(), top);
        self.versions.insert(b.to_owned(), top);
        SyncReport {
            compared: 1,
            sent: u64::from(va > vb),
            received: u64::from(vb > va),
            applied: u64::from(vb > va),
            failed: 0,
            peer_applied: u64::from(va > vb),
            peer_failed: 0,
            bytes_sent: 8,
            bytes_received: 8,
            round_trips: 1,
        }
    }

    /// Runs every event due up to `until`, in time order; returns how many ran.
    fn run_until(&mut self, until: Millis) -> usize {
        let mut steps = 0;
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > until {
                break;
            }
            let ((at, _), event) = entry.remove_entry();
            self.now = self.now.max(at);
            self.process(event);
            steps += 1;
            assert!(steps < 100_000, "the router did not settle");
        }
        steps
    }

    /// Runs events until none is left (without moving the clock past the last one).
    pub(crate) fn run(&mut self) {
        self.run_until(Millis(i64::MAX));
    }

    /// Moves the clock `by` forward, running the events due meanwhile, then ticks every engine.
    pub(crate) fn advance(&mut self, by: Duration) {
        let until = self.now.plus(by);
        self.run_until(until);
        self.now = until;
        let ids: Vec<MemberId> = self.engines.keys().cloned().collect();
        for id in ids {
            self.engine(&id).handle_tick(until);
            self.drain(&id);
        }
        // What the ticks sent without delay is delivered now.
        self.run_until(until);
    }

    /// The result of round `id` at its origin, which must be there exactly once.
    pub(crate) fn result(&self, id: &MessageId) -> &PropagationResult {
        let found: Vec<&PropagationResult> = self
            .results
            .iter()
            .filter(|(_, r)| &r.context.message_id == id)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "round {id} has {} results at its origin",
            found.len()
        );
        found[0]
    }

    /// The syncs and skips the router saw for round `id`.
    pub(crate) fn steps(&self, id: &MessageId) -> Vec<(SpanKind, MemberId, MemberId)> {
        self.log
            .iter()
            .filter(|s| &s.message_id == id)
            .map(|s| (s.kind, s.from.clone(), s.to.clone()))
            .collect()
    }
}

/// The (kind, from, to) of every span of a result.
pub(crate) fn spans(result: &PropagationResult) -> Vec<(SpanKind, MemberId, MemberId)> {
    result
        .trace
        .iter()
        .map(|s| (s.kind, s.from.clone(), s.to.clone()))
        .collect()
}

pub(crate) fn key(shard: u32) -> ShardKey {
    ShardKey {
        group: "g".to_owned(),
        shard,
    }
}
