//! Group commit: synced writes that arrive while another write's transaction is syncing wait,
//! and the next of them commits all that waited in one write transaction, with one sync.
//!
//! Leader and followers, with no timer: a write that finds no commit in progress leads at once
//! and commits alone, so a single write is never delayed. Writes that arrive while a leader
//! commits queue up. When the leader's commit returns, it answers every member of its group with
//! the member's own result and hands the lead to the first queued write, which takes the whole
//! queue as the next group. A member is answered only with the result the commit function
//! returned for it, so an acknowledged write is as durable as that function makes it.
//!
//! The module knows nothing of redb: the caller passes the commit function, which applies a group
//! and returns one result per member (`RedbStore` applies the group in one transaction and, when
//! one member fails there, each member alone, so that a failure refuses only itself).

use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};

use crate::error::StoreError;

/// A group's number, counted from 0 by each [`GroupCommit`].
pub(crate) type GroupId = u64;

/// Commits one group: one result per operation, in the order given.
pub(crate) type CommitFn<'a, Op, Done> =
    &'a (dyn Fn(GroupId, &[Op]) -> Vec<Result<Done, StoreError>> + 'a);

/// The writes waiting for a group commit, and who leads.
pub(crate) struct GroupCommit<Op, Done> {
    state: Mutex<State<Op, Done>>,
    /// Test-only: what was synced and what was acknowledged.
    #[cfg(test)]
    pub(crate) log: std::sync::OnceLock<std::sync::Arc<tests::CommitLog>>,
}

struct State<Op, Done> {
    /// Writes waiting for the next group, in arrival order.
    waiting: Vec<Waiting<Op, Done>>,
    /// Whether a leader is committing, or has been handed the lead and is about to.
    leading: bool,
    next_group: GroupId,
}

struct Waiting<Op, Done> {
    op: Op,
    reply: mpsc::Sender<Reply<Done>>,
}

enum Reply<Done> {
    /// The member's own result, after its group's commit returned: the group, the member's
    /// position in it, the result.
    Done(GroupId, usize, Result<Done, StoreError>),
    /// Take the queue and commit it.
    Lead,
}

impl<Op, Done> std::fmt::Debug for GroupCommit<Op, Done> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state();
        f.debug_struct("GroupCommit")
            .field("waiting", &state.waiting.len())
            .field("leading", &state.leading)
            .field("next_group", &state.next_group)
            .finish()
    }
}

impl<Op, Done> Default for GroupCommit<Op, Done> {
    fn default() -> Self {
        GroupCommit {
            state: Mutex::new(State {
                waiting: Vec::new(),
                leading: false,
                next_group: 0,
            }),
            #[cfg(test)]
            log: std::sync::OnceLock::new(),
        }
    }
}

impl<Op, Done> GroupCommit<Op, Done> {
    /// The queue. Every change under the lock is one push, take or flag, so a panic elsewhere
    /// cannot leave it half-changed: a poisoned lock is used as it is.
    fn state(&self) -> MutexGuard<'_, State<Op, Done>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits `op` in the next group and returns its own result once that group's commit
    /// returned. Leads the group at once when no commit is in progress.
    pub(crate) fn submit(
        &self,
        op: Op,
        commit: CommitFn<'_, Op, Done>,
    ) -> Result<Done, StoreError> {
        let (reply, answers) = mpsc::channel();
        let lead_now = {
            let mut state = self.state();
            state.waiting.push(Waiting { op, reply });
            !std::mem::replace(&mut state.leading, true)
        };
        if lead_now {
            self.lead(commit);
        }
        loop {
            match answers.recv() {
                Ok(Reply::Done(group, member, result)) => {
                    #[cfg(test)]
                    if let Some(log) = self.log.get() {
                        log.acknowledge(group, member);
                    }
                    let _ = (group, member);
                    return result;
                }
                Ok(Reply::Lead) => self.lead(commit),
                // The leader went away (a panic) without answering this member.
                Err(mpsc::RecvError) => return Err(StoreError::GroupCommitAbandoned),
            }
        }
    }

    /// Takes the queue as one group, commits it, answers each member and hands the lead on.
    fn lead(&self, commit: CommitFn<'_, Op, Done>) {
        let (group, members) = {
            let mut state = self.state();
            let group = state.next_group;
            state.next_group += 1;
            (group, std::mem::take(&mut state.waiting))
        };
        // Handed on even if `commit` panics, so that the writes queued behind it still commit.
        let _hand_over = HandOver(self);
        let (ops, replies): (Vec<Op>, Vec<_>) = members
            .into_iter()
            .map(|waiting| (waiting.op, waiting.reply))
            .unzip();
        let results = commit(group, &ops);
        debug_assert_eq!(results.len(), ops.len(), "one result per member");
        for (member, (reply, result)) in replies.iter().zip(results).enumerate() {
            // A member whose caller is gone needs no answer.
            let _ = reply.send(Reply::Done(group, member, result));
        }
    }

    /// Test-only: records that `members` of `group` were committed and synced. The commit
    /// function calls it right after a synced commit returned.
    pub(crate) fn synced(&self, group: GroupId, members: std::ops::Range<usize>) {
        #[cfg(test)]
        if let Some(log) = self.log.get() {
            log.synced(group, members.clone());
        }
        let _ = (group, members);
    }
}

/// Hands the lead to the first queued write when the leader is done, or ends the lead.
struct HandOver<'a, Op, Done>(&'a GroupCommit<Op, Done>);

impl<Op, Done> Drop for HandOver<'_, Op, Done> {
    fn drop(&mut self) {
        let mut state = self.0.state();
        // A queued write whose caller is gone cannot lead; the next leader commits it anyway.
        let handed = state
            .waiting
            .iter()
            .any(|waiting| waiting.reply.send(Reply::Lead).is_ok());
        if !handed {
            state.leading = false;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, Mutex, mpsc};
    use std::time::Duration;

    use super::{GroupCommit, GroupId};
    use crate::error::StoreError;

    /// What a group commit synced and acknowledged: every acknowledgement checks that its own
    /// member was synced before it.
    #[derive(Debug, Default)]
    pub(crate) struct CommitLog {
        synced: Mutex<BTreeSet<(GroupId, usize)>>,
        acknowledged: AtomicUsize,
        /// The largest number of members synced by one commit.
        largest: AtomicUsize,
    }

    impl CommitLog {
        pub(crate) fn synced(&self, group: GroupId, members: std::ops::Range<usize>) {
            self.largest.fetch_max(members.len(), Ordering::SeqCst);
            let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
            synced.extend(members.map(|member| (group, member)));
        }

        pub(crate) fn acknowledge(&self, group: GroupId, member: usize) {
            let synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                synced.contains(&(group, member)),
                "member {member} of group {group} was acknowledged before it was synced"
            );
            self.acknowledged.fetch_add(1, Ordering::SeqCst);
        }

        pub(crate) fn acknowledged(&self) -> usize {
            self.acknowledged.load(Ordering::SeqCst)
        }

        pub(crate) fn largest(&self) -> usize {
            self.largest.load(Ordering::SeqCst)
        }
    }

    impl<Op, Done> GroupCommit<Op, Done> {
        /// Starts logging syncs and acknowledgements.
        pub(crate) fn observe(&self) -> Arc<CommitLog> {
            Arc::clone(self.log.get_or_init(Default::default))
        }

        fn waiting(&self) -> usize {
            self.state().waiting.len()
        }

        fn leading(&self) -> bool {
            self.state().leading
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2_000 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("timed out waiting until {what}");
    }

    /// Commits each group after `gate` lets it, recording the group's operations, and answers
    /// each operation with itself times ten (or an error for 13).
    struct Gated {
        gate: Mutex<mpsc::Receiver<()>>,
        groups: Mutex<Vec<Vec<u32>>>,
        commits: Arc<GroupCommit<u32, u32>>,
    }

    impl Gated {
        fn commit(&self, group: GroupId, ops: &[u32]) -> Vec<Result<u32, StoreError>> {
            self.gate
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv()
                .unwrap_or_else(|e| panic!("gate: {e}"));
            self.groups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(ops.to_vec());
            self.commits.synced(group, 0..ops.len());
            ops.iter()
                .map(|&op| match op {
                    13 => Err(StoreError::GroupCommitAbandoned),
                    op => Ok(op * 10),
                })
                .collect()
        }
    }

    /// Each group is numbered apart from every other, so that what was synced is told apart
    /// group by group (an acknowledgement matches only its own group's sync).
    #[test]
    fn each_group_has_a_number_of_its_own() {
        let commits = GroupCommit::<u32, u32>::default();
        let seen = Mutex::new(Vec::new());
        for op in 0..3 {
            let done = commits.submit(op, &|group, ops| {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(group);
                ops.iter().map(|&op| Ok(op)).collect()
            });
            assert_eq!(done.ok(), Some(op));
        }
        assert_eq!(*seen.lock().unwrap_or_else(|e| e.into_inner()), [0, 1, 2]);
    }

    #[test]
    fn a_lone_write_commits_at_once_and_writes_that_queue_meanwhile_share_the_next_commit() {
        let commits = Arc::new(GroupCommit::<u32, u32>::default());
        let log = commits.observe();
        let (open, gate) = mpsc::channel();
        let gated = Arc::new(Gated {
            gate: Mutex::new(gate),
            groups: Mutex::new(Vec::new()),
            commits: Arc::clone(&commits),
        });
        // A write alone leads at once: its commit is called without waiting for anything else.
        open.send(()).unwrap_or_else(|e| panic!("{e}"));
        let alone = commits.submit(1, &|group, ops| gated.commit(group, ops));
        assert_eq!(alone.ok(), Some(10));

        // The next write leads and blocks in its commit; three more queue behind it.
        let first = {
            let (commits, gated) = (Arc::clone(&commits), Arc::clone(&gated));
            std::thread::spawn(move || commits.submit(2, &|group, ops| gated.commit(group, ops)))
        };
        wait_until("the leader took its group", || {
            commits.leading() && commits.waiting() == 0
        });
        let start = Arc::new(Barrier::new(3));
        let queued: Vec<_> = [3, 13, 4]
            .into_iter()
            .map(|op| {
                let (commits, gated, start) =
                    (Arc::clone(&commits), Arc::clone(&gated), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    commits.submit(op, &|group, ops| gated.commit(group, ops))
                })
            })
            .collect();
        wait_until("three writes queue", || commits.waiting() == 3);
        assert_eq!(
            log.acknowledged(),
            1,
            "nothing answered while the commit runs"
        );
        open.send(()).unwrap_or_else(|e| panic!("{e}"));
        open.send(()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            first.join().unwrap_or_else(|_| panic!("leader")).ok(),
            Some(20)
        );
        let answers: Vec<Option<u32>> = queued
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|_| panic!("member")).ok())
            .collect();
        assert_eq!(answers, [Some(30), None, Some(40)], "each its own result");
        let groups = gated
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        assert_eq!(groups.len(), 3, "three commits for five writes: {groups:?}");
        assert_eq!(groups[..2], [vec![1], vec![2]]);
        let mut shared = groups[2].clone();
        shared.sort_unstable();
        assert_eq!(shared, [3, 4, 13], "the queued writes shared one commit");
        assert_eq!(log.acknowledged(), 5);
        assert_eq!(commits.waiting(), 0);
    }

    #[test]
    fn an_answer_before_its_sync_is_caught_by_the_log() {
        // The check the store's concurrency test relies on: an acknowledgement of a member that
        // was not synced fails.
        let log = CommitLog::default();
        log.synced(0, 0..2);
        log.acknowledge(0, 1);
        let early = std::panic::catch_unwind(|| log.acknowledge(1, 0));
        assert!(
            early.is_err(),
            "an unsynced member's acknowledgement panics"
        );
    }
}
