//! Benchmarks: measured against a baseline and a real peer in the same run. Not tests.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

use crate::util::agent_bin;

// Declared here rather than in main.rs: `crate::bench::bench_db`.
#[path = "bench_db.rs"]
pub(crate) mod bench_db;
#[path = "bench_soak.rs"]
mod bench_soak;

#[derive(Subcommand, Clone, Copy)]
pub enum Which {
    /// Cost per syscall of the agent's syscall probe vs. bpftrace (getppid loop).
    Syscalls {
        /// Calls per measurement.
        #[arg(long, default_value_t = 3_000_000)]
        calls: u64,
        /// Measurements per configuration (the fastest is reported: on a CPU-bound loop
        /// noise only ever adds time).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
    /// Loopback connections per second and bulk throughput without the agent, with it and
    /// with a bpftrace connection tracer, interleaved over several rounds.
    Net {
        /// Rounds of [baseline, agent, bpftrace]; one closing baseline follows the last.
        #[arg(long, default_value_t = 8)]
        rounds: u32,
        /// Seconds of the connect/accept/close loop per run.
        #[arg(long, default_value_t = 2.0)]
        conn_secs: f64,
        /// Seconds of the bulk transfer per run (after 0.25 s untimed on the same connection).
        #[arg(long, default_value_t = 1.0)]
        bulk_secs: f64,
        /// Start the agent with `[syscalls] enabled = false`, to see the network probe's cost
        /// without the syscall probe's (which also hooks every connect, accept and close).
        #[arg(long)]
        no_syscalls_probe: bool,
        /// Pin the client and the server to different CPUs (default: both to the last one).
        #[arg(long)]
        split_cpus: bool,
    },
    /// nginx serving a 1 KiB page under wrk over loopback: requests per second without the
    /// agent, with its default config, and with each probe family alone, interleaved over
    /// several rounds (a host that runs no database pays this).
    Web {
        /// Rounds of [baseline, every configuration]; one closing baseline follows the last.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds of each wrk run.
        #[arg(long, default_value_t = 6)]
        seconds: u32,
        /// wrk connections (-c).
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Also the kernel programs' run time per request, by probe family (run-time
        /// statistics add two clock reads to every program run).
        #[arg(long)]
        bpf_stats: bool,
    },
    /// Redis (redis-benchmark GET/SET, plain and pipelined) and PostgreSQL (pgbench -S, simple
    /// and prepared) throughput without the agent and with its db probe, interleaved over
    /// several rounds, with the agent's CPU and RSS and a check that it counted every query.
    /// Starts and removes its own redis-server and PostgreSQL cluster.
    Db {
        /// Rounds of [baseline, agent] (each runs every workload); one closing baseline
        /// follows the last.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Seconds per run: pgbench -T, and the Redis runs are sized (from the warm-up) to
        /// take about as long.
        #[arg(long, default_value_t = 3)]
        seconds: u32,
        /// redis-benchmark -n (requests per test, GET and SET each) instead of sizing the
        /// Redis runs from --seconds.
        #[arg(long)]
        requests: Option<u64>,
        /// pgbench -i scale factor (10: 1M accounts).
        #[arg(long, default_value_t = 10)]
        scale: u32,
        /// Also run pgbench -M extended.
        #[arg(long)]
        pg_extended: bool,
        /// Keep the agent's syscall and network probes on (default: only the db probe and
        /// the procfs collectors).
        #[arg(long)]
        keep_probes: bool,
        /// Measure the time the agent's db programs run in the kernel (kernel.bpf_stats: two
        /// clock reads per program run, which slow the runs with the agent a little).
        #[arg(long)]
        bpf_stats: bool,
        /// The ends the agent follows (`db.roles`): both, client or server. The count check
        /// expects nothing of the other.
        #[arg(long, value_enum, default_value = "both")]
        roles: bench_db::Roles,
    },
    /// The agent with every probe on under a mixed workload (syscalls, connections, Redis,
    /// PostgreSQL and MariaDB, scrapes every second, CLI calls) for a while: RSS and open fds
    /// sampled, and whether they stay flat after the warm-up.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10)]
        sample_secs: u64,
        /// Seconds at the start that the verdict leaves out (tables and caches filling).
        #[arg(long, default_value_t = 120)]
        warm_up_secs: u64,
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Web {
            rounds,
            seconds,
            connections,
            bpf_stats,
        } => crate::bench_web::run(crate::bench_web::Opts {
            rounds,
            seconds,
            connections,
            bpf_stats,
        }),
        Which::Syscalls { calls, rounds } => syscalls(calls, rounds),
        Which::Net {
            rounds,
            conn_secs,
            bulk_secs,
            no_syscalls_probe,
            split_cpus,
        } => crate::bench_net::run(crate::bench_net::Opts {
            rounds,
            conn: Duration::from_secs_f64(conn_secs),
            bulk: Duration::from_secs_f64(bulk_secs),
            no_syscalls_probe,
            split_cpus,
        }),
        Which::Db {
            rounds,
            seconds,
            requests,
            scale,
            pg_extended,
            keep_probes,
            bpf_stats,
            roles,
        } => bench_db::run(bench_db::Opts {
            roles,
            rounds,
            seconds,
            requests,
            scale,
            pg_extended,
            keep_probes,
            bpf_stats,
        }),
        Which::Soak {
            minutes,
            sample_secs,
            warm_up_secs,
        } => bench_soak::run(bench_soak::Opts {
            minutes,
            sample_every: Duration::from_secs(sample_secs.max(1)),
            warm_up: Duration::from_secs(warm_up_secs),
        }),
    }
}

const BPFTRACE_PROG: &str = "tracepoint:raw_syscalls:sys_enter { @s[tid] = nsecs; } tracepoint:raw_syscalls:sys_exit /@s[tid]/ { @h[args->id] = hist(nsecs - @s[tid]); delete(@s[tid]); }";

/// ns per getppid call: the fastest of `rounds` loops of `calls` calls.
fn getppid_loop(calls: u64, rounds: u32) -> f64 {
    let samples: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                // SAFETY: getppid has no arguments and cannot fail.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
            t.elapsed().as_nanos() as f64 / calls as f64
        })
        .collect();
    samples.into_iter().fold(f64::INFINITY, f64::min)
}

/// Mean ns per getppid call over `d` of back-to-back calls. A sampled probe is attached only
/// part of the time, so the fastest round would hide it: the mean over whole intervals is its
/// cost.
fn getppid_mean(d: Duration) -> f64 {
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < d {
        for _ in 0..100_000 {
            // SAFETY: getppid has no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        n += 100_000;
    }
    t.elapsed().as_nanos() as f64 / n.max(1) as f64
}

pub(crate) struct Usage {
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

pub(crate) fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after "comm)": state is [0]; utime [11], stime [12]
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Usage { cpu_ticks, rss_kib })
}

/// The start of `Agent::check_running`'s error.
pub(crate) const EXITED_DURING_RUN: &str = "insite-agent exited during the measurement";

pub(crate) struct Agent {
    pub child: Child,
    dir: PathBuf,
}

impl Agent {
    pub fn start(attach: &str, extra: &str) -> Result<Self> {
        Self::start_requiring(attach, extra, &[])
    }

    /// Like `start`, and also waits until each probe named in `probes` reports `attached`
    /// (fails at once if one reports anything else but `disabled` while starting).
    pub fn start_requiring(attach: &str, extra: &str, probes: &[&str]) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("insite-bench-{}-{attach}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("ctl.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[metrics]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = \"{}\"\n[syscalls]\nattach = \"{attach}\"\n{extra}\n",
                sock.display()
            ),
        )?;
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting insite-agent")?;
        let mut agent = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = Command::new(agent_bin())
                .args(["status", "--json", "--control-socket"])
                .arg(&sock)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let mut problem = None;
            let ok = status.as_deref().is_some_and(|s| {
                s.contains("\"attached\"")
                    && probes.iter().all(|p| match probe_state(s, p).as_deref() {
                        Some("attached") => true,
                        Some("disabled") | None => false,
                        Some(other) => {
                            problem = Some(format!("probe {p} is {other}: {s}"));
                            false
                        }
                    })
            });
            if ok {
                break;
            }
            let exited = agent.child.try_wait()?.is_some();
            if problem.is_some() || exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let config = std::fs::read_to_string(&cfg).unwrap_or_default();
                agent.stop();
                bail!(
                    "insite-agent did not become ready{}\nconfig:\n{config}log:\n{log}",
                    problem.map(|p| format!(" ({p})")).unwrap_or_default(),
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(agent)
    }

    /// An error with the agent's log if it has exited (a run measured without it is void).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            bail!("{EXITED_DURING_RUN} ({status}); log:\n{log}");
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `state` of probe `name` in `insite-agent status --json` output ("attached", "disabled",
/// "failed", ...), without a JSON parser: the probe objects are flat, so the text between the
/// braces around `"name": "<name>"` is that probe's object.
fn probe_state(status_json: &str, name: &str) -> Option<String> {
    let flat: String = status_json.split_whitespace().collect();
    let at = flat.find(&format!("\"name\":\"{name}\""))?;
    let start = flat[..at].rfind('{')?;
    let end = at + flat[at..].find('}')?;
    let obj = &flat[start..end];
    let v = obj.split_once("\"state\":\"")?.1;
    Some(v.split('"').next()?.to_string())
}

/// A bpftrace one-liner, started and waited for until its probes are live.
pub(crate) struct Bpftrace {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Bpftrace {
    pub fn start(prog: &str) -> Result<Self> {
        let mut child = Command::new("bpftrace")
            .args(["-e", prog])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace (apt-get install bpftrace)")?;
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // bpftrace prints "Attaching N probes..." once its probes are live.
        match lines.next() {
            Some(Ok(l)) if l.contains("Attaching") => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bpftrace did not attach: {other:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { child, lines })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (bpftrace prints its maps and exits); returns what it printed.
    pub fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let _ = self.child.wait();
        out.join("\n")
    }
}

fn with_agent(attach: &str, extra: &str, calls: u64, rounds: u32) -> Result<(f64, f64, u64)> {
    let mut agent = Agent::start(attach, extra)?;
    let pid = agent.child.id();
    let before = usage(pid);
    let t = Instant::now();
    let ns = getppid_loop(calls, rounds);
    let wall = t.elapsed().as_secs_f64();
    let after = usage(pid);
    agent.stop();
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (cpu_pct, rss) = match (before, after) {
        (Some(b), Some(a)) => (
            (a.cpu_ticks.saturating_sub(b.cpu_ticks)) as f64 / tps / wall * 100.0,
            a.rss_kib,
        ),
        _ => (f64::NAN, 0),
    };
    Ok((ns, cpu_pct, rss))
}

fn with_bpftrace(calls: u64, rounds: u32) -> Result<f64> {
    let bt = Bpftrace::start(BPFTRACE_PROG)?;
    let ns = getppid_loop(calls, rounds);
    bt.stop();
    Ok(ns)
}

/// Keeps the loop on one CPU (no migrations mid-measurement); the agent and bpftrace are
/// started before pinning and run wherever the scheduler puts them.
fn pin_to_last_cpu() {
    // SAFETY: sysconf and sched_setaffinity on this thread with a zeroed, then filled, set.
    unsafe {
        let n = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as usize;
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(n - 1, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("bench: could not pin to CPU {}", n - 1);
        }
    }
}

fn syscalls(calls: u64, rounds: u32) -> Result<()> {
    println!(
        "bench syscalls: getppid loop, {calls} calls x {rounds} rounds (fastest round, ns/call)"
    );
    pin_to_last_cpu();
    // Warm up the CPU and caches before the first figure.
    getppid_loop(calls / 4, 1);
    let base1 = getppid_loop(calls, rounds);
    const FULL: &str = "mode = \"full\"";
    let (btf, btf_cpu, btf_rss) = with_agent("tp_btf", FULL, calls, rounds)?;
    let (raw, raw_cpu, raw_rss) = with_agent("raw_tracepoint", FULL, calls, rounds)?;
    // The same hooks with getppid filtered out: what the tracepoints themselves cost, before
    // any clock read or map update.
    let (floor, _, _) = with_agent(
        "tp_btf",
        "mode = \"full\"\nsyscalls = [\"read\"]",
        calls,
        rounds,
    )?;
    // The default mode, averaged over two whole sampling intervals, against a baseline
    // averaged the same way.
    let span = Duration::from_secs(20);
    let base_mean = getppid_mean(span / 2);
    let sampled_mean = {
        let mut agent = Agent::start("tp_btf", "")?;
        let ns = getppid_mean(span);
        agent.check_running()?;
        agent.stop();
        ns
    };
    let bt = with_bpftrace(calls, rounds)?;
    let base2 = getppid_loop(calls, rounds);
    // The two baselines bracket the hooked runs; their mean is the reference.
    let base = (base1 + base2) / 2.0;

    println!("  {:<30} {:>9} {:>9}", "", "ns/call", "added");
    println!("  {:<30} {base1:>9.1}", "no hook (before)");
    println!("  {:<30} {base2:>9.1}", "no hook (after)");
    let row = |name: &str, v: f64, extra: String| {
        println!("  {name:<30} {v:>9.1} {:>+9.1}  {extra}", v - base);
    };
    row(
        "insite-agent, tp_btf",
        btf,
        format!("agent cpu {btf_cpu:.1}%, rss {} KiB", btf_rss),
    );
    row(
        "insite-agent, raw_tracepoint",
        raw,
        format!("agent cpu {raw_cpu:.1}%, rss {} KiB", raw_rss),
    );
    row(
        "insite-agent, getppid filtered",
        floor,
        "(hook cost alone)".to_string(),
    );
    row("bpftrace hist() one-liner", bt, String::new());
    println!("  averaged over {}s of calls:", span.as_secs());
    println!("  {:<30} {base_mean:>9.1}", "no hook");
    let sampled_added = sampled_mean - base_mean;
    println!(
        "  {:<30} {sampled_mean:>9.1} {sampled_added:>+9.1}  ({:.0}% of full mode's added ns)",
        "insite-agent, default (sampled)",
        sampled_added.max(0.0) / (btf - base).max(1e-9) * 100.0
    );
    let ratio = |agent: f64| (agent - base).max(0.0) / (bt - base).max(1e-9);
    println!(
        "ratio (agent added ns) / (bpftrace added ns), full mode: tp_btf {:.3}, raw_tracepoint {:.3} (target <= 0.20)",
        ratio(btf),
        ratio(raw)
    );
    Ok(())
}
