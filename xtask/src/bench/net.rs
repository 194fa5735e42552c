//! `cargo xtask bench net`: what the agent costs loopback TCP, against no agent and against a
//! bpftrace connection tracer, in one run.
//!
//! Two loads, both Rust std only, client and server threads pinned to fixed CPUs:
//! - a connect/accept/close loop (connections per second; one client, one server, serial), and
//! - a bulk transfer on one connection (256 KiB writes, the server reads and discards; GB/s).
//!
//! VM noise is large and comes in phases of a few seconds (a getppid loop alone wanders by
//! ±15% on the 2-core dev VM), so configurations are interleaved in short runs: each round runs
//! baseline, agent, bpftrace (conn loop only), and a closing baseline follows the last round.
//! A run is compared with the mean of the baselines just before and just after it (which
//! cancels a drift), the summary is the median over rounds with a rough 95% uncertainty from the
//! rounds' scatter, and the spread of the baselines is printed, so that a reader can tell a
//! difference from noise. Runs during which a tracer this bench did not start (another
//! insite-agent, say an end-to-end test's, or a bpftrace) was running are marked.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::bench::{bpf_run_time, median, spread, start_agent, uncertainty, usage, Bpftrace};

/// The run states the network probe explicitly instead of relying on its default.
const NET_CONFIG: &str = "[net]\nenabled = true\n";
/// The probe name `insite-agent status` reports for the network family: the agent must report
/// it attached before a round starts.
const NET_PROBE: &str = "net";

/// A comparable connection tracer: the SYN_SENT time per socket, and a histogram of connect
/// latency when the socket reaches ESTABLISHED (tcpconnlat-like). Sockets that close without
/// connecting are forgotten. States: 1 ESTABLISHED, 2 SYN_SENT, 7 CLOSE.
const BPFTRACE_PROG: &str = "tracepoint:sock:inet_sock_set_state { \
    if (args->newstate == 2) { @start[args->skaddr] = nsecs; } \
    else if (args->newstate == 1) { if (@start[args->skaddr]) { \
        @connect_ns = hist(nsecs - @start[args->skaddr]); delete(@start[args->skaddr]); } } \
    else if (args->newstate == 7) { delete(@start[args->skaddr]); } } \
    END { clear(@start); }";

const BULK_BUF: usize = 256 * 1024;
const BULK_WARMUP: Duration = Duration::from_millis(250);

pub struct Opts {
    pub rounds: u32,
    pub conn: Duration,
    pub bulk: Duration,
    pub no_syscalls_probe: bool,
    pub split_cpus: bool,
    pub kernel_log: KernelLog,
}

/// The agent's `agent.kernel_log` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum KernelLog {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl KernelLog {
    fn as_str(self) -> &'static str {
        match self {
            KernelLog::Off => "off",
            KernelLog::Error => "error",
            KernelLog::Warn => "warn",
            KernelLog::Info => "info",
            KernelLog::Debug => "debug",
        }
    }
}

struct Sample {
    conn_per_s: f64,
    /// Connects made, including failed ones.
    conns: u64,
    conn_errors: u64,
    bulk_gbps: f64,
    /// Tracers this bench did not start, seen before or after the run.
    foreign: Vec<String>,
}

struct AgentRun {
    sample: Sample,
    cpu_pct: f64,
    rss_kib: u64,
    /// Time the agent's network programs ran, per connection of the conn loop (from the
    /// kernel's own BPF run-time statistics; NaN where they are unavailable).
    bpf_ns_per_conn: f64,
}

struct BtRun {
    sample: Sample,
    /// Connects counted in bpftrace's histogram.
    traced: u64,
}

/// (server CPU, client CPU): both the last CPU, or the first and the last with `split`.
///
/// One CPU by default: the loops are then CPU-bound, so every nanosecond a probe adds in the
/// kernel shows in the figures. On two CPUs each connection waits for cross-CPU wake-ups
/// (inter-processor interrupts, which a VM makes slow: about half the conn/s here), and that
/// waiting hides part of the probe's cost. The agent's own threads run on the other CPUs
/// either way; their cost is the "agent cpu" column.
fn cpus(split: bool) -> (usize, usize) {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    (if split { 0 } else { n - 1 }, n - 1)
}

/// Pins the calling thread to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: sched_setaffinity on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("bench: could not pin to CPU {cpu}");
        }
    }
}

/// Connect/accept/close loop for `dur`: (connections per second, connects made, failures).
///
/// Ports: ~20k connections a second would exhaust the ephemeral range (28k ports) within two
/// seconds if the client's sockets sat in TIME_WAIT. So the *server* closes first: it accepts
/// and closes at once, the client reads the FIN (EOF) and then closes. Both are ordinary
/// closes (FIN, no SO_LINGER 0), but the active closer, which keeps TIME_WAIT, is the server,
/// and its TIME_WAIT entries (127.0.0.1:listen -> 127.0.0.1:client) never block the client
/// from picking a port again: a new SYN to a TIME_WAIT entry with a newer sequence number and
/// timestamp takes it over (RFC 6191), whatever net.ipv4.tcp_tw_reuse says. No sysctl is
/// changed, and each run listens on a fresh port.
fn conn_loop(dur: Duration, (server_cpu, client_cpu): (usize, usize)) -> Result<(f64, u64, u64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        thread::spawn(move || {
            pin(server_cpu);
            for s in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // Accept and close: the server sends the first FIN.
                drop(s);
            }
        })
    };
    let client = thread::spawn(move || {
        pin(client_cpu);
        let (mut made, mut errors) = (0u64, 0u64);
        let mut byte = [0u8; 1];
        let t = Instant::now();
        while t.elapsed() < dur {
            made += 1;
            match TcpStream::connect(addr) {
                // Wait for the server's FIN, then close (passive close: no TIME_WAIT here).
                Ok(mut s) => match s.read(&mut byte) {
                    Ok(0) => {}
                    _ => errors += 1,
                },
                Err(_) => errors += 1,
            }
        }
        (made, errors, t.elapsed())
    });
    let res = client.join();
    stop.store(true, Ordering::Relaxed);
    // Wakes the server's accept so that it sees `stop`.
    let _ = TcpStream::connect(addr);
    server
        .join()
        .map_err(|_| anyhow!("conn loop server panicked"))?;
    let (made, errors, wall) = res.map_err(|_| anyhow!("conn loop client panicked"))?;
    Ok(((made - errors) as f64 / wall.as_secs_f64(), made, errors))
}

/// One connection, the client writes 256 KiB buffers for `dur`, the server reads and discards:
/// GB/s (10^9 bytes) received by the server while the client was writing.
fn bulk(dur: Duration, (server_cpu, client_cpu): (usize, usize)) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<u64> {
        pin(server_cpu);
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; BULK_BUF];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let client = thread::spawn(move || -> std::io::Result<(u64, Duration)> {
        pin(client_cpu);
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0xa5u8; BULK_BUF];
        // Untimed: let the socket buffers grow (autotuning) before the clock starts.
        let warm = Instant::now();
        while warm.elapsed() < BULK_WARMUP {
            s.write_all(&buf)?;
        }
        let mut sent = 0u64;
        let t = Instant::now();
        while t.elapsed() < dur {
            s.write_all(&buf)?;
            sent += BULK_BUF as u64;
        }
        Ok((sent, t.elapsed()))
    });
    let (sent, wall) = client
        .join()
        .map_err(|_| anyhow!("bulk client panicked"))?
        .context("bulk client")?;
    let received = server
        .join()
        .map_err(|_| anyhow!("bulk server panicked"))?
        .context("bulk server")?;
    if received < sent {
        return Err(anyhow!("bulk: sent {sent} bytes, received {received}"));
    }
    // Sent bytes over the writing time: at most a socket buffer (a few MB) was still in
    // flight when the clock stopped, well under 1% of a run.
    Ok(sent as f64 / wall.as_secs_f64() / 1e9)
}

/// One run of the conn loop and, with `with_bulk`, the bulk transfer; `ours` is the tracer this
/// bench started for it.
fn measure(o: &Opts, ours: Option<u32>, with_bulk: bool) -> Result<Sample> {
    measure_with_bpf(o, ours, with_bulk, None).map(|(s, _)| s)
}

/// `measure`, and with `bpf_prefix` the run time of those programs during the conn loop, per
/// connection.
fn measure_with_bpf(
    o: &Opts,
    ours: Option<u32>,
    with_bulk: bool,
    bpf_prefix: Option<&str>,
) -> Result<(Sample, f64)> {
    let mut foreign = crate::util::foreign_tracers(ours);
    let bpf_before = bpf_prefix.map(bpf_run_time);
    let (conn_per_s, conns, conn_errors) = conn_loop(o.conn, cpus(o.split_cpus))?;
    let bpf_ns_per_conn = match (bpf_prefix, bpf_before) {
        (Some(p), Some((t0, _))) if conns > 0 => {
            let (t1, _) = bpf_run_time(p);
            if t1 > t0 {
                (t1 - t0) as f64 / conns as f64
            } else {
                f64::NAN
            }
        }
        _ => f64::NAN,
    };
    let bulk_gbps = if with_bulk {
        bulk(o.bulk, cpus(o.split_cpus))?
    } else {
        f64::NAN
    };
    foreign.extend(crate::util::foreign_tracers(ours));
    foreign.sort();
    foreign.dedup();
    Ok((
        Sample {
            conn_per_s,
            conns,
            conn_errors,
            bulk_gbps,
            foreign,
        },
        bpf_ns_per_conn,
    ))
}

fn with_agent(o: &Opts, extra: &str) -> Result<AgentRun> {
    let mut agent = start_agent("auto", extra, &[NET_PROBE])?;
    let pid = agent.child.id();
    let before = usage(pid);
    // Kernel run-time statistics while the fd is open (two clock reads per program run: a
    // few percent of what they measure here).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let t = Instant::now();
    let measured = measure_with_bpf(o, Some(pid), true, Some("isa_net"));
    drop(stats);
    let (sample, bpf_ns_per_conn) = match measured {
        Ok((s, b)) => (Ok(s), b),
        Err(e) => (Err(e), f64::NAN),
    };
    let wall = t.elapsed().as_secs_f64();
    let after = usage(pid);
    let running = agent.check_running();
    agent.stop();
    running?;
    let sample = sample?;
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (cpu_pct, rss_kib) = match (before, after) {
        (Some(b), Some(a)) => (
            a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64 / tps / wall * 100.0,
            a.rss_kib,
        ),
        _ => (f64::NAN, 0),
    };
    Ok(AgentRun {
        sample,
        cpu_pct,
        rss_kib,
        bpf_ns_per_conn,
    })
}

/// The conn loop only: the tracer hooks connection state changes, which a bulk transfer does
/// not make (and the time is better spent on more rounds).
fn with_bpftrace(o: &Opts) -> Result<BtRun> {
    let bt = Bpftrace::start(BPFTRACE_PROG)?;
    let sample = measure(o, Some(bt.pid()), false);
    let out = bt.stop();
    Ok(BtRun {
        sample: sample?,
        traced: hist_total(&out),
    })
}

/// Sum of the counts in bpftrace's printed histograms ("[8K, 16K)   1234 |@@@   |").
fn hist_total(out: &str) -> u64 {
    out.lines()
        .filter(|l| l.starts_with('['))
        .filter_map(|l| {
            l.split_once(')')?
                .1
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// CPU ticks used so far by every process but this one (live processes, plus the children
/// they have reaped), to tell how busy the machine was with other work during the bench. Our
/// own agent and bpftrace children are reaped by us, so they are not counted.
fn others_cpu_ticks() -> u64 {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.bytes().all(|b| b.is_ascii_digit()) && name != me.as_str()
        })
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // utime, stime, cutime, cstime: [11..=14] after "comm)".
            f.get(11..=14)?
                .iter()
                .map(|v| v.parse::<u64>().ok())
                .sum::<Option<u64>>()
        })
        .sum()
}

pub fn run(o: Opts) -> Result<()> {
    let rounds = o.rounds.max(1) as usize;
    let (server_cpu, client_cpu) = cpus(o.split_cpus);
    let mut extra = String::new();
    if o.no_syscalls_probe {
        // Still inside the [syscalls] table the agent's config starts with.
        extra.push_str("enabled = false\n");
    }
    extra.push_str(&format!(
        "[agent]\nkernel_log = \"{}\"\n",
        o.kernel_log.as_str()
    ));
    extra.push_str(NET_CONFIG);
    let pinning = if server_cpu == client_cpu {
        format!("client and server on CPU {client_cpu}")
    } else {
        format!("server on CPU {server_cpu}, client on CPU {client_cpu}")
    };
    println!(
        "bench net: loopback TCP, {pinning}; {rounds} rounds of [baseline, agent, bpftrace] + a closing baseline; \
         per run: conn loop {:.1}s, bulk {:.1}s",
        o.conn.as_secs_f64(),
        o.bulk.as_secs_f64()
    );
    println!(
        "agent config: defaults, syscalls probe {}, kernel_log {}, with [net] enabled = true",
        if o.no_syscalls_probe { "off" } else { "on" },
        o.kernel_log.as_str(),
    );

    // SAFETY: sysconf has no preconditions.
    let (tps, ncpu) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as f64,
        )
    };
    let others_before = others_cpu_ticks();
    let started = Instant::now();

    // Warm-up, not reported: first-run effects (page faults, frequency, caches).
    measure(
        &Opts {
            conn: Duration::from_millis(500),
            bulk: Duration::from_millis(500),
            ..o
        },
        None,
        true,
    )?;

    let mut base = Vec::with_capacity(rounds + 1);
    let mut agent = Vec::with_capacity(rounds);
    let mut bt = Vec::with_capacity(rounds);
    eprint!("bench net: round");
    for r in 1..=rounds {
        eprint!(" {r}/{rounds}");
        base.push(measure(&o, None, true)?);
        // Once more if the agent exited mid-run (on a shared machine something else may signal
        // it); a second exit, or an agent that does not start, ends the bench.
        agent.push(match with_agent(&o, &extra) {
            Err(e) if e.to_string().contains(crate::bench::EXITED_DURING_RUN) => {
                eprintln!("\nbench net: retrying the agent run once: {e:#}");
                with_agent(&o, &extra)?
            }
            other => other?,
        });
        bt.push(with_bpftrace(&o)?);
    }
    base.push(measure(&o, None, true)?);
    let others_pct = others_cpu_ticks().saturating_sub(others_before) as f64
        / tps
        / started.elapsed().as_secs_f64()
        / ncpu
        * 100.0;
    eprintln!(" done");

    // A run against the mean of the baselines before and after it.
    let ratio =
        |r: usize, v: f64, f: fn(&Sample) -> f64| v / ((f(&base[r]) + f(&base[r + 1])) / 2.0);
    let conn_of = |s: &Sample| s.conn_per_s;
    let bulk_of = |s: &Sample| s.bulk_gbps;
    // Rounds with a foreign tracer in any of their runs (or the closing baseline) get a "*".
    let runs_of = |r: usize| [&base[r], &agent[r].sample, &bt[r].sample, &base[r + 1]];
    let mark = |r: usize| {
        if runs_of(r).iter().any(|s| !s.foreign.is_empty()) {
            " *"
        } else {
            ""
        }
    };
    let mut foreign: Vec<&str> = (0..rounds)
        .flat_map(runs_of)
        .flat_map(|s| s.foreign.iter().map(String::as_str))
        .collect();
    foreign.sort_unstable();
    foreign.dedup();

    println!();
    println!(
        "connect/accept/close loop, conn/s (ratio: vs. the mean of the baselines before and after)"
    );
    println!(
        "  {:>5} {:>10} {:>10} {:>6} {:>10} {:>6} {:>9} {:>11} {:>12}",
        "round",
        "baseline",
        "agent",
        "ratio",
        "bpftrace",
        "ratio",
        "agent cpu",
        "agent rss",
        "bpf ns/conn"
    );
    let (mut agent_conn, mut bt_conn, mut agent_bulk) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let a = ratio(r, agent[r].sample.conn_per_s, conn_of);
        let b = ratio(r, bt[r].sample.conn_per_s, conn_of);
        agent_conn.push(a);
        bt_conn.push(b);
        println!(
            "  {:>5} {:>10.0} {:>10.0} {a:>6.3} {:>10.0} {b:>6.3} {:>8.1}% {:>7} KiB {:>12.0}{}",
            r + 1,
            base[r].conn_per_s,
            agent[r].sample.conn_per_s,
            bt[r].sample.conn_per_s,
            agent[r].cpu_pct,
            agent[r].rss_kib,
            agent[r].bpf_ns_per_conn,
            mark(r)
        );
    }
    println!("  {:>5} {:>10.0}", "close", base[rounds].conn_per_s);

    println!();
    println!("bulk transfer, one connection, 256 KiB writes, GB/s (not run under bpftrace)");
    println!(
        "  {:>5} {:>10} {:>10} {:>6}",
        "round", "baseline", "agent", "ratio"
    );
    for r in 0..rounds {
        let a = ratio(r, agent[r].sample.bulk_gbps, bulk_of);
        agent_bulk.push(a);
        println!(
            "  {:>5} {:>10.3} {:>10.3} {a:>6.3}{}",
            r + 1,
            base[r].bulk_gbps,
            agent[r].sample.bulk_gbps,
            mark(r)
        );
    }
    println!("  {:>5} {:>10.3}", "close", base[rounds].bulk_gbps);

    // Noise: how far apart the baselines were, and how far a ratio between two neighbouring
    // baselines (which should be 1) came out from 1. A difference from 1 that is not larger than
    // that is not measurable.
    let base_conn: Vec<f64> = base.iter().map(conn_of).collect();
    let base_bulk: Vec<f64> = base.iter().map(bulk_of).collect();
    // (typical |ratio - 1|, largest |ratio - 1|) over neighbouring baselines.
    let null = |v: &[f64]| {
        let d: Vec<f64> = v.windows(2).map(|w| (w[1] / w[0] - 1.0).abs()).collect();
        (median(d.clone()), d.into_iter().fold(0.0, f64::max))
    };
    let (cs, cmin, cmax) = spread(&base_conn);
    let (bs, bmin, bmax) = spread(&base_bulk);
    let (cn, cn_max) = null(&base_conn);
    let (bn, bn_max) = null(&base_bulk);
    println!();
    println!(
        "noise: {} baselines spread {:.1}% in conn/s ({cmin:.0}..{cmax:.0}) and {:.1}% in bulk \
         ({bmin:.3}..{bmax:.3} GB/s);",
        base.len(),
        cs * 100.0,
        bs * 100.0
    );
    println!(
        "       neighbouring baselines differ by {:.1}% typically, {:.1}% at most (conn/s), \
         {:.1}% and {:.1}% (bulk)",
        cn * 100.0,
        cn_max * 100.0,
        bn * 100.0,
        bn_max * 100.0
    );
    println!(
        "       other processes used {others_pct:.1}% of the machine's {ncpu} CPUs during the \
         bench{}",
        if others_pct > 5.0 {
            " (busy: the figures are disturbed; rerun on a quiet machine)"
        } else {
            ""
        }
    );

    if !foreign.is_empty() {
        let count = |comm: &str| {
            foreign
                .iter()
                .filter(|f| f.split(' ').next() == Some(comm))
                .count()
        };
        println!(
            "     * tracers this bench did not start ran during these rounds ({} other \
             insite-agent and {} other bpftrace processes): they hook the baseline runs too, \
             so these rounds' ratios are unreliable",
            count("insite-agent"),
            count("bpftrace")
        );
    }

    let errors: u64 = base
        .iter()
        .chain(agent.iter().map(|a| &a.sample))
        .chain(bt.iter().map(|b| &b.sample))
        .map(|s| s.conn_errors)
        .sum();
    // Each bpftrace run also makes the server's wake-up connect.
    let made: u64 = bt.iter().map(|b| b.sample.conns + 1).sum();
    let traced: u64 = bt.iter().map(|b| b.traced).sum();
    let cpu = median(agent.iter().map(|a| a.cpu_pct).collect());
    let rss = agent.iter().map(|a| a.rss_kib).max().unwrap_or(0);
    // The in-kernel share: BPF time per connection against the CPU time a connection takes
    // without the agent (the loop is CPU-bound on one CPU: 1 / baseline conn/s). It has none
    // of the throughput's VM noise.
    let bpf_ns = median(agent.iter().map(|a| a.bpf_ns_per_conn).collect());
    let base_ns = 1e9 / median(base.iter().map(|b| b.conn_per_s).collect());
    println!(
        "in-kernel cost: the network programs ran {bpf_ns:.0} ns per connection (median, \
         kernel.bpf_stats), {:.2}% of the {base_ns:.0} ns a baseline connection takes",
        bpf_ns / base_ns * 100.0
    );
    println!(
        "checks: {errors} failed connects in all runs; bpftrace's histogram counted {traced} \
         connects (host-wide) while its runs made {made}; agent cpu {cpu:.1}% (median), \
         rss {rss} KiB (max)"
    );

    let (ac, bc, ab) = (
        median(agent_conn.clone()),
        median(bt_conn.clone()),
        median(agent_bulk.clone()),
    );
    let (uac, ubc, uab) = (
        uncertainty(&agent_conn),
        uncertainty(&bt_conn),
        uncertainty(&agent_bulk),
    );
    println!();
    println!(
        "summary (median of per-round ratios ± ~95% uncertainty): conn/s ratio agent/baseline \
         {ac:.3} ± {uac:.3} (target >= 0.97), bpftrace/baseline {bc:.3} ± {ubc:.3}; \
         bulk ratio agent/baseline {ab:.3}x ± {uab:.3} (target: no measurable loss)"
    );
    let conn_verdict = if ac - uac >= 0.97 {
        "met".to_string()
    } else if ac + uac < 0.97 {
        "NOT met".to_string()
    } else {
        format!(
            "undecided at this noise ({:.3}..{:.3} includes 0.97): more --rounds or a quieter \
             machine",
            ac - uac,
            ac + uac
        )
    };
    let bulk_verdict = if ab + uab >= 1.0 {
        "no measurable loss".to_string()
    } else {
        format!("a measurable loss of {:.1}%", (1.0 - ab) * 100.0)
    };
    println!("verdict: conn/s target {conn_verdict}; bulk: {bulk_verdict}");
    Ok(())
}
