//! The range functions over one series' samples `(ms, value)` in `(start, end]`, and the
//! element-wise math functions. Each follows Prometheus 2.x's arithmetic step by step (the
//! same operations in the same order), so results agree to the last bit.

use super::check::{MathFn, RangeFn};
use crate::rules::tsdb::Run;

/// The range a function was evaluated over (after `offset`), and the evaluation time.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub start_ms: i64,
    pub end_ms: i64,
    pub range_ms: i64,
    pub eval_ms: i64,
}

/// A duration in seconds as Go's `Duration.Seconds` computes it (whole seconds plus the
/// fraction), for bit-equal results.
fn seconds(ms: i64) -> f64 {
    (ms / 1000) as f64 + ((ms % 1000) * 1_000_000) as f64 / 1e9
}

/// Applies a range function to one series' values in the range; `ts` gives a tick's timestamp,
/// `buf` is scratch space for the functions that need every (time, value) pair.
pub(super) fn apply(
    func: RangeFn,
    run: &Run,
    ts: impl Fn(u64) -> i64,
    span: Span,
    arg: f64,
    buf: &mut Vec<(i64, f64)>,
) -> Option<f64> {
    match func {
        RangeFn::Rate => extrapolated(run, ts, span, true, true),
        RangeFn::Increase => extrapolated(run, ts, span, true, false),
        RangeFn::Delta => extrapolated(run, ts, span, false, false),
        RangeFn::Irate => {
            let mut newest = run.rev();
            let (last, prev) = (newest.next()?, newest.next()?);
            irate((ts(prev.0), prev.1), (ts(last.0), last.1))
        }
        RangeFn::Deriv | RangeFn::PredictLinear => {
            buf.clear();
            run.for_each(|tick, v| buf.push((ts(tick), v)));
            let (t0, _) = buf.first()?;
            if buf.len() < 2 {
                return None;
            }
            Some(if func == RangeFn::Deriv {
                regression(buf, *t0).0
            } else {
                let (slope, intercept) = regression(buf, span.eval_ms);
                slope * arg + intercept
            })
        }
        RangeFn::AvgOverTime => mean(run),
        RangeFn::MinOverTime => extreme(run, |v, best| v < best),
        RangeFn::MaxOverTime => extreme(run, |v, best| v > best),
    }
}

/// rate / increase / delta: the change over the samples (counter resets added back when
/// `counter`), extrapolated towards the range's boundaries: fully when the first/last sample
/// is within 1.1 average intervals of its boundary, by half an interval otherwise, and for a
/// counter never below zero. In O(1) when the series had a sample every tick of the range
/// (and, for a counter, no reset): then the change is exactly `last - first`, as Prometheus
/// computes it. Otherwise one pass over the values. The timestamps of the first and last
/// sample only.
fn extrapolated(
    run: &Run,
    ts: impl Fn(u64) -> i64,
    span: Span,
    counter: bool,
    per_second: bool,
) -> Option<f64> {
    let (n, first, last, resets, lost) = match run.ends(counter) {
        Some(e) => (e.count, e.first, e.last, 0, 0.0),
        None => scan(run),
    };
    if n < 2 {
        return None;
    }
    let (v_first, v_last) = (first.1, last.1);
    let mut change = v_last - v_first;
    if counter && resets == 1 {
        change += lost;
    } else if counter && resets > 1 {
        // Added one by one onto the change, in order, for the same rounding as Prometheus.
        let mut prev: Option<f64> = None;
        run.for_each(|_, v| {
            if prev.is_some_and(|p| v < p) {
                change += prev.unwrap_or(0.0);
            }
            prev = Some(v);
        });
    }
    let (t_first, t_last) = (ts(first.0), ts(last.0));
    let mut to_start = (t_first - span.start_ms) as f64 / 1000.0;
    let to_end = (span.end_ms - t_last) as f64 / 1000.0;
    let sampled = (t_last - t_first) as f64 / 1000.0;
    let average = sampled / (n - 1) as f64;
    if counter && change > 0.0 && v_first >= 0.0 {
        // Where the counter would have been zero, if that is nearer than the range's start.
        let to_zero = sampled * (v_first / change);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    let threshold = average * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        average / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        average / 2.0
    };
    let mut factor = interval / sampled;
    if per_second {
        factor /= seconds(span.range_ms);
    }
    Some(change * factor)
}

/// The count, first and last samples (tick, value), and the resets (drops) with the sum of
/// the values before them, in one pass.
fn scan(run: &Run) -> (usize, (u64, f64), (u64, f64), usize, f64) {
    let (mut n, mut first, mut last, mut prev) = (0usize, (0u64, 0.0), (0u64, 0.0), 0.0);
    let (mut resets, mut lost) = (0usize, 0.0);
    run.for_each(|tick, v| {
        if n == 0 {
            first = (tick, v);
        } else if v < prev {
            resets += 1;
            lost += prev;
        }
        prev = v;
        last = (tick, v);
        n += 1;
    });
    (n, first, last, resets, lost)
}

/// The per-second rate between the last two samples (a drop is a counter reset).
fn irate((t_prev, v_prev): (i64, f64), (t_last, v_last): (i64, f64)) -> Option<f64> {
    let change = if v_last < v_prev {
        v_last
    } else {
        v_last - v_prev
    };
    let dt = t_last - t_prev;
    if dt == 0 {
        return None;
    }
    Some(change / (dt as f64 / 1000.0))
}

/// Neumaier's compensated summation step: the new sum and compensation.
fn compensated(inc: f64, sum: f64, c: f64) -> (f64, f64) {
    let t = sum + inc;
    let c = if sum.abs() >= inc.abs() {
        c + ((sum - t) + inc)
    } else {
        c + ((inc - t) + sum)
    };
    (t, c)
}

/// Least-squares slope and the intercept at `intercept_ms` (x in seconds from it).
fn regression(samples: &[(i64, f64)], intercept_ms: i64) -> (f64, f64) {
    let (mut n, mut sx, mut cx, mut sy, mut cy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let (mut sxy, mut cxy, mut sx2, mut cx2) = (0.0, 0.0, 0.0, 0.0);
    let first = samples.first().map_or(0.0, |s| s.1);
    let mut constant = true;
    for &(t, v) in samples {
        if constant && v != first {
            constant = false;
        }
        n += 1.0;
        let x = (t - intercept_ms) as f64 / 1e3;
        (sx, cx) = compensated(x, sx, cx);
        (sy, cy) = compensated(v, sy, cy);
        (sxy, cxy) = compensated(x * v, sxy, cxy);
        (sx2, cx2) = compensated(x * x, sx2, cx2);
    }
    if constant {
        if first.is_infinite() {
            return (f64::NAN, f64::NAN);
        }
        return (0.0, first);
    }
    let (sx, sy, sxy, sx2) = (sx + cx, sy + cy, sxy + cxy, sx2 + cx2);
    let cov = sxy - sx * sy / n;
    let var = sx2 - sx * sx / n;
    let slope = cov / var;
    let intercept = sy / n - slope * sx / n;
    (slope, intercept)
}

/// The running mean with compensation; infinities handled so that they are not subtracted
/// from themselves.
fn mean(run: &Run) -> Option<f64> {
    let (mut mean, mut count, mut c) = (0.0f64, 0.0f64, 0.0f64);
    run.for_each(|_, v| {
        count += 1.0;
        if mean.is_infinite()
            && ((v.is_infinite() && (mean > 0.0) == (v > 0.0)) || (!v.is_infinite() && !v.is_nan()))
        {
            return;
        }
        (mean, c) = compensated(v / count - mean / count, mean, c);
    });
    if count == 0.0 {
        return None;
    }
    Some(if mean.is_infinite() { mean } else { mean + c })
}

/// The min or max, a NaN replaced by any later value.
fn extreme(run: &Run, better: impl Fn(f64, f64) -> bool) -> Option<f64> {
    let mut best: Option<f64> = None;
    run.for_each(|_, v| match best {
        Some(b) if !better(v, b) && !b.is_nan() => {}
        _ => best = Some(v),
    });
    best
}

/// `abs`, `clamp_min`, `clamp_max` on one value (Go's `math.Max`/`Min`: NaN wins).
pub(super) fn math(func: MathFn, v: f64, arg: f64) -> f64 {
    match func {
        MathFn::Abs => v.abs(),
        MathFn::ClampMin => go_max(arg, v),
        MathFn::ClampMax => go_min(arg, v),
    }
}

fn go_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn go_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}
