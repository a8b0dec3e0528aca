//! A real sync over tonic on 127.0.0.1 between two redb stores.

use std::sync::Arc;
use std::time::Duration;

use propd_merkle::Shape;
use propd_proto::v1 as pb;
use propd_proto::v1::repair_service_server::{RepairService, RepairServiceServer};
use propd_repair::transport::{RepairServer, ResponseStream, TransportConfig, sync};
use propd_repair::{Disposition, SyncError};
use propd_store::RepairStore;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};

use crate::support::*;

/// Serves `service` on a fresh loopback port and returns its URI.
async fn spawn_server<T: RepairService>(service: RepairServiceServer<T>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("server");
    });
    format!("http://{addr}")
}

/// A channel to the real repair server over `store`, connected.
async fn serve<S: RepairStore + 'static>(store: Arc<S>, config: TransportConfig) -> Channel {
    let uri = spawn_server(RepairServer::new(store, config).into_service()).await;
    Channel::from_shared(uri)
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A channel to a stub `service`, connected on first use.
async fn serve_stub<T: RepairService>(service: T) -> Channel {
    let uri = spawn_server(RepairServiceServer::new(service)).await;
    Channel::from_shared(uri).expect("uri").connect_lazy()
}

/// A raw opening `TreeRoot` for shard 0 of a one-leaf tree of the default shape (its root all
/// zeros), as a client would send it but for the fields given.
fn opening(wire_digest_width: u32, protocol_version: u32) -> pb::RepairRequest {
    let shape = Shape::default();
    pb::RepairRequest {
        msg: Some(pb::repair_request::Msg::TreeRoot(pb::TreeRoot {
            group: GROUP.to_owned(),
            shard: 0,
            shape: Some(propd_repair::shape_to_proto(&shape)),
            root: vec![0; shape.digest_width as usize],
            leaf_count: 1,
            preview: false,
            wire_digest_width,
            protocol_version,
            slots: Vec::new(),
        })),
    }
}

/// A client store holding one property in shard 0, so that its sync has something to send.
fn one_property_store(dir: &tempfile::TempDir) -> propd_store::RedbStore {
    let store = redb(dir, Shape::default(), 1);
    put(&store, 0, vec![prop("x", 1, "v", 0)]);
    store
}

/// Asserts that `err` is the peer's refusal with `code` and a message holding `needle`, and
/// that it aborts the round.
fn assert_refused(err: &SyncError, code: tonic::Code, needle: &str) {
    assert!(
        matches!(err, SyncError::PeerRefused { code: found, message }
            if *found == code && message.contains(needle)),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Abort);
}

fn with_timeout(idle_timeout: Duration) -> TransportConfig {
    TransportConfig {
        idle_timeout,
        ..TransportConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_redb_stores_converge_over_loopback_tonic() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let shape = Shape::default();
    let a = redb(&dir_a, shape, 1);
    let b = Arc::new(redb(&dir_b, shape, 1));
    put(
        &a,
        0,
        (0..300)
            .map(|i| prop(&format!("k{i}"), 1 + i % 3, "a", 0))
            .collect(),
    );
    put(
        &*b,
        0,
        (150..500)
            .map(|i| prop(&format!("k{i}"), 2, "b", if i % 11 == 0 { 7 } else { 0 }))
            .collect(),
    );
    let expected = merged(&contents(&a, 0), &contents(&*b, 0), &shape);
    let config = TransportConfig {
        sync: propd_repair::Config {
            page_items: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    let channel = serve(Arc::clone(&b), config.clone()).await;

    let report = sync(channel.clone(), &a, GROUP, 0, &config)
        .await
        .expect("sync");
    assert_eq!(contents(&a, 0), expected);
    assert_eq!(contents(&*b, 0), expected);
    assert_eq!(root(&a, 0), root(&*b, 0));
    assert!(
        report.sent > 0 && report.received > 0 && report.peer_applied > 0,
        "{report:?}"
    );

    let again = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect("second sync");
    assert!(again.in_sync);
    assert!(again.bytes_sent + again.bytes_received < 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_servers_refusal_crosses_the_wire_and_changes_nothing() {
    // Our client checks its own configuration, so it never sends what the server refuses; a
    // raw stream does: a wire digest width wider than the server's digests.
    let dir = tempfile::tempdir().expect("dir");
    let b = Arc::new(one_property_store(&dir));
    let before = contents(&*b, 0);
    let channel = serve(Arc::clone(&b), TransportConfig::default()).await;
    let shape = Shape::default();
    let opening = opening(shape.digest_width + 1, propd_repair::PROTOCOL_VERSION);
    let mut answers = pb::repair_service_client::RepairServiceClient::new(channel)
        .repair(tokio_stream::iter(vec![opening]))
        .await
        .expect("the server takes the stream")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("an answer")
        .expect("the root compare");
    let Some(pb::repair_response::Msg::RootCompare(compare)) = answer.msg else {
        panic!("expected a root compare, got {answer:?}");
    };
    assert!(compare.tree_found && compare.shape_ok, "{compare:?}");
    assert!(
        compare.error.contains("wire_digest_width"),
        "the refusal names the field: {compare:?}"
    );
    assert_eq!(contents(&*b, 0), before, "the refused sync changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tree_on_the_peer_crosses_the_wire_as_a_typed_error_and_is_skipped() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = redb(&dir_a, Shape::default(), 4);
    let b = Arc::new(redb(&dir_b, Shape::default(), 2));
    let config = TransportConfig::default();
    let channel = serve(b, config.clone()).await;
    let err = sync(channel, &a, GROUP, 3, &config)
        .await
        .expect_err("server lacks shard 3");
    assert!(
        matches!(err, SyncError::TreeNotFound { shard: 3, .. }),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Skip);
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_hits_the_sync_timeout() {
    // A server that accepts the stream and never answers.
    struct Silent;
    #[tonic::async_trait]
    impl RepairService for Silent {
        type RepairStream = ResponseStream;
        async fn repair(
            &self,
            _request: tonic::Request<tonic::Streaming<pb::RepairRequest>>,
        ) -> Result<tonic::Response<Self::RepairStream>, tonic::Status> {
            Ok(tonic::Response::new(Box::pin(tokio_stream::pending())))
        }
    }
    let channel = serve_stub(Silent).await;
    let dir = tempfile::tempdir().expect("dir");
    let a = one_property_store(&dir);
    let err = sync(channel, &a, GROUP, 0, &with_timeout(Duration::from_secs(5)))
        .await
        .expect_err("times out");
    assert!(
        matches!(err, SyncError::Timeout { millis: 5000 }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_a_message_as_malformed_aborts_the_round() {
    // A server that reads the opening message and answers as the real one answers a
    // protocol violation: an INVALID_ARGUMENT status at the end of the response stream.
    struct Refusing;
    #[tonic::async_trait]
    impl RepairService for Refusing {
        type RepairStream = ResponseStream;
        async fn repair(
            &self,
            request: tonic::Request<tonic::Streaming<pb::RepairRequest>>,
        ) -> Result<tonic::Response<Self::RepairStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let first = inbound.message().await?;
            assert!(first.is_some(), "the client opens with TreeRoot");
            let refusal = tonic::Status::invalid_argument("malformed `TreeRoot.root`: too short");
            Ok(tonic::Response::new(Box::pin(tokio_stream::once(Err(
                refusal,
            )))))
        }
    }
    let channel = serve_stub(Refusing).await;
    let dir = tempfile::tempdir().expect("dir");
    let a = one_property_store(&dir);
    let config = with_timeout(Duration::from_secs(30));
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("refused");
    assert_refused(&err, tonic::Code::InvalidArgument, "TreeRoot.root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_fails_to_start_the_sync_aborts_the_round_with_its_status() {
    // The real server, misconfigured: it cannot build its state machine and answers INTERNAL.
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = one_property_store(&dir_a);
    let b = Arc::new(redb(&dir_b, Shape::default(), 1));
    let broken = TransportConfig {
        sync: propd_repair::Config {
            page_items: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let channel = serve(b, broken).await;
    let err = sync(channel, &a, GROUP, 0, &TransportConfig::default())
        .await
        .expect_err("the server cannot sync");
    assert_refused(&err, tonic::Code::Internal, "page_items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_down_is_skipped() {
    // A socket bound to a port but not listening: the port stays ours for the whole test, and
    // every connection to it is refused.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let dir = tempfile::tempdir().expect("dir");
    let a = one_property_store(&dir);
    let config = with_timeout(Duration::from_secs(30));
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("nobody listens");
    assert!(matches!(err, SyncError::Transport { .. }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Skip);
    drop(socket);
}

/// A gate a stalled store read waits at until the test opens it.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().expect("lock");
        while !*open {
            open = self.opened.wait(open).expect("lock");
        }
    }

    /// Lets a stalled read go on (so that the blocking pool's thread ends with the test).
    fn open(&self) {
        *self.open.lock().expect("lock") = true;
        self.opened.notify_all();
    }
}

/// A full server store of `n` properties whose bulk stream reads each page in 50 ms, and from
/// page `stall_after` on waits at `gate` first.
fn slow_source(
    dir: &tempfile::TempDir,
    n: usize,
    stall_after: Option<u64>,
    gate: Arc<Gate>,
) -> Arc<Watched<propd_store::RedbStore>> {
    let store = redb(dir, Shape::default(), 1);
    put(
        &store,
        0,
        (0..n)
            .map(|i| prop(&format!("k{i:04}"), 1, "v", 0))
            .collect(),
    );
    Arc::new(Watched::with_page_hook(store, move |page| {
        if stall_after.is_some_and(|stall| page >= stall) {
            gate.wait();
        }
        std::thread::sleep(Duration::from_millis(50));
    }))
}

/// Pages of two properties, sent one message at a time and applied as they come, so that every
/// page moves a message and lands in the store.
fn small_steps(idle_timeout: Duration) -> TransportConfig {
    TransportConfig {
        sync: propd_repair::Config {
            page_items: 2,
            apply_batch: 2,
            ..Default::default()
        },
        idle_timeout,
        buffer: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_keeps_moving_runs_past_its_idle_timeout() {
    // 40 pages of the bulk stream, each read in 50 ms: the sync takes at least 2 s, twice its
    // idle timeout, while no gap between two messages comes near the timeout.
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let source = slow_source(&dir_b, 80, None, Arc::default());
    let config = small_steps(Duration::from_secs(1));
    let channel = serve(Arc::clone(&source), config.clone()).await;
    let empty = redb(&dir_a, Shape::default(), 1);
    let started = std::time::Instant::now();
    let moved = std::sync::atomic::AtomicU64::new(0);
    let report =
        propd_repair::transport::sync_with_progress(channel, &empty, GROUP, 0, &config, &|| {
            moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .expect("a sync that keeps moving is not cut");
    let elapsed = started.elapsed();
    assert!(
        source.pages_read() >= 40,
        "{} pages read",
        source.pages_read()
    );
    assert!(
        elapsed > config.idle_timeout,
        "the sync ran {elapsed:?}, so the test shows nothing about a {:?} timeout",
        config.idle_timeout
    );
    assert_eq!(report.applied, 80, "{report:?}");
    assert_eq!(root(&empty, 0), root(&source.inner, 0));
    assert!(
        moved.load(std::sync::atomic::Ordering::Relaxed) >= 40,
        "progress is told for every message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_stalls_after_moving_hits_its_idle_timeout() {
    // The server streams five pages, then its store stops answering.
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let gate = Arc::new(Gate::default());
    let source = slow_source(&dir_b, 80, Some(5), Arc::clone(&gate));
    // The server waits longer than the client, so that the client's own timeout is what ends
    // the sync (the server's is the next test's).
    let channel = serve(Arc::clone(&source), small_steps(Duration::from_secs(30))).await;
    let config = small_steps(Duration::from_millis(500));
    let empty = redb(&dir_a, Shape::default(), 1);
    let err = sync(channel, &empty, GROUP, 0, &config)
        .await
        .expect_err("a stalled sync times out");
    gate.open();
    assert!(matches!(err, SyncError::Timeout { millis: 500 }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Skip);
    let kept = contents(&empty, 0).len();
    assert!(
        (1..80).contains(&kept),
        "the pages applied before the stall stay applied: {kept}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_ends_a_stream_whose_client_goes_silent() {
    // A client that opens the stream as an empty replica, reads the answer and then neither
    // sends nor closes: the server gives up after its idle timeout and says so.
    let dir = tempfile::tempdir().expect("dir");
    let b = Arc::new(one_property_store(&dir));
    let config = with_timeout(Duration::from_millis(500));
    let channel = serve(Arc::clone(&b), config).await;
    let opening = opening(8, 2);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(opening).await.expect("queued");
    let mut answers = pb::repair_service_client::RepairServiceClient::new(channel)
        .repair(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the server takes the stream")
        .into_inner();
    let status = loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    drop(tx);
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("no progress for 500 ms"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_admission_serves_the_shards_it_admits_and_refuses_the_others() {
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = redb(&dir_a, Shape::default(), 2);
    let b = Arc::new(redb(&dir_b, Shape::default(), 2));
    for shard in [0, 1] {
        let ids: Vec<String> = (0..)
            .map(|i| format!("k{i}"))
            .filter(|id| shard_of_id(id, 2) == shard)
            .take(5)
            .collect();
        put(
            &*b,
            shard,
            ids.iter().map(|id| prop(id, 1, "b", 0)).collect(),
        );
    }
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&asked);
    let admission: propd_repair::transport::Admission = Arc::new(move |group, shard| {
        seen.lock().expect("lock").push((group.to_owned(), shard));
        if shard == 0 {
            Ok(())
        } else {
            Err(tonic::Status::failed_precondition(format!(
                "this node holds no copy of {group}/{shard}"
            )))
        }
    });
    let config = TransportConfig::default();
    let uri = spawn_server(
        RepairServer::new(Arc::clone(&b), config.clone())
            .with_admission(admission)
            .into_service(),
    )
    .await;
    let channel = Channel::from_shared(uri)
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let report = sync(channel.clone(), &a, GROUP, 0, &config)
        .await
        .expect("shard 0 is admitted");
    assert_eq!(report.received, 5);
    assert_eq!(contents(&a, 0), contents(&*b, 0));
    let err = sync(channel, &a, GROUP, 1, &config)
        .await
        .expect_err("shard 1 is refused");
    assert_refused(&err, tonic::Code::FailedPrecondition, "no copy of g/1");
    assert!(
        contents(&a, 1).is_empty(),
        "nothing of the refused shard came"
    );
    assert_eq!(
        *asked.lock().expect("lock"),
        [(GROUP.to_owned(), 0), (GROUP.to_owned(), 1)]
    );
}

/// The real server ends a failed sync with a status its peer can act on: a protocol violation
/// is INVALID_ARGUMENT, its own store's failure INTERNAL; both abort the peer's round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_ends_a_failed_sync_with_the_status_of_its_cause() {
    // A message with no body after a valid opening: a protocol violation.
    let dir = tempfile::tempdir().expect("dir");
    let b = Arc::new(one_property_store(&dir));
    let channel = serve(Arc::clone(&b), TransportConfig::default()).await;
    let mut answers = pb::repair_service_client::RepairServiceClient::new(channel)
        .repair(tokio_stream::iter(vec![
            opening(0, propd_repair::PROTOCOL_VERSION),
            pb::RepairRequest { msg: None },
        ]))
        .await
        .expect("the server takes the stream")
        .into_inner();
    let status = loop {
        match answers.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A server whose store cannot read its tree.
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = one_property_store(&dir_a);
    let broken = Arc::new(Watched::tree_unreadable(redb(&dir_b, Shape::default(), 1)));
    let config = with_timeout(Duration::from_secs(30));
    let channel = serve(broken, config.clone()).await;
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("the server's store fails");
    assert_refused(&err, tonic::Code::Internal, "reading the root");
}
