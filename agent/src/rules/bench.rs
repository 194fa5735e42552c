//! The engine's own cost, for `cargo xtask bench alerts` (`insite-agent alerts bench`): a
//! synthetic exposition of N series changing every tick, and M rules of the shapes alert
//! rules take (rates, quantiles over histogram rates, averages over time, aggregations,
//! vector comparisons), evaluated tick after tick by the real engine.

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use super::{engine::Engine, files::RuleSet, tsdb::Bounds};

#[derive(Debug, Serialize)]
pub struct Report {
    pub rules: usize,
    pub series: usize,
    pub ticks: usize,
    pub window_series: usize,
    pub window_bytes: usize,
    /// Per engine tick (ingest and every rule), in ms.
    pub tick_ms_p50: f64,
    pub tick_ms_p99: f64,
    pub tick_ms_mean: f64,
    /// CPU time of the process over the ticks, as a share of one CPU at a 250 ms tick.
    pub cpu_share_at_250ms: f64,
    pub alerts_firing: usize,
}

const SERVICES: usize = 100;
const LE: [&str; 12] = [
    "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "+Inf",
];

/// The exposition at tick `t`: `series` series in four metrics.
fn exposition(series: usize, t: u64) -> String {
    let mut s = String::with_capacity(series * 64);
    let hist = (series / 5) / LE.len() * LE.len();
    let counters = series / 2;
    let gauges = series - hist - counters;
    s.push_str("# TYPE bench_requests counter\n");
    for i in 0..counters {
        let _ = writeln!(
            s,
            "bench_requests_total{{service=\"s{}\",instance=\"i{i}\"}} {}",
            i % SERVICES,
            t * (1 + i as u64 % 7)
        );
    }
    s.push_str("# TYPE bench_latency_seconds histogram\n");
    for g in 0..hist / LE.len() {
        for (k, le) in LE.iter().enumerate() {
            let _ = writeln!(
                s,
                "bench_latency_seconds_bucket{{service=\"s{}\",shard=\"{g}\",le=\"{le}\"}} {}",
                g % SERVICES,
                t * (k as u64 + 1)
            );
        }
    }
    s.push_str("# TYPE bench_queue gauge\n");
    for i in 0..gauges {
        let _ = writeln!(
            s,
            "bench_queue{{service=\"s{}\",instance=\"q{i}\"}} {}",
            i % SERVICES,
            (t + i as u64) % 50
        );
    }
    s.push_str("# EOF\n");
    s
}

/// `rules` rules cycling over five shapes and the services.
fn rules_yaml(rules: usize) -> String {
    let mut y = String::from("groups:\n  - name: bench\n    rules:\n");
    for r in 0..rules {
        // Each shape over every service in turn; a second pass over a service (past 500
        // rules) is its critical twin: the same subexpression with another threshold, as
        // warning/critical pairs are written.
        let svc = (r / 5) % SERVICES;
        let twin = if (r / 5) / SERVICES % 2 == 1 { 2 } else { 1 };
        let expr = match r % 5 {
            0 => format!("sum by (service) (rate(bench_requests_total{{service=\"s{svc}\"}}[1m])) > {}e9", twin),
            1 => format!("histogram_quantile(0.99, sum by (le) (rate(bench_latency_seconds_bucket{{service=\"s{svc}\"}}[30s]))) > {}", 10 * twin),
            2 => format!("avg_over_time(bench_queue{{service=\"s{svc}\"}}[5m]) > {}", 1000 * twin),
            3 => format!("max by (service) (bench_queue{{service=~\"s{svc}|s{}\"}}) > 48", (svc + 1) % SERVICES) + if twin == 2 { " + 0" } else { "" },
            _ => format!("rate(bench_requests_total{{service=\"s{svc}\"}}[10s]) > {} * rate(bench_requests_total{{service=\"s{svc}\"}}[5m])", 100 * twin),
        };
        let _ = write!(y, "      - alert: Bench{r}\n        expr: '{expr}'\n");
    }
    y
}

pub fn run(rules: usize, series: usize, ticks: usize) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("insite-alerts-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("bench.yml");
    std::fs::write(&file, rules_yaml(rules))?;
    let set = RuleSet::load(&[file.display().to_string()]);
    let _ = std::fs::remove_dir_all(&dir);
    let set = set?;
    let step = Duration::from_millis(250);
    let mut engine = Engine::new(
        Bounds {
            max_series: series + 1000,
            step,
            fine_span: step * 480,
            coarse_step: Duration::from_secs(10),
            coarse_span: Duration::from_secs(3600),
        },
        Duration::from_secs(60),
    );
    engine.load(set);
    // Texts made before the clock starts: the bench times the engine, not the generator.
    let texts: Vec<String> = (0..ticks as u64).map(|t| exposition(series, t)).collect();
    let mut ms = Vec::with_capacity(ticks);
    let cpu0 = cpu_time();
    let mut firing = 0;
    for (t, text) in texts.iter().enumerate() {
        let out = engine.tick(1_700_000_000_000 + t as i64 * 250, text);
        ms.push(out.elapsed.as_secs_f64() * 1e3);
        firing = engine.alerts().count();
    }
    let cpu = cpu_time() - cpu0;
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let q = |p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let st = engine.tsdb().stats();
    Ok(Report {
        rules,
        series,
        ticks,
        window_series: st.series,
        window_bytes: st.bytes,
        tick_ms_p50: q(0.5),
        tick_ms_p99: q(0.99),
        tick_ms_mean: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        cpu_share_at_250ms: cpu.as_secs_f64() / (ticks as f64 * 0.25),
        alerts_firing: firing,
    })
}

fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
