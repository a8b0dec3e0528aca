//! A real sync over tonic on 127.0.0.1 between two redb stores.

use std::sync::Arc;
use std::time::Duration;

use propd_merkle::Shape;
use propd_repair::transport::{RepairServer, TransportConfig, sync};
use propd_repair::{Disposition, SyncError};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};

use crate::support::*;

async fn serve(store: Arc<propd_store::RedbStore>, config: TransportConfig) -> Channel {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = RepairServer::new(store, config).into_service();
    tokio::spawn(async move {
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("server");
    });
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
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
async fn a_refusal_crosses_the_wire_as_a_typed_error() {
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
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_hits_the_sync_timeout() {
    use propd_proto::v1::repair_service_server::{RepairService, RepairServiceServer};
    // A server that accepts the stream and never answers.
    struct Silent;
    #[tonic::async_trait]
    impl RepairService for Silent {
        type RepairStream = propd_repair::transport::ResponseStream;
        async fn repair(
            &self,
            _request: tonic::Request<tonic::Streaming<propd_proto::v1::RepairRequest>>,
        ) -> Result<tonic::Response<Self::RepairStream>, tonic::Status> {
            Ok(tonic::Response::new(Box::pin(tokio_stream::pending())))
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .add_service(RepairServiceServer::new(Silent))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let dir = tempfile::tempdir().expect("dir");
    let a = redb(&dir, Shape::default(), 1);
    put(&a, 0, vec![prop("x", 1, "v", 0)]);
    let config = TransportConfig {
        timeout: Duration::from_secs(5),
        ..TransportConfig::default()
    };
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("times out");
    assert!(
        matches!(err, SyncError::Timeout { millis: 5000 }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_refuses_a_message_as_malformed_aborts_the_round() {
    use propd_proto::v1::repair_service_server::{RepairService, RepairServiceServer};
    // A server that reads the opening message and answers as the real one answers a
    // protocol violation: an INVALID_ARGUMENT status at the end of the response stream.
    struct Refusing;
    #[tonic::async_trait]
    impl RepairService for Refusing {
        type RepairStream = propd_repair::transport::ResponseStream;
        async fn repair(
            &self,
            request: tonic::Request<tonic::Streaming<propd_proto::v1::RepairRequest>>,
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
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        Server::builder()
            .add_service(RepairServiceServer::new(Refusing))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    let dir = tempfile::tempdir().expect("dir");
    let a = redb(&dir, Shape::default(), 1);
    put(&a, 0, vec![prop("x", 1, "v", 0)]);
    let config = TransportConfig {
        timeout: Duration::from_secs(30),
        ..TransportConfig::default()
    };
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            &err,
            SyncError::PeerRefused { code: tonic::Code::InvalidArgument, message }
                if message.contains("TreeRoot.root")
        ),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Abort);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_fails_to_start_the_sync_aborts_the_round_with_its_status() {
    // The real server, misconfigured: it cannot build its state machine and answers INTERNAL.
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = redb(&dir_a, Shape::default(), 1);
    let b = Arc::new(redb(&dir_b, Shape::default(), 1));
    put(&a, 0, vec![prop("x", 1, "v", 0)]);
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
    assert!(
        matches!(
            &err,
            SyncError::PeerRefused { code: tonic::Code::Internal, message }
                if message.contains("page_items")
        ),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::Abort);
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
    let a = redb(&dir, Shape::default(), 1);
    put(&a, 0, vec![prop("x", 1, "v", 0)]);
    let config = TransportConfig {
        timeout: Duration::from_secs(30),
        ..TransportConfig::default()
    };
    let err = sync(channel, &a, GROUP, 0, &config)
        .await
        .expect_err("nobody listens");
    assert!(matches!(err, SyncError::Transport { .. }), "{err:?}");
    assert_eq!(err.disposition(), Disposition::Skip);
    drop(socket);
}
