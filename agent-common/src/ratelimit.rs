//! Rate-limit arithmetic, shared by the kernel programs that enforce limits and the agent that
//! configures and checks them: a token bucket (the default) and a sliding-window counter (two
//! fixed windows weighted, as the platform's HTTP middleware counts).
//!
//! Both are updated lazily from a monotonic clock (`bpf_ktime_get_ns` in the kernel) and use
//! integer arithmetic that cannot overflow, whatever the idle time, and whatever timestamp
//! another CPU wrote last: the elapsed time saturates at zero when the clock reading is older
//! than the state's, and is clamped to the refill horizon before it is multiplied. Nothing
//! here divides on the token bucket's path (the horizon is computed once per limit), and
//! nothing needs 128-bit arithmetic, which the BPF target lacks.

/// Nano-tokens per token. A bucket holds `tokens x 10^9`, so a refill over `elapsed` ns at
/// `rate` tokens/s is exactly `elapsed x rate`: no rounding, no division.
pub const NANO: u64 = 1_000_000_000;
/// Largest burst, in tokens: a full bucket holds less than 2^62 nano-tokens.
pub const MAX_BURST: u64 = 1 << 32;
/// Largest rate, in tokens per second (about 10^12: bytes/s of a 8 Tbit/s link).
pub const MAX_RATE: u64 = 1 << 40;
/// Largest cost of one admission, in tokens (a packet's bytes, or 1).
pub const MAX_COST: u64 = 1 << 32;
/// Longest sliding window, in ns (about 13 days).
pub const MAX_WINDOW_NS: u64 = 1 << 50;

/// A rate and a burst, with what the bucket needs precomputed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    /// Tokens per second (0: only the burst, once).
    pub rate: u64,
    /// Tokens the bucket holds when full.
    pub burst: u64,
    /// Time to refill from empty to full, in ns: more idle time than this adds nothing.
    pub horizon_ns: u64,
}

impl Limit {
    /// `rate` tokens/s with room for `burst`, each clamped to its maximum.
    pub const fn new(rate: u64, burst: u64) -> Self {
        let rate = if rate > MAX_RATE { MAX_RATE } else { rate };
        let burst = if burst > MAX_BURST { MAX_BURST } else { burst };
        let horizon_ns = if rate == 0 {
            0
        } else {
            // Rounded up: the clamp never stops a refill short of full.
            (burst * NANO).div_ceil(rate)
        };
        Self {
            rate,
            burst,
            horizon_ns,
        }
    }

    /// The bucket's capacity in nano-tokens.
    #[inline(always)]
    pub const fn capacity(&self) -> u64 {
        self.burst * NANO
    }
}

/// One key's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens x [`NANO`].
    pub nanotokens: u64,
    /// The latest clock reading the bucket was refilled to.
    pub last_ns: u64,
}

impl Bucket {
    /// A full bucket, as a new key starts (a source is not punished for being new).
    #[inline(always)]
    pub const fn full(limit: &Limit, now_ns: u64) -> Self {
        Self {
            nanotokens: limit.capacity(),
            last_ns: now_ns,
        }
    }

    /// Refills for the time since the last update, then takes `cost` tokens if there are that
    /// many. Returns whether the admission passes. A refused admission takes nothing.
    #[inline(always)]
    pub fn take(&mut self, limit: &Limit, now_ns: u64, cost: u64) -> bool {
        self.refill(limit, now_ns);
        let want = if cost > MAX_COST { MAX_COST } else { cost } * NANO;
        if self.nanotokens >= want {
            self.nanotokens -= want;
            true
        } else {
            false
        }
    }

    /// Adds the tokens earned since `last_ns`, up to the capacity.
    #[inline(always)]
    pub fn refill(&mut self, limit: &Limit, now_ns: u64) {
        // Another CPU may have written a later timestamp than this reading: no refill then
        // (never a wrap to an enormous elapsed time), and the later timestamp stays.
        let elapsed = now_ns.saturating_sub(self.last_ns);
        let elapsed = if elapsed > limit.horizon_ns {
            limit.horizon_ns
        } else {
            elapsed
        };
        // elapsed x rate <= horizon x rate < capacity + rate < 2^63: no overflow.
        let earned = elapsed * limit.rate;
        let cap = limit.capacity();
        let total = self.nanotokens.saturating_add(earned);
        self.nanotokens = if total > cap { cap } else { total };
        if now_ns > self.last_ns {
            self.last_ns = now_ns;
        }
    }
}

/// Weights of the previous window, in 1/1024ths.
const WEIGHT_ONE: u64 = 1024;

/// One key's sliding-window counter: the count of the current fixed window, and of the one
/// before, weighted by how much of it the sliding window still covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Start of the current fixed window.
    pub start_ns: u64,
    pub current: u64,
    pub previous: u64,
}

impl Window {
    /// Admits `cost` if the sliding estimate of the last `window_ns` plus `cost` stays within
    /// `limit` (tokens per window). A refused admission counts nothing.
    #[inline(always)]
    pub fn take(&mut self, limit: u64, window_ns: u64, now_ns: u64, cost: u64) -> bool {
        if window_ns == 0 {
            return false;
        }
        let window_ns = if window_ns > MAX_WINDOW_NS {
            MAX_WINDOW_NS
        } else {
            window_ns
        };
        let cost = if cost > MAX_COST { MAX_COST } else { cost };
        let since = now_ns.saturating_sub(self.start_ns);
        if since >= window_ns {
            let windows = since / window_ns;
            self.previous = if windows == 1 { self.current } else { 0 };
            self.current = 0;
            self.start_ns += windows * window_ns;
        }
        let into = now_ns.saturating_sub(self.start_ns);
        let into = if into > window_ns { window_ns } else { into };
        // The previous window's share of the sliding window, (window - into) / window, rounded
        // up with the estimate: a limiter errs towards refusing.
        let weight = ((window_ns - into) * WEIGHT_ONE).div_ceil(window_ns);
        let previous = if self.previous > MAX_COST {
            MAX_COST
        } else {
            self.previous
        };
        let estimate = (previous * weight).div_ceil(WEIGHT_ONE) + self.current;
        if estimate + cost <= limit {
            self.current += cost;
            true
        } else {
            false
        }
    }
}

const _: () = assert!(core::mem::size_of::<Limit>() == 3 * 8);
const _: () = assert!(core::mem::size_of::<Bucket>() == 2 * 8);
const _: () = assert!(core::mem::size_of::<Window>() == 3 * 8);
// The bounds keep every product in range.
const _: () = assert!(MAX_BURST * NANO < 1 << 62);
const _: () = assert!(MAX_COST * NANO < 1 << 62);
const _: () = assert!(MAX_COST * WEIGHT_ONE < 1 << 62);
const _: () = assert!(MAX_WINDOW_NS * WEIGHT_ONE < 1 << 62);

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = NANO;

    /// Arrivals every `gap_ns` for `secs` seconds; returns how many passed.
    fn admitted_bucket(limit: &Limit, gap_ns: u64, secs: u64, cost: u64) -> u64 {
        let start = 5 * SEC;
        let mut b = Bucket::full(limit, start);
        let mut passed = 0;
        let mut t = start;
        while t < start + secs * SEC {
            if b.take(limit, t, cost) {
                passed += 1;
            }
            t += gap_ns;
        }
        passed
    }

    #[test]
    fn a_flood_is_admitted_at_the_rate_plus_the_burst() {
        let limit = Limit::new(1000, 100);
        // 10x and 100x the rate, for 10 s: rate x 10 + burst admitted, within 0.1%.
        for factor in [10, 100] {
            let gap = SEC / (1000 * factor);
            let passed = admitted_bucket(&limit, gap, 10, 1);
            let want = 1000 * 10 + 100;
            assert!(
                passed.abs_diff(want) * 1000 <= want,
                "{factor}x: {passed} of {want}"
            );
        }
        // Under the rate, everything passes.
        assert_eq!(admitted_bucket(&limit, SEC / 500, 10, 1), 5000);
    }

    #[test]
    fn bytes_cost_their_size() {
        // 1 MB/s, 64 KiB burst, 1500-byte packets at 10x: about 1 MB/s of packets pass.
        let limit = Limit::new(1_000_000, 65_536);
        let gap = SEC * 1500 / 10_000_000;
        let passed = admitted_bucket(&limit, gap, 10, 1500);
        let want = (10_000_000 + 65_536) / 1500;
        assert!(passed.abs_diff(want) * 100 <= want, "{passed} of {want}");
        // A packet larger than the burst never passes.
        let mut b = Bucket::full(&limit, 0);
        assert!(!b.take(&limit, SEC, 70_000));
    }

    #[test]
    fn long_idle_refills_to_full_and_no_further_without_overflow() {
        for limit in [
            Limit::new(1, 1),
            Limit::new(MAX_RATE, MAX_BURST),
            Limit::new(u64::MAX, u64::MAX),
            Limit::new(7, MAX_BURST),
        ] {
            let mut b = Bucket {
                nanotokens: 0,
                last_ns: 0,
            };
            b.refill(&limit, u64::MAX);
            assert_eq!(b.nanotokens, limit.capacity(), "{limit:?}");
            assert_eq!(b.last_ns, u64::MAX);
        }
    }

    #[test]
    fn an_older_clock_reading_refills_nothing_and_keeps_the_later_time() {
        let limit = Limit::new(1000, 10);
        let mut b = Bucket {
            nanotokens: 0,
            last_ns: 10 * SEC,
        };
        // Another CPU stored 10 s; this one read 9 s before it could write.
        b.refill(&limit, 9 * SEC);
        assert_eq!(b.nanotokens, 0);
        assert_eq!(b.last_ns, 10 * SEC);
        // A millisecond after the later time, one token.
        assert!(b.take(&limit, 10 * SEC + SEC / 1000, 1));
        assert!(!b.take(&limit, 10 * SEC + SEC / 1000, 1));
    }

    #[test]
    fn a_zero_rate_allows_the_burst_once() {
        let limit = Limit::new(0, 3);
        let mut b = Bucket::full(&limit, 0);
        let passed = (0..100).filter(|i| b.take(&limit, i * SEC, 1)).count();
        assert_eq!(passed, 3);
    }

    #[test]
    fn a_refused_admission_takes_nothing() {
        let limit = Limit::new(10, 5);
        let mut b = Bucket::full(&limit, 0);
        assert!(!b.take(&limit, 0, 6));
        assert_eq!(b.nanotokens, 5 * NANO);
        assert!(b.take(&limit, 0, 5));
    }

    #[test]
    fn the_horizon_never_stops_a_refill_short() {
        // A rate that does not divide the capacity: the rounded-up horizon still fills it.
        let limit = Limit::new(3, 1);
        let mut b = Bucket {
            nanotokens: 0,
            last_ns: 0,
        };
        b.refill(&limit, limit.horizon_ns);
        assert_eq!(b.nanotokens, limit.capacity());
    }

    #[test]
    fn the_sliding_window_admits_the_limit_per_window() {
        // 1000 per second, a flood at 10x and 100x for 10 s: within 5% of 10,000 (the first
        // window has no previous one and admits its full 1000 at once).
        for factor in [10u64, 100] {
            let gap = SEC / (1000 * factor);
            let mut w = Window {
                start_ns: 0,
                ..Window::default()
            };
            let mut passed = 0u64;
            let mut t = 0;
            while t < 10 * SEC {
                if w.take(1000, SEC, t, 1) {
                    passed += 1;
                }
                t += gap;
            }
            assert!(
                passed.abs_diff(10_000) * 20 <= 10_000,
                "{factor}x: {passed}"
            );
        }
    }

    #[test]
    fn the_sliding_window_weighs_the_previous_window() {
        let mut w = Window::default();
        // A full window just before the boundary...
        for _ in 0..100 {
            assert!(w.take(100, SEC, SEC - 1, 1));
        }
        assert!(!w.take(100, SEC, SEC - 1, 1));
        // ...still counts almost fully just after it, and half at its middle.
        assert!(!w.take(100, SEC, SEC + 1000, 1));
        let mid = SEC + SEC / 2;
        let passed = (0..100).filter(|_| w.take(100, SEC, mid, 1)).count();
        assert!((49..=51).contains(&passed), "{passed}");
        // After two idle windows nothing is remembered.
        let later = 10 * SEC;
        let passed = (0..200).filter(|_| w.take(100, SEC, later, 1)).count();
        assert_eq!(passed, 100);
    }

    #[test]
    fn the_sliding_window_survives_extreme_clock_readings() {
        let mut w = Window::default();
        assert!(w.take(10, SEC, u64::MAX, 1));
        assert!(!w.take(10, 0, 5, 1));
        let mut w = Window::default();
        assert!(w.take(10, u64::MAX, u64::MAX / 2, 1));
        let mut w = Window {
            start_ns: 10 * SEC,
            current: 3,
            previous: u64::MAX,
        };
        // An older reading than the window's start: treated as its start.
        assert!(!w.take(10, SEC, SEC, 1));
        assert_eq!(w.current, 3);
    }
}
