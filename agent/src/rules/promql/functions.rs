//! The range functions over one series' samples `(ms, value)` in `(start, end]`, and the
//! element-wise math functions. Each follows Prometheus 2.x's arithmetic step by step (the
//! same operations in the same order), so results agree to the last bit.

use super::check::{MathFn, RangeFn};

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

pub(super) fn apply(func: RangeFn, samples: &[(i64, f64)], span: Span, arg: f64) -> Option<f64> {
    match func {
        RangeFn::Rate => extrapolated(samples, span, true, true),
        RangeFn::Increase => extrapolated(samples, span, true, false),
        RangeFn::Delta => extrapolated(samples, span, false, false),
        RangeFn::Irate => irate(samples),
        RangeFn::Deriv => {
            let (t0, _) = samples.first()?;
            (samples.len() >= 2).then(|| regression(samples, *t0).0)
        }
        RangeFn::PredictLinear => {
            if samples.len() < 2 {
                return None;
            }
            let (slope, intercept) = regression(samples, span.eval_ms);
            Some(slope * arg + intercept)
        }
        RangeFn::AvgOverTime => (!samples.is_empty()).then(|| mean(samples)),
        RangeFn::MinOverTime => extreme(samples, |v, best| v < best),
        RangeFn::MaxOverTime => extreme(samples, |v, best| v > best),
    }
}

/// rate / increase / delta: the change over the samples (counter resets added back when
/// `counter`), extrapolated towards the range's boundaries: fully when the first/last sample
/// is within 1.1 average intervals of its boundary, by half an interval otherwise, and for a
/// counter never below zero.
fn extrapolated(
    samples: &[(i64, f64)],
    span: Span,
    counter: bool,
    per_second: bool,
) -> Option<f64> {
    let (&(t_first, v_first), &(t_last, v_last)) = (samples.first()?, samples.last()?);
    if samples.len() < 2 {
        return None;
    }
    let mut change = v_last - v_first;
    if counter {
        let mut prev = v_first;
        for &(_, v) in samples.iter().skip(1) {
            if v < prev {
                change += prev;
            }
            prev = v;
        }
    }
    let mut to_start = (t_first - span.start_ms) as f64 / 1000.0;
    let to_end = (span.end_ms - t_last) as f64 / 1000.0;
    let sampled = (t_last - t_first) as f64 / 1000.0;
    let average = sampled / (samples.len() - 1) as f64;
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

/// The per-second rate between the last two samples (a drop is a counter reset).
fn irate(samples: &[(i64, f64)]) -> Option<f64> {
    let [.., (t_prev, v_prev), (t_last, v_last)] = samples else {
        return None;
    };
    let change = if v_last < v_prev {
        *v_last
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
fn mean(samples: &[(i64, f64)]) -> f64 {
    let (mut mean, mut count, mut c) = (0.0f64, 0.0f64, 0.0f64);
    for &(_, v) in samples {
        count += 1.0;
        if mean.is_infinite() {
            if v.is_infinite() && (mean > 0.0) == (v > 0.0) {
                continue;
            }
            if !v.is_infinite() && !v.is_nan() {
                continue;
            }
        }
        (mean, c) = compensated(v / count - mean / count, mean, c);
    }
    if mean.is_infinite() {
        mean
    } else {
        mean + c
    }
}

/// The min or max, a NaN replaced by any later value.
fn extreme(samples: &[(i64, f64)], better: impl Fn(f64, f64) -> bool) -> Option<f64> {
    let mut best = samples.first()?.1;
    for &(_, v) in samples {
        if better(v, best) || best.is_nan() {
            best = v;
        }
    }
    Some(best)
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
