//! Purging a shard's tombstones below its purge line while writes keep flowing (docs/protocol.md,
//! "The life of a delete"; docs/benchmarks.md, "purge").
//!
//! A purge is a job the store's writes carry: while one is in progress, every property write
//! transaction (`RedbStore::write_shards`, so every group of the group commit) also does one step
//! of it before it commits: a step removes a few tombstones (found by scanning the shard's
//! properties, inside the transaction, from where the previous step ended) and flushes a few of
//! the oldest leaf-log changes into the tree, so that the log stays short and no write meets a
//! full log and pays a whole flush. A write therefore never waits for a purge transaction of its
//! own, nor for its sync: it pays one step, and its own sync writes the step's pages. And a purge
//! cannot be starved by writes: each write transaction that starts while it is in progress moves
//! it on by one step, however the writes contend for redb's writer.
//!
//! When no write is in a transaction or waiting for one, and none carried a step for a moment
//! (`PATIENCE`), the purge takes the writer itself, in transactions that commit after a time
//! budget, a chunk of removals, or the step in progress as soon as a write waits.
//!
//! The line is raised first, in a synced transaction (a write's, made synced for that, or the
//! purge's own): the removals come after it. The other purge transactions are synced as the
//! store's writes are (a write's) or not at all (the purge's own): a purge lost in a crash is
//! redone by the next one (the line it used was durable first, so the tombstones it had removed
//! are neither stored again nor sent meanwhile), and each transaction leaves the properties, the
//! leaf log and the tree consistent with each other, so any prefix of them is a consistent store.
//! A purge whose last step was not synced ends with a synced transaction (again a write's, or its
//! own), so it is durable when it returns.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable};

use crate::config::ReadCheck;
use crate::error::StoreError;
use crate::repair_view::below_line;
use crate::store::RedbStore;
use crate::store::maintenance::PurgeReport;
use crate::store::quarantine::Rotten;
use crate::store::rows::decode_row;
use crate::store::writer::{ShardWriter, ShardWriters};

/// How a purge paces its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgePace {
    /// Tombstones one transaction of the purge's own removes at most.
    pub chunk: usize,
    /// Tombstones one step removes at most, and half the leaf-log changes it flushes: what a
    /// write's transaction carries, and the granularity at which a transaction of the purge's
    /// own checks its budget and whether a write waits. With a budget, the steps of the purge's
    /// own transactions grow while no write waits and each takes well under the budget, and
    /// fall back to this size as soon as one does.
    pub step: usize,
    /// Writer time one transaction of the purge's own takes at most before it commits (checked
    /// after each step); `None`: only the chunk bounds it.
    pub budget: Option<Duration>,
    /// Whether the purge gives way to writes: the writes' transactions carry its steps, it takes
    /// the writer itself only while no write is under way, and a transaction of its own commits
    /// after the step in progress when a write waits. Without it, the purge works in
    /// transactions of its own only, whatever else happens on the node.
    pub yield_to_writes: bool,
}

impl PurgePace {
    /// Transactions of exactly `chunk` removals each (the last may have fewer), all the purge's
    /// own, whatever else happens on the node: for tests that count them.
    pub const fn chunks(chunk: usize) -> Self {
        PurgePace {
            chunk,
            step: chunk,
            budget: None,
            yield_to_writes: false,
        }
    }
}

/// The node's purge pace (docs/benchmarks.md, "purge"): steps of 16 removals and 32 flushed
/// leaf-log changes, one in each write's transaction; alone, transactions of at most 2 ms of
/// writer time and 4 096 removals, given up to any write that waits.
pub const PURGE_PACE: PurgePace = PurgePace {
    chunk: 4096,
    step: 16,
    budget: Some(Duration::from_millis(2)),
    yield_to_writes: true,
};

/// Unsynced purge transactions of its own in a row after which the purge syncs one, when no
/// other write of the store synced meanwhile: the redb write buffer holds the pages of unsynced
/// transactions and their freed pages are reused only after a synced commit.
const SYNC_AFTER: u32 = 32;

/// Rows a step examines at most while it looks for tombstones below the line, so that a shard of
/// live properties does not hold the writer for a whole scan.
const SCAN_PER_STEP: usize = 512;

/// How long a purge waits for a write's transaction to carry its next step before it takes the
/// writer itself, once no write is under way.
const PATIENCE: Duration = Duration::from_millis(2);

/// Where a purge's scan is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cursor {
    /// The last property key the scan examined (`None`: before the first).
    after: Option<String>,
    /// Whether the scan reached the end of the shard.
    exhausted: bool,
}

/// What a purge does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Raise the line, in a synced transaction.
    Raise,
    /// Remove the tombstones below it and flush the leaf log.
    Remove,
    /// Make the removals durable: a synced transaction.
    Sync,
    /// Nothing: the purge is durable.
    Done,
}

/// How far a purge got; changed only by transactions that committed.
#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    cursor: Cursor,
    /// Leaf-log changes the purge still flushes once the scan is over: those it found then
    /// (changes that writes add later wait for the next flush).
    flush_left: Option<u64>,
    /// The line after the raise.
    purged_below: i64,
    purged: u64,
    /// Transactions that removed some tombstones.
    chunks: u64,
    /// Steps carried by writes' transactions.
    ridden: u64,
    /// Transactions that moved the purge on (writes' and its own).
    advanced: u64,
    /// Whether a transaction that moved it on since its last synced one was not synced.
    unsynced: bool,
}

/// One purge in progress.
#[derive(Debug)]
struct Job {
    id: u64,
    group: String,
    shard: u32,
    line: i64,
    /// The pace's step.
    step: usize,
    /// Whether writes' transactions carry its steps.
    rides: bool,
    progress: Progress,
    /// The error of a write's transaction that carried a step of it: the purge stops with it.
    failed: Option<StoreError>,
}

/// The purges in progress in a store, which its property writes carry.
#[derive(Debug, Default)]
pub(super) struct Purges {
    jobs: Mutex<Vec<Job>>,
    /// Signalled when a purge moved on or failed.
    changed: Condvar,
    /// Purges in progress that writes carry: a write looks at the jobs only when some are.
    riding: AtomicUsize,
    /// Of those, the ones with their line still to raise: the next write's transaction is synced
    /// (read without the lock, so that a write never waits for the jobs before it has the
    /// writer).
    raising: AtomicUsize,
    next_id: AtomicU64,
}

impl Purges {
    /// The jobs. Every change under the lock replaces whole fields, so a panic elsewhere cannot
    /// leave a job half-changed: a poisoned lock is used as it is.
    fn lock(&self) -> MutexGuard<'_, Vec<Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the next write transaction is to be synced: a purge that writes carry has its
    /// line to raise.
    pub(super) fn want_sync(&self) -> bool {
        self.raising.load(Ordering::Acquire) > 0
    }

    /// Keeps what a committed transaction did to a job, and tells its purge.
    fn keep(&self, job: &mut Job, progress: Progress) {
        if job.rides && job.progress.phase == Phase::Raise && progress.phase != Phase::Raise {
            self.raising.fetch_sub(1, Ordering::AcqRel);
        }
        job.progress = progress;
        self.changed.notify_all();
    }

    fn start(&self, group: &str, shard: u32, line: i64, pace: PurgePace, step: usize) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().push(Job {
            id,
            group: group.to_owned(),
            shard,
            line,
            step,
            rides: pace.yield_to_writes,
            progress: Progress {
                phase: Phase::Raise,
                cursor: Cursor::default(),
                flush_left: None,
                purged_below: 0,
                purged: 0,
                chunks: 0,
                ridden: 0,
                advanced: 0,
                unsynced: false,
            },
            failed: None,
        });
        if pace.yield_to_writes {
            self.riding.fetch_add(1, Ordering::AcqRel);
            self.raising.fetch_add(1, Ordering::AcqRel);
        }
        id
    }

    fn end(&self, id: u64) {
        let mut jobs = self.lock();
        if let Some(index) = jobs.iter().position(|job| job.id == id) {
            let job = jobs.swap_remove(index);
            if job.rides {
                self.riding.fetch_sub(1, Ordering::AcqRel);
                if job.progress.phase == Phase::Raise {
                    self.raising.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }
}

impl Job {
    /// Whether a write's transaction carries a step of it now.
    fn carried(&self) -> bool {
        self.rides && self.failed.is_none() && self.progress.phase != Phase::Done
    }
}

/// Position of job `id` among `jobs`; it is there from its start to its end, which only its own
/// purge calls.
fn position(jobs: &[Job], id: u64) -> usize {
    jobs.iter()
        .position(|job| job.id == id)
        .unwrap_or_else(|| unreachable!("purge job {id} ended while its purge runs"))
}

/// How durable the transaction a step runs in is.
#[derive(Debug, Clone, Copy)]
struct Durable {
    /// Synced.
    synced: bool,
    /// As durable as the store's writes are (synced, or the store does not sync).
    as_writes: bool,
}

/// What one step did.
#[derive(Debug, Default, Clone, Copy)]
struct Stepped {
    removed: u64,
    /// Whether it changed anything stored (raised the line, removed or flushed).
    wrote: bool,
    /// Whether its scan moved on (examined rows, or reached the end).
    scanned: bool,
    /// Whether it moved the purge on (wrote, scanned, or changed its phase).
    moved: bool,
}

/// The steps of the purges a write's transaction carried, kept once it committed (dropped
/// unkept when it was aborted: the purges are where they were).
pub(super) struct Carried<'a> {
    jobs: MutexGuard<'a, Vec<Job>>,
    purges: &'a Purges,
    next: Vec<(usize, Progress)>,
}

impl Carried<'_> {
    /// The transaction committed: the purges keep their steps. (The jobs were locked from the
    /// steps until now, so no transaction in between saw them where they were.)
    pub(super) fn committed(mut self) {
        for (index, progress) in std::mem::take(&mut self.next) {
            self.purges.keep(&mut self.jobs[index], progress);
        }
    }
}

/// The size of the next step of a purge's own transaction with a time budget: back to the
/// pace's `step` when a write waited, doubled (up to `chunk`) after a step that took less than a
/// quarter of the budget, halved (down to `step`) after one that took more than half of it. So a
/// purge that no write waits for works in larger steps, which flush the tree more cheaply, while
/// a write that comes waits for half the budget at most. Without a budget the size stays `step`.
fn next_step(
    size: usize,
    step: usize,
    chunk: usize,
    took: Duration,
    wanted: bool,
    budget: Option<Duration>,
) -> usize {
    match budget {
        None => step,
        Some(_) if wanted => step,
        Some(budget) if took < budget / 4 => (size * 2).min(chunk),
        Some(budget) if took > budget / 2 => (size / 2).max(step),
        Some(_) => size,
    }
}

impl ShardWriter<'_> {
    /// One step of a purge: removes at most `max` tombstones below the shard's purge line,
    /// scanning from the cursor (rows that fail their check are reported to the rot queue and
    /// skipped), then flushes at most `flush` of the oldest leaf-log changes. Returns the
    /// tombstones removed and the changes flushed.
    fn purge_step(
        &mut self,
        cursor: &mut Cursor,
        max: usize,
        flush: usize,
        check: ReadCheck,
    ) -> Result<(u64, u64), StoreError> {
        let line = self.meta.purged_below;
        let mut doomed = Vec::new();
        if !cursor.exhausted && max > 0 {
            let rows = match &cursor.after {
                Some(after) => self.props.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                ))?,
                None => self.props.range::<&str>(..)?,
            };
            let mut examined = 0;
            let mut reached_end = true;
            for row in rows {
                let (key, value) = row?;
                let (key, value) = (key.value(), value.value());
                match decode_row(key, value, check) {
                    Ok(property) if below_line(&property, line) => {
                        let entity = property.entity().map_err(|error| StoreError::Corrupt {
                            table: self.names.props.clone(),
                            detail: error.to_string(),
                        })?;
                        doomed.push(entity);
                    }
                    Ok(_) => {}
                    Err(reason) => self.rot.push(Rotten::new(&self.names, key, value, reason)),
                }
                examined += 1;
                cursor.after = Some(key.to_owned());
                if doomed.len() == max || examined == SCAN_PER_STEP {
                    reached_end = false;
                    break;
                }
            }
            cursor.exhausted = reached_end;
        }
        for entity in &doomed {
            self.remove(entity)?;
        }
        let mut flushed = 0;
        if flush > 0 {
            let before = self.pending()?;
            self.flush_tree(flush)?;
            flushed = before.saturating_sub(self.pending()?);
        }
        Ok((doomed.len() as u64, flushed))
    }

    /// Moves a purge to `line` on by one step of at most `size` removals and `2 * size` flushed
    /// leaf-log changes, in a transaction as durable as `durable` says: raises the line (only in
    /// a synced transaction), removes and flushes, or notes the purge durable (only in a
    /// transaction as durable as the store's writes). The caller keeps `progress` if the
    /// transaction commits.
    fn advance_purge(
        &mut self,
        line: i64,
        progress: &mut Progress,
        size: usize,
        durable: Durable,
        check: ReadCheck,
    ) -> Result<Stepped, StoreError> {
        let mut stepped = Stepped::default();
        let phase = progress.phase;
        match progress.phase {
            Phase::Raise if durable.synced => {
                if line > self.meta.purged_below {
                    self.meta.purged_below = line;
                    self.meta_changed = true;
                    stepped.wrote = true;
                }
                progress.purged_below = self.meta.purged_below;
                progress.phase = Phase::Remove;
            }
            Phase::Remove => {
                let from = progress.cursor.clone();
                let flush = match progress.flush_left {
                    Some(left) => (left as usize).min(2 * size),
                    None => 2 * size,
                };
                let (removed, flushed) =
                    self.purge_step(&mut progress.cursor, size, flush, check)?;
                if let Some(left) = &mut progress.flush_left {
                    *left = left.saturating_sub(flush as u64);
                }
                if progress.cursor.exhausted {
                    let pending = self.pending()?;
                    let left = progress.flush_left.get_or_insert(pending);
                    *left = (*left).min(pending);
                }
                progress.purged += removed;
                stepped.removed = removed;
                stepped.wrote = removed + flushed > 0;
                // A scan that found nothing to remove still moved on: kept, the next step
                // starts where it ended (else steps carried by writes to other shards would scan
                // the same rows for ever).
                stepped.scanned = progress.cursor != from;
                if progress.cursor.exhausted && progress.flush_left == Some(0) {
                    progress.phase = Phase::Sync;
                }
            }
            Phase::Sync if durable.as_writes => progress.phase = Phase::Done,
            Phase::Raise | Phase::Sync | Phase::Done => {}
        }
        // A commit as durable as the writes makes every earlier one as durable.
        if durable.as_writes {
            progress.unsynced = false;
        } else if stepped.wrote {
            progress.unsynced = true;
        }
        if progress.phase == Phase::Sync && !progress.unsynced {
            // The transaction that did the last removals is as durable as the writes: once
            // it commits, so is the purge.
            progress.phase = Phase::Done;
        }
        stepped.moved = stepped.wrote || stepped.scanned || progress.phase != phase;
        if stepped.moved {
            progress.advanced += 1;
        }
        if stepped.removed > 0 {
            progress.chunks += 1;
        }
        Ok(stepped)
    }
}

impl RedbStore {
    /// Raises the shard's purge line to `line` (it never moves back) and removes every
    /// tombstone whose delete time is below it, in transactions of `chunk` removals at most;
    /// nothing else is ever removed. The caller computes the line
    /// ([`crate::purge_line`]). [`RedbStore::purge_tombstones_paced`] with
    /// [`PurgePace::chunks`].
    pub fn purge_tombstones(
        &self,
        group: &str,
        shard: u32,
        line: i64,
        chunk: usize,
    ) -> Result<PurgeReport, StoreError> {
        self.purge_tombstones_paced(group, shard, line, PurgePace::chunks(chunk))
    }

    /// Raises the shard's purge line to `line` (it never moves back) and removes every
    /// tombstone whose delete time is below it, paced by `pace`; nothing else is ever removed.
    /// The caller computes the line ([`crate::purge_line`]).
    ///
    /// The line is raised first, in a synced transaction: from then on such tombstones are
    /// neither stored nor sent, even if the store crashes before they are gone. With a pace that
    /// yields to writes, the writes' transactions carry the removal (see the module's
    /// documentation); the purge is durable when this returns.
    pub fn purge_tombstones_paced(
        &self,
        group: &str,
        shard: u32,
        line: i64,
        pace: PurgePace,
    ) -> Result<PurgeReport, StoreError> {
        self.rules.check_shard(group, shard)?;
        let chunk = pace.chunk.max(1);
        let step = pace.step.clamp(1, chunk);
        let id = self.purges.start(group, shard, line, pace, step);
        let done = self.run_purge(
            id,
            PurgePace {
                chunk,
                step,
                ..pace
            },
        );
        self.purges.end(id);
        let progress = done?;
        let report = PurgeReport {
            purged: progress.purged,
            purged_below: progress.purged_below,
            chunks: progress.chunks,
            ridden: progress.ridden,
        };
        // Rows the scans found rotten were skipped (never purged, never kept as tombstones):
        // they go to the quarantine now.
        self.settle_rot();
        if report.purged > 0 {
            tracing::info!(
                group,
                shard,
                purged = report.purged,
                chunks = report.chunks,
                ridden = report.ridden,
                purged_below = report.purged_below,
                "tombstones purged"
            );
        }
        Ok(report)
    }

    /// Waits until purge `id` is done, carried by the writes' transactions, and moves it on in
    /// transactions of its own while no write is under way (or always, without `yield`).
    fn run_purge(&self, id: u64, pace: PurgePace) -> Result<Progress, StoreError> {
        // Unsynced transactions of the purge's own since the store's last synced commit (as far
        // as the purge can tell).
        let mut unsynced = 0u32;
        let mut synced_seen = self.durable_commits.load(Ordering::Acquire);
        // Whether the last round of the loop was a transaction of the purge's own, or a wait
        // that no write's transaction ended: then the purge goes on alone if no write is under
        // way.
        let mut alone = !pace.yield_to_writes;
        loop {
            {
                let mut jobs = self.purges.lock();
                let index = position(&jobs, id);
                if let Some(error) = jobs[index].failed.take() {
                    return Err(error);
                }
                if jobs[index].progress.phase == Phase::Done {
                    return Ok(jobs[index].progress.clone());
                }
                let before = jobs[index].progress.advanced;
                if pace.yield_to_writes && (!alone || self.busy_writes.load(Ordering::Acquire) > 0)
                {
                    let (jobs, waited) = self
                        .purges
                        .changed
                        .wait_timeout_while(jobs, PATIENCE, |jobs| {
                            let job = &jobs[position(jobs, id)];
                            job.progress.advanced == before && job.failed.is_none()
                        })
                        .unwrap_or_else(PoisonError::into_inner);
                    drop(jobs);
                    alone = waited.timed_out();
                    continue;
                }
            }
            let synced_now = self.durable_commits.load(Ordering::Acquire);
            if synced_now != synced_seen {
                (unsynced, synced_seen) = (0, synced_now);
            }
            let synced = self.purge_alone(id, pace, unsynced + 1 >= SYNC_AFTER)?;
            if synced {
                unsynced = 0;
                synced_seen = self.durable_commits.load(Ordering::Acquire);
            } else {
                unsynced += 1;
            }
            alone = true;
        }
    }

    /// One transaction of the purge's own: raises the line (synced), or removes and flushes in
    /// steps until the chunk, the budget, the end of the purge or (with `yield`) a write that
    /// waits, or makes the purge durable. Synced when `sync`, or when the phase needs it;
    /// returns whether it was.
    fn purge_alone(&self, id: u64, pace: PurgePace, sync: bool) -> Result<bool, StoreError> {
        let phase = {
            let jobs = self.purges.lock();
            jobs[position(&jobs, id)].progress.phase
        };
        let durability = match phase {
            Phase::Raise => Durability::Immediate,
            Phase::Sync => self.data_durability(),
            _ if sync => self.data_durability(),
            _ => Durability::None,
        };
        let durable = Durable {
            synced: matches!(durability, Durability::Immediate),
            as_writes: matches!(durability, Durability::Immediate)
                || matches!(self.data_durability(), Durability::None),
        };
        let (mut jobs, index, progress) = self.write_purge(durability, |txn| {
            let jobs = self.purges.lock();
            let index = position(&jobs, id);
            let job = &jobs[index];
            let mut progress = job.progress.clone();
            let mut writer = self.shard_writer(txn, &job.group, job.shard)?;
            let started = Instant::now();
            let mut size = job.step;
            let mut removed = 0;
            loop {
                let phase = progress.phase;
                let room = pace.chunk.saturating_sub(removed).min(size);
                let step_started = Instant::now();
                let stepped = writer.advance_purge(
                    job.line,
                    &mut progress,
                    room,
                    durable,
                    self.rules.read_check,
                )?;
                let took = step_started.elapsed();
                removed += stepped.removed as usize;
                let full = removed >= pace.chunk;
                let spent = pace
                    .budget
                    .is_some_and(|budget| started.elapsed() >= budget);
                let wanted =
                    pace.yield_to_writes && self.waiting_writes.load(Ordering::Acquire) > 0;
                size = next_step(size, job.step, pace.chunk, took, wanted, pace.budget);
                if phase != Phase::Remove
                    || progress.phase != Phase::Remove
                    || full
                    || spent
                    || wanted
                {
                    break;
                }
            }
            // One transaction moved it on, however many steps it took.
            progress.advanced = job.progress.advanced + 1;
            progress.ridden = job.progress.ridden;
            if progress.chunks > job.progress.chunks {
                progress.chunks = job.progress.chunks + 1;
            }
            writer.finish(txn)?;
            Ok((jobs, index, progress))
        })?;
        self.purges.keep(&mut jobs[index], progress);
        Ok(durable.synced)
    }

    /// Carries one step of each purge in progress that writes carry in a write's transaction
    /// of `durability`: the caller keeps them ([`Carried::committed`]) once the transaction
    /// committed. A step that fails stops its purge with [`StoreError::PurgeStep`]; the write
    /// fails with the step's error (the transaction holds part of the step).
    pub(super) fn carry_purges(
        &self,
        writers: &mut ShardWriters<'_>,
        durability: Durability,
    ) -> Result<Option<Carried<'_>>, StoreError> {
        if self.purges.riding.load(Ordering::Acquire) == 0 {
            return Ok(None);
        }
        let durable = Durable {
            synced: matches!(durability, Durability::Immediate),
            as_writes: matches!(durability, Durability::Immediate)
                || matches!(self.data_durability(), Durability::None),
        };
        let mut jobs = self.purges.lock();
        let mut next = Vec::new();
        for (index, job) in jobs.iter_mut().enumerate() {
            if !job.carried() {
                continue;
            }
            let mut progress = job.progress.clone();
            let stepped = writers.shard(&job.group, job.shard).and_then(|writer| {
                writer.advance_purge(
                    job.line,
                    &mut progress,
                    job.step,
                    durable,
                    self.rules.read_check,
                )
            });
            match stepped {
                Ok(stepped) if stepped.moved => {
                    progress.ridden += 1;
                    next.push((index, progress));
                }
                Ok(_) => {}
                Err(error) => {
                    job.failed = Some(StoreError::PurgeStep {
                        group: job.group.clone(),
                        shard: job.shard,
                        detail: error.to_string(),
                    });
                    self.purges.changed.notify_all();
                    return Err(error);
                }
            }
        }
        Ok(Some(Carried {
            jobs,
            purges: &self.purges,
            next,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use propd_merkle::{Property, Shape};

    use super::{
        Durable, PURGE_PACE, Phase, Progress, PurgePace, SCAN_PER_STEP, Stepped, next_step,
        position,
    };
    use crate::config::ReadCheck;
    use crate::config::{GroupDef, Groups, StoreConfig, WriteDurability};
    use crate::error::StoreError;
    use crate::store::RedbStore;

    /// A store whose writes are not synced: a synced commit is one a purge asked for.
    fn unsynced_store(dir: &std::path::Path) -> RedbStore {
        let groups = Groups::new([GroupDef::new("g", 1, 0)]).unwrap_or_else(|e| panic!("{e}"));
        let mut config = StoreConfig::new(dir, groups, Shape::default());
        config.durability = WriteDurability::NotSynced;
        RedbStore::open(config).unwrap_or_else(|e| panic!("open: {e}"))
    }

    fn write(store: &RedbStore, id: &str) {
        let property = Property {
            group: "g".to_owned(),
            name: "n".to_owned(),
            id: id.to_owned(),
            tags: Default::default(),
            mod_revision: 1,
            delete_time: 0,
        };
        store
            .apply(property)
            .unwrap_or_else(|e| panic!("write {id}: {e}"));
    }

    fn synced(store: &RedbStore) -> u64 {
        store.durable_commits.load(Ordering::Acquire)
    }

    /// A job's phase and the steps writes carried of it.
    fn job(store: &RedbStore, id: u64) -> (Phase, u64) {
        let jobs = store.purges.lock();
        let job = &jobs[position(&jobs, id)];
        (job.progress.phase, job.progress.ridden)
    }

    #[test]
    fn a_write_is_synced_to_carry_a_purges_raise_and_only_then() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        let purges = &store.purges;
        write(&store, "a");
        assert_eq!((synced(&store), purges.want_sync()), (0, false));

        // A purge that writes carry, its line still to raise: the next write is synced and raises
        // it; the writes after it carry its removals unsynced, as the store's writes are.
        let id = purges.start("g", 0, 1_000, PURGE_PACE, PURGE_PACE.step);
        assert!(purges.want_sync());
        let advanced = |id| {
            let jobs = store.purges.lock();
            jobs[position(&jobs, id)].progress.advanced
        };
        assert_eq!(advanced(id), 0);
        write(&store, "b");
        assert_eq!(synced(&store), 1, "the write that raised the line");
        assert_eq!(job(&store, id), (Phase::Remove, 1));
        assert_eq!(advanced(id), 1, "what the purge waits on: a write moved it");
        let state = store.purge_state("g", 0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(state.purged_below, 1_000);
        assert!(!purges.want_sync(), "the line is raised");
        write(&store, "c");
        write(&store, "d");
        assert_eq!(synced(&store), 1, "removals ride unsynced writes");
        assert_eq!(advanced(id), 2, "c finished it; d carried nothing");
        assert_eq!(
            job(&store, id).0,
            Phase::Done,
            "nothing to remove, durable as the writes"
        );
        purges.end(id);
        assert!(!purges.want_sync(), "a purge that ended past its raise");
        write(&store, "e");
        assert_eq!(synced(&store), 1);

        // A purge ended before its raise no longer asks for one.
        let id = purges.start("g", 0, 2_000, PURGE_PACE, PURGE_PACE.step);
        assert!(purges.want_sync());
        purges.end(id);
        assert!(!purges.want_sync());
        write(&store, "f");
        assert_eq!(synced(&store), 1);
    }

    /// A step carried by a write scans at most `SCAN_PER_STEP` rows, however few of them it
    /// removes: a shard of live properties does not hold a write for a whole scan.
    #[test]
    fn a_carried_step_examines_at_most_a_scans_worth_of_rows() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        let rows = SCAN_PER_STEP + SCAN_PER_STEP / 2;
        for k in 0..rows {
            write(&store, &format!("live{k}"));
        }
        let id = store
            .purges
            .start("g", 0, 1_000, PURGE_PACE, PURGE_PACE.step);
        let exhausted = || {
            let jobs = store.purges.lock();
            jobs[position(&jobs, id)].progress.cursor.exhausted
        };
        write(&store, "raise");
        assert_eq!(job(&store, id).0, Phase::Remove);
        write(&store, "first-step");
        assert!(
            !exhausted(),
            "one step scanned more than {SCAN_PER_STEP} rows"
        );
        write(&store, "second-step");
        assert!(exhausted(), "two steps scan {rows} rows and the writes'");
        store.purges.end(id);
    }

    fn synced_as_writes() -> Durable {
        Durable {
            synced: true,
            as_writes: true,
        }
    }

    /// One step of a purge to line 1 000 of shard `g`/0, with steps of 16, in a transaction of
    /// the purge's own as durable as `durable` says.
    fn step(store: &RedbStore, progress: &mut Progress, durable: Durable) -> Stepped {
        let durability = if durable.synced {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        store
            .write_purge(durability, |txn| {
                let mut writer = store.shard_writer(txn, "g", 0)?;
                let stepped = writer.advance_purge(1_000, progress, 16, durable, ReadCheck::On)?;
                writer.finish(txn)?;
                Ok(stepped)
            })
            .unwrap_or_else(|e| panic!("step: {e}"))
    }

    /// Leaf changes waiting in shard `g`/0's log.
    fn pending(store: &RedbStore) -> u64 {
        store
            .write_purge(redb::Durability::None, |txn| {
                let writer = store.shard_writer(txn, "g", 0)?;
                let pending = writer.pending()?;
                writer.finish(txn)?;
                Ok(pending)
            })
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A removal step flushes twice its size of the oldest leaf changes (fewer when the purge
    /// has fewer left to flush); one that removed or flushed in a transaction less durable than
    /// the writes leaves the purge to make it durable, one that did neither does not.
    #[test]
    fn a_step_flushes_twice_its_size_and_what_it_wrote_unsynced_is_synced_later() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        for k in 0..80 {
            write(&store, &format!("live{k}"));
        }
        let tombstone = Property {
            group: "g".to_owned(),
            name: "n".to_owned(),
            id: "t".to_owned(),
            tags: Default::default(),
            mod_revision: 1,
            delete_time: 10,
        };
        store
            .repair_apply_batch("g", 0, vec![tombstone])
            .unwrap_or_else(|e| panic!("tombstone: {e}"));
        assert_eq!(pending(&store), 81);
        let id = store.purges.start(
            "g",
            0,
            1_000,
            PurgePace {
                yield_to_writes: false,
                ..PURGE_PACE
            },
            PURGE_PACE.step,
        );
        let mut raised = {
            let jobs = store.purges.lock();
            jobs[position(&jobs, id)].progress.clone()
        };
        step(&store, &mut raised, synced_as_writes());
        assert_eq!(raised.phase, Phase::Remove);
        let not_durable = Durable {
            synced: false,
            as_writes: false,
        };
        let scanned = |flush_left| {
            let mut progress = raised.clone();
            progress.cursor.exhausted = true;
            progress.flush_left = flush_left;
            progress
        };

        // Flushing only, steps of 16: 32 changes, then at most what is left to flush.
        let mut flushing = scanned(None);
        step(&store, &mut flushing, not_durable);
        assert_eq!(pending(&store), 81 - 32);
        assert!(flushing.unsynced, "it flushed");
        let mut flushing = scanned(Some(100));
        step(&store, &mut flushing, not_durable);
        assert_eq!(pending(&store), 81 - 64);
        let mut flushing = scanned(Some(5));
        step(&store, &mut flushing, not_durable);
        assert_eq!(pending(&store), 81 - 69);

        // Removing only (nothing left to flush for it).
        let mut removing = raised.clone();
        removing.flush_left = Some(0);
        let stepped = step(&store, &mut removing, not_durable);
        assert_eq!(stepped.removed, 1);
        assert!(removing.unsynced, "it removed");

        // Neither: the purge has nothing to make durable.
        let mut idle = scanned(Some(0));
        step(&store, &mut idle, not_durable);
        assert!(!idle.unsynced);
        store.purges.end(id);
    }

    /// The line is raised only in a synced transaction: a step in an unsynced one leaves the
    /// purge waiting to raise it, and the line where it was.
    #[test]
    fn a_step_raises_the_line_only_in_a_synced_transaction() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        let alone = PurgePace {
            yield_to_writes: false,
            ..PURGE_PACE
        };
        let id = store.purges.start("g", 0, 1_000, alone, PURGE_PACE.step);
        let start = {
            let jobs = store.purges.lock();
            jobs[position(&jobs, id)].progress.clone()
        };
        for synced in [false, true] {
            let mut progress = start.clone();
            let durable = Durable {
                synced,
                as_writes: true,
            };
            let stepped = step(&store, &mut progress, durable);
            let line = store
                .purge_state("g", 0)
                .unwrap_or_else(|e| panic!("{e}"))
                .purged_below;
            if synced {
                assert_eq!(
                    (progress.phase, line, stepped.wrote),
                    (Phase::Remove, 1_000, true)
                );
            } else {
                assert_eq!(
                    (progress.phase, line, stepped.moved),
                    (Phase::Raise, 0, false)
                );
            }
        }
        // The line is raised already: raising it to the same line writes nothing.
        let mut again = start.clone();
        let stepped = step(&store, &mut again, synced_as_writes());
        assert_eq!((again.phase, stepped.wrote), (Phase::Remove, false));

        // A purge whose removals are not yet durable is done only in a transaction as durable
        // as the store's writes.
        let mut syncing = start.clone();
        syncing.phase = Phase::Sync;
        syncing.unsynced = true;
        let not_durable = Durable {
            synced: false,
            as_writes: false,
        };
        step(&store, &mut syncing, not_durable);
        assert_eq!(syncing.phase, Phase::Sync, "an unsynced transaction");
        step(&store, &mut syncing, synced_as_writes());
        assert_eq!(syncing.phase, Phase::Done);
        store.purges.end(id);
    }

    /// Writes to other shards carry a purge of a shard of many live properties, whose leaf log
    /// is flushed, to its end: a step that only scanned (removed and flushed nothing) still
    /// moves the purge's scan on.
    #[test]
    fn steps_that_only_scan_move_a_carried_purge_on() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let groups = Groups::new([GroupDef::new("g", 1, 0), GroupDef::new("h", 1, 0)])
            .unwrap_or_else(|e| panic!("{e}"));
        let mut config = StoreConfig::new(dir.path(), groups, Shape::default());
        config.durability = WriteDurability::NotSynced;
        let store = RedbStore::open(config).unwrap_or_else(|e| panic!("open: {e}"));
        let rows = SCAN_PER_STEP + SCAN_PER_STEP / 2;
        for k in 0..rows {
            write(&store, &format!("live{k}"));
        }
        store.flush("g", 0).unwrap_or_else(|e| panic!("{e}"));
        let elsewhere = |id: &str| {
            let property = Property {
                group: "h".to_owned(),
                name: "n".to_owned(),
                id: id.to_owned(),
                tags: Default::default(),
                mod_revision: 1,
                delete_time: 0,
            };
            store
                .apply(property)
                .unwrap_or_else(|e| panic!("write {id}: {e}"));
        };
        let id = store
            .purges
            .start("g", 0, 1_000, PURGE_PACE, PURGE_PACE.step);
        elsewhere("raise");
        assert_eq!(job(&store, id).0, Phase::Remove);
        for k in 0..4 {
            elsewhere(&format!("w{k}"));
        }
        assert_eq!(
            job(&store, id).0,
            Phase::Done,
            "four steps scan {rows} rows (two would do)"
        );
        store.purges.end(id);
    }

    /// A pace of zero tombstones a chunk or a step is taken as one: the purge still ends, one
    /// tombstone a transaction.
    #[test]
    fn a_pace_of_zero_is_taken_as_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        let tombstones = (0..5)
            .map(|k| Property {
                group: "g".to_owned(),
                name: "n".to_owned(),
                id: format!("t{k}"),
                tags: Default::default(),
                mod_revision: 1,
                delete_time: 10,
            })
            .collect();
        store
            .repair_apply_batch("g", 0, tombstones)
            .unwrap_or_else(|e| panic!("tombstones: {e}"));
        let zero = PurgePace {
            chunk: 0,
            step: 0,
            budget: None,
            yield_to_writes: false,
        };
        let report = store
            .purge_tombstones_paced("g", 0, 1_000, zero)
            .unwrap_or_else(|e| panic!("purge: {e}"));
        assert_eq!((report.purged, report.chunks), (5, 5));
    }

    /// A purge's own transactions are unsynced but for one in `SYNC_AFTER` (so that redb can
    /// reuse the pages they free), the raise, and the last, which makes the purge durable.
    #[test]
    fn a_purge_alone_syncs_its_raise_one_transaction_in_thirty_two_and_its_end() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let groups = Groups::new([GroupDef::new("g", 1, 0)]).unwrap_or_else(|e| panic!("{e}"));
        let store = RedbStore::open(StoreConfig::new(dir.path(), groups, Shape::default()))
            .unwrap_or_else(|e| panic!("open: {e}"));
        let tombstones = (0..100)
            .map(|k| Property {
                group: "g".to_owned(),
                name: "n".to_owned(),
                id: format!("t{k}"),
                tags: Default::default(),
                mod_revision: 1,
                delete_time: 10,
            })
            .collect();
        store
            .repair_apply_batch("g", 0, tombstones)
            .unwrap_or_else(|e| panic!("tombstones: {e}"));
        let one_by_one = PurgePace {
            chunk: 1,
            step: 1,
            budget: None,
            yield_to_writes: false,
        };
        let before = synced(&store);
        let report = store
            .purge_tombstones_paced("g", 0, 1_000, one_by_one)
            .unwrap_or_else(|e| panic!("purge: {e}"));
        assert_eq!((report.purged, report.chunks), (100, 100));
        // The raise; the 32nd, 64th and 96th of the 100 removals; the end.
        assert_eq!(synced(&store) - before, 5, "{report:?}");
    }

    /// A purge's own transaction goes on step after step until its chunk is full, its budget
    /// spent, or a write waits for the writer (then it commits after every step).
    #[test]
    fn a_purge_alone_fills_its_transactions_until_a_write_waits() {
        let pace = PurgePace {
            chunk: 64,
            step: 1,
            budget: Some(Duration::from_secs(3600)),
            yield_to_writes: true,
        };
        for waiting in [false, true] {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let store = unsynced_store(dir.path());
            let tombstones = (0..64)
                .map(|k| Property {
                    group: "g".to_owned(),
                    name: "n".to_owned(),
                    id: format!("t{k}"),
                    tags: Default::default(),
                    mod_revision: 1,
                    delete_time: 10,
                })
                .collect();
            store
                .repair_apply_batch("g", 0, tombstones)
                .unwrap_or_else(|e| panic!("tombstones: {e}"));
            if waiting {
                // A write waiting for the writer (none comes: the purge runs alone).
                store.waiting_writes.fetch_add(1, Ordering::AcqRel);
            }
            let report = store
                .purge_tombstones_paced("g", 0, 1_000, pace)
                .unwrap_or_else(|e| panic!("purge: {e}"));
            let expected = if waiting { 64 } else { 1 };
            assert_eq!(
                (report.purged, report.chunks),
                (64, expected),
                "a write waiting: {waiting}"
            );
        }
    }

    /// A purge whose removals are not yet durable takes a transaction as durable as the
    /// store's writes to end, whenever its own are unsynced.
    #[test]
    fn the_end_of_a_purge_alone_is_as_durable_as_the_writes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let groups = Groups::new([GroupDef::new("g", 1, 0)]).unwrap_or_else(|e| panic!("{e}"));
        let store = RedbStore::open(StoreConfig::new(dir.path(), groups, Shape::default()))
            .unwrap_or_else(|e| panic!("open: {e}"));
        let alone = PurgePace {
            yield_to_writes: false,
            ..PURGE_PACE
        };
        let id = store.purges.start("g", 0, 1_000, alone, PURGE_PACE.step);
        {
            let mut jobs = store.purges.lock();
            let index = position(&jobs, id);
            jobs[index].progress.phase = Phase::Sync;
            jobs[index].progress.unsynced = true;
        }
        let synced_it = store
            .purge_alone(id, alone, false)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(synced_it);
        assert_eq!(job(&store, id).0, Phase::Done);
        store.purges.end(id);
    }

    #[test]
    fn writes_carry_only_the_purges_that_yield_to_them_and_have_not_failed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = unsynced_store(dir.path());
        let purges = &store.purges;
        let alone = PurgePace {
            yield_to_writes: false,
            ..PURGE_PACE
        };
        let own = purges.start("g", 0, 1_000, alone, PURGE_PACE.step);
        let failing = purges.start("g", 0, 1_000, PURGE_PACE, PURGE_PACE.step);
        let riding = purges.start("g", 0, 1_000, PURGE_PACE, PURGE_PACE.step);
        {
            let mut jobs = purges.lock();
            let index = position(&jobs, failing);
            jobs[index].failed = Some(StoreError::PurgeStep {
                group: "g".to_owned(),
                shard: 0,
                detail: "planted".to_owned(),
            });
        }
        assert_eq!(position(&purges.lock(), riding), 2);
        write(&store, "a");
        assert_eq!(job(&store, riding), (Phase::Remove, 1), "carried");
        assert_eq!(
            job(&store, own),
            (Phase::Raise, 0),
            "runs its own transactions"
        );
        assert_eq!(
            job(&store, failing),
            (Phase::Raise, 0),
            "stopped by its error"
        );
        // The purges that writes do not carry ask for no sync.
        purges.end(riding);
        purges.end(failing);
        assert!(!purges.want_sync());
        write(&store, "b");
        assert_eq!(job(&store, own), (Phase::Raise, 0));
        assert_eq!(synced(&store), 1, "only the write that carried a raise");
        purges.end(own);
    }

    #[test]
    fn steps_grow_while_no_write_waits_and_fall_back_when_one_does() {
        let budget = Some(Duration::from_millis(2));
        let quick = Duration::from_micros(100);
        let slow = Duration::from_millis(3);
        assert_eq!(
            next_step(8, 8, 4096, quick, false, budget),
            16,
            "quick: grows"
        );
        assert_eq!(
            next_step(4096, 8, 4096, quick, false, budget),
            4096,
            "up to the chunk"
        );
        assert_eq!(
            next_step(64, 8, 4096, quick, true, budget),
            8,
            "a write waits"
        );
        assert_eq!(
            next_step(64, 8, 4096, slow, false, budget),
            32,
            "slow: shrinks"
        );
        assert_eq!(
            next_step(8, 8, 4096, slow, false, budget),
            8,
            "down to the step"
        );
        let middling = Duration::from_micros(700);
        assert_eq!(next_step(64, 8, 4096, middling, false, budget), 64, "stays");
        // The edges: exactly a quarter of the budget does not grow, exactly half does not shrink.
        let quarter = Duration::from_micros(500);
        let half = Duration::from_millis(1);
        assert_eq!(
            next_step(64, 8, 4096, quarter, false, budget),
            64,
            "a quarter"
        );
        assert_eq!(next_step(64, 8, 4096, half, false, budget), 64, "a half");
        assert_eq!(
            next_step(8, 8, 4096, quick, false, None),
            8,
            "no budget: fixed"
        );
    }
}
