//! `cargo xtask bench web`: what the agent costs a host that runs no database, in one run.
//!
//! nginx from Debian (2 workers, a 1 KiB static page, no access log) under `wrk -t2 -c32`
//! over loopback: the requests per second without the agent, with its default config (every
//! probe on), and with each probe family alone (the syscall probe also in full mode). As in
//! `bench net`, configurations are interleaved in short runs, each compared with the mean of
//! the baselines just before and after it, and the summary is the median over rounds with a
//! rough 95% uncertainty. `--bpf-stats` adds the kernel programs' run time per request, by
//! family.

use std::{
    io::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::bench::{bpf_run_time, median, spread, start_agent, uncertainty, usage};

#[derive(Clone)]
pub struct Opts {
    pub rounds: u32,
    pub seconds: u32,
    pub connections: u32,
    pub bpf_stats: bool,
}

/// A configuration measured in every round: its name and the agent's config (appended to its
/// `[syscalls]` section), or None for no agent.
const CONFIGS: &[(&str, Option<&str>)] = &[
    ("no agent", None),
    ("agent, default config", Some("")),
    (
        "syscalls alone (sampled)",
        Some("[net]\nenabled = false\n[db]\nenabled = false\n"),
    ),
    (
        "syscalls alone (full)",
        Some("mode = \"full\"\n[net]\nenabled = false\n[db]\nenabled = false\n"),
    ),
    (
        "net alone",
        Some("enabled = false\n[db]\nenabled = false\n"),
    ),
    (
        "db alone",
        Some("enabled = false\n[net]\nenabled = false\n"),
    ),
];

struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Nginx {
    fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("insite-bench-web-{}", std::process::id()));
        let www = dir.join("www");
        std::fs::create_dir_all(&www)?;
        let page: String = "insite-agent bench page\n".repeat(1024 / 24 + 1);
        std::fs::write(www.join("index.html"), &page.as_bytes()[..1024])?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let d = dir.display();
        // Every path nginx writes is in `dir`: nothing of the system's nginx is used.
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; root {d}/www; location / {{ }} }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let child = Command::new(nginx_bin())
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (cargo xtask setup --tests installs it)")?;
        let mut n = Self { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if n.child.try_wait()?.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(n.dir.join("error.log")).unwrap_or_default();
                n.stop();
                bail!("nginx did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(n)
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child (SIGQUIT: graceful shutdown of every worker).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

fn nginx_bin() -> &'static Path {
    let sbin = Path::new("/usr/sbin/nginx");
    if sbin.exists() {
        sbin
    } else {
        Path::new("nginx")
    }
}

/// One wrk run: (requests per second, requests).
fn wrk(o: &Opts, port: u16) -> Result<(f64, u64)> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{}", o.connections)])
        .arg(format!("-d{}s", o.seconds))
        .arg(format!("http://127.0.0.1:{port}/index.html"))
        .output()
        .context("running wrk (cargo xtask setup --tests installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((rps, requests))
}

struct Run {
    rps: f64,
    cpu_pct: f64,
    /// BPF run time per request by family (syscalls, net, db), with --bpf-stats.
    bpf_ns: [f64; 3],
}

const FAMILIES: [(&str, &str); 3] = [
    ("syscalls", "isa_btf_"),
    ("net", "isa_net"),
    ("db", "isa_db"),
];

fn run_one(o: &Opts, port: u16, extra: Option<&str>) -> Result<Run> {
    let Some(extra) = extra else {
        let (rps, _) = wrk(o, port)?;
        return Ok(Run {
            rps,
            cpu_pct: 0.0,
            bpf_ns: [f64::NAN; 3],
        });
    };
    let mut agent = start_agent("auto", extra, &[])?;
    let pid = agent.child.id();
    let before = usage(pid);
    let stats = if o.bpf_stats {
        aya::sys::enable_stats(aya::sys::Stats::RunTime).ok()
    } else {
        None
    };
    let bpf_before = FAMILIES.map(|(_, p)| bpf_run_time(p).0);
    let t = Instant::now();
    let measured = wrk(o, port);
    let wall = t.elapsed().as_secs_f64();
    let bpf_after = FAMILIES.map(|(_, p)| bpf_run_time(p).0);
    drop(stats);
    let after = usage(pid);
    let running = agent.check_running();
    agent.stop();
    running?;
    let (rps, requests) = measured?;
    // SAFETY: sysconf has no preconditions.
    let tps = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_pct = match (before, after) {
        (Some(b), Some(a)) => a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64 / tps / wall * 100.0,
        _ => f64::NAN,
    };
    let mut bpf_ns = [f64::NAN; 3];
    if o.bpf_stats && requests > 0 {
        for (i, ns) in bpf_ns.iter_mut().enumerate() {
            *ns = bpf_after[i].saturating_sub(bpf_before[i]) as f64 / requests as f64;
        }
    }
    Ok(Run {
        rps,
        cpu_pct,
        bpf_ns,
    })
}

pub fn run(o: Opts) -> Result<()> {
    let others = crate::util::foreign_tracers(None);
    if !others.is_empty() {
        eprintln!("bench web: other tracers are running and slow every run: {others:?}");
    }
    let mut nginx = Nginx::start()?;
    println!(
        "bench web: nginx (2 workers, 1 KiB page, port {}) under wrk -t2 -c{} -d{}s, {} rounds",
        nginx.port, o.connections, o.seconds, o.rounds
    );
    // Warm nginx and the page cache.
    wrk(
        &Opts {
            seconds: 1,
            ..o.clone()
        },
        nginx.port,
    )?;
    let rounds = o.rounds.max(1) as usize;
    let mut baselines: Vec<f64> = Vec::new();
    let mut runs: Vec<Vec<Run>> = (1..CONFIGS.len()).map(|_| Vec::new()).collect();
    // Each round: a baseline, then every agent configuration; a closing baseline at the end.
    // A run is compared with the mean of the baselines that bracket its round.
    for round in 0..rounds {
        baselines.push(run_one(&o, nginx.port, None)?.rps);
        for (i, (name, extra)) in CONFIGS.iter().enumerate().skip(1) {
            let r = run_one(&o, nginx.port, *extra)?;
            print!("  round {}: {name:<26} {:>9.0} req/s", round + 1, r.rps);
            if r.cpu_pct.is_finite() {
                print!("  agent cpu {:>5.1}%", r.cpu_pct);
            }
            println!();
            let _ = std::io::stdout().flush();
            runs[i - 1].push(r);
        }
    }
    baselines.push(run_one(&o, nginx.port, None)?.rps);
    nginx.stop();

    let (bspread, bmin, bmax) = spread(&baselines);
    println!(
        "baseline: median {:.0} req/s, {bmin:.0} .. {bmax:.0} ({:.0}% spread)",
        median(baselines.clone()),
        bspread * 100.0
    );
    println!(
        "  {:<26} {:>16} {:>10}{}",
        "configuration",
        "agent / baseline",
        "agent cpu",
        if o.bpf_stats {
            "   BPF ns per request: syscalls, net, db"
        } else {
            ""
        }
    );
    for (i, (name, _)) in CONFIGS.iter().enumerate().skip(1) {
        let rs = &runs[i - 1];
        let ratios: Vec<f64> = rs
            .iter()
            .enumerate()
            .map(|(round, r)| r.rps / ((baselines[round] + baselines[round + 1]) / 2.0))
            .collect();
        let cpu = median(rs.iter().map(|r| r.cpu_pct).collect());
        print!(
            "  {name:<26} {:>8.3} ± {:<5.3} {:>9.1}%",
            median(ratios.clone()),
            uncertainty(&ratios),
            cpu
        );
        if o.bpf_stats {
            for f in 0..FAMILIES.len() {
                let v = median(rs.iter().map(|r| r.bpf_ns[f]).collect());
                if v.is_finite() && v > 0.0 {
                    print!("  {v:>8.0}");
                } else {
                    print!("  {:>8}", "-");
                }
            }
        }
        println!();
    }
    println!("target: the default config at least 0.97 of the baseline");
    Ok(())
}
