//! Hand-computed expectations, one concern a test.
use std::time::Duration;

use super::*;
use crate::rules::tsdb::{Bounds, Tsdb};

fn bounds() -> Bounds {
    Bounds {
        max_series: 1000,
        step: Duration::from_secs(1),
        fine_span: Duration::from_secs(60),
        coarse_step: Duration::from_secs(10),
        coarse_span: Duration::from_secs(600),
    }
}

/// A window fed one scrape a second from 0 with `series` (`None`: absent), read by `src`.
fn setup(src: &[&str], series: &[(&str, Vec<Option<f64>>)], until_ms: i64) -> (Vec<Expr>, Tsdb) {
    let exprs: Vec<Expr> = src
        .iter()
        .map(|s| Expr::compile_with(s, &bounds()).unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect();
    let mut needs = Needs::default();
    for e in &exprs {
        needs.merge(&e.needs());
    }
    let mut db = Tsdb::new(bounds());
    db.set_needs(&needs);
    let mut t = 0;
    while t <= until_ms {
        let i = (t / 1000) as usize;
        let mut text = String::new();
        for (labels, vals) in series {
            if let Some(Some(v)) = vals.get(i) {
                text.push_str(&format!("{labels} {v:?}\n"));
            }
        }
        db.ingest(t, &text);
        t += 1000;
    }
    (exprs, db)
}

/// Evaluates `src` at `at_ms` over `series`, as (labels, value) sorted by labels.
fn eval(src: &str, series: &[(&str, Vec<Option<f64>>)], at_ms: i64) -> Vec<(String, f64)> {
    let (exprs, db) = setup(&[src], series, at_ms);
    match exprs[0].eval(&db, at_ms) {
        Value::Scalar(v) => vec![("scalar".into(), v)],
        Value::Vector(v) => {
            let mut out: Vec<(String, f64)> =
                v.iter().map(|s| (s.labels.to_string(), s.value)).collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }
    }
}

fn one(src: &str, series: &[(&str, Vec<Option<f64>>)], at_ms: i64) -> f64 {
    let got = eval(src, series, at_ms);
    assert_eq!(got.len(), 1, "{src}: {got:?}");
    got[0].1
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

fn vals(v: &[f64]) -> Vec<Option<f64>> {
    v.iter().map(|&x| Some(x)).collect()
}

/// Absent until index `from`, then the values.
fn late(from: usize, v: &[f64]) -> Vec<Option<f64>> {
    let mut out = vec![None; from];
    out.extend(vals(v));
    out
}

#[test]
fn rate_and_increase_add_back_counter_resets() {
    let s = [("x_total", vals(&[0.0, 10.0, 20.0, 5.0, 15.0]))];
    // (-1 s, 4 s]: all five. Change 15, plus 20 lost at the reset = 35. The start would
    // extrapolate 1 s back, but the counter was 0 there already: no extrapolation.
    assert!(close(one("increase(x_total[5s])", &s, 4000), 35.0));
    assert!(close(one("rate(x_total[5s])", &s, 4000), 7.0));
    // delta does not know counters: 15, extrapolated by the 1 s to the start: 15 * 5 / 4.
    assert!(close(one("delta(x_total[5s])", &s, 4000), 18.75));
    // Two resets: 3 - 0 + 20 + 15.
    let s = [("x_total", vals(&[0.0, 10.0, 20.0, 5.0, 15.0, 3.0]))];
    assert!(close(one("increase(x_total[6s])", &s, 5000), 38.0));
}

#[test]
fn extrapolation_stops_half_an_interval_from_far_boundaries() {
    let s = [("g", late(10, &[1.0, 2.0, 3.0, 4.0, 5.0]))];
    // (4 s, 14 s]: samples at 10..=14; the start is 6 s away (> 1.1 intervals): half an
    // interval only. 4 * 4.5 / 4.
    assert!(close(one("delta(g[10s])", &s, 14_000), 4.5));
    // At 16.5 s: both ends far: 4 * 5 / 4; and the series is stale for instant selectors.
    assert!(close(one("delta(g[10s])", &s, 16_500), 5.0));
    assert!(eval("g", &s, 16_500).is_empty());
    // (8.5 s, 14.5 s] holds 10..=14: 1.5 s to the start (> 1.1 intervals) adds half an
    // interval, the 0.5 s to the end is extrapolated in full: 4 * 5 / 4.
    assert!(close(one("delta(g[6s])", &s, 14_500), 5.0));
}

#[test]
fn increase_does_not_extrapolate_a_counter_below_zero() {
    let s = [("c", late(10, &[0.2, 1.2, 2.2, 3.2, 4.2]))];
    // Far start (half an interval, 0.5 s) but the counter hits zero 0.2 s before the first
    // sample: 4 * 4.2 / 4.
    assert!(close(one("increase(c[10s])", &s, 14_000), 4.2));
}

#[test]
fn rate_needs_two_samples() {
    let s = [("c", late(4, &[1.0]))];
    assert!(eval("rate(c[10s])", &s, 4000).is_empty());
    assert!(eval("irate(c[10s])", &s, 4000).is_empty());
    assert!(eval("deriv(c[10s])", &s, 4000).is_empty());
}

#[test]
fn irate_uses_the_last_two_samples() {
    let s = [("c", vals(&[1.0, 5.0, 3.0]))];
    assert!(close(one("irate(c[3s])", &s, 1000), 4.0));
    // A drop is a reset: the new value is the increase.
    assert!(close(one("irate(c[3s])", &s, 2000), 3.0));
}

#[test]
fn deriv_and_predict_linear_fit_least_squares() {
    let s = [("g", vals(&[0.0, 2.0, 4.0, 6.0])), ("k", vals(&[3.0; 4]))];
    assert!(close(one("deriv(g[4s])", &s, 3000), 2.0));
    // Intercept at the evaluation time (6 at 3 s) plus 10 s of slope.
    assert!(close(one("predict_linear(g[4s], 10)", &s, 3000), 26.0));
    // Evaluated half a second later, the line is extended to there: 6 + 2 * 10.5.
    assert!(close(one("predict_linear(g[4s], 10)", &s, 3500), 27.0));
    assert_eq!(one("deriv(k[4s])", &s, 3000), 0.0);
    assert_eq!(one("predict_linear(k[4s], 100)", &s, 3000), 3.0);
    // Noisy points: slope of (0,1) (1,3) (2,2) is 0.5.
    let s = [("n", vals(&[1.0, 3.0, 2.0]))];
    assert!(close(one("deriv(n[3s])", &s, 2000), 0.5));
}

#[test]
fn over_time_aggregations() {
    let s = [("g", vals(&[f64::NAN, 3.0, 1.0, 2.0]))];
    // A NaN is replaced by any later value in min/max; it poisons the average.
    assert_eq!(one("max_over_time(g[4s])", &s, 3000), 3.0);
    assert_eq!(one("min_over_time(g[4s])", &s, 3000), 1.0);
    assert!(one("avg_over_time(g[4s])", &s, 3000).is_nan());
    assert_eq!(one("avg_over_time(g[3s])", &s, 3000), 2.0);
    let s = [("i", vals(&[1.0, f64::INFINITY, 5.0]))];
    assert_eq!(one("avg_over_time(i[3s])", &s, 2000), f64::INFINITY);
}

#[test]
fn ranges_are_left_open() {
    let s = [("g", vals(&(0..11).map(f64::from).collect::<Vec<_>>()))];
    // (5 s, 10 s]: 6..=10, not the sample at exactly 5 s.
    assert_eq!(one("avg_over_time(g[5s])", &s, 10_000), 8.0);
    assert_eq!(one("min_over_time(g[5s])", &s, 10_000), 6.0);
    assert_eq!(one("g offset 3s", &s, 10_000), 7.0);
    assert_eq!(one("max_over_time(g[2s] offset 3s)", &s, 10_000), 7.0);
}

#[test]
fn long_ranges_read_the_coarse_ring() {
    let s = [("g", vals(&(0..200).map(f64::from).collect::<Vec<_>>()))];
    // 100 s > the 60 s fine span: the coarse ring's first scrape of each 10 s, (99 s, 199 s]
    // holding 100, 110, ..., 190.
    assert_eq!(one("avg_over_time(g[100s])", &s, 199_000), 145.0);
    assert_eq!(one("min_over_time(g[100s])", &s, 199_000), 100.0);
    // The fine ring serves shorter ranges at every tick.
    assert_eq!(one("min_over_time(g[50s])", &s, 199_000), 150.0);
}

fn buckets() -> Vec<(&'static str, Vec<Option<f64>>)> {
    vec![
        ("h_bucket{job=\"a\",le=\"0.1\"}", vals(&[5.0])),
        ("h_bucket{job=\"a\",le=\"0.2\"}", vals(&[15.0])),
        ("h_bucket{job=\"a\",le=\"+Inf\"}", vals(&[20.0])),
        ("h_bucket{job=\"b\",le=\"0.1\"}", vals(&[5.0])),
        ("h_bucket{job=\"b\",le=\"0.2\"}", vals(&[15.0])),
        ("h_bucket{job=\"b\",le=\"+Inf\"}", vals(&[20.0])),
        ("h_bucket{job=\"c\",le=\"0.1\"}", vals(&[5.0])),
        ("h_bucket{job=\"c\",le=\"0.2\"}", vals(&[15.0])),
    ]
}

#[test]
fn histogram_quantile_groups_by_the_other_labels() {
    let got = eval("histogram_quantile(0.5, h_bucket)", &buckets(), 0);
    // Rank 10 of 20 is half-way through (0.1, 0.2]; job c has no +Inf bucket: NaN.
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].0, "{job=\"a\"}");
    assert!(close(got[0].1, 0.15) && close(got[1].1, 0.15) && got[2].1.is_nan());
    // Summed by le (job c's buckets too): 15, 45, 40 -> made monotonic 15, 45, 45; rank 22.5.
    let v = one(
        "histogram_quantile(0.5, sum by (le) (h_bucket))",
        &buckets(),
        0,
    );
    assert!(close(v, 0.1 + 0.1 * (7.5 / 30.0)), "{v}");
}

#[test]
fn aggregations_group_and_drop_the_name() {
    let s = [
        ("g{job=\"a\",inst=\"1\"}", vals(&[1.0])),
        ("g{job=\"a\",inst=\"2\"}", vals(&[4.0])),
        ("g{job=\"b\",inst=\"1\"}", vals(&[f64::NAN])),
    ];
    assert_eq!(
        eval("sum by (job) (g)", &s, 0)[0],
        ("{job=\"a\"}".to_string(), 5.0)
    );
    assert_eq!(
        eval("avg without (inst) (g)", &s, 0)[0],
        ("{job=\"a\"}".to_string(), 2.5)
    );
    assert_eq!(one("count(g)", &s, 0), 3.0);
    // NaN loses against any number in min/max.
    assert_eq!(one("max(g)", &s, 0), 4.0);
    assert_eq!(one("min(g)", &s, 0), 1.0);
    assert_eq!(
        eval("min by (inst) (g)", &s, 0),
        vec![
            ("{inst=\"1\"}".to_string(), 1.0),
            ("{inst=\"2\"}".to_string(), 4.0)
        ]
    );
    // `by (__name__)` keeps the name; `without` always drops it.
    assert_eq!(eval("count by (__name__) (g)", &s, 0)[0].0, "g{}");
    assert_eq!(eval("count without () (g)", &s, 0).len(), 3);
}

fn pair() -> Vec<(&'static str, Vec<Option<f64>>)> {
    vec![
        ("a{job=\"x\",inst=\"1\"}", vals(&[10.0])),
        ("a{job=\"x\",inst=\"2\"}", vals(&[20.0])),
        ("a{job=\"y\",inst=\"1\"}", vals(&[30.0])),
        ("b{job=\"x\",inst=\"1\",extra=\"e\"}", vals(&[1.0])),
        ("b{job=\"y\",inst=\"1\",extra=\"e\"}", vals(&[3.0])),
    ]
}

#[test]
fn vector_matching_on_and_ignoring() {
    assert_eq!(
        eval("a - on(job, inst) b", &pair(), 0),
        vec![
            ("{inst=\"1\", job=\"x\"}".to_string(), 9.0),
            ("{inst=\"1\", job=\"y\"}".to_string(), 27.0)
        ]
    );
    assert_eq!(
        eval("a / ignoring(extra) b", &pair(), 0),
        vec![
            ("{inst=\"1\", job=\"x\"}".to_string(), 10.0),
            ("{inst=\"1\", job=\"y\"}".to_string(), 10.0)
        ]
    );
    // Without on/ignoring, `extra` keeps them apart.
    assert!(eval("a + b", &pair(), 0).is_empty());
    // A comparison keeps the left side's labels (name included) unless `bool`.
    assert_eq!(
        eval("a > ignoring(extra) b", &pair(), 0)[0].0,
        "a{inst=\"1\", job=\"x\"}"
    );
    assert_eq!(
        eval("a < bool ignoring(extra) b", &pair(), 0),
        vec![
            ("{inst=\"1\", job=\"x\"}".to_string(), 0.0),
            ("{inst=\"1\", job=\"y\"}".to_string(), 0.0)
        ]
    );
    // Two left series match one right series (job x on `on(job)`): Prometheus fails the
    // query; that group gives nothing, the other one its result.
    assert_eq!(
        eval("a * on(job) b", &pair(), 0),
        vec![("{job=\"y\"}".to_string(), 90.0)]
    );
}

#[test]
fn set_operators() {
    let names =
        |src: &str| -> Vec<String> { eval(src, &pair(), 0).into_iter().map(|(l, _)| l).collect() };
    assert_eq!(
        names("a and on(job, inst) b"),
        ["a{inst=\"1\", job=\"x\"}", "a{inst=\"1\", job=\"y\"}"]
    );
    assert_eq!(names("a unless on(job) b"), Vec::<String>::new());
    assert_eq!(names("a unless on(inst) b"), ["a{inst=\"2\", job=\"x\"}"]);
    assert_eq!(names("a and b"), Vec::<String>::new());
    assert_eq!(
        names("b or on(job, inst) a"),
        [
            "a{inst=\"2\", job=\"x\"}",
            "b{extra=\"e\", inst=\"1\", job=\"x\"}",
            "b{extra=\"e\", inst=\"1\", job=\"y\"}",
        ]
    );
    assert_eq!(names("a or b").len(), 5);
}

#[test]
fn comparisons_filter_or_give_bool() {
    let s = [("g{i=\"1\"}", vals(&[1.0])), ("g{i=\"2\"}", vals(&[3.0]))];
    assert_eq!(eval("g > 2", &s, 0), vec![("g{i=\"2\"}".to_string(), 3.0)]);
    // Scalar on the left: still the vector's value.
    assert_eq!(eval("2 > g", &s, 0), vec![("g{i=\"1\"}".to_string(), 1.0)]);
    assert_eq!(
        eval("g >= bool 3", &s, 0),
        vec![
            ("{i=\"1\"}".to_string(), 0.0),
            ("{i=\"2\"}".to_string(), 1.0)
        ]
    );
    assert_eq!(one("1 < bool 2", &s, 0), 1.0);
    assert_eq!(one("2 == bool 3", &s, 0), 0.0);
    // Arithmetic drops the name; so does unary minus.
    assert_eq!(eval("g * 2", &s, 0)[1], ("{i=\"2\"}".to_string(), 6.0));
    assert_eq!(eval("-g", &s, 0)[0], ("{i=\"1\"}".to_string(), -1.0));
    assert_eq!(one("2 ^ 3 % 5 - -1", &s, 0), 4.0);
    assert_eq!(one("(1 + 2) * 3", &s, 0), 9.0);
}

#[test]
fn matchers_are_anchored() {
    let s = [
        ("g{p=\"abc\"}", vals(&[1.0])),
        ("g{p=\"ab\"}", vals(&[2.0])),
        ("g{q=\"x\"}", vals(&[3.0])),
    ];
    assert_eq!(one("g{p=~\"ab\"}", &s, 0), 2.0);
    assert_eq!(one("g{p=~\"a.c\"}", &s, 0), 1.0);
    assert_eq!(eval("g{p!~\"ab\"}", &s, 0).len(), 2);
    // A missing label is the empty string.
    assert_eq!(one("g{p=\"\"}", &s, 0), 3.0);
    assert_eq!(eval("g{p!=\"abc\"}", &s, 0).len(), 2);
}

#[test]
fn extras() {
    let s = [("g{i=\"1\"}", vals(&[-2.0])), ("g{i=\"2\"}", vals(&[3.0]))];
    assert_eq!(eval("abs(g)", &s, 0)[0], ("{i=\"1\"}".to_string(), 2.0));
    assert_eq!(eval("clamp_min(g, 0)", &s, 0)[0].1, 0.0);
    assert_eq!(eval("clamp_max(g, 1)", &s, 0)[1].1, 1.0);
    assert_eq!(
        eval("absent(nope{a=\"b\", c=~\"d\", e=\"f\", e!=\"g\"})", &s, 0),
        vec![("{a=\"b\"}".to_string(), 1.0)]
    );
    assert!(eval("absent(g)", &s, 0).is_empty());
    assert_eq!(eval("vector(2)", &s, 0), vec![("{}".to_string(), 2.0)]);
    assert!(one("scalar(g)", &s, 0).is_nan());
    assert_eq!(one("scalar(g{i=\"2\"})", &s, 0), 3.0);
    assert_eq!(one("time()", &s, 5000), 5.0);
}

#[test]
fn staleness_is_absence_at_the_latest_scrape() {
    let s = [("g", vec![Some(1.0), Some(2.0), None, Some(4.0)])];
    assert_eq!(one("g", &s, 1500), 2.0);
    assert!(eval("g", &s, 2000).is_empty());
    assert!(eval("g", &s, 2999).is_empty());
    assert_eq!(one("g", &s, 3000), 4.0);
    // Ranges skip the gap.
    assert!(close(one("avg_over_time(g[4s])", &s, 3000), 7.0 / 3.0));
}

#[test]
fn cache_shares_range_results_within_one_state() {
    let s = [
        ("c{a=\"1\"}", vals(&[0.0, 1.0, 2.0, 3.0])),
        ("c{a=\"2\"}", vals(&[0.0, 2.0, 4.0, 6.0])),
    ];
    let src = [
        "rate(c[3s]) > 0.5",
        "rate(c[3s]) > 1.5",
        "sum(rate(c[3s]))",
        "rate(c{a=\"1\"}[3s])",
    ];
    let (exprs, mut db) = setup(&src, &s, 3000);
    let mut cache = EvalCache::default();
    for e in &exprs {
        assert_eq!(e.eval_cached(&db, 3000, &mut cache), e.eval(&db, 3000));
    }
    assert_eq!(cache.hits(), 2);
    // Another instant or a new scrape: nothing stale is served.
    assert_eq!(
        exprs[2].eval_cached(&db, 2000, &mut cache),
        exprs[2].eval(&db, 2000)
    );
    db.ingest(4000, "c{a=\"1\"} 100\n");
    assert_eq!(
        exprs[3].eval_cached(&db, 4000, &mut cache),
        exprs[3].eval(&db, 4000)
    );
    assert_eq!(cache.hits(), 2);
}

#[test]
fn cache_shares_subexpressions_between_rules() {
    let s = [
        ("c{a=\"1\",b=\"x\"}", vals(&[0.0, 1.0, 2.0, 3.0])),
        ("c{a=\"2\",b=\"y\"}", vals(&[0.0, 2.0, 4.0, 6.0])),
        ("g{a=\"1\"}", vals(&[5.0, 4.0, 3.0, 2.0])),
    ];
    let src = [
        "sum by (a) (rate(c[3s])) > 0.5",
        "sum by (a) (rate(c[3s])) > 1.5",
        "sum by (a) (rate(c[3s])) > 0.5",
        "sum by (b) (rate(c[3s])) > 0.5",
        "max(g{a=~\"1|2\"}) > 1",
        "max(g{a=~\"1|2\"}) > bool 1",
        "-g + 1 < 0",
        "-g - 1 < 0",
    ];
    let (exprs, db) = setup(&src, &s, 3000);
    let mut cache = EvalCache::default();
    for e in &exprs {
        assert_eq!(e.eval_cached(&db, 3000, &mut cache), e.eval(&db, 3000));
    }
    // The sum by (a) in the second rule, the whole first rule repeated, the range under
    // `sum by (b)`, the max, the negation.
    assert_eq!(cache.hits(), 5);
}

#[test]
fn equality_selectors_follow_series_churn() {
    // b=1 goes away (freed after its window), b=3 arrives, b=1 comes back.
    let mut v1 = vals(&[1.0; 3]);
    v1.extend([None, None, None, None, None, Some(9.0)]);
    let s = [
        ("g{b=\"1\"}", v1),
        ("g{b=\"2\"}", vals(&[2.0; 9])),
        ("g{b=\"3\"}", late(5, &[3.0; 4])),
    ];
    assert!(eval("g{b=\"1\"}", &s, 6000).is_empty());
    assert_eq!(one("g{b=\"3\"}", &s, 6000), 3.0);
    assert_eq!(one("g{b=\"2\"}", &s, 6000), 2.0);
    assert_eq!(one("g{b=\"1\"}", &s, 8000), 9.0);
    assert_eq!(one("sum(g{b!=\"2\"})", &s, 8000), 12.0);
}

#[test]
fn needs_name_each_metric_with_its_longest_lookback() {
    let e = Expr::compile(
        "rate(a_total[1m]) > 5 and on() a_total offset 30s or histogram_quantile(0.9, \
         sum by (le) (rate(h_bucket[90s] offset 10s))) > b",
    )
    .unwrap();
    let mut want = Needs::default();
    want.add("a_total", Duration::from_secs(60));
    want.add("h_bucket", Duration::from_secs(100));
    want.add("b", Duration::ZERO);
    assert_eq!(e.needs(), want);
    let mut merged = want.clone();
    let mut other = Needs::default();
    other.add("a_total", Duration::from_secs(5));
    other.add("c", Duration::from_secs(5));
    merged.merge(&other);
    assert_eq!(merged.0.get("a_total"), Some(&Duration::from_secs(60)));
    assert_eq!(merged.0.len(), 4);
}

#[test]
fn labels_helpers() {
    let l = Labels::from_pairs([("b", "2"), ("__name__", "x"), ("a", "1")]);
    assert_eq!(l.get("a"), Some("1"));
    assert_eq!(l.get("z"), None);
    assert_eq!(l.without_name().to_string(), "{a=\"1\", b=\"2\"}");
    assert_eq!(l.to_string(), "x{a=\"1\", b=\"2\"}");
}

#[test]
fn refusals_name_the_part() {
    for (src, needle) in [
        (
            "label_replace(x, \"a\", \"b\", \"c\", \"d\")",
            "function `label_replace`",
        ),
        ("sum_over_time(x[1m])", "function `sum_over_time`"),
        ("topk(3, x)", "aggregation `topk`"),
        ("bottomk(3, x)", "aggregation `bottomk`"),
        ("quantile(0.5, x)", "aggregation `quantile`"),
        ("stddev(x)", "aggregation `stddev`"),
        ("stdvar(x)", "aggregation `stdvar`"),
        ("count_values(\"v\", x)", "aggregation `count_values`"),
        ("group(x)", "aggregation `group`"),
        (
            "x * on(a) group_left y",
            "`group_left` (many-to-one matching)",
        ),
        (
            "x * on(a) group_right y",
            "`group_right` (one-to-many matching)",
        ),
        ("x * fill(0) y", "`fill`"),
        ("max_over_time(x[5m:1m])", "subqueries are not supported"),
        ("x[5m:1m]", "subqueries are not supported"),
        ("x @ 100", "`@` modifier is not supported"),
        ("rate(x[5m] @ end())", "`@` modifier"),
        ("rate(x[2h])", "range 2h is longer than the window (1h)"),
        (
            "rate(x[50m] offset 20m)",
            "range 50m with offset 20m is longer than the window",
        ),
        ("x offset 2h", "offset 2h is longer than the window"),
        (
            "rate(x[100ms])",
            "range 100ms is shorter than the tick (250ms)",
        ),
        ("x offset -5m", "negative offset"),
        ("\"foo\"", "string literals"),
        ("x[5m]", "range selector is only allowed"),
        ("{__name__=~\"x.*\"}", "`__name__=~`"),
        ("{job=\"a\"}", "without a metric name"),
        ("x{a=\"b\" or c=\"d\"}", "`or` inside a selector"),
        ("x atan2 y", "operator `atan2`"),
        ("rate(", "does not parse"),
    ] {
        match Expr::compile(src) {
            Ok(_) => panic!("{src} compiled"),
            Err(Refused(msg)) => assert!(msg.contains(needle), "{src}: {msg}"),
        }
    }
}

/// rate / increase / delta / irate read the ends of a gapless, reset-free range in O(1): bit
/// for bit what the scan gives, over counters with resets, gaps, NaNs, series coming and
/// going, ranges across the fine ring's wrap and on the coarse ring, with offsets.
#[test]
fn o1_ends_agree_with_the_scan_bit_for_bit() {
    use super::{check::RangeFn, functions};
    let mut db = Tsdb::new(bounds());
    let mut needs = Needs::default();
    needs.add("c", Duration::from_secs(600));
    db.set_needs(&needs);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut vals = [0.0f64; 6];
    let (mut fast, mut scanned) = (0usize, 0usize);
    for tick in 0..400i64 {
        let mut text = String::new();
        for (k, v) in vals.iter_mut().enumerate() {
            // Series 0 is steady; the others reset, skip scrapes, carry NaN, or come late.
            let step = [3.0, 0.1, 1e9, 0.7, 2.5, 1.0][k];
            *v = match rnd(40) {
                0 if k > 0 => 0.0,
                1 if k > 1 => *v * 0.5,
                _ => *v + step * (1 + rnd(3)) as f64,
            };
            let gone = k > 2 && rnd(30) == 0 || k == 5 && (tick % 97) < 20;
            if !gone {
                let v = if k == 4 && rnd(50) == 0 { f64::NAN } else { *v };
                text.push_str(&format!("c{{k=\"{k}\"}} {v:?}\n"));
            }
        }
        // Jittered scrapes, as a loaded agent's.
        let at = tick * 1000 + rnd(300) as i64;
        db.ingest(at, &text);
        for (range_s, offset_s) in [(1, 0), (2, 0), (5, 0), (30, 0), (60, 0), (30, 20)] {
            for (range_s, offset_s) in [(range_s, offset_s), (range_s * 10, offset_s * 10)] {
                let end_ms = at - offset_s * 1000;
                let span = functions::Span {
                    start_ms: end_ms - range_s * 1000,
                    end_ms,
                    range_ms: range_s * 1000,
                    eval_ms: at,
                };
                let coarse = db.is_coarse((range_s + offset_s) * 1000);
                let Some(w) = db.window(span.start_ms, end_ms, coarse) else {
                    continue;
                };
                let ts = |t| db.tick_ms(&w, t);
                let mut buf = Vec::new();
                for s in db.series_with("c", None) {
                    let run = db.run(s, &w);
                    if run.ends(true).is_some() {
                        fast += 1;
                    } else {
                        scanned += 1;
                    }
                    for f in [
                        RangeFn::Rate,
                        RangeFn::Increase,
                        RangeFn::Delta,
                        RangeFn::Irate,
                    ] {
                        let got = functions::apply(f, &run, ts, span, 0.0, &mut buf);
                        let want = functions::apply(f, &run.unmarked(), ts, span, 0.0, &mut buf);
                        assert_eq!(
                            got.map(f64::to_bits),
                            want.map(f64::to_bits),
                            "{f:?} {} at {at} [{range_s}s] offset {offset_s}s",
                            s.labels()
                        );
                    }
                }
            }
        }
    }
    // Both paths were exercised, often.
    assert!(
        fast > 5000 && scanned > 5000,
        "{fast} fast, {scanned} scanned"
    );
}

/// The postings lookup satisfies one matcher; the others are still checked on each series.
#[test]
fn matchers_beside_the_lookup_still_filter() {
    let s = [
        ("g{a=\"1\",b=\"x\"}", vals(&[1.0])),
        ("g{a=\"1\",b=\"y\"}", vals(&[2.0])),
        ("g{a=\"2\",b=\"x\"}", vals(&[4.0])),
        ("g{a=\"3\",b=\"x\"}", vals(&[8.0])),
    ];
    assert_eq!(one("sum(g{a=\"1\"})", &s, 0), 3.0);
    assert_eq!(one("g{a=\"1\", b!=\"x\"}", &s, 0), 2.0);
    assert_eq!(one("sum(g{b=~\"x|z\", a=\"1\"})", &s, 0), 1.0);
    assert_eq!(one("sum(g{a=~\"1|2\"})", &s, 0), 7.0);
    assert_eq!(one("sum(g{a=~\"1|2\", b=\"x\"})", &s, 0), 5.0);
    assert_eq!(one("sum(g{a=~\"1|3\", b!~\"y\"})", &s, 0), 9.0);
}
