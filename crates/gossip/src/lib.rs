//! Chain gossip for propd: one repair round for a (group, shard) carried along the shard's
//! node list, a pairwise sync at each hop, `2n - 3` syncs and skips in all, the result and its
//! trace returned to the node that started it (DESIGN §6, `docs/protocol.md`).
//!
//! # Shape
//!
//! - [`Engine`] is the state machine of one node. It is pure and deterministic: the caller
//!   feeds it inputs (`start`, `handle_propagate`, `handle_sync_done`, `handle_hand_off`,
//!   `handle_progress`, `handle_report`, `handle_tick`), each with the current time as a
//!   [`Millis`], and drains the [`Command`]s it emits with [`Engine::poll_command`] (the
//!   "engine emits commands" shape of openraft). It owns no socket, spawns no task and reads no
//!   clock.
//! - [`SyncWork`] is the work of one sync. The node crate implements it with the repair
//!   client; the engine only sees a sync's outcome ([`SyncReport`] or [`SyncFailure`]).
//! - [`RecentResults`] is the origin's bounded store of recent results, read by message id.
//! - `transport` (cargo feature `transport`, off by default) is the tonic driver: the
//!   `GossipService` server, a pool of lazily connected channels to known members, hand-off
//!   with retry and backoff, and `start` / `wait` for the origin. It is behind a feature so that
//!   `cargo tree -p propd-gossip -e normal -i tokio` finds nothing with default features: the
//!   protocol logic provably does not depend on an async runtime.
//! - `convert` maps the domain types to and from the `propd.v1` messages (as `From` /
//!   `TryFrom` impls). The engine never sees a wire type; only `transport` uses them, at its
//!   edge.
//!
//! # Use from the node
//!
//! Build one `transport::MemberChannels` pool per node (`members` maps member ids to URIs such
//! as `http://10.0.0.7:7700`, and should include this node) and use it for every client the node
//! has; build one `transport::GossipDriver` with `GossipDriver::new(member_id, channels,
//! sync_work, DriverConfig::default())` inside the tokio runtime, add `driver.service()` to the
//! node's tonic server, and keep the pool's `set_members` up to date. To repair
//! a shard: `driver.start(StartRequest { key, nodes, preview })` returns the message id at once;
//! `driver.wait(&id, timeout)` waits for the result, `driver.result(&id)` and
//! `driver.recent_results()` read the kept ones, `driver.subscribe()` streams every result, and
//! `driver.watch(&id)` yields a round's steps as the holders report them, then its result.
//!
//! # What this crate does not do
//!
//! It knows nothing of Merkle trees, stores or properties (a sync is opaque), does not compute
//! placement (the caller passes the node list) and does not discover members (the caller gives
//! the driver each member's address).

mod convert;
mod engine;
mod results;
mod sync;
#[cfg(feature = "transport")]
pub mod transport;
mod types;

pub use convert::ConvertError;
pub use engine::{
    Admission, Command, Config, ContextError, Engine, HandOffOutcome, MAX_NODES, Placement,
    StartRequest,
};
pub use results::RecentResults;
pub use sync::{SyncFailure, SyncOutcome, SyncProgress, SyncRequest, SyncWork};
pub use types::{
    Context, MemberId, MessageId, Millis, Outcome, Progress, Propagation, PropagationResult,
    RoundStep, ShardKey, SpanKind, SyncReport, TraceSpan, max_count, round_steps,
};
