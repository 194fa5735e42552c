//! A release-mode micro benchmark of the window and the evaluator at the agent's scale:
//! `cargo test --release -p insite-agent --lib rules::promql::bench -- --ignored --nocapture`.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use super::{Expr, Needs, Value};
use crate::rules::tsdb::{Bounds, Tsdb};

/// An exposition of about 10k needed series (counters, gauges, a latency histogram) and 5k
/// lines of metrics no rule reads, at scrape `tick`.
pub(crate) fn exposition(tick: u64) -> String {
    let mut t = String::with_capacity(1 << 20);
    let mut cum;
    t.push_str("# HELP insite_syscall_latency_seconds Latency.\n");
    t.push_str("# TYPE insite_syscall_latency_seconds histogram\n");
    for s in 0..40 {
        cum = 0;
        for (k, le) in [
            "1e-06", "5e-06", "1e-05", "5e-05", "0.0001", "0.0005", "0.001", "0.005", "0.01",
            "0.05", "0.1", "+Inf",
        ]
        .iter()
        .enumerate()
        {
            cum += tick * (k as u64 + 1) + s;
            writeln!(
                t,
                "insite_syscall_latency_seconds_bucket{{syscall=\"sys{s}\",le=\"{le}\"}} {cum}"
            )
            .unwrap();
        }
        writeln!(
            t,
            "insite_syscall_latency_seconds_count{{syscall=\"sys{s}\"}} {cum}"
        )
        .unwrap();
        writeln!(
            t,
            "insite_syscall_latency_seconds_sum{{syscall=\"sys{s}\"}} 1.5"
        )
        .unwrap();
    }
    for m in 0..50 {
        writeln!(t, "# TYPE insite_c{m} counter").unwrap();
        for a in 0..100 {
            writeln!(
                t,
                "insite_c{m}_total{{a=\"a{a}\",kind=\"k{}\"}} {}",
                a % 7,
                tick * (a + 1)
            )
            .unwrap();
        }
    }
    for m in 0..44 {
        writeln!(t, "# TYPE insite_g{m} gauge").unwrap();
        for a in 0..100 {
            writeln!(t, "insite_g{m}{{a=\"a{a}\"}} {}.25", (tick + a) % 10).unwrap();
        }
    }
    for m in 0..50 {
        for a in 0..100 {
            writeln!(t, "insite_unread{m}_total{{a=\"a{a}\"}} {tick}").unwrap();
        }
    }
    t.push_str("# EOF\n");
    t
}

/// 1000 alert rules of the kinds the agent ships: mostly per-series rates and gauges, some
/// aggregations and histogram quantiles.
pub(crate) fn rules() -> Vec<String> {
    let mut r = Vec::new();
    for i in 0..600 {
        r.push(format!(
            "rate(insite_c{}_total{{a=\"a{}\"}}[1m]) > 5",
            i % 50,
            i % 100
        ));
    }
    for i in 0..200 {
        r.push(format!(
            "avg_over_time(insite_g{}{{a=\"a{}\"}}[30s]) > 8 or insite_g{} > 9",
            i % 44,
            i % 100,
            (i + 1) % 44
        ));
    }
    for i in 0..150 {
        r.push(format!(
            "sum by (kind) (rate(insite_c{}_total[30s])) > 1000",
            i % 50
        ));
    }
    for i in 0..50 {
        let sel = if i % 2 == 0 {
            String::new()
        } else {
            format!("{{syscall=\"sys{}\"}}", i % 40)
        };
        r.push(format!(
            "histogram_quantile(0.99, sum by (le, syscall) \
             (rate(insite_syscall_latency_seconds_bucket{sel}[30s]))) > 0.1"
        ));
    }
    r
}

#[test]
#[ignore = "a benchmark: run in release with --ignored --nocapture"]
fn bench_ingest_and_eval() {
    let rules: Vec<Expr> = rules().iter().map(|s| Expr::compile(s).unwrap()).collect();
    let mut needs = Needs::default();
    for r in &rules {
        needs.merge(&r.needs());
    }
    let mut db = Tsdb::new(Bounds::default());
    db.set_needs(&needs);
    let lines = exposition(0).lines().count();
    // Fill the fine window (2 min at 250 ms); only the ingest is timed.
    let mut ingest = Duration::ZERO;
    let ticks = 480u64;
    for tick in 0..ticks {
        let text = exposition(tick);
        let start = Instant::now();
        db.ingest(tick as i64 * 250, &text);
        ingest += start.elapsed();
    }
    let ingest = ingest / ticks as u32;
    let stats = db.stats();
    println!(
        "ingest: {lines} lines, {} series kept: {:?} per scrape, {:.0} ns/line; window {} MB, \
         {} B/series",
        stats.series,
        ingest,
        ingest.as_nanos() as f64 / lines as f64,
        stats.bytes / 1_000_000,
        stats.bytes / stats.series.max(1)
    );
    let at = (ticks as i64 - 1) * 250;
    let mut out = 0;
    let rounds: u32 = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let start = Instant::now();
    for _ in 0..rounds {
        for r in &rules {
            if let Value::Vector(v) = r.eval(&db, at) {
                out += v.len();
            }
        }
    }
    let eval = start.elapsed() / rounds;
    println!(
        "eval: {} rules over {} series: {:?} per tick ({} alerts firing)",
        rules.len(),
        stats.series,
        eval,
        out / rounds as usize
    );
    for (kind, range) in [
        ("rate", 0..600),
        ("gauge", 600..800),
        ("sum by", 800..950),
        ("histogram_quantile", 950..1000),
    ] {
        let start = Instant::now();
        for r in &rules[range.clone()] {
            std::hint::black_box(r.eval(&db, at));
        }
        println!("  {kind}: {:?} for {}", start.elapsed(), range.len());
    }
}
