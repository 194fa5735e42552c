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

/// How far back a series' ring has been regular, up to its latest tick: from tick `present` on
/// every tick has a sample; from `steady` on (never before `present`), also no sample is below
/// the one before it (no counter reset). A range starting at or after a mark reads its first
/// and last samples and their count in O(1) instead of scanning (see [`Run::ends`]). Marks
/// only move forward, and may lag behind the truth (then a range is scanned, as before).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Marks {
    pub present: u64,
    pub steady: u64,
}

impl From<u64> for Marks {
    /// Regular from `tick` on.
    fn from(tick: u64) -> Self {
        Self {
            present: tick,
            steady: tick,
        }
    }
}

impl Marks {
    /// The ticks before `tick` are not known regular (a gap, a new or regrown ring).
    pub(crate) fn restart(&mut self, tick: u64) {
        self.present = self.present.max(tick);
        self.steady = self.steady.max(tick);
    }

    /// No sample at `tick`.
    pub(crate) fn absent(&mut self, tick: u64) {
        self.restart(tick.saturating_add(1));
    }
}

/// Writes the sample `v` of `tick` into its slot of `ring`, keeping `marks`; `last` is one past
/// the series' previous tick with a sample. Returns whether the ring holds the slot.
pub(crate) fn write(
    ring: &mut [f64],
    slot: usize,
    tick: u64,
    v: f64,
    last: u64,
    marks: &mut Marks,
) -> bool {
    let depth = ring.len();
    if last != tick {
        // The tick before had no sample (or the series is new): regular only from here.
        marks.restart(tick);
    } else if depth > 0 {
        let before = if slot == 0 { depth - 1 } else { slot - 1 };
        // A drop starts a steady stretch here: a range whose first sample is this one has no
        // reset, one starting earlier has. The same comparison as the scan's (NaN: none).
        if ring.get(before).is_some_and(|&p| v < p) {
            marks.steady = marks.steady.max(tick);
        }
    }
    match ring.get_mut(slot) {
        Some(dst) => {
            *dst = v;
            true
        }
        None => false,
    }
}

/// The values of a ring for a run of ticks, oldest first, as up to two contiguous pieces (the
/// ring wraps), so that functions loop over plain slices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run<'a> {
    pub head: &'a [f64],
    pub tail: &'a [f64],
    /// The tick of `head[0]`.
    pub first: u64,
    /// The series' marks (a run starting before them is scanned).
    pub marks: Marks,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Self {
            head: &[],
            tail: &[],
            first: 0,
            marks: Marks {
                present: u64::MAX,
                steady: u64::MAX,
            },
        }
    }
}

/// The first and last samples of a run with every tick present, and their count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Ends {
    pub first: (u64, f64),
    pub last: (u64, f64),
    pub count: usize,
}

impl Run<'_> {
    /// The same run without its marks: what the scan reads (the fast path's oracle in tests).
    #[cfg(test)]
    pub(crate) fn unmarked(self) -> Self {
        Self {
            marks: Run::default().marks,
            ..self
        }
    }

    /// The ends of the run in O(1) when its marks say every tick of it has a sample (and, if
    /// `steady`, that no sample is below the one before); `None` when the run must be scanned.
    #[inline]
    pub(crate) fn ends(&self, steady: bool) -> Option<Ends> {
        let mark = if steady {
            self.marks.steady
        } else {
            self.marks.present
        };
        if self.first < mark {
            return None;
        }
        let count = self.head.len() + self.tail.len();
        let first = *self.head.first()?;
        let last = *self.tail.last().or(self.head.last())?;
        // Cheap insurance: the ends at least must be samples.
        if is_absent(first) || is_absent(last) {
            return None;
        }
        Some(Ends {
            first: (self.first, first),
            last: (self.first + count as u64 - 1, last),
            count,
        })
    }

    /// Visits the present values with their ticks, oldest first.
    #[inline]
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, f64)) {
        for (i, &v) in self.head.iter().enumerate() {
            if !is_absent(v) {
                f(self.first + i as u64, v);
            }
        }
        let off = self.first + self.head.len() as u64;
        for (i, &v) in self.tail.iter().enumerate() {
            if !is_absent(v) {
                f(off + i as u64, v);
            }
        }
    }

    /// The present values with their ticks, newest first.
    pub(crate) fn rev(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        let off = self.first + self.head.len() as u64;
        let tail = self
            .tail
            .iter()
            .enumerate()
            .rev()
            .map(move |(i, &v)| (off + i as u64, v));
        let head = (self.head.iter().enumerate().rev()).map(|(i, &v)| (self.first + i as u64, v));
        tail.chain(head).filter(|(_, v)| !is_absent(*v))
    }
}

/// The values of `ring` for ticks `first..=last`, clipped to what it holds.
pub(crate) fn run<'a>(
    clock: &Clock,
    ring: &'a [f64],
    marks: Marks,
    first: u64,
    last: u64,
) -> Run<'a> {
    let depth = ring.len();
    let first = first
        .max(clock.next().saturating_sub(depth as u64))
        .max(clock.oldest());
    if depth == 0 || first > last || last >= clock.next() {
        return Run::default();
    }
    // At most `depth` ticks, so the length fits.
    let len = ((last - first + 1) as usize).min(depth);
    let start = slot(first, depth);
    let (head, tail) = if start + len <= depth {
        (ring.get(start..start + len), ring.get(..0))
    } else {
        (ring.get(start..), ring.get(..start + len - depth))
    };
    Run {
        head: head.unwrap_or_default(),
        tail: tail.unwrap_or_default(),
        first,
        marks,
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
