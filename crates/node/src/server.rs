//! `propd serve`: opens the store, assembles the services on one gRPC port and the HTTP port,
//! runs the background tasks, and shuts down gracefully on SIGINT or SIGTERM.

use std::collections::HashSet;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::serve::ListenerExt as _;
use propd_gossip::transport::{DriverConfig, GossipDriver};
use propd_gossip::{Outcome, Placement, PropagationResult};
use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::v1;
use propd_proto::v1::admin_service_server::AdminServiceServer;
use propd_proto::v1::property_service_server::PropertyServiceServer;
use propd_store::{
    ConfigError as StoreConfigError, PURGE_PACE, RedbStore, StoreConfig, StoreError, VerifyOutcome,
    purge_line, round_cutoff,
};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic_health::ServingStatus;

use crate::admin::{AdminApi, start_round};
use crate::auth::AuthLayer;
use crate::config::{Config, LogFormat, shape_change};
use crate::coordinator::{PropertyApi, blocking};
use crate::http::{HttpAuth, HttpState};
use crate::node::{NodeState, lock, now_millis, now_nanos};
use crate::schedule::{CronWindow, designated_origin};
use crate::services::Serving;
use crate::sync::{Gossip, RepairSync};
use crate::telemetry::TraceExport;
use crate::tls::{self, FileWatch, ServerTls, TlsListener};
use crate::tombstones::complete_for_purging;

/// How often the schedulers and the health probe look around.
const TICK: Duration = Duration::from_secs(1);
/// How long a liveness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long shutdown waits for in-flight requests and syncs.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long one gossip hand-off or report call may take: it only asks the peer to admit a
/// round, so a peer that takes longer is as good as down.
const GOSSIP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Set to `off` to accept connections without `TCP_NODELAY`, as propd did before: only for
/// measuring what Nagle's algorithm costs (docs/benchmarks.md, "Coordinated get latency").
const SERVER_NODELAY_VAR: &str = "PROPD_BENCH_SERVER_NODELAY";

/// Runs a node until SIGINT or SIGTERM.
pub(crate) async fn serve(config: Config) -> Result<()> {
    init_tracing(config.log_format);
    // The configuration a node runs with is shown to its operator; a closed stdout must not
    // stop the node.
    let _ = writeln!(
        std::io::stdout(),
        "propd {} starting with:\n{}",
        env!("CARGO_PKG_VERSION"),
        config.describe()
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let running = start(config, shutdown_rx).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: no new requests; in-flight work may finish");
    let _ = shutdown_tx.send(true);
    running.stopped(SHUTDOWN_GRACE).await;
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// A started node: its servers and tasks.
#[derive(Debug)]
pub(crate) struct Running {
    servers: Vec<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits (at most `grace`) for the servers to drain after shutdown was signalled, then
    /// stops the background tasks.
    pub(crate) async fn stopped(self, grace: Duration) {
        for task in &self.tasks {
            task.abort();
        }
        let drain = futures_join(self.servers);
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "in-flight work did not finish in time; exiting anyway"
            );
        }
    }
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<()>>) {
    for handle in handles {
        let _ = handle.await;
    }
}

/// Opens the store, binds both ports and starts every server and task. They stop when
/// `shutdown` turns true.
/// Whether accepted sockets get TCP_NODELAY (on unless the bench variable says `off`).
pub(crate) fn server_nodelay() -> bool {
    std::env::var(SERVER_NODELAY_VAR).map_or(true, |value| value != "off")
}

pub(crate) async fn start(config: Config, shutdown: watch::Receiver<bool>) -> Result<Running> {
    // With etcd, members and groups come from there (the store opens with etcd's groups).
    let (config, from_etcd) = match config.etcd.clone() {
        Some(etcd) => {
            let (config, records, connected) = crate::membership::prepare(config).await?;
            (config, Some((etcd, records, connected)))
        }
        None => (config, None),
    };
    let store_config = StoreConfig {
        max_property_bytes: config.max_property_bytes,
        group_commit: config.group_commit,
        start_empty_if_damaged: config.allow_empty_store,
        ..StoreConfig::new(&config.data_dir, config.groups.clone(), config.tree)
    };
    let store = tokio::task::spawn_blocking(move || RedbStore::open(store_config))
        .await
        .context("opening the store")?
        .map_err(|error| match error {
            StoreError::Config(StoreConfigError::ShapeChanged { stored, given }) => {
                anyhow::anyhow!(shape_change(&stored, &given))
            }
            other => anyhow::Error::new(other),
        })
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    let node = Arc::new(NodeState::new(config, store));
    if let Some((_, records, connected)) = &from_etcd {
        *lock(&node.membership) = crate::membership::initial_view(records, *connected);
    }
    let traces = match &node.config.telemetry.otlp_endpoint {
        Some(endpoint) => Some(TraceExport::start(endpoint, node.me())?),
        None => None,
    };

    let driver_config = DriverConfig {
        engine: propd_gossip::Config {
            sync_timeout: node.config.repair.sync_timeout,
            round_timeout: node.config.repair.round_timeout,
            max_clock_skew: node.config.max_clock_skew,
        },
        request_timeout: GOSSIP_REQUEST_TIMEOUT,
        ..DriverConfig::default()
    };
    let gossip: Gossip = GossipDriver::new(
        node.me().to_owned(),
        node.peers.channels(),
        RepairSync::new(Arc::clone(&node)),
        driver_config,
    );
    gossip.set_placement(shard_placement(Arc::clone(&node)));
    let peers_of = Arc::clone(&node);
    gossip.set_peer_down(Arc::new(move |peer| peers_of.peers.is_hung(peer)));

    if let Some(paths) = &node.config.tls {
        node.peers.use_tls(paths)?;
    } else if node.config.insecure {
        tracing::warn!(
            listen = %node.config.listen,
            http = %node.config.http,
            "insecure = true: serving plaintext without authentication; anyone who reaches these ports can read, write and repair"
        );
    }
    let grpc_listener = tokio::net::TcpListener::bind(node.config.listen)
        .await
        .with_context(|| format!("binding listen address {}", node.config.listen))?;
    let http_listener = crate::http::bind(node.config.http).await?;
    tracing::info!(node = node.me(), listen = %node.config.listen, http = %node.config.http, "serving");

    let (serving, health) = crate::services::health().await;
    let (reflection_v1, reflection_v1alpha) =
        crate::services::reflection().context("building the reflection service")?;
    let auth = AuthLayer::new(
        node.config.tls.as_ref().map(|_| member_ids(&node)),
        node.metrics.auth_refusals.clone(),
    );
    // The auth layer is outermost: a refused call is not timed, so that callers without a
    // certificate cannot grow the latency histogram's label set. The server pings its clients
    // (HTTP/2 keepalive) and keeps a connection whose resets it reads after a pause
    // (`services::grpc_server`).
    let membership_auth = auth.clone();
    let router = crate::services::grpc_server()
        .layer(auth)
        .layer(node.metrics.rpc_layer())
        .add_service(
            PropertyServiceServer::new(PropertyApi::new(Arc::clone(&node)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(gossip.service())
        .add_service(crate::sync::repair_service(&node))
        .add_service(AdminServiceServer::new(AdminApi::new(
            Arc::clone(&node),
            gossip.clone(),
        )))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let view = Arc::new(HttpView {
        node: Arc::clone(&node),
        gossip: gossip.clone(),
    });
    let (grpc, http): (
        BoxedServer<tonic::transport::Error>,
        BoxedServer<std::io::Error>,
    ) = match &node.config.tls {
        None => (
            Box::pin(
                router.serve_with_incoming_shutdown(
                    // Every accepted socket gets TCP_NODELAY: a small answer is sent at once rather
                    // than held back by Nagle's algorithm until the peer's delayed ACK (about 40 ms
                    // on Linux). The TLS acceptor sets it too.
                    tonic::transport::server::TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(server_nodelay())),
                    not_serving_on_shutdown(serving, shutdown.clone()),
                ),
            ),
            Box::pin(crate::http::serve(
                // TCP_NODELAY on the HTTP port too (the TLS acceptor sets it on its sockets).
                http_listener.tap_io(|socket| {
                    if let Err(error) = socket.set_nodelay(true) {
                        tracing::debug!(%error, "could not set TCP_NODELAY on an HTTP connection");
                    }
                }),
                view,
                signalled(shutdown.clone()),
            )),
        ),
        Some(paths) => {
            let refused: Arc<dyn Fn() + Send + Sync> = {
                let counter = node.metrics.tls_handshakes_refused.clone();
                Arc::new(move || {
                    counter.inc();
                })
            };
            let grpc_tls = Arc::new(ServerTls::load(
                paths,
                tls::ALPN_H2,
                tls::ClientCert::Required,
            )?);
            let http_tls = Arc::new(ServerTls::load(
                paths,
                tls::ALPN_HTTP1,
                tls::ClientCert::Optional,
            )?);
            let http_auth = Arc::new(HttpAuth {
                members: member_ids(&node),
                refusals: node.metrics.auth_refusals.clone(),
            });
            let http_addr = http_listener.local_addr()?;
            let grpc_incoming = tls::accept(grpc_listener, grpc_tls, Arc::clone(&refused));
            let http_incoming = tls::accept(http_listener, http_tls, refused);
            (
                Box::pin(
                    router.serve_with_incoming_shutdown(
                        ReceiverStream::new(grpc_incoming)
                            .map(|(stream, _)| Ok::<_, std::io::Error>(stream)),
                        not_serving_on_shutdown(serving, shutdown.clone()),
                    ),
                ),
                Box::pin(crate::http::serve_tls(
                    TlsListener::new(http_incoming, http_addr),
                    view,
                    http_auth,
                    signalled(shutdown.clone()),
                )),
            )
        }
    };
    let servers = vec![
        tokio::spawn(async move {
            if let Err(error) = grpc.await {
                tracing::error!(%error, "gRPC server failed");
            }
        }),
        tokio::spawn(async move {
            if let Err(error) = http.await {
                tracing::error!(%error, "HTTP server failed");
            }
        }),
    ];
    let mut tasks = vec![
        tokio::spawn(watch_results(Arc::clone(&node), gossip.clone(), traces)),
        tokio::spawn(schedule_rounds(Arc::clone(&node), gossip.clone())),
        tokio::spawn(probe_members(Arc::clone(&node), gossip.clone())),
        tokio::spawn(verify_and_purge(Arc::clone(&node))),
        tokio::spawn(reload_peer_tls(Arc::clone(&node))),
        tokio::spawn(scrub(Arc::clone(&node))),
        tokio::spawn(recover_store(Arc::clone(&node))),
    ];
    if let Some((etcd, records, _)) = from_etcd {
        tasks.push(tokio::spawn(crate::membership::run(
            Arc::clone(&node),
            etcd,
            records,
            membership_auth,
            shutdown.clone(),
        )));
    }
    Ok(Running { servers, tasks })
}

/// The configured member ids: a certificate naming one is that member.
fn member_ids(node: &NodeState) -> HashSet<String> {
    node.config.members.iter().map(|m| m.id.clone()).collect()
}

/// The gossip admission's view of placement: a round handed to this node must name a known
/// group and an in-range shard, and carry that shard's node list as this node computes it.
fn shard_placement(node: Arc<NodeState>) -> Placement {
    Placement::new(move |key| {
        let placement = node.placement();
        let group = placement
            .group(&key.group)
            .ok_or_else(|| format!("unknown group {:?}", key.group))?;
        if key.shard >= group.shard_num {
            return Err(format!(
                "shard {} is out of range (shard_num {})",
                key.shard, group.shard_num
            ));
        }
        Ok(node.node_ids(group, key.shard))
    })
}

/// A server future of either kind (plaintext or TLS).
type BoxedServer<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// Remakes the channels to the other members when the `[tls]` files change, so that a
/// rotated certificate is the one this node shows when it dials.
async fn reload_peer_tls(node: Arc<NodeState>) {
    let Some(paths) = node.config.tls.clone() else {
        return;
    };
    let watch = FileWatch::new(paths);
    let mut tick = tokio::time::interval(tls::RELOAD_CHECK);
    loop {
        tick.tick().await;
        if !watch.changed() {
            continue;
        }
        match node.peers.use_tls(watch.paths()) {
            Ok(()) => tracing::info!("TLS files changed; channels to members remade"),
            Err(error) => {
                tracing::warn!(%error, "TLS files changed but do not load; keeping the channels");
            }
        }
    }
}

async fn signalled(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits for shutdown, then reports every service `NOT_SERVING` before the gRPC server stops
/// taking new calls.
async fn not_serving_on_shutdown(serving: Serving, shutdown: watch::Receiver<bool>) {
    signalled(shutdown).await;
    serving.set(ServingStatus::NotServing).await;
}

/// The HTTP port's view of the node.
struct HttpView {
    node: Arc<NodeState>,
    gossip: Gossip,
}

impl HttpState for HttpView {
    async fn metrics_text(&self) -> String {
        match crate::status::shards(&self.node, &self.gossip).await {
            Ok(shards) => {
                for shard in &shards {
                    self.node.metrics.set_last_repair_age(
                        &shard.group,
                        shard.shard,
                        shard.last_repair_age_s,
                    );
                }
            }
            Err(status) => {
                tracing::warn!(%status, "reading the shards' last repairs for /metrics failed")
            }
        }
        self.node.metrics.set_store(
            self.node.store.quarantined_since_open(),
            self.node.store_fault().is_none(),
        );
        self.node.metrics.encode()
    }

    async fn status_json(&self) -> Result<String, String> {
        let view = crate::status::cluster_view(&self.node, &self.gossip)
            .await
            .map_err(|status| status.message().to_owned())?;
        serde_json::to_string(&view).map_err(|error| error.to_string())
    }

    fn health(&self) -> Result<String, String> {
        // A node that lost etcd still serves (on the last membership it saw): healthy, and
        // the body says so.
        match self.node.store_fault() {
            Some(reason) => Err(format!("node {}: {reason}", self.node.me())),
            None => {
                let membership = lock(&self.node.membership).summary();
                Ok(format!("node {}; {membership}", self.node.me()))
            }
        }
    }
}

/// Handles the results of rounds this node started: metrics, the trace exported over OTLP when
/// configured, and for a round that completed for purging (every copy took part and applied
/// everything), the notice of the cutoff below which tombstones may be purged.
async fn watch_results(node: Arc<NodeState>, gossip: Gossip, traces: Option<TraceExport>) {
    let mut results = gossip.subscribe();
    loop {
        let result = match results.recv().await {
            Ok(result) => result,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "fell behind on round results");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if result.context.origin != node.me() {
            continue;
        }
        if let Some(traces) = &traces {
            traces.export(&result);
        }
        record_result(&node, &result).await;
    }
}

async fn record_result(node: &Arc<NodeState>, result: &PropagationResult) {
    let context = &result.context;
    let metrics = &node.metrics;
    let labels = metrics.labels(&context.key.group, context.key.shard);
    match result.outcome {
        Outcome::Completed => metrics.propagations_finished.inc(&labels),
        Outcome::Refused => metrics.propagations_refused.inc(&labels),
        _ => metrics.propagations_failed.inc(&labels),
    }
    metrics.skips.add(&labels, result.skips() as u64);
    let elapsed_ms = (now_millis() as i64).saturating_sub(context.started_at.0);
    metrics
        .round_duration
        .observe(&labels, elapsed_ms.max(0) as f64 / 1000.0);
    // The gossip driver logs the finished round and its steps.
    lock(&node.rounds).postpone(
        &(context.key.group.clone(), context.key.shard),
        now_millis(),
        period_ms(node),
    );
    if !complete_for_purging(result) {
        if result.reached_every_copy() && !context.preview {
            tracing::info!(
                message_id = %context.message_id,
                group = context.key.group,
                shard = context.key.shard,
                "round reached every copy but a sync failed or failed to apply copies: it does not count for purging"
            );
        }
        return;
    }
    let started_at_ns = context.started_at.0.saturating_mul(1_000_000);
    let cutoff_ns = round_cutoff(started_at_ns, node.config.max_clock_skew);
    // The origin may hold no copy (it originates a shard it sees on the move): the move it
    // tracks ends here, whether or not a notice reaches it, and in etcd.
    crate::membership::round_completed(
        node,
        &context.key.group,
        context.key.shard,
        &context.nodes,
        true,
    );
    for target in &context.nodes {
        let notice = v1::CompleteRepairNotice {
            group: context.key.group.clone(),
            shard: context.key.shard,
            started_at_ns,
            message_id: context.message_id.to_string(),
            from: node.me().to_owned(),
            cutoff_ns,
            copies: context.nodes.clone(),
        };
        if target == node.me() {
            let group = notice.group.clone();
            let shard = notice.shard;
            if let Err(status) = blocking(node, move |node| {
                node.store
                    .record_complete_round(&group, shard, started_at_ns, cutoff_ns)
            })
            .await
            {
                tracing::warn!(%status, "recording a complete round failed");
            }
        } else if let Some(mut client) = node.peers.admin_client(target) {
            let mut request = tonic::Request::new(notice);
            request.set_timeout(Duration::from_secs(5));
            if let Err(status) = client.record_complete_repair(request).await {
                tracing::info!(peer = target, %status, "a copy did not take the complete-round notice");
            }
        }
    }
}

fn period_ms(node: &NodeState) -> u64 {
    node.config.repair.period.as_millis() as u64
}

/// Starts the background rounds this node originates, spread over the repair period.
async fn schedule_rounds(node: Arc<NodeState>, gossip: Gossip) {
    let window = node
        .config
        .repair
        .cron
        .as_deref()
        .and_then(|c| CronWindow::parse(c).ok());
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if !node.config.repair.enabled || node.is_paused() {
            continue;
        }
        let now_ms = now_millis();
        if window.as_ref().is_some_and(|w| !w.contains(now_ms / 1000)) {
            continue;
        }
        let mut mine = Vec::new();
        let placement = node.placement();
        for group in placement.groups() {
            for shard in 0..group.shard_num {
                let ids = node.node_ids(group, shard);
                let list: Vec<&str> = ids.iter().map(String::as_str).collect();
                // A node that sees the shard on the move originates its rounds too: the round
                // covers the old holders this node lists, so its move can end.
                let moving = !lock(&node.moves).leaving(&group.name, shard).is_empty();
                if moving
                    || designated_origin(&list, shard, |id| node.peers.is_up(id)) == Some(node.me())
                {
                    mine.push((group.name.clone(), shard));
                }
            }
        }
        let due = lock(&node.rounds).due(&mine, now_ms, period_ms(&node));
        for (group, shard) in due {
            if let Err(status) = start_round(&node, &gossip, &group, shard, false) {
                tracing::info!(group, shard, %status, "scheduled round not started");
            }
        }
    }
}

/// Probes the other members; when one answers that some write missed, repairs its shards.
async fn probe_members(node: Arc<NodeState>, gossip: Gossip) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        for peer in node.peers.others() {
            let Some(mut client) = node.peers.admin_client(&peer) else {
                continue;
            };
            let mut request = tonic::Request::new(v1::PingRequest {});
            request.set_timeout(PROBE_TIMEOUT);
            let answer = client.ping(request).await;
            let up = answer.is_ok();
            if node.peers.saw_call(&peer, &answer) {
                tracing::info!(peer, "member answers again");
            }
            if !up || node.is_paused() || !node.config.repair.enabled {
                continue;
            }
            let missed = lock(&node.misses).node_is_back(&peer);
            for (group, shard) in missed {
                match start_round(&node, &gossip, &group, shard, false) {
                    Ok(message_id) => {
                        tracing::info!(peer, group, shard, message_id = %message_id, "repairing writes the member missed");
                    }
                    Err(status) => {
                        tracing::info!(peer, group, shard, %status, "write-miss round not started; will retry");
                        node.record_miss(&peer, &group, shard);
                    }
                }
            }
        }
    }
}

/// Verifies every local tree against a full rebuild and purges tombstones, every
/// `repair.verify_interval`.
async fn verify_and_purge(node: Arc<NodeState>) {
    let interval = node.config.repair.verify_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tick.tick().await;
        for (group, shard) in node.local_shards() {
            verify_one(&node, &group, shard).await;
            purge_one(&node, &group, shard).await;
        }
    }
}

async fn verify_one(node: &Arc<NodeState>, group: &str, shard: u32) {
    let started = Instant::now();
    let key = group.to_owned();
    let metrics = &node.metrics;
    let labels = metrics.labels(group, shard);
    match blocking(node, move |node| node.store.verify(&key, shard)).await {
        Ok(VerifyOutcome::Skipped { .. }) => {}
        Ok(outcome) => {
            metrics.tree_rebuilds_started.inc(&labels);
            metrics.tree_rebuilds_finished.inc(&labels);
            metrics
                .tree_rebuild_millis
                .add(&labels, started.elapsed().as_millis() as u64);
            if let VerifyOutcome::Healed {
                differing_leaves, ..
            } = outcome
            {
                metrics.verify_mismatches.inc(&labels);
                tracing::warn!(
                    group,
                    shard,
                    differing_leaves,
                    "tree verification found a mismatch and healed it"
                );
            }
        }
        Err(status) => {
            metrics.tree_rebuilds_started.inc(&labels);
            metrics.tree_rebuilds_failed.inc(&labels);
            tracing::error!(group, shard, %status, "tree verification failed");
        }
    }
}

/// Purges the shard's tombstones below its purge line (docs/protocol.md, "The life of a
/// delete"), in chunks so that writes keep flowing.
async fn purge_one(node: &Arc<NodeState>, group: &str, shard: u32) {
    let key = group.to_owned();
    let grace = node.config.repair.tombstone_grace;
    let copies = node
        .placement()
        .group(group)
        .map_or(0, |def| node.node_ids(def, shard).len());
    match blocking(node, move |node| {
        let state = node.store.purge_state(&key, shard)?;
        match purge_line(now_nanos(), grace, copies, state.cutoff) {
            Some(line) => node
                .store
                .purge_tombstones_paced(&key, shard, line, PURGE_PACE)
                .map(Some),
            None => Ok(None),
        }
    })
    .await
    {
        Ok(Some(report)) if report.purged > 0 => {
            let labels = node.metrics.labels(group, shard);
            node.metrics.tombstones_purged.add(&labels, report.purged);
            tracing::info!(
                group,
                shard,
                purged = report.purged,
                chunks = report.chunks,
                purged_below = report.purged_below,
                "tombstones purged"
            );
        }
        Ok(_) => {}
        Err(status) => tracing::error!(group, shard, %status, "tombstone purge failed"),
    }
}

/// Scrubs every local shard in turn, again and again, at `repair.scrub_bytes_per_second`:
/// every stored row is reread and checked against its digests, rotten rows are quarantined
/// and the tree healed without them (the next repair brings their good copies back). Unlike
/// verification, an unchanged shard is scrubbed too: bytes rot at rest.
async fn scrub(node: Arc<NodeState>) {
    let rate = node.config.repair.scrub_bytes_per_second;
    if rate == 0 {
        return;
    }
    loop {
        let mut damaged = false;
        for (group, shard) in node.local_shards() {
            let started = Instant::now();
            let key = group.clone();
            let bytes = match blocking(&node, move |node| node.store.scrub(&key, shard)).await {
                Ok(report) => {
                    if report.quarantined > 0 || report.healed.is_some() {
                        tracing::warn!(
                            group,
                            shard,
                            quarantined = report.quarantined,
                            healed_leaves = report.healed.unwrap_or(0),
                            "scrub quarantined rotten rows or healed the tree"
                        );
                    }
                    report.bytes
                }
                Err(status) => {
                    damaged = true;
                    tracing::error!(group, shard, %status, "scrub failed");
                    0
                }
            };
            node.metrics.scrub_bytes.inc_by(bytes);
            // Pace by the bytes read: at most `rate` bytes per second on average.
            let budget = Duration::from_secs_f64(bytes as f64 / rate as f64);
            tokio::time::sleep(budget.saturating_sub(started.elapsed())).await;
        }
        node.metrics.scrub_passes.inc();
        if !damaged {
            node.store.clear_damage();
        }
        tokio::time::sleep(TICK).await;
    }
}

/// While a write failed on an I/O error (a full disk), reopens the store and probes whether
/// writes work again, every second: the node recovers by itself once space is freed.
async fn recover_store(node: Arc<NodeState>) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if !node.store.writes_failing() {
            continue;
        }
        match blocking(&node, |node| node.store.recover()).await {
            Ok(true) => tracing::info!("the store takes writes again"),
            Ok(false) => tracing::debug!("the disk is still full"),
            Err(status) => tracing::warn!(%status, "recovering the store failed"),
        }
    }
}
