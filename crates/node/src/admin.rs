//! The admin API: start a round now (and wait, or preview), watch a round's steps as they
//! happen, read a result, show a tree, show status, pause and resume background repair, set the
//! repair throttle; and two node-to-node calls: a liveness ping and the notice of a complete
//! round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use propd_gossip::transport::RoundEvent;
use propd_gossip::{MessageId, ShardKey, StartRequest};
use propd_proto::v1;
use propd_proto::v1::admin_service_server::AdminService;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::coordinator::{blocking, check_time, invalid};
use crate::node::{NodeState, lock, now_nanos};
use crate::sync::Gossip;
use crate::tombstones::{NoticeCheck, check_notice};

/// The `AdminService` of one node.
#[derive(Clone)]
pub(crate) struct AdminApi {
    node: Arc<NodeState>,
    gossip: Gossip,
}

impl std::fmt::Debug for AdminApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminApi")
            .field("node", &self.node.me())
            .finish_non_exhaustive()
    }
}

impl AdminApi {
    /// The service over a node's state and its gossip driver.
    pub(crate) fn new(node: Arc<NodeState>, gossip: Gossip) -> Self {
        Self { node, gossip }
    }
}

/// Starts a round for (group, shard) with this node as origin.
pub(crate) fn start_round(
    node: &NodeState,
    gossip: &Gossip,
    group: &str,
    shard: u32,
    preview: bool,
) -> Result<MessageId, Status> {
    let config = node
        .placement()
        .group(group)
        .cloned()
        .ok_or_else(|| invalid("group", format!("unknown group {group:?}")))?;
    if shard >= config.shard_num {
        return Err(invalid(
            "shard",
            format!(
                "{shard} is out of range for group {group:?} (shard_num {})",
                config.shard_num
            ),
        ));
    }
    let nodes = node.node_ids(&config, shard);
    let request = StartRequest {
        key: ShardKey {
            group: group.to_owned(),
            shard,
        },
        nodes,
        preview,
    };
    let message_id = gossip
        .start(request)
        .map_err(|error| Status::failed_precondition(error.to_string()))?;
    node.metrics
        .propagations_started
        .inc(&node.metrics.labels(group, shard));
    tracing::info!(group, shard, message_id = %message_id, preview, "repair round started");
    Ok(message_id)
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn propagate_now(
        &self,
        request: Request<v1::PropagateNowRequest>,
    ) -> Result<Response<v1::PropagateNowResponse>, Status> {
        let request = request.into_inner();
        let message_id = start_round(
            &self.node,
            &self.gossip,
            &request.group,
            request.shard,
            request.preview,
        )?;
        let mut response = v1::PropagateNowResponse {
            message_id: message_id.to_string(),
            result: None,
        };
        if request.wait || request.preview {
            let timeout = match request.timeout_ms {
                0 => self.node.config.repair.round_timeout,
                ms => Duration::from_millis(ms),
            };
            let result = self
                .gossip
                .wait(&message_id, timeout)
                .await
                .map_err(|error| Status::deadline_exceeded(error.to_string()))?;
            response.result = Some(result.into());
        }
        Ok(Response::new(response))
    }

    type WatchRoundStream = ReceiverStream<Result<v1::RoundEvent, Status>>;

    async fn watch_round(
        &self,
        request: Request<v1::WatchRoundRequest>,
    ) -> Result<Response<Self::WatchRoundStream>, Status> {
        let id = MessageId(request.into_inner().message_id);
        let mut watch = self
            .gossip
            .watch(&id)
            .map_err(|error| Status::not_found(error.to_string()))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(event) = watch.next().await {
                let event = match event {
                    RoundEvent::Step(step) => v1::round_event::Event::Step(step.into()),
                    RoundEvent::Finished(result) => v1::round_event::Event::Result(result.into()),
                };
                let event = v1::RoundEvent { event: Some(event) };
                if sender.send(Ok(event)).await.is_err() {
                    // The watcher went away.
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn get_result(
        &self,
        request: Request<v1::GetResultRequest>,
    ) -> Result<Response<v1::GetResultResponse>, Status> {
        let id = MessageId(request.into_inner().message_id);
        Ok(Response::new(v1::GetResultResponse {
            result: self.gossip.result(&id).map(Into::into),
        }))
    }

    async fn tree(
        &self,
        request: Request<v1::TreeRequest>,
    ) -> Result<Response<v1::TreeResponse>, Status> {
        let request = request.into_inner();
        let group = request.group.clone();
        let shard = request.shard;
        let view = blocking(&self.node, move |node| node.store.tree_view(&group, shard)).await?;
        Ok(Response::new(v1::TreeResponse {
            group: request.group,
            shard,
            root: view.root.digest.as_bytes().to_vec(),
            revision: view.revision,
            leaves: view.root.leaf_count,
            shape: Some(propd_repair::shape_to_proto(&view.shape)),
            slots: view
                .slots
                .iter()
                .map(|(id, inner)| v1::SlotSummary {
                    slot: id.index as u32,
                    digest: inner.digest.as_bytes().to_vec(),
                    leaves: inner.leaf_count,
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let node = &self.node;
        let members = crate::status::members(node)
            .into_iter()
            .map(|m| v1::MemberStatus {
                id: m.id,
                addr: m.addr,
                up: m.up,
            })
            .collect();
        let shards = crate::status::shards(node, &self.gossip)
            .await?
            .into_iter()
            .map(|s| v1::ShardStatus {
                last_repair_age_s: s.last_repair_age_s.unwrap_or(-1),
                pending: s.pending_write_misses + u64::from(s.running_round.is_some()),
                purge_cutoff_ns: s.purge_cutoff_ms.map_or(0, |ms| ms * 1_000_000),
                purged_below_ns: s.purged_below_ms.map_or(0, |ms| ms * 1_000_000),
                purge_blocked: s.purge_blocked.unwrap_or_default(),
                group: s.group,
                shard: s.shard,
            })
            .collect();
        let (store_health, quarantined) = crate::status::store(node).await?;
        Ok(Response::new(v1::StatusResponse {
            node: node.me().to_owned(),
            members,
            shards,
            repair_paused: node.is_paused(),
            store_health,
            quarantined,
            membership: lock(&node.membership).summary(),
        }))
    }

    async fn pause_repair(
        &self,
        _request: Request<v1::PauseRequest>,
    ) -> Result<Response<v1::RepairControlResponse>, Status> {
        self.node.paused.store(true, Ordering::Relaxed);
        tracing::info!("background repair paused");
        Ok(Response::new(v1::RepairControlResponse { paused: true }))
    }

    async fn resume_repair(
        &self,
        _request: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::RepairControlResponse>, Status> {
        self.node.paused.store(false, Ordering::Relaxed);
        tracing::info!("background repair resumed");
        Ok(Response::new(v1::RepairControlResponse { paused: false }))
    }

    async fn set_throttle(
        &self,
        request: Request<v1::ThrottleRequest>,
    ) -> Result<Response<v1::ThrottleResponse>, Status> {
        let bytes_per_second = request.into_inner().bytes_per_second;
        self.node
            .throttle
            .store(bytes_per_second, Ordering::Relaxed);
        tracing::info!(bytes_per_second, "repair throttle set");
        Ok(Response::new(v1::ThrottleResponse { bytes_per_second }))
    }

    async fn ping(
        &self,
        _request: Request<v1::PingRequest>,
    ) -> Result<Response<v1::PingResponse>, Status> {
        Ok(Response::new(v1::PingResponse {
            node: self.node.me().to_owned(),
        }))
    }

    async fn record_complete_repair(
        &self,
        request: Request<v1::CompleteRepairNotice>,
    ) -> Result<Response<v1::CompleteRepairAck>, Status> {
        let notice = request.into_inner();
        let node = &self.node;
        let def = node
            .placement()
            .group(&notice.group)
            .cloned()
            .ok_or_else(|| invalid("group", format!("unknown group {:?}", notice.group)))?;
        let copies = node.node_ids(&def, notice.shard);
        check_time(check_notice(
            NoticeCheck {
                copies: &copies,
                from: &notice.from,
                started_at: notice.started_at_ns,
                cutoff: notice.cutoff_ns,
            },
            now_nanos(),
            node.config.max_clock_skew,
        ))
        .inspect_err(|status| {
            tracing::warn!(
                group = notice.group,
                shard = notice.shard,
                from = notice.from,
                %status,
                "complete-round notice refused"
            );
        })?;
        let group = notice.group.clone();
        crate::membership::round_completed(
            node,
            &notice.group,
            notice.shard,
            &notice.copies,
            false,
        );
        blocking(node, move |node| {
            node.store.record_complete_round(
                &notice.group,
                notice.shard,
                notice.started_at_ns,
                notice.cutoff_ns,
            )
        })
        .await?;
        tracing::debug!(
            group,
            shard = notice.shard,
            from = notice.from,
            message_id = notice.message_id,
            cutoff_ns = notice.cutoff_ns,
            "complete round recorded"
        );
        Ok(Response::new(v1::CompleteRepairAck {}))
    }
}
