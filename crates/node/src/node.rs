//! The shared state of one running node: configuration, placement, store, peers, metrics and
//! the repair controls. Services and background tasks hold it behind an `Arc`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use propd_store::{GroupDef, RedbStore, StoreHealth};

use crate::config::Config;
use crate::membership::MembershipView;
use crate::metrics::Metrics;
use crate::moves::Moves;
use crate::peers::Peers;
use crate::placement::Placement;
use crate::schedule::{MissedWrites, RoundClock};

/// Everything a node's services and tasks share.
#[derive(Debug)]
pub(crate) struct NodeState {
    /// The resolved configuration.
    pub(crate) config: Config,
    /// Shard placement: fixed with a static membership, replaced on each change seen in etcd.
    placement: RwLock<Arc<Placement>>,
    /// Where the membership comes from and whether that source answers.
    pub(crate) membership: Mutex<MembershipView>,
    /// Old copies kept in the node lists of shards on the move.
    pub(crate) moves: Mutex<Moves>,
    /// This node's store.
    pub(crate) store: Arc<RedbStore>,
    /// Channels to the other members and their health.
    pub(crate) peers: Peers,
    /// Metrics for `/metrics`.
    pub(crate) metrics: Metrics,
    /// Background repair paused by an operator.
    pub(crate) paused: AtomicBool,
    /// Repair traffic limit in bytes per second (0: none).
    pub(crate) throttle: AtomicU64,
    /// Shards whose writes missed a copy, per missed node.
    pub(crate) misses: Mutex<MissedWrites>,
    /// When each shard this node originates is next due.
    pub(crate) rounds: Mutex<RoundClock>,
    revisions: RevisionClock,
}

impl NodeState {
    /// Assembles the state of a node whose store is open.
    pub(crate) fn new(config: Config, store: RedbStore) -> Self {
        let placement = Placement::new(&config);
        let peers = Peers::new(&config.node_id, &config.members);
        let throttle = AtomicU64::new(config.repair.throttle_bytes_per_second);
        let metrics = Metrics::new(config.metrics.shard_labels);
        Self {
            config,
            placement: RwLock::new(Arc::new(placement)),
            membership: Mutex::new(MembershipView::fixed()),
            moves: Mutex::new(Moves::default()),
            store: Arc::new(store),
            peers,
            metrics,
            paused: AtomicBool::new(false),
            throttle,
            misses: Mutex::new(MissedWrites::default()),
            rounds: Mutex::new(RoundClock::default()),
            revisions: RevisionClock::default(),
        }
    }

    /// This node's id.
    pub(crate) fn me(&self) -> &str {
        &self.config.node_id
    }

    /// The placement in force (a change in etcd replaces it; a caller keeps the one it got).
    pub(crate) fn placement(&self) -> Arc<Placement> {
        Arc::clone(
            &self
                .placement
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Replaces the placement and the shards on the move (both as etcd has them: the old
    /// holders of a moving shard stay in its node list until a round covers old and new).
    pub(crate) fn set_membership(&self, placement: Placement, moves: Moves) {
        let mut current = lock(&self.moves);
        *self
            .placement
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(placement);
        *current = moves;
    }

    /// A round over `covered` completed for (group, shard): a move it finishes ends here.
    /// Returns whether one did.
    pub(crate) fn round_completed(&self, group: &str, shard: u32, covered: &[String]) -> bool {
        let Some(def) = self.placement().group(group).cloned() else {
            return false;
        };
        let list = self.node_ids(&def, shard);
        let ended = lock(&self.moves).round_completed(group, shard, covered, &list);
        if ended {
            tracing::info!(
                group,
                shard,
                "move finished: the new copies completed a round; the old ones leave the node list"
            );
        }
        ended
    }

    /// Whether this node holds a copy of (group, shard), an old one on the move included.
    pub(crate) fn holds(&self, group: &GroupDef, shard: u32) -> bool {
        self.node_ids(group, shard).iter().any(|id| id == self.me())
    }

    /// A new revision for a coordinated write: unix nanoseconds, strictly increasing.
    pub(crate) fn next_revision(&self) -> i64 {
        self.revisions.next(now_nanos())
    }

    /// The node ids of (group, shard)'s copies, in placement order, then the old copies of a
    /// shard on the move (they keep getting writes and rounds until the move ends).
    pub(crate) fn node_ids(&self, group: &GroupDef, shard: u32) -> Vec<String> {
        let mut ids: Vec<String> = self
            .placement()
            .node_list(group, shard)
            .iter()
            .map(|m| m.id.clone())
            .collect();
        for id in lock(&self.moves).leaving(&group.name, shard) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// Every (group, shard) this node holds a copy of.
    pub(crate) fn local_shards(&self) -> Vec<(String, u32)> {
        let mut shards = Vec::new();
        let placement = self.placement();
        for group in placement.groups() {
            for shard in 0..group.shard_num {
                if self.node_ids(group, shard).iter().any(|id| id == self.me()) {
                    shards.push((group.name.clone(), shard));
                }
            }
        }
        shards
    }

    /// Remembers that a write to (group, shard) missed `node`.
    pub(crate) fn record_miss(&self, node: &str, group: &str, shard: u32) {
        lock(&self.misses).record(node, group, shard);
    }

    /// Why the store cannot fully serve (`/health` and `status` show it), `None` when it can.
    pub(crate) fn store_fault(&self) -> Option<String> {
        match self.store.health() {
            StoreHealth::Ok => None,
            StoreHealth::DiskFull(detail) => Some(format!(
                "disk full: writes to {} fail ({detail}); reads go on",
                self.store.path().display()
            )),
            StoreHealth::WritesFailing(detail) => Some(format!(
                "store writes fail: {} ({detail}); reads go on",
                self.store.path().display()
            )),
            StoreHealth::Damaged(detail) => Some(format!("store damaged: {detail}")),
            other => Some(format!("store unhealthy: {other:?}")),
        }
    }

    /// Whether background repair is paused.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}

/// Locks `mutex`; a lock poisoned by a panic elsewhere is recovered, not propagated.
///
/// This is the node's one lock-poisoning policy. Every mutex in the node guards bookkeeping
/// (member health, missed writes, round due times, last-repair times) changed by single map
/// operations that leave it consistent at every step, so a panic while holding the lock cannot
/// leave half an update behind. Recovering keeps the node serving and repairing instead of
/// turning one panicked task into a panic in every later caller.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Unix time in nanoseconds.
pub(crate) fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Unix time in milliseconds.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Strictly increasing revisions from a wall clock that may stand still or step back.
#[derive(Debug, Default)]
pub(crate) struct RevisionClock {
    last: AtomicI64,
}

impl RevisionClock {
    /// `max(now, last + 1)`, atomically.
    pub(crate) fn next(&self, now: i64) -> i64 {
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_increase_even_when_the_clock_stands_still_or_steps_back() {
        let clock = RevisionClock::default();
        assert_eq!(clock.next(100), 100);
        assert_eq!(clock.next(100), 101);
        assert_eq!(clock.next(50), 102);
        assert_eq!(clock.next(500), 500);
    }
}
