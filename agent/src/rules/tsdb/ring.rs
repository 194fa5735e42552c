//! Rings indexed by tick number: tick `k` of a ring of depth `d` lives in slot `k % d` for as
//! long as `k >= next - d`, `next` being the number of ticks the clock has recorded. One clock
//! (the timestamps) is shared by every series of a resolution, so a series costs 8 B a tick.

/// "No sample at this tick": a NaN payload that parsing never produces (a `NaN` sample is stored
/// as the canonical NaN), so a real NaN sample stays a sample, as in Prometheus' stale marker.
const ABSENT_BITS: u64 = 0x7ff0_0000_0000_0002;

pub(crate) fn absent() -> f64 {
    f64::from_bits(ABSENT_BITS)
}

pub(crate) fn is_absent(v: f64) -> bool {
    v.to_bits() == ABSENT_BITS
}

/// The slot of `tick` in a ring of `depth` (> 0) slots.
pub(crate) fn slot(tick: u64, depth: usize) -> usize {
    // The remainder is below `depth`, so it fits a usize.
    (tick % depth.max(1) as u64) as usize
}

/// The timestamps of the ticks one resolution has recorded, the last `depth` of them kept.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    ts: Vec<i64>,
    next: u64,
}

impl Clock {
    pub(crate) fn new(depth: usize) -> Self {
        Self {
            ts: vec![0; depth.max(1)],
            next: 0,
        }
    }

    pub(crate) fn depth(&self) -> usize {
        self.ts.len()
    }

    /// The tick the next `push` records.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// The oldest tick still held.
    pub(crate) fn oldest(&self) -> u64 {
        self.next.saturating_sub(self.ts.len() as u64)
    }

    pub(crate) fn push(&mut self, at_ms: i64) -> u64 {
        let tick = self.next;
        let depth = self.ts.len();
        if let Some(t) = self.ts.get_mut(slot(tick, depth)) {
            *t = at_ms;
        }
        self.next += 1;
        tick
    }

    pub(crate) fn latest_ms(&self) -> Option<i64> {
        self.next.checked_sub(1).and_then(|t| self.ts(t))
    }

    pub(crate) fn ts(&self, tick: u64) -> Option<i64> {
        if tick >= self.next || tick < self.oldest() {
            return None;
        }
        self.ts.get(slot(tick, self.ts.len())).copied()
    }

    /// The first held tick whose timestamp is above `ms` (`next` when none is).
    fn first_after(&self, ms: i64) -> u64 {
        let (mut lo, mut hi) = (self.oldest(), self.next);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.ts(mid).is_some_and(|t| t > ms) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        lo
    }

    /// The held ticks with timestamps in `(from_excl, to_incl]`, first and last inclusive.
    pub(crate) fn ticks_in(&self, from_excl: i64, to_incl: i64) -> Option<(u64, u64)> {
        let first = self.first_after(from_excl);
        let last = self.first_after(to_incl).checked_sub(1)?;
        (first <= last && last >= self.oldest()).then_some((first, last))
    }

    /// The latest held tick at or before `ms`.
    pub(crate) fn at_or_before(&self, ms: i64) -> Option<u64> {
        let t = self.first_after(ms).checked_sub(1)?;
        (t >= self.oldest()).then_some(t)
    }

    pub(crate) fn bytes(&self) -> usize {
        self.ts.capacity() * std::mem::size_of::<i64>()
    }
}

/// A ring of `depth` values carrying the last ticks of `old` (of its own depth) up to `next`.
pub(crate) fn resized(old: &[f64], depth: usize, next: u64) -> Vec<f64> {
    let mut ring = vec![absent(); depth];
    if depth == 0 || old.is_empty() {
        return ring;
    }
    let keep = depth.min(old.len()) as u64;
    for tick in next.saturating_sub(keep)..next {
        if let (Some(dst), Some(src)) = (
            ring.get_mut(slot(tick, depth)),
            old.get(slot(tick, old.len())),
        ) {
            *dst = *src;
        }
    }
    ring
}

/// Visits the values of `ring` for ticks `first..=last` (clipped to what it holds, `next` being
/// the clock's next tick) with the tick's timestamp, skipping absent ones.
pub(crate) fn for_each(
    clock: &Clock,
    ring: &[f64],
    first: u64,
    last: u64,
    mut f: impl FnMut(i64, f64),
) {
    let depth = ring.len();
    if depth == 0 {
        return;
    }
    let first = first
        .max(clock.next().saturating_sub(depth as u64))
        .max(clock.oldest());
    if first > last || last >= clock.next() {
        return;
    }
    let (mut vs, mut ts) = (slot(first, depth), slot(first, clock.depth()));
    for _ in first..=last {
        if let (Some(&v), Some(&t)) = (ring.get(vs), clock.ts.get(ts)) {
            if !is_absent(v) {
                f(t, v);
            }
        }
        vs += 1;
        if vs == depth {
            vs = 0;
        }
        ts += 1;
        if ts == clock.depth() {
            ts = 0;
        }
    }
}

/// The value of `ring` at `tick`, if held and present.
pub(crate) fn value_at(clock: &Clock, ring: &[f64], tick: u64) -> Option<f64> {
    let depth = ring.len();
    if depth == 0 || tick >= clock.next() || tick + (depth as u64) < clock.next() {
        return None;
    }
    ring.get(slot(tick, depth))
        .copied()
        .filter(|v| !is_absent(*v))
}
