//! Evaluation of a checked tree at one instant.
use std::sync::Arc;

use super::{
    check::{AggOp, Grouping, Node, Selector},
    functions::{self, Span},
    histogram,
    matching::{self, Chains, Filter},
    EvalCache, Labels, Sample, Value,
};
use crate::rules::tsdb::{SeriesRef, Tsdb};
use promql_parser::label::MatchOp;

/// A value inside the evaluation: vectors are shared, so a cached result is read where it
/// lies (a comparison keeps a few of its samples; copying all of them was a fifth of the
/// engine's time).
#[derive(Debug, Clone)]
pub(super) enum Val {
    Scalar(f64),
    Vector(Shared),
}

pub(super) type Shared = Arc<Vec<Sample>>;

impl Val {
    fn vector(v: Vec<Sample>) -> Val {
        Val::Vector(Arc::new(v))
    }
}

pub(super) fn eval(node: &Node, db: &Tsdb, at_ms: i64, cache: Option<&mut EvalCache>) -> Value {
    let mut cache = cache;
    if let Some(c) = cache.as_deref_mut() {
        c.at(db, at_ms);
    }
    let mut cx = Cx {
        db,
        at_ms,
        buf: Vec::new(),
        cache,
    };
    match cx.eval(node) {
        Val::Scalar(v) => Value::Scalar(v),
        Val::Vector(v) => Value::Vector(Arc::unwrap_or_clone(v)),
    }
}

struct Cx<'a, 'c> {
    db: &'a Tsdb,
    at_ms: i64,
    /// One series' samples at a time, reused across series.
    buf: Vec<(i64, f64)>,
    cache: Option<&'c mut EvalCache>,
}

/// The first equality matcher with a value, and its index: the selector visits only its
/// series.
fn posting(sel: &Selector) -> Option<(usize, (&str, &str))> {
    sel.matchers
        .iter()
        .enumerate()
        .find(|(_, m)| matches!(m.op, MatchOp::Equal) && !m.value.is_empty())
        .map(|(i, m)| (i, (m.name.as_str(), m.value.as_str())))
}

/// A regex matcher that is an alternation of literals (`reason=~"refused|reset"`, fully
/// anchored as Prometheus anchors it): the values it matches, for a postings lookup.
fn alternation(sel: &Selector) -> Option<(usize, &str, Vec<&str>)> {
    sel.matchers.iter().enumerate().find_map(|(i, m)| {
        let MatchOp::Re(_) = &m.op else {
            return None;
        };
        let literal = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_:/,- ".contains(&b))
        };
        let parts: Vec<&str> = m.value.split('|').collect();
        parts
            .iter()
            .all(|p| literal(p))
            .then_some((i, m.name.as_str(), parts))
    })
}

/// The series a selector can match, in label order: one postings list for an equality
/// matcher, the union of a few for a literal alternation, else every series of the metric.
/// The matcher the lookup satisfied is returned (`matches` checks only the others: reading
/// each series' labels is a cache miss, and often the lookup was the only matcher).
fn candidates<'d>(db: &'d Tsdb, sel: &Selector) -> (Vec<SeriesRef<'d>>, Option<usize>) {
    if let Some((i, eq)) = posting(sel) {
        return (db.series_with(&sel.metric, Some(eq)).collect(), Some(i));
    }
    if let Some((i, name, values)) = alternation(sel) {
        return (db.series_with_any(&sel.metric, name, &values), Some(i));
    }
    (db.series_with(&sel.metric, None).collect(), None)
}

/// Whether `labels` pass the selector's matchers but the one `done` (already satisfied).
fn matches(sel: &Selector, done: Option<usize>, labels: &Labels) -> bool {
    (sel.matchers.iter().enumerate())
        .filter(|(i, _)| Some(*i) != done)
        .all(|(_, m)| m.is_match(labels.get(&m.name).unwrap_or("")))
}

impl Cx<'_, '_> {
    fn eval(&mut self, node: &Node) -> Val {
        match node {
            Node::Number(v) => Val::Scalar(*v),
            Node::Time => Val::Scalar(self.at_ms as f64 / 1000.0),
            Node::Instant(sel) => Val::vector(self.instant(sel)),
            Node::Range {
                func,
                key,
                sel,
                range_ms,
                arg,
            } => {
                let arg = arg.as_ref().map_or(f64::NAN, |a| self.scalar(a));
                let key = (key.clone(), arg.to_bits());
                if let Some(cache) = self.cache.as_deref_mut() {
                    if let Some(v) = cache.ranges.get(&key) {
                        cache.hits += 1;
                        return Val::Vector(v.clone());
                    }
                }
                let v = Arc::new(self.range(*func, sel, *range_ms, arg));
                if let Some(cache) = self.cache.as_deref_mut() {
                    cache.ranges.insert(key, v.clone());
                }
                Val::Vector(v)
            }
            Node::Shared { key, expr } => {
                if let Some(cache) = self.cache.as_deref_mut() {
                    if let Some(v) = cache.shared.get(key) {
                        cache.hits += 1;
                        return Val::Vector(v.clone());
                    }
                }
                let v = self.eval(expr);
                if let (Some(cache), Val::Vector(v)) = (self.cache.as_deref_mut(), &v) {
                    cache.shared.insert(key.clone(), v.clone());
                }
                v
            }
            Node::Quantile { q, expr } => {
                let q = self.scalar(q);
                let v = self.vector(expr);
                Val::vector(histogram::quantile(q, &v))
            }
            Node::Math { func, expr, arg } => {
                let arg = arg.as_ref().map_or(f64::NAN, |a| self.scalar(a));
                let v = self.vector(expr);
                Val::vector(
                    v.iter()
                        .map(|s| Sample {
                            value: functions::math(*func, s.value, arg),
                            labels: s.labels.without_name(),
                        })
                        .collect(),
                )
            }
            Node::Absent { expr, labels } => Val::vector(if self.vector(expr).is_empty() {
                vec![Sample {
                    labels: labels.clone(),
                    value: 1.0,
                }]
            } else {
                Vec::new()
            }),
            Node::Vector(s) => Val::vector(vec![Sample {
                labels: Labels::default(),
                value: self.scalar(s),
            }]),
            Node::Scalar(v) => Val::Scalar(match self.vector(v).as_slice() {
                [one] => one.value,
                _ => f64::NAN,
            }),
            Node::Aggregate { op, grouping, expr } => {
                let v = self.vector(expr);
                Val::vector(aggregate(*op, grouping, &v))
            }
            Node::Neg(e) => match self.eval(e) {
                Val::Scalar(v) => Val::Scalar(-v),
                Val::Vector(v) => Val::vector(
                    v.iter()
                        .map(|s| Sample {
                            value: -s.value,
                            labels: s.labels.without_name(),
                        })
                        .collect(),
                ),
            },
            Node::Binary {
                op,
                lhs,
                rhs,
                return_bool,
                matching,
            } => {
                let l = self.eval(lhs);
                let r = self.eval(rhs);
                matching::binary(*op, l, r, *return_bool, matching)
            }
            Node::Set {
                op,
                lhs,
                rhs,
                matching,
            } => {
                let l = self.vector(lhs);
                let r = self.vector(rhs);
                Val::vector(matching::set(*op, &l, &r, matching))
            }
        }
    }

    fn scalar(&mut self, node: &Node) -> f64 {
        match self.eval(node) {
            Val::Scalar(v) => v,
            // The checker lets only scalar expressions here.
            Val::Vector(_) => f64::NAN,
        }
    }

    fn vector(&mut self, node: &Node) -> Shared {
        match self.eval(node) {
            Val::Vector(v) => v,
            Val::Scalar(_) => Shared::default(),
        }
    }

    fn instant(&mut self, sel: &Selector) -> Vec<Sample> {
        let db = self.db;
        let at = self.at_ms.saturating_sub(sel.offset_ms);
        let Some(w) = db.instant(at, db.is_coarse(sel.offset_ms)) else {
            return Vec::new();
        };
        let (series, done) = candidates(db, sel);
        let mut out = Vec::with_capacity(series.len());
        out.extend(
            (series.into_iter())
                .filter(|s| matches(sel, done, s.labels()))
                .filter_map(|s| {
                    db.last_value(s, &w).map(|value| Sample {
                        labels: s.labels().clone(),
                        value,
                    })
                }),
        );
        out
    }

    fn range(
        &mut self,
        func: super::check::RangeFn,
        sel: &Selector,
        range_ms: i64,
        arg: f64,
    ) -> Vec<Sample> {
        let db = self.db;
        let end_ms = self.at_ms.saturating_sub(sel.offset_ms);
        let start_ms = end_ms.saturating_sub(range_ms);
        let coarse = db.is_coarse(range_ms.saturating_add(sel.offset_ms));
        let Some(w) = db.window(start_ms, end_ms, coarse) else {
            return Vec::new();
        };
        let span = Span {
            start_ms,
            end_ms,
            range_ms,
            eval_ms: self.at_ms,
        };
        // Most runs end at the window's ends: their timestamps are looked up once.
        let ends = (
            w.first(),
            db.tick_ms(&w, w.first()),
            w.last(),
            db.tick_ms(&w, w.last()),
        );
        let ts = |tick| match ends {
            (first, ms, _, _) if tick == first => ms,
            (_, _, last, ms) if tick == last => ms,
            _ => db.tick_ms(&w, tick),
        };
        let (series, done) = candidates(db, sel);
        let mut out = Vec::with_capacity(series.len());
        let mut runs = db.runs(&w);
        for s in series
            .into_iter()
            .filter(|s| matches(sel, done, s.labels()))
        {
            let run = runs(s);
            if let Some(value) = functions::apply(func, &run, ts, span, arg, &mut self.buf) {
                out.push(Sample {
                    labels: s.bare().clone(),
                    value,
                });
            }
        }
        out
    }
}

/// One output group of an aggregation.
struct Group {
    labels: Labels,
    value: f64,
    mean: f64,
    count: f64,
}

/// sum / avg / min / max / count, groups in order of first appearance, each folded in the
/// order of the input (Prometheus' order, so float sums agree).
fn aggregate(op: AggOp, grouping: &Grouping, v: &[Sample]) -> Vec<Sample> {
    let keeps = |n: &str| match grouping {
        Grouping::By(by) => by.binary_search_by(|l| (**l).cmp(n)).is_ok(),
        Grouping::Without(w) => n != "__name__" && w.binary_search_by(|l| (**l).cmp(n)).is_err(),
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut index = Chains::with_capacity(8);
    let mut filter = Filter::new(keeps);
    for s in v {
        let sig = filter.signature(&s.labels);
        let found = index.get(sig).find(|&g| {
            groups
                .get(g)
                .is_some_and(|g| filter.keeps_exactly(&s.labels, &g.labels))
        });
        let Some(g) = found.and_then(|g| groups.get_mut(g)) else {
            index.push(sig);
            groups.push(Group {
                labels: s.labels.without(|n| !keeps(n)),
                value: s.value,
                mean: s.value,
                count: 1.0,
            });
            continue;
        };
        let x = s.value;
        match op {
            AggOp::Sum => g.value += x,
            AggOp::Avg => {
                g.count += 1.0;
                // An infinite mean stays unless a NaN or the opposite infinity arrives.
                let keep_inf = g.mean.is_infinite()
                    && ((x.is_infinite() && (g.mean > 0.0) == (x > 0.0))
                        || (!x.is_infinite() && !x.is_nan()));
                if !keep_inf {
                    g.mean += x / g.count - g.mean / g.count;
                }
            }
            AggOp::Max => {
                if g.value < x || g.value.is_nan() {
                    g.value = x;
                }
            }
            AggOp::Min => {
                if g.value > x || g.value.is_nan() {
                    g.value = x;
                }
            }
            AggOp::Count => g.count += 1.0,
        }
    }
    groups
        .into_iter()
        .map(|g| Sample {
            value: match op {
                AggOp::Avg => g.mean,
                AggOp::Count => g.count,
                _ => g.value,
            },
            labels: g.labels,
        })
        .collect()
}
