//! The syscall probe's families: latency histograms and errors per syscall (top N), and
//! what its sampling observed.

use super::*;

/// The syscall families.
pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    cfg: &Config,
) -> Result<(), std::fmt::Error> {
    let top_n = cfg.syscalls.top_n;
    if let Some(latest) = st.syscalls.latest() {
        let t = &latest.totals;
        let (rows, folded) = top_n_syscalls(&t.by_nr, top_n);
        // The mode says what the counts are: every call (full), or the calls made while
        // the hooks were attached (sampled; see insite_syscall_observed_seconds_total).
        let mode = t.mode.map_or("full", |m| m.as_str());
        let labels = |name: &String| {
            let mut v = l("syscall", name.clone());
            v.push(("mode".into(), mode.into()));
            v
        };
        histogram(
            e,
            "insite_syscall_duration",
            "Syscall latency (sys_enter to sys_exit), log2 buckets from the kernel; mode=\"sampled\": only calls made while the hooks were attached",
            rows.iter().map(|(name, c)| (labels(name), &c.latency)),
        )?;
        counter(
            e,
            "insite_syscall_errors",
            "Syscalls that returned an error (-errno); mode as insite_syscall_duration_seconds",
            None,
            rows.iter().map(|(name, c)| (labels(name), c.errors as f64)),
        )?;
        counter(
            e,
            "insite_syscall_observed",
            "Time the syscall hooks were attached: rate(insite_syscall_duration_seconds_count) / rate(this) estimates the host's call rate in sampled mode",
            Some(&Unit::Seconds),
            [(vec![], t.observed_ns as f64 / 1e9)],
        )?;
        gauge(
            e,
            "insite_syscall_hooks_attached",
            "1 while the syscall hooks are attached (always in full mode, during windows and traces in sampled mode)",
            None,
            [(l("mode", mode), if t.attached { 1.0 } else { 0.0 })],
        )?;
        gauge(
            e,
            "insite_syscall_series_folded",
            "Syscalls folded into syscall=\"other\" by the top-N bound",
            None,
            [(vec![], folded as f64)],
        )?;
        counter(
            e,
            "insite_syscall_untimed",
            "Syscalls not timed because their start could not be parked in task storage (allocation failed)",
            None,
            [(vec![], t.start_drops as f64)],
        )?;
    }
    counter(
        e,
        "insite_syscall_slow_calls_received",
        "Slow-call events received by the agent",
        None,
        [(vec![], st.slow_received as f64)],
    )?;
    Ok(())
}

/// The top `n` syscalls by count keep their label; the rest fold into `other`.
pub(super) fn top_n_syscalls(
    by_nr: &std::collections::BTreeMap<u32, SyscallCounters>,
    n: usize,
) -> (Vec<(String, SyscallCounters)>, usize) {
    let mut all: Vec<(u32, SyscallCounters)> = by_nr.iter().map(|(k, v)| (*k, *v)).collect();
    all.sort_by(|a, b| {
        b.1.latency
            .count
            .cmp(&a.1.latency.count)
            .then(a.0.cmp(&b.0))
    });
    let mut rows: Vec<(String, SyscallCounters)> = Vec::new();
    let mut other = SyscallCounters::default();
    let mut folded = 0;
    for (i, (nr, c)) in all.into_iter().enumerate() {
        if i < n {
            rows.push((syscall_names::label(nr), c));
        } else {
            other.add(&c);
            folded += 1;
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    if folded > 0 {
        rows.push(("other".to_string(), other));
    }
    (rows, folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_n_folds_into_other() {
        let mut m = std::collections::BTreeMap::new();
        for nr in 0..10u32 {
            let mut c = SyscallCounters::default();
            for _ in 0..=nr {
                c.latency.record(100);
            }
            m.insert(nr, c);
        }
        let (rows, folded) = top_n_syscalls(&m, 3);
        assert_eq!(folded, 7);
        assert_eq!(rows.len(), 4);
        let other = rows.iter().find(|r| r.0 == "other").unwrap();
        assert_eq!(other.1.latency.count, (1..=7).sum::<u64>());
        let (rows, folded) = top_n_syscalls(&m, 100);
        assert_eq!((rows.len(), folded), (10, 0));
    }
}
