//! `cargo xtask bench soak --minutes N`: the agent with every probe on (the default config)
//! under a mixed workload for N minutes, its RSS and open file descriptors sampled every 10 s.
//! Not a test: it prints a table and a verdict (RSS flat within ±10% after the warm-up, no fd
//! growth).
//!
//! The workload, all at once, all the time: a getppid loop (syscalls), loopback connects
//! (network), redis-benchmark plain and pipelined, pgbench -S and mysqlslap against private
//! servers (the three databases, TCP and unix sockets), a scrape every second in both formats,
//! and the CLI's views every two seconds. The servers are the end-to-end tests' fixtures
//! (insite_e2e::servers).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use insite_e2e::{
    servers::{Mariadb, Postgres, Redis, Via},
    Agent,
};

pub struct Opts {
    pub minutes: f64,
    pub sample_every: Duration,
    /// The first samples that do not count: caches and tables filling up.
    pub warm_up: Duration,
}

struct Sample {
    at: Duration,
    rss_kib: u64,
    heap_kib: u64,
    fds: usize,
    cpu_pct: f64,
    ticks: u64,
    work: u64,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields after the comm: state is 0, utime 11, stime 12.
    n(11) + n(12)
}

/// Runs `f` again and again until `stop`, counting the rounds in `work`.
fn repeat(
    stop: &Arc<AtomicBool>,
    work: &Arc<AtomicU64>,
    mut f: impl FnMut() + Send + 'static,
) -> JoinHandle<()> {
    let (stop, work) = (stop.clone(), work.clone());
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            f();
            work.fetch_add(1, Ordering::Relaxed);
        }
    })
}

pub fn run(o: Opts) -> Result<()> {
    let total = Duration::from_secs_f64(o.minutes * 60.0);
    println!("bench soak: starting PostgreSQL, MariaDB and Redis...");
    let pg = Arc::new(Postgres::start().context("starting PostgreSQL")?);
    let my = Arc::new(Mariadb::start().context("starting MariaDB")?);
    let redis = Arc::new(Redis::start().context("starting Redis")?);
    let init = pg.pgbench(Via::Unix, &["-i", "-q", "-s", "2"])?;
    anyhow::ensure!(init.status.success(), "pgbench -i: {init:?}");
    println!("bench soak: starting the agent (default config, every probe on)...");
    let agent = Agent::start("");
    let pid = agent.pid();
    let (port, socket) = (agent.port, agent.socket.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let work = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    threads.push(repeat(&stop, &work, || {
        for _ in 0..20_000 {
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }));
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop2 = stop.clone();
        threads.push(std::thread::spawn(move || {
            listener.set_nonblocking(true).ok();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }));
        threads.push(repeat(&stop, &work, move || {
            for _ in 0..50 {
                let _ = std::net::TcpStream::connect(addr);
            }
            std::thread::sleep(Duration::from_millis(100));
        }));
    }
    {
        let r = redis.clone();
        threads.push(repeat(&stop, &work, move || {
            let _ = r.benchmark(Via::Tcp, &["-n", "20000", "-c", "4", "-q", "-t", "get,set"]);
            let _ = r.benchmark(
                Via::Unix,
                &[
                    "-n",
                    "20000",
                    "-c",
                    "2",
                    "-P",
                    "16",
                    "-q",
                    "-t",
                    "get,set,incr",
                ],
            );
            std::thread::sleep(Duration::from_millis(500));
        }));
    }
    {
        let p = pg.clone();
        threads.push(repeat(&stop, &work, move || {
            let _ = p.pgbench(Via::Unix, &["-S", "-c", "2", "-T", "5", "-n"]);
            let _ = p.pgbench(
                Via::Tcp,
                &["-S", "-c", "1", "-T", "2", "-n", "-M", "prepared"],
            );
            std::thread::sleep(Duration::from_millis(500));
        }));
    }
    {
        let m = my.clone();
        threads.push(repeat(&stop, &work, move || {
            let _ = m.mysqlslap(
                Via::Tcp,
                &[
                    "--auto-generate-sql",
                    "--number-of-queries=200",
                    "--concurrency=2",
                    "--iterations=1",
                ],
            );
            std::thread::sleep(Duration::from_secs(1));
        }));
    }
    {
        let mut om = false;
        threads.push(repeat(&stop, &work, move || {
            let _ = insite_e2e::scrape(port, om);
            om = !om;
            std::thread::sleep(Duration::from_secs(1));
        }));
    }
    threads.push(repeat(&stop, &work, move || {
        for args in [
            &["status"][..],
            &["syscalls"][..],
            &["connections"][..],
            &["map", "--dot"][..],
            &["queries"][..],
        ] {
            let _ = std::process::Command::new(crate::util::agent_bin())
                .args(args)
                .arg("--control-socket")
                .arg(&socket)
                .output();
        }
        std::thread::sleep(Duration::from_secs(2));
    }));

    let tps = procfs_ticks_per_second();
    println!(
        "\n{:>7} {:>10} {:>10} {:>6} {:>7} {:>8} {:>8}",
        "TIME", "RSS", "HEAP", "FDS", "CPU", "TICKS", "ROUNDS"
    );
    let t0 = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut last_cpu = (Instant::now(), cpu_ticks(pid));
    while t0.elapsed() < total {
        std::thread::sleep(o.sample_every.min(total.saturating_sub(t0.elapsed())));
        let (now, cpu) = (Instant::now(), cpu_ticks(pid));
        let cpu_pct =
            (cpu - last_cpu.1) as f64 / tps / now.duration_since(last_cpu.0).as_secs_f64() * 100.0;
        last_cpu = (now, cpu);
        let ticks = agent
            .request(r#"{"cmd":"status"}"#)
            .ok()
            .and_then(|v| v["data"]["ticks"].as_u64())
            .unwrap_or(0);
        let heap_kib = scrape_heap(port).unwrap_or(0) / 1024;
        let s = Sample {
            at: t0.elapsed(),
            rss_kib: rss_kib(pid),
            heap_kib,
            fds: fds(pid),
            cpu_pct,
            ticks,
            work: work.load(Ordering::Relaxed),
        };
        println!(
            "{:>6.0}s {:>7.1} MiB {:>6.1} MiB {:>6} {:>6.1}% {:>8} {:>8}",
            s.at.as_secs_f64(),
            s.rss_kib as f64 / 1024.0,
            s.heap_kib as f64 / 1024.0,
            s.fds,
            s.cpu_pct,
            s.ticks,
            s.work
        );
        samples.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }

    let warm_up = o.warm_up;
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at > warm_up).collect();
    if after.len() < 2 {
        println!(
            "\nbench soak: run longer than the {}s warm-up for a verdict",
            warm_up.as_secs()
        );
        return Ok(());
    }
    let rss: Vec<f64> = after.iter().map(|s| s.rss_kib as f64).collect();
    let mean = rss.iter().sum::<f64>() / rss.len() as f64;
    let (lo, hi) = rss
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let spread = ((hi - mean).max(mean - lo)) / mean * 100.0;
    let fd0 = after.first().map_or(0, |s| s.fds);
    let fd_max = after.iter().map(|s| s.fds).max().unwrap_or(0);
    let fd_end = after.last().map_or(0, |s| s.fds);
    let cpu = after.iter().map(|s| s.cpu_pct).sum::<f64>() / after.len() as f64;
    let heap: Vec<f64> = after.iter().map(|s| s.heap_kib as f64).collect();
    let heap_first = heap.first().copied().unwrap_or(0.0) / 1024.0;
    let heap_last = heap.last().copied().unwrap_or(0.0) / 1024.0;
    println!(
        "\nafter the {}s warm-up ({} samples): RSS mean {:.1} MiB, min {:.1}, max {:.1} \
         (±{spread:.1}%: {}); heap in use {heap_first:.1} -> {heap_last:.1} MiB; fds {fd0} -> \
         {fd_end} (max {fd_max}: {}); agent CPU {cpu:.1}%",
        warm_up.as_secs(),
        after.len(),
        mean / 1024.0,
        lo / 1024.0,
        hi / 1024.0,
        if spread <= 10.0 { "flat" } else { "NOT flat" },
        if fd_end <= fd0 + 2 {
            "no growth"
        } else {
            "GROWING"
        },
    );
    let m = agent.scrape();
    for name in [
        "insite_ringbuf_drops_total",
        "insite_agent_log_lines_dropped_total",
        "insite_agent_collect_errors_total",
        "insite_agent_http_connections_evicted_total",
    ] {
        println!("  {name}: {}", m.sum(name, &[]));
    }
    // Bounded tables that fill up over a run: growth the verdict sees may be one of them.
    for table in [
        "connections",
        "keys",
        "statements",
        "parse_cache",
        "kernel_stats",
    ] {
        println!(
            "  insite_db_collector_entries{{table=\"{table}\"}}: {}",
            m.sum("insite_db_collector_entries", &[("table", table)])
        );
    }
    for (name, labels) in [
        ("insite_tcp_active_connections", &[][..]),
        ("insite_db_connections_recognised_total", &[][..]),
    ] {
        println!("  {name}: {}", m.sum(name, labels));
    }
    Ok(())
}

/// The agent's heap in use (`insite_agent_heap_bytes{kind="in_use"}`), in bytes.
fn scrape_heap(port: u16) -> Option<u64> {
    let (_, body) = insite_e2e::scrape(port, false).ok()?;
    insite_e2e::Metrics(body)
        .value("insite_agent_heap_bytes", &[("kind", "in_use")])
        .map(|v| v as u64)
}

fn procfs_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
