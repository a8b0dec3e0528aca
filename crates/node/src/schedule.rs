//! Pure scheduling rules: the cron window for background rounds and the spreading of rounds
//! over time and over origins. Time is a parameter (unix seconds), never read here.

/// A five-field cron expression (`minute hour day-of-month month day-of-week`, UTC) read as a
/// window: background rounds may start during every minute it matches. Fields accept `*`,
/// numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and comma lists; day-of-week 0 and 7 are
/// Sunday. When both day fields are restricted, either may match (as in classic cron).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronWindow {
    minutes: u64,
    hours: u64,
    days: u64,
    months: u64,
    weekdays: u64,
    days_restricted: bool,
    weekdays_restricted: bool,
}

impl CronWindow {
    /// Parses an expression; the error says which field is wrong.
    pub fn parse(expression: &str) -> Result<Self, String> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "`{expression}` has {} fields; expected 5 (minute hour day-of-month month day-of-week)",
                fields.len()
            ));
        }
        let mut weekdays = parse_field(fields[4], "day-of-week", 0, 7)?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Self {
            minutes: parse_field(fields[0], "minute", 0, 59)?,
            hours: parse_field(fields[1], "hour", 0, 23)?,
            days: parse_field(fields[2], "day-of-month", 1, 31)?,
            months: parse_field(fields[3], "month", 1, 12)?,
            weekdays,
            days_restricted: fields[2] != "*",
            weekdays_restricted: fields[4] != "*",
        })
    }

    /// Whether the minute holding `unix_seconds` (UTC) is inside the window.
    pub fn contains(&self, unix_seconds: u64) -> bool {
        let days_since_epoch = unix_seconds / 86_400;
        let second_of_day = unix_seconds % 86_400;
        let (_, month, day) = civil_from_days(days_since_epoch);
        // 1970-01-01 was a Thursday (4).
        let weekday = (days_since_epoch + 4) % 7;
        let minute = (second_of_day / 60) % 60;
        let hour = second_of_day / 3600;
        let bit = |set: u64, value: u64| set & (1 << value) != 0;
        let day_ok = match (self.days_restricted, self.weekdays_restricted) {
            (true, true) => bit(self.days, day) || bit(self.weekdays, weekday),
            _ => bit(self.days, day) && bit(self.weekdays, weekday),
        };
        bit(self.minutes, minute) && bit(self.hours, hour) && bit(self.months, month) && day_ok
    }
}

fn parse_field(text: &str, name: &str, min: u64, max: u64) -> Result<u64, String> {
    let mut set = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((range, step)) => {
                let step: u64 = step
                    .parse()
                    .ok()
                    .filter(|step| *step > 0)
                    .ok_or_else(|| format!("{name} field `{text}`: bad step `{step}`"))?;
                (range, step)
            }
            None => (part, 1),
        };
        let (low, high) = if range == "*" {
            (min, max)
        } else if let Some((low, high)) = range.split_once('-') {
            (number(low, name, text)?, number(high, name, text)?)
        } else {
            let value = number(range, name, text)?;
            (value, value)
        };
        if low < min || high > max || low > high {
            return Err(format!(
                "{name} field `{text}`: values must lie in {min}..={max}"
            ));
        }
        let mut value = low;
        while value <= high {
            set |= 1 << value;
            value += step;
        }
    }
    Ok(set)
}

fn number(text: &str, name: &str, field: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("{name} field `{field}`: `{text}` is not a number"))
}

/// Converts days since 1970-01-01 to (year, month 1..=12, day 1..=31) in the proleptic
/// Gregorian calendar (Howard Hinnant's well-known civil-from-days algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// When, within one repair period, a shard's background round is due on its origin.
///
/// Every (group, shard) with two or more copies is assigned to one origin — the node at
/// position `shard % copies` of its node list, so origins rotate over the nodes — and to a
/// slot of the period: shard `k` of the `count` shards this node originates starts at
/// `k * period / count`, so rounds are spread evenly instead of bursting together.
pub fn round_offset(position: usize, count: usize, period_ms: u64) -> u64 {
    if count == 0 {
        return 0;
    }
    period_ms * position as u64 / count as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-22 (a Sunday) 01:30:00 UTC.
    const SUNDAY_0130: u64 = 1_795_311_000;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(SUNDAY_0130 / 86_400), (2026, 11, 22));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn windows_match_the_minutes_they_name() {
        let night = CronWindow::parse("* 1-4 * * *").unwrap();
        assert!(night.contains(SUNDAY_0130));
        assert!(!night.contains(SUNDAY_0130 + 4 * 3600));
        let sunday = CronWindow::parse("*/15 * * * 0").unwrap();
        assert!(sunday.contains(SUNDAY_0130));
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
    fn rounds_spread_over_the_period() {
        let offsets: Vec<u64> = (0..4).map(|k| round_offset(k, 4, 600_000)).collect();
        assert_eq!(offsets, vec![0, 150_000, 300_000, 450_000]);
        assert_eq!(round_offset(0, 0, 600_000), 0);
    }
}
