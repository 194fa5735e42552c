//! The window the rules read: the agent's own exposition, ingested every tick, kept only for
//! the metric names the loaded rules read and only as far back as they read them.
//!
//! Two resolutions share one design: a clock (ring of the ticks' timestamps) and, per series, a
//! ring of `f64` values of the same tick numbering (an absence marker where the series had no
//! sample). A metric's rings are the columns of one matrix with a row per tick
//! ([`ring::Matrix`]): ingest writes a row in order, and the rules' rates read rows that every
//! rule over that metric shares (a ring per series cost each read a cache miss of its own).
//! The fine rings hold every tick (`step`) for up to `fine_span`; the coarse rings hold the
//! first scrape of every `coarse_step` for up to `coarse_span`, and only for metrics read
//! further back than `fine_span`. A range longer than `fine_span` is read at the coarse
//! resolution: what Prometheus would compute had it scraped the agent every `coarse_step`
//! (a counter reset and re-climb within one coarse step is not seen).
//!
//! Each series also keeps, per resolution, since which tick its ring has had a sample every
//! tick and no drop (`ring::Marks`, 16 B): rates over such ranges read two samples, not all.
//!
//! Memory is about `series × (fine depth + coarse depth) × 8 B` plus the labels; new series
//! beyond `max_series` are refused and counted, and a series with no sample left in its window
//! is freed.
use std::{sync::Arc, time::Duration};

use foldhash::HashMap;

use super::promql::{Labels, Needs};

mod exposition;
mod ring;
#[cfg(test)]
mod tests;

use ring::Clock;
pub(crate) use ring::Run;

/// How much the window may hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Series kept at most; a new series beyond it is dropped and counted.
    pub max_series: usize,
    /// The fine ring's step (the agent's tick) and span.
    pub step: Duration,
    pub fine_span: Duration,
    /// The coarse ring's step and span (ranges longer than `fine_span` read it).
    pub coarse_step: Duration,
    pub coarse_span: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_series: 10_000,
            step: Duration::from_millis(250),
            fine_span: Duration::from_secs(120),
            coarse_step: Duration::from_secs(10),
            coarse_span: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Samples in the text, samples kept (their metric is needed), new series refused (bound).
    pub samples: usize,
    pub kept: usize,
    pub refused: usize,
    /// Lines of needed metrics that did not parse (skipped).
    pub malformed: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub series: usize,
    /// Heap the rings hold, estimated from their capacities.
    pub bytes: usize,
    /// New series refused since start (the `max_series` bound).
    pub refused_total: u64,
    /// Malformed lines of needed metrics skipped since start.
    pub malformed_total: u64,
}

/// One series: its labels and its value rings (empty when the resolution is not kept).
#[derive(Debug)]
pub(crate) struct Series {
    labels: Labels,
    /// The label text as the exposition spells it.
    raw: std::ops::Range<usize>,
    /// The labels without `__name__`, what functions return (shared, not rebuilt per eval).
    bare: Labels,
    /// One past the last tick with a sample, per resolution (0: none).
    last_fine: u64,
    last_coarse: u64,
    /// Since when each ring has had a sample every tick, and no drop (O(1) rates).
    fine_marks: ring::Marks,
    coarse_marks: ring::Marks,
}

/// A series as the evaluator reads it: with its metric, whose matrices hold its values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SeriesRef<'a> {
    metric: &'a Metric,
    col: usize,
    series: &'a Series,
}

impl<'a> SeriesRef<'a> {
    fn of(metric: &'a Metric, col: u32) -> Option<Self> {
        let series = metric.series.get(col as usize)?;
        Some(Self {
            metric,
            col: col as usize,
            series,
        })
    }

    pub(crate) fn labels(&self) -> &'a Labels {
        &self.series.labels
    }

    pub(crate) fn bare(&self) -> &'a Labels {
        &self.series.bare
    }
}

#[derive(Debug, Default)]
struct Metric {
    name: Box<str>,
    /// The series' values, a column each (the series' index), per resolution (depth 0: not
    /// kept).
    fine: ring::Matrix,
    coarse: ring::Matrix,
    series: Vec<Series>,
    /// Indices of `series` sorted by labels: selectors return series in Prometheus' order, so
    /// sums add in the same order as Prometheus does.
    order: Vec<u32>,
    /// Raw label text of the exposition -> series (the fast path of ingest).
    by_raw: HashMap<Box<str>, u32>,
    /// The series' label texts end to end, in column order (`Series::raw` indexes it): ingest
    /// compares each line with the next text in turn, reading this front to back.
    raws: String,
    by_labels: HashMap<Labels, u32>,
    /// Series that got a sample in the current scrape.
    seen: usize,
    /// The series in the order the last scrape listed them, and where this scrape is in that
    /// list: the exposition's order is stable, so the next line is almost always the series
    /// predicted, found with one string comparison instead of a hash.
    expected: Vec<u32>,
    pos: usize,
    scraped: Vec<u32>,
    /// Label name -> value -> series (in label order): selectors with an equality matcher
    /// visit only those. Rebuilt after a scrape that added or freed series.
    postings: HashMap<Arc<str>, HashMap<Arc<str>, Vec<u32>>>,
    /// Each series' position in `order`: postings lists merge by it, without label reads.
    rank: Vec<u32>,
    dirty: bool,
    /// The ring slots of the tick being ingested.
    fine_slot: usize,
    coarse_slot: Option<usize>,
}

impl Metric {
    fn index(&mut self) {
        self.postings.clear();
        self.rank = vec![0; self.series.len()];
        for (pos, &i) in self.order.iter().enumerate() {
            if let Some(r) = self.rank.get_mut(i as usize) {
                *r = pos as u32;
            }
        }
        for &i in &self.order {
            let Some(s) = self.series.get(i as usize) else {
                continue;
            };
            for (n, v) in s.bare.pairs() {
                let values = self.postings.entry(n.clone()).or_default();
                values.entry(v.clone()).or_default().push(i);
            }
        }
        self.dirty = false;
    }
}

/// Which ring a read uses and the ticks it covers, first and last inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    coarse: bool,
    first: u64,
    last: u64,
}

impl Window {
    pub(crate) fn first(&self) -> u64 {
        self.first
    }

    pub(crate) fn last(&self) -> u64 {
        self.last
    }
}

#[derive(Debug)]
pub struct Tsdb {
    bounds: Bounds,
    step_ms: i64,
    fine_span_ms: i64,
    coarse_step_ms: i64,
    fine: Clock,
    coarse: Clock,
    last_at: Option<i64>,
    metrics: Vec<Metric>,
    by_name: HashMap<Box<str>, usize>,
    /// Interned label names and values: a handful of names shared by every series, and values
    /// shared by many (one `service` value by all its series). Reads of shared text stay in
    /// cache, and equal pointers are equal text. Entries nothing else holds go at sweeps.
    strings: foldhash::HashSet<Arc<str>>,
    series: usize,
    refused_total: u64,
    malformed_total: u64,
    /// Which window and which state of it (bumped by every change): keys evaluation caches.
    id: u64,
    generation: u64,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Ticks needed to cover `span_ms` at `step_ms`, plus one for the tick at the range's end and
/// one for jitter.
fn depth_for(span_ms: i64, step_ms: i64) -> usize {
    let ticks = (span_ms.max(0) as u64).div_ceil(step_ms.max(1) as u64);
    usize::try_from(ticks)
        .unwrap_or(usize::MAX / 2)
        .saturating_add(2)
}

impl Tsdb {
    pub fn new(bounds: Bounds) -> Self {
        let step_ms = millis(bounds.step).max(1);
        let fine_span_ms = millis(bounds.fine_span).max(step_ms);
        let coarse_step_ms = millis(bounds.coarse_step).max(step_ms);
        let coarse_span_ms = millis(bounds.coarse_span).max(fine_span_ms);
        Self {
            fine: Clock::new(depth_for(fine_span_ms, step_ms)),
            coarse: Clock::new(depth_for(coarse_span_ms, coarse_step_ms)),
            bounds,
            step_ms,
            fine_span_ms,
            coarse_step_ms,
            last_at: None,
            metrics: Vec::new(),
            by_name: HashMap::default(),
            strings: Default::default(),
            series: 0,
            refused_total: 0,
            malformed_total: 0,
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            generation: 0,
        }
    }

    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// Keeps only the metric names the rules read, each as far back as they read it; frees
    /// the rest.
    pub fn set_needs(&mut self, needs: &Needs) {
        self.generation += 1;
        self.metrics.retain(|m| needs.0.contains_key(&*m.name));
        for name in needs.0.keys() {
            if !self.metrics.iter().any(|m| *m.name == **name) {
                self.metrics.push(Metric {
                    name: name.as_str().into(),
                    ..Metric::default()
                });
            }
        }
        self.by_name = (self.metrics.iter().enumerate())
            .map(|(i, m)| (m.name.clone(), i))
            .collect();
        for (name, lookback) in &needs.0 {
            let lookback_ms = millis(*lookback);
            let (fine_depth, coarse_depth) = if lookback_ms > self.fine_span_ms {
                let coarse = depth_for(lookback_ms, self.coarse_step_ms).min(self.coarse.depth());
                (self.fine.depth(), coarse)
            } else {
                (
                    depth_for(lookback_ms, self.step_ms).min(self.fine.depth()),
                    0,
                )
            };
            let Some(metric) = self.metrics.iter_mut().find(|m| *m.name == **name) else {
                continue;
            };
            if metric.fine.depth() != fine_depth {
                let next = self.fine.next();
                let held = metric.fine.depth().min(fine_depth) as u64;
                for s in &mut metric.series {
                    // A deeper ring holds older ticks it has no samples for.
                    s.fine_marks.restart(next.saturating_sub(held));
                }
                metric.fine.resize(fine_depth, next);
            }
            if metric.coarse.depth() != coarse_depth {
                let next = self.coarse.next();
                let held = metric.coarse.depth().min(coarse_depth) as u64;
                for s in &mut metric.series {
                    s.coarse_marks.restart(next.saturating_sub(held));
                }
                metric.coarse.resize(coarse_depth, next);
            }
        }
        self.series = self.metrics.iter().map(|m| m.series.len()).sum();
    }

    /// One scrape of the agent's own exposition (OpenMetrics or Prometheus text) at `at_ms`
    /// (unix ms, increasing). A needed series absent from it has no sample at `at_ms`. A scrape
    /// not later than the previous one is ignored.
    pub fn ingest(&mut self, at_ms: i64, text: &str) -> Ingested {
        let mut got = Ingested::default();
        if self.last_at.is_some_and(|last| at_ms <= last) {
            return got;
        }
        let coarse_tick = self.last_at.is_none_or(|last| {
            last.div_euclid(self.coarse_step_ms) != at_ms.div_euclid(self.coarse_step_ms)
        });
        self.last_at = Some(at_ms);
        self.generation += 1;
        let fine = self.fine.push(at_ms);
        let coarse = coarse_tick.then(|| self.coarse.push(at_ms));
        for metric in &mut self.metrics {
            metric.seen = 0;
            std::mem::swap(&mut metric.expected, &mut metric.scraped);
            metric.scraped.clear();
            metric.pos = 0;
            // One division per metric, not per line: every series of it shares the slots.
            metric.fine_slot = ring::slot(fine, metric.fine.depth());
            metric.coarse_slot = coarse.map(|c| ring::slot(c, metric.coarse.depth()));
        }
        // Lines of one metric come together: the previous line's look-up is reused.
        let (mut last_name, mut last_metric) = ("", None);
        for line in text.lines() {
            let name = match exposition::name_of(line) {
                exposition::Split::Skip => continue,
                exposition::Split::Sample(name) => name,
            };
            got.samples += 1;
            if name != last_name {
                last_name = name;
                last_metric = self.by_name.get(name).copied();
            }
            let Some(m) = last_metric else {
                continue;
            };
            match self.store(m, line, fine, coarse) {
                Stored::Kept => got.kept += 1,
                Stored::Refused => got.refused += 1,
                Stored::Malformed => got.malformed += 1,
            }
        }
        self.refused_total += got.refused as u64;
        self.malformed_total += got.malformed as u64;
        // What the text did not list is absent at the new tick. Marked afterwards (and only
        // there) so that a scrape touches each listed series' rings once.
        for metric in &mut self.metrics {
            if metric.seen == metric.series.len() {
                continue;
            }
            for (col, s) in metric.series.iter_mut().enumerate() {
                if s.last_fine != fine + 1 {
                    if let Some(v) = metric.fine.at_mut(metric.fine_slot, col) {
                        *v = ring::absent();
                    }
                    s.fine_marks.absent(fine);
                }
                if let (Some(c), Some(slot)) = (coarse, metric.coarse_slot) {
                    if s.last_coarse != c + 1 {
                        if let Some(v) = metric.coarse.at_mut(slot, col) {
                            *v = ring::absent();
                        }
                        s.coarse_marks.absent(c);
                    }
                }
            }
        }
        self.sweep();
        for m in self.metrics.iter_mut().filter(|m| m.dirty) {
            m.index();
            m.fine.fit(m.series.len());
            m.coarse.fit(m.series.len());
        }
        got
    }

    fn store(&mut self, m: usize, line: &str, fine: u64, coarse: Option<u64>) -> Stored {
        let Some(metric) = self.metrics.get_mut(m) else {
            return Stored::Malformed;
        };
        // The series predicted, recognised by its label text without cutting the line.
        let fast = metric.expected.get(metric.pos).and_then(|&i| {
            let s = metric.series.get(i as usize)?;
            exposition::known_value(line, metric.raws.get(s.raw.clone())?).map(|token| (i, token))
        });
        let (idx, value) = match fast {
            Some((idx, token)) => {
                let Some(value) = exposition::parse_value(token) else {
                    return Stored::Malformed;
                };
                metric.pos += 1;
                (idx, value)
            }
            None => match self.store_slow(m, line) {
                Ok(found) => found,
                Err(stored) => return stored,
            },
        };
        let Some(metric) = self.metrics.get_mut(m) else {
            return Stored::Malformed;
        };
        metric.scraped.push(idx);
        let Some(s) = metric.series.get_mut(idx as usize) else {
            return Stored::Malformed;
        };
        if s.last_fine != fine + 1 {
            metric.seen += 1;
        }
        let col = idx as usize;
        ring::write(
            &mut metric.fine,
            col,
            metric.fine_slot,
            fine,
            value,
            s.last_fine,
            &mut s.fine_marks,
        );
        s.last_fine = fine + 1;
        if let (Some(c), Some(slot)) = (coarse, metric.coarse_slot) {
            let (last, marks) = (s.last_coarse, &mut s.coarse_marks);
            if ring::write(&mut metric.coarse, col, slot, c, value, last, marks) {
                s.last_coarse = c + 1;
            }
        }
        Stored::Kept
    }

    /// Cuts the line and finds its series (creating it if new): what `store` does when the
    /// line is not the one predicted.
    fn store_slow(&mut self, m: usize, line: &str) -> Result<(u32, f64), Stored> {
        let l = exposition::split(line).ok_or(Stored::Malformed)?;
        let value = exposition::parse_value(l.value).ok_or(Stored::Malformed)?;
        let metric = self.metrics.get_mut(m).ok_or(Stored::Malformed)?;
        let predicted = metric.expected.get(metric.pos).copied().filter(|&i| {
            metric
                .series
                .get(i as usize)
                .is_some_and(|s| metric.raws.get(s.raw.clone()) == Some(l.labels))
        });
        metric.pos += 1;
        let idx = match predicted.or_else(|| metric.by_raw.get(l.labels).copied()) {
            Some(idx) => idx,
            None => self.add_series(m, l.name, l.labels)?,
        };
        Ok((idx, value))
    }

    /// Finds or creates the series of a label text not seen before.
    fn add_series(&mut self, m: usize, name: &str, raw: &str) -> Result<u32, Stored> {
        if !exposition::valid_metric_name(name) {
            return Err(Stored::Malformed);
        }
        let pairs = exposition::parse_labels(raw).ok_or(Stored::Malformed)?;
        let mut labels: Vec<(Arc<str>, Arc<str>)> = Vec::with_capacity(pairs.len() + 1);
        labels.push((self.intern("__name__"), self.intern(name)));
        for (n, v) in pairs {
            labels.push((self.intern(n), self.intern(&v)));
        }
        let labels = Labels::new(labels);
        // A new series has no sample before the scrape being ingested: its rings are regular
        // from that scrape's ticks (the coarse one only if this scrape is a coarse tick).
        let fine_marks = ring::Marks::from(self.fine.next().saturating_sub(1));
        let coarse_now = self.coarse.latest_ms() == self.fine.latest_ms();
        let coarse_marks =
            ring::Marks::from(self.coarse.next().saturating_sub(u64::from(coarse_now)));
        let series_total = self.series;
        let max_series = self.bounds.max_series;
        let metric = self.metrics.get_mut(m).ok_or(Stored::Malformed)?;
        if let Some(&idx) = metric.by_labels.get(&labels) {
            // The same series spelt differently (label order, spaces): remember the spelling,
            // within reason so that odd spellings cannot grow the map without bound.
            if metric.by_raw.len() < 2 * metric.series.len() + 16 {
                metric.by_raw.insert(raw.into(), idx);
            }
            return Ok(idx);
        }
        if series_total >= max_series {
            return Err(Stored::Refused);
        }
        let idx = u32::try_from(metric.series.len()).map_err(|_| Stored::Refused)?;
        let pos = metric.order.partition_point(|&i| {
            metric
                .series
                .get(i as usize)
                .is_some_and(|s| s.labels < labels)
        });
        metric.order.insert(pos, idx);
        metric.series.push(Series {
            bare: labels.without_name(),
            labels: labels.clone(),
            raw: metric.raws.len()..metric.raws.len() + raw.len(),
            last_fine: 0,
            last_coarse: 0,
            fine_marks,
            coarse_marks,
        });
        metric.raws.push_str(raw);
        metric.fine.open(idx as usize);
        metric.coarse.open(idx as usize);
        metric.by_raw.insert(raw.into(), idx);
        metric.by_labels.insert(labels, idx);
        metric.dirty = true;
        self.series += 1;
        Ok(idx)
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.strings.get(name) {
            return n.clone();
        }
        let n: Arc<str> = name.into();
        self.strings.insert(n.clone());
        n
    }

    /// Frees the series with no sample left in their window (only where one was missing from
    /// this scrape).
    fn sweep(&mut self) {
        let (fine_next, coarse_next) = (self.fine.next(), self.coarse.next());
        let mut removed = 0;
        for metric in &mut self.metrics {
            if metric.seen == metric.series.len() {
                continue;
            }
            let (fd, cd) = (metric.fine.depth() as u64, metric.coarse.depth() as u64);
            let dead = |s: &Series| {
                s.last_fine + fd <= fine_next && (cd == 0 || s.last_coarse + cd <= coarse_next)
            };
            if !metric.series.iter().any(dead) {
                continue;
            }
            let mut remap = Vec::with_capacity(metric.series.len());
            let mut next = 0u32;
            for s in &metric.series {
                remap.push((!dead(s)).then(|| {
                    next += 1;
                    next - 1
                }));
            }
            let before = metric.series.len();
            metric.series.retain(|s| !dead(s));
            removed += before - metric.series.len();
            metric.fine.remap(&remap, metric.series.len());
            let mut raws = String::with_capacity(metric.raws.len());
            for s in &mut metric.series {
                let text = metric.raws.get(s.raw.clone()).unwrap_or_default();
                s.raw = raws.len()..raws.len() + text.len();
                raws.push_str(text);
            }
            metric.raws = raws;
            metric.coarse.remap(&remap, metric.series.len());
            let map = |i: &mut u32| match remap.get(*i as usize).copied().flatten() {
                Some(n) => {
                    *i = n;
                    true
                }
                None => false,
            };
            metric.by_raw.retain(|_, i| map(i));
            metric.by_labels.retain(|_, i| map(i));
            metric.order.retain_mut(|i| map(i));
            metric.scraped.retain_mut(|i| map(i));
            metric.dirty = true;
        }
        self.series -= removed;
        if removed > 0 {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
        }
    }

    pub fn stats(&self) -> Stats {
        let word = std::mem::size_of::<usize>();
        let mut bytes = self.fine.bytes() + self.coarse.bytes();
        bytes += self.by_name.capacity() * (3 * word + 1) * 8 / 7;
        for m in &self.metrics {
            bytes += 2 * m.name.len() + std::mem::size_of::<Metric>();
            bytes += m.fine.bytes() + m.coarse.bytes();
            bytes += (m.expected.capacity() + m.scraped.capacity()) * 4;
            bytes += m.series.capacity() * std::mem::size_of::<Series>() + m.order.capacity() * 4;
            // Hash map entries: key, value and a control byte, at the maps' load factor.
            bytes += m.by_raw.capacity() * (2 * word + 4 + 1) * 8 / 7;
            bytes += m.by_labels.capacity() * (2 * word + 4 + 1) * 8 / 7;
            bytes += m.by_raw.keys().map(|k| k.len()).sum::<usize>();
            for values in m.postings.values() {
                bytes += values.capacity() * (5 * word + 1) * 8 / 7;
                bytes += values.values().map(|v| v.capacity() * 4).sum::<usize>();
            }
            for s in &m.series {
                bytes += s.raw.len() + 2 * word;
                // Two label slices (with and without the name) of two Arcs a pair (the
                // strings are interned, counted below).
                bytes += (s.labels.len() + s.bare.len()) * 4 * word + 6 * word;
            }
        }
        bytes += self.strings.capacity() * (2 * word + 1) * 8 / 7;
        bytes += self
            .strings
            .iter()
            .map(|s| s.len() + 2 * word)
            .sum::<usize>();
        Stats {
            series: self.series,
            bytes,
            refused_total: self.refused_total,
            malformed_total: self.malformed_total,
        }
    }

    // ---- reads, for the evaluator ----

    /// Whether a read reaching `lookback_ms` back uses the coarse resolution.
    pub(crate) fn is_coarse(&self, lookback_ms: i64) -> bool {
        lookback_ms > self.fine_span_ms
    }

    /// The ticks with timestamps in `(from_excl, to_incl]`.
    pub(crate) fn window(&self, from_excl: i64, to_incl: i64, coarse: bool) -> Option<Window> {
        let clock = if coarse { &self.coarse } else { &self.fine };
        let (first, last) = clock.ticks_in(from_excl, to_incl)?;
        Some(Window {
            coarse,
            first,
            last,
        })
    }

    /// The latest tick at or before `at_ms`: what an instant selector reads.
    pub(crate) fn instant(&self, at_ms: i64, coarse: bool) -> Option<Window> {
        let clock = if coarse { &self.coarse } else { &self.fine };
        let tick = clock.at_or_before(at_ms)?;
        Some(Window {
            coarse,
            first: tick,
            last: tick,
        })
    }

    /// The series of a metric, in label order.
    #[cfg(test)]
    pub(crate) fn series(&self, metric: &str) -> impl Iterator<Item = SeriesRef<'_>> {
        self.series_with(metric, None)
    }

    /// The series of a metric with label `name` = `value` if given (all otherwise), in label
    /// order.
    pub(crate) fn series_with(
        &self,
        metric: &str,
        eq: Option<(&str, &str)>,
    ) -> impl Iterator<Item = SeriesRef<'_>> {
        let m = self.by_name.get(metric).and_then(|&i| self.metrics.get(i));
        let ids: &[u32] = match (m, eq) {
            (Some(m), Some((name, value))) => m
                .postings
                .get(name)
                .and_then(|values| values.get(value))
                .map_or(&[], |ids| ids.as_slice()),
            (Some(m), None) => &m.order,
            (None, _) => &[],
        };
        ids.iter()
            .filter_map(move |&i| m.and_then(|m| SeriesRef::of(m, i)))
    }

    /// The series of a metric whose label `name` has any of `values`, in label order (a
    /// literal regex alternation's postings, merged).
    pub(crate) fn series_with_any(
        &self,
        metric: &str,
        name: &str,
        values: &[&str],
    ) -> Vec<SeriesRef<'_>> {
        let Some(m) = self.by_name.get(metric).and_then(|&i| self.metrics.get(i)) else {
            return Vec::new();
        };
        let Some(by_value) = m.postings.get(name) else {
            return Vec::new();
        };
        let mut ids: Vec<u32> = (values.iter())
            .filter_map(|v| by_value.get(*v))
            .flatten()
            .copied()
            .collect();
        if values.len() > 1 {
            ids.sort_unstable_by_key(|&i| m.rank.get(i as usize).copied().unwrap_or(u32::MAX));
            ids.dedup();
        }
        ids.iter().filter_map(|&i| SeriesRef::of(m, i)).collect()
    }

    /// Identifies this window and its state: equal keys, equal reads.
    pub(crate) fn state_key(&self) -> (u64, u64) {
        (self.id, self.generation)
    }

    /// The value of a series at the last tick of `w`.
    pub(crate) fn last_value(&self, s: SeriesRef<'_>, w: &Window) -> Option<f64> {
        if w.coarse {
            ring::value_at(&self.coarse, &s.metric.coarse, s.col, w.last)
        } else {
            ring::value_at(&self.fine, &s.metric.fine, s.col, w.last)
        }
    }

    /// The values of a series in `w`.
    #[cfg(test)]
    pub(crate) fn run<'a>(&'a self, s: SeriesRef<'a>, w: &Window) -> Run<'a> {
        self.runs(w)(s)
    }

    /// The values of the series of one metric in `w`, one series at a time: where `w` lies in
    /// the metric's ring is worked out at the first series, not at each.
    pub(crate) fn runs<'a>(&'a self, w: &Window) -> impl FnMut(SeriesRef<'a>) -> Run<'a> + 'a {
        let w = *w;
        let mut frame: Option<(*const Metric, ring::Frame<'a>)> = None;
        move |s: SeriesRef<'a>| {
            let (clock, m, marks) = if w.coarse {
                (&self.coarse, &s.metric.coarse, s.series.coarse_marks)
            } else {
                (&self.fine, &s.metric.fine, s.series.fine_marks)
            };
            let f = match frame {
                Some((of, f)) if std::ptr::eq(of, s.metric) => f,
                _ => {
                    let f = ring::Frame::new(clock, m, w.first, w.last);
                    frame = Some((s.metric, f));
                    f
                }
            };
            f.run(s.col, marks)
        }
    }

    /// The timestamp of a tick of `w`'s resolution (0 if no longer held).
    pub(crate) fn tick_ms(&self, w: &Window, tick: u64) -> i64 {
        let clock = if w.coarse { &self.coarse } else { &self.fine };
        clock.ts(tick).unwrap_or(0)
    }

    /// The samples of a series in `w`, as (timestamp ms, value), appended to `out`.
    #[cfg(test)]
    pub(crate) fn samples(&self, s: SeriesRef<'_>, w: &Window, out: &mut Vec<(i64, f64)>) {
        self.run(s, w)
            .for_each(|tick, v| out.push((self.tick_ms(w, tick), v)));
    }

    /// The timestamp of the latest scrape.
    pub fn latest_ms(&self) -> Option<i64> {
        self.fine.latest_ms()
    }
}

enum Stored {
    Kept,
    Refused,
    Malformed,
}
