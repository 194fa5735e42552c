//! `cargo xtask bench db`: what the agent's database probe costs real database traffic, and
//! whether it counts every query, in one run.
//!
//! The bench starts the end-to-end tests' servers (`insite_e2e::servers`): a redis-server
//! (127.0.0.1, a free port, no persistence) and a PostgreSQL 15 cluster (copied from the
//! tests' template, ssl and fsync off, a private unix socket directory), then `pgbench -i`;
//! both are removed at the end, also when the bench fails (drop guards). The agent is started
//! by the tests' launcher too. Workloads, from the tools' own clients:
//! - `redis-benchmark -t set,get -c 20` over TCP, without and with pipelining (`-P 16`);
//! - `pgbench -S` (select-only) `-c 4 -j 2 -T <secs>` over the unix socket, in the simple and
//!   the prepared query mode (and the extended one with `--pg-extended`).
//!
//! Each round runs every workload without the agent (baseline), then every workload with one
//! agent started for the round; a closing baseline follows the last round. A run with the agent
//! is compared with the mean of the baselines just before and just after it (which cancels a
//! drift), and the summary gives mean ± standard deviation of the throughputs and the mean
//! per-round ratio with a rough 95% interval, so that a reader can tell a difference from noise.
//!
//! Count check, for each run with the agent: the metrics are scraped before and after it (after
//! the counts have settled: the agent drains its ring every 100 ms), and the delta of
//! `insite_db_query_duration_seconds_count` for the workload's destination, per role, is
//! compared with what the client and the server say they did: Redis's own `INFO commandstats`
//! (read before and after, outside the counted window) and redis-benchmark's completed requests;
//! pgbench's processed transactions (one SELECT each) plus its fixed set-up queries.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use insite_e2e::{
    servers::{Postgres, Redis, Via},
    Metrics,
};

use crate::{
    bench::{ci95, mean, sd, usage, Agent},
    util::agent_bin,
};

mod fixture;
mod metrics;
mod phases;
mod report;
mod tools;

use fixture::*;
use metrics::*;
use phases::*;
use report::*;
use tools::*;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
const REDIS_BENCHMARK: &str = "/usr/bin/redis-benchmark";

/// The target: throughput with the agent at least this share of the baseline's.
const TARGET: f64 = 0.97;
const REDIS_CLIENTS: u32 = 20;
const REDIS_PIPELINE: u32 = 16;
const PG_CLIENTS: u32 = 4;
const PG_THREADS: u32 = 2;

/// The queries pgbench 15 sends besides its transactions, once per run, on its first
/// connection: `SELECT count(*) FROM pgbench_branches` (the scale), a catalog SELECT (is
/// pgbench_accounts partitioned), `vacuum pgbench_branches`, `vacuum pgbench_tellers` and
/// `truncate pgbench_history` (the vacuum step that `-n` would skip).
const PGBENCH_SETUP: &[(&str, u64)] = &[("SELECT", 2), ("TRUNCATE", 1), ("VACUUM", 2)];

const DURATION_COUNT: &str = "insite_db_query_duration_seconds_count";

/// How long a server may take to start, and a tool to finish beyond its planned time.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const TOOL_SLACK: Duration = Duration::from_secs(120);
/// The agent's counts are settled when two scrapes this far apart agree: longer than the
/// store's 1 s snapshots plus the collector's 250 ms fold of the kernel's counts.
const SETTLE_STEP: Duration = Duration::from_millis(1300);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Opts {
    pub rounds: u32,
    pub seconds: u32,
    pub requests: Option<u64>,
    pub scale: u32,
    pub pg_extended: bool,
    pub keep_probes: bool,
    pub bpf_stats: bool,
    /// `db.roles` of the agent: "client", "server" or "both".
    pub roles: Roles,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Roles {
    Both,
    Client,
    Server,
}

impl Roles {
    fn config(self) -> &'static str {
        match self {
            Self::Both => "roles = [\"client\", \"server\"]\n",
            Self::Client => "roles = [\"client\"]\n",
            Self::Server => "roles = [\"server\"]\n",
        }
    }

    fn client(self) -> bool {
        self != Self::Server
    }

    fn server(self) -> bool {
        self != Self::Client
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads and their results
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// redis-benchmark GET and SET, `pipeline` commands per write (1: none).
    Redis { pipeline: u32 },
    /// pgbench -S in this query mode.
    Pg { mode: &'static str },
}

struct Workload {
    kind: Kind,
    /// redis-benchmark `-n` (per test, so twice this many requests in all).
    redis_n: u64,
}

impl Workload {
    fn name(&self) -> String {
        match self.kind {
            Kind::Redis { pipeline: 1 } => "redis GET+SET".to_string(),
            Kind::Redis { pipeline } => format!("redis GET+SET -P {pipeline}"),
            Kind::Pg { mode } => format!("pgbench -S -M {mode}"),
        }
    }

    fn unit(&self) -> &'static str {
        match self.kind {
            Kind::Redis { .. } => "req/s",
            Kind::Pg { .. } => "tps",
        }
    }

    fn describe(&self, fx: &Fixture, secs: u32) -> String {
        match self.kind {
            Kind::Redis { pipeline } => format!(
                "redis-benchmark -t set,get -n {} -c {REDIS_CLIENTS}{} over TCP 127.0.0.1:{}; \
                 requests/s of GET and SET together",
                self.redis_n,
                if pipeline > 1 {
                    format!(" -P {pipeline}")
                } else {
                    " (no pipelining)".to_string()
                },
                fx.redis.port
            ),
            Kind::Pg { mode } => format!(
                "pgbench -S -c {PG_CLIENTS} -j {PG_THREADS} -T {secs} -M {mode} over {}; \
                 transactions/s (one SELECT each, without connection time)",
                fx.pg_destination()
            ),
        }
    }

    fn system(&self) -> &'static str {
        match self.kind {
            Kind::Redis { .. } => "redis",
            Kind::Pg { .. } => "postgresql",
        }
    }
}

/// One run of a workload.
struct Run {
    /// Requests (Redis, GET and SET together) or transactions (pgbench) per second.
    rate: f64,
    /// What the tool says it completed, by operation (pgbench: its transactions as SELECT).
    done: BTreeMap<String, u64>,
    /// pgbench's failed transactions (0 for Redis).
    failed: u64,
    /// Tracers this bench did not start, seen before or after the run.
    foreign: Vec<String>,
}

/// One run with the agent.
struct AgentRun {
    run: Run,
    /// Seconds the tool ran.
    wall: f64,
    /// With `--bpf-stats`: nanoseconds the agent's db programs ran in the kernel during the
    /// run (tail-called walkers included in their callers' time).
    bpf_ns: Option<u64>,
    cpu_pct: f64,
    rss_kib: u64,
    check: Check,
}

/// The count check of one run with the agent.
struct Check {
    /// Queries that should be counted once per role, by operation.
    expected: BTreeMap<String, u64>,
    /// What the agent counted for the workload's destination, by operation.
    client: BTreeMap<String, u64>,
    server: BTreeMap<String, u64>,
    /// Redis only: the server's commands (INFO commandstats delta) that redis-benchmark did not
    /// report as completed requests (its start-up CONFIG GETs), by operation.
    extra: BTreeMap<String, u64>,
    /// Redis only: GET/SET the server ran that differ from redis-benchmark's completed count.
    tool_vs_server: Option<String>,
    /// Query errors the agent counted for the destination (both roles).
    errors: f64,
    /// The roles the agent follows; the other's count must be empty.
    roles: Roles,
    /// Deltas of the agent's loss counters (host-wide), `None` where the agent lacks one.
    kernel: Vec<(&'static str, Option<f64>)>,
    /// Events written to the db ring during the run (host-wide).
    ring_events: f64,
}

impl Check {
    fn matched(&self) -> bool {
        let want = |followed: bool| {
            if followed {
                self.expected.clone()
            } else {
                BTreeMap::new()
            }
        };
        self.client == want(self.roles.client()) && self.server == want(self.roles.server())
    }
}

/// The agent's counters reported with every count check: (label, metric, ring filter).
const KERNEL_COUNTERS: &[(&str, &str, bool)] = &[
    ("ring drops", "insite_ringbuf_drops_total", true),
    ("desyncs", "insite_db_desyncs_total", false),
    ("untimed", "insite_db_requests_untimed_total", false),
    ("unmatched", "insite_db_unmatched_responses_total", false),
    ("texts sent", "insite_db_statement_texts_total", false),
    (
        "storage failures",
        "insite_db_storage_failures_total",
        false,
    ),
    ("undecodable", "insite_db_events_undecodable_total", false),
    (
        "series overflowed",
        "insite_db_series_overflowed_total",
        false,
    ),
];

// ---------------------------------------------------------------------------------------------
// Temporary directory, servers, agent (all stopped and removed when dropped)
// ---------------------------------------------------------------------------------------------

pub fn run(o: Opts) -> Result<()> {
    let rounds = o.rounds.max(1) as usize;
    let secs = o.seconds.max(1);
    let o = Opts { seconds: secs, ..o };
    let started = Instant::now();
    // SAFETY: sysconf has no preconditions.
    let (tck, ncpu) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as f64,
        )
    };

    eprintln!(
        "bench db: starting redis-server and PostgreSQL (initdb, pgbench -i -s {})",
        o.scale
    );
    let fx = Fixture::start(o.scale)?;

    let mut ws = vec![
        Workload {
            kind: Kind::Redis { pipeline: 1 },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Redis {
                pipeline: REDIS_PIPELINE,
            },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Pg { mode: "simple" },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Pg { mode: "prepared" },
            redis_n: 0,
        },
    ];
    if o.pg_extended {
        ws.push(Workload {
            kind: Kind::Pg { mode: "extended" },
            redis_n: 0,
        });
    }

    // Warm-up, not reported; it also sizes the Redis runs to take about `secs` each.
    eprintln!("bench db: warm-up");
    for w in &mut ws {
        match w.kind {
            Kind::Redis { pipeline } => {
                let probe_n = if pipeline > 1 { 200_000 } else { 20_000 };
                let probe = Workload {
                    kind: w.kind,
                    redis_n: o.requests.unwrap_or(probe_n),
                };
                let r = run_workload(&fx, &probe, 1, None).context("warm-up")?;
                // Two tests (SET, GET) of n requests each: n = rate * secs / 2.
                let sized = (r.rate * f64::from(secs) / 2.0 / 1000.0).ceil() as u64 * 1000;
                w.redis_n = o.requests.unwrap_or(sized.max(1000));
            }
            Kind::Pg { .. } => {
                run_workload(&fx, w, 1, None).context("warm-up")?;
            }
        }
    }

    println!(
        "bench db: {} workloads, {rounds} rounds of [baseline, agent] + a closing baseline \
         (each phase runs every workload; one agent per agent phase)",
        ws.len()
    );
    for w in &ws {
        println!("  {:<24} {}", w.name(), w.describe(&fx, secs));
    }
    println!(
        "servers: redis-server (pid {}) on 127.0.0.1:{} (--save '' --appendonly no), \
         PostgreSQL 15 (pid {}; pgbench -i -s {}, ssl/fsync off) on {} and 127.0.0.1:{}; \
         temp dir {}",
        fx.redis.pid(),
        fx.redis.port,
        fx.pg.pid(),
        o.scale,
        fx.pg_destination(),
        fx.pg.port,
        fx.dir.0.display()
    );
    println!(
        "agent: {} --config <tmp>, {}, db probe on; private metrics port and control socket{}",
        agent_bin().display(),
        if o.keep_probes {
            "syscalls and net probes ON (--keep-probes)"
        } else {
            "syscalls and net probes off (--keep-probes keeps them on)"
        },
        if o.bpf_stats {
            "; kernel.bpf_stats on during the agent phases (--bpf-stats)"
        } else {
            ""
        }
    );

    let ticks_before = cpu_ticks();
    let bench_start = Instant::now();
    let mut base: Vec<Vec<Run>> = Vec::with_capacity(rounds + 1);
    let mut agent: Vec<Vec<AgentRun>> = Vec::with_capacity(rounds);
    eprint!("bench db: round");
    for r in 1..=rounds {
        eprint!(" {r}/{rounds}");
        base.push(baseline_phase(&fx, &ws, secs)?);
        // Once more if the agent exited mid-run (something else on a shared machine may signal
        // it); a second exit, or an agent that does not start, ends the bench.
        agent.push(match agent_phase(&fx, &ws, &o, r) {
            Err(e) if format!("{e:#}").contains(crate::bench::EXITED_DURING_RUN) => {
                eprintln!("\nbench db: retrying the agent phase once: {e:#}");
                agent_phase(&fx, &ws, &o, r)?
            }
            other => other?,
        });
    }
    base.push(baseline_phase(&fx, &ws, secs)?);
    eprintln!(" done");
    let ticks_after = cpu_ticks();
    let others = (ticks_after.0.saturating_sub(ticks_before.0))
        .saturating_sub(ticks_after.1.saturating_sub(ticks_before.1));
    let pct = |ticks: u64| ticks as f64 / tck / bench_start.elapsed().as_secs_f64() / ncpu * 100.0;
    let others_pct = pct(others);
    let own_pct = pct(ticks_after.1.saturating_sub(ticks_before.1));

    let mut summary = Vec::new();
    let mut any_foreign = false;
    for (i, w) in ws.iter().enumerate() {
        let b: Vec<f64> = base.iter().map(|p| p[i].rate).collect();
        let a: Vec<f64> = agent.iter().map(|p| p[i].run.rate).collect();
        let ratios: Vec<f64> = (0..rounds)
            .map(|r| a[r] / ((b[r] + b[r + 1]) / 2.0))
            .collect();
        let runs_of = |r: usize| [&base[r][i], &agent[r][i].run, &base[r + 1][i]];
        let mark = |r: usize| runs_of(r).iter().any(|s| !s.foreign.is_empty());

        println!();
        println!("== {} ({}) ==", w.name(), w.describe(&fx, secs));
        println!(
            "  {:>5} {:>11} {:>11} {:>7} {:>9} {:>10}  counted per role (client / server / expected)",
            "round",
            format!("baseline {}", w.unit()).trim_end(),
            "agent",
            "ratio",
            "agent cpu",
            "agent rss",
        );
        for r in 0..rounds {
            let ar = &agent[r][i];
            let c = &ar.check;
            println!(
                "  {:>5} {:>11.0} {:>11.0} {:>7.3} {:>8.1}% {:>6} MiB  {} / {} / {} {}{}",
                r + 1,
                b[r],
                a[r],
                ratios[r],
                ar.cpu_pct,
                ar.rss_kib / 1024,
                total(&c.client),
                total(&c.server),
                total(&c.expected),
                if c.matched() { "matched" } else { "MISMATCH" },
                if mark(r) { " *" } else { "" }
            );
        }
        println!("  {:>5} {:>11.0}", "close", b[rounds]);

        // Count check details.
        let checks: Vec<&Check> = agent.iter().map(|p| &p[i].check).collect();
        let matched = checks.iter().filter(|c| c.matched()).count();
        let first = &agent[0][i];
        match w.kind {
            Kind::Redis { .. } => {
                let extra = fmt_ops(&first.check.extra);
                println!(
                    "  count check: expected = the server's own INFO commandstats over the run \
                     = redis-benchmark's completed requests ({} in round 1) + its start-up \
                     commands not in its report ({extra} in round 1); {matched}/{rounds} runs \
                     matched exactly, every role followed",
                    fmt_ops(&first.run.done),
                );
            }
            Kind::Pg { .. } => println!(
                "  count check: expected = pgbench's processed transactions (one SELECT each; \
                 {} in round 1) + its set-up queries ({}); {matched}/{rounds} runs matched \
                 exactly, every role followed",
                first.run.done.get("SELECT").copied().unwrap_or(0),
                fmt_ops(
                    &PGBENCH_SETUP
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), *v))
                        .collect()
                )
            ),
        }
        for (r, ar) in agent.iter().map(|p| &p[i]).enumerate() {
            let c = &ar.check;
            if !c.matched() {
                let lost: Vec<String> = c
                    .kernel
                    .iter()
                    .filter_map(|(k, v)| Some((k, (*v)?)))
                    .filter(|(_, v)| *v > 0.0)
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect();
                println!(
                    "    round {}: expected {}; client {}; server {}; agent counters in this run: \
                     {}",
                    r + 1,
                    fmt_ops(&c.expected),
                    fmt_ops(&c.client),
                    fmt_ops(&c.server),
                    if lost.is_empty() {
                        "all 0".to_string()
                    } else {
                        lost.join(", ")
                    }
                );
            }
            if let Some(d) = &c.tool_vs_server {
                println!("    round {}: {d}", r + 1);
            }
            if ar.run.failed > 0 {
                println!(
                    "    round {}: pgbench reported {} failed transactions",
                    r + 1,
                    ar.run.failed
                );
            }
        }
        let errors: f64 = checks.iter().map(|c| c.errors).sum();
        let events: f64 = checks.iter().map(|c| c.ring_events).sum();
        let wall: f64 = agent.iter().map(|p| p[i].wall).sum();
        let counted: u64 = checks
            .iter()
            .map(|c| total(&c.client) + total(&c.server))
            .sum();
        let mut kernel = String::new();
        let mut losses = Vec::new();
        for (k, (label, _)) in checks[0].kernel.iter().enumerate() {
            let vals: Vec<Option<f64>> = checks.iter().map(|c| c.kernel[k].1).collect();
            let s = if vals.iter().all(Option::is_some) {
                let sum = vals.iter().flatten().sum::<f64>();
                if sum > 0.0 {
                    losses.push(format!("{label} {sum:.0}"));
                }
                format!("{sum:.0}")
            } else {
                "n/a".to_string()
            };
            let _ = write!(kernel, "{}{label} {s}", if k == 0 { "" } else { ", " });
        }
        println!(
            "  agent counters over its runs (host-wide): {kernel}; query errors at this \
             destination {errors:.0}; db ring events {events:.0} ({:.2} per counted query, \
             {:.0}/s while the tool ran)",
            events / counted.max(1) as f64,
            events / wall
        );

        let bpf: Option<Vec<u64>> = agent.iter().map(|p| p[i].bpf_ns).collect();
        if let Some(bpf) = bpf {
            let ns: u64 = bpf.iter().sum();
            let queries: u64 = checks.iter().map(|c| total(&c.expected)).sum();
            println!(
                "  in-kernel (kernel.bpf_stats): the db programs ran {:.0} ns per query (its \
                 client and server sockets together), {:.1}% of the machine's CPU time while \
                 the tool ran",
                ns as f64 / queries.max(1) as f64,
                ns as f64 / (wall * ncpu * 1e9) * 100.0
            );
        }
        let (bm, bs) = (mean(&b), sd(&b));
        let (am, asd) = (mean(&a), sd(&a));
        let (rm, ru) = (mean(&ratios), ci95(&ratios));
        let neighbours: Vec<f64> = b.windows(2).map(|p| (p[1] / p[0] - 1.0).abs()).collect();
        let noise = mean(&neighbours);
        let (short, v) = verdict(rm, ru);
        println!(
            "  baseline {bm:.0} ± {bs:.0} {u} (sd, {} runs), agent {am:.0} ± {asd:.0} {u} ({} runs); \
             ratio agent/baseline {rm:.3} ± {ru:.3} (~95%); neighbouring baselines differ by \
             {:.1}% on average",
            b.len(),
            a.len(),
            noise * 100.0,
            u = w.unit()
        );
        println!("  target >= {TARGET}: {v}");
        if (1.0 - rm).abs() < noise {
            println!(
                "  (the agent's difference from the baseline, {:+.1}%, is smaller than the \
                 baselines' own round-to-round difference)",
                (rm - 1.0) * 100.0
            );
        }
        let cpu: Vec<f64> = agent.iter().map(|p| p[i].cpu_pct).collect();
        let rss = agent.iter().map(|p| p[i].rss_kib).max().unwrap_or(0);
        any_foreign |= (0..rounds).any(mark);
        summary.push((
            w.name(),
            format!("{bm:.0} ± {bs:.0}"),
            format!("{am:.0} ± {asd:.0}"),
            format!("{rm:.3} ± {ru:.3}"),
            short.to_string(),
            format!("{:.1}%", mean(&cpu)),
            format!("{:.1} MiB", rss as f64 / 1024.0),
            format!("{matched}/{rounds}"),
            if losses.is_empty() {
                "none".to_string()
            } else {
                losses.join(", ")
            },
        ));
    }

    println!();
    if any_foreign {
        println!(
            "* tracers this bench did not start (another insite-agent or bpftrace) ran during \
             these rounds: they slow the baselines too, so those ratios are unreliable"
        );
    }
    println!(
        "noise: other processes used {others_pct:.1}% of the machine's {ncpu} CPUs during the \
         rounds (this bench's servers, clients and agents {own_pct:.1}%){}",
        if others_pct > 5.0 {
            " (busy: the figures are disturbed; rerun on a quiet machine)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "summary ({rounds} rounds; throughput mean ± sd; ratio = agent / mean of the baselines \
         before and after, mean over rounds ± ~95%; agent cpu = mean % of one CPU while the \
         workload ran; rss = max VmRSS)"
    );
    println!(
        "  {:<24} {:>16} {:>16} {:>14}  {:<22} {:>9} {:>10} {:>7}  agent losses",
        "workload",
        "baseline",
        "agent",
        "ratio",
        "target >= 0.97",
        "agent cpu",
        "agent rss",
        "counts",
    );
    for (name, bl, ag, ratio, v, cpu, rss, counts, losses) in &summary {
        println!(
            "  {name:<24} {bl:>16} {ag:>16} {ratio:>14}  {v:<22} {cpu:>9} {rss:>10} {counts:>7}  \
             {losses}"
        );
    }
    println!("bench db: {:.0}s in all", started.elapsed().as_secs_f64());
    drop(fx);
    Ok(())
}
