//! Event streams: each kernel ring buffer a family reads, with what it carried and what it
//! lost. Families record their rings' totals at every tick; `status` and the exporters read
//! every stream alike, whichever family it belongs to.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::window::{Cumulative, Windows};
use super::{WINDOW_GRANULARITY, WINDOW_RETENTION};

/// A ring's cumulative counts, as the kernel keeps them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingTotals {
    /// Events written to the ring.
    pub events: u64,
    /// Events lost because the ring was full.
    pub drops: u64,
}

impl Cumulative for RingTotals {
    fn delta_since(&self, earlier: &Self) -> Self {
        Self {
            events: self.events.saturating_sub(earlier.events),
            drops: self.drops.saturating_sub(earlier.drops),
        }
    }
}

/// Events of one stream, and how many were lost, in all and per second over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRates {
    pub stream: String,
    pub total: u64,
    pub per_second: f64,
    pub dropped_total: u64,
    pub dropped_per_second: f64,
}

/// Every stream by name (`syscall_slow`, `db_events`, ...), in the order their families
/// first recorded them (the families' order): a handful, one per ring.
#[derive(Debug, Default)]
pub struct Streams {
    by_name: Vec<(&'static str, Windows<RingTotals>)>,
}

impl Streams {
    pub fn record(&mut self, now: Instant, stream: &'static str, totals: RingTotals) {
        let i = match self.by_name.iter().position(|(n, _)| *n == stream) {
            Some(i) => i,
            None => {
                let w = Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION);
                self.by_name.push((stream, w));
                self.by_name.len() - 1
            }
        };
        self.by_name[i].1.push(now, totals);
    }

    /// Each stream's latest totals.
    pub fn totals(&self) -> impl Iterator<Item = (&'static str, RingTotals)> + '_ {
        self.by_name
            .iter()
            .filter_map(|(name, w)| w.latest().map(|l| (*name, l.totals)))
    }

    /// Each stream's totals and rates over `window`.
    pub fn rates(&self, window: Duration) -> Vec<EventRates> {
        self.by_name
            .iter()
            .filter_map(|(name, w)| {
                let latest = w.latest()?;
                let (d, span) = w
                    .over(window)
                    .map_or((RingTotals::default(), Duration::ZERO), |w| {
                        (w.delta, w.span)
                    });
                Some(EventRates {
                    stream: (*name).to_string(),
                    total: latest.totals.events,
                    per_second: rate(d.events, span),
                    dropped_total: latest.totals.drops,
                    dropped_per_second: rate(d.drops, span),
                })
            })
            .collect()
    }
}

/// `n` events over `span`, per second (0 over an empty span).
pub fn rate(n: u64, span: Duration) -> f64 {
    if span.is_zero() {
        0.0
    } else {
        n as f64 / span.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_keep_totals_and_rates_apart() {
        let mut s = Streams::default();
        let t0 = Instant::now();
        s.record(
            t0,
            "b",
            RingTotals {
                events: 1,
                drops: 0,
            },
        );
        s.record(
            t0,
            "a",
            RingTotals {
                events: 10,
                drops: 1,
            },
        );
        let t1 = t0 + Duration::from_secs(2);
        s.record(
            t1,
            "a",
            RingTotals {
                events: 30,
                drops: 3,
            },
        );
        let r = s.rates(Duration::from_secs(10));
        assert_eq!(r.len(), 2);
        // In the order first recorded, not by name.
        assert_eq!(r[0].stream, "b");
        assert_eq!(r[0].per_second, 0.0);
        assert_eq!(r[1].stream, "a");
        assert_eq!(r[1].total, 30);
        assert_eq!(r[1].dropped_total, 3);
        assert!((r[1].per_second - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r[1].dropped_per_second - 1.0).abs() < 1e-9, "{r:?}");
        assert_eq!(s.totals().count(), 2);
    }
}
