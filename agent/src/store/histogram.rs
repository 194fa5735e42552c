//! Log2-bucketed latency histograms, the userspace twin of the kernel's per-CPU buckets.

use agent_common::HIST_BUCKETS;

/// Counts of durations in log2 nanosecond buckets (bucket `i`: `[2^i, 2^(i+1))` ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Log2Histogram {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}

impl Default for Log2Histogram {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; HIST_BUCKETS],
        }
    }
}

/// Lower bound of bucket `i` in ns (bucket 0 starts at 0).
pub fn bucket_lower_ns(i: usize) -> u64 {
    if i == 0 {
        0
    } else {
        1u64 << i
    }
}

/// Exclusive upper bound of bucket `i` in ns.
pub fn bucket_upper_ns(i: usize) -> u64 {
    1u64 << (i + 1)
}

impl Log2Histogram {
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
        self.buckets[agent_common::log2_bucket(ns)] += 1;
    }

    pub fn add(&mut self, other: &Self) {
        self.count += other.count;
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
    }

    /// `self - earlier` for monotonic counters; saturates at zero if counters went backwards
    /// (a map that was recreated), so a reset never produces a huge bogus delta.
    pub fn delta_since(&self, earlier: &Self) -> Self {
        let mut d = Self {
            count: self.count.saturating_sub(earlier.count),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            buckets: [0; HIST_BUCKETS],
        };
        for (i, b) in d.buckets.iter_mut().enumerate() {
            *b = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Estimated `q`-quantile in ns (`0 <= q <= 1`), interpolating linearly inside the bucket
    /// that holds it. `None` when empty.
    pub fn quantile_ns(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        // Rank of the wanted observation, 1-based.
        let rank = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if seen + n >= rank {
                let lo = bucket_lower_ns(i) as f64;
                let hi = bucket_upper_ns(i) as f64;
                let frac = (rank - seen) as f64 / n as f64;
                return Some(lo + (hi - lo) * frac);
            }
            seen += n;
        }
        None
    }

    pub fn mean_ns(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_ns as f64 / self.count as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::log2_bucket;

    #[test]
    fn bucketing() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(4), 2);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        // 50 ms lies in [2^25, 2^26) ns = [33.5 ms, 67.1 ms)
        assert_eq!(log2_bucket(50_000_000), 25);
        assert_eq!(log2_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(log2_bucket(1 << (HIST_BUCKETS - 1)), HIST_BUCKETS - 1);
        for i in 1..HIST_BUCKETS - 1 {
            assert_eq!(log2_bucket(bucket_lower_ns(i)), i);
            assert_eq!(log2_bucket(bucket_upper_ns(i) - 1), i);
        }
    }

    #[test]
    fn quantiles_within_bucket_bounds() {
        let mut h = Log2Histogram::default();
        for _ in 0..90 {
            h.record(1_000); // bucket 9: [512, 1024)
        }
        for _ in 0..10 {
            h.record(1_000_000); // bucket 19: [524288, 1048576)
        }
        let p50 = h.quantile_ns(0.5).unwrap();
        assert!((512.0..=1024.0).contains(&p50), "{p50}");
        let p90 = h.quantile_ns(0.9).unwrap();
        assert!((512.0..=1024.0).contains(&p90), "{p90}");
        let p99 = h.quantile_ns(0.99).unwrap();
        assert!((524_288.0..=1_048_576.0).contains(&p99), "{p99}");
        assert_eq!(h.quantile_ns(1.0).unwrap(), 1_048_576.0);
        assert!(h.quantile_ns(0.0).unwrap() > 512.0);
    }

    #[test]
    fn quantiles_are_monotonic() {
        let mut h = Log2Histogram::default();
        for v in [5u64, 70, 900, 12_000, 150_000, 3_000_000, 40_000_000] {
            for _ in 0..(v % 7 + 1) {
                h.record(v);
            }
        }
        let mut last = 0.0;
        for q in 0..=100 {
            let v = h.quantile_ns(q as f64 / 100.0).unwrap();
            assert!(v >= last, "q={q} {v} < {last}");
            last = v;
        }
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(Log2Histogram::default().quantile_ns(0.5), None);
        assert_eq!(Log2Histogram::default().mean_ns(), None);
    }

    #[test]
    fn add_and_delta_are_inverse() {
        let mut a = Log2Histogram::default();
        a.record(10);
        a.record(10_000);
        let mut b = a;
        let mut extra = Log2Histogram::default();
        extra.record(77);
        extra.record(5_000_000);
        b.add(&extra);
        assert_eq!(b.delta_since(&a), extra);
        // counters that went backwards saturate instead of wrapping
        let back = a.delta_since(&b);
        assert_eq!(back.count, 0);
        assert!(back.buckets.iter().all(|&n| n == 0));
    }
}
