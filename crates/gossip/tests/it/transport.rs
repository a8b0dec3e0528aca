//! The same flows over real tonic servers on 127.0.0.1 (ports chosen at run time), with a toy
//! sync that leaves both sides with the larger of their versions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use propd_gossip::transport::{DriverConfig, GossipDriver, MemberChannels, RoundEvent, WaitError};
use propd_gossip::{
    MessageId, Outcome, PropagationResult, ShardKey, SpanKind, StartRequest, SyncFailure,
    SyncOutcome, SyncProgress, SyncReport, SyncRequest, SyncWork,
};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

/// The shared world the toy syncs act on.
#[derive(Default)]
struct World {
    versions: BTreeMap<String, u64>,
    /// Nodes whose sync endpoint cannot be reached.
    down: BTreeSet<String>,
    /// Syncs from -> to that fail.
    failing: BTreeSet<(String, String)>,
}

#[derive(Clone)]
struct ToySync {
    me: String,
    world: Arc<Mutex<World>>,
    /// When set, syncs from this node wait for a notification first.
    gate: Option<Arc<Notify>>,
}

impl SyncWork for ToySync {
    async fn sync(&self, request: SyncRequest, _progress: SyncProgress) -> SyncOutcome {
        if let Some(gate) = &self.gate {
            gate.notified().await;
        }
        let mut world = self.world.lock().expect("the world lock");
        if world.down.contains(&request.peer) || !world.versions.contains_key(&request.peer) {
            return Err(SyncFailure::Unreachable {
                error: format!("{} is down", request.peer),
            });
        }
        if world
            .failing
            .contains(&(self.me.clone(), request.peer.clone()))
        {
            return Err(SyncFailure::Failed {
                error: "tree unreadable".into(),
                report: None,
            });
        }
        let (a, b) = (world.versions[&self.me], world.versions[&request.peer]);
        let top = a.max(b);
        world.versions.insert(self.me.clone(), top);
        world.versions.insert(request.peer.clone(), top);
        Ok(SyncReport {
            compared: 1,
            sent: u64::from(a > b),
            received: u64::from(b > a),
            ..Default::default()
        })
    }
}

struct Cluster {
    world: Arc<Mutex<World>>,
    drivers: HashMap<String, GossipDriver<ToySync>>,
}

fn config() -> DriverConfig {
    DriverConfig {
        request_timeout: Duration::from_secs(5),
        attempts: 3,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        tick_interval: Duration::from_millis(100),
        ..DriverConfig::default()
    }
}

/// Starts a server for each of `live`; each of `dead` gets an address where nothing listens.
async fn cluster(
    live: &[(&str, u64)],
    dead: &[&str],
    gated: Option<(&str, Arc<Notify>)>,
) -> Cluster {
    let world = Arc::new(Mutex::new(World::default()));
    let mut members = HashMap::new();
    let mut listeners = Vec::new();
    for (id, version) in live {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("a bound address");
        members.insert((*id).to_owned(), format!("http://{address}"));
        listeners.push((*id, listener));
        world
            .lock()
            .expect("lock")
            .versions
            .insert((*id).to_owned(), *version);
    }
    for id in dead {
        // Bind then close: the port is known to refuse connections.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("a bound address");
        drop(listener);
        members.insert((*id).to_owned(), format!("http://{address}"));
        world.lock().expect("lock").down.insert((*id).to_owned());
    }
    let mut drivers = HashMap::new();
    for (id, listener) in listeners {
        let gate = gated
            .as_ref()
            .filter(|(g, _)| *g == id)
            .map(|(_, n)| Arc::clone(n));
        let sync = ToySync {
            me: id.to_owned(),
            world: Arc::clone(&world),
            gate,
        };
        let channels = MemberChannels::new(members.clone(), Duration::from_secs(2));
        let driver = GossipDriver::new(id.to_owned(), channels, sync, config());
        let service = driver.service();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
        drivers.insert(id.to_owned(), driver);
    }
    Cluster { world, drivers }
}

impl Cluster {
    fn start(&self, origin: &str, shard: u32, nodes: &[&str]) -> MessageId {
        let request = StartRequest {
            key: ShardKey {
                group: "g".into(),
                shard,
            },
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            preview: false,
        };
        self.drivers[origin]
            .start(request)
            .expect("a valid node list")
    }

    async fn wait(&self, origin: &str, id: &MessageId) -> PropagationResult {
        self.drivers[origin]
            .wait(id, Duration::from_secs(20))
            .await
            .expect("a result in time")
    }

    fn version(&self, id: &str) -> u64 {
        self.world.lock().expect("lock").versions[id]
    }
}

fn steps(result: &PropagationResult) -> Vec<(SpanKind, &str, &str)> {
    result
        .trace
        .iter()
        .map(|s| (s.kind, s.from.as_str(), s.to.as_str()))
        .collect()
}

#[tokio::test]
async fn three_node_ring_over_tonic() {
    let c = cluster(&[("A", 2), ("B", 1), ("C", 3)], &[], None).await;
    let mut finished = c.drivers["B"].subscribe();
    let id = c.start("B", 0, &["A", "B", "C"]);
    let result = c.wait("B", &id).await;
    assert_eq!(
        finished.recv().await.expect("the result is published"),
        result
    );
    assert!(result.reached_every_copy());
    assert_eq!(result.outcome, Outcome::Completed, "{:?}", result.error);
    assert_eq!(
        steps(&result),
        [
            (SpanKind::Sync, "A", "B"),
            (SpanKind::Sync, "B", "C"),
            (SpanKind::Sync, "C", "A")
        ]
    );
    assert_eq!(result.reported_by, "C");
    for node in ["A", "B", "C"] {
        assert_eq!(c.version(node), 3);
    }
    assert_eq!(c.drivers["B"].result(&id), Some(result));
    assert_eq!(c.drivers["B"].recent_results().len(), 1);
}

#[tokio::test]
async fn two_nodes_over_tonic_from_either() {
    let c = cluster(&[("a", 5), ("b", 9)], &[], None).await;
    for (shard, origin) in [(0, "a"), (1, "b")] {
        let id = c.start(origin, shard, &["a", "b"]);
        let result = c.wait(origin, &id).await;
        assert_eq!(result.outcome, Outcome::Completed);
        assert_eq!(steps(&result), [(SpanKind::Sync, "a", "b")]);
    }
    assert_eq!((c.version("a"), c.version("b")), (9, 9));
}

#[tokio::test]
async fn dead_and_unknown_nodes_are_skipped_over_tonic() {
    let c = cluster(&[("a", 1), ("c", 2), ("e", 4)], &["b", "d"], None).await;
    // "b" and "d" refuse connections; "x" is in the list but not a member.
    let nodes = ["b", "a", "x", "c", "d", "e"];
    let id = c.start("c", 0, &nodes);
    let result = c.wait("c", &id).await;
    assert_eq!(result.outcome, Outcome::Completed, "{:?}", result.error);
    assert_eq!(result.trace[0].kind, SpanKind::Skip, "the origin skips b");
    assert!(!result.reached_every_copy());
    assert_eq!(result.trace[0].to, "b");
    assert!(
        result
            .trace
            .iter()
            .any(|s| s.kind == SpanKind::Skip && s.to == "x")
    );
    assert!(result.syncs() <= 9);
    for node in ["a", "c", "e"] {
        assert_eq!(c.version(node), 4);
    }
}

#[tokio::test]
async fn a_second_origin_is_refused_over_tonic() {
    let gate = Arc::new(Notify::new());
    let c = cluster(
        &[("a", 3), ("b", 1), ("c", 2)],
        &[],
        Some(("a", Arc::clone(&gate))),
    )
    .await;
    let nodes = ["a", "b", "c"];
    let first = c.start("b", 0, &nodes);
    // Wait until a holds the first round (its sync is gated).
    let holding = async {
        let key = ShardKey {
            group: "g".into(),
            shard: 0,
        };
        while c.drivers["a"].running(&key).is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), holding)
        .await
        .expect("a holds the round");
    let second = c.start("c", 0, &nodes);
    let refused = c.wait("c", &second).await;
    assert_eq!(refused.outcome, Outcome::Refused);
    assert!(refused.error.as_deref().unwrap_or("").contains(&first.0));
    // Another shard is not blocked by a's slow sync.
    let other = c.start("c", 1, &["b", "c"]);
    assert_eq!(c.wait("c", &other).await.outcome, Outcome::Completed);
    assert_eq!(
        c.drivers["a"].running(&ShardKey {
            group: "g".into(),
            shard: 0
        }),
        Some(first.clone())
    );
    // Open the gate for a's sync (a syncs once in this round: a -> b; the chain then runs
    // b -> c and c -> a from the other nodes); retry in case the gate was opened too early,
    // for at most 20 s.
    gate.notify_one();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let done = loop {
        match c.drivers["b"].wait(&first, Duration::from_millis(50)).await {
            Ok(result) => break result,
            Err(WaitError::TimedOut { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the first round never ended"
                );
                gate.notify_one();
            }
            Err(other) => panic!("unexpected wait error {other}"),
        }
    };
    assert_eq!(done.outcome, Outcome::Completed);
    for node in nodes {
        assert_eq!(c.version(node), 3);
    }
}

#[tokio::test]
async fn a_sync_error_reaches_the_origin_over_tonic() {
    let c = cluster(&[("a", 1), ("b", 2), ("c", 3)], &[], None).await;
    c.world
        .lock()
        .expect("lock")
        .failing
        .insert(("b".into(), "c".into()));
    let id = c.start("a", 0, &["a", "b", "c"]);
    let result = c.wait("a", &id).await;
    assert_eq!(result.outcome, Outcome::Aborted);
    assert_eq!(result.reported_by, "b");
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("tree unreadable")
    );
}

#[tokio::test]
async fn waiting_for_an_unknown_round_is_an_error() {
    let c = cluster(&[("a", 1), ("b", 1)], &[], None).await;
    let err = c.drivers["a"]
        .wait(&MessageId("nope".into()), Duration::from_secs(1))
        .await;
    assert_eq!(
        err.unwrap_err(),
        WaitError::Unknown {
            message_id: MessageId("nope".into())
        }
    );
}

/// A driver for node `a` alone (no sockets) that has started a round of shard g/0 over
/// `[a, b]`: its one sync, a -> b, runs through `sync`.
fn lone_round<S: SyncWork>(sync: S) -> (GossipDriver<S>, MessageId) {
    let driver = GossipDriver::new(
        "a".into(),
        MemberChannels::new(HashMap::new(), Duration::from_secs(2)),
        sync,
        DriverConfig::default(),
    );
    let request = StartRequest {
        key: ShardKey {
            group: "g".into(),
            shard: 0,
        },
        nodes: vec!["a".into(), "b".into()],
        preview: false,
    };
    let id = driver.start(request).expect("valid");
    (driver, id)
}

/// A sync that never ends.
struct Stuck;

impl SyncWork for Stuck {
    async fn sync(&self, _request: SyncRequest, _progress: SyncProgress) -> SyncOutcome {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_sync_times_out_in_the_driver_on_paused_time() {
    // The origin is nodes[0], so no socket is needed: the sync hangs, tokio's paused clock
    // runs the ticker forward, and the sync timeout (10 min) ends the round.
    let (driver, id) = lone_round(Stuck);
    let early = driver.wait(&id, Duration::from_secs(9 * 60)).await;
    assert!(matches!(early, Err(WaitError::TimedOut { .. })));
    let result = driver
        .wait(&id, Duration::from_secs(2 * 60))
        .await
        .expect("a result");
    assert_eq!(result.outcome, Outcome::TimedOut);
    assert!(
        result
            .error
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 600 s")
    );
    assert!(
        driver
            .running(&ShardKey {
                group: "g".into(),
                shard: 0
            })
            .is_none()
    );
}

/// A sync that moves a message every minute for a quarter of an hour, then ends.
struct LongRestore;

impl SyncWork for LongRestore {
    async fn sync(&self, _request: SyncRequest, progress: SyncProgress) -> SyncOutcome {
        for _ in 0..15 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            progress.moved();
        }
        Ok(SyncReport {
            received: 1,
            applied: 1,
            ..SyncReport::default()
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_sync_that_keeps_moving_outlasts_the_sync_timeout_in_the_driver() {
    // 15 minutes against the 10-minute sync timeout: the progress it tells keeps it running,
    // and the round completes.
    let (driver, id) = lone_round(LongRestore);
    let result = driver
        .wait(&id, Duration::from_secs(20 * 60))
        .await
        .expect("a result");
    assert_eq!(result.outcome, Outcome::Completed, "{result:?}");
    let [span] = result.trace.as_slice() else {
        panic!("one sync: {result:?}");
    };
    assert!(
        span.duration >= Duration::from_secs(15 * 60),
        "the sync ran past the timeout: {span:?}"
    );
}

#[tokio::test]
async fn five_nodes_two_down_converge_from_every_live_origin_over_tonic() {
    let c = cluster(&[("n0", 0), ("n2", 0), ("n4", 0)], &["n1", "n3"], None).await;
    let nodes = ["n0", "n1", "n2", "n3", "n4"];
    let live = ["n0", "n2", "n4"];
    for (round, origin) in live.into_iter().enumerate() {
        // Fresh divergence, the newest copy on a different node each round.
        let top = 10 * (round as u64 + 1);
        for (i, node) in live.iter().enumerate() {
            let version = if i == round { top } else { top - 1 - i as u64 };
            c.world
                .lock()
                .expect("lock")
                .versions
                .insert((*node).to_owned(), version);
        }
        let id = c.start(origin, round as u32, &nodes);
        let result = c.wait(origin, &id).await;
        assert_eq!(result.outcome, Outcome::Completed, "{:?}", result.error);
        assert_eq!(result.context.count, 7);
        assert!(result.syncs() <= 7);
        assert!(
            result
                .trace
                .iter()
                .filter(|s| s.kind == SpanKind::Skip)
                .all(|s| s.to == "n1" || s.to == "n3")
        );
        for node in live {
            assert_eq!(c.version(node), top, "origin {origin}");
        }
    }
}

/// Every event of a round's watch, to its end.
async fn watch_all(cluster: &Cluster, origin: &str, id: &MessageId) -> Vec<RoundEvent> {
    let mut watch = cluster.drivers[origin]
        .watch(id)
        .expect("a round started here");
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("an event in time")
    {
        events.push(event);
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_yields_one_event_per_step_over_tonic_and_ends_with_the_result() {
    let cluster = cluster(&[("a", 1), ("b", 2), ("d", 4)], &["c"], None).await;
    let id = cluster.start("d", 0, &["a", "b", "c", "d"]);
    let events = watch_all(&cluster, "d", &id).await;
    let Some((RoundEvent::Finished(result), steps)) = events.split_last() else {
        panic!("the watch ends with the result: {events:?}");
    };
    assert_eq!(result.outcome, Outcome::Completed, "{result:?}");
    assert_eq!(steps.len(), result.trace.len(), "{events:?}");
    for (index, (event, span)) in steps.iter().zip(&result.trace).enumerate() {
        let RoundEvent::Step(step) = event else {
            panic!("only steps before the result: {event:?}");
        };
        assert_eq!(step.index as usize, index);
        assert_eq!(&step.span, span);
        assert_eq!(step.max_count, 5);
    }
    assert!(
        result.trace.iter().any(|s| s.kind == SpanKind::Skip),
        "c was skipped: {result:?}"
    );
    // A watch that starts after the end gets the same events at once.
    assert_eq!(watch_all(&cluster, "d", &id).await, events);
    assert!(matches!(
        cluster.drivers["a"].watch(&id),
        Err(WaitError::Unknown { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_yields_only_its_own_round_while_another_runs_beside_it() {
    let cluster = cluster(&[("a", 1), ("b", 2), ("c", 3), ("d", 4)], &[], None).await;
    let nodes = ["a", "b", "c", "d"];
    let first = cluster.start("d", 0, &nodes);
    let second = cluster.start("d", 1, &nodes);
    let (first_events, second_events) = tokio::join!(
        watch_all(&cluster, "d", &first),
        watch_all(&cluster, "d", &second)
    );
    for (id, events) in [(&first, first_events), (&second, second_events)] {
        let Some((RoundEvent::Finished(result), steps)) = events.split_last() else {
            panic!("the watch of {id:?} ends with a result: {events:?}");
        };
        assert_eq!(&result.context.message_id, id, "its own result");
        assert_eq!(steps.len(), result.trace.len(), "{events:?}");
        for (index, event) in steps.iter().enumerate() {
            let RoundEvent::Step(step) = event else {
                panic!("only steps before the result: {event:?}");
            };
            assert_eq!(&step.message_id, id, "a step of another round: {step:?}");
            assert_eq!(step.index as usize, index, "each step once, in order");
        }
    }
}
