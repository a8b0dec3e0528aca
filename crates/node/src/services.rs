//! The standard gRPC services beside propd's own: health checking (`grpc.health.v1.Health`,
//! with a serving state per service, `NOT_SERVING` once shutdown begins) and server reflection
//! (v1 and v1alpha), so that `grpcurl` and Kubernetes gRPC probes work without proto files.

use propd_proto::v1::{
    admin_service_server, gossip_service_server, property_service_server, repair_service_server,
};
use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};

/// propd's own services, whose serving state the health service reports.
pub(crate) const PROPD_SERVICES: [&str; 4] = [
    property_service_server::SERVICE_NAME,
    gossip_service_server::SERVICE_NAME,
    repair_service_server::SERVICE_NAME,
    admin_service_server::SERVICE_NAME,
];

/// Sets the serving state the health service reports.
#[derive(Clone, Debug)]
pub(crate) struct Serving {
    reporter: HealthReporter,
}

impl Serving {
    /// Reports `status` for the server as a whole (`""`) and each of propd's services.
    pub(crate) async fn set(&self, status: ServingStatus) {
        for service in std::iter::once("").chain(PROPD_SERVICES) {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// The health service, and the handle that sets what it reports (every service `SERVING`).
pub(crate) async fn health() -> (
    Serving,
    tonic_health::pb::health_server::HealthServer<HealthService>,
) {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    let serving = Serving { reporter };
    serving.set(ServingStatus::Serving).await;
    (
        serving,
        tonic_health::pb::health_server::HealthServer::new(service),
    )
}

/// Server reflection (v1 and v1alpha) over propd's services and the health service.
pub(crate) fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(propd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// How many streams a client may reset before this server accepted them, per connection, before
/// the server closes the connection (h2's guard against rapid-reset floods; its default is 20).
///
/// A member that stops (SIGSTOP, a long pause) accepts nothing meanwhile, and its peers' calls
/// to it time out and reset their streams: a dozen seconds of probes, gets and hand-offs are more
/// than 20. When it runs again it reads those resets all at once and, at h2's default, answered
/// with GOAWAY `ENHANCE_YOUR_CALM`, which failed every call still running on the connection —
/// an in-flight sync included — with `RESOURCE_EXHAUSTED`, a code that reads as the peer's
/// refusal (the round was aborted) rather than as a lost connection.
pub(crate) const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 4096;

/// The gRPC server every node runs, before its services: `TCP_NODELAY` is set on the accepted
/// sockets by the caller's incoming stream; here HTTP/2 keepalive pings (a client that stopped
/// answering is found within seconds) and the reset-stream bound above.
pub(crate) fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(propd_gossip::transport::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(propd_gossip::transport::KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;
    use tonic::{Request, Status};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::Health as _;

    use super::*;

    async fn check(service: &HealthService, name: &str) -> i32 {
        service
            .check(Request::new(HealthCheckRequest {
                service: name.to_owned(),
            }))
            .await
            .expect("a known service")
            .into_inner()
            .status
    }

    #[tokio::test]
    async fn every_service_serves_until_shutdown_turns_them_all_to_not_serving() {
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        let serving = Serving { reporter };
        serving.set(ServingStatus::Serving).await;
        for name in std::iter::once("").chain(PROPD_SERVICES) {
            assert_eq!(check(&service, name).await, 1, "{name:?} SERVING");
        }
        serving.set(ServingStatus::NotServing).await;
        for name in std::iter::once("").chain(PROPD_SERVICES) {
            assert_eq!(check(&service, name).await, 2, "{name:?} NOT_SERVING");
        }
    }

    /// Reads bytes from `from` and writes them to `to`, holding them while `held` says so.
    async fn forward(
        from: tokio::net::tcp::OwnedReadHalf,
        to: tokio::net::tcp::OwnedWriteHalf,
        mut held: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            from.readable().await?;
            let n = match from.try_read(&mut buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            };
            if held.wait_for(|held| !held).await.is_err() {
                return Ok(());
            }
            let mut sent = 0;
            while sent < n {
                to.writable().await?;
                match to.try_write(&buffer[sent..n]) {
                    Ok(written) => sent += written,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }

    /// A TCP relay to `server` that can hold what clients send, as a stopped server process
    /// does (the bytes wait until it reads again); `true` on the sender holds.
    async fn relay(server: std::net::SocketAddr) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, held) = watch::channel(false);
        let (open, never) = watch::channel(false);
        tokio::spawn(async move {
            let _open = open;
            while let Ok((client, _)) = listener.accept().await {
                let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = upstream.into_split();
                tokio::spawn(forward(server_read, client_write, never.clone()));
                tokio::spawn(forward(client_read, server_write, held.clone()));
            }
        });
        (addr, hold)
    }

    /// Many calls reset while the server was not reading (a SIGSTOPped member), then read all at
    /// once: the server must not close the connection, and a stream in flight on it (a sync in
    /// a round) must go on.
    async fn in_flight_stream_after_a_pause(
        mut server: tonic::transport::Server,
    ) -> Result<(), Status> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reporter = HealthReporter::new();
        let service = HealthService::from_health_reporter(reporter.clone());
        reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        tokio::spawn(
            server
                .add_service(tonic_health::pb::health_server::HealthServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let (relayed, hold) = relay(addr).await;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{relayed}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let mut watch = client
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(watch.message().await?.map(|m| m.status), Some(1));

        hold.send(true).unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..(3 * 20) {
            let mut client = client.clone();
            calls.spawn(async move {
                let call = client.check(HealthCheckRequest {
                    service: String::new(),
                });
                // The caller gives up, as a probe or a coordinated read of a stopped member
                // does: its stream is reset.
                tokio::time::timeout(std::time::Duration::from_millis(200), call)
                    .await
                    .is_err()
            });
        }
        while let Some(gave_up) = calls.join_next().await {
            assert!(gave_up.unwrap(), "no call can be answered while held");
        }
        hold.send(false).unwrap();

        // The stream in flight sees the next change, and the connection takes new calls.
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        assert_eq!(watch.message().await?.map(|m| m.status), Some(2));
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        Ok(())
    }

    /// How many times each side of the test runs: whether the client's resets reach the server
    /// in one burst depends on when its connection task writes them, so h2's default does not
    /// fail every time; it fails in most runs, and the node's server must pass in every run.
    const PAUSE_RUNS: usize = 10;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resets_read_after_a_pause_close_nothing() {
        let mut reproduced = false;
        for _ in 0..PAUSE_RUNS {
            let at_h2_default =
                in_flight_stream_after_a_pause(tonic::transport::Server::builder()).await;
            if at_h2_default.err().map(|status| status.code())
                == Some(tonic::Code::ResourceExhausted)
            {
                reproduced = true;
                break;
            }
        }
        assert!(
            reproduced,
            "h2's default closes the connection (the bug this guards against) in none of \
             {PAUSE_RUNS} runs: the test no longer reproduces it"
        );
        for _ in 0..PAUSE_RUNS {
            in_flight_stream_after_a_pause(grpc_server())
                .await
                .unwrap_or_else(|status| panic!("a node's server: {status}"));
        }
    }
}
