//! Send budgets: token buckets in messages and bytes, so one flooding client or user is
//! refused (`Overloaded`) while everyone else keeps their normal latency.
//!
//! Integer arithmetic in thousandths of a token, with time as an argument (sans-IO).

use crate::UnixMillis;

/// A sustained rate with a burst. `per_sec == 0` means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: u64,
    /// Tokens the bucket holds at most (and starts with): what may be spent at once.
    pub burst: u64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        per_sec: 0,
        burst: 0,
    };

    pub fn is_unlimited(self) -> bool {
        self.per_sec == 0
    }
}

/// A budget in messages and in body bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBudget {
    pub messages: Rate,
    pub bytes: Rate,
}

impl SendBudget {
    pub const UNLIMITED: SendBudget = SendBudget {
        messages: Rate::UNLIMITED,
        bytes: Rate::UNLIMITED,
    };
}

/// One token bucket. Starts full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Thousandths of a token.
    level_milli: u64,
    updated_ms: UnixMillis,
}

impl TokenBucket {
    pub fn full(rate: Rate, now_ms: UnixMillis) -> TokenBucket {
        TokenBucket {
            level_milli: rate.burst.saturating_mul(1000),
            updated_ms: now_ms,
        }
    }

    /// Whether `amount` tokens are there now, without taking them.
    pub fn has(&mut self, rate: Rate, amount: u64, now_ms: UnixMillis) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        self.refill(rate, now_ms);
        self.level_milli >= amount.saturating_mul(1000)
    }

    /// Milliseconds until `amount` tokens are there (0 if they are now; `u64::MAX` if the
    /// burst can never hold them).
    pub fn wait_ms(&mut self, rate: Rate, amount: u64, now_ms: UnixMillis) -> u64 {
        if rate.is_unlimited() || self.has(rate, amount, now_ms) {
            return 0;
        }
        if amount > rate.burst {
            return u64::MAX;
        }
        let missing_milli = amount.saturating_mul(1000) - self.level_milli;
        missing_milli.div_ceil(rate.per_sec)
    }

    /// Takes `amount` tokens (call after `has`); the level never goes below zero.
    pub fn take(&mut self, rate: Rate, amount: u64) {
        if !rate.is_unlimited() {
            self.level_milli = self.level_milli.saturating_sub(amount.saturating_mul(1000));
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: UnixMillis) {
        // A clock that steps back adds nothing.
        let elapsed_ms = now_ms.saturating_sub(self.updated_ms);
        self.updated_ms = self.updated_ms.max(now_ms);
        // `per_sec` tokens per 1000 ms is `per_sec` thousandths per ms.
        let added = elapsed_ms.saturating_mul(rate.per_sec);
        self.level_milli = self
            .level_milli
            .saturating_add(added)
            .min(rate.burst.saturating_mul(1000));
    }
}

/// Buckets for messages and bytes under one [`SendBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendBuckets {
    messages: TokenBucket,
    bytes: TokenBucket,
}

impl SendBuckets {
    pub fn full(budget: SendBudget, now_ms: UnixMillis) -> SendBuckets {
        SendBuckets {
            messages: TokenBucket::full(budget.messages, now_ms),
            bytes: TokenBucket::full(budget.bytes, now_ms),
        }
    }

    /// Whether one message of `bytes` fits now.
    pub fn allows(&mut self, budget: SendBudget, bytes: usize, now_ms: UnixMillis) -> bool {
        self.messages.has(budget.messages, 1, now_ms)
            && self.bytes.has(budget.bytes, bytes as u64, now_ms)
    }

    /// Milliseconds until one message of `bytes` fits.
    pub fn wait_ms(&mut self, budget: SendBudget, bytes: usize, now_ms: UnixMillis) -> u64 {
        self.messages
            .wait_ms(budget.messages, 1, now_ms)
            .max(self.bytes.wait_ms(budget.bytes, bytes as u64, now_ms))
    }

    pub fn spend(&mut self, budget: SendBudget, bytes: usize) {
        self.messages.take(budget.messages, 1);
        self.bytes.take(budget.bytes, bytes as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let rate = Rate {
            per_sec: 10,
            burst: 5,
        };
        let mut bucket = TokenBucket::full(rate, 1_000);
        for _ in 0..5 {
            assert!(bucket.has(rate, 1, 1_000));
            bucket.take(rate, 1);
        }
        assert!(!bucket.has(rate, 1, 1_000), "the burst is spent");
        assert!(!bucket.has(rate, 1, 1_099), "a token takes 100 ms at 10/s");
        assert_eq!(bucket.wait_ms(rate, 1, 1_099), 1);
        assert_eq!(bucket.wait_ms(rate, 6, 1_000), u64::MAX, "over the burst");
        assert!(bucket.has(rate, 1, 1_100));
        // A long pause refills only up to the burst.
        assert!(bucket.has(rate, 5, 60_000));
        assert!(!bucket.has(rate, 6, 60_000));
    }

    #[test]
    fn an_unlimited_rate_always_allows() {
        let mut buckets = SendBuckets::full(SendBudget::UNLIMITED, 0);
        for _ in 0..1000 {
            assert!(buckets.allows(SendBudget::UNLIMITED, 1 << 20, 0));
            buckets.spend(SendBudget::UNLIMITED, 1 << 20);
        }
    }

    #[test]
    fn a_clock_stepping_back_adds_nothing() {
        let rate = Rate {
            per_sec: 1000,
            burst: 1,
        };
        let mut bucket = TokenBucket::full(rate, 10_000);
        bucket.take(rate, 1);
        assert!(!bucket.has(rate, 1, 5_000));
        assert!(!bucket.has(rate, 1, 10_000));
        assert!(bucket.has(rate, 1, 10_001));
    }
}
