//! The reference's scenarios, and the faults the router can inject, one test each.

use std::time::Duration;

use propd_gossip::{
    Admission, Command, Config, Context, ContextError, Engine, HandOffOutcome, MAX_NODES,
    MessageId, Millis, Outcome, Placement, Propagation, SpanKind, SyncFailure,
};

use crate::router::{Kind, Router, key, spans};

const MIN: Duration = Duration::from_secs(60);

fn sync(from: &str, to: &str) -> (SpanKind, String, String) {
    (SpanKind::Sync, from.to_owned(), to.to_owned())
}

fn skip(from: &str, to: &str) -> (SpanKind, String, String) {
    (SpanKind::Skip, from.to_owned(), to.to_owned())
}

#[test]
fn one_node_only_is_an_error_and_sends_nothing() {
    let mut router = Router::new(&["a"], Config::default());
    let err = router.start("a", &key(0), &["a"]).unwrap_err();
    assert_eq!(err, ContextError::TooFewNodes { count: 1 });
    assert_eq!(
        err.to_string(),
        "a propagation needs at least 2 nodes, the node list has 1"
    );
    assert_eq!(
        router.start("a", &key(0), &[]).unwrap_err(),
        ContextError::TooFewNodes { count: 0 }
    );
    assert!(router.engine("a").poll_command().is_none());
    let dup = router.start("a", &key(0), &["a", "a"]).unwrap_err();
    assert_eq!(dup, ContextError::DuplicateNode { node: "a".into() });
}

#[test]
fn two_nodes_converge_in_one_sync_started_from_either() {
    for origin in ["a", "b"] {
        let mut router = Router::new(&["a", "b"], Config::default());
        router.set_versions(&[("a", 1), ("b", 2)]);
        let id = router.start(origin, &key(0), &["a", "b"]).expect("valid");
        router.run();
        let result = router.result(&id);
        assert_eq!(result.outcome, Outcome::Completed);
        assert_eq!(spans(result), [sync("a", "b")]);
        assert_eq!(result.reported_by, "a");
        assert_eq!(result.context.origin, origin);
        assert_eq!((router.version("a"), router.version("b")), (2, 2));
        let report = result.trace[0].report.expect("a sync span has a report");
        assert_eq!((report.received, report.applied), (1, 1));
    }
}

#[test]
fn an_unknown_node_in_the_list_is_skipped() {
    let mut router = Router::new(&["a", "b"], Config::default());
    router.set_versions(&[("a", 1), ("b", 7)]);
    let id = router
        .start("b", &key(0), &["a", "b", "ghost"])
        .expect("valid");
    router.run();
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::Completed);
    // a -> b (1), b -> ghost skipped (2), b -> a (3): the count is spent.
    assert_eq!(
        spans(result),
        [sync("a", "b"), skip("b", "ghost"), sync("b", "a")]
    );
    assert!(
        result.trace[1]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("ghost")
    );
    assert_eq!((router.version("a"), router.version("b")), (7, 7));
}

#[test]
fn three_node_ring_of_the_reference() {
    // A has version 2, B 1, C 3; B starts. The message goes to A first.
    let mut router = Router::new(&["A", "B", "C"], Config::default());
    router.set_versions(&[("A", 2), ("B", 1), ("C", 3)]);
    let id = router.start("B", &key(0), &["A", "B", "C"]).expect("valid");
    router.run();
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::Completed);
    assert_eq!(
        spans(result),
        [sync("A", "B"), sync("B", "C"), sync("C", "A")]
    );
    assert_eq!(result.reported_by, "C");
    assert_eq!(router.results[0].0, "B", "the result reaches the origin");
    assert_eq!(result.context.count, 3);
    for node in ["A", "B", "C"] {
        assert_eq!(router.version(node), 3);
    }
}

#[test]
fn a_sync_error_aborts_the_round_and_reaches_the_origin() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.sync_failures.insert(
        ("b".into(), "c".into()),
        SyncFailure::Failed {
            error: "tree shape mismatch".into(),
            report: None,
        },
    );
    let id = router.start("c", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(spans(result), [sync("a", "b"), sync("b", "c")]);
    assert_eq!(
        result.trace[1].error.as_deref(),
        Some("tree shape mismatch")
    );
    let error = result.error.as_deref().unwrap_or("");
    assert!(
        error.contains("b -> c") && error.contains("tree shape mismatch"),
        "{error}"
    );
    assert_eq!(result.reported_by, "b");
    assert!(
        router.engine("b").running(&key(0)).is_none(),
        "the lock is released"
    );
}

#[test]
fn a_second_origin_is_refused_with_a_clear_result() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.set_delay(|e| {
        if e.kind == Kind::Sync {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        }
    });
    router.set_versions(&[("a", 3), ("b", 1), ("c", 2)]);
    let first = router.start("b", &key(0), &["a", "b", "c"]).expect("valid");
    router.advance(Duration::from_millis(10));
    assert_eq!(router.engine("a").running(&key(0)), Some(&first));
    let second = router.start("c", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    let refused = router.result(&second);
    assert_eq!(refused.outcome, Outcome::Refused);
    let reason = refused.error.as_deref().unwrap_or("");
    assert!(
        reason.contains(&first.0) && reason.contains("already running"),
        "{reason}"
    );
    let done = router.result(&first);
    assert_eq!(done.outcome, Outcome::Completed);
    for node in ["a", "b", "c"] {
        assert_eq!(router.version(node), 3);
    }
}

#[test]
fn a_slow_sync_refuses_requests_for_its_shard_and_serves_others() {
    let mut router = Router::new(&["a", "b", "c", "d"], Config::default());
    let nodes = ["a", "b", "c", "d"];
    router.set_delay(|e| {
        if e.kind == Kind::Sync && e.from == "a" {
            5 * MIN
        } else {
            Duration::ZERO
        }
    });
    router.set_versions(&[("a", 1), ("b", 2), ("c", 4), ("d", 3)]);
    let slow = router.start("a", &key(0), &nodes).expect("valid");
    let mut refused = Vec::new();
    for origin in ["b", "c", "d"] {
        router.advance(MIN);
        refused.push(router.start(origin, &key(0), &nodes).expect("valid"));
    }
    let other = router.start("b", &key(1), &nodes).expect("valid");
    router.advance(30 * MIN);
    router.run();
    for id in &refused {
        let result = router.result(id);
        assert_eq!(result.outcome, Outcome::Refused, "{id}");
        assert!(result.error.as_deref().unwrap_or("").contains(&slow.0));
    }
    assert_eq!(router.result(&other).outcome, Outcome::Completed);
    let slow = router.result(&slow);
    assert_eq!(slow.outcome, Outcome::Completed);
    assert_eq!(slow.syncs(), 5);
    assert!(slow.trace[0].duration >= 5 * MIN);
    for node in nodes {
        assert_eq!(router.version(node), 4);
    }
}

#[test]
fn a_stuck_sync_times_out_and_the_shard_is_free_again() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    let nodes = ["a", "b", "c"];
    router.stuck.insert(("a".into(), "b".into()));
    let stuck = router.start("c", &key(0), &nodes).expect("valid");
    router.advance(5 * MIN);
    let early = router.start("b", &key(0), &nodes).expect("valid");
    router.run();
    assert_eq!(router.result(&early).outcome, Outcome::Refused);
    router.advance(5 * MIN - Duration::from_millis(1));
    assert!(
        router
            .results
            .iter()
            .all(|(_, r)| r.context.message_id != stuck),
        "not yet"
    );
    router.advance(Duration::from_millis(1));
    let timed_out = router.result(&stuck);
    assert_eq!(timed_out.outcome, Outcome::TimedOut);
    assert_eq!(timed_out.reported_by, "a");
    assert!(
        timed_out
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 600 s")
    );
    assert_eq!(spans(timed_out), [sync("a", "b")]);
    assert!(router.engine("a").running(&key(0)).is_none());
    router.stuck.clear();
    let next = router.start("b", &key(0), &nodes).expect("valid");
    router.run();
    assert_eq!(router.result(&next).outcome, Outcome::Completed);
}

fn context(id: &str, origin: &str, started_at: Millis) -> Propagation {
    Propagation {
        context: Context {
            nodes: vec!["a".into(), "b".into(), "c".into()],
            max_count: 3,
            count: 0,
            origin: origin.into(),
            message_id: MessageId(id.into()),
            key: key(0),
            started_at,
            preview: false,
        },
        trace: Vec::new(),
    }
}

#[test]
fn a_round_without_progress_is_taken_over_by_the_next() {
    // No tick runs here: the take-over itself ends the stuck round.
    let mut engine = Engine::new("a".into(), Config::default());
    let t0 = Millis(0);
    let first = context("b-0-1", "b", t0);
    assert_eq!(engine.handle_propagate(t0, first), Ok(Admission::Accepted));
    assert!(matches!(engine.poll_command(), Some(Command::Sync(s)) if s.peer == "b"));
    let early = context("c-1-1", "c", t0.plus(MIN));
    assert!(matches!(
        engine.handle_propagate(t0.plus(MIN), early),
        Ok(Admission::Refused { .. })
    ));
    let late_at = t0.plus(10 * MIN);
    let late = context("c-2-2", "c", late_at);
    assert_eq!(
        engine.handle_propagate(late_at, late),
        Ok(Admission::Accepted)
    );
    let commands: Vec<Command> = std::iter::from_fn(|| engine.poll_command()).collect();
    assert!(
        matches!(&commands[0], Command::CancelSync { message_id, peer }
        if message_id.0 == "b-0-1" && peer == "b")
    );
    match &commands[1] {
        Command::Report { to, result } => {
            assert_eq!(to, "b");
            assert_eq!(result.outcome, Outcome::TimedOut);
            assert!(result.error.as_deref().unwrap_or("").contains("taken over"));
        }
        other => panic!("expected the stuck round's report, got {other:?}"),
    }
    assert!(matches!(&commands[2], Command::Sync(s) if s.message_id.0 == "c-2-2"));
    assert_eq!(engine.running(&key(0)).map(|m| m.0.as_str()), Some("c-2-2"));
    // The stuck sync's outcome, arriving late, changes nothing.
    engine.handle_sync_done(
        late_at,
        &MessageId("b-0-1".into()),
        "b",
        Ok(Default::default()),
    );
    assert!(engine.poll_command().is_none());
}

/// Regression: a round that went all the way round and came back to a node before that node
/// had the answer to its own hand-off was taken for a retried hand-off and dropped, so the
/// origin never got a result (seen in the cluster tests under load).
#[test]
fn a_round_that_returns_before_the_hand_off_answer_is_run_not_dropped() {
    let mut engine = Engine::new("a".into(), Config::default());
    let t0 = Millis(0);
    let first = context("b-0-1", "b", t0);
    assert_eq!(
        engine.handle_propagate(t0, first.clone()),
        Ok(Admission::Accepted)
    );
    assert!(matches!(engine.poll_command(), Some(Command::Sync(s)) if s.peer == "b"));
    engine.handle_sync_done(t0, &MessageId("b-0-1".into()), "b", Ok(Default::default()));
    assert!(matches!(engine.poll_command(), Some(Command::ReportProgress { to, .. }) if to == "b"));
    assert!(matches!(engine.poll_command(), Some(Command::HandOff { to, .. }) if to == "b"));
    // Before "b accepted" reaches us, the round comes back from c with a later count.
    let mut back = first;
    back.context.count = 2;
    assert_eq!(engine.handle_propagate(t0, back), Ok(Admission::Accepted));
    assert!(matches!(engine.poll_command(), Some(Command::Sync(s)) if s.peer == "b"));
    // The late answer to the first hand-off changes nothing: the round is still held here.
    engine.handle_hand_off(
        t0,
        &MessageId("b-0-1".into()),
        "b",
        HandOffOutcome::Accepted,
    );
    assert_eq!(engine.running(&key(0)).map(|m| m.0.as_str()), Some("b-0-1"));
    engine.handle_sync_done(t0, &MessageId("b-0-1".into()), "b", Ok(Default::default()));
    assert!(matches!(
        engine.poll_command(),
        Some(Command::ReportProgress { .. })
    ));
    match engine.poll_command() {
        Some(Command::Report { to, result }) => {
            assert_eq!(to, "b");
            assert_eq!(result.outcome, Outcome::Completed);
        }
        other => panic!("expected the completed round's report, got {other:?}"),
    }
}

#[test]
fn a_lost_result_times_out_at_the_origin_after_the_round_timeout() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.set_drop(|e| e.kind == Kind::Report);
    let id = router.start("b", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    assert_eq!(router.lost_reports, 1);
    router.advance(59 * MIN);
    assert!(router.results.is_empty());
    router.advance(MIN);
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::TimedOut);
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("round timeout of 3600 s")
    );
}

#[test]
fn a_round_past_its_timeout_ends_at_the_next_holder() {
    let mut engine = Engine::new("a".into(), Config::default());
    let old = context("b-0-1", "b", Millis(0));
    let now = Millis(0).plus(60 * MIN);
    assert_eq!(engine.handle_propagate(now, old), Ok(Admission::Accepted));
    match engine.poll_command() {
        Some(Command::Report { result, .. }) => assert_eq!(result.outcome, Outcome::TimedOut),
        other => panic!("expected a timed-out report, got {other:?}"),
    }
    assert!(engine.running(&key(0)).is_none());
}

#[test]
fn an_invalid_hand_off_is_rejected_by_field() {
    let mut engine = Engine::new("z".into(), Config::default());
    let err = engine
        .handle_propagate(Millis(0), context("b-0-1", "b", Millis(0)))
        .unwrap_err();
    assert!(matches!(err, ContextError::NotInList { ref node, .. } if node == "z"));
    let mut engine = Engine::new("a".into(), Config::default());
    let mut bad = context("b-0-1", "b", Millis(0));
    bad.context.max_count = 9;
    let err = engine.handle_propagate(Millis(0), bad).unwrap_err();
    assert_eq!(err.to_string(), "max_count is 9, expected 3 for 3 nodes");
}

/// A placement of group `g` with 4 shards, each on `a`, `b`, `c`.
fn placement() -> Placement {
    Placement::new(|key| {
        if key.group != "g" {
            return Err(format!("unknown group {:?}", key.group));
        }
        if key.shard >= 4 {
            return Err(format!("shard {} is out of range (shard_num 4)", key.shard));
        }
        Ok(vec!["a".into(), "b".into(), "c".into()])
    })
}

#[test]
fn a_hand_off_must_carry_the_placement_of_a_known_shard() {
    let mut engine = Engine::new("a".into(), Config::default());
    engine.set_placement(placement());

    let mut unknown = context("b-0-1", "b", Millis(0));
    unknown.context.key.group = "nope".into();
    let err = engine.handle_propagate(Millis(0), unknown).unwrap_err();
    assert!(
        matches!(err, ContextError::UnknownShard { ref reason, .. } if reason.contains("unknown group")),
        "{err}"
    );

    let mut out_of_range = context("b-0-2", "b", Millis(0));
    out_of_range.context.key.shard = 4;
    let err = engine
        .handle_propagate(Millis(0), out_of_range)
        .unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");

    // Members of the cluster, in another order or with one left out: not the placement.
    for nodes in [vec!["b", "a", "c"], vec!["a", "b"]] {
        let mut other = context("b-0-3", "b", Millis(0));
        other.context.max_count = u32::try_from(2 * nodes.len() - 3).unwrap();
        other.context.nodes = nodes.iter().map(|n| (*n).to_owned()).collect();
        let err = engine.handle_propagate(Millis(0), other).unwrap_err();
        assert!(matches!(err, ContextError::NotPlacement { .. }), "{err}");
    }
    // The refusals held nothing: the real round for the shard is admitted.
    assert_eq!(
        engine.handle_propagate(Millis(0), context("b-0-4", "b", Millis(0))),
        Ok(Admission::Accepted)
    );
}

#[test]
fn a_node_list_longer_than_any_placement_is_refused_before_it_is_read() {
    let mut engine = Engine::new("a".into(), Config::default());
    let mut huge = context("b-0-1", "b", Millis(0));
    huge.context.nodes = (0..100_000).map(|i| format!("n{i}")).collect();
    huge.context.nodes[0] = "a".into();
    huge.context.max_count = 199_997;
    let err = engine.handle_propagate(Millis(0), huge).unwrap_err();
    assert_eq!(
        err,
        ContextError::TooManyNodes { count: 100_000 },
        "more than {MAX_NODES}"
    );
}

#[test]
fn a_node_list_of_exactly_the_largest_size_is_admitted() {
    let mut engine = Engine::new("a".into(), Config::default());
    let mut largest = context("b-0-1", "b", Millis(0));
    largest.context.nodes = (0..MAX_NODES).map(|i| format!("n{i}")).collect();
    largest.context.nodes[0] = "a".into();
    largest.context.nodes[1] = "b".into();
    largest.context.max_count = u32::try_from(2 * MAX_NODES - 3).unwrap();
    assert_eq!(
        engine.handle_propagate(Millis(0), largest),
        Ok(Admission::Accepted)
    );
}

#[test]
fn a_hand_off_started_further_ahead_than_the_skew_bound_is_refused() {
    let config = Config::default();
    let skew = config.max_clock_skew;
    let mut engine = Engine::new("a".into(), config);
    let now = Millis(1_000_000);
    let ahead = context("b-0-1", "b", now.plus(skew).plus(Duration::from_millis(1)));
    let err = engine.handle_propagate(now, ahead).unwrap_err();
    assert!(matches!(err, ContextError::StartedAhead { .. }), "{err}");
    // Within the bound (a peer whose clock runs ahead by less than the skew) is admitted.
    let within = context("b-0-2", "b", now.plus(skew));
    assert_eq!(
        engine.handle_propagate(now, within),
        Ok(Admission::Accepted)
    );
}

/// The origin takes the round's start from its own record: a report (from any holder, forged
/// or not) that carries a later start must not move the purge cutoff the origin derives from
/// it, nor the shard, node list or preview flag of the round.
#[test]
fn a_report_cannot_move_the_start_shard_or_node_list_the_origin_recorded() {
    let mut origin = Engine::new("a".into(), Config::default());
    let started_at = Millis(5_000);
    let id = origin
        .start(
            started_at,
            propd_gossip::StartRequest {
                key: key(0),
                nodes: vec!["a".into(), "b".into(), "c".into()],
                preview: false,
            },
        )
        .expect("a valid round");
    while origin.poll_command().is_some() {}
    let mut forged = context(&id.0, "a", Millis(9_000_000)).context;
    forged.message_id = id.clone();
    forged.key = key(3);
    forged.nodes = vec!["a".into(), "x".into()];
    forged.preview = true;
    forged.count = 1;
    assert!(origin.handle_report(
        Millis(6_000),
        propd_gossip::PropagationResult {
            context: forged,
            outcome: Outcome::Completed,
            error: None,
            trace: Vec::new(),
            reported_by: "c".into(),
        }
    ));
    let finished = std::iter::from_fn(|| origin.poll_command())
        .find_map(|command| match command {
            Command::Finished(result) => Some(result),
            _ => None,
        })
        .expect("the round ends");
    assert_eq!(
        finished.context.started_at, started_at,
        "the start (cutoff)"
    );
    assert_eq!(finished.context.key, key(0));
    assert_eq!(finished.context.nodes, ["a", "b", "c"]);
    assert!(!finished.context.preview);
    assert_eq!(finished.context.count, 1, "the count is the report's");
}

#[test]
fn a_dropped_hand_off_skips_the_receiver() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.set_versions(&[("a", 1), ("b", 2), ("c", 3)]);
    let mut dropped = false;
    router.set_drop(move |e| {
        let hit = !dropped && e.kind == Kind::HandOff && e.from == "a" && e.to == "b";
        dropped |= hit;
        hit
    });
    let id = router.start("a", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::Completed);
    assert_eq!(
        spans(result),
        [sync("a", "b"), skip("a", "b"), sync("a", "c")]
    );
    assert_eq!((router.version("a"), router.version("c")), (3, 3));
}

#[test]
fn a_cut_link_makes_the_receiver_look_down_to_the_sender_only() {
    let nodes = ["a", "b", "c", "d"];
    let mut router = Router::new(&nodes, Config::default());
    router.set_versions(&[("a", 4), ("b", 1), ("c", 2), ("d", 3)]);
    router.partition("a", "b");
    let id = router.start("c", &key(0), &nodes).expect("valid");
    router.run();
    let result = router.result(&id);
    assert_eq!(result.outcome, Outcome::Completed);
    assert_eq!(spans(result), router.steps(&id));
    assert!(spans(result).contains(&skip("a", "b")));
    for node in ["a", "c", "d"] {
        assert_eq!(router.version(node), 4);
    }
}

#[test]
fn random_delays_change_timing_not_the_outcome() {
    let nodes = ["a", "b", "c", "d", "e"];
    for seed in 1..=20u64 {
        let mut router = Router::new(&nodes, Config::default());
        let mut state = seed;
        router.set_delay(move |_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            Duration::from_millis((state >> 33) % 5_000)
        });
        for (i, node) in nodes.iter().enumerate() {
            router.set_versions(&[(node, (seed + i as u64 * 7) % 5)]);
        }
        let top = router.versions.values().copied().max().unwrap_or(0);
        let id = router
            .start(nodes[(seed % 5) as usize], &key(0), &nodes)
            .expect("valid");
        router.run();
        let result = router.result(&id);
        assert_eq!(result.outcome, Outcome::Completed);
        assert_eq!(result.syncs(), 7);
        assert_eq!(spans(result), router.steps(&id));
        for node in nodes {
            assert_eq!(router.version(node), top, "seed {seed}");
        }
    }
}

#[test]
fn a_hand_off_delivered_twice_runs_once() {
    let mut engine = Engine::new("a".into(), Config::default());
    let hop = context("b-0-1", "b", Millis(0));
    assert_eq!(
        engine.handle_propagate(Millis(0), hop.clone()),
        Ok(Admission::Accepted)
    );
    assert!(matches!(engine.poll_command(), Some(Command::Sync(_))));
    assert_eq!(
        engine.handle_propagate(Millis(1), hop.clone()),
        Ok(Admission::Accepted)
    );
    assert!(engine.poll_command().is_none(), "the repeat starts nothing");
    // After the round has moved on, a late repeat still starts nothing.
    let id = MessageId("b-0-1".into());
    engine.handle_sync_done(Millis(2), &id, "b", Ok(Default::default()));
    assert!(matches!(
        engine.poll_command(),
        Some(Command::ReportProgress { .. })
    ));
    assert!(matches!(
        engine.poll_command(),
        Some(Command::HandOff { .. })
    ));
    engine.handle_hand_off(Millis(3), &id, "b", HandOffOutcome::Accepted);
    assert!(engine.running(&key(0)).is_none());
    assert_eq!(
        engine.handle_propagate(Millis(4), hop),
        Ok(Admission::Accepted)
    );
    assert!(engine.poll_command().is_none());
}

#[test]
fn a_late_repeat_is_recognised_after_other_rounds_were_accepted_since() {
    // Hops are remembered beyond the last one: a hand-off retried after this node accepted a
    // round of another shard still starts nothing.
    let mut engine = Engine::new("a".into(), Config::default());
    let first = context("b-0-1", "b", Millis(0));
    let mut other = context("c-0-1", "c", Millis(0));
    other.context.key = key(1);
    for hop in [first.clone(), other] {
        assert_eq!(
            engine.handle_propagate(Millis(1), hop),
            Ok(Admission::Accepted)
        );
        assert!(matches!(next_action(&mut engine), Some(Command::Sync(_))));
    }
    let id = MessageId("b-0-1".into());
    engine.handle_sync_done(Millis(2), &id, "b", Ok(Default::default()));
    assert!(matches!(
        next_action(&mut engine),
        Some(Command::HandOff { .. })
    ));
    engine.handle_hand_off(Millis(3), &id, "b", HandOffOutcome::Accepted);
    assert!(engine.running(&key(0)).is_none());
    assert_eq!(
        engine.handle_propagate(Millis(4), first),
        Ok(Admission::Accepted)
    );
    assert!(
        next_action(&mut engine).is_none(),
        "the late repeat of the first hop starts nothing"
    );
}

#[test]
fn rounds_started_in_the_same_millisecond_get_distinct_ids() {
    let mut engine = Engine::new("a".into(), Config::default());
    assert_eq!(engine.node_id(), "a");
    let ids: Vec<MessageId> = (0..3)
        .map(|shard| {
            let request = propd_gossip::StartRequest {
                key: key(shard),
                nodes: vec!["a".into(), "b".into(), "c".into()],
                preview: false,
            };
            engine.start(Millis(5), request).expect("valid")
        })
        .collect();
    assert_eq!(
        ids,
        [
            MessageId("a-5-1".into()),
            MessageId("a-5-2".into()),
            MessageId("a-5-3".into())
        ]
    );
}

#[test]
fn an_engine_keeps_the_timeouts_it_was_given() {
    let config = Config {
        sync_timeout: Duration::from_secs(7),
        ..Config::default()
    };
    assert_ne!(config, Config::default());
    assert_eq!(Engine::new("a".into(), config).config(), config);
}

/// The next command other than progress (`ReportProgress`, `Step`), which a holder emits after
/// each sync besides the command that moves the round on.
fn next_action(engine: &mut Engine) -> Option<Command> {
    loop {
        match engine.poll_command()? {
            Command::ReportProgress { .. } | Command::Step(_) => {}
            command => return Some(command),
        }
    }
}

/// The result an engine reports next (to another origin or to itself), skipping other commands.
fn next_result(engine: &mut Engine) -> propd_gossip::PropagationResult {
    while let Some(command) = engine.poll_command() {
        match command {
            Command::Report { result, .. } | Command::Finished(result) => return result,
            _ => {}
        }
    }
    panic!("the engine reported no result");
}

/// Engine `a` holds round `c-0-1` (nodes a, b, c; origin c), syncs with b, and hands the round
/// to b; b answers `outcome`. Returns what a reports to c.
fn mid_chain_hand_off(outcome: HandOffOutcome) -> propd_gossip::PropagationResult {
    let mut engine = Engine::new("a".into(), Config::default());
    let id = MessageId("c-0-1".into());
    assert_eq!(
        engine.handle_propagate(Millis(0), context("c-0-1", "c", Millis(0))),
        Ok(Admission::Accepted)
    );
    assert!(matches!(next_action(&mut engine), Some(Command::Sync(s)) if s.peer == "b"));
    engine.handle_sync_done(Millis(1), &id, "b", Ok(Default::default()));
    assert!(matches!(next_action(&mut engine), Some(Command::HandOff { to, .. }) if to == "b"));
    engine.handle_hand_off(Millis(2), &id, "b", outcome);
    let result = next_result(&mut engine);
    assert!(engine.running(&key(0)).is_none(), "the shard is free again");
    result
}

#[test]
fn a_refusal_in_the_middle_of_a_chain_ends_the_round_as_refused() {
    let result = mid_chain_hand_off(HandOffOutcome::Refused {
        reason: "b holds b-0-7 for g/0".into(),
    });
    assert_eq!(result.outcome, Outcome::Refused);
    assert_eq!(result.error.as_deref(), Some("b holds b-0-7 for g/0"));
    assert_eq!(result.context.origin, "c");
    assert_eq!(spans(&result), [sync("a", "b")]);
}

#[test]
fn a_rejected_hand_off_in_the_middle_of_a_chain_aborts_the_round() {
    let result = mid_chain_hand_off(HandOffOutcome::Rejected {
        error: "max_count is 9, expected 3 for 3 nodes".into(),
    });
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(
        result.error.as_deref(),
        Some("b rejected the hand-off: max_count is 9, expected 3 for 3 nodes")
    );
    assert_eq!(spans(&result), [sync("a", "b")]);
}

#[test]
fn a_holder_whose_every_successor_is_unreachable_ends_with_no_peers() {
    let mut engine = Engine::new("a".into(), Config::default());
    let id = MessageId("c-0-1".into());
    assert_eq!(
        engine.handle_propagate(Millis(0), context("c-0-1", "c", Millis(0))),
        Ok(Admission::Accepted)
    );
    for (t, peer) in [(1, "b"), (2, "c")] {
        assert!(
            matches!(next_action(&mut engine), Some(Command::Sync(s)) if s.peer == peer),
            "a tries {peer}"
        );
        engine.handle_sync_done(
            Millis(t),
            &id,
            peer,
            Err(SyncFailure::Unreachable {
                error: format!("{peer} is down"),
            }),
        );
    }
    let result = next_result(&mut engine);
    assert_eq!(result.outcome, Outcome::NoPeers);
    assert_eq!(spans(&result), [skip("a", "b"), skip("a", "c")]);
    assert_eq!(
        result.context.count, 2,
        "both skips count; the third is not tried"
    );
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("no reachable successor"),
        "{result:?}"
    );
}

/// Engine z starts a round of shard 0 over nodes a and b (z itself is no copy).
fn origin_outside_the_list() -> (Engine, MessageId) {
    let mut engine = Engine::new("z".into(), Config::default());
    let id = engine
        .start(
            Millis(0),
            propd_gossip::StartRequest {
                key: key(0),
                nodes: vec!["a".into(), "b".into()],
                preview: false,
            },
        )
        .expect("valid");
    (engine, id)
}

#[test]
fn an_origin_that_reaches_no_node_of_the_list_ends_with_no_peers() {
    // The origin z is not a copy: it hands the round to a, then b.
    let (mut engine, id) = origin_outside_the_list();
    for peer in ["a", "b"] {
        assert!(
            matches!(next_action(&mut engine), Some(Command::HandOff { to, .. }) if to == peer),
            "z hands off to {peer}"
        );
        engine.handle_hand_off(
            Millis(1),
            &id,
            peer,
            HandOffOutcome::Unreachable {
                error: "connection refused".into(),
            },
        );
    }
    let result = next_result(&mut engine);
    assert_eq!(result.outcome, Outcome::NoPeers);
    assert_eq!(
        result.context.count, 0,
        "the origin's skips are not counted"
    );
    assert_eq!(spans(&result), [skip("z", "a"), skip("z", "b")]);
}

#[test]
fn an_origin_whose_hand_off_is_rejected_aborts_the_round() {
    let (mut engine, id) = origin_outside_the_list();
    assert!(matches!(next_action(&mut engine), Some(Command::HandOff { to, .. }) if to == "a"));
    engine.handle_hand_off(
        Millis(1),
        &id,
        "a",
        HandOffOutcome::Rejected {
            error: "group must not be empty".into(),
        },
    );
    let result = next_result(&mut engine);
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(
        result.error.as_deref(),
        Some("a rejected the hand-off: group must not be empty")
    );
}

/// Regression (issue "Faults a node meets"): the origin's skip of a node it could not hand the
/// round to was traced with `duration_ms = 0`, however long the hand-off took to fail.
#[test]
fn the_origins_skip_span_carries_how_long_the_failed_hand_off_took() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.down.insert("b".into());
    router.set_delay(|e| {
        if e.kind == Kind::HandOff && e.to == "b" {
            Duration::from_secs(7)
        } else {
            Duration::ZERO
        }
    });
    let id = router.start("c", &key(0), &["b", "a", "c"]).expect("valid");
    router.run();
    let result = router.result(&id);
    let first = &result.trace[0];
    assert_eq!((first.kind, first.to.as_str()), (SpanKind::Skip, "b"));
    assert_eq!(first.duration, Duration::from_secs(7));
}
