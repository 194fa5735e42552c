//! A PromQL subset evaluated on the agent's own window ([`Tsdb`]).
//!
//! Expressions are parsed by `promql-parser` and checked against the subset once, when a rule
//! is loaded ([`Expr::compile`]); what is outside it is refused with a [`Refused`] naming the
//! part, so evaluation cannot fail afterwards.
//!
//! **Supported**, with Prometheus' semantics:
//! - instant and range selectors `name{l="v", l!="v", l=~"re", l!~"re"}[range] offset d`, the
//!   regexes fully anchored. Ranges from one tick (`step`) to `coarse_span` (1 h by default);
//!   a range is left-open, `(t - range, t]` (Prometheus 3; Prometheus 2.x also took a sample
//!   exactly at `t - range`). An instant selector returns a series only if it had a sample at
//!   the latest scrape at or before `t`: the exposition is complete every tick, so a series
//!   missing from it is gone (Prometheus' staleness marker), not looked back for 5 min.
//!   `offset` is supported and counts in the lookback (range + offset within the window).
//! - functions `rate`, `irate`, `increase`, `delta` (extrapolated as Prometheus 2.x does, with
//!   counter resets), `deriv`, `predict_linear` (least squares, intercept at the eval time),
//!   `avg_over_time`, `min_over_time`, `max_over_time`, `histogram_quantile` (classic `le`
//!   buckets), `abs`, `clamp_min`, `clamp_max`, `absent`, `vector`, `scalar`, `time`.
//!   Functions drop `__name__`.
//! - aggregations `sum`, `avg`, `min`, `max`, `count` with `by`/`without`.
//! - `+ - * / % ^` and `== != > < >= <=` (with or without `bool`) between scalars and vectors,
//!   one-to-one vector matching with `on(...)`/`ignoring(...)`; `and`, `or`, `unless`; unary
//!   minus; parentheses; number literals.
//!
//! **Refused**, each with a message naming it: other functions and aggregations (`topk`,
//! `quantile`, `label_replace`, ...), `group_left`/`group_right` and `fill` modifiers (a rule
//! should not depend on many-to-one joins of the agent's own series), subqueries and `@` (they
//! read at times the window does not hold), negative offsets, string literals, selectors
//! without a literal metric name (the window keeps only the metrics rules name), `or` inside a
//! selector, ranges shorter than a tick or longer than the window. Where Prometheus would fail
//! a query at run time (duplicate series on the "one" side of a match), the match group gives no
//! result instead.
//!
//! **Memory** stays bounded: the window keeps only the metric names the rules read
//! ([`Expr::needs`] → [`Tsdb::set_needs`]), each only as far back as read, at two resolutions
//! (every tick for `fine_span`, 2 min by default; every `coarse_step`, 10 s, up to `coarse_span`,
//! 1 h, only for metrics read further back than `fine_span`; ranges longer than `fine_span`
//! read the coarse resolution, as if Prometheus had scraped every 10 s). A series costs 8 B a
//! kept tick plus its labels; new series beyond `max_series` (10k) are refused and counted, and
//! series with no sample left in their window are freed.
//!
//! **Cost**: a selector visits only the series of its metric (and, with an equality matcher,
//! only those with that label value). `rate`, `increase`, `delta` and `irate` read only the
//! range's first and last samples when the series had a sample every tick of it (and, but for
//! `delta`, no counter reset): per-series marks kept at ingest say so in O(1), and the change
//! is then exactly `last - first`, as Prometheus computes it. Other ranges, and the other
//! range functions, scan the ring slices once (memory-bound, about 1.5–4 ns a sample).
//! [`EvalCache`] shares range-function results between the rules of a tick.
//!
//! **Checked against Prometheus**: `crosscheck.rs` runs every supported function, aggregation
//! and operator through `promtool test rules` (Prometheus 2.42) on the same samples and requires
//! bit-equal results.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use foldhash::HashMap;

use super::tsdb::{Bounds, Tsdb};

mod check;
mod eval;
mod functions;
mod histogram;
mod matching;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod crosscheck;
#[cfg(test)]
mod tests;

/// What a set of expressions reads: metric name -> the longest lookback (range + offset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs(pub BTreeMap<String, Duration>);

impl Needs {
    pub fn merge(&mut self, other: &Needs) {
        for (name, lookback) in &other.0 {
            self.add(name, *lookback);
        }
    }

    /// Records that `name` is read `lookback` back (keeping the longest).
    pub fn add(&mut self, name: &str, lookback: Duration) {
        let entry = self.0.entry(name.to_string()).or_default();
        *entry = (*entry).max(lookback);
    }
}

/// A sorted label set, cheap to clone, carrying a hash of its labels but `__name__`: the
/// signature that one-to-one matching compares, known without reading the label text (on 10k
/// series those reads are cache misses, and were most of the engine's time).
#[derive(Debug, Clone)]
pub struct Labels {
    pairs: Arc<[(Arc<str>, Arc<str>)]>,
    hash: u64,
}

impl Default for Labels {
    fn default() -> Self {
        Labels::sorted(Arc::from([]))
    }
}

impl PartialEq for Labels {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.pairs, &other.pairs)
            || (self.hash == other.hash && self.pairs == other.pairs)
    }
}

impl Eq for Labels {}

impl std::hash::Hash for Labels {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Labels {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.pairs.cmp(&other.pairs)
    }
}

impl Labels {
    /// Sorts the pairs by name (a later duplicate name is dropped).
    pub fn new(mut pairs: Vec<(Arc<str>, Arc<str>)>) -> Labels {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        Labels::sorted(pairs.into())
    }

    /// From pairs already sorted by name, without duplicates.
    fn sorted(pairs: Arc<[(Arc<str>, Arc<str>)]>) -> Labels {
        let hash = matching::signature_of(pairs.iter().filter(|(n, _)| &**n != "__name__"));
        Labels { pairs, hash }
    }

    /// From string pairs, sorted (for tests and callers building label sets by hand).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
        Labels::new(
            pairs
                .into_iter()
                .map(|(n, v)| (Arc::from(n), Arc::from(v)))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .and_then(|i| self.pairs.get(i))
            .map(|(_, v)| &**v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The pairs themselves (shared strings: equal pointers are equal text).
    pub(crate) fn pairs(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.pairs
    }

    /// Whether both share one allocation (then they are equal without reading it).
    pub(crate) fn same_storage(&self, other: &Labels) -> bool {
        Arc::ptr_eq(&self.pairs, &other.pairs)
    }

    /// The hash of the labels but `__name__` (`matching::signature` with that filter).
    pub(crate) fn hash_without_name(&self) -> u64 {
        self.hash
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Without `__name__`; the hash stays (it never covers the name).
    pub fn without_name(&self) -> Labels {
        if !self.pairs.iter().any(|(n, _)| &**n == "__name__") {
            return self.clone();
        }
        Labels {
            pairs: (self.pairs.iter())
                .filter(|(n, _)| &**n != "__name__")
                .cloned()
                .collect(),
            hash: self.hash,
        }
    }

    /// The labels whose names `drop` rejects removed (a clone when none is).
    pub(crate) fn without(&self, drop: impl Fn(&str) -> bool) -> Labels {
        if !self.pairs.iter().any(|(n, _)| drop(n)) {
            return self.clone();
        }
        Labels::sorted(
            self.pairs
                .iter()
                .filter(|(n, _)| !drop(n))
                .cloned()
                .collect(),
        )
    }
}

impl std::fmt::Display for Labels {
    /// Prometheus' notation, `{a="b", c="d"}` with the name in front when there is one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(name) = self.get("__name__") {
            f.write_str(name)?;
        }
        f.write_str("{")?;
        let mut first = true;
        for (n, v) in self.iter().filter(|(n, _)| *n != "__name__") {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n}=\"")?;
            for c in v.chars() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    '"' => f.write_str("\\\"")?,
                    '\n' => f.write_str("\\n")?,
                    c => write!(f, "{c}")?,
                }
            }
            f.write_str("\"")?;
        }
        f.write_str("}")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(f64),
    Vector(Vec<Sample>),
}

/// Why an expression is not in the subset, naming the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A parsed expression, checked against the subset.
#[derive(Debug, Clone)]
pub struct Expr {
    node: check::Node,
    needs: Needs,
}

impl Expr {
    /// Compiles against the default window ([`Bounds::default`]).
    pub fn compile(src: &str) -> Result<Expr, Refused> {
        Self::compile_with(src, &Bounds::default())
    }

    /// Compiles against a window of `bounds` (ranges are checked against its step and span).
    pub fn compile_with(src: &str, bounds: &Bounds) -> Result<Expr, Refused> {
        let node = check::compile(src, bounds)?;
        let mut needs = Needs::default();
        node.needs(&mut needs);
        Ok(Expr { node, needs })
    }

    pub fn needs(&self) -> Needs {
        self.needs.clone()
    }

    /// Evaluates at `at_ms` (unix ms). Evaluation cannot fail once compiled: what has no data
    /// gives an empty vector.
    pub fn eval(&self, db: &Tsdb, at_ms: i64) -> Value {
        eval::eval(&self.node, db, at_ms, None)
    }

    /// As [`Expr::eval`], sharing range-function results with the other expressions evaluated
    /// with the same cache on the same window state at the same instant.
    pub fn eval_cached(&self, db: &Tsdb, at_ms: i64, cache: &mut EvalCache) -> Value {
        eval::eval(&self.node, db, at_ms, Some(cache))
    }
}

/// Range-function results (`rate(x[1m])`, ...) shared by the rules of one tick: alert rules
/// often come in pairs differing only in the threshold, or apply several quantiles to one
/// histogram's rates. One cache is reused tick after tick; it empties itself when the window
/// changed (an ingest) or the instant differs.
#[derive(Debug, Default)]
pub struct EvalCache {
    at: Option<((u64, u64), i64)>,
    ranges: HashMap<(check::Key, u64), eval::Shared>,
    /// Results of the shared subexpressions, by key.
    shared: HashMap<check::Key, eval::Shared>,
    hits: u64,
}

impl EvalCache {
    /// Results served from the cache since it was created.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Forgets every result, keeping the maps' room. Done right after the rules of a tick
    /// (their results' labels are still in cache then; at the next tick, releasing them cost a
    /// miss each).
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.shared.clear();
        self.at = None;
    }

    /// Prepares for reads of `db` at `at_ms`, forgetting results of another state or instant.
    fn at(&mut self, db: &Tsdb, at_ms: i64) {
        let at = Some((db.state_key(), at_ms));
        if self.at != at {
            self.ranges.clear();
            self.shared.clear();
            self.at = at;
        }
    }
}
