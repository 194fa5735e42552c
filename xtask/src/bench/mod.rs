//! Benchmarks: measured against a baseline and a real peer in the same run. Not tests.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

mod alerts;
mod db;
mod harness;
mod net;
mod ratelimit;
mod soak;
mod stats;
mod syscalls;
mod web;

pub(crate) use harness::{bpf_run_time, start_agent, usage, Agent, Bpftrace, EXITED_DURING_RUN};
pub(crate) use stats::{ci95, mean, median, sd, spread, uncertainty};
use syscalls::syscalls;

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
        /// The agent's `agent.kernel_log` (default off): what the programs' log sites cost
        /// when they are kept.
        #[arg(long, value_enum, default_value = "off")]
        kernel_log: net::KernelLog,
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
        roles: db::Roles,
    },
    /// A UDP flood from a network namespace over a veth pair to a host port, at a fixed
    /// offered rate: what is admitted and what the sender achieves with no rule, with an
    /// iptables hashlimit rule and with the agent's rate-limit rule of the same limit per
    /// source, interleaved over rounds (installs iptables if missing).
    Ratelimit {
        /// Offered rate of the flood, datagrams per second.
        #[arg(long, default_value_t = 200_000)]
        pps: u64,
        /// Seconds of each flood.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The limit per source, packets per second, for hashlimit and the agent alike.
        #[arg(long, default_value_t = 10_000)]
        limit: u64,
        /// The burst (packets) for both.
        #[arg(long, default_value_t = 100)]
        burst: u64,
        /// Rounds of [no rule, hashlimit, agent].
        #[arg(long, default_value_t = 1)]
        rounds: u32,
        /// UDP payload bytes.
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Only the first two phases (no agent).
        #[arg(long)]
        skip_agent: bool,
        /// Keep the agent's other probe families on (default: only the ratelimit probe).
        #[arg(long)]
        keep_probes: bool,
        /// How the agent's rule attaches: auto, native or generic (XDP), or tc.
        #[arg(long, value_enum, default_value_t = ratelimit::Attach::Auto)]
        attach: ratelimit::Attach,
    },
    /// The alert engine: its cost per tick (RULES rules over SERIES series, the real engine on
    /// a synthetic exposition) and detection latency, condition to receiver, beside a real
    /// Prometheus (1 s scrape, 1 s evaluation) running the same rule in the same run.
    Alerts {
        #[arg(long, default_value_t = 1000)]
        rules: usize,
        #[arg(long, default_value_t = 10_000)]
        series: usize,
        /// Engine ticks timed (480: two minutes of 250 ms ticks, the fine ring full).
        #[arg(long, default_value_t = 480)]
        ticks: usize,
        /// Times the engine's cost is measured (each a fresh engine): the spread shows what
        /// other tenants of the host do to a memory-bound loop.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
        /// Detection rounds (each: the condition on until both have fired, then off until
        /// both resolved).
        #[arg(long, default_value_t = 10)]
        rounds: u32,
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
        } => web::run(web::Opts {
            rounds,
            seconds,
            connections,
            bpf_stats,
        }),
        Which::Syscalls { calls, rounds } => syscalls(calls, rounds),
        Which::Alerts {
            rules,
            series,
            ticks,
            repeat,
            rounds,
        } => alerts::run(alerts::Opts {
            rules,
            series,
            ticks,
            repeat,
            rounds,
        }),
        Which::Net {
            rounds,
            conn_secs,
            bulk_secs,
            no_syscalls_probe,
            split_cpus,
            kernel_log,
        } => net::run(net::Opts {
            rounds,
            conn: Duration::from_secs_f64(conn_secs),
            bulk: Duration::from_secs_f64(bulk_secs),
            no_syscalls_probe,
            split_cpus,
            kernel_log,
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
        } => db::run(db::Opts {
            roles,
            rounds,
            seconds,
            requests,
            scale,
            pg_extended,
            keep_probes,
            bpf_stats,
        }),
        Which::Ratelimit {
            pps,
            seconds,
            limit,
            burst,
            rounds,
            payload,
            skip_agent,
            keep_probes,
            attach,
        } => ratelimit::run(ratelimit::Opts {
            pps,
            seconds,
            limit,
            burst,
            rounds,
            payload,
            skip_agent,
            keep_probes,
            attach,
        }),
        Which::Soak {
            minutes,
            sample_secs,
            warm_up_secs,
        } => soak::run(soak::Opts {
            minutes,
            sample_every: Duration::from_secs(sample_secs.max(1)),
            warm_up: Duration::from_secs(warm_up_secs),
        }),
    }
}
