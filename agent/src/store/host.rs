//! The host's own signals, as the host family reads them from procfs at each tick.

use std::collections::BTreeMap;

use serde::Serialize;

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
