//! The in-memory store: what the collectors learned, kept as cumulative totals with rolling
//! windows. Exporters, `status`, the CLI views (and later rules) read from here; only
//! collectors write.

pub mod alerts;
pub mod db;
pub mod histogram;
pub mod host;
pub mod net;
pub mod ratelimit;
pub mod streams;
pub mod syscalls;
pub mod window;

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::config::ConfigSource;
pub use host::{DiskReading, HostSample, NetDevReading, PressureReading, TcpHostReading};
use syscalls::{SlowCall, SyscallTotals};
use window::Windows;

/// How long windows may reach back, and how finely.
pub const WINDOW_RETENTION: Duration = Duration::from_secs(60);
pub const WINDOW_GRANULARITY: Duration = Duration::from_secs(1);

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

#[derive(Debug)]
pub struct Store {
    pub started: Instant,
    pub started_at: SystemTime,
    pub config_source: ConfigSource,
    pub probes: BTreeMap<String, ProbeStatus>,
    pub syscalls: Windows<SyscallTotals>,
    /// Connection edges, cumulative (the network collector adds to it)...
    pub net_live: net::NetTotals,
    /// ...and its per-second snapshots (the tick pushes them).
    pub net: Windows<net::NetTotals>,
    /// The walks over the TCP sockets that sample live connections.
    pub net_walk: net::NetWalk,
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
    /// Rate-limit rules and their counts (the family's task writes it).
    pub ratelimit: Option<ratelimit::RatelimitView>,
    pub ratelimit_top: ratelimit::TopView,
    /// Alert rules and their alerts (the alert engine's task writes it).
    pub alerts: Option<alerts::AlertsView>,
    /// Every family's ring buffers: what they carried and lost.
    pub streams: streams::Streams,
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
            net_walk: net::NetWalk::default(),
            db_live: db::DbTotals::default(),
            db: Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION),
            db_slow: VecDeque::new(),
            slow_calls: VecDeque::new(),
            slow_capacity,
            slow_received: 0,
            host: None,
            ratelimit: None,
            ratelimit_top: Default::default(),
            alerts: None,
            streams: streams::Streams::default(),
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
