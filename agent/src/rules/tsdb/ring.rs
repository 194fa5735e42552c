//! Rings indexed by tick number: tick `k` of a ring of depth `d` lives in slot `k % d` for as
//! long as `k >= next - d`, `next` being the number of ticks the clock has recorded. One clock
//! (the timestamps) is shared by every series of a resolution, so a series costs 8 B a tick.
//!
//! A metric's series share one [`Matrix`]: a row per slot, a column per series. A scrape
//! writes one row front to back, and a rate reads two rows, so the rules reading many series
//! of a metric share cache lines instead of each series' ring costing misses of its own.

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

/// One resolution's rings of every series of a metric: `depth` rows of `cap` columns, the
/// value of tick `k` of the series in column `c` at `slot(k, depth) * cap + c`.
#[derive(Debug, Default)]
pub(crate) struct Matrix {
    data: Vec<f64>,
    depth: usize,
    cap: usize,
}

impl Matrix {
    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    fn at(&self, slot: usize, col: usize) -> Option<f64> {
        (col < self.cap)
            .then(|| self.data.get(slot * self.cap + col).copied())
            .flatten()
    }

    pub(crate) fn at_mut(&mut self, slot: usize, col: usize) -> Option<&mut f64> {
        if col >= self.cap {
            return None;
        }
        self.data.get_mut(slot * self.cap + col)
    }

    /// Makes room for column `col` and empties it (a new series has no samples yet). Grows by
    /// a quarter (at least 16 columns) at a time, so that a scrape bringing many new series
    /// copies the matrix a few times, not once per series; [`Matrix::fit`] takes the slack
    /// back at the end of the scrape.
    pub(crate) fn open(&mut self, col: usize) {
        if col >= self.cap {
            let cap = (col + 1).max(self.cap + (self.cap / 4).max(16));
            self.relayout(self.depth, cap, Some, None);
        }
        for slot in 0..self.depth {
            if let Some(v) = self.at_mut(slot, col) {
                *v = absent();
            }
        }
    }

    /// Shrinks to `cols` columns: a matrix holds no slack between scrapes (the memory budget
    /// charges every series its rings, not more).
    pub(crate) fn fit(&mut self, cols: usize) {
        if self.cap <= cols {
            return;
        }
        let mut data = Vec::with_capacity(self.depth * cols);
        for row in self.data.chunks(self.cap) {
            data.extend_from_slice(row.get(..cols).unwrap_or(row));
        }
        self.data = data;
        self.cap = cols;
    }

    /// Keeps the columns `remap` gives a new place (`cols` of them), freeing the rest.
    pub(crate) fn remap(&mut self, remap: &[Option<u32>], cols: usize) {
        let cap = cols;
        let old_of_new: Vec<Option<usize>> = {
            let mut v = vec![None; cols];
            for (old, new) in remap.iter().enumerate() {
                if let Some(slot) = new.and_then(|n| v.get_mut(n as usize)) {
                    *slot = Some(old);
                }
            }
            v
        };
        self.relayout(
            self.depth,
            cap,
            |c| old_of_new.get(c).copied().flatten(),
            None,
        );
    }

    /// Changes the depth, carrying the last ticks up to `next` that both depths hold.
    pub(crate) fn resize(&mut self, depth: usize, next: u64) {
        self.relayout(depth, self.cap, Some, Some(next));
    }

    /// A new layout of `depth` × `cap`; column `c` takes the old column `from(c)`, and, with
    /// `next`, ticks are carried across depths (otherwise the slots stay as they are).
    fn relayout(
        &mut self,
        depth: usize,
        cap: usize,
        from: impl Fn(usize) -> Option<usize>,
        next: Option<u64>,
    ) {
        let mut data = vec![absent(); depth * cap];
        let rows: Vec<(usize, usize)> = match next {
            Some(next) if depth > 0 && self.depth > 0 => {
                let keep = depth.min(self.depth) as u64;
                (next.saturating_sub(keep)..next)
                    .map(|t| (slot(t, self.depth), slot(t, depth)))
                    .collect()
            }
            Some(_) => Vec::new(),
            None => (0..depth.min(self.depth)).map(|r| (r, r)).collect(),
        };
        for (old_row, new_row) in rows {
            for c in 0..cap {
                let Some(v) = from(c).and_then(|o| self.at(old_row, o)) else {
                    continue;
                };
                if let Some(dst) = data.get_mut(new_row * cap + c) {
                    *dst = v;
                }
            }
        }
        *self = Matrix { data, depth, cap };
    }

    pub(crate) fn bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<f64>()
    }
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

/// Writes the sample `v` of `tick` into its slot of column `col`, keeping `marks`; `last` is
/// one past the series' previous tick with a sample. Returns whether the matrix holds the slot.
pub(crate) fn write(
    m: &mut Matrix,
    col: usize,
    slot: usize,
    tick: u64,
    v: f64,
    last: u64,
    marks: &mut Marks,
) -> bool {
    let depth = m.depth;
    if last != tick {
        // The tick before had no sample (or the series is new): regular only from here.
        marks.restart(tick);
    } else if depth > 0 {
        let before = if slot == 0 { depth - 1 } else { slot - 1 };
        // A drop starts a steady stretch here: a range whose first sample is this one has no
        // reset, one starting earlier has. The same comparison as the scan's (NaN: none).
        if m.at(before, col).is_some_and(|p| v < p) {
            marks.steady = marks.steady.max(tick);
        }
    }
    match m.at_mut(slot, col) {
        Some(dst) => {
            *dst = v;
            true
        }
        None => false,
    }
}

/// The values of one column for a run of ticks, oldest first (the slots wrap).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run<'a> {
    data: &'a [f64],
    cap: usize,
    col: usize,
    depth: usize,
    /// The slot of the first tick, and how many ticks.
    start: usize,
    len: usize,
    /// The first tick.
    pub first: u64,
    /// The series' marks (a run starting before them is scanned).
    pub marks: Marks,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Self {
            data: &[],
            cap: 0,
            col: 0,
            depth: 0,
            start: 0,
            len: 0,
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
        let count = self.len;
        let first = self.value(0)?;
        let last = self.value(count.checked_sub(1)?)?;
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

    /// The value `k` ticks after the first (absent or not).
    #[inline]
    fn value(&self, k: usize) -> Option<f64> {
        if k >= self.len {
            return None;
        }
        let mut slot = self.start + k;
        if slot >= self.depth {
            slot -= self.depth;
        }
        self.data.get(slot * self.cap + self.col).copied()
    }

    /// Visits the present values with their ticks, oldest first.
    #[inline]
    pub(crate) fn for_each(&self, mut f: impl FnMut(u64, f64)) {
        let mut at = self.start * self.cap + self.col;
        let wrap = self.depth * self.cap;
        for k in 0..self.len {
            if let Some(&v) = self.data.get(at) {
                if !is_absent(v) {
                    f(self.first + k as u64, v);
                }
            }
            at += self.cap;
            if at >= wrap {
                at -= wrap;
            }
        }
    }

    /// The present values with their ticks, newest first.
    pub(crate) fn rev(&self) -> impl Iterator<Item = (u64, f64)> + '_ {
        (0..self.len)
            .rev()
            .filter_map(|k| Some((self.first + k as u64, self.value(k)?)))
            .filter(|(_, v)| !is_absent(*v))
    }
}

/// What the runs of every column of a matrix over one range share: where the range is in the
/// ring, worked out once per selection rather than per series.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Frame<'a> {
    run: Run<'a>,
}

impl<'a> Frame<'a> {
    /// The frame of ticks `first..=last`, clipped to what the matrix holds.
    pub(crate) fn new(clock: &Clock, m: &'a Matrix, first: u64, last: u64) -> Self {
        let depth = m.depth;
        let first = first
            .max(clock.next().saturating_sub(depth as u64))
            .max(clock.oldest());
        if depth == 0 || first > last || last >= clock.next() {
            return Self::default();
        }
        // At most `depth` ticks, so the length fits.
        let len = ((last - first + 1) as usize).min(depth);
        Self {
            run: Run {
                data: &m.data,
                cap: m.cap,
                col: 0,
                depth,
                start: slot(first, depth),
                len,
                first,
                marks: Marks::default(),
            },
        }
    }

    /// The run of column `col`.
    #[inline]
    pub(crate) fn run(&self, col: usize, marks: Marks) -> Run<'a> {
        if col >= self.run.cap {
            return Run::default();
        }
        Run {
            col,
            marks,
            ..self.run
        }
    }
}

/// The value of column `col` at `tick`, if held and present.
pub(crate) fn value_at(clock: &Clock, m: &Matrix, col: usize, tick: u64) -> Option<f64> {
    let depth = m.depth;
    if depth == 0 || tick >= clock.next() || tick + (depth as u64) < clock.next() {
        return None;
    }
    m.at(slot(tick, depth), col).filter(|v| !is_absent(*v))
}
