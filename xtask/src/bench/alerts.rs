//! `cargo xtask bench alerts`: what the alert engine costs per tick (1k rules over 10k series,
//! the real engine on a synthetic exposition), and how long an alert takes from a condition
//! the bench creates to a receiver getting it: the agent beside a real Prometheus scraping it
//! at 1 s with a 1 s evaluation interval, the same rule, the same receiver, the same run.

use std::{
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use insite_e2e::servers::{alertmanager::Recorded, Recorder};

use super::*;
use crate::util;

pub struct Opts {
    pub rules: usize,
    pub series: usize,
    pub ticks: usize,
    pub repeat: usize,
    pub rounds: u32,
}

const RULE: &str = r#"groups:
  - name: bench
    rules:
      - alert: BenchRefused
        expr: sum(rate(insite_tcp_connect_failures_total{reason="refused"}[2s])) > 2
"#;

pub fn run(o: Opts) -> Result<()> {
    println!(
        "bench alerts: engine cost, {} rules over {} series, {} ticks, {} times...",
        o.rules, o.series, o.ticks, o.repeat
    );
    let mut p50s = Vec::new();
    for i in 1..=o.repeat.max(1) {
        let r = engine(&o)?;
        let p50 = r["tick_ms_p50"].as_f64().unwrap_or(f64::NAN);
        p50s.push(p50);
        println!(
            "  run {i}: per tick p50 {p50:.2} ms, p99 {:.2} ms, mean {:.2} ms; CPU at a 250 ms tick: {:.1}% of one core",
            r["tick_ms_p99"].as_f64().unwrap_or(f64::NAN),
            r["tick_ms_mean"].as_f64().unwrap_or(f64::NAN),
            100.0 * r["cpu_share_at_250ms"].as_f64().unwrap_or(f64::NAN)
        );
        if i == 1 {
            println!(
                "  window: {} series, {:.1} MiB ({} bytes/series)",
                r["window_series"],
                r["window_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                r["window_bytes"].as_u64().unwrap_or(0)
                    / r["window_series"].as_u64().unwrap_or(1).max(1)
            );
        }
    }
    p50s.sort_by(f64::total_cmp);
    let median = p50s.get(p50s.len() / 2).copied().unwrap_or(f64::NAN);
    let best = p50s.first().copied().unwrap_or(f64::NAN);
    println!(
        "  per-tick p50 over the runs: median {median:.2} ms, best {best:.2} ms (target: under 5 ms)"
    );
    detection(o.rounds)
}

/// One measurement of the engine's cost, as `insite-agent alerts bench --json` reports it.
fn engine(o: &Opts) -> Result<serde_json::Value> {
    let out = Command::new(util::agent_bin())
        .args([
            "alerts",
            "bench",
            "--rules",
            &o.rules.to_string(),
            "--series",
            &o.series.to_string(),
            "--ticks",
            &o.ticks.to_string(),
        ])
        .output()
        .context("insite-agent alerts bench")?;
    if !out.status.success() {
        bail!(
            "insite-agent alerts bench: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Connects to a closed local port every 10 ms until stopped: each connect is refused.
fn refusals(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let _ = TcpStream::connect(("127.0.0.1", port));
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

fn from_agent(a: &serde_json::Value) -> bool {
    a["generatorURL"]
        .as_str()
        .is_some_and(|u| u.contains("/alerts?id="))
}

/// (arrival, firing?) of every BenchRefused notice from the agent (or Prometheus) after `from`.
fn notices(rec: &Recorder, agent: bool, from: Instant) -> Vec<(Instant, bool)> {
    let now = std::time::SystemTime::now();
    rec.requests()
        .iter()
        .filter(|r: &&Recorded| r.at >= from && r.path.ends_with("/api/v2/alerts"))
        .flat_map(|r| {
            let v: Vec<serde_json::Value> = serde_json::from_str(&r.body).unwrap_or_default();
            v.into_iter()
                .filter(|a| a["labels"]["alertname"] == "BenchRefused" && from_agent(a) == agent)
                .map(|a| {
                    let ends = a["endsAt"]
                        .as_str()
                        .and_then(|s| humantime::parse_rfc3339(s).ok());
                    (r.at, ends.is_none_or(|e| e > now))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn detection(rounds: u32) -> Result<()> {
    let rec = Recorder::start()?;
    let dir = tempfile::tempdir()?;
    let rules = dir.path().join("bench.yml");
    std::fs::write(&rules, RULE)?;
    let extra = format!(
        "[alerts]\nstate_dir = {:?}\nrule_files = [{:?}]\nalertmanagers = [{:?}]\n",
        dir.path().join("state").display().to_string(),
        rules.display().to_string(),
        rec.url()
    );
    let agent = start_agent("tp_btf", &extra, &["net", "alerts"])?;
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{:?}]\nalerting:\n  alertmanagers:\n    - api_version: v2\n      static_configs:\n        - targets: ['127.0.0.1:{}']\nscrape_configs:\n  - job_name: agent\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            rules.display().to_string(),
            rec.port,
            agent.port
        ),
    )?;
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", prom_cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting prometheus (cargo xtask setup --tests installs it)")?;
    // Let Prometheus scrape a few times before the first round.
    std::thread::sleep(Duration::from_secs(5));
    println!("bench alerts: detection, {rounds} rounds (condition -> receiver)");
    // One destination for every round: the first round's failures make a new series (both
    // need two samples of it before a rate); later rounds raise a series both already have,
    // as when a dependency that was fine starts failing. Reported apart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut first_round = None;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut result = Ok(());
    // A different phase against both schedules every round (the agent's 250 ms tick,
    // Prometheus' 1 s scrape and evaluation): a fixed round length would lock onto one.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos() as u64 | 1);
    for round in 1..=rounds {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 1000));
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let w = refusals(port, stop.clone());
        let deadline = t0 + Duration::from_secs(30);
        let first = |agent: bool| {
            notices(&rec, agent, t0)
                .into_iter()
                .find(|n| n.1)
                .map(|n| n.0)
        };
        while (first(true).is_none() || first(false).is_none()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
        let _ = w.join();
        let (Some(a), Some(p)) = (first(true), first(false)) else {
            result = Err(anyhow::anyhow!(
                "round {round}: no firing notice within 30 s (agent {:?}, prometheus {:?})",
                first(true).is_some(),
                first(false).is_some()
            ));
            break;
        };
        let (a, p) = ((a - t0).as_secs_f64() * 1e3, (p - t0).as_secs_f64() * 1e3);
        println!("  round {round}: agent {a:.0} ms, prometheus {p:.0} ms");
        if round == 1 {
            first_round = Some((a, p));
        } else {
            ours.push(a);
            theirs.push(p);
        }
        // Both resolve before the next round starts.
        let resolved = |agent: bool| notices(&rec, agent, t0).iter().any(|n| !n.1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(resolved(true) && resolved(false)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let _ = prom.kill();
    let _ = prom.wait();
    result?;
    let q = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (a50, a99, p50, p99) = (
        q(&mut ours, 0.5),
        q(&mut ours, 0.99),
        q(&mut theirs, 0.5),
        q(&mut theirs, 0.99),
    );
    if let Some((a, p)) = first_round {
        println!(
            "new series (round 1): agent {a:.0} ms, Prometheus {p:.0} ms, {:.1}x",
            p / a
        );
    }
    println!("an existing series rising (rounds 2..{rounds}):");
    println!("| | p50 | p99 |\n| --- | --- | --- |");
    println!("| agent (250 ms tick) | {a50:.0} ms | {a99:.0} ms |");
    println!("| Prometheus 2.42 (1 s scrape, 1 s eval) | {p50:.0} ms | {p99:.0} ms |");
    println!(
        "Prometheus / agent: p50 {:.1}x, p99 {:.1}x",
        p50 / a50,
        p99 / a99
    );
    Ok(())
}
