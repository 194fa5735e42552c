//! Rolling windows over cumulative counters.
//!
//! Collectors keep monotonic totals; a window is the difference between the newest snapshot
//! and the one taken about a window-length earlier. Snapshots are kept once per second for the
//! last [`FINE_SPAN`] and once per [`COARSE_STEP`] beyond, up to the retention: about 21
//! snapshots for 60 s instead of 61, whatever the tick. A window of up to 10 s is exact to the
//! second; a longer one starts at most 5 s earlier than asked (its real span is reported).
//! Memory is bounded by (keys that changed x snapshots), see `budget`.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// Totals that can be subtracted to give the activity between two snapshots.
pub trait Cumulative: Clone {
    fn delta_since(&self, earlier: &Self) -> Self;
}

/// Snapshots younger than this are all kept (one per granularity step).
pub const FINE_SPAN: Duration = Duration::from_secs(10);
/// Older snapshots are thinned to one per this step.
pub const COARSE_STEP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct Snapshot<T> {
    pub at: Instant,
    pub totals: T,
}

/// A snapshot in the history, and whether it stays once it is older than [`FINE_SPAN`] (the
/// first of its [`COARSE_STEP`] slot).
#[derive(Debug)]
struct Kept<T> {
    snap: Snapshot<T>,
    coarse: bool,
}

/// The activity over a window and the time it really covers (shorter than asked for while the
/// agent has been up for less than the window, or between snapshots).
#[derive(Debug, Clone)]
pub struct WindowDelta<T> {
    pub span: Duration,
    pub delta: T,
}

#[derive(Debug)]
pub struct Windows<T> {
    /// Newest first is `back()`.
    history: VecDeque<Kept<T>>,
    /// When the first snapshot was taken: coarse slots count from here.
    epoch: Option<Instant>,
    /// Newest snapshot (taken every tick).
    latest: Option<Snapshot<T>>,
    /// Previous tick's snapshot, for per-tick deltas.
    previous: Option<Snapshot<T>>,
    granularity: Duration,
    retention: Duration,
}

impl<T: Cumulative> Windows<T> {
    pub fn new(granularity: Duration, retention: Duration) -> Self {
        Self {
            history: VecDeque::new(),
            epoch: None,
            latest: None,
            previous: None,
            granularity,
            retention,
        }
    }

    /// Records the totals as of `at` (one call per tick, `at` non-decreasing).
    pub fn push(&mut self, at: Instant, totals: T) {
        let snap = Snapshot { at, totals };
        let due = self
            .history
            .back()
            .is_none_or(|s| at.duration_since(s.snap.at) >= self.granularity);
        if due {
            let epoch = *self.epoch.get_or_insert(at);
            let slot = |t: Instant| t.duration_since(epoch).as_millis() / COARSE_STEP.as_millis();
            let coarse = self
                .history
                .back()
                .is_none_or(|prev| slot(prev.snap.at) != slot(at));
            self.history.push_back(Kept {
                snap: snap.clone(),
                coarse,
            });
            // Past the fine span only the first snapshot of each coarse slot stays (the
            // newest is never dropped: it is the base of the shortest windows).
            self.history
                .retain(|k| k.coarse || at.duration_since(k.snap.at) <= FINE_SPAN);
            // Keep one snapshot older than the retention so a full window is always available.
            while self.history.len() > 2
                && at.duration_since(self.history[1].snap.at) >= self.retention
            {
                self.history.pop_front();
            }
        }
        self.previous = self.latest.replace(snap);
    }

    pub fn latest(&self) -> Option<&Snapshot<T>> {
        self.latest.as_ref()
    }

    /// Activity during the last tick.
    pub fn last_tick(&self) -> Option<WindowDelta<T>> {
        let (l, p) = (self.latest.as_ref()?, self.previous.as_ref()?);
        Some(WindowDelta {
            span: l.at.duration_since(p.at),
            delta: l.totals.delta_since(&p.totals),
        })
    }

    /// Activity during (about) the last `window`: from the newest snapshot taken at least
    /// `window` before the latest, or the oldest one kept.
    pub fn over(&self, window: Duration) -> Option<WindowDelta<T>> {
        let latest = self.latest.as_ref()?;
        let cutoff = latest.at.checked_sub(window);
        let base = match cutoff {
            Some(cutoff) => self
                .history
                .iter()
                .rev()
                .map(|k| &k.snap)
                .find(|s| s.at <= cutoff)
                .or_else(|| self.history.front().map(|k| &k.snap))?,
            None => self.history.front().map(|k| &k.snap)?,
        };
        Some(WindowDelta {
            span: latest.at.duration_since(base.at),
            delta: latest.totals.delta_since(&base.totals),
        })
    }

    pub fn snapshots(&self) -> usize {
        self.history.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Cumulative for u64 {
        fn delta_since(&self, earlier: &Self) -> Self {
            self.saturating_sub(*earlier)
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A counter that grows by 1 every 250 ms tick, for `secs` seconds.
    fn filled(secs: u64) -> (Windows<u64>, Instant) {
        let t0 = Instant::now();
        let mut w = Windows::new(Duration::from_secs(1), Duration::from_secs(60));
        for i in 0..=(secs * 4) {
            w.push(t0 + ms(250 * i), i);
        }
        (w, t0)
    }

    #[test]
    fn window_deltas_match_rate() {
        let (w, _) = filled(120);
        let d1 = w.over(Duration::from_secs(1)).unwrap();
        assert_eq!(d1.span, Duration::from_secs(1));
        assert_eq!(d1.delta, 4);
        let d10 = w.over(Duration::from_secs(10)).unwrap();
        assert_eq!((d10.span, d10.delta), (Duration::from_secs(10), 40));
        let d60 = w.over(Duration::from_secs(60)).unwrap();
        assert_eq!((d60.span, d60.delta), (Duration::from_secs(60), 240));
    }

    #[test]
    fn young_agent_reports_shorter_span() {
        let (w, _) = filled(5);
        let d = w.over(Duration::from_secs(60)).unwrap();
        assert_eq!(d.span, Duration::from_secs(5));
        assert_eq!(d.delta, 20);
    }

    #[test]
    fn last_tick_delta() {
        let (w, _) = filled(3);
        let d = w.last_tick().unwrap();
        assert_eq!((d.span, d.delta), (ms(250), 1));
    }

    #[test]
    fn memory_is_bounded_by_retention() {
        let (w, _) = filled(1000);
        // 10 fine + 10 coarse + the one older than the retention, and the newest.
        assert!(w.snapshots() <= 23, "{}", w.snapshots());
    }

    #[test]
    fn long_windows_start_at_most_a_coarse_step_early() {
        let (w, _) = filled(300);
        for secs in 1..=60 {
            let d = w.over(Duration::from_secs(secs)).unwrap();
            assert!(d.span >= Duration::from_secs(secs), "{secs}: {:?}", d.span);
            let slack = if Duration::from_secs(secs) <= FINE_SPAN {
                Duration::ZERO
            } else {
                COARSE_STEP
            };
            assert!(
                d.span <= Duration::from_secs(secs) + slack,
                "{secs}: {:?}",
                d.span
            );
            // The counter grows by 4 a second: the delta matches the real span.
            assert_eq!(d.delta, d.span.as_millis() as u64 / 250);
        }
    }

    #[test]
    fn empty_has_nothing() {
        let w: Windows<u64> = Windows::new(Duration::from_secs(1), Duration::from_secs(60));
        assert!(w.over(Duration::from_secs(1)).is_none());
        assert!(w.last_tick().is_none());
    }
}
