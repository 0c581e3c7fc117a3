//! Server time that never runs backwards.
//!
//! Dedupe buckets and expiry are computed from the server's time. If that time stepped back
//! (an NTP correction, a VM restored from a snapshot, a wrong RTC after a reboot), a retry could
//! miss its dedupe record and be stored twice; if it jumped forward, expiry would delete
//! messages and dedupe records early. So the edge does not read the wall clock for them.
//! [`ServerClock`] reads it once, at start, takes the later of it and the highest time any
//! commit used (a high-water mark every commit raises in the store, `keys::clock`), and from
//! then on advances with a monotonic clock only: a wall-clock step while the process runs
//! changes nothing, and a step back across a restart is absorbed by the high-water mark.
//!
//! What it cannot know: a wall clock that was set forward while the edge was down is taken as
//! true at the next start (there is nothing to compare it with).

use crate::UnixMillis;

/// Milliseconds since the Unix epoch by the wall clock (0 for a clock set before 1970). For
/// what must be wall time: a [`ServerClock`]'s anchor, an age that must survive a restart, a
/// token's expiry (minted, and judged at login, by wall time). Everything else reads the
/// server clock.
pub fn wall_clock_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Server time: a wall-clock anchor taken at start, advanced by a monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerClock {
    anchor_ms: UnixMillis,
    anchor_monotonic_ms: u64,
}

impl ServerClock {
    /// A clock starting at the later of `wall_ms` (the wall clock now) and just past
    /// `high_water_ms` (the highest time a commit used, `commit::clock_high_water`).
    /// `monotonic_ms` is any monotonic clock in milliseconds, the same one later passed to
    /// [`ServerClock::now`].
    pub fn start(wall_ms: UnixMillis, high_water_ms: UnixMillis, monotonic_ms: u64) -> ServerClock {
        ServerClock {
            anchor_ms: wall_ms.max(high_water_ms.saturating_add(1)),
            anchor_monotonic_ms: monotonic_ms,
        }
    }

    /// The server time at the monotonic time `monotonic_ms` (never earlier than at start).
    pub fn now(&self, monotonic_ms: u64) -> UnixMillis {
        self.anchor_ms
            .saturating_add(monotonic_ms.saturating_sub(self.anchor_monotonic_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_clock_behind_the_high_water_mark_is_not_used() {
        let clock = ServerClock::start(1_000, 5_000, 77);
        assert_eq!(clock.now(77), 5_001);
        assert_eq!(clock.now(100), 5_024);
    }

    #[test]
    fn time_advances_with_the_monotonic_clock_only() {
        let clock = ServerClock::start(10_000, 0, 500);
        assert_eq!(clock.now(500), 10_000);
        assert_eq!(clock.now(1_500), 11_000);
        // A monotonic reading from before the start never moves time back.
        assert_eq!(clock.now(0), 10_000);
    }
}
