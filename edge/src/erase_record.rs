//! When a shard's store last finished an erase pass, kept in a small file in the store's
//! directory, so that a restart neither puts the next pass off nor runs one too early
//! (decision 0045).
//!
//! Without it, every start began a new period: a first pass an eighth of the bound after the
//! start. An edge whose runs were all shorter than that (a crash loop) never erased, and each
//! start of one that ran longer paid for a pass (on fjall a rewrite of every keyspace) even when
//! one had just finished. With it, the first pass after a start comes when the period that was
//! running is due, and no later than `OVERDUE_WAIT_MAX` after the start when it is past (or
//! when the record is missing, unreadable or from the future).

use std::path::Path;
use std::time::Duration;

/// The record's file in a store's directory. Neither engine lists it (their files have their
/// own names), and a store without it is erased as one whose period is past.
pub const FILE_NAME: &str = "erase-pass";
pub const TEMPORARY_NAME: &str = "erase-pass.tmp";

/// The longest wait for the first pass after a start when one is due already (or there is no
/// record): long enough that a start's reconnect storm is mostly over, short enough that an
/// edge in a crash loop still erases.
pub const OVERDUE_WAIT_MAX: Duration = Duration::from_secs(10);

/// The start time of the last pass that left nothing to the next one, in milliseconds since
/// the Unix epoch; `None` when there is no readable record.
pub fn read(store_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(store_dir.join(FILE_NAME)).ok()?;
    text.trim().parse().ok()
}

/// Records that a pass which started at `started_ms` (Unix milliseconds) left nothing to the
/// next one.
pub fn write(store_dir: &Path, started_ms: u64) -> Result<(), String> {
    crate::files::replace_file(
        &store_dir.join(FILE_NAME),
        &store_dir.join(TEMPORARY_NAME),
        format!("{started_ms}\n").as_bytes(),
        0o600,
    )
}

/// How long after a start the first erase pass comes, for passes every `interval`: when the
/// period that the last recorded pass began is due, but no sooner than a short wait (a start's
/// own work first) and no later than `OVERDUE_WAIT_MAX` once it is past. With no record, the
/// short wait: what a store without one holds is unknown. A record from the future counts as
/// none: a clock that was ahead when it was written (a host booted before its time was set)
/// would otherwise put every pass of an edge restarted within an interval off until the wall
/// clock reached that time, and one extra pass costs little.
pub fn first_wait(last_pass_ms: Option<u64>, now_ms: u64, interval: Duration) -> Duration {
    // An eighth of the bound, a quarter of the interval: the first pass's wait before records.
    let soonest = (interval / 4).min(OVERDUE_WAIT_MAX);
    let Some(last_pass_ms) = last_pass_ms.filter(|last| *last <= now_ms) else {
        return soonest;
    };
    let due_ms = last_pass_ms.saturating_add(interval.as_millis() as u64);
    Duration::from_millis(due_ms.saturating_sub(now_ms)).max(soonest)
}

/// The wait after a pass that ran for `elapsed`; `unfinished_in_a_row` counts the passes
/// that were partial or failed up to this one (0 after a complete one). After a complete
/// pass, the rest of its period: the next starts an interval after this one started, not
/// after it ended (each pass's length pushed the schedule back, past the bound for a long
/// pass). After a partial or failed one (a table held by a read or a compaction, a store
/// that refused), the short wait, doubling with each such pass in a row up to a quarter of
/// the interval: what it left stays on disk until a pass completes, and waiting a whole
/// interval more put it past the bound; but each retry is a whole pass (a flush and
/// rewrites, or a checkpoint), too costly every 10 s for a cause that lasts.
pub fn next_wait(unfinished_in_a_row: u32, elapsed: Duration, interval: Duration) -> Duration {
    let soonest = (interval / 4).min(OVERDUE_WAIT_MAX);
    if unfinished_in_a_row == 0 {
        return interval.saturating_sub(elapsed).max(soonest);
    }
    let doublings = (unfinished_in_a_row - 1).min(30);
    soonest
        .saturating_mul(1 << doublings)
        .min((interval / 4).max(soonest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_pass_counts_its_period_from_its_start_and_a_partial_one_retries_soon() {
        // Ten minutes long: the next starts twenty minutes after it ended.
        let wait = next_wait(0, Duration::from_secs(600), INTERVAL);
        assert_eq!(wait, Duration::from_secs(1200));
        // Longer than its interval: the short wait, not at once.
        let wait = next_wait(0, Duration::from_secs(3_600), INTERVAL);
        assert_eq!(wait, OVERDUE_WAIT_MAX);
        // Partial or failed: within the short wait, not a whole interval later; then twice
        // as long for each such pass in a row, up to a quarter of the interval.
        let five_secs = Duration::from_secs(5);
        assert_eq!(next_wait(1, five_secs, INTERVAL), OVERDUE_WAIT_MAX);
        assert_eq!(next_wait(2, five_secs, INTERVAL), 2 * OVERDUE_WAIT_MAX);
        assert_eq!(next_wait(4, five_secs, INTERVAL), 8 * OVERDUE_WAIT_MAX);
        assert_eq!(next_wait(9, five_secs, INTERVAL), INTERVAL / 4);
        assert_eq!(next_wait(u32::MAX, five_secs, INTERVAL), INTERVAL / 4);
        let short = Duration::from_secs(8);
        assert_eq!(next_wait(1, Duration::ZERO, short), Duration::from_secs(2));
        assert_eq!(next_wait(3, Duration::ZERO, short), Duration::from_secs(2));
    }

    const INTERVAL: Duration = Duration::from_secs(1800);
    const NOW_MS: u64 = 1_800_000_000_000;

    #[test]
    fn a_start_waits_for_the_period_that_was_running() {
        // The last pass ten minutes ago: the next is due in twenty, not an eighth of the bound
        // after the start (which would pass again, a rewrite, ten minutes after the last).
        let wait = first_wait(Some(NOW_MS - 600_000), NOW_MS, INTERVAL);
        assert_eq!(wait, Duration::from_secs(1200));
    }

    #[test]
    fn a_period_past_due_passes_soon_after_the_start() {
        // The edge was down, or restarted every few minutes: the pass comes within the short
        // wait of every start, so that a crash loop erases too.
        for last in [NOW_MS - 1_800_001, NOW_MS - 86_400_000, 0] {
            assert_eq!(first_wait(Some(last), NOW_MS, INTERVAL), OVERDUE_WAIT_MAX);
        }
        assert_eq!(first_wait(None, NOW_MS, INTERVAL), OVERDUE_WAIT_MAX);
    }

    #[test]
    fn short_bounds_wait_an_eighth_of_the_bound_at_most_when_due() {
        let interval = Duration::from_secs(8);
        assert_eq!(first_wait(None, NOW_MS, interval), Duration::from_secs(2));
        // Due in a second: still the short wait first.
        let wait = first_wait(Some(NOW_MS - 7_000), NOW_MS, interval);
        assert_eq!(wait, Duration::from_secs(2));
    }

    #[test]
    fn a_record_from_the_future_counts_as_none() {
        // Written while the clock was a year ahead: counted as a pass now, it would put off
        // the first pass of every start within an interval, and a restarted edge would never
        // pass until the clock caught up.
        for ahead_ms in [1, 3_600_000, 365 * 86_400_000] {
            let wait = first_wait(Some(NOW_MS + ahead_ms), NOW_MS, INTERVAL);
            assert_eq!(wait, OVERDUE_WAIT_MAX);
        }
    }

    #[test]
    fn the_record_reads_back_and_a_torn_or_missing_one_reads_as_none() {
        let dir = tempfile::tempdir().expect("temporary directory");
        assert_eq!(read(dir.path()), None);
        write(dir.path(), NOW_MS).expect("write the record");
        assert_eq!(read(dir.path()), Some(NOW_MS));
        write(dir.path(), NOW_MS + 1000).expect("replace the record");
        assert_eq!(read(dir.path()), Some(NOW_MS + 1000));
        std::fs::write(dir.path().join(FILE_NAME), "17000000").expect("write");
        assert_eq!(read(dir.path()), Some(17_000_000));
        std::fs::write(dir.path().join(FILE_NAME), "garbage").expect("write");
        assert_eq!(read(dir.path()), None);
    }
}
