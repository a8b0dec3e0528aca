//! The work of one sync, as the gossip sees it: a request out, a report or a failure back.
//!
//! The node crate implements [`SyncWork`] with the repair client; this crate never looks
//! inside a sync. The pure [`crate::Engine`] only emits [`SyncRequest`]s and takes their
//! outcomes back as inputs; the `transport` driver runs them through [`SyncWork`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::types::{MemberId, MessageId, ShardKey, SyncReport};

/// One pairwise sync to run: the holder of `message_id` against `peer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncRequest {
    /// The propagation the sync belongs to.
    pub message_id: MessageId,
    /// The (group, shard) to sync.
    pub key: ShardKey,
    /// The successor to sync with.
    pub peer: MemberId,
    /// Compute the differences without applying them.
    pub preview: bool,
}

/// Why a sync did not succeed. The kind decides what the round does next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyncFailure {
    /// The peer could not be reached (unknown, connect timeout, broken stream): the round
    /// records a skip, counts it and tries the node after the peer.
    #[error("peer unreachable: {error}")]
    Unreachable {
        /// What went wrong, for the trace.
        error: String,
    },
    /// The sync itself failed (tree unreadable, shape mismatch, protocol error): the round
    /// is aborted and reported to its origin.
    #[error("sync failed: {error}")]
    Failed {
        /// What went wrong, for the trace.
        error: String,
        /// What the sync had done before it failed, when known.
        report: Option<SyncReport>,
    },
}

/// The outcome of one sync.
pub type SyncOutcome = Result<SyncReport, SyncFailure>;

/// How a running sync tells the gossip that it is still moving: call [`SyncProgress::moved`]
/// whenever a message goes either way. The engine ends a sync as timed out only after the sync
/// timeout passes without a call (so a long restore that keeps moving is never cut), and the
/// driver passes the calls on at most about once a second.
#[derive(Clone)]
pub struct SyncProgress(Arc<dyn Fn() + Send + Sync>);

impl SyncProgress {
    /// A handle that calls `tell` on each [`SyncProgress::moved`].
    pub fn new(tell: impl Fn() + Send + Sync + 'static) -> Self {
        SyncProgress(Arc::new(tell))
    }

    /// A handle that tells no one (for a sync run outside a driver).
    pub fn none() -> Self {
        SyncProgress::new(|| {})
    }

    /// The sync moved a message.
    pub fn moved(&self) {
        (self.0)();
    }
}

impl fmt::Debug for SyncProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncProgress")
    }
}

/// The work of one sync, implemented by the node crate with the repair client.
///
/// The `transport` driver calls it from a spawned task and feeds the outcome back to the
/// engine; a sync that goes the sync timeout without telling `progress` it moved is dropped
/// (its future is aborted).
///
/// The implementation decides what "unreachable" means: it should return
/// [`SyncFailure::Unreachable`] for a peer it does not know, cannot connect to in time, or whose
/// stream breaks, and [`SyncFailure::Failed`] for anything that should stop the round. A failure
/// to apply one property is not a failure of the sync: count it in [`SyncReport::failed`].
pub trait SyncWork: Send + Sync + 'static {
    /// Runs the sync of `request.key` between this node and `request.peer`.
    fn sync(
        &self,
        request: SyncRequest,
        progress: SyncProgress,
    ) -> impl Future<Output = SyncOutcome> + Send;
}
