//! `cargo xtask bench syscalls`: the added ns per syscall of the agent's syscall probe
//! against bpftrace's, on a getppid loop.

use super::*;

pub(crate) const BPFTRACE_PROG: &str = "tracepoint:raw_syscalls:sys_enter { @s[tid] = nsecs; } tracepoint:raw_syscalls:sys_exit /@s[tid]/ { @h[args->id] = hist(nsecs - @s[tid]); delete(@s[tid]); }";

/// ns per getppid call: the fastest of `rounds` loops of `calls` calls.
pub(crate) fn getppid_loop(calls: u64, rounds: u32) -> f64 {
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
pub(crate) fn getppid_mean(d: Duration) -> f64 {
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

pub(crate) fn with_agent(
    attach: &str,
    extra: &str,
    calls: u64,
    rounds: u32,
) -> Result<(f64, f64, u64)> {
    let mut agent = start_agent(attach, extra, &[])?;
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

pub(crate) fn with_bpftrace(calls: u64, rounds: u32) -> Result<f64> {
    let bt = Bpftrace::start(BPFTRACE_PROG)?;
    let ns = getppid_loop(calls, rounds);
    bt.stop();
    Ok(ns)
}

/// Keeps the loop on one CPU (no migrations mid-measurement); the agent and bpftrace are
/// started before pinning and run wherever the scheduler puts them.
pub(crate) fn pin_to_last_cpu() {
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

pub(crate) fn syscalls(calls: u64, rounds: u32) -> Result<()> {
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
        let mut agent = start_agent("tp_btf", "", &[])?;
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
