//! What a run prints: CPU ticks, the verdict against the target, counts per operation.

use super::*;

/// (CPU ticks the whole machine spent busy, ticks of this bench and its descendants: servers,
/// clients, agents, also those reaped), so that the difference of two readings is what other
/// processes used in between. Summing every other process's own times
/// instead would be wrong: a parent that reaps a long build during the bench gets all of the
/// build's time, most of it from before, added at once.
pub(crate) fn cpu_ticks() -> (u64, u64) {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .lines()
                .next()?
                .strip_prefix("cpu ")?
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // user, nice, system, irq, softirq: with tick-based accounting a tick in irq or
            // softirq context is also charged to the task it interrupted (as system time).
            // idle, iowait and steal are not; guest is part of user.
            Some(f.get(..3)?.iter().sum::<u64>() + f.get(5..7)?.iter().sum::<u64>())
        })
        .unwrap_or(0);
    let me = std::process::id();
    let mut procs: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(Result::ok) {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some((_, after)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = after.split_whitespace().collect();
            // ppid [1]; utime, stime, cutime, cstime [11..=14] after "comm)".
            let ppid = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let ticks = f
                .get(11..=14)
                .and_then(|v| v.iter().map(|x| x.parse::<u64>().ok()).sum::<Option<u64>>())
                .unwrap_or(0);
            procs.insert(pid, (ppid, ticks));
        }
    }
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match procs.get(&pid) {
                Some((ppid, _)) if *ppid != 0 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let own = procs
        .iter()
        .filter(|(pid, _)| ours(**pid))
        .map(|(_, (_, t))| *t)
        .sum();
    (machine, own)
}

/// The verdict on `TARGET` for per-round ratios with mean `m` and interval ±`u`: (short, with
/// the reason).
pub(crate) fn verdict(m: f64, u: f64) -> (&'static str, String) {
    if u.is_nan() {
        return if m >= TARGET {
            ("met?", "met (one round: no interval)".to_string())
        } else {
            ("MISSED?", "MISSED (one round: no interval)".to_string())
        };
    }
    if m - u >= TARGET {
        ("met", format!("met (the whole interval is above {TARGET})"))
    } else if m + u < TARGET {
        (
            "MISSED",
            format!("MISSED (the whole interval is below {TARGET})"),
        )
    } else if m >= TARGET {
        (
            "met? (within noise)",
            format!(
                "met on the mean, but not clearly: the noise (±{u:.3}) is larger than the \
                 margin ({:+.3}); more --rounds or a quieter machine",
                m - TARGET
            ),
        )
    } else {
        (
            "missed? (within noise)",
            format!(
                "missed on the mean, but not clearly: the noise (±{u:.3}) is larger than the \
                 shortfall ({:+.3}); more --rounds or a quieter machine",
                m - TARGET
            ),
        )
    }
}

pub(crate) fn fmt_ops(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "nothing".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

// ---------------------------------------------------------------------------------------------
// The bench
// ---------------------------------------------------------------------------------------------
