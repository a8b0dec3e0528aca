//! Maintenance of a shard: flushing the leaf log into the tree, verifying the live tree against a
//! rebuild and healing it, recording complete repairs, and purging the tombstones they make safe
//! to drop (DESIGN §3).

use std::time::Duration;

use propd_merkle::{InnerNode, Leaf};
use redb::Durability;

use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::rows::{read_meta, read_meta_snapshot};
use crate::tables::META;

/// What a tombstone purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Tombstones removed.
    pub purged: u64,
    /// The shard's purge line after this purge: tombstones with a delete time below it are
    /// gone, are never stored again and never sent (0: none).
    pub purged_below: i64,
    /// Write transactions the purge took (each removes at most the chunk size).
    pub chunks: u64,
    /// Of the purge's steps, those that writes' transactions carried (docs/protocol.md, "The
    /// life of a delete", rule 4).
    pub ridden: u64,
}

/// What a copy knows of its shard's purging: the bookkeeping of [`RedbStore::purge_tombstones`]
/// and [`RedbStore::record_complete_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeState {
    /// When the last round that completed for purging started (origin's clock, unix nanos).
    pub last_complete_round: Option<i64>,
    /// The largest cutoff a complete round gave this copy.
    pub cutoff: Option<i64>,
    /// The largest purge line this copy used (0: none).
    pub purged_below: i64,
}

/// Tombstones removed per write transaction by [`RedbStore::purge_tombstones`] when a caller
/// has no reason to choose (tests); the node paces its purges with [`crate::PURGE_PACE`].
pub const PURGE_CHUNK: usize = 64;

/// The cutoff a round that completed for purging gives every copy of its shard: its start
/// minus three clock-skew bounds (one for the delete time a client may choose, one for the
/// clock difference between the coordinator and the origin, one for the delivery of the write;
/// docs/protocol.md, "The life of a delete").
pub fn round_cutoff(started_at: i64, max_clock_skew: Duration) -> i64 {
    started_at.saturating_sub(nanos(max_clock_skew).saturating_mul(3))
}

/// The purge line of a shard at `now`: tombstones with a delete time below it may go. A shard
/// with one copy needs no round: `now - grace`. A shard with more copies also waits for a complete
/// round: `min(cutoff, now - grace)`, and nothing while it never had one.
pub fn purge_line(now: i64, grace: Duration, copies: usize, cutoff: Option<i64>) -> Option<i64> {
    let by_grace = now.saturating_sub(nanos(grace));
    if copies <= 1 {
        return Some(by_grace);
    }
    cutoff.map(|cutoff| cutoff.min(by_grace))
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The result of [`RedbStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The shard did not change since the last verification; nothing was read.
    Skipped {
        /// The shard's revision.
        revision: u64,
    },
    /// The live tree equals the tree rebuilt from the properties.
    Consistent {
        /// The revision verified.
        revision: u64,
        /// Leaves in the tree.
        leaf_count: u64,
    },
    /// The live tree differed from the rebuilt one; it was replaced by a rebuild.
    Healed {
        /// The revision of the snapshot that showed the mismatch.
        revision: u64,
        /// Entities whose leaves were missing, extra or different in the live tree (0 when only
        /// inner nodes were wrong).
        differing_leaves: usize,
        /// The live root before healing.
        live_root: InnerNode,
        /// The rebuilt root.
        rebuilt_root: InnerNode,
    },
}

/// What [`RedbStore::scrub`] did to one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    /// The shard's revision when it was read.
    pub revision: u64,
    /// Leaves in the tree after the scrub.
    pub leaves: u64,
    /// Stored row bytes read and checked.
    pub bytes: u64,
    /// Rows that failed their check (quarantined).
    pub quarantined: usize,
    /// `Some(differing leaves)` when the live tree did not match the checked rows and was
    /// healed.
    pub healed: Option<usize>,
}

/// What verification or scrub found.
struct Checked {
    outcome: VerifyOutcome,
    bytes: u64,
    rotten: usize,
}

/// Entities whose leaves are missing, extra or different between two leaf lists in (bucket,
/// entity) order. Compared leaf by leaf, not by descending the inner nodes: a corrupt tree's inner
/// nodes may hide a difference below them.
fn differing_leaves(left: &[Leaf], right: &[Leaf]) -> usize {
    let (mut i, mut j, mut count) = (0, 0, 0);
    while i < left.len() && j < right.len() {
        let (a, b) = (&left[i], &right[j]);
        match (a.bucket, &a.entity).cmp(&(b.bucket, &b.entity)) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                count += usize::from(a.digest != b.digest);
                i += 1;
                j += 1;
                continue;
            }
        }
        count += 1;
    }
    count + (left.len() - i) + (right.len() - j)
}

impl RedbStore {
    /// Applies the shard's leaf log to its leaf table and recomputes the inner nodes above the
    /// changed leaves, in one write transaction. A no-op for a clean tree. Returns the number of
    /// inner nodes recomputed.
    pub fn flush(&self, group: &str, shard: u32) -> Result<usize, StoreError> {
        self.rules.check_shard(group, shard)?;
        if !self.snapshot()?.has_pending(group, shard)? {
            return Ok(0);
        }
        // Flushed digests are derived data: after a crash the leaf log of the last durable
        // commit come back and are recomputed, so the flush need not wait for the disk.
        self.write(Durability::None, |txn| {
            let mut writer = self.shard_writer(txn, group, shard)?;
            writer.flush_tree(usize::MAX)
        })
    }

    /// Verifies the shard's live tree against a tree rebuilt from a snapshot scan of its
    /// properties; heals a mismatch by replacing the live tree with a rebuild (in one write
    /// transaction, so readers see the old or the new tree, never a mix). Skipped when the
    /// shard's revision has not changed since the last verification that passed or healed.
    /// Rows that fail their check are left out of the rebuild and quarantined by the heal.
    pub fn verify(&self, group: &str, shard: u32) -> Result<VerifyOutcome, StoreError> {
        let checked = self.guarded(|| self.check_tree(group, shard, false));
        self.settle_rot();
        Ok(checked?.outcome)
    }

    /// Scrubs the shard: recomputes every row's check digest and leaf digest from its stored
    /// bytes and compares the result with the live tree, even when the shard did not change
    /// since the last verification (stored bytes can rot at rest). Rotten rows are quarantined
    /// and the tree healed without them, so the next repair brings their good copies back.
    pub fn scrub(&self, group: &str, shard: u32) -> Result<ScrubReport, StoreError> {
        let checked = self.guarded(|| self.check_tree(group, shard, true));
        self.settle_rot();
        let checked = checked?;
        let (revision, leaves, healed) = match checked.outcome {
            VerifyOutcome::Skipped { revision } => (revision, 0, None),
            VerifyOutcome::Consistent {
                revision,
                leaf_count,
            } => (revision, leaf_count, None),
            VerifyOutcome::Healed {
                revision,
                differing_leaves,
                rebuilt_root,
                ..
            } => (revision, rebuilt_root.leaf_count, Some(differing_leaves)),
        };
        Ok(ScrubReport {
            revision,
            leaves,
            bytes: checked.bytes,
            quarantined: checked.rotten,
            healed,
        })
    }

    /// Verification and scrub: rebuild from the rows (checked), compare with the live tree,
    /// heal on a mismatch or when rows were rotten. `force` scrubs an unchanged shard too.
    fn check_tree(&self, group: &str, shard: u32, force: bool) -> Result<Checked, StoreError> {
        let snapshot = self.fresh_snapshot(group, shard)?;
        let meta = read_meta_snapshot(&snapshot.txn, group, shard)?;
        if !force && meta.revision == meta.verified_revision {
            return Ok(Checked {
                outcome: VerifyOutcome::Skipped {
                    revision: meta.revision,
                },
                bytes: 0,
                rotten: 0,
            });
        }
        let mut rotten = 0;
        let (rebuilt, bytes) = snapshot.rebuild_checked(group, shard, &mut |_| rotten += 1)?;
        let live = snapshot.tree(group, shard)?;
        drop(snapshot);
        if live == rebuilt && rotten == 0 {
            self.write(Durability::None, |txn| {
                let mut table = txn.open_table(META)?;
                let mut current = read_meta(&table, group, shard)?;
                current.verified_revision = current.verified_revision.max(meta.revision);
                table.insert((group, shard), current.encode().as_slice())?;
                Ok(())
            })?;
            return Ok(Checked {
                outcome: VerifyOutcome::Consistent {
                    revision: meta.revision,
                    leaf_count: rebuilt.leaf_count(),
                },
                bytes,
                rotten,
            });
        }
        let differing_leaves = differing_leaves(live.leaves(), rebuilt.leaves());
        tracing::warn!(
            group,
            shard,
            revision = meta.revision,
            differing_leaves,
            rotten_rows = rotten,
            live_root = %live.root().digest,
            rebuilt_root = %rebuilt.root().digest,
            "live tree differs from a rebuild from the checked rows; healing"
        );
        // The heal builds again inside its write transaction, quarantining the rotten rows it
        // meets there, so the tree it writes and the rows it keeps agree.
        let rebuilt = self.write(self.data_durability(), |txn| {
            let mut writer = self.shard_writer(txn, group, shard)?;
            let tree = writer.rebuild_tree()?;
            writer.meta.verified_revision = writer.meta.revision;
            writer.meta_changed = true;
            writer.finish(txn)?;
            Ok(tree)
        })?;
        Ok(Checked {
            outcome: VerifyOutcome::Healed {
                revision: meta.revision,
                differing_leaves,
                live_root: live.root(),
                rebuilt_root: rebuilt.root(),
            },
            bytes,
            rotten,
        })
    }

    /// Records a round that completed for purging: its start (origin's clock, unix nanos) and
    /// the cutoff it gives every copy. Durable. Neither ever moves back: an older round's notice
    /// arriving late changes nothing.
    pub fn record_complete_round(
        &self,
        group: &str,
        shard: u32,
        started_at: i64,
        cutoff: i64,
    ) -> Result<(), StoreError> {
        self.rules.check_shard(group, shard)?;
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(META)?;
            let mut meta = read_meta(&table, group, shard)?;
            meta.last_complete_repair = meta.last_complete_repair.max(started_at);
            meta.purge_cutoff = meta.purge_cutoff.max(cutoff);
            table.insert((group, shard), meta.encode().as_slice())?;
            Ok(())
        })
    }

    /// The shard's purge bookkeeping.
    pub fn purge_state(&self, group: &str, shard: u32) -> Result<PurgeState, StoreError> {
        self.rules.check_shard(group, shard)?;
        let meta = read_meta_snapshot(&self.snapshot()?.txn, group, shard)?;
        Ok(PurgeState {
            last_complete_round: (meta.last_complete_repair > 0)
                .then_some(meta.last_complete_repair),
            cutoff: (meta.purge_cutoff > 0).then_some(meta.purge_cutoff),
            purged_below: meta.purged_below,
        })
    }
}

#[cfg(test)]
mod tests {
    use propd_merkle::{Digest, Entity, Leaf};

    use super::differing_leaves;

    fn leaf(bucket: u64, id: &str, byte: u8) -> Leaf {
        Leaf {
            bucket,
            entity: Entity::new("g", "n", id).unwrap_or_else(|e| panic!("{e}")),
            digest: Digest::from_slice(&[byte; 32]).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// Leaves missing on either side, extra ones, and ones whose digests differ each count once,
    /// whichever list runs out first.
    #[test]
    fn differing_leaves_counts_each_missing_extra_or_changed_leaf() {
        let (a, b, c) = (leaf(1, "a", 1), leaf(1, "b", 1), leaf(2, "c", 1));
        let changed = leaf(1, "b", 2);
        let all = [a.clone(), b.clone(), c.clone()];
        assert_eq!(differing_leaves(&all, &all), 0);
        assert_eq!(
            differing_leaves(std::slice::from_ref(&a), &all),
            2,
            "the left runs out first"
        );
        assert_eq!(
            differing_leaves(&all, std::slice::from_ref(&a)),
            2,
            "the right runs out first"
        );
        assert_eq!(differing_leaves(&[], &all), 3);
        assert_eq!(differing_leaves(&[a.clone(), c.clone()], &[b, c]), 2);
        assert_eq!(
            differing_leaves(&[a.clone(), changed], &all),
            2,
            "b changed, c missing"
        );
    }
}
