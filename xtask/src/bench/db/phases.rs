//! One round: the workloads without the agent, then with it, each with its checks.

use super::*;

pub(crate) fn run_with_agent(
    fx: &Fixture,
    w: &Workload,
    secs: u32,
    agent: &mut Agent,
    bpf_stats: bool,
    roles: Roles,
) -> Result<AgentRun> {
    let dest = fx.destination(w);
    let system = w.system();
    let redis_before = match w.kind {
        Kind::Redis { .. } => Some(fx.redis_commandstats()?),
        Kind::Pg { .. } => None,
    };
    let m0 = settled(agent, &dest)?;
    let pid = agent.pid();
    let bpf0 = bpf_stats.then(|| bpf_run_time(pid)).flatten();
    let u0 = usage(pid);
    let t = Instant::now();
    let run = run_workload(fx, w, secs, Some(pid));
    let wall = t.elapsed().as_secs_f64();
    let u1 = usage(pid);
    let bpf1 = bpf_stats.then(|| bpf_run_time(pid)).flatten();
    let bpf_ns = bpf0.zip(bpf1).map(|(a, b)| b.saturating_sub(a));
    agent.check_running()?;
    let run = run?;
    let m1 = settled(agent, &dest)?;
    let redis_after = match w.kind {
        Kind::Redis { .. } => Some(fx.redis_commandstats()?),
        Kind::Pg { .. } => None,
    };

    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (cpu_pct, rss_kib) = match (u0, u1) {
        (Some(a), Some(b)) => (
            b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / tck / wall * 100.0,
            b.rss_kib,
        ),
        _ => (f64::NAN, 0),
    };

    let mut extra = BTreeMap::new();
    let mut tool_vs_server = None;
    let expected: BTreeMap<String, u64> = match (redis_before, redis_after) {
        (Some(before), Some(after)) => {
            // The before-INFO ran after the first read and is counted in the second; it was
            // sent before the counted window.
            let ran: BTreeMap<String, u64> = after
                .iter()
                .filter(|(op, _)| op.as_str() != "INFO")
                .map(|(op, n)| {
                    (
                        op.clone(),
                        n.saturating_sub(before.get(op).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            for (op, n) in &ran {
                match run.done.get(op) {
                    Some(d) if d != n => {
                        tool_vs_server = Some(format!(
                            "redis-benchmark completed {d} {op}, the server ran {n}"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        extra.insert(op.clone(), *n);
                    }
                }
            }
            ran
        }
        _ => {
            let mut e = run.done.clone();
            for (op, n) in PGBENCH_SETUP {
                *e.entry((*op).to_string()).or_insert(0) += n;
            }
            e
        }
    };
    let mut client = delta_by_op(&m0, &m1, system, "client", &dest);
    let mut server = delta_by_op(&m0, &m1, system, "server", &dest);
    // The bench's own INFO commandstats calls: the agent folds the kernel's counts every
    // 250 ms, so the one sent just before the run may be counted in it or before it.
    if matches!(w.kind, Kind::Redis { .. }) {
        client.remove("INFO");
        server.remove("INFO");
    }
    let errors = m1.sum("insite_db_query_errors_total", &[("destination", &dest)])
        - m0.sum("insite_db_query_errors_total", &[("destination", &dest)]);
    let kernel = KERNEL_COUNTERS
        .iter()
        .map(|(label, name, ring)| {
            let f: &[(&str, &str)] = if *ring { &[("ring", "db_events")] } else { &[] };
            let v = m1.has(name).then(|| m1.sum(name, f) - m0.sum(name, f));
            (*label, v)
        })
        .collect();
    let ring = [("ring", "db_events")];
    let ring_events =
        m1.sum("insite_ringbuf_events_total", &ring) - m0.sum("insite_ringbuf_events_total", &ring);
    Ok(AgentRun {
        run,
        wall,
        bpf_ns,
        cpu_pct,
        rss_kib,
        check: Check {
            expected,
            client,
            server,
            extra,
            tool_vs_server,
            errors,
            roles,
            kernel,
            ring_events,
        },
    })
}

/// One agent for the round, every workload with it.
pub(crate) fn agent_phase(
    fx: &Fixture,
    ws: &[Workload],
    o: &Opts,
    round: usize,
) -> Result<Vec<AgentRun>> {
    let _ = round;
    let mut agent = start_db_agent(o.keep_probes, o.roles)?;
    // Run-time statistics while the fd is open.
    let stats = if o.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling kernel.bpf_stats")?,
        )
    } else {
        None
    };
    let runs = ws
        .iter()
        .map(|w| {
            run_with_agent(fx, w, o.seconds, &mut agent, stats.is_some(), o.roles)
                .with_context(|| w.name())
        })
        .collect();
    drop(stats);
    runs
}

/// Nanoseconds the db programs of the agent `pid` have run (programs it holds an fd of, found
/// in /proc/<pid>/fdinfo, whose names start with `isa_db`; only entry programs count runs, a
/// tail-called walker's time is its caller's).
pub(crate) fn bpf_run_time(pid: u32) -> Option<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.insert(id);
        }
    }
    let ns = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("isa_db")))
        .map(|p| p.run_time().as_nanos() as u64)
        .sum();
    Some(ns)
}

pub(crate) fn baseline_phase(fx: &Fixture, ws: &[Workload], secs: u32) -> Result<Vec<Run>> {
    ws.iter()
        .map(|w| run_workload(fx, w, secs, None).with_context(|| w.name()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Machine noise
// ---------------------------------------------------------------------------------------------
