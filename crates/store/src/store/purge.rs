//! Purging a shard's tombstones below its purge line, in short write transactions that give the
//! writer back to the node's writes (docs/protocol.md, "The life of a delete";
//! docs/benchmarks.md, "purge").
//!
//! A purge transaction works in steps: a step removes a few tombstones (found by scanning the
//! shard's properties, inside the transaction, from where the previous step ended) and flushes
//! a few of the oldest leaf-log changes into the tree, so that the log stays short and no write
//! meets a full log and pays a whole flush. The transaction commits after the step that reached
//! the chunk or its time budget, or, as soon as another write waits for the writer, after the
//! step in progress.
//!
//! Purge transactions are not synced: a purge lost in a crash is redone by the next one (the
//! purge line it used was made durable first, so the tombstones it had removed are neither
//! stored again nor sent meanwhile), and each transaction leaves the properties, the leaf log
//! and the tree consistent with each other, so any prefix of them is a consistent store. They
//! become durable with the next synced commit of the store: a write's, or the purge's own when
//! no write synced for a while, and always the purge's last one.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable};

use crate::error::StoreError;
use crate::repair_view::below_line;
use crate::store::RedbStore;
use crate::store::maintenance::PurgeReport;
use crate::store::quarantine::Rotten;
use crate::store::rows::{decode_row, read_meta};
use crate::store::writer::ShardWriter;
use crate::tables::META;

/// How a purge paces its write transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgePace {
    /// Tombstones one transaction removes at most.
    pub chunk: usize,
    /// Tombstones one step removes at most, and half the leaf-log changes it flushes: the
    /// granularity at which a transaction checks its budget and whether a write waits. With a
    /// budget, steps grow while no write waits and each takes well under the budget, and fall
    /// back to this size as soon as one does.
    pub step: usize,
    /// Writer time one transaction takes at most before it commits (checked after each step);
    /// `None`: only the chunk bounds it.
    pub budget: Option<Duration>,
    /// Whether a transaction commits after the step in progress when another write waits for
    /// the writer, and the next waits until that write has the writer.
    pub yield_to_writes: bool,
}

impl PurgePace {
    /// Transactions of exactly `chunk` removals each (the last may have fewer), whatever else
    /// happens on the node: for tests that count them.
    pub const fn chunks(chunk: usize) -> Self {
        PurgePace {
            chunk,
            step: chunk,
            budget: None,
            yield_to_writes: false,
        }
    }
}

/// The node's purge pace (docs/benchmarks.md, "purge"): steps of 8 removals and 16 flushed
/// leaf-log changes, transactions of at most 2 ms of writer time and 4 096 removals, given up
/// to any write that waits.
pub const PURGE_PACE: PurgePace = PurgePace {
    chunk: 4096,
    step: 8,
    budget: Some(Duration::from_millis(2)),
    yield_to_writes: true,
};

/// Unsynced purge transactions in a row after which the purge syncs one itself, when no other
/// write of the store synced meanwhile: the redb write buffer holds the pages of unsynced
/// transactions and their freed pages are reused only after a synced commit.
const SYNC_AFTER: u32 = 32;

/// Rows a step examines at most while it looks for tombstones below the line, so that a shard of
/// live properties does not hold the writer for a whole scan.
const SCAN_PER_STEP: usize = 512;

/// How long a purge waits, between two transactions, for the writes that wait for the writer.
const GIVE_WAY: Duration = Duration::from_millis(50);

/// Where a purge's scan is.
struct Cursor {
    /// The last property key the scan examined (`None`: before the first).
    after: Option<String>,
    /// Whether the scan reached the end of the shard.
    exhausted: bool,
}

/// What one purge transaction did.
#[derive(Debug, Default)]
struct Done {
    removed: u64,
    flushed: u64,
    /// Leaf-log changes left after it.
    pending: u64,
}

/// The size of the next step of a purge with a time budget: back to the pace's `step` when a
/// write waited, doubled (up to `chunk`) after a step that took less than a quarter of the
/// budget, halved (down to `step`) after one that took more than half of it. So a purge that no
/// write waits for works in larger steps, which flush the tree more cheaply, while a write that
/// comes waits for half the budget at most. Without a budget the size stays `step`.
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
        check: crate::config::ReadCheck,
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
    /// The line is raised first, in its own synced transaction: from then on such tombstones are
    /// neither stored nor sent, even if the store crashes before they are gone. The removal then
    /// runs in short unsynced transactions (see the module's documentation), and the leaf log is
    /// flushed along; the purge's last transaction is synced, so the purge is durable when this
    /// returns.
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
        let purged_below = self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(META)?;
            let mut meta = read_meta(&table, group, shard)?;
            if line > meta.purged_below {
                meta.purged_below = line;
                table.insert((group, shard), meta.encode().as_slice())?;
            }
            Ok(meta.purged_below)
        })?;
        let mut report = PurgeReport {
            purged_below,
            ..PurgeReport::default()
        };
        let mut cursor = Cursor {
            after: None,
            exhausted: false,
        };
        // Leaf-log changes the purge still flushes once the scan is over: those it found then
        // (changes that writes add later wait for the next flush).
        let mut flush_left: Option<u64> = None;
        // Unsynced purge transactions since the store's last synced commit (as far as the
        // purge can tell), and whether any since the purge's own last synced one.
        let mut unsynced = 0u32;
        let mut to_sync = false;
        // The current step size (see `next_step`).
        let mut size = step;
        let mut synced_seen = self.durable_commits.load(Ordering::Acquire);
        loop {
            let synced_now = self.durable_commits.load(Ordering::Acquire);
            if synced_now != synced_seen {
                (unsynced, synced_seen) = (0, synced_now);
            }
            let durability = if unsynced + 1 >= SYNC_AFTER {
                self.data_durability()
            } else {
                Durability::None
            };
            let done = self.write_purge(durability, |txn| {
                let mut writer = self.shard_writer(txn, group, shard)?;
                let started = Instant::now();
                let mut done = Done::default();
                loop {
                    let room = chunk.saturating_sub(done.removed as usize).min(size);
                    let flush = match flush_left {
                        Some(left) => (left as usize).min(2 * size),
                        None => 2 * size,
                    };
                    if cursor.exhausted && flush == 0 {
                        break;
                    }
                    let step_started = Instant::now();
                    let (removed, flushed) =
                        writer.purge_step(&mut cursor, room, flush, self.rules.read_check)?;
                    let took = step_started.elapsed();
                    done.removed += removed;
                    done.flushed += flushed;
                    if let Some(left) = &mut flush_left {
                        *left = left.saturating_sub(flush as u64);
                    }
                    done.pending = writer.pending()?;
                    if cursor.exhausted {
                        let left = flush_left.get_or_insert(done.pending);
                        *left = (*left).min(done.pending);
                    }
                    let full = done.removed as usize >= chunk;
                    let finished = cursor.exhausted && flush_left == Some(0);
                    let spent = pace
                        .budget
                        .is_some_and(|budget| started.elapsed() >= budget);
                    let wanted =
                        pace.yield_to_writes && self.waiting_writes.load(Ordering::Acquire) > 0;
                    size = next_step(size, step, chunk, took, wanted, pace.budget);
                    if full || finished || spent || wanted {
                        break;
                    }
                }
                writer.finish(txn)?;
                Ok(done)
            })?;
            if !matches!(durability, Durability::None) {
                (unsynced, to_sync) = (0, false);
                synced_seen = self.durable_commits.load(Ordering::Acquire);
            } else if done.removed + done.flushed > 0 {
                (unsynced, to_sync) = (unsynced + 1, true);
            }
            if done.removed > 0 {
                report.purged += done.removed;
                report.chunks += 1;
            }
            if cursor.exhausted && flush_left == Some(0) {
                break;
            }
            if pace.yield_to_writes {
                self.give_way();
            }
        }
        if to_sync {
            // The purge's unsynced transactions become durable with this one (other writes'
            // synced commits may have made them durable already: not worth finding out).
            self.write(self.data_durability(), |_| Ok(()))?;
        }
        // Rows the scans found rotten were skipped (never purged, never kept as tombstones):
        // they go to the quarantine now.
        self.settle_rot();
        if report.purged > 0 {
            tracing::info!(
                group,
                shard,
                purged = report.purged,
                chunks = report.chunks,
                purged_below,
                "tombstones purged"
            );
        }
        Ok(report)
    }

    /// Waits (a little at most) until no write waits for the writer, so that the purge's next
    /// transaction comes after them.
    fn give_way(&self) {
        let started = Instant::now();
        while self.waiting_writes.load(Ordering::Acquire) > 0 && started.elapsed() < GIVE_WAY {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::next_step;

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
        assert_eq!(
            next_step(8, 8, 4096, quick, false, None),
            8,
            "no budget: fixed"
        );
    }
}
