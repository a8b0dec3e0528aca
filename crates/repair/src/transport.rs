//! The tonic driver: the `RepairService` server and the client `sync` call over one bidirectional stream.
//!
//! The driver only moves messages between a stream and the pure state machines. The client reads
//! the server's messages at all times (so the server can always send) and sends whenever its
//! state machine has a message; the server reads the next client message only after sending
//! everything the previous one produced, so a fast client is slowed by HTTP/2 flow control
//! instead of filling the server's memory. Every sync is bounded on both sides by an idle
//! timeout: it fails when no message has gone either way for that long, however long it has
//! run while messages kept moving (a wiped replica restored from a 10 M-property shard takes as
//! long as it takes, a stalled peer is given up after the timeout).
//!
//! Cancelling a sync (timeout, dropped future, broken stream, protocol error) leaves both stores
//! consistent: each received page is applied in one store write transaction, so a store holds
//! either all of a page or none of it, and its tree is updated in the same transaction. What was
//! not yet applied is found again by the next sync.
//!
//! How the node uses it:
//!
//! ```no_run
//! # async fn example(store: std::sync::Arc<propd_store::RedbStore>) -> Result<(), Box<dyn std::error::Error>> {
//! use propd_repair::transport::{RepairServer, TransportConfig, sync};
//!
//! let config = TransportConfig::default();
//! // Serving: add the service to the node's one tonic server.
//! let service = RepairServer::new(store.clone(), config.clone()).into_service();
//! # let _ = service;
//! // Syncing (group "g", shard 3) with the successor as the client.
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:7000").connect().await?;
//! let report = sync(channel, &*store, "g", 3, &config).await?;
//! println!("sent {} received {} in {} bytes", report.sent, report.received, report.bytes_sent + report.bytes_received);
//! # Ok(())
//! # }
//! ```
//!
//! The server calls its store on tokio's blocking pool; the client calls it in place, inside
//! `block_in_place` on a multi-threaded runtime (one page per call).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pb::repair_service_client::RepairServiceClient;
use pb::repair_service_server::{RepairService, RepairServiceServer};
use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::peer::is_unreachable;
use propd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::client::Client;
use crate::config::Config;
use crate::error::SyncError;
use crate::report::{ServerReport, SyncReport};
use crate::server::Server;
use crate::store_api::RepairStore;

/// Driver settings for either side.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The protocol settings (pages, wire digest width, preview on the client).
    pub sync: Config,
    /// The longest a sync may go without a message either way before it fails as timed out
    /// (default 10 minutes, DESIGN §6). It is not a bound on the whole sync: one that keeps
    /// moving messages runs to its end.
    pub idle_timeout: Duration,
    /// Messages buffered in each direction inside the driver (default 8).
    pub buffer: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            sync: Config::default(),
            idle_timeout: Duration::from_secs(600),
            buffer: 8,
        }
    }
}

/// A `RepairService` client with the message size limits set to [`MAX_MESSAGE_BYTES`].
pub fn repair_client(channel: Channel) -> RepairServiceClient<Channel> {
    RepairServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Syncs (group, shard) of `store` with the peer behind `channel`, as the client, and returns
/// the client's report. Fails on a refusal, a shape mismatch, a protocol violation, a broken
/// stream or the idle timeout; whatever was applied before stays applied (see the module docs).
/// [`SyncError::disposition`] says whether a failure skips the peer or aborts the round.
pub async fn sync<S: RepairStore>(
    channel: Channel,
    store: &S,
    group: &str,
    shard: u32,
    config: &TransportConfig,
) -> Result<SyncReport, SyncError> {
    sync_with_progress(channel, store, group, shard, config, &|| {}).await
}

/// [`sync`], calling `progress` each time a message goes either way (what also holds off the
/// idle timeout), so that a caller can tell a long sync that moves from one that is stuck.
pub async fn sync_with_progress<S: RepairStore>(
    channel: Channel,
    store: &S,
    group: &str,
    shard: u32,
    config: &TransportConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<SyncReport, SyncError> {
    let activity = Activity::new(config.idle_timeout);
    let touch = || {
        activity.touch();
        progress();
    };
    let run = run_client(repair_client(channel), store, group, shard, config, &touch);
    match activity.bound(run).await {
        Some(result) => result,
        None => Err(SyncError::Timeout {
            millis: config.idle_timeout.as_millis() as u64,
        }),
    }
}

/// When a sync last moved a message, for its idle timeout.
#[derive(Debug)]
struct Activity {
    start: tokio::time::Instant,
    /// Nanoseconds from `start` to the last message.
    last: AtomicU64,
    idle_timeout: Duration,
}

impl Activity {
    fn new(idle_timeout: Duration) -> Self {
        Activity {
            start: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            idle_timeout,
        }
    }

    /// A message went one way or the other.
    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// The moment the sync times out unless a message moves first.
    fn deadline(&self) -> tokio::time::Instant {
        self.start + Duration::from_nanos(self.last.load(Ordering::Relaxed)) + self.idle_timeout
    }

    /// Resolves once no message has moved for the idle timeout.
    async fn idle(&self) {
        loop {
            let deadline = self.deadline();
            tokio::time::sleep_until(deadline).await;
            if self.deadline() <= tokio::time::Instant::now() {
                return;
            }
        }
    }

    /// `run`'s output, or `None` when it went idle for the timeout first.
    async fn bound<T>(&self, run: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            out = run => Some(out),
            () = self.idle() => None,
        }
    }
}

async fn run_client<S: RepairStore>(
    mut rpc: RepairServiceClient<Channel>,
    store: &S,
    group: &str,
    shard: u32,
    config: &TransportConfig,
    touch: &(dyn Fn() + Sync),
) -> Result<SyncReport, SyncError> {
    let mut machine = Client::new(store, group, shard, config.sync.clone())?;
    let (tx, rx) = mpsc::channel(config.buffer.max(1));
    // The first message goes into the channel before the call, so the server has it at once.
    if let Some(first) = machine.poll_transmit(store)? {
        tx.send(first).await.map_err(|_| SyncError::PeerClosed {
            phase: "opening the stream",
        })?;
        touch();
    }
    let mut inbound = rpc
        .repair(ReceiverStream::new(rx))
        .await
        .map_err(from_status)?
        .into_inner();
    let mut pending: Option<pb::RepairRequest> = None;
    while !machine.is_done() {
        if pending.is_none() {
            pending = store_work(|| machine.poll_transmit(store))?;
        }
        let incoming = match pending.take() {
            Some(msg) => {
                tokio::select! {
                    permit = tx.reserve() => {
                        permit.map_err(|_| SyncError::PeerClosed { phase: "sending" })?.send(msg);
                        touch();
                        continue;
                    }
                    incoming = inbound.message() => {
                        pending = Some(msg);
                        incoming
                    }
                }
            }
            None => inbound.message().await,
        };
        match incoming {
            Ok(Some(msg)) => {
                touch();
                store_work(|| machine.handle(store, msg))?;
            }
            Ok(None) => return Err(SyncError::PeerClosed { phase: "receiving" }),
            Err(status) => return Err(from_status(status)),
        }
    }
    // Dropping the sender ends the request stream: the server sees the end and finishes.
    drop(tx);
    Ok(machine.into_report())
}

/// Runs the client's store work in place, telling a multi-threaded runtime to move its other
/// tasks (the HTTP/2 connection) to another worker meanwhile.
fn store_work<T>(work: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|handle| handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The error of a call that failed with `status`: an unreachable peer or broken stream
/// ([`SyncError::Transport`]) when the shared classifier says so, otherwise the peer's refusal
/// with its code ([`SyncError::PeerRefused`]).
fn from_status(status: Status) -> SyncError {
    if is_unreachable(&status) {
        SyncError::Transport {
            message: format!("{:?}: {}", status.code(), status.message()),
        }
    } else {
        SyncError::PeerRefused {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Decides, from the (group, shard) a stream's opening `TreeRoot` names, whether the stream is
/// served at all: `Err(status)` refuses the call with that status before the sync starts.
pub type Admission = Arc<dyn Fn(&str, u32) -> Result<(), Status> + Send + Sync>;

/// The `RepairService` implementation: answers each incoming stream with a [`Server`] state
/// machine over the shared store.
pub struct RepairServer<S> {
    store: Arc<S>,
    config: TransportConfig,
    admission: Option<Admission>,
}

impl<S> std::fmt::Debug for RepairServer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepairServer")
            .field("config", &self.config)
            .field("admission", &self.admission.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: RepairStore + 'static> RepairServer<S> {
    /// A server over `store`.
    pub fn new(store: Arc<S>, config: TransportConfig) -> Self {
        RepairServer {
            store,
            config,
            admission: None,
        }
    }

    /// Reads each stream's opening message before answering and serves the stream only when
    /// `admission` accepts the (group, shard) its `TreeRoot` names; otherwise the call fails
    /// with the status `admission` gave, and nothing of the stream is read further.
    pub fn with_admission(mut self, admission: Admission) -> Self {
        self.admission = Some(admission);
        self
    }

    /// The tonic service, with the message size limits set to [`MAX_MESSAGE_BYTES`].
    pub fn into_service(self) -> RepairServiceServer<Self> {
        RepairServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// The stream of server messages.
pub type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RepairResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: RepairStore + 'static> RepairService for RepairServer<S> {
    type RepairStream = ResponseStream;

    async fn repair(
        &self,
        request: Request<Streaming<pb::RepairRequest>>,
    ) -> Result<Response<Self::RepairStream>, Status> {
        let mut inbound = request.into_inner();
        let opening = match &self.admission {
            Some(admission) => {
                Some(admit(&mut inbound, admission, self.config.idle_timeout).await?)
            }
            None => None,
        };
        let machine = Server::new(self.config.sync.clone())
            .map_err(|err| Status::internal(err.to_string()))?;
        let (tx, rx) = mpsc::channel(self.config.buffer.max(1));
        let store = Arc::clone(&self.store);
        let idle_timeout = self.config.idle_timeout;
        let burst = self.config.buffer.max(1);
        tokio::spawn(async move {
            let activity = Activity::new(idle_timeout);
            let result = activity
                .bound(serve(
                    machine, store, opening, inbound, &tx, burst, &activity,
                ))
                .await;
            let status = match result {
                Some(Ok(report)) => {
                    tracing::debug!(
                        received = report.received,
                        applied = report.applied,
                        sent = report.sent,
                        "repair sync served"
                    );
                    return;
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "repair sync failed");
                    status_of(&err)
                }
                None => Status::deadline_exceeded(format!(
                    "sync made no progress for {} ms",
                    idle_timeout.as_millis()
                )),
            };
            // The client may be gone already; then there is no one to tell.
            let _ = tx.send(Err(status)).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Reads the opening message of a stream (within `timeout`) and asks `admission` about the
/// (group, shard) its `TreeRoot` names. Another opening is passed on: the state machine
/// refuses it as a protocol violation.
async fn admit(
    inbound: &mut Streaming<pb::RepairRequest>,
    admission: &Admission,
    timeout: Duration,
) -> Result<pb::RepairRequest, Status> {
    let opening = match tokio::time::timeout(timeout, inbound.message()).await {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => {
            return Err(Status::invalid_argument(
                "the repair stream ended before its opening TreeRoot",
            ));
        }
        Ok(Err(status)) => return Err(status),
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "no opening TreeRoot within {} ms",
                timeout.as_millis()
            )));
        }
    };
    if let Some(pb::repair_request::Msg::TreeRoot(root)) = &opening.msg {
        admission(&root.group, root.shard)?;
    }
    Ok(opening)
}

async fn serve<S: RepairStore + 'static>(
    machine: Server,
    store: Arc<S>,
    mut opening: Option<pb::RepairRequest>,
    mut inbound: Streaming<pb::RepairRequest>,
    tx: &mpsc::Sender<Result<pb::RepairResponse, Status>>,
    burst: usize,
    activity: &Activity,
) -> Result<ServerReport, SyncError> {
    let mut machine = machine;
    loop {
        // Store work runs on the blocking pool so that the runtime's workers keep moving bytes.
        loop {
            let (back, out) = blocking(machine, &store, move |machine, store| {
                let mut out = Vec::new();
                while out.len() < burst {
                    match machine.poll_transmit(store)? {
                        Some(msg) => out.push(msg),
                        None => break,
                    }
                }
                Ok::<_, SyncError>(out)
            })
            .await?;
            machine = back;
            let out = out?;
            let more = out.len() == burst;
            for msg in out {
                tx.send(Ok(msg))
                    .await
                    .map_err(|_| SyncError::PeerClosed { phase: "sending" })?;
                activity.touch();
            }
            if !more {
                break;
            }
        }
        if machine.is_done() {
            return Ok(machine.report().clone());
        }
        let msg = match opening.take() {
            Some(msg) => msg,
            None => match inbound.message().await {
                Ok(Some(msg)) => {
                    activity.touch();
                    msg
                }
                Ok(None) => return Err(SyncError::PeerClosed { phase: "receiving" }),
                Err(status) => return Err(from_status(status)),
            },
        };
        let (back, handled) = blocking(machine, &store, move |machine, store| {
            machine.handle(store, msg)
        })
        .await?;
        machine = back;
        handled?;
    }
}

/// Runs `work` on the machine and the store in the blocking pool and gives the machine back.
async fn blocking<S, T>(
    machine: Server,
    store: &Arc<S>,
    work: impl FnOnce(&mut Server, &S) -> T + Send + 'static,
) -> Result<(Server, T), SyncError>
where
    S: RepairStore + 'static,
    T: Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let mut machine = machine;
        let result = work(&mut machine, &store);
        (machine, result)
    })
    .await
    .map_err(|err| SyncError::Transport {
        message: format!("repair store task failed: {err}"),
    })
}

fn status_of(err: &SyncError) -> Status {
    match err {
        SyncError::Protocol(_) | SyncError::Config { .. } => {
            Status::invalid_argument(err.to_string())
        }
        SyncError::Store { .. } => Status::internal(err.to_string()),
        _ => Status::aborted(err.to_string()),
    }
}
