//! Cross-check against the real Prometheus engine: the same samples go into our window (as
//! exposition text, one scrape per step) and into a `promtool test rules` file (as
//! `input_series`, `stale` where a series is absent); each expression's result from our
//! engine becomes the file's expected samples, and promtool (Prometheus 2.42) must agree
//! exactly (it compares floats bit for bit).
//!
//! Evaluation times sit between samples: Prometheus 2.x's ranges are closed on the left and
//! ours are left-open (as Prometheus 3), so a sample exactly at `t - range` would differ by
//! design (that boundary has its own unit test). Aggregated values are chosen so sums are
//! exact in any order: Prometheus' head block returns series in an order that varies from run
//! to run.
use std::{fmt::Write as _, process::Command, time::Duration};

use super::{Expr, Value};
use crate::rules::tsdb::{Bounds, Tsdb};

struct Scenario {
    name: &'static str,
    bounds: Bounds,
    interval_ms: i64,
    series: Vec<(String, Vec<Option<f64>>)>,
    exprs: Vec<&'static str>,
    eval_ms: Vec<i64>,
}

/// A number as both the exposition and promtool's series notation read it back exactly.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v:?}")
    }
}

/// A YAML float (exact: the shortest representation that reads back to the same bits).
fn yaml_num(v: f64) -> String {
    if v.is_nan() {
        ".nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+.inf" } else { "-.inf" }.into()
    } else {
        format!("{v:e}")
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn duration(ms: i64) -> String {
    format!("{ms}ms")
}

/// Runs the scenario through our engine and writes the promtool test file.
fn render(sc: &Scenario) -> String {
    let mut needs = super::Needs::default();
    let exprs: Vec<Expr> = sc
        .exprs
        .iter()
        .map(|src| {
            let e = Expr::compile_with(src, &sc.bounds)
                .unwrap_or_else(|e| panic!("{}: {src}: {e}", sc.name));
            needs.merge(&e.needs());
            e
        })
        .collect();
    let mut db = Tsdb::new(sc.bounds.clone());
    db.set_needs(&needs);
    let points = sc.series.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let mut results: Vec<(usize, i64, Value)> = Vec::new();
    for i in 0..points {
        let at = i as i64 * sc.interval_ms;
        let mut text = String::new();
        for (labels, values) in &sc.series {
            if let Some(Some(v)) = values.get(i) {
                writeln!(text, "{labels} {}", num(*v)).unwrap();
            }
        }
        text.push_str("# EOF\n");
        let got = db.ingest(at, &text);
        assert_eq!(got.malformed + got.refused, 0, "{}: {text}", sc.name);
        // Evaluate what falls before the next scrape, as the agent would.
        for &t in sc
            .eval_ms
            .iter()
            .filter(|&&t| t >= at && t < at + sc.interval_ms)
        {
            for (k, e) in exprs.iter().enumerate() {
                results.push((k, t, e.eval(&db, t)));
            }
        }
    }
    let interval = duration(sc.interval_ms);
    let mut y = format!("evaluation_interval: {interval}\ntests:\n  - interval: {interval}\n");
    y.push_str("    input_series:\n");
    for (labels, values) in &sc.series {
        let vals: Vec<String> = values
            .iter()
            .map(|v| v.map_or("stale".into(), num))
            .collect();
        writeln!(y, "      - series: {}", quote(labels)).unwrap();
        writeln!(y, "        values: {}", quote(&vals.join(" "))).unwrap();
    }
    y.push_str("    promql_expr_test:\n");
    for (k, t, value) in &results {
        writeln!(y, "      - expr: {}", quote(sc.exprs[*k])).unwrap();
        writeln!(y, "        eval_time: {}", duration(*t)).unwrap();
        y.push_str("        exp_samples:\n");
        let samples = match value {
            Value::Scalar(v) => vec![("{}".to_string(), *v)],
            Value::Vector(v) => v.iter().map(|s| (s.labels.to_string(), s.value)).collect(),
        };
        for (labels, v) in samples {
            writeln!(y, "          - labels: {}", quote(&labels)).unwrap();
            writeln!(y, "            value: {}", yaml_num(v)).unwrap();
        }
    }
    y
}

fn promtool(files: &[std::path::PathBuf]) {
    let out = Command::new("promtool")
        .arg("test")
        .arg("rules")
        .args(files)
        .output()
        .expect("promtool (Prometheus 2.42) must be installed: the setup installs it");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool disagrees:\n{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// A deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Counters (one with resets, one starting late, one that goes away), dyadic gauges (sums
/// exact in any order), a gauge with NaN and infinities, histogram buckets of two jobs.
fn series(points: usize) -> Vec<(String, Vec<Option<f64>>)> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    let mut c = 5.0;
    let counter: Vec<Option<f64>> = (0..points)
        .map(|i| {
            // Two resets, the second to a value above zero.
            c = if i == points * 5 / 8 {
                1.0
            } else if i == points * 7 / 8 {
                c / 3.0 + 0.25
            } else {
                c + rng.below(5) as f64
            };
            Some(c)
        })
        .collect();
    out.push(("c_total{job=\"a\",inst=\"1\"}".to_string(), counter));
    let late: Vec<Option<f64>> = (0..points)
        .map(|i| (i >= points * 3 / 10).then(|| 1000.0 + (i * i % 17) as f64 + i as f64))
        .collect();
    out.push(("c_total{job=\"a\",inst=\"2\"}".to_string(), late));
    let gone: Vec<Option<f64>> = (0..points)
        .map(|i| (i < points * 8 / 10).then_some(0.3 + 0.25 * i as f64))
        .collect();
    out.push(("c_total{job=\"b\",inst=\"1\"}".to_string(), gone));
    for (labels, f) in [
        ("g{job=\"a\",inst=\"1\"}", 1u64),
        ("g{job=\"a\",inst=\"2\"}", 3),
        ("g{job=\"b\",inst=\"1\"}", 7),
    ] {
        let vals = (0..points)
            .map(|i| Some(((i as u64 * f + rng.below(9)) % 32) as f64 / 16.0))
            .collect();
        out.push((labels.to_string(), vals));
    }
    let odd: Vec<Option<f64>> = (0..points)
        .map(|i| {
            Some(match i % 23 {
                3 => f64::NAN,
                11 => f64::INFINITY,
                17 => f64::NEG_INFINITY,
                k => k as f64 * 0.37,
            })
        })
        .collect();
    out.push(("gn{job=\"a\"}".to_string(), odd));
    // Label values with escapes travel both ways.
    let esc: Vec<Option<f64>> = (0..points).map(|i| Some(i as f64 / 4.0)).collect();
    out.push((r#"m{path="C:\\x \"q\"",job="a"}"#.to_string(), esc));
    for job in ["a", "b"] {
        let mut cum = [0.0f64; 4];
        let mut buckets: Vec<Vec<Option<f64>>> = vec![Vec::new(); 4];
        for _ in 0..points {
            let mut add = 0.0;
            for (k, b) in cum.iter_mut().enumerate() {
                add += rng.below(3 + k as u64) as f64;
                *b += add;
                buckets[k].push(Some(*b));
            }
        }
        for (le, vals) in ["0.1", "0.5", "1", "+Inf"].iter().zip(buckets) {
            out.push((format!("h_bucket{{job=\"{job}\",le=\"{le}\"}}"), vals));
        }
    }
    out
}

const EXPRS: &[&str] = &[
    // selectors and matchers
    "g",
    "c_total{job=\"a\"}",
    "g{job=~\"a|b\", inst!=\"2\"}",
    "g{job!~\"b\"}",
    "g{job=~\"\"}",
    "m{path=\"C:\\\\x \\\"q\\\"\"}",
    "c_total offset 10s",
    // range functions
    "rate(c_total[10s])",
    "rate(c_total[1m])",
    "rate(c_total{job=\"a\"}[2s])",
    "irate(c_total[5s])",
    "increase(c_total[30s])",
    "increase(c_total[1s])",
    "delta(g[20s])",
    "delta(c_total[7s])",
    "deriv(g[30s])",
    "deriv(c_total[1m])",
    "predict_linear(g[30s], 60)",
    "predict_linear(c_total[20s], 3600)",
    "avg_over_time(g[15s])",
    "avg_over_time(c_total[10s])",
    "max_over_time(g[15s])",
    "min_over_time(g[15s])",
    "max_over_time(gn[10s])",
    "min_over_time(gn[10s])",
    "rate(c_total[10s] offset 20s)",
    // histogram_quantile
    "histogram_quantile(0.9, sum by (le, job) (rate(h_bucket[30s])))",
    "histogram_quantile(0.5, rate(h_bucket[10s]))",
    "histogram_quantile(0.99, h_bucket)",
    "histogram_quantile(0.01, sum by (le) (h_bucket{job=\"a\"}))",
    // aggregations
    "sum(g)",
    "sum by (job) (g)",
    "sum by (job) (rate(c_total[30s]))",
    "avg(g{job=\"a\"})",
    "avg by (job) (g)",
    "avg without (inst) (g)",
    "min by (job) (g)",
    "max(g)",
    "max by (job) (rate(c_total[10s]))",
    "count(g)",
    "count by (job) (c_total)",
    "sum without (job, inst) (g)",
    // arithmetic and comparisons
    "g * 2",
    "2 - g",
    "g / 3",
    "g % 0.375",
    "(g + 1) ^ 2",
    "-g",
    "1 + 2 * 3 - 4 / 8",
    "2 ^ 10 % 1000",
    "g > 1",
    "0.75 < g",
    "g >= bool 1",
    "1 <= bool g",
    "g == bool 1",
    "g != 0.5",
    "5 > bool 3",
    "g + on(job, inst) rate(c_total[10s])",
    "g{inst=\"1\"} - ignoring(inst) g{inst=\"2\"}",
    "g / on(job, inst) g",
    "g > on(job, inst) rate(c_total[5s])",
    "g{job=\"a\"} < bool ignoring(job) g{job=\"b\"}",
    "rate(c_total[10s]) > 1",
    "g == g",
    // set operators
    "g and on(job) rate(c_total[10s]) > 2",
    "g and c_total",
    "g or c_total{job=\"b\"}",
    "rate(c_total[5s]) or on(job) g",
    "g unless on(job, inst) c_total",
    "g unless ignoring(inst) g{job=\"b\"}",
    // the cheap extras
    "abs(g - 1)",
    "clamp_min(g, 0.5)",
    "clamp_max(g, 1.25)",
    "absent(nonexistent{job=\"x\", inst=~\"y\"})",
    "absent(g)",
    "vector(1) + sum(g)",
    "scalar(sum(g)) * g",
    "scalar(g{job=\"b\"})",
    "time() - 60",
];

#[test]
fn agrees_with_promtool() {
    let fine = Scenario {
        name: "fine",
        bounds: Bounds::default(),
        interval_ms: 250,
        series: series(400),
        exprs: EXPRS.to_vec(),
        eval_ms: vec![30_125, 45_200, 60_125, 80_010, 99_875],
    };
    // Ranges beyond a 20 s fine span read the coarse ring (every 5 s): the same data as a
    // Prometheus scraping every 5 s.
    let coarse = Scenario {
        name: "coarse",
        bounds: Bounds {
            max_series: 1000,
            step: Duration::from_secs(1),
            fine_span: Duration::from_secs(20),
            coarse_step: Duration::from_secs(5),
            coarse_span: Duration::from_secs(600),
        },
        interval_ms: 5000,
        series: series(120),
        exprs: vec![
            "rate(c_total[2m])",
            "increase(c_total[1m])",
            "irate(c_total[30s])",
            "delta(g[90s])",
            "avg_over_time(g[90s])",
            "deriv(g[2m])",
            "predict_linear(c_total[5m], 600)",
            "max_over_time(g[5m])",
            "min_over_time(gn[5m])",
            "rate(c_total[1m] offset 30s)",
            "g offset 1m",
            "histogram_quantile(0.9, rate(h_bucket[1m]))",
            "sum by (job) (increase(c_total[3m]))",
        ],
        eval_ms: vec![200_500, 400_500, 597_000],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for sc in [fine, coarse] {
        let yaml = render(&sc);
        if let Ok(dump) = std::env::var("CROSSCHECK_DUMP") {
            std::fs::write(format!("{dump}/{}.yml", sc.name), &yaml).unwrap();
        }
        let path = dir.path().join(format!("{}.yml", sc.name));
        std::fs::write(&path, yaml).unwrap();
        files.push(path);
    }
    promtool(&files);
}
