//! The tonic driver (feature `transport`): runs an [`Engine`] on tokio, serves `GossipService`,
//! hands rounds to the next node through the channels of a [`MemberChannels`] pool (the node's
//! one pool, shared with its other clients), and lets the origin wait for results.
//!
//! The driver is thin on purpose: every decision is the engine's. The driver only turns the
//! engine's commands into tasks (a sync through [`SyncWork`], a `Propagate`, `Report` or
//! `ReportProgress` call) and feeds what they return back into the engine, under one lock, with the time read from
//! tokio's clock (so `tokio::time::pause` drives it in tests).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::peer::is_unreachable;
use propd_proto::v1 as pb;
use propd_proto::v1::gossip_service_client::GossipServiceClient;
use propd_proto::v1::gossip_service_server::{GossipService, GossipServiceServer};
use tokio::sync::{broadcast, oneshot};
use tokio::task::AbortHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::engine::{
    Admission, Command, Config, ContextError, Engine, HandOffOutcome, Placement, StartRequest,
};
use crate::results::RecentResults;
use crate::sync::{SyncProgress, SyncWork};
use crate::types::{
    MemberId, MessageId, Millis, Progress, Propagation, PropagationResult, RoundStep, ShardKey,
    round_steps,
};

/// How many round events a watcher may fall behind before it loses some (it then recovers
/// them from the result).
const EVENTS_CAPACITY: usize = 1024;

/// How often an idle connection to a member is pinged (HTTP/2 keepalive), so that a member that
/// stops answering (a hung process, a cut link) is noticed within seconds instead of by a call's
/// timeout. The node's server pings its clients at the same rate.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// How long a keepalive ping may go unanswered before the connection is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// One lazily connected channel per member, by member id: a node's one pool of channels, for
/// the gossip driver and every other client the node has. Cheap to clone (one shared map).
///
/// Channels carry no deadline of their own (a repair stream may run for minutes); each call
/// sets its own. Build it inside a tokio runtime.
#[derive(Clone, Debug)]
pub struct MemberChannels {
    connect_timeout: Duration,
    pool: Arc<Mutex<HashMap<MemberId, (String, Channel)>>>,
}

impl MemberChannels {
    /// Channels to `members` (member id to a URI such as `http://10.0.0.7:7700`; this node
    /// included, since a round may report to its own origin) whose connection attempts give up
    /// after `connect_timeout`. A member whose address is not a URI is left out, with a warning.
    #[must_use]
    pub fn new(members: HashMap<MemberId, String>, connect_timeout: Duration) -> Self {
        let channels = MemberChannels {
            connect_timeout,
            pool: Arc::default(),
        };
        channels.set_members(members);
        channels
    }

    /// Replaces the membership. Channels to members whose address is unchanged are kept;
    /// others are dropped or made anew.
    pub fn set_members(&self, members: HashMap<MemberId, String>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let mut old = std::mem::take(&mut *pool);
        for (id, address) in members {
            let kept = old.remove(&id).filter(|(known, _)| *known == address);
            let entry = match kept {
                Some(entry) => entry,
                None => match self.connect_lazy(&address) {
                    Some(channel) => (address, channel),
                    None => {
                        tracing::warn!(member = %id, address, "member address is not a valid URI");
                        continue;
                    }
                },
            };
            pool.insert(id, entry);
        }
    }

    /// Replaces the whole pool with channels the caller made (for example over TLS, with a
    /// client identity): member id to its address and channel. Calls already running on the old
    /// channels finish on them.
    pub fn replace_channels(&self, channels: HashMap<MemberId, (String, Channel)>) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        *pool = channels;
    }

    /// The channel to member `id`; `None` for an unknown member.
    #[must_use]
    pub fn channel(&self, id: &str) -> Option<Channel> {
        let pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        pool.get(id).map(|(_, channel)| channel.clone())
    }

    fn connect_lazy(&self, address: &str) -> Option<Channel> {
        let endpoint = Endpoint::from_shared(address.to_owned()).ok()?;
        Some(
            endpoint
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .connect_lazy(),
        )
    }
}

/// Settings of the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// The engine's timeouts (sync 10 min, round 1 h by default).
    pub engine: Config,
    /// How long one `Propagate` or `Report` call may take (default 30 s).
    pub request_timeout: Duration,
    /// Calls made for one hand-off or report before the peer counts as unreachable
    /// (default 5); only `UNAVAILABLE` and similar transport failures are retried.
    pub attempts: u32,
    /// The wait before the first retry, doubled after each (default 200 ms).
    pub backoff_initial: Duration,
    /// The longest wait between retries (default 5 s).
    pub backoff_max: Duration,
    /// How often the engine is ticked to apply its timeouts (default 1 s).
    pub tick_interval: Duration,
    /// How many recent results the origin keeps (default 256).
    pub results_capacity: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            engine: Config::default(),
            request_timeout: Duration::from_secs(30),
            attempts: 5,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            tick_interval: Duration::from_secs(1),
            results_capacity: 256,
        }
    }
}

/// Why waiting for a result ended without one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The round was not started here, or its result is no longer kept.
    #[error("no round {message_id} is pending or kept on this node")]
    Unknown {
        /// The round asked for.
        message_id: MessageId,
    },
    /// The caller's timeout passed first (the round goes on; wait again or read it later).
    #[error("no result for round {message_id} within {} ms", timeout.as_millis())]
    TimedOut {
        /// The round asked for.
        message_id: MessageId,
        /// The caller's timeout.
        timeout: Duration,
    },
    /// The driver was dropped before the round ended.
    #[error("the gossip driver stopped before round {message_id} ended")]
    Stopped {
        /// The round asked for.
        message_id: MessageId,
    },
}

/// Everything guarded by the driver's one lock.
struct State {
    engine: Engine,
    results: RecentResults,
    waiters: HashMap<MessageId, Vec<oneshot::Sender<PropagationResult>>>,
    syncs: HashMap<(MessageId, MemberId), AbortHandle>,
    finished: broadcast::Sender<PropagationResult>,
    events: broadcast::Sender<RoundEvent>,
    peer_down: Option<PeerDown>,
}

/// Tells whether a member is known to be down (the node's liveness probes know).
pub type PeerDown = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Inner<S> {
    me: MemberId,
    channels: MemberChannels,
    config: DriverConfig,
    sync: S,
    state: Mutex<State>,
    epoch_ms: i64,
    epoch: tokio::time::Instant,
}

/// The gossip of one node on tokio: the engine, its tasks and its channels.
///
/// Cheap to clone (one shared state). Build it inside a tokio runtime: it spawns a task that
/// ticks the engine, which stops when the last clone is dropped.
pub struct GossipDriver<S: SyncWork> {
    inner: Arc<Inner<S>>,
}

impl<S: SyncWork> Clone for GossipDriver<S> {
    fn clone(&self) -> Self {
        GossipDriver {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: SyncWork> GossipDriver<S> {
    /// A driver for node `me` that reaches the other members through `channels` and runs syncs
    /// through `sync`.
    pub fn new(me: MemberId, channels: MemberChannels, sync: S, config: DriverConfig) -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let state = State {
            engine: Engine::new(me.clone(), config.engine),
            results: RecentResults::new(config.results_capacity),
            waiters: HashMap::new(),
            syncs: HashMap::new(),
            finished: broadcast::channel(config.results_capacity.max(1)).0,
            events: broadcast::channel(EVENTS_CAPACITY).0,
            peer_down: None,
        };
        let inner = Arc::new(Inner {
            me,
            channels,
            config,
            sync,
            state: Mutex::new(state),
            epoch_ms,
            epoch: tokio::time::Instant::now(),
        });
        spawn_ticker(Arc::downgrade(&inner), config.tick_interval);
        GossipDriver { inner }
    }

    /// This node's id.
    #[must_use]
    pub fn node_id(&self) -> &str {
        &self.inner.me
    }

    /// Tells the driver which members are known to be down: a failed hand-off or report to one
    /// is not retried (a hung member would otherwise hold a round for `attempts` request
    /// timeouts).
    pub fn set_peer_down(&self, peer_down: PeerDown) {
        self.inner.lock().peer_down = Some(peer_down);
    }

    /// The tonic service to add to this node's gRPC server.
    #[must_use]
    pub fn service(&self) -> GossipServiceServer<GossipServer<S>> {
        GossipServiceServer::new(GossipServer {
            driver: self.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Checks every round handed to this node against `placement` (see
    /// [`Engine::set_placement`]).
    pub fn set_placement(&self, placement: Placement) {
        self.inner.lock().engine.set_placement(placement);
    }

    /// Starts a round as its origin and returns its message id at once; the round runs in
    /// the background. Read its result with [`GossipDriver::wait`] or
    /// [`GossipDriver::result`].
    pub fn start(&self, request: StartRequest) -> Result<MessageId, ContextError> {
        self.inner.input(|engine, now| engine.start(now, request))
    }

    /// Waits up to `timeout` for the result of round `message_id`, started here.
    pub async fn wait(
        &self,
        message_id: &MessageId,
        timeout: Duration,
    ) -> Result<PropagationResult, WaitError> {
        let receiver = {
            let mut state = self.inner.lock();
            if let Some(result) = state.results.get(message_id) {
                return Ok(result.clone());
            }
            if !state.engine.pending().any(|id| id == message_id) {
                return Err(WaitError::Unknown {
                    message_id: message_id.clone(),
                });
            }
            let (sender, receiver) = oneshot::channel();
            state
                .waiters
                .entry(message_id.clone())
                .or_default()
                .push(sender);
            receiver
        };
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(WaitError::Stopped {
                message_id: message_id.clone(),
            }),
            Err(_) => Err(WaitError::TimedOut {
                message_id: message_id.clone(),
                timeout,
            }),
        }
    }

    /// The result of round `message_id` if it ended and is still kept.
    #[must_use]
    pub fn result(&self, message_id: &MessageId) -> Option<PropagationResult> {
        self.inner.lock().results.get(message_id).cloned()
    }

    /// The kept results of rounds started here, newest last.
    #[must_use]
    pub fn recent_results(&self) -> Vec<PropagationResult> {
        self.inner.lock().results.iter().cloned().collect()
    }

    /// Every result of a round started here from now on, as it arrives (for metrics and for
    /// the "last round that reached every copy" of a shard). A subscriber that falls more than
    /// `results_capacity` results behind loses the oldest ones.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<PropagationResult> {
        self.inner.lock().finished.subscribe()
    }

    /// The round this node holds for `key`, if any.
    #[must_use]
    pub fn running(&self, key: &ShardKey) -> Option<MessageId> {
        self.inner.lock().engine.running(key).cloned()
    }

    /// Watches round `message_id`, started here: every step of its trace once, in order, as
    /// the holders report them (the steps already known come first), then its result. A round
    /// that already ended yields its trace's steps and its result at once.
    pub fn watch(&self, message_id: &MessageId) -> Result<RoundWatch<S>, WaitError> {
        let state = self.inner.lock();
        let mut watch = RoundWatch {
            driver: self.clone(),
            message_id: message_id.clone(),
            backlog: VecDeque::new(),
            events: None,
            next_index: 0,
        };
        if let Some(result) = state.results.get(message_id) {
            watch.finish(result.clone());
            return Ok(watch);
        }
        let Some(steps) = state.engine.steps(message_id) else {
            return Err(WaitError::Unknown {
                message_id: message_id.clone(),
            });
        };
        watch
            .backlog
            .extend(steps.iter().cloned().map(RoundEvent::Step));
        watch.events = Some(state.events.subscribe());
        Ok(watch)
    }
}

/// What a watcher of a round learns: its steps, then its result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoundEvent {
    /// One step (a sync or a skip) of the round.
    Step(RoundStep),
    /// The round ended; nothing follows.
    Finished(PropagationResult),
}

/// The events of one round, from [`GossipDriver::watch`].
pub struct RoundWatch<S: SyncWork> {
    driver: GossipDriver<S>,
    message_id: MessageId,
    backlog: VecDeque<RoundEvent>,
    /// `None` once the result is in the backlog.
    events: Option<broadcast::Receiver<RoundEvent>>,
    /// The trace position of the next step to yield.
    next_index: usize,
}

impl<S: SyncWork> RoundWatch<S> {
    /// The next event; `None` after the result (or when the driver stopped).
    pub async fn next(&mut self) -> Option<RoundEvent> {
        loop {
            if let Some(event) = self.backlog.pop_front() {
                if let RoundEvent::Step(step) = &event {
                    self.next_index = step.index as usize + 1;
                }
                return Some(event);
            }
            let events = self.events.as_mut()?;
            match events.recv().await {
                Ok(RoundEvent::Step(step))
                    if step.message_id == self.message_id
                        && step.index as usize >= self.next_index =>
                {
                    self.backlog.push_back(RoundEvent::Step(step));
                }
                Ok(RoundEvent::Finished(result))
                    if result.context.message_id == self.message_id =>
                {
                    self.finish(result);
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Steps were lost; the result, once it is in, has them all.
                    if let Some(result) = self.driver.result(&self.message_id) {
                        self.finish(result);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.events = None;
                }
            }
        }
    }

    /// Queues the steps of the result's trace not yielded yet, then the result.
    fn finish(&mut self, result: PropagationResult) {
        let missing = round_steps(&result.context, &result.trace, self.next_index);
        self.backlog
            .extend(missing.into_iter().map(RoundEvent::Step));
        self.backlog.push_back(RoundEvent::Finished(result));
        self.events = None;
    }
}

/// The progress handle of one sync: passes its calls on to the engine's
/// [`Engine::handle_sync_progress`], at most once per [`PROGRESS_EVERY`].
fn sync_progress<S: SyncWork>(
    inner: Weak<Inner<S>>,
    message_id: MessageId,
    peer: MemberId,
) -> SyncProgress {
    let told: Mutex<Option<tokio::time::Instant>> = Mutex::new(None);
    SyncProgress::new(move || {
        let now = tokio::time::Instant::now();
        {
            let mut told = told.lock().unwrap_or_else(PoisonError::into_inner);
            if told.is_some_and(|last| now.duration_since(last) < PROGRESS_EVERY) {
                return;
            }
            *told = Some(now);
        }
        if let Some(inner) = inner.upgrade() {
            inner.input(|engine, now| engine.handle_sync_progress(now, &message_id, &peer));
        }
    })
}

/// How often a sync's progress reaches the engine at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

fn spawn_ticker<S: SyncWork>(inner: Weak<Inner<S>>, every: Duration) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(inner) = inner.upgrade() else {
                break;
            };
            inner.input(|engine, now| engine.handle_tick(now));
        }
    });
}

impl<S: SyncWork> Inner<S> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Now, on the wall clock at start plus tokio's monotonic time since.
    fn now(&self) -> Millis {
        Millis(self.epoch_ms).plus(self.epoch.elapsed())
    }

    /// Feeds one input to the engine and carries out the commands it emits.
    fn input<R>(self: &Arc<Self>, f: impl FnOnce(&mut Engine, Millis) -> R) -> R {
        let mut state = self.lock();
        let result = f(&mut state.engine, self.now());
        while let Some(command) = state.engine.poll_command() {
            self.execute(&mut state, command);
        }
        result
    }

    fn execute(self: &Arc<Self>, state: &mut State, command: Command) {
        match command {
            Command::Sync(request) => {
                let inner = Arc::clone(self);
                let key = (request.message_id.clone(), request.peer.clone());
                let progress = sync_progress(
                    Arc::downgrade(self),
                    request.message_id.clone(),
                    request.peer.clone(),
                );
                let task = tokio::spawn(async move {
                    let (message_id, peer) = (request.message_id.clone(), request.peer.clone());
                    let outcome = inner.sync.sync(request, progress).await;
                    inner
                        .lock()
                        .syncs
                        .remove(&(message_id.clone(), peer.clone()));
                    inner.input(|engine, now| {
                        engine.handle_sync_done(now, &message_id, &peer, outcome);
                    });
                });
                state.syncs.insert(key, task.abort_handle());
            }
            Command::CancelSync { message_id, peer } => {
                if let Some(task) = state.syncs.remove(&(message_id, peer)) {
                    task.abort();
                }
            }
            Command::HandOff { to, propagation } => {
                let channel = self.channels.channel(&to);
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    let message_id = propagation.context.message_id.clone();
                    let outcome = inner.hand_off(channel, &to, propagation).await;
                    inner.input(|engine, now| {
                        engine.handle_hand_off(now, &message_id, &to, outcome)
                    });
                });
            }
            Command::Report { to, result } => {
                let channel = self.channels.channel(&to);
                let inner = Arc::clone(self);
                tokio::spawn(async move { inner.report(channel, &to, result).await });
            }
            Command::ReportProgress { to, progress } => {
                let channel = self.channels.channel(&to);
                let inner = Arc::clone(self);
                tokio::spawn(async move { inner.report_progress(channel, &to, progress).await });
            }
            Command::Step(step) => {
                // No watcher is not an error.
                let _ = state.events.send(RoundEvent::Step(step));
            }
            Command::Finished(result) => {
                let context = &result.context;
                tracing::info!(
                    message_id = %context.message_id, group = %context.key.group,
                    shard = context.key.shard, outcome = ?result.outcome,
                    syncs = result.syncs(), skips = result.skips(),
                    reported_by = %result.reported_by,
                    error = result.error.as_deref().unwrap_or(""), "propagation finished"
                );
                for span in &result.trace {
                    tracing::info!(
                        message_id = %context.message_id, kind = ?span.kind, from = %span.from,
                        to = %span.to, start_ms = span.start.0,
                        duration_ms = span.duration.as_millis() as u64,
                        compared = span.report.map_or(0, |r| r.compared),
                        applied = span.report.map_or(0, |r| r.applied),
                        peer_applied = span.report.map_or(0, |r| r.peer_applied),
                        bytes_sent = span.report.map_or(0, |r| r.bytes_sent),
                        bytes_received = span.report.map_or(0, |r| r.bytes_received),
                        round_trips = span.report.map_or(0, |r| r.round_trips),
                        error = span.error.as_deref().unwrap_or(""),
                        "propagation step"
                    );
                }
                for waiter in state
                    .waiters
                    .remove(&context.message_id)
                    .unwrap_or_default()
                {
                    // A waiter that gave up has dropped its receiver: nothing to do.
                    let _ = waiter.send(result.clone());
                }
                // No subscriber is not an error.
                let _ = state.finished.send(result.clone());
                let _ = state.events.send(RoundEvent::Finished(result.clone()));
                state.results.insert(result);
            }
        }
    }

    async fn hand_off(
        &self,
        channel: Option<Channel>,
        to: &str,
        propagation: Propagation,
    ) -> HandOffOutcome {
        let Some(channel) = channel else {
            return HandOffOutcome::Unreachable {
                error: format!("{to} is not a known member"),
            };
        };
        let request = pb::PropagationRequest::from(propagation);
        let down = self.peer_down(to);
        let sent = with_retries(&self.config, &down, || {
            let mut client = client(channel.clone());
            let request = request.clone();
            async move { client.propagate(request).await }
        })
        .await;
        match sent {
            Ok(response) => {
                let response = response.into_inner();
                if response.accepted {
                    HandOffOutcome::Accepted
                } else {
                    HandOffOutcome::Refused {
                        reason: response.reason,
                    }
                }
            }
            Err(status) if is_unreachable(&status) => HandOffOutcome::Unreachable {
                error: format!("{to}: {:?}: {}", status.code(), status.message()),
            },
            Err(status) => HandOffOutcome::Rejected {
                error: format!("{:?}: {}", status.code(), status.message()),
            },
        }
    }

    async fn report(&self, channel: Option<Channel>, to: &str, result: PropagationResult) {
        let message_id = result.context.message_id.clone();
        let Some(channel) = channel else {
            tracing::warn!(message_id = %message_id, origin = to, "origin is not a known member; result dropped");
            return;
        };
        let request = pb::PropagationResult::from(result);
        let down = self.peer_down(to);
        let sent = with_retries(&self.config, &down, || {
            let mut client = client(channel.clone());
            let request = request.clone();
            async move { client.report(request).await }
        })
        .await;
        if let Err(status) = sent {
            tracing::warn!(
                message_id = %message_id, origin = to, code = ?status.code(),
                error = status.message(), "could not report a result to its origin"
            );
        }
    }
}

impl<S: SyncWork> Inner<S> {
    /// Sends a holder's progress to the origin once, without retries: a lost report costs the
    /// origin's watchers nothing but timeliness, the result carries the whole trace.
    async fn report_progress(&self, channel: Option<Channel>, to: &str, progress: Progress) {
        let Some(channel) = channel else {
            return;
        };
        let message_id = progress.propagation.context.message_id.clone();
        let request = pb::PropagationProgress::from(progress);
        let mut client = client(channel);
        let call = client.report_progress(request);
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => tracing::debug!(
                message_id = %message_id, origin = to, code = ?status.code(),
                error = status.message(), "could not report progress to the origin"
            ),
            Err(_) => tracing::debug!(
                message_id = %message_id, origin = to, "no answer to a progress report"
            ),
        }
    }

    /// Whether `to` is known to be down, asked afresh after every failed attempt.
    fn peer_down(&self, to: &str) -> impl Fn() -> bool + use<S> {
        let check = self.lock().peer_down.clone();
        let to = to.to_owned();
        move || check.as_ref().is_some_and(|down| down(&to))
    }
}

/// Calls `call` up to `config.attempts` times, each bounded by `config.request_timeout`, backing
/// off between calls that fail with a transport error (see [`is_unreachable`]: worth a retry,
/// then a skip); returns the last error when every call failed. A peer that `down` says is down
/// after a failed call is not called again: its error is returned at once. (A peer is always
/// called once: a stale "down" costs nothing when it answers.)
async fn with_retries<T, F, Fut>(
    config: &DriverConfig,
    down: &impl Fn() -> bool,
    mut call: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = config.backoff_initial;
    let mut attempt = 1;
    loop {
        let answer = tokio::time::timeout(config.request_timeout, call())
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no answer within {} ms",
                    config.request_timeout.as_millis()
                )))
            });
        match answer {
            Ok(value) => return Ok(value),
            Err(status) if is_unreachable(&status) && attempt < config.attempts && !down() => {
                tracing::debug!(attempt, code = ?status.code(), "retrying after a transport error");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(config.backoff_max);
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

fn client(channel: Channel) -> GossipServiceClient<Channel> {
    GossipServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The `GossipService` of one node; get it from [`GossipDriver::service`].
pub struct GossipServer<S: SyncWork> {
    driver: GossipDriver<S>,
}

#[tonic::async_trait]
impl<S: SyncWork> GossipService for GossipServer<S> {
    async fn propagate(
        &self,
        request: Request<pb::PropagationRequest>,
    ) -> Result<Response<pb::PropagationResponse>, Status> {
        let propagation = Propagation::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let admission = self
            .driver
            .inner
            .input(|engine, now| engine.handle_propagate(now, propagation))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let response = match admission {
            Admission::Accepted => pb::PropagationResponse {
                accepted: true,
                reason: String::new(),
            },
            Admission::Refused { reason } => pb::PropagationResponse {
                accepted: false,
                reason,
            },
        };
        Ok(Response::new(response))
    }

    async fn report(
        &self,
        request: Request<pb::PropagationResult>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let result = PropagationResult::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.driver
            .inner
            .input(|engine, now| engine.handle_report(now, result));
        Ok(Response::new(pb::ReportAck {}))
    }

    async fn report_progress(
        &self,
        request: Request<pb::PropagationProgress>,
    ) -> Result<Response<pb::ReportAck>, Status> {
        let progress = Progress::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.driver
            .inner
            .input(|engine, now| engine.handle_progress(now, progress));
        Ok(Response::new(pb::ReportAck {}))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tonic::Code;

    use super::*;

    fn config() -> DriverConfig {
        DriverConfig {
            attempts: 4,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
            ..DriverConfig::default()
        }
    }

    #[tokio::test]
    async fn the_pool_holds_one_channel_per_member_with_a_valid_address() {
        let members = HashMap::from([
            ("a".to_owned(), "http://127.0.0.1:7001".to_owned()),
            ("b".to_owned(), "not a uri".to_owned()),
        ]);
        let channels = MemberChannels::new(members, Duration::from_secs(1));
        assert!(channels.channel("a").is_some());
        assert!(
            channels.channel("b").is_none(),
            "an invalid address is left out"
        );
        assert!(
            channels.channel("c").is_none(),
            "an unknown member has none"
        );
        channels.set_members(HashMap::from([(
            "c".to_owned(),
            "http://127.0.0.1:7003".to_owned(),
        )]));
        assert!(
            channels.channel("a").is_none(),
            "a member that left is dropped"
        );
        assert!(channels.channel("c").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn unavailable_is_retried_with_growing_backoff_until_it_succeeds() {
        let calls = AtomicU32::new(0);
        let begun = tokio::time::Instant::now();
        let result = with_retries(&config(), &|| false, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 3 {
                    Err(Status::unavailable("connection refused"))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.ok(), Some(3));
        // Paused time: the waits were exactly 100, 200 and then 250 (capped) ms.
        assert_eq!(begun.elapsed(), Duration::from_millis(550));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_ends_at_the_request_timeout() {
        let begun = tokio::time::Instant::now();
        let result: Result<(), Status> = with_retries(
            &DriverConfig {
                attempts: 1,
                request_timeout: Duration::from_secs(3),
                ..config()
            },
            &|| false,
            std::future::pending,
        )
        .await;
        assert_eq!(result.unwrap_err().code(), Code::DeadlineExceeded);
        assert_eq!(begun.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_known_down_is_not_called_again() {
        let calls = AtomicU32::new(0);
        let down = || calls.load(Ordering::SeqCst) >= 2;
        let begun = tokio::time::Instant::now();
        let result: Result<(), Status> = with_retries(&config(), &down, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("no answer")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "no call once the peer is down"
        );
        assert_eq!(
            begun.elapsed(),
            Duration::from_millis(100),
            "one backoff, not three"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_after_the_last_attempt_and_skip_other_errors() {
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = with_retries(&config(), &|| false, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::unavailable("down")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        calls.store(0, Ordering::SeqCst);
        let result: Result<(), Status> = with_retries(&config(), &|| false, || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Status::invalid_argument("max_count is 9")) }
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "an invalid request is not retried"
        );
    }
}
