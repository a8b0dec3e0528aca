//! The node's side of the life of a delete (docs/protocol.md): which client-chosen times a
//! coordinator takes, what a peer-only call may carry, when a round completes for purging, and
//! why purging of a shard is blocked. Pure functions of their inputs (times are parameters).

use std::time::Duration;

use propd_gossip::{Outcome, PropagationResult, SpanKind};
use propd_merkle::Property;

/// A refused input: the field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// The field, as the API names it.
    pub(crate) field: &'static str,
    /// What is wrong with it.
    pub(crate) message: String,
}

fn refused(field: &'static str, message: String) -> Refused {
    Refused { field, message }
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// Checks a `delete_time` a client chose: within `skew` of the coordinator's clock, both ways.
pub(crate) fn check_client_delete_time(
    delete_time: i64,
    now: i64,
    skew: Duration,
) -> Result<(), Refused> {
    let skew = nanos(skew);
    let (earliest, latest) = (now.saturating_sub(skew), now.saturating_add(skew));
    if delete_time < earliest || delete_time > latest {
        return Err(refused(
            "delete_time",
            format!(
                "{delete_time} is more than max_clock_skew ({} s) away from this node's clock ({now}); \
                 leave it 0 to let the node choose",
                skew / 1_000_000_000
            ),
        ));
    }
    Ok(())
}

/// Checks a `mod_revision` a client chose: at most `skew` ahead of the coordinator's clock, so
/// no client can freeze an entity with a revision nobody can pass. An older revision is allowed:
/// it can only lose to newer copies.
pub(crate) fn check_client_revision(
    field: &'static str,
    revision: i64,
    now: i64,
    skew: Duration,
) -> Result<(), Refused> {
    let latest = now.saturating_add(nanos(skew));
    if revision > latest {
        return Err(refused(
            field,
            format!(
                "{revision} is more than max_clock_skew ({} s) ahead of this node's clock ({now})",
                nanos(skew) / 1_000_000_000
            ),
        ));
    }
    Ok(())
}

/// Checks a copy sent by a peer (a replica write or read repair): no coordinator could have
/// accepted a revision or delete time more than `skew` ahead of its clock, and its clock is at
/// most `skew` ahead of ours.
pub(crate) fn check_peer_copy(
    property: &Property,
    now: i64,
    skew: Duration,
) -> Result<(), Refused> {
    let latest = now.saturating_add(nanos(skew).saturating_mul(2));
    for (field, value) in [
        ("property.mod_revision", property.mod_revision),
        ("property.delete_time", property.delete_time),
    ] {
        if value > latest {
            return Err(refused(
                field,
                format!(
                    "{value} is more than twice max_clock_skew ahead of this node's clock ({now}); \
                     no coordinator could have accepted it"
                ),
            ));
        }
    }
    Ok(())
}

/// What a copy checks in a complete-round notice before it keeps the cutoff.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoticeCheck<'a> {
    /// The copies of the notice's shard, by placement.
    pub(crate) copies: &'a [String],
    /// The sender the notice names.
    pub(crate) from: &'a str,
    /// The round's start at its origin (unix nanos).
    pub(crate) started_at: i64,
    /// The cutoff the notice carries.
    pub(crate) cutoff: i64,
}

/// Accepts only a notice a peer could have sent: from a copy of the shard (the origin of a round
/// is always one), started no more than `skew` in this node's future, with a positive cutoff at
/// least the round cutoff below the start ([`propd_store::round_cutoff`]).
pub(crate) fn check_notice(
    notice: NoticeCheck<'_>,
    now: i64,
    skew: Duration,
) -> Result<(), Refused> {
    if !notice.copies.iter().any(|id| id == notice.from) {
        return Err(refused(
            "from",
            format!(
                "{:?} is not a copy of this shard ({})",
                notice.from,
                notice.copies.join(", ")
            ),
        ));
    }
    if notice.started_at <= 0 {
        return Err(refused("started_at_ns", "must be > 0".to_owned()));
    }
    let latest = now.saturating_add(nanos(skew));
    if notice.started_at > latest {
        return Err(refused(
            "started_at_ns",
            format!(
                "{} is more than max_clock_skew in this node's future ({now})",
                notice.started_at
            ),
        ));
    }
    let highest = propd_store::round_cutoff(notice.started_at, skew);
    if notice.cutoff <= 0 || notice.cutoff > highest {
        return Err(refused(
            "cutoff_ns",
            format!(
                "{} must be > 0 and at most {highest} (the round's start less three max_clock_skew)",
                notice.cutoff
            ),
        ));
    }
    Ok(())
}

/// Whether a round completes for purging: every copy took part (completed, nothing skipped) and
/// every sync ran without error and with no failed apply on either side.
pub(crate) fn complete_for_purging(result: &PropagationResult) -> bool {
    result.outcome == Outcome::Completed
        && !result.context.preview
        && result.trace.iter().all(|span| {
            span.kind == SpanKind::Sync
                && span.error.is_none()
                && span
                    .report
                    .is_some_and(|report| report.failed == 0 && report.peer_failed == 0)
        })
}

/// Why purging of a shard waits for a round, `None` when it does not: a shard with two or more
/// copies purges only below the cutoff of its last complete round, so purging is blocked when no
/// round has reached every copy within the grace (or ever). `down` are the shard's copies this
/// node sees down.
pub(crate) fn purge_blocked(
    copies: usize,
    last_complete_round: Option<i64>,
    now: i64,
    grace: Duration,
    down: &[String],
) -> Option<String> {
    if copies <= 1 {
        return None;
    }
    let since = match last_complete_round {
        Some(at) if at >= now.saturating_sub(nanos(grace)) => return None,
        Some(at) => format!(
            "no round has reached every copy since {} s ago",
            now.saturating_sub(at) / 1_000_000_000
        ),
        None => "no round has reached every copy yet".to_owned(),
    };
    Some(if down.is_empty() {
        format!("{since}; every copy answers, see the round results")
    } else {
        format!("{since}; down: {}", down.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn client_delete_times_are_bounded_both_ways_and_revisions_only_ahead() {
        let skew = Duration::from_secs(30);
        let now = 1_000 * S;
        assert!(check_client_delete_time(now - 30 * S, now, skew).is_ok());
        assert!(check_client_delete_time(now + 30 * S, now, skew).is_ok());
        let refused = check_client_delete_time(1, now, skew).unwrap_err();
        assert_eq!(refused.field, "delete_time");
        assert!(check_client_delete_time(now + 31 * S, now, skew).is_err());
        assert!(check_client_revision("mod_revision", 5, now, skew).is_ok());
        assert!(check_client_revision("mod_revision", now + 30 * S, now, skew).is_ok());
        assert!(check_client_revision("mod_revision", now + 30 * S + 1, now, skew).is_err());
        assert!(check_client_delete_time(now - 30 * S - 1, now, skew).is_err());
        assert!(check_client_delete_time(now + 30 * S + 1, now, skew).is_err());
        let refused = check_client_revision("mod_revision", i64::MAX, now, skew).unwrap_err();
        assert_eq!(refused.field, "mod_revision");
    }

    #[test]
    fn a_peer_copy_may_be_two_skews_ahead_and_no_more() {
        let skew = Duration::from_secs(30);
        let now = 1_000 * S;
        let copy = |mod_revision, delete_time| Property {
            group: "g".into(),
            name: "n".into(),
            id: "i".into(),
            mod_revision,
            delete_time,
            ..Property::default()
        };
        assert!(check_peer_copy(&copy(now + 60 * S, 1), now, skew).is_ok());
        assert_eq!(
            check_peer_copy(&copy(i64::MAX, 0), now, skew)
                .unwrap_err()
                .field,
            "property.mod_revision"
        );
        assert_eq!(
            check_peer_copy(&copy(5, now + 61 * S), now, skew)
                .unwrap_err()
                .field,
            "property.delete_time"
        );
    }

    #[test]
    fn a_notice_must_come_from_a_copy_not_from_the_future_with_a_low_enough_cutoff() {
        let skew = Duration::from_secs(10);
        let now = 1_000 * S;
        let copies = ["n1".to_owned(), "n2".to_owned()];
        let notice = |from, started_at, cutoff| NoticeCheck {
            copies: &copies,
            from,
            started_at,
            cutoff,
        };
        assert!(check_notice(notice("n1", now, now - 30 * S), now, skew).is_ok());
        assert!(check_notice(notice("n2", now + 10 * S, now - 20 * S), now, skew).is_ok());
        let field = |n| check_notice(n, now, skew).unwrap_err().field;
        assert_eq!(field(notice("n9", now, now - 30 * S)), "from");
        assert_eq!(field(notice("n1", i64::MAX, 1)), "started_at_ns");
        assert_eq!(field(notice("n1", now + 11 * S, 1)), "started_at_ns");
        assert_eq!(field(notice("n1", 0, 0)), "started_at_ns");
        assert_eq!(field(notice("n1", now, now - 29 * S)), "cutoff_ns");
        assert_eq!(field(notice("n1", now, 0)), "cutoff_ns");
    }

    /// The purge rule's round: only a completed, applied (not previewed) round whose every
    /// step is a sync that ran without an error and failed to apply nothing, on either side.
    #[test]
    fn only_a_completed_round_of_clean_syncs_that_applied_everything_counts_for_purging() {
        use crate::status::tests::{finished_round, step};
        use propd_gossip::{SyncReport, TraceSpan};

        let clean = || {
            vec![
                step(SpanKind::Sync, "n1", "n2", 1_010, 40, None),
                step(SpanKind::Sync, "n2", "n3", 1_050, 10, None),
            ]
        };
        let complete = finished_round(Outcome::Completed, None, clean());
        assert!(complete_for_purging(&complete));

        for outcome in [
            Outcome::NoPeers,
            Outcome::Aborted,
            Outcome::Refused,
            Outcome::TimedOut,
        ] {
            let round = finished_round(outcome, Some("ended"), clean());
            assert!(!complete_for_purging(&round), "{outcome:?}");
        }

        let mut preview = complete.clone();
        preview.context.preview = true;
        assert!(!complete_for_purging(&preview), "a preview applies nothing");

        let with = |change: &dyn Fn(&mut TraceSpan)| {
            let mut round = complete.clone();
            change(&mut round.trace[1]);
            complete_for_purging(&round)
        };
        assert!(
            !with(&|span| *span = step(SpanKind::Skip, "n2", "n3", 1_050, 10, Some("down"))),
            "a round that skipped a copy did not reach it"
        );
        assert!(
            !with(&|span| span.kind = SpanKind::Skip),
            "a skip span, even without an error, is no sync"
        );
        assert!(
            !with(&|span| span.error = Some("reset".into())),
            "a sync that failed"
        );
        assert!(!with(&|span| span.report = None), "a sync without a report");
        assert!(
            !with(&|span| span.report = Some(SyncReport {
                failed: 1,
                ..SyncReport::default()
            })),
            "the holder failed to apply a copy"
        );
        assert!(
            !with(&|span| span.report = Some(SyncReport {
                peer_failed: 1,
                ..SyncReport::default()
            })),
            "the peer failed to apply a copy"
        );
        assert!(
            with(&|span| span.report = Some(SyncReport {
                applied: 4,
                peer_applied: 2,
                ..SyncReport::default()
            })),
            "applies that all succeeded count"
        );
    }

    #[test]
    fn purging_is_blocked_while_no_round_reached_every_copy_within_the_grace() {
        let grace = Duration::from_secs(100);
        let now = 1_000 * S;
        let down = ["n3".to_owned()];
        assert_eq!(purge_blocked(1, None, now, grace, &down), None);
        assert_eq!(purge_blocked(3, Some(950 * S), now, grace, &down), None);
        assert_eq!(
            purge_blocked(3, None, now, grace, &down).as_deref(),
            Some("no round has reached every copy yet; down: n3")
        );
        assert_eq!(
            purge_blocked(3, Some(800 * S), now, grace, &[]).as_deref(),
            Some(
                "no round has reached every copy since 200 s ago; every copy answers, see the round results"
            )
        );
    }
}
