//! How long the socket task leaves datagrams in the socket after a wake-up
//! (`batching.receive_linger_us`, docs/decisions/0042-datagrams-wait-in-the-socket.md).
//!
//! On a virtual machine, waking a halted core costs more than most datagrams' work. At a pace,
//! each datagram arrives alone and wakes the shard's core for itself. Waiting a little before
//! reading the socket again lets the datagrams that arrive meanwhile share one wake-up, and
//! the sends among them share one commit. Each datagram waits at most the linger.
//!
//! A linger costs a timer's wake-up. It pays only when the datagrams come often enough that
//! more than one arrives within it, on average; the task judges its lingers in rounds, and
//! after a round that gathered fewer it wakes for each datagram again for a while, so a quiet
//! shard pays nothing. At high rates the shard is busy and takes many datagrams per wake-up
//! anyway; a linger that filled half a wake-up's cap pauses lingering at once, so the socket's
//! buffer never has to hold a long wait's worth of a burst.

use std::time::{Duration, Instant};

/// Lingers judged together: arrivals at a steady rate still vary from one linger to the next.
const LINGERS_PER_ROUND: u32 = 8;

/// Datagrams a round's lingers must gather: 1.5 each on average. A linger costs one timer's
/// wake-up and saves one for each datagram it gathers, so it pays from more than one; the
/// half is a margin for the latency it adds.
const ROUND_DATAGRAMS_MIN: usize = LINGERS_PER_ROUND as usize * 3 / 2;

/// How long lingering stays off after a round of lingers that did not pay, or a burst.
pub(super) const LINGER_PAUSE: Duration = Duration::from_millis(100);

/// What the socket task does after a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NextRead {
    /// Wait for the socket to become readable (a datagram wakes the task).
    WhenReadable,
    /// Sleep this long, then read what arrived without waiting for readability.
    After(Duration),
}

/// The socket task's choice between waking for each datagram and lingering.
#[derive(Debug)]
pub(super) struct ReceiveLinger {
    linger: Duration,
    /// A wake-up that read this many stopped at the cap: more is waiting.
    datagrams_max: usize,
    /// No linger before this: the last one did not pay.
    paused_until: Option<Instant>,
    /// The reads being judged came after a linger.
    after_linger: bool,
    /// Lingers in this round, and the datagrams they gathered.
    round_lingers: u32,
    round_datagrams: usize,
}

impl ReceiveLinger {
    /// A linger of `linger` (zero: never) for a task that reads at most `datagrams_max`
    /// datagrams per wake-up.
    pub(super) fn new(linger: Duration, datagrams_max: usize) -> ReceiveLinger {
        ReceiveLinger {
            linger,
            datagrams_max: datagrams_max.max(1),
            paused_until: None,
            after_linger: false,
            round_lingers: 0,
            round_datagrams: 0,
        }
    }

    /// Whether it may ever linger (a zero linger never does).
    pub(super) fn is_on(&self) -> bool {
        !self.linger.is_zero()
    }

    /// Decides what to do after a wake-up that read `datagrams` datagrams at `now`.
    pub(super) fn after_reads(&mut self, now: Instant, datagrams: usize) -> NextRead {
        if !self.is_on() {
            return NextRead::WhenReadable;
        }
        if std::mem::take(&mut self.after_linger) {
            self.round_lingers += 1;
            self.round_datagrams += datagrams;
            let burst = datagrams >= self.datagrams_max.div_ceil(2);
            let round_over = self.round_lingers == LINGERS_PER_ROUND;
            if burst || (round_over && self.round_datagrams < ROUND_DATAGRAMS_MIN) {
                self.paused_until = Some(now + LINGER_PAUSE);
            }
            if burst || round_over {
                self.round_lingers = 0;
                self.round_datagrams = 0;
            }
        }
        if datagrams == 0 || datagrams >= self.datagrams_max {
            // Nothing came (wait for the next one), or more is waiting (read it now).
            return NextRead::WhenReadable;
        }
        if self.paused_until.is_some_and(|until| now < until) {
            return NextRead::WhenReadable;
        }
        self.after_linger = true;
        NextRead::After(self.linger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_micros(500);

    #[test]
    fn zero_never_lingers() {
        let mut linger = ReceiveLinger::new(Duration::ZERO, 256);
        let now = Instant::now();
        for datagrams in [0, 1, 5, 256] {
            assert_eq!(linger.after_reads(now, datagrams), NextRead::WhenReadable);
        }
    }

    #[test]
    fn lingers_while_each_linger_gathers_several_datagrams() {
        let mut linger = ReceiveLinger::new(LINGER, 256);
        let start = Instant::now();
        // A datagram woke the task: linger.
        assert_eq!(linger.after_reads(start, 1), NextRead::After(LINGER));
        // The linger gathered 4: it paid, linger again.
        let now = start + LINGER;
        assert_eq!(linger.after_reads(now, 4), NextRead::After(LINGER));
        assert_eq!(linger.after_reads(now + LINGER, 2), NextRead::After(LINGER));
    }

    /// A datagram wakes the task, then a round of lingers gathers `gathered`, each its own;
    /// returns when the last was judged and what came of it.
    fn round(
        linger: &mut ReceiveLinger,
        start: Instant,
        gathered: [usize; 8],
    ) -> (Instant, NextRead) {
        let mut now = start;
        assert_eq!(linger.after_reads(now, 1), NextRead::After(LINGER));
        let mut next = NextRead::After(LINGER);
        for (index, &datagrams) in gathered.iter().enumerate() {
            now += LINGER;
            next = linger.after_reads(now, datagrams);
            if index + 1 == gathered.len() {
                break;
            }
            if datagrams == 0 {
                // Nothing came: the task waits for the next datagram, which wakes it.
                assert_eq!(next, NextRead::WhenReadable);
                assert_eq!(linger.after_reads(now, 1), NextRead::After(LINGER));
            } else {
                assert_eq!(next, NextRead::After(LINGER));
            }
        }
        (now, next)
    }

    #[test]
    fn a_round_of_lingers_that_gathers_little_pauses_lingering() {
        let mut linger = ReceiveLinger::new(LINGER, 256);
        // Eleven in eight lingers: less than 1.5 each.
        let (judged, next) = round(&mut linger, Instant::now(), [2, 0, 1, 3, 1, 0, 2, 2]);
        assert_eq!(next, NextRead::WhenReadable);
        // Within the pause each wake-up waits for the socket.
        let soon = judged + LINGER_PAUSE / 2;
        assert_eq!(linger.after_reads(soon, 1), NextRead::WhenReadable);
        assert_eq!(linger.after_reads(soon, 3), NextRead::WhenReadable);
        // After the pause it tries again, with a new round, which pays.
        let later = judged + LINGER_PAUSE;
        let (_, next) = round(&mut linger, later, [1, 1, 2, 2, 1, 2, 2, 1]);
        assert_eq!(next, NextRead::After(LINGER));
    }

    #[test]
    fn lingers_that_gather_nothing_now_and_then_still_pay() {
        let mut linger = ReceiveLinger::new(LINGER, 256);
        // Twelve in eight lingers, two of them empty: 1.5 each.
        let (_, next) = round(&mut linger, Instant::now(), [3, 0, 2, 1, 0, 2, 3, 1]);
        assert_eq!(next, NextRead::After(LINGER));
    }

    #[test]
    fn a_linger_that_gathers_half_the_cap_pauses_lingering() {
        let mut linger = ReceiveLinger::new(LINGER, 256);
        let start = Instant::now();
        assert_eq!(linger.after_reads(start, 1), NextRead::After(LINGER));
        let judged = start + LINGER;
        assert_eq!(linger.after_reads(judged, 128), NextRead::WhenReadable);
        assert_eq!(
            linger.after_reads(judged + LINGER_PAUSE / 2, 3),
            NextRead::WhenReadable
        );
        assert_eq!(
            linger.after_reads(judged + LINGER_PAUSE, 3),
            NextRead::After(LINGER)
        );
    }

    #[test]
    fn a_wake_up_that_stopped_at_the_cap_reads_again_at_once() {
        let mut linger = ReceiveLinger::new(LINGER, 256);
        let now = Instant::now();
        assert_eq!(linger.after_reads(now, 256), NextRead::WhenReadable);
        // Not judged as a linger: none came before it.
        assert_eq!(linger.after_reads(now, 1), NextRead::After(LINGER));
    }
}
