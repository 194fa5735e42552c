//! A release-mode micro benchmark of the window and the evaluator at the agent's scale:
//! `cargo test --release -p insite-agent --lib rules::promql::bench -- --ignored --nocapture`.
use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use super::{EvalCache, Expr, Needs, Value};
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

/// 1000 alert rules of the kinds the agent ships: 600 per-series rates, 250 gauges, 100
/// aggregated rates (50 warning/critical pairs), 50 histogram quantiles (one per syscall, and
/// 10 quantiles over all syscalls). Only the pairs and the quantiles share subexpressions.
pub(crate) fn rules() -> Vec<String> {
    let mut r = Vec::new();
    for i in 0..600 {
        r.push(format!(
            "rate(insite_c{}_total{{a=\"a{}\"}}[1m]) > 5",
            i % 50,
            i / 50
        ));
    }
    for i in 0..250 {
        r.push(format!(
            "avg_over_time(insite_g{}{{a=\"a{}\"}}[30s]) > 8 or insite_g{}{{a=\"a{}\"}} > 9",
            i % 44,
            i / 44,
            (i + 1) % 44,
            i / 44 + 50
        ));
    }
    for i in 0..100 {
        r.push(format!(
            "sum by (kind) (rate(insite_c{}_total[30s])) > {}",
            i % 50,
            if i < 50 { 1000 } else { 5000 }
        ));
    }
    for i in 0..40 {
        r.push(format!(
            "histogram_quantile(0.99, sum by (le, syscall) \
             (rate(insite_syscall_latency_seconds_bucket{{syscall=\"sys{i}\"}}[30s]))) > 0.1"
        ));
    }
    for q in [0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0] {
        r.push(format!(
            "histogram_quantile({q}, sum by (le, syscall) \
             (rate(insite_syscall_latency_seconds_bucket[30s]))) > 0.1"
        ));
    }
    r
}

fn rules_src(i: usize) -> String {
    rules().swap_remove(i)
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
    let start = Instant::now();
    let mut cache = EvalCache::default();
    for round in 0..rounds {
        // A new instant each round, as each tick is: the cache starts empty every time.
        for r in &rules {
            std::hint::black_box(r.eval_cached(&db, at - i64::from(round % 2), &mut cache));
        }
    }
    println!(
        "eval with a shared EvalCache: {:?} per tick ({} hits per tick)",
        start.elapsed() / rounds,
        cache.hits() / u64::from(rounds)
    );
    // One aggregated rule again and again: its 100 series (12k samples) stay in cache.
    let hot = &rules[850];
    let start = Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(hot.eval(&db, at));
    }
    println!("hot {}: {:?}", rules_src(850), start.elapsed() / 1000);
    for (kind, range) in [
        ("rate", 0..600),
        ("gauge", 600..850),
        ("sum by", 850..950),
        ("histogram_quantile", 950..1000),
    ] {
        let start = Instant::now();
        for r in &rules[range.clone()] {
            std::hint::black_box(r.eval(&db, at));
        }
        println!("  {kind}: {:?} for {}", start.elapsed(), range.len());
    }
}
