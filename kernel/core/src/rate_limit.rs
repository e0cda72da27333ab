//! A token bucket: at most `capacity` events in a burst, then one more per
//! `ticks_per_token` ticks. The kernel keeps one per VM for the log lines a
//! guest can cause (serial output, PRINT), so a guest cannot flood the
//! console (every host line goes through a busy-wait UART) or the other
//! VMs' time; what it drops is counted and reported.
//!
//! Time is whatever monotonic-ish counter the caller passes in (the TSC in
//! the kernel); the bucket never reads a clock itself, so it is tested on
//! the host with made-up times.
//!
//! The bucket's clock is the highest `now` it has been given. A `now` below
//! that (the TSC is not guaranteed to agree across CPUs) refills nothing
//! and moves nothing back, so alternating between two skewed clocks cannot
//! mint tokens. Refills keep the remainder of a partial token, so a caller
//! that asks often loses nothing to rounding; a full bucket banks nothing.

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: u32,
    ticks_per_token: u64,
    tokens: u32,
    /// The time up to which refills have been credited; `None` until the
    /// first `take`, whose `now` becomes the start (the bucket is full then).
    credited_to: Option<u64>,
    taken: u64,
    dropped: u64,
}

impl TokenBucket {
    /// Starts full: `capacity` tokens, one more every `ticks_per_token`
    /// ticks, never above capacity. A `ticks_per_token` of 0 refills the
    /// bucket completely whenever `now` has moved on since the last take.
    pub const fn new(capacity: u32, ticks_per_token: u64) -> TokenBucket {
        TokenBucket { capacity, ticks_per_token, tokens: capacity, credited_to: None, taken: 0, dropped: 0 }
    }

    /// Takes one token at time `now`; false (and counted as dropped) when
    /// the bucket is empty. A `now` earlier than the latest one seen refills
    /// nothing; no input panics or overflows.
    pub fn take(&mut self, now: u64) -> bool {
        self.refill(now);
        if self.tokens > 0 {
            self.tokens -= 1;
            self.taken += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    /// Tokens granted so far.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Takes refused so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn refill(&mut self, now: u64) {
        let Some(since) = self.credited_to else {
            self.credited_to = Some(now);
            return;
        };
        if now <= since {
            return; // no time passed, or a clock behind ours: nothing to add
        }
        let elapsed = now - since;
        let new = elapsed.checked_div(self.ticks_per_token).unwrap_or(u64::MAX);
        let room = u64::from(self.capacity - self.tokens);
        if new >= room {
            // Full: what is left of the elapsed time is not banked.
            self.tokens = self.capacity;
            self.credited_to = Some(now);
        } else {
            // new < room <= u32::MAX, and new * ticks_per_token <= elapsed.
            self.tokens += new as u32;
            self.credited_to = Some(since + new * self.ticks_per_token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// How many of `n` takes at time `now` succeed.
    fn burst(b: &mut TokenBucket, now: u64, n: u32) -> u32 {
        (0..n).filter(|_| b.take(now)).count() as u32
    }

    #[test]
    fn starts_full_at_any_first_time() {
        for start in [0, 1, 12_345, u64::MAX / 2, u64::MAX] {
            let mut b = TokenBucket::new(3, 100);
            assert_eq!(burst(&mut b, start, 5), 3, "start {start}");
            assert_eq!((b.taken(), b.dropped()), (3, 2));
        }
    }

    #[test]
    fn refills_one_token_per_period_and_keeps_the_remainder() {
        let mut b = TokenBucket::new(2, 100);
        assert_eq!(burst(&mut b, 1000, 2), 2);
        assert!(!b.take(1099), "99 ticks are not a token");
        assert!(b.take(1100), "100 ticks are");
        assert!(!b.take(1150));
        // The 50 ticks after 1100 were kept: 1200 completes the next token.
        assert!(b.take(1200));
        assert!(!b.take(1200));
        // Many small steps add up exactly as one big one.
        for t in (1210..=1300).step_by(10) {
            assert_eq!(b.take(t), t == 1300, "at {t}");
        }
        assert_eq!((b.taken(), b.dropped()), (5, 12));
    }

    #[test]
    fn never_holds_more_than_capacity() {
        let mut b = TokenBucket::new(3, 10);
        assert_eq!(burst(&mut b, 0, 3), 3);
        // A long pause refills to capacity and banks nothing beyond it.
        assert_eq!(burst(&mut b, 1_000_005, 10), 3);
        // The 5 leftover ticks were dropped with the surplus: 9 ticks later
        // there is still no token, 10 later there is.
        assert!(!b.take(1_000_014));
        assert!(b.take(1_000_015));
    }

    #[test]
    fn partial_refill_below_capacity() {
        let mut b = TokenBucket::new(10, 10);
        assert_eq!(burst(&mut b, 0, 10), 10);
        // 35 ticks: three tokens, and 5 ticks carried.
        assert_eq!(burst(&mut b, 35, 5), 3);
        assert_eq!(burst(&mut b, 39, 5), 0);
        assert_eq!(burst(&mut b, 40, 5), 1);
        // 105 ticks exactly fill the room: full, and the 5 extra ticks are
        // not banked (150 adds no token to the 9 left).
        assert_eq!(burst(&mut b, 145, 1), 1);
        assert_eq!(burst(&mut b, 150, 20), 9);
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = TokenBucket::new(1, 100);
        assert!(b.take(10_000));
        assert!(!b.take(0), "earlier than the start");
        assert!(!b.take(9_999));
        assert!(!b.take(10_099));
        assert!(b.take(10_100), "time is measured from the highest now");
        // Alternating with a clock far behind mints nothing.
        for i in 0..10 {
            assert!(!b.take(5 + i));
            assert!(!b.take(10_100 + i));
        }
        assert!(b.take(10_200));
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut b = TokenBucket::new(u32::MAX, 1);
        assert!(b.take(0));
        assert!(b.take(u64::MAX));
        assert!(b.take(u64::MAX));
        let mut b = TokenBucket::new(2, u64::MAX);
        assert_eq!(burst(&mut b, 0, 3), 2);
        assert!(!b.take(u64::MAX - 1));
        assert!(b.take(u64::MAX));
        let mut b = TokenBucket::new(5, 3);
        assert_eq!(burst(&mut b, 0, 5), 5);
        assert_eq!(burst(&mut b, u64::MAX, 9), 5);
    }

    #[test]
    fn zero_period_means_always_full_and_zero_capacity_never_grants() {
        let mut b = TokenBucket::new(2, 0);
        assert_eq!(burst(&mut b, 7, 3), 2);
        assert_eq!(burst(&mut b, 7, 3), 0, "no time passed");
        assert_eq!(burst(&mut b, 8, 3), 2);
        let mut b = TokenBucket::new(0, 1);
        assert_eq!(burst(&mut b, 0, 2), 0);
        assert_eq!(burst(&mut b, 1_000, 2), 0);
        assert_eq!((b.taken(), b.dropped()), (0, 4));
    }

    proptest! {
        /// In any window of calls, the grants never exceed a full bucket
        /// plus one token per period of the bucket's clock (the highest
        /// `now` so far) crossed in the window, plus one for a partial
        /// token carried in. Holds for any order of times.
        #[test]
        fn grants_in_a_window_are_bounded(
            capacity in 0u32..8,
            period in 1u64..50,
            steps in proptest::collection::vec((0u64..120, any::<bool>(), 1u32..4), 1..120),
            start in any::<u64>(),
        ) {
            let mut b = TokenBucket::new(capacity, period);
            let mut clock = None; // running max of the times given
            let mut calls = Vec::new(); // (clock after this call, granted?)
            let mut t = start;
            for (step, back, n) in steps {
                // Mostly forward, sometimes backward, wrapping near the top.
                t = if back { t.saturating_sub(step * 3) } else { t.saturating_add(step) };
                let now = clock.map_or(t, |c: u64| c.max(t));
                clock = Some(now);
                for _ in 0..n {
                    calls.push((now, b.take(t)));
                }
            }
            let granted = calls.iter().filter(|c| c.1).count() as u64;
            prop_assert_eq!(b.taken(), granted);
            prop_assert_eq!(b.dropped(), calls.len() as u64 - granted);
            for i in 0..calls.len() {
                let mut got = 0u64;
                for j in i..calls.len() {
                    got += calls[j].1 as u64;
                    let bound = capacity as u64 + (calls[j].0 - calls[i].0) / period + 1;
                    prop_assert!(got <= bound, "calls {}..={}: {} granted, bound {}", i, j, got, bound);
                }
            }
        }

        /// A caller that never exceeds the rate is never refused.
        #[test]
        fn a_caller_within_the_rate_is_never_refused(
            capacity in 1u32..8,
            period in 1u64..1000,
            gaps in proptest::collection::vec(0u64..3000, 1..100),
            start in 0u64..1 << 60,
        ) {
            let mut b = TokenBucket::new(capacity, period);
            let mut t = start;
            for gap in gaps {
                t += gap.max(period);
                prop_assert!(b.take(t));
            }
            prop_assert_eq!(b.dropped(), 0);
        }
    }
}
