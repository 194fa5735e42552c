//! What the syscall probe counts: per-syscall latency histograms and errors, cumulative since
//! the agent started, and the slow calls it reported.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{histogram::Log2Histogram, window::Cumulative};

/// Cumulative counters of one syscall.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyscallCounters {
    pub latency: Log2Histogram,
    pub errors: u64,
}

impl SyscallCounters {
    pub fn add(&mut self, other: &Self) {
        self.latency.add(&other.latency);
        self.errors += other.errors;
    }
}

/// Everything the syscall probe counts, cumulative since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyscallTotals {
    /// By syscall number; only syscalls seen at least once.
    pub by_nr: BTreeMap<u32, SyscallCounters>,
    /// Slow-call events the kernel wrote / could not write (ring buffer full).
    pub slow_events: u64,
    pub slow_drops: u64,
    /// Calls not timed because their start could not be parked in task storage.
    pub start_drops: u64,
    /// How long the hooks have been attached: the time the counts cover. In full mode, the
    /// agent's whole run; in sampled mode, the sum of its windows.
    pub observed_ns: u64,
    /// The configured mode when this was read (`sampled` or `full`); not cumulative.
    pub mode: Option<crate::config::SyscallMode>,
    /// Whether the hooks were attached when this was read; not cumulative.
    pub attached: bool,
}

impl Cumulative for SyscallTotals {
    fn delta_since(&self, earlier: &Self) -> Self {
        let mut by_nr = BTreeMap::new();
        for (nr, now) in &self.by_nr {
            let d = match earlier.by_nr.get(nr) {
                Some(e) => SyscallCounters {
                    latency: now.latency.delta_since(&e.latency),
                    errors: now.errors.saturating_sub(e.errors),
                },
                None => *now,
            };
            if d.latency.count > 0 || d.errors > 0 {
                by_nr.insert(*nr, d);
            }
        }
        Self {
            by_nr,
            slow_events: self.slow_events.saturating_sub(earlier.slow_events),
            slow_drops: self.slow_drops.saturating_sub(earlier.slow_drops),
            start_drops: self.start_drops.saturating_sub(earlier.start_drops),
            observed_ns: self.observed_ns.saturating_sub(earlier.observed_ns),
            mode: self.mode,
            attached: self.attached,
        }
    }
}

/// One slow call, as shown by `insite-agent syscalls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlowCall {
    /// Wall-clock time the call returned, ms since the Unix epoch.
    pub at_unix_ms: u64,
    pub syscall: String,
    pub duration_ns: u64,
    pub ret: i64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// cgroup v2 path, when the id could be resolved.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// systemd unit (`nginx.service`) the cgroup belongs to, if any.
    #[serde(default)]
    pub service: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(n: u64, ns: u64, errors: u64) -> SyscallCounters {
        let mut c = SyscallCounters::default();
        for _ in 0..n {
            c.latency.record(ns);
        }
        c.errors = errors;
        c
    }

    #[test]
    fn totals_delta_drops_idle_syscalls() {
        let mut a = SyscallTotals::default();
        a.by_nr.insert(0, counters(5, 100, 1));
        a.by_nr.insert(1, counters(3, 100, 0));
        let mut b = a.clone();
        b.by_nr.insert(0, counters(8, 100, 2));
        b.by_nr.insert(2, counters(1, 5000, 0));
        b.slow_events = 4;
        let d = b.delta_since(&a);
        assert_eq!(d.by_nr.len(), 2);
        assert_eq!(d.by_nr[&0].latency.count, 3);
        assert_eq!(d.by_nr[&0].errors, 1);
        assert_eq!(d.by_nr[&2].latency.count, 1);
        assert!(!d.by_nr.contains_key(&1));
        assert_eq!(d.slow_events, 4);
    }
}
