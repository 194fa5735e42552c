//! The in-memory store: what the collectors learned, kept as cumulative totals with rolling
//! windows. Exporters, `status`, the CLI views (and later rules) read from here; only
//! collectors write.

pub mod db;
pub mod histogram;
pub mod net;
pub mod window;

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::config::ConfigSource;
use histogram::Log2Histogram;
use window::{Cumulative, Windows};

/// How long windows may reach back, and how finely.
pub const WINDOW_RETENTION: Duration = Duration::from_secs(60);
pub const WINDOW_GRANULARITY: Duration = Duration::from_secs(1);

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

/// The walks over the kernel's TCP sockets (network probe): how many, how long the last one
/// took, and the interval they run at now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetWalk {
    pub walks: u64,
    pub seconds_total: f64,
    pub last_seconds: f64,
    pub interval_seconds: f64,
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

/// State of one probe family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeState {
    Attached,
    Disabled,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub name: String,
    pub state: ProbeState,
    /// How it is attached (e.g. `tp_btf`), when attached.
    pub attach: Option<String>,
    /// Why it is not attached, or what degraded on the way.
    pub error: Option<String>,
    /// Runs the kernel skipped, per attached program (`bpf_prog_info.recursion_misses`): the
    /// program was already running on that CPU, and the event went unseen.
    #[serde(default)]
    pub missed_runs: BTreeMap<String, u64>,
}

/// A reading of the host's own signals from procfs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HostSample {
    /// Cumulative CPU seconds by mode (user, system, idle, iowait, ...), all CPUs together.
    pub cpu_seconds: BTreeMap<&'static str, f64>,
    pub cpus: usize,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub memory_free_bytes: u64,
    pub memory_cached_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    /// (resource, "some"|"full") -> cumulative stall seconds and 10 s average (percent).
    pub pressure: Vec<PressureReading>,
    pub disks: Vec<DiskReading>,
    pub net_devices: Vec<NetDevReading>,
    /// Host-wide TCP counters (all sockets, also those opened before the agent started).
    pub tcp: Option<TcpHostReading>,
}

/// From /proc/net/snmp and /proc/net/netstat.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TcpHostReading {
    /// Connections in ESTABLISHED or CLOSE-WAIT now.
    pub established: u64,
    pub active_opens: u64,
    pub passive_opens: u64,
    pub attempt_fails: u64,
    pub retrans_segs: u64,
    pub out_rsts: u64,
    /// Handshakes dropped because a listener's accept queue was full.
    pub listen_overflows: u64,
    /// Handshakes dropped by listeners for any reason (includes overflows).
    pub listen_drops: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PressureReading {
    pub resource: &'static str,
    pub kind: &'static str,
    pub stall_seconds_total: f64,
    pub avg10: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiskReading {
    pub device: String,
    pub reads_completed: u64,
    pub writes_completed: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub io_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetDevReading {
    pub device: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

#[derive(Debug)]
pub struct Store {
    pub started: Instant,
    pub started_at: SystemTime,
    pub config_source: ConfigSource,
    pub probes: BTreeMap<String, ProbeStatus>,
    pub syscalls: Windows<SyscallTotals>,
    /// Connection edges, cumulative (the event reader adds to it)...
    pub net_live: net::NetTotals,
    /// ...and its per-second snapshots (the tick pushes them).
    pub net: Windows<net::NetTotals>,
    /// The connections open now, which the edges' `open` gauges follow (not snapshotted).
    /// The walks over the TCP sockets that sample live connections.
    pub net_walk: NetWalk,
    /// Query timings, cumulative (the query reader adds to it), and its snapshots.
    pub db_live: db::DbTotals,
    pub db: Windows<db::DbTotals>,
    /// The most recent slow queries (at most `db.slow_log_capacity`).
    pub db_slow: VecDeque<db::SlowQuery>,
    pub slow_calls: VecDeque<SlowCall>,
    pub slow_capacity: usize,
    /// Slow calls received from the kernel (userspace side of the ring buffer).
    pub slow_received: u64,
    pub host: Option<HostSample>,
    pub ticks: u64,
    pub last_tick: Duration,
}

impl Store {
    pub fn new(config_source: ConfigSource, slow_capacity: usize) -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
            config_source,
            probes: BTreeMap::new(),
            syscalls: Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION),
            net_live: net::NetTotals::default(),
            net: Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION),
            net_walk: NetWalk::default(),
            db_live: db::DbTotals::default(),
            db: Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION),
            db_slow: VecDeque::new(),
            slow_calls: VecDeque::new(),
            slow_capacity,
            slow_received: 0,
            host: None,
            ticks: 0,
            last_tick: Duration::ZERO,
        }
    }

    pub fn set_probe(&mut self, status: ProbeStatus) {
        self.probes.insert(status.name.clone(), status);
    }

    /// Keeps the most recent `slow_capacity` slow calls.
    pub fn push_slow_call(&mut self, call: SlowCall) {
        self.slow_received += 1;
        while self.slow_calls.len() >= self.slow_capacity {
            self.slow_calls.pop_front();
        }
        self.slow_calls.push_back(call);
    }

    pub fn set_slow_capacity(&mut self, cap: usize) {
        self.slow_capacity = cap.max(1);
        while self.slow_calls.len() > self.slow_capacity {
            self.slow_calls.pop_front();
        }
    }
}

/// Shared handle: collectors write, everyone else reads. Critical sections are short (no I/O
/// under the lock), so a std RwLock is enough.
pub type SharedStore = std::sync::Arc<std::sync::RwLock<Store>>;

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

    #[test]
    fn slow_log_is_bounded() {
        let mut s = Store::new(ConfigSource::Defaults, 3);
        for i in 0..10 {
            s.push_slow_call(SlowCall {
                at_unix_ms: i,
                syscall: "read".into(),
                duration_ns: i,
                ret: 0,
                pid: 1,
                tid: 1,
                comm: "x".into(),
                cgroup_id: 0,
                cgroup: None,
                service: None,
            });
        }
        assert_eq!(s.slow_calls.len(), 3);
        assert_eq!(s.slow_calls[0].at_unix_ms, 7);
        assert_eq!(s.slow_received, 10);
        s.set_slow_capacity(1);
        assert_eq!(s.slow_calls.len(), 1);
        assert_eq!(s.slow_calls[0].at_unix_ms, 9);
    }
}
