//! The gossip's unit of work implemented with the repair client: one pairwise sync of a
//! (group, shard) with the successor, and the repair server other nodes sync against.
//!
//! Failures are sorted the way the propagation rules need (DESIGN §6) by the repair crate's one
//! rule, [`propd_repair::SyncError::disposition`]: a successor that cannot be reached or whose stream breaks
//! is skipped; a refusal by the peer, a local failure or a protocol or shape error aborts the
//! round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use propd_gossip::transport::GossipDriver;
use propd_gossip::{SyncFailure, SyncOutcome, SyncProgress, SyncReport, SyncRequest, SyncWork};
use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::v1::repair_service_server::RepairServiceServer;
use propd_repair::Disposition;
use propd_repair::transport::{RepairServer, TransportConfig};
use tokio::sync::Mutex;
use tonic::Status;

use crate::node::NodeState;
use crate::peer_copies::PeerChecked;
use crate::streams::{LimitedRepair, StreamLimits};

/// This node's gossip driver.
pub(crate) type Gossip = GossipDriver<RepairSync>;

/// Runs syncs for the gossip with the repair client, paced by the repair throttle.
#[derive(Debug)]
pub(crate) struct RepairSync {
    node: Arc<NodeState>,
    /// The earliest time the next sync may start under the throttle.
    next_start: Mutex<Instant>,
}

impl RepairSync {
    /// Syncs over a node's store and peers.
    pub(crate) fn new(node: Arc<NodeState>) -> Self {
        Self {
            node,
            next_start: Mutex::new(Instant::now()),
        }
    }

    fn transport_config(&self, preview: bool) -> TransportConfig {
        let mut config = TransportConfig {
            idle_timeout: self.node.config.repair.sync_timeout,
            ..TransportConfig::default()
        };
        config.sync.preview = preview;
        config
    }

    /// Waits for the throttle; after the sync, `bytes` moved push the next start back so that
    /// repair traffic averages at most the configured bytes per second.
    async fn pace_before(&self) {
        let next = *self.next_start.lock().await;
        tokio::time::sleep_until(next.into()).await;
    }

    async fn pace_after(&self, bytes: u64) {
        let limit = self.node.throttle.load(Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let pause = Duration::from_secs_f64(bytes as f64 / limit as f64);
        let mut next = self.next_start.lock().await;
        *next = (*next).max(Instant::now()) + pause;
    }
}

impl SyncWork for RepairSync {
    async fn sync(&self, request: SyncRequest, progress: SyncProgress) -> SyncOutcome {
        let node = &self.node;
        let Some(channel) = node.peers.channel(&request.peer) else {
            return Err(SyncFailure::Unreachable {
                error: format!("{} is not a known member", request.peer),
            });
        };
        if node.peers.is_hung(&request.peer) && !node.peers.answers(&request.peer).await {
            // Its last probe timed out and it does not answer a ping now: skip it at once
            // rather than wait out the sync timeout on a member that does not answer.
            return Err(SyncFailure::Unreachable {
                error: format!("{} is down (it does not answer a ping)", request.peer),
            });
        }
        self.pace_before().await;
        let config = self.transport_config(request.preview);
        let group = request.key.group.clone();
        let shard = request.key.shard;
        let started = Instant::now();
        let store = PeerChecked::new(Arc::clone(&node.store), node.config.max_clock_skew);
        // Each message of the sync holds off the gossip's sync timeout, as it holds off the
        // transport's idle timeout: a restore that keeps moving is not cut.
        let result = propd_repair::transport::sync_with_progress(
            channel,
            &store,
            &group,
            shard,
            &config,
            &|| progress.moved(),
        )
        .await;
        let metrics = &node.metrics;
        let labels = metrics.labels(&group, shard);
        metrics.syncs.inc(&labels);
        metrics
            .sync_duration
            .observe(&labels, started.elapsed().as_secs_f64());
        match result {
            Ok(report) => {
                metrics.properties_compared.add(&labels, report.compared);
                metrics.properties_sent.add(&labels, report.sent);
                metrics.properties_received.add(&labels, report.received);
                metrics.properties_applied.add(&labels, report.applied);
                metrics.properties_failed.add(&labels, report.failed);
                metrics.repair_bytes_sent.add(&labels, report.bytes_sent);
                metrics
                    .repair_bytes_received
                    .add(&labels, report.bytes_received);
                metrics
                    .sync_bytes
                    .observe(&labels, (report.bytes_sent + report.bytes_received) as f64);
                self.pace_after(report.bytes_sent + report.bytes_received)
                    .await;
                node.peers.set_up(&request.peer, true);
                tracing::debug!(
                    message_id = %request.message_id,
                    group,
                    shard,
                    peer = request.peer,
                    compared = report.compared,
                    sent = report.sent,
                    received = report.received,
                    applied = report.applied,
                    peer_applied = report.peer_applied,
                    round_trips = report.round_trips,
                    protocol_version = report.protocol_version,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "sync finished"
                );
                Ok(trace_report(&report))
            }
            Err(error) => {
                let text = error.to_string();
                tracing::info!(message_id = %request.message_id, group, shard, peer = request.peer, error = text, "sync failed");
                match error.disposition() {
                    Disposition::Skip => {
                        node.peers.set_up(&request.peer, false);
                        Err(SyncFailure::Unreachable { error: text })
                    }
                    Disposition::Abort => Err(SyncFailure::Failed {
                        error: text,
                        report: None,
                    }),
                }
            }
        }
    }
}

/// The repair client's account of a sync as the round's trace keeps it: what this node (the
/// holder) applied of what it received, and what the peer applied of what it was sent, each
/// once and on its own side.
fn trace_report(report: &propd_repair::SyncReport) -> SyncReport {
    SyncReport {
        compared: report.compared,
        sent: report.sent,
        received: report.received,
        applied: report.applied,
        failed: report.failed,
        peer_applied: report.peer_applied,
        peer_failed: report.peer_failed,
        bytes_sent: report.bytes_sent,
        bytes_received: report.bytes_received,
        round_trips: report.round_trips,
    }
}

/// The `RepairService` other nodes sync against.
///
/// At most `repair.max_streams` streams are served at once, `repair.max_streams_per_peer` for
/// one peer (see [`crate::streams`]); a stream for a (group, shard) this node does not hold is
/// refused at admission ([`admit_stream`]); copies received are checked like replica writes
/// ([`PeerChecked`]).
pub(crate) fn repair_service(
    node: &Arc<NodeState>,
) -> RepairServiceServer<LimitedRepair<RepairServer<PeerChecked>>> {
    let config = TransportConfig {
        idle_timeout: node.config.repair.sync_timeout,
        ..TransportConfig::default()
    };
    let limits = StreamLimits::new(
        node.config.repair.max_streams,
        node.config.repair.max_streams_per_peer,
    );
    let store = PeerChecked::new(Arc::clone(&node.store), node.config.max_clock_skew);
    let admitting = Arc::clone(node);
    let server = RepairServer::new(Arc::new(store), config).with_admission(Arc::new(
        move |group: &str, shard: u32| admit_stream(&admitting, group, shard),
    ));
    RepairServiceServer::new(LimitedRepair::new(server, limits))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Admits a repair stream for (group, shard) only when this node holds a copy of it: a sync of
/// a shard held elsewhere would store data where no read or repair looks. Unknown groups and
/// out-of-range shards are refused too (`INVALID_ARGUMENT`); a shard held elsewhere with
/// `FAILED_PRECONDITION`, as a replica write is.
fn admit_stream(node: &NodeState, group: &str, shard: u32) -> Result<(), Status> {
    let placement = node.placement();
    let Some(def) = placement.group(group) else {
        return Err(Status::invalid_argument(format!(
            "repair stream refused: unknown group {group:?}"
        )));
    };
    if shard >= def.shard_num {
        return Err(Status::invalid_argument(format!(
            "repair stream refused: group {group:?} shard {shard} is out of range (shard_num {})",
            def.shard_num
        )));
    }
    if node.holds(def, shard) {
        return Ok(());
    }
    let status = Status::failed_precondition(format!(
        "repair stream refused: {} holds no copy of group {group:?} shard {shard} (its copies are on {:?})",
        node.me(),
        node.node_ids(def, shard)
    ));
    tracing::warn!(
        group,
        shard,
        message = status.message(),
        "repair stream refused"
    );
    Err(status)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use propd_gossip::transport::DriverConfig;
    use propd_gossip::{Outcome, PropagationResult, ShardKey, SpanKind, StartRequest};
    use propd_merkle::Shape;
    use propd_proto::v1::RepairRequest;
    use propd_proto::v1::repair_service_server::RepairService;
    use propd_store::{GroupDef, RedbStore, StoreConfig};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::config::{Member, Partial};

    /// A repair server that reads the opening message and refuses it as malformed, the way the
    /// real server refuses a protocol violation.
    struct RefusesAsMalformed;

    #[tonic::async_trait]
    impl RepairService for RefusesAsMalformed {
        type RepairStream = propd_repair::transport::ResponseStream;

        async fn repair(
            &self,
            request: Request<Streaming<RepairRequest>>,
        ) -> Result<Response<Self::RepairStream>, Status> {
            let opening = request.into_inner().message().await?;
            assert!(opening.is_some(), "the client opens the sync");
            Err(Status::invalid_argument("malformed `TreeRoot.root`"))
        }
    }

    /// Runs one round of shard `g/0` from node n1 (a real node state with its store) to n2 at
    /// `successor`, over tonic, and returns its result.
    async fn round_to(successor: SocketAddr) -> PropagationResult {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let member = |id: &str, addr: SocketAddr| Member {
            id: id.to_owned(),
            addr,
        };
        let config = Partial {
            node_id: Some("n1".into()),
            listen: Some("127.0.0.1:1".into()),
            data_dir: Some(dir.path().to_owned()),
            members: Some(vec![
                member("n1", "127.0.0.1:1".parse().expect("an address")),
                member("n2", successor),
            ]),
            groups: Some(vec![GroupDef::new("g", 1, 1)]),
            ..Partial::default()
        }
        .resolve()
        .expect("a valid config");
        let store_config =
            StoreConfig::new(&config.data_dir, config.groups.clone(), Shape::default());
        let store = RedbStore::open(store_config).expect("the store opens");
        let node = Arc::new(NodeState::new(config, store));
        let gossip: Gossip = GossipDriver::new(
            "n1".into(),
            node.peers.channels(),
            RepairSync::new(Arc::clone(&node)),
            DriverConfig::default(),
        );
        let message_id = gossip
            .start(StartRequest {
                key: ShardKey {
                    group: "g".into(),
                    shard: 0,
                },
                nodes: vec!["n1".into(), "n2".into()],
                preview: false,
            })
            .expect("the round starts");
        gossip
            .wait(&message_id, Duration::from_secs(30))
            .await
            .expect("the round ends")
    }

    #[test]
    fn the_trace_keeps_each_sides_applies_once() {
        let client = propd_repair::SyncReport {
            compared: 212,
            sent: 3,
            received: 106,
            applied: 106,
            failed: 1,
            peer_applied: 2,
            peer_failed: 1,
            bytes_sent: 900,
            bytes_received: 40_000,
            ..propd_repair::SyncReport::default()
        };
        let mapped = trace_report(&client);
        assert_eq!(
            (mapped.received, mapped.applied, mapped.failed),
            (106, 106, 1),
            "the holder's side"
        );
        assert_eq!(
            (mapped.sent, mapped.peer_applied, mapped.peer_failed),
            (3, 2, 1),
            "the peer's side"
        );
        assert_eq!(
            (mapped.compared, mapped.bytes_sent, mapped.bytes_received),
            (212, 900, 40_000)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_that_refuses_the_sync_as_malformed_aborts_the_round() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RepairServiceServer::new(RefusesAsMalformed))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let result = round_to(addr).await;
        assert_eq!(result.outcome, Outcome::Aborted, "{result:?}");
        assert_eq!(result.skips(), 0, "{result:?}");
        let error = result.error.unwrap_or_default();
        assert!(error.contains("InvalidArgument"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_that_is_down_is_skipped() {
        // Bound but not listening, and held for the test: connections are refused.
        let socket = TcpSocket::new_v4().expect("a socket");
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("bind");
        let addr = socket.local_addr().expect("an address");
        let result = round_to(addr).await;
        // The skip spends the round's count (one successor): it ends without a failure.
        assert_eq!(result.outcome, Outcome::Completed, "{result:?}");
        assert_eq!(result.skips(), 1, "{result:?}");
        assert!(
            result
                .trace
                .iter()
                .any(|span| span.kind == SpanKind::Skip && span.to == "n2"),
            "{result:?}"
        );
    }
}
