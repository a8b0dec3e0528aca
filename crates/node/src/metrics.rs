//! The node's metrics (DESIGN §8) and their Prometheus text rendering for `/metrics`.
//!
//! Counters are plain atomics, cheap to bump on hot paths; per-shard values live in a small
//! mutex-guarded map because they change once per round.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::node::lock;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Every metric of one node.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    /// Full tree rebuilds started.
    pub(crate) tree_rebuilds_started: Counter,
    /// Full tree rebuilds finished.
    pub(crate) tree_rebuilds_finished: Counter,
    /// Full tree rebuilds that failed.
    pub(crate) tree_rebuilds_failed: Counter,
    /// Total time spent in rebuilds, milliseconds.
    pub(crate) tree_rebuild_millis: Counter,
    /// Rebuilds whose root differed from the live tree (healed).
    pub(crate) verify_mismatches: Counter,
    /// Propagations this node started as origin.
    pub(crate) propagations_started: Counter,
    /// Propagations whose result reached this origin as completed.
    pub(crate) propagations_finished: Counter,
    /// Propagations whose result reached this origin as failed (no peers, aborted, timed out).
    pub(crate) propagations_failed: Counter,
    /// Propagations refused (here, or reported refused to this origin).
    pub(crate) propagations_refused: Counter,
    /// Pairwise syncs this node ran as client.
    pub(crate) syncs: Counter,
    /// Successors skipped as unreachable.
    pub(crate) skips: Counter,
    /// Entities compared in syncs.
    pub(crate) properties_compared: Counter,
    /// Properties sent to peers in syncs.
    pub(crate) properties_sent: Counter,
    /// Properties received from peers in syncs.
    pub(crate) properties_received: Counter,
    /// Properties applied locally by repair (sync, read repair).
    pub(crate) properties_applied: Counter,
    /// Properties whose repair apply failed.
    pub(crate) properties_failed: Counter,
    /// Repair bytes sent.
    pub(crate) repair_bytes_sent: Counter,
    /// Repair bytes received.
    pub(crate) repair_bytes_received: Counter,
    /// Tombstones purged.
    pub(crate) tombstones_purged: Counter,
    /// Read repairs written to stale copies.
    pub(crate) read_repairs: Counter,
    /// Calls refused by the auth layer (no certificate, not a member, too small a role).
    pub(crate) auth_refusals: std::sync::Arc<Counter>,
    /// TLS handshakes refused (no client certificate, unknown CA, expired, ...).
    pub(crate) tls_handshakes_refused: std::sync::Arc<Counter>,
    /// Unix seconds of the last successful round per (group, shard), as origin or participant.
    last_repair: Mutex<BTreeMap<(String, u32), u64>>,
}

impl Metrics {
    /// Records a successful round for (group, shard) at `unix_seconds`.
    pub(crate) fn set_last_repair(&self, group: &str, shard: u32, unix_seconds: u64) {
        let mut map = lock(&self.last_repair);
        map.insert((group.to_owned(), shard), unix_seconds);
    }

    /// Prometheus text exposition format, with `now` (unix seconds) for the ages.
    pub(crate) fn render(&self, shards: &[(String, u32)], now: u64) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &Counter); 22] = [
            (
                "propd_auth_refusals_total",
                "Calls refused: no client certificate, not a member, or too small a role.",
                &self.auth_refusals,
            ),
            (
                "propd_tls_handshakes_refused_total",
                "TLS handshakes refused (no or untrusted or expired client certificate).",
                &self.tls_handshakes_refused,
            ),
            (
                "propd_tree_rebuilds_started_total",
                "Full tree rebuilds started.",
                &self.tree_rebuilds_started,
            ),
            (
                "propd_tree_rebuilds_finished_total",
                "Full tree rebuilds finished.",
                &self.tree_rebuilds_finished,
            ),
            (
                "propd_tree_rebuilds_failed_total",
                "Full tree rebuilds that failed.",
                &self.tree_rebuilds_failed,
            ),
            (
                "propd_tree_rebuild_milliseconds_total",
                "Time spent in full tree rebuilds.",
                &self.tree_rebuild_millis,
            ),
            (
                "propd_tree_verify_mismatches_total",
                "Rebuilds whose root differed from the live tree (healed).",
                &self.verify_mismatches,
            ),
            (
                "propd_propagations_started_total",
                "Propagations started with this node as origin.",
                &self.propagations_started,
            ),
            (
                "propd_propagations_finished_total",
                "Propagations reported completed to this origin.",
                &self.propagations_finished,
            ),
            (
                "propd_propagations_failed_total",
                "Propagations reported failed to this origin.",
                &self.propagations_failed,
            ),
            (
                "propd_propagations_refused_total",
                "Propagations refused because one was already running.",
                &self.propagations_refused,
            ),
            (
                "propd_syncs_total",
                "Pairwise syncs run as client.",
                &self.syncs,
            ),
            (
                "propd_sync_skips_total",
                "Unreachable successors skipped.",
                &self.skips,
            ),
            (
                "propd_properties_compared_total",
                "Entities compared in syncs.",
                &self.properties_compared,
            ),
            (
                "propd_properties_sent_total",
                "Properties sent to peers in syncs.",
                &self.properties_sent,
            ),
            (
                "propd_properties_received_total",
                "Properties received from peers in syncs.",
                &self.properties_received,
            ),
            (
                "propd_properties_applied_total",
                "Properties applied locally by repair.",
                &self.properties_applied,
            ),
            (
                "propd_properties_failed_total",
                "Properties whose repair apply failed.",
                &self.properties_failed,
            ),
            (
                "propd_repair_bytes_sent_total",
                "Repair bytes sent.",
                &self.repair_bytes_sent,
            ),
            (
                "propd_repair_bytes_received_total",
                "Repair bytes received.",
                &self.repair_bytes_received,
            ),
            (
                "propd_tombstones_purged_total",
                "Tombstones purged.",
                &self.tombstones_purged,
            ),
            (
                "propd_read_repairs_total",
                "Stale copies rewritten by read repair.",
                &self.read_repairs,
            ),
        ];
        for (name, help, counter) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.get()
            );
        }
        let name = "propd_last_repair_age_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Seconds since the last successful repair round of the shard (-1: never).\n# TYPE {name} gauge"
        );
        let map = lock(&self.last_repair);
        for (group, shard) in shards {
            let age = map
                .get(&(group.clone(), *shard))
                .map_or(-1, |at| now.saturating_sub(*at) as i64);
            let _ = writeln!(
                out,
                "{name}{{group=\"{}\",shard=\"{shard}\"}} {age}",
                escape(group)
            );
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_ages_in_prometheus_text() {
        let metrics = Metrics::default();
        metrics.syncs.add(3);
        metrics.set_last_repair("g", 1, 1_000);
        let text = metrics.render(&[("g".into(), 0), ("g".into(), 1)], 1_042);
        assert!(text.contains("# TYPE propd_syncs_total counter\npropd_syncs_total 3\n"));
        assert!(text.contains("propd_last_repair_age_seconds{group=\"g\",shard=\"0\"} -1\n"));
        assert!(text.contains("propd_last_repair_age_seconds{group=\"g\",shard=\"1\"} 42\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(
                value.parse::<i64>().is_ok(),
                "sample line `{line}` ends in a number"
            );
        }
    }
}
