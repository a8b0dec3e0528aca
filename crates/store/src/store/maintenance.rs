//! Maintenance of a shard: flushing the leaf log into the tree, verifying the live tree against a
//! rebuild and healing it, recording complete repairs, and purging the tombstones they make safe
//! to drop (DESIGN §3).

use std::time::Duration;

use propd_merkle::{Entity, InnerNode, Leaf};
use redb::{Durability, ReadableTable};

use crate::config::ReadCheck;
use crate::error::StoreError;
use crate::store::RedbStore;
use crate::store::quarantine::Rotten;
use crate::store::rows::{decode_row, read_meta, read_meta_snapshot};
use crate::tables::META;

/// What a tombstone purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PurgeReport {
    /// Tombstones removed.
    pub purged: u64,
    /// Tombstones with `delete_time` below this were eligible; `None` when the shard never had a
    /// complete repair, so nothing was eligible.
    pub cutoff: Option<i64>,
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

/// The purge cutoff: tombstones with `delete_time` below it may go. `None` when the shard never
/// had a complete repair.
pub(crate) fn purge_cutoff(now: i64, grace: Duration, last_complete_repair: i64) -> Option<i64> {
    if last_complete_repair <= 0 {
        return None;
    }
    let grace = i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX);
    Some(now.saturating_sub(grace).min(last_complete_repair))
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
            writer.flush_tree()
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

    /// Records when the last repair round that reached every copy of the shard started (unix
    /// nanoseconds). Durable; an earlier time than the stored one is ignored.
    pub fn set_last_complete_repair(
        &self,
        group: &str,
        shard: u32,
        time: i64,
    ) -> Result<(), StoreError> {
        self.rules.check_shard(group, shard)?;
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(META)?;
            let mut meta = read_meta(&table, group, shard)?;
            meta.last_complete_repair = meta.last_complete_repair.max(time);
            table.insert((group, shard), meta.encode().as_slice())?;
            Ok(())
        })
    }

    /// The last complete repair time of the shard, `None` if never set.
    pub fn last_complete_repair(&self, group: &str, shard: u32) -> Result<Option<i64>, StoreError> {
        self.rules.check_shard(group, shard)?;
        let meta = read_meta_snapshot(&self.snapshot()?.txn, group, shard)?;
        Ok((meta.last_complete_repair > 0).then_some(meta.last_complete_repair))
    }

    /// Removes the shard's tombstones whose `delete_time` is older than both `now - grace` and
    /// the shard's last complete repair (DESIGN §3); nothing else is ever removed. Without a
    /// recorded complete repair nothing is purged.
    pub fn purge_tombstones(
        &self,
        group: &str,
        shard: u32,
        now: i64,
        grace: Duration,
    ) -> Result<PurgeReport, StoreError> {
        self.rules.check_shard(group, shard)?;
        let meta = read_meta_snapshot(&self.snapshot()?.txn, group, shard)?;
        if purge_cutoff(now, grace, meta.last_complete_repair).is_none() {
            return Ok(PurgeReport::default());
        }
        let report = self.write_shard(group, shard, |writer| {
            // Read the cutoff again inside the transaction: it is the one that counts.
            let Some(cutoff) = purge_cutoff(now, grace, writer.meta.last_complete_repair) else {
                return Ok(PurgeReport::default());
            };
            let mut doomed = Vec::new();
            let mut rotten = Vec::new();
            for row in writer.props.iter()? {
                let (key, value) = row?;
                let property = match decode_row(key.value(), value.value(), ReadCheck::On) {
                    Ok(property) => property,
                    Err(reason) => {
                        rotten.push(Rotten::new(
                            &writer.names,
                            key.value(),
                            value.value(),
                            reason,
                        ));
                        continue;
                    }
                };
                if property.is_tombstone() && property.delete_time < cutoff {
                    doomed.push(Entity::parse(key.value()).map_err(|error| {
                        StoreError::Corrupt {
                            table: writer.names.props.clone(),
                            detail: error.to_string(),
                        }
                    })?);
                }
            }
            for entity in &doomed {
                writer.remove(entity)?;
            }
            for row in &rotten {
                writer.quarantine(row)?;
            }
            Ok(PurgeReport {
                purged: doomed.len() as u64,
                cutoff: Some(cutoff),
            })
        })?;
        if report.purged > 0 {
            tracing::info!(group, shard, purged = report.purged, "tombstones purged");
        }
        Ok(report)
    }
}
