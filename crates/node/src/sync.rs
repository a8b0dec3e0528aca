//! The gossip's unit of work implemented with the repair client: one pairwise sync of a
//! (group, shard) with the successor, and the repair server other nodes sync against.
//!
//! Failures are sorted the way the propagation rules need (DESIGN §6): a successor that
//! cannot be reached or whose stream breaks is skipped; a local failure or a protocol or shape
//! error aborts the round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use propd_gossip::transport::GossipDriver;
use propd_gossip::{SyncFailure, SyncOutcome, SyncReport, SyncRequest, SyncWork};
use propd_proto::v1::repair_service_server::RepairServiceServer;
use propd_repair::SyncError;
use propd_repair::transport::{RepairServer, TransportConfig};
use propd_store::RedbStore;
use tokio::sync::Mutex;

use crate::node::NodeState;

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
            timeout: self.node.config.repair.sync_timeout,
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
    async fn sync(&self, request: SyncRequest) -> SyncOutcome {
        let node = &self.node;
        let Some(channel) = node.peers.channel(&request.peer) else {
            return Err(SyncFailure::Unreachable {
                error: format!("{} is not a known member", request.peer),
            });
        };
        self.pace_before().await;
        let config = self.transport_config(request.preview);
        let group = request.key.group.clone();
        let shard = request.key.shard;
        let started = Instant::now();
        let result =
            propd_repair::transport::sync(channel, node.store.as_ref(), &group, shard, &config)
                .await;
        node.metrics.syncs.inc();
        match result {
            Ok(report) => {
                let metrics = &node.metrics;
                metrics.properties_compared.add(report.compared);
                metrics.properties_sent.add(report.sent);
                metrics.properties_received.add(report.received);
                metrics.properties_applied.add(report.applied);
                metrics.properties_failed.add(report.failed);
                metrics.repair_bytes_sent.add(report.bytes_sent);
                metrics.repair_bytes_received.add(report.bytes_received);
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
                    applied = report.applied + report.peer_applied,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "sync finished"
                );
                Ok(SyncReport {
                    compared: report.compared,
                    sent: report.sent,
                    received: report.received,
                    applied: report.applied + report.peer_applied,
                    failed: report.failed + report.peer_failed,
                    bytes_sent: report.bytes_sent,
                    bytes_received: report.bytes_received,
                })
            }
            Err(error) => {
                let text = error.to_string();
                tracing::info!(message_id = %request.message_id, group, shard, peer = request.peer, error = text, "sync failed");
                if is_unreachable(&error) {
                    node.peers.set_up(&request.peer, false);
                    Err(SyncFailure::Unreachable { error: text })
                } else {
                    Err(SyncFailure::Failed {
                        error: text,
                        report: None,
                    })
                }
            }
        }
    }
}

/// Whether a sync error means the successor could not be reached (skip it) rather than a
/// failure of the sync itself (abort the round).
fn is_unreachable(error: &SyncError) -> bool {
    matches!(
        error,
        SyncError::Transport { .. }
            | SyncError::PeerClosed { .. }
            | SyncError::Timeout { .. }
            | SyncError::TreeNotFound { .. }
            | SyncError::Refused { .. }
    )
}

/// The `RepairService` other nodes sync against.
pub(crate) fn repair_service(node: &NodeState) -> RepairServiceServer<RepairServer<RedbStore>> {
    let config = TransportConfig {
        timeout: node.config.repair.sync_timeout,
        ..TransportConfig::default()
    };
    RepairServer::new(Arc::clone(&node.store), config).into_service()
}
