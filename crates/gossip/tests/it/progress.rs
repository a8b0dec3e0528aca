//! Progress: each holder reports every step to the origin as it happens, and the origin passes
//! each step on once, in trace order, before the round's result.

use propd_gossip::{
    Admission, Command, Config, Context, Engine, MessageId, Millis, Outcome, Propagation,
    PropagationResult, SpanKind, SyncFailure, SyncReport,
};

use crate::router::{Kind, Router, key};

/// Checks that the steps origin `origin` passed on for `result`'s round are its trace, one each,
/// in order, with the round's `max_count`.
fn assert_steps_are_the_trace(router: &Router, origin: &str, result: &PropagationResult) {
    let steps: Vec<_> = router
        .steps
        .iter()
        .filter(|(node, step)| node == origin && step.message_id == result.context.message_id)
        .map(|(_, step)| step)
        .collect();
    assert_eq!(steps.len(), result.trace.len(), "{steps:?}");
    for (index, (step, span)) in steps.iter().zip(&result.trace).enumerate() {
        assert_eq!(step.index as usize, index);
        assert_eq!(&step.span, span);
        assert_eq!(step.max_count, result.context.max_count);
        assert_eq!(step.key, key(0));
    }
}

#[test]
fn every_step_reaches_the_origin_once_in_trace_order_with_its_count() {
    let mut router = Router::new(&["a", "b", "c", "d"], Config::default());
    router.down.insert("c".into());
    let id = router
        .start("d", &key(0), &["a", "b", "c", "d"])
        .expect("valid");
    router.run();
    let result = router.result(&id).clone();
    assert_eq!(result.outcome, Outcome::Completed);
    assert_steps_are_the_trace(&router, "d", &result);
    // a -> b, b -> c skipped, b -> d, d -> a, a -> b: each step counts one.
    let counts: Vec<u32> = result.trace.iter().map(|s| s.count).collect();
    assert_eq!(counts, [1, 2, 3, 4, 5]);
    assert_eq!(result.context.count, 5);
    assert_eq!(result.trace[1].kind, SpanKind::Skip);
}

#[test]
fn steps_whose_progress_reports_are_lost_come_out_with_the_result() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.set_drop(|envelope| envelope.kind == Kind::Progress);
    let id = router.start("c", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    let result = router.result(&id).clone();
    assert_eq!(result.outcome, Outcome::Completed);
    assert_steps_are_the_trace(&router, "c", &result);
}

#[test]
fn the_origins_own_skips_are_steps_that_do_not_count() {
    let mut router = Router::new(&["a", "b", "c"], Config::default());
    router.down.insert("a".into());
    let id = router.start("c", &key(0), &["a", "b", "c"]).expect("valid");
    router.run();
    let result = router.result(&id).clone();
    assert_steps_are_the_trace(&router, "c", &result);
    assert_eq!(result.trace[0].kind, SpanKind::Skip);
    assert_eq!(result.trace[0].from, "c");
    assert_eq!(result.trace[0].count, 0, "the origin's skip is not counted");
    assert_eq!(result.trace[1].count, 1);
}

fn held_round() -> Propagation {
    Propagation {
        context: Context {
            nodes: vec!["a".into(), "b".into(), "c".into()],
            max_count: 3,
            count: 0,
            origin: "c".into(),
            message_id: MessageId("c-1-1".into()),
            key: key(0),
            started_at: Millis(0),
            preview: false,
        },
        trace: Vec::new(),
    }
}

#[test]
fn a_holder_reports_each_step_to_the_origin_before_it_hands_the_round_on() {
    let mut engine = Engine::new("a".into(), Config::default());
    let now = Millis(10);
    assert_eq!(
        engine.handle_propagate(now, held_round()),
        Ok(Admission::Accepted)
    );
    assert!(matches!(engine.poll_command(), Some(Command::Sync(s)) if s.peer == "b"));
    let report = SyncReport {
        compared: 4,
        received: 2,
        applied: 2,
        ..SyncReport::default()
    };
    let id = MessageId("c-1-1".into());
    engine.handle_sync_done(Millis(20), &id, "b", Ok(report));
    match engine.poll_command() {
        Some(Command::ReportProgress { to, progress }) => {
            assert_eq!(to, "c");
            assert_eq!(progress.reported_by, "a");
            assert_eq!(progress.propagation.context.count, 1);
            let [span] = progress.propagation.trace.as_slice() else {
                panic!("one step: {progress:?}");
            };
            assert_eq!((span.kind, span.count), (SpanKind::Sync, 1));
            assert_eq!(span.report, Some(report));
        }
        other => panic!("expected a progress report, got {other:?}"),
    }
    assert!(matches!(engine.poll_command(), Some(Command::HandOff { to, .. }) if to == "b"));
    assert!(engine.poll_command().is_none());
}

#[test]
fn a_failed_sync_is_reported_with_the_count_it_did_not_spend() {
    let mut engine = Engine::new("a".into(), Config::default());
    engine
        .handle_propagate(Millis(0), held_round())
        .expect("accepted");
    let _sync = engine.poll_command();
    let failure = SyncFailure::Failed {
        error: "refused".into(),
        report: None,
    };
    engine.handle_sync_done(Millis(5), &MessageId("c-1-1".into()), "b", Err(failure));
    let commands: Vec<Command> = std::iter::from_fn(|| engine.poll_command()).collect();
    match commands.as_slice() {
        [
            Command::ReportProgress { progress, .. },
            Command::Report { result, .. },
        ] => {
            assert_eq!(progress.propagation.trace[0].count, 0);
            assert_eq!(result.outcome, Outcome::Aborted);
        }
        other => panic!("expected progress then the report, got {other:?}"),
    }
}

#[test]
fn the_origin_passes_each_step_on_once_even_when_reports_repeat_or_overtake() {
    let mut origin = Engine::new("c".into(), Config::default());
    let id = origin
        .start(
            Millis(0),
            propd_gossip::StartRequest {
                key: key(0),
                nodes: vec!["a".into(), "b".into(), "c".into()],
                preview: false,
            },
        )
        .expect("valid");
    assert!(matches!(
        origin.poll_command(),
        Some(Command::HandOff { .. })
    ));
    let mut round = held_round();
    round.context.message_id = id.clone();
    let span = |from: &str, to: &str, count: u32| propd_gossip::TraceSpan {
        kind: SpanKind::Sync,
        from: from.into(),
        to: to.into(),
        start: Millis(1),
        duration: std::time::Duration::from_millis(1),
        report: Some(SyncReport::default()),
        error: None,
        count,
    };
    let progress = |trace: Vec<propd_gossip::TraceSpan>| propd_gossip::Progress {
        propagation: Propagation {
            context: round.context.clone(),
            trace,
        },
        reported_by: "b".into(),
    };
    let two = vec![span("a", "b", 1), span("b", "c", 2)];
    // The second report overtakes the first: both steps come out, in order.
    assert!(origin.handle_progress(Millis(2), progress(two.clone())));
    let steps: Vec<Command> = std::iter::from_fn(|| origin.poll_command()).collect();
    let indices: Vec<u32> = steps
        .iter()
        .map(|c| match c {
            Command::Step(step) => step.index,
            other => panic!("expected steps, got {other:?}"),
        })
        .collect();
    assert_eq!(indices, [0, 1]);
    // The late first report, and a repeat, add nothing.
    assert!(origin.handle_progress(Millis(3), progress(two[..1].to_vec())));
    assert!(origin.handle_progress(Millis(3), progress(two.clone())));
    assert!(origin.poll_command().is_none());
    assert_eq!(origin.steps(&id).map(<[_]>::len), Some(2));
    // The result brings the last step, then ends the round.
    let mut trace = two;
    trace.push(span("c", "a", 3));
    let mut context = round.context.clone();
    context.count = 3;
    assert!(origin.handle_report(
        Millis(4),
        PropagationResult {
            context,
            outcome: Outcome::Completed,
            error: None,
            trace,
            reported_by: "c".into(),
        }
    ));
    assert!(matches!(origin.poll_command(), Some(Command::Step(s)) if s.index == 2));
    assert!(matches!(origin.poll_command(), Some(Command::Finished(_))));
    assert!(origin.steps(&id).is_none());
    assert!(!origin.handle_progress(Millis(5), progress(Vec::new())));
}

/// Whether `engine` emitted the report of a timed-out round (draining its commands).
fn timed_out(engine: &mut Engine) -> bool {
    std::iter::from_fn(|| engine.poll_command()).any(|command| {
        matches!(command, Command::Report { result, .. } if result.outcome == Outcome::TimedOut)
    })
}

#[test]
fn a_sync_that_reports_progress_is_not_timed_out_and_a_silent_one_is() {
    let minutes = |m: i64| Millis(m * 60_000);
    let id = MessageId("c-1-1".into());
    // The default sync timeout is 10 minutes.
    let mut moving = Engine::new("a".into(), Config::default());
    moving
        .handle_propagate(minutes(0), held_round())
        .expect("accepted");
    assert!(matches!(moving.poll_command(), Some(Command::Sync(_))));
    for m in 1..=25 {
        moving.handle_sync_progress(minutes(m), &id, "b");
        // Progress for another peer or round is not this sync's.
        moving.handle_sync_progress(minutes(m), &MessageId("other".into()), "b");
        moving.handle_tick(minutes(m));
        assert!(!timed_out(&mut moving), "cut at minute {m} while moving");
    }
    assert!(moving.running(&key(0)).is_some(), "25 minutes and running");
    // Then it stops moving: ten minutes after its last progress, it is cut.
    moving.handle_sync_progress(minutes(26), &id, "c");
    moving.handle_tick(Millis(minutes(35).0 - 1));
    assert!(!timed_out(&mut moving));
    moving.handle_tick(minutes(35));
    assert!(timed_out(&mut moving), "stalled for the sync timeout");

    let mut silent = Engine::new("a".into(), Config::default());
    silent
        .handle_propagate(minutes(0), held_round())
        .expect("accepted");
    let _sync = silent.poll_command();
    silent.handle_tick(minutes(10));
    assert!(timed_out(&mut silent), "no progress for the sync timeout");
}
