//! Pure scheduling rules: the cron window for background rounds and the spreading of rounds
//! over time and over origins. Time is a parameter (unix seconds), never read here.

/// A five-field cron expression (`minute hour day-of-month month day-of-week`, UTC) read as a
/// window: background rounds may start during every minute it matches.
///
/// Parsed and matched by the `croner` crate in its POSIX (Vixie cron) reading: `*`, numbers,
/// ranges `a-b`, steps `*/n` and `a-b/n`, comma lists, month and weekday names (`JAN`, `MON`),
/// day-of-week 0 and 7 for Sunday, and croner's `L`, `W` and `#` day extensions. When both day
/// fields are restricted, either may match (as in classic cron).
#[derive(Debug, Clone)]
pub(crate) struct CronWindow {
    cron: croner::Cron,
}

/// The five fields, in order, as error messages name them.
const FIELDS: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];

impl CronWindow {
    /// Parses an expression; the error says which field is wrong.
    pub(crate) fn parse(expression: &str) -> Result<Self, String> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != FIELDS.len() {
            return Err(format!(
                "`{expression}` has {} fields; expected 5 (minute hour day-of-month month day-of-week)",
                fields.len()
            ));
        }
        // Each field alone, the others `*`: an error then names the field it is about.
        for (index, name) in FIELDS.iter().enumerate() {
            let mut alone = ["*"; 5];
            alone[index] = fields[index];
            five_fields()
                .parse(&alone.join(" "))
                .map_err(|error| format!("{name} field `{}`: {error}", fields[index]))?;
        }
        let cron = five_fields()
            .parse(expression)
            .map_err(|error| format!("`{expression}`: {error}"))?;
        Ok(Self { cron })
    }

    /// Whether the minute holding `unix_seconds` (UTC) is inside the window.
    pub(crate) fn contains(&self, unix_seconds: u64) -> bool {
        let minute = unix_seconds - unix_seconds % 60;
        i64::try_from(minute)
            .ok()
            .and_then(|seconds| chrono::DateTime::from_timestamp(seconds, 0))
            .is_some_and(|time| self.cron.is_time_matching(&time).unwrap_or(false))
    }
}

/// croner's parser for five fields: no seconds, no year.
fn five_fields() -> croner::parser::CronParser {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
}

/// The origin of background rounds for one shard: the first node that is up, starting at
/// position `shard % copies` of the node list, so that origins rotate over the copies and a down
/// origin's shards are taken by the next copy. Every node computes this alike from its own view
/// of health; when two views disagree, the gossip layer refuses the second round.
pub(crate) fn designated_origin<'a>(
    node_list: &[&'a str],
    shard: u32,
    is_up: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    let copies = node_list.len();
    if copies < 2 {
        return None;
    }
    let start = shard as usize % copies;
    (0..copies)
        .map(|k| node_list[(start + k) % copies])
        .find(|id| is_up(id))
}

/// When each shard this node originates is next due, spreading the shards evenly over one
/// repair period: shard `k` of `count` first runs at `start + k * period / count`, then every
/// period after its previous start.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoundClock {
    due: std::collections::BTreeMap<(String, u32), u64>,
}

impl RoundClock {
    /// Takes the shards this node originates now (in a stable order) and returns the ones due at
    /// `now_ms`, advancing each returned shard's next due time by `period_ms`. Shards new to the
    /// clock are placed on the period's grid; shards no longer originated here are forgotten.
    pub(crate) fn due(
        &mut self,
        shards: &[(String, u32)],
        now_ms: u64,
        period_ms: u64,
    ) -> Vec<(String, u32)> {
        self.due.retain(|key, _| shards.contains(key));
        let count = shards.len();
        let mut ready = Vec::new();
        for (position, key) in shards.iter().enumerate() {
            let due = self
                .due
                .entry(key.clone())
                .or_insert_with(|| now_ms + period_ms * position as u64 / count as u64);
            if *due <= now_ms {
                *due = now_ms + period_ms;
                ready.push(key.clone());
            }
        }
        ready
    }

    /// Pushes a shard's next due time a full period past `now_ms` (after a round that some other
    /// trigger started).
    pub(crate) fn postpone(&mut self, key: &(String, u32), now_ms: u64, period_ms: u64) {
        if let Some(due) = self.due.get_mut(key) {
            *due = (*due).max(now_ms + period_ms);
        }
    }
}

/// Shards whose coordinated writes missed a copy, per missed node: when that node answers
/// again, a round for each of its shards starts, so a missed write is repaired in seconds
/// rather than at the next scheduled round.
#[derive(Debug, Clone, Default)]
pub(crate) struct MissedWrites {
    by_node: std::collections::BTreeMap<String, std::collections::BTreeSet<(String, u32)>>,
}

impl MissedWrites {
    /// Remembers that a write to (group, shard) missed `node`.
    pub(crate) fn record(&mut self, node: &str, group: &str, shard: u32) {
        self.by_node
            .entry(node.to_owned())
            .or_default()
            .insert((group.to_owned(), shard));
    }

    /// The shards to repair now that `node` answers again; forgets them.
    pub(crate) fn node_is_back(&mut self, node: &str) -> Vec<(String, u32)> {
        self.by_node
            .remove(node)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default()
    }

    /// Shards waiting for a node to come back, for `status` (`pending`).
    pub(crate) fn pending(&self, group: &str, shard: u32) -> u64 {
        self.by_node
            .values()
            .filter(|set| set.contains(&(group.to_owned(), shard)))
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_writes_are_released_once_when_the_node_returns() {
        let mut misses = MissedWrites::default();
        misses.record("n2", "g", 1);
        misses.record("n2", "g", 1);
        misses.record("n2", "g", 3);
        misses.record("n3", "g", 1);
        assert_eq!(misses.pending("g", 1), 2);
        assert_eq!(
            misses.node_is_back("n2"),
            vec![("g".to_owned(), 1), ("g".to_owned(), 3)]
        );
        assert!(misses.node_is_back("n2").is_empty());
        assert_eq!(misses.pending("g", 1), 1);
        assert_eq!(misses.node_is_back("n3"), vec![("g".to_owned(), 1)]);
        assert_eq!(misses.pending("g", 1), 0);
    }

    // 2026-11-22 (a Sunday) 01:30:00 UTC.
    const SUNDAY_0130: u64 = 1_795_311_000;

    #[test]
    fn windows_match_the_minutes_they_name() {
        let night = CronWindow::parse("* 1-4 * * *").unwrap();
        assert!(night.contains(SUNDAY_0130));
        assert!(!night.contains(SUNDAY_0130 + 4 * 3600));
        let sunday = CronWindow::parse("*/15 * * * 0").unwrap();
        assert!(sunday.contains(SUNDAY_0130));
        assert!(
            sunday.contains(SUNDAY_0130 + 45),
            "every second of a matching minute is inside"
        );
        assert!(!sunday.contains(SUNDAY_0130 + 60));
        assert!(!sunday.contains(SUNDAY_0130 + 86_400));
        assert!(
            CronWindow::parse("* * * * 7")
                .unwrap()
                .contains(SUNDAY_0130)
        );
        let either = CronWindow::parse("30 1 1 * 0").unwrap();
        assert!(
            either.contains(SUNDAY_0130),
            "day-of-week matches though day-of-month does not"
        );
    }

    #[test]
    fn bad_expressions_name_the_field() {
        for (expression, field) in [
            ("* * * *", "5"),
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day-of-week"),
            ("*/0 * * * *", "minute"),
            ("x * * * *", "minute"),
        ] {
            let error = CronWindow::parse(expression).unwrap_err();
            assert!(error.contains(field), "`{error}` should name {field}");
        }
    }

    #[test]
    fn origins_rotate_and_skip_down_nodes() {
        let list = ["a", "b", "c"];
        assert_eq!(designated_origin(&list, 0, |_| true), Some("a"));
        assert_eq!(designated_origin(&list, 4, |_| true), Some("b"));
        assert_eq!(designated_origin(&list, 4, |id| id != "b"), Some("c"));
        assert_eq!(designated_origin(&list, 2, |id| id == "b"), Some("b"));
        assert_eq!(designated_origin(&list, 0, |_| false), None);
        assert_eq!(
            designated_origin(&["a"], 0, |_| true),
            None,
            "one copy needs no repair"
        );
    }

    #[test]
    fn every_shard_runs_once_per_period_spread_evenly() {
        let shards: Vec<(String, u32)> = (0..4).map(|s| ("g".to_owned(), s)).collect();
        let mut clock = RoundClock::default();
        let period = 1_000;
        let mut starts: Vec<(u64, u32)> = Vec::new();
        for now in (0..3_000).step_by(50) {
            for (_, shard) in clock.due(&shards, now, period) {
                starts.push((now, shard));
            }
        }
        let first: Vec<(u64, u32)> = starts
            .iter()
            .copied()
            .filter(|(t, _)| *t < period)
            .collect();
        assert_eq!(first, vec![(0, 0), (250, 1), (500, 2), (750, 3)]);
        for shard in 0..4 {
            let times: Vec<u64> = starts
                .iter()
                .filter(|(_, s)| *s == shard)
                .map(|(t, _)| *t)
                .collect();
            assert_eq!(
                times.len(),
                3,
                "shard {shard} ran once per period: {times:?}"
            );
            assert!(times.windows(2).all(|w| w[1] - w[0] == period));
        }
    }

    #[test]
    fn postponed_shards_wait_a_full_period() {
        let shards = vec![("g".to_owned(), 0)];
        let mut clock = RoundClock::default();
        assert_eq!(clock.due(&shards, 0, 100).len(), 1);
        clock.postpone(&shards[0], 60, 100);
        assert!(clock.due(&shards, 100, 100).is_empty());
        assert_eq!(clock.due(&shards, 160, 100).len(), 1);
    }
}
