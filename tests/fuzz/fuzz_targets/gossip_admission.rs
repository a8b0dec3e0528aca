//! The gossip engine's admission of arbitrary propagations (`Engine::handle_propagate`, directly
//! or through the wire conversion), interleaved with ticks and the outcomes of the syncs and
//! hand-offs it asked for, at arbitrary times: no panic, and bounded work. Every input emits at
//! most a few commands (no amplification), and a context with a huge node list is handled in
//! time linear in its length (checked against a generous wall-clock bound per node).

#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use propd_gossip::{
    Command, Config, Context, Engine, HandOffOutcome, MessageId, Millis, Propagation, ShardKey,
    SyncFailure, SyncReport, max_count,
};
use propd_proto::v1 as pb;

const ME: &str = "n0";
/// Commands one input may make the engine emit: a few per operation.
const COMMANDS_PER_OP: usize = 8;
/// Most nodes in a generated huge list.
const HUGE_MAX: usize = 16 * 1024;
/// Admitting a huge list may take this long per node (linear work takes a few microseconds per
/// node even instrumented; quadratic work over 16 Ki nodes takes over 100 µs per node) ...
const HUGE_PER_NODE: Duration = Duration::from_micros(50);
/// ... plus this much, for a loaded machine.
const HUGE_SLACK: Duration = Duration::from_millis(500);

/// A node id: one of a few known ones (so that lists contain this node and repeat), empty, or
/// anything.
#[derive(Arbitrary, Debug)]
enum Node {
    Known(u8),
    Empty,
    Other(String),
}

impl Node {
    fn make(self) -> String {
        match self {
            Node::Known(n) => format!("n{}", n % 6),
            Node::Empty => String::new(),
            Node::Other(s) => s,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum MaxCount {
    /// `2n - 3` for the list, as a valid context has.
    Right,
    Any(u32),
}

#[derive(Arbitrary, Debug)]
struct Ctx {
    nodes: Vec<Node>,
    max_count: MaxCount,
    count: u32,
    origin: Node,
    /// One of a few ids (so that hops of the same round meet), or anything.
    message: Result<u8, String>,
    group: Result<u8, String>,
    shard: u8,
    started_at: i64,
    preview: bool,
}

impl Ctx {
    fn make(self) -> Context {
        let nodes: Vec<String> = self.nodes.into_iter().map(Node::make).collect();
        let max_count = match self.max_count {
            MaxCount::Right => max_count(nodes.len()).unwrap_or(0),
            MaxCount::Any(n) => n,
        };
        Context {
            nodes,
            max_count,
            count: self.count,
            origin: self.origin.make(),
            message_id: MessageId(match self.message {
                Ok(n) => format!("m{}", n % 4),
                Err(s) => s,
            }),
            key: ShardKey {
                group: match self.group {
                    Ok(n) => format!("g{}", n % 2),
                    Err(s) => s,
                },
                shard: u32::from(self.shard % 3),
            },
            started_at: Millis(self.started_at),
            preview: self.preview,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Span {
    kind: i32,
    from: Node,
    to: Node,
    start: i64,
    duration_ms: u64,
    error: String,
    count: u32,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// A propagation handed over as the engine's type.
    Propagate {
        at: i64,
        ctx: Ctx,
    },
    /// A propagation handed over on the wire, converted as the driver does.
    Wire {
        at: i64,
        ctx: Ctx,
        trace: Vec<Span>,
    },
    /// A context with a huge node list (`256 << (size % 7)` nodes, 256 to 16 Ki), this node at `me_at`,
    /// and possibly a duplicate. Only the first of an input runs (they are slow to build).
    Huge {
        at: i64,
        size: u8,
        me_at: u16,
        duplicate: Option<u16>,
        right_count: bool,
    },
    Tick {
        at: i64,
    },
    /// The outcome of one of the syncs the engine asked for.
    SyncDone {
        at: i64,
        which: u8,
        outcome: Result<u64, (bool, String)>,
    },
    /// The answer to one of the hand-offs the engine asked for.
    HandOffDone {
        at: i64,
        which: u8,
        outcome: Answer,
    },
}

#[derive(Arbitrary, Debug)]
enum Answer {
    Accepted,
    Refused(String),
    Unreachable(String),
    Rejected(String),
}

/// Syncs and hand-offs the engine asked for and has no answer to yet.
#[derive(Default)]
struct Pending {
    syncs: Vec<(MessageId, String)>,
    hand_offs: Vec<(MessageId, String)>,
}

fn drain(engine: &mut Engine, pending: &mut Pending) -> usize {
    let mut count = 0;
    while let Some(command) = engine.poll_command() {
        count += 1;
        match command {
            Command::Sync(request) => pending.syncs.push((request.message_id, request.peer)),
            Command::HandOff { to, propagation } => {
                pending.hand_offs.push((propagation.context.message_id, to));
            }
            Command::CancelSync { .. }
            | Command::Report { .. }
            | Command::ReportProgress { .. }
            | Command::Step(_)
            | Command::Finished(_) => {}
        }
    }
    count
}

fn huge(size: u8, me_at: u16, duplicate: Option<u16>, right_count: bool, at: i64) -> Propagation {
    let n = 256 << (usize::from(size) % 7);
    debug_assert!(n <= HUGE_MAX);
    let mut nodes: Vec<String> = (0..n).map(|i| format!("h{i}")).collect();
    nodes[usize::from(me_at) % n] = ME.to_owned();
    if let Some(d) = duplicate {
        nodes[usize::from(d) % n] = nodes[(usize::from(d) + 1) % n].clone();
    }
    let max_count = if right_count {
        max_count(nodes.len()).unwrap_or(0)
    } else {
        7
    };
    Propagation {
        context: Context {
            nodes,
            max_count,
            count: 0,
            origin: "h1".to_owned(),
            message_id: MessageId(format!("huge-{at}")),
            key: ShardKey {
                group: "g0".to_owned(),
                shard: 0,
            },
            started_at: Millis(at),
            preview: false,
        },
        trace: Vec::new(),
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut engine = Engine::new(ME.to_owned(), Config::default());
    let mut pending = Pending::default();
    let mut emitted = 0;
    let mut huge_done = false;
    let count = ops.len();
    for op in ops {
        match op {
            Op::Propagate { at, ctx } => {
                let propagation = Propagation {
                    context: ctx.make(),
                    trace: Vec::new(),
                };
                let _ = engine.handle_propagate(Millis(at), propagation);
            }
            Op::Wire { at, ctx, trace } => {
                let request = pb::PropagationRequest {
                    context: Some(ctx.make().into()),
                    trace: trace
                        .into_iter()
                        .map(|s| pb::TraceSpan {
                            kind: s.kind,
                            from: s.from.make(),
                            to: s.to.make(),
                            start_ms: s.start,
                            duration_ms: s.duration_ms,
                            report: None,
                            error: s.error,
                            count: s.count,
                        })
                        .collect(),
                };
                if let Ok(propagation) = Propagation::try_from(request) {
                    let _ = engine.handle_propagate(Millis(at), propagation);
                }
            }
            Op::Huge {
                at,
                size,
                me_at,
                duplicate,
                right_count,
            } => {
                if std::mem::replace(&mut huge_done, true) {
                    continue;
                }
                let propagation = huge(size, me_at, duplicate, right_count, at);
                let n = propagation.context.nodes.len();
                let started = Instant::now();
                let _ = engine.handle_propagate(Millis(at), propagation);
                let took = started.elapsed();
                assert!(
                    took < HUGE_SLACK + HUGE_PER_NODE * n as u32,
                    "a context of {n} nodes took {took:?} to admit"
                );
            }
            Op::Tick { at } => engine.handle_tick(Millis(at)),
            Op::SyncDone { at, which, outcome } => {
                if !pending.syncs.is_empty() {
                    let (id, peer) = pending
                        .syncs
                        .remove(usize::from(which) % pending.syncs.len());
                    let outcome = match outcome {
                        Ok(applied) => Ok(SyncReport {
                            applied,
                            ..SyncReport::default()
                        }),
                        Err((true, error)) => Err(SyncFailure::Unreachable { error }),
                        Err((false, error)) => Err(SyncFailure::Failed {
                            error,
                            report: None,
                        }),
                    };
                    engine.handle_sync_done(Millis(at), &id, &peer, outcome);
                }
            }
            Op::HandOffDone { at, which, outcome } => {
                if !pending.hand_offs.is_empty() {
                    let index = usize::from(which) % pending.hand_offs.len();
                    let (id, to) = pending.hand_offs.remove(index);
                    let outcome = match outcome {
                        Answer::Accepted => HandOffOutcome::Accepted,
                        Answer::Refused(reason) => HandOffOutcome::Refused { reason },
                        Answer::Unreachable(error) => HandOffOutcome::Unreachable { error },
                        Answer::Rejected(error) => HandOffOutcome::Rejected { error },
                    };
                    engine.handle_hand_off(Millis(at), &id, &to, outcome);
                }
            }
        }
        emitted += drain(&mut engine, &mut pending);
        assert!(
            emitted <= COMMANDS_PER_OP * count.max(1),
            "{emitted} commands for {count} operations"
        );
    }
});
