//! Connection edges: who talks to whom, how fast and how well.
//!
//! An edge is (direction, service, peer, destination): "checkout.service -> 10.0.0.5:5432"
//! outbound, or "10.0.0.9 -> 10.0.0.2:443 (nginx.service)" inbound. The collector adds what
//! the kernel counted on its own (finer) edges to the edges' cumulative counters; the tick
//! takes a snapshot each second so windows are differences (see `window.rs`). Edge counters sit behind `Arc` so a
//! snapshot shares every edge that did not change since the previous one.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{histogram::Log2Histogram, window::Cumulative};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

/// Why a connect failed, from the socket error the kernel left on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// RST in answer to the SYN: nothing listens there (ECONNREFUSED).
    Refused,
    /// No answer to the SYN and its retries (ETIMEDOUT).
    TimedOut,
    /// Reset during the handshake for another reason (ECONNRESET).
    Reset,
    /// ICMP unreachable (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// The application closed the socket before the handshake finished.
    Aborted,
    Other,
}

impl FailureReason {
    pub const ALL: [Self; 6] = [
        Self::Refused,
        Self::TimedOut,
        Self::Reset,
        Self::Unreachable,
        Self::Aborted,
        Self::Other,
    ];

    pub fn from_errno(err: i32) -> Self {
        match err {
            0 => Self::Aborted,
            libc::ECONNREFUSED => Self::Refused,
            libc::ETIMEDOUT => Self::TimedOut,
            libc::ECONNRESET => Self::Reset,
            libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN => {
                Self::Unreachable
            }
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::TimedOut => "timed_out",
            Self::Reset => "reset",
            Self::Unreachable => "unreachable",
            Self::Aborted => "aborted",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EdgeKey {
    pub direction: Direction,
    /// The local end's service (systemd unit, else cgroup, else process name).
    pub service: Arc<str>,
    /// The remote end: the server (outbound) or the client (inbound). `None`: the `other` edge.
    pub peer: Option<IpAddr>,
    /// Where the SYN went: the remote address and port (outbound) or the local address and
    /// listening port (inbound). `None`: the `other` edge.
    pub destination: Option<SocketAddr>,
}

impl EdgeKey {
    /// The edge that collects everything past `max_edges`.
    pub fn other(direction: Direction) -> Self {
        Self {
            direction,
            service: Arc::from("other"),
            peer: None,
            destination: None,
        }
    }

    /// `addr:port`, `[v6]:port` or `other`.
    pub fn destination_label(&self) -> String {
        self.destination
            .map_or_else(|| "other".to_string(), |d| d.to_string())
    }
}

/// Cumulative counters of one edge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdgeCounters {
    /// Handshakes completed: outbound connects, inbound accepts.
    pub connects: u64,
    pub failures: [u64; 6],
    /// SYN sent -> ESTABLISHED (outbound only).
    pub connect_time: Log2Histogram,
    /// Smoothed RTT samples, in ns.
    pub rtt: Log2Histogram,
    pub closes: u64,
    /// Summed lifetime of the closed connections, in ns.
    pub lifetime_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    /// Connections ended without their close being seen (their socket carried a new
    /// connection, or walks over the sockets stopped finding it). Not in `closes`, and no
    /// lifetime.
    pub reconciled: u64,
    /// Connections open now (handshakes the kernel counted, less the ends it saw and the
    /// reconciled ones): a gauge, not a counter (windows carry the latest).
    pub open: u64,
    /// The processes seen on this edge (pid, comm), most recent first, at most
    /// `MAX_PROCESSES`: not a counter, windows carry the latest.
    pub processes: Vec<(u32, Arc<str>)>,
}

/// Processes remembered per edge.
pub const MAX_PROCESSES: usize = 4;

impl EdgeCounters {
    /// Whether any counter is non-zero (the process list aside).
    pub fn has_activity(&self) -> bool {
        self.connects != 0
            || self.failures.iter().any(|&f| f != 0)
            || self.connect_time.count != 0
            || self.rtt.count != 0
            || self.closes != 0
            || self.bytes_sent != 0
            || self.bytes_received != 0
            || self.retransmits != 0
            || self.reconciled != 0
    }

    /// Remembers `pid`/`comm` as the edge's most recent process.
    pub fn note_process(&mut self, pid: u32, comm: &Arc<str>) {
        if self.processes.first().is_some_and(|(p, _)| *p == pid) {
            return;
        }
        self.processes.retain(|(p, _)| *p != pid);
        self.processes.insert(0, (pid, comm.clone()));
        self.processes.truncate(MAX_PROCESSES);
    }

    pub fn failures_total(&self) -> u64 {
        self.failures.iter().sum()
    }

    pub fn failure(&self, r: FailureReason) -> u64 {
        self.failures[r.index()]
    }

    /// Connections open now (tracked since the agent started).
    pub fn active(&self) -> u64 {
        self.open
    }

    pub fn bytes(&self) -> u64 {
        self.bytes_sent.saturating_add(self.bytes_received)
    }

    pub fn add(&mut self, o: &Self) {
        self.connects += o.connects;
        for (a, b) in self.failures.iter_mut().zip(o.failures.iter()) {
            *a += b;
        }
        self.connect_time.add(&o.connect_time);
        self.rtt.add(&o.rtt);
        self.closes += o.closes;
        self.lifetime_ns = self.lifetime_ns.saturating_add(o.lifetime_ns);
        self.bytes_sent = self.bytes_sent.saturating_add(o.bytes_sent);
        self.bytes_received = self.bytes_received.saturating_add(o.bytes_received);
        self.retransmits += o.retransmits;
        self.reconciled += o.reconciled;
        self.open += o.open;
        for (pid, comm) in o.processes.iter().rev() {
            self.note_process(*pid, comm);
        }
    }

    fn delta_since(&self, e: &Self) -> Self {
        let mut failures = [0; 6];
        for (i, f) in failures.iter_mut().enumerate() {
            *f = self.failures[i].saturating_sub(e.failures[i]);
        }
        Self {
            connects: self.connects.saturating_sub(e.connects),
            failures,
            connect_time: self.connect_time.delta_since(&e.connect_time),
            rtt: self.rtt.delta_since(&e.rtt),
            closes: self.closes.saturating_sub(e.closes),
            lifetime_ns: self.lifetime_ns.saturating_sub(e.lifetime_ns),
            bytes_sent: self.bytes_sent.saturating_sub(e.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(e.bytes_received),
            retransmits: self.retransmits.saturating_sub(e.retransmits),
            reconciled: self.reconciled.saturating_sub(e.reconciled),
            open: self.open,
            processes: self.processes.clone(),
        }
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

/// Kernel-side counters of the network probe (cumulative, summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetKernelCounters {
    /// Connection updates counted in the kernel's `other` edges (its edge table was full).
    pub edges_full: u64,
    /// Tracked connections ended because their socket started a new one.
    pub reused: u64,
    pub retransmits: u64,
    pub resets_sent: u64,
    pub resets_received: u64,
    pub track_failed: u64,
    /// Connections ended by the destroy backstop (their end was not seen otherwise).
    pub ended_at_destroy: u64,
}

/// Everything the network probe counts, cumulative since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetTotals {
    pub edges: BTreeMap<EdgeKey, Arc<EdgeCounters>>,
    /// Updates that went to an `other` edge because `max_edges` was reached.
    pub overflowed: u64,
    /// Connection events (handshakes, closes, failures) on edges to ignored networks
    /// (`net.ignore_cidrs`), not counted on any edge.
    pub ignored: u64,
    pub kernel: NetKernelCounters,
}

impl NetTotals {
    /// Remembers the process behind an update of `key` (if the edge exists: an update that
    /// overflowed into `other` names no process).
    pub fn note_process(&mut self, key: &EdgeKey, pid: u32, comm: &Arc<str>) {
        if let Some(e) = self.edges.get_mut(key) {
            if e.processes.first().is_none_or(|(p, _)| *p != pid) {
                Arc::make_mut(e).note_process(pid, comm);
            }
        }
    }

    /// Adds `delta` (counters; its `open` is ignored) to edge `key`, within `max_edges`
    /// distinct edges: past that, to its direction's `other`. Returns the edge it counted on.
    pub fn add(&mut self, key: &EdgeKey, delta: &EdgeCounters, max_edges: usize) -> EdgeKey {
        let key = if self.edges.contains_key(key) || self.edges.len() < max_edges {
            key.clone()
        } else {
            self.overflowed += 1;
            EdgeKey::other(key.direction)
        };
        let e = Arc::make_mut(self.edges.entry(key.clone()).or_default());
        let open = e.open;
        e.add(delta);
        e.open = open;
        key
    }

    /// Moves an `open` contribution: `old` connections leave the gauge of edge `from`, `new`
    /// join that of `to` (the same edge, or the one its service is now named after).
    pub fn move_open(&mut self, from: Option<&EdgeKey>, old: u64, to: &EdgeKey, new: u64) {
        if from == Some(to) && old == new {
            return;
        }
        if let Some(e) = from.and_then(|k| self.edges.get_mut(k)) {
            let e = Arc::make_mut(e);
            e.open = e.open.saturating_sub(old);
        }
        let e = Arc::make_mut(self.edges.entry(to.clone()).or_default());
        e.open += new;
    }
}

/// One exported series: the edges of a (direction, service, destination), summed over peers.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationSeries {
    pub direction: Direction,
    pub service: String,
    pub destination: String,
    pub counters: EdgeCounters,
}

impl NetTotals {
    /// Edges summed per (direction, service, destination); the top `n` by traffic (then by
    /// connections) keep their labels, the rest fold into one `other` series per direction.
    /// Returns the series and how many were folded.
    pub fn by_destination(&self, n: usize) -> (Vec<DestinationSeries>, usize) {
        let mut sums: BTreeMap<(Direction, Arc<str>, String), EdgeCounters> = BTreeMap::new();
        for (k, c) in &self.edges {
            sums.entry((k.direction, k.service.clone(), k.destination_label()))
                .or_default()
                .add(c);
        }
        let mut all: Vec<_> = sums.into_iter().collect();
        all.sort_by(|a, b| {
            (b.1.bytes(), b.1.connects + b.1.failures_total())
                .cmp(&(a.1.bytes(), a.1.connects + a.1.failures_total()))
                .then_with(|| a.0.cmp(&b.0))
        });
        let mut rows = Vec::new();
        let mut other: BTreeMap<Direction, EdgeCounters> = BTreeMap::new();
        let mut folded = 0;
        for (i, ((direction, service, destination), counters)) in all.into_iter().enumerate() {
            if i < n {
                rows.push(DestinationSeries {
                    direction,
                    service: service.to_string(),
                    destination,
                    counters,
                });
            } else {
                other.entry(direction).or_default().add(&counters);
                folded += 1;
            }
        }
        rows.sort_by(|a, b| {
            (a.direction, &a.service, &a.destination).cmp(&(
                b.direction,
                &b.service,
                &b.destination,
            ))
        });
        for (direction, counters) in other {
            rows.push(DestinationSeries {
                direction,
                service: "other".into(),
                destination: "other".into(),
                counters,
            });
        }
        (rows, folded)
    }
}

impl Cumulative for NetTotals {
    fn delta_since(&self, earlier: &Self) -> Self {
        let mut edges = BTreeMap::new();
        for (k, now) in &self.edges {
            let d = match earlier.edges.get(k) {
                Some(e) if Arc::ptr_eq(e, now) => continue,
                Some(e) => now.delta_since(e),
                None => (**now).clone(),
            };
            if d.has_activity() {
                edges.insert(k.clone(), Arc::new(d));
            }
        }
        let k = &self.kernel;
        let ek = &earlier.kernel;
        Self {
            edges,
            overflowed: self.overflowed.saturating_sub(earlier.overflowed),
            ignored: self.ignored.saturating_sub(earlier.ignored),
            kernel: NetKernelCounters {
                edges_full: k.edges_full.saturating_sub(ek.edges_full),
                reused: k.reused.saturating_sub(ek.reused),
                retransmits: k.retransmits.saturating_sub(ek.retransmits),
                resets_sent: k.resets_sent.saturating_sub(ek.resets_sent),
                resets_received: k.resets_received.saturating_sub(ek.resets_received),
                track_failed: k.track_failed.saturating_sub(ek.track_failed),
                ended_at_destroy: k.ended_at_destroy.saturating_sub(ek.ended_at_destroy),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(service: &str, port: u16) -> EdgeKey {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        EdgeKey {
            direction: Direction::Outbound,
            service: Arc::from(service),
            peer: Some(ip),
            destination: Some(SocketAddr::new(ip, port)),
        }
    }

    /// `connects` handshakes with `sent` bytes.
    fn conns(connects: u64, sent: u64) -> EdgeCounters {
        let mut d = EdgeCounters {
            connects,
            bytes_sent: sent,
            ..EdgeCounters::default()
        };
        for _ in 0..connects {
            d.connect_time.record(1000);
            d.rtt.record(50_000);
        }
        d
    }

    #[test]
    fn deltas_fold_into_edges_and_overflow_into_other() {
        let mut t = NetTotals::default();
        assert_eq!(t.add(&key("a", 1), &conns(1, 30), 2), key("a", 1));
        t.add(&key("a", 1), &conns(1, 0), 2);
        t.add(&key("b", 1), &conns(1, 0), 2);
        let other = EdgeKey::other(Direction::Outbound);
        assert_eq!(t.add(&key("c", 1), &conns(1, 0), 2), other);
        let mut fail = EdgeCounters::default();
        fail.failures[FailureReason::Refused.index()] = 1;
        t.add(&key("a", 1), &fail, 2);
        assert_eq!(t.edges.len(), 3);
        assert_eq!(t.overflowed, 1);
        let a = &t.edges[&key("a", 1)];
        assert_eq!(a.connects, 2);
        assert_eq!(a.failure(FailureReason::Refused), 1);
        assert_eq!(a.bytes(), 30);
        assert_eq!(a.rtt.count, 2);
        assert_eq!(t.edges[&other].connects, 1);
    }

    #[test]
    fn deltas_skip_unchanged_edges_and_snapshots_share_them() {
        let mut t = NetTotals::default();
        t.add(&key("a", 1), &conns(1, 0), 10);
        t.add(&key("b", 1), &conns(1, 0), 10);
        let snap = t.clone();
        let retx = EdgeCounters {
            retransmits: 3,
            ..EdgeCounters::default()
        };
        t.add(&key("b", 1), &retx, 10);
        assert!(Arc::ptr_eq(
            &snap.edges[&key("a", 1)],
            &t.edges[&key("a", 1)]
        ));
        let d = t.delta_since(&snap);
        assert_eq!(d.edges.len(), 1);
        assert_eq!(d.edges[&key("b", 1)].retransmits, 3);
        assert_eq!(d.edges[&key("b", 1)].connects, 0);
    }

    #[test]
    fn destinations_are_summed_over_peers_and_bounded() {
        let mut t = NetTotals::default();
        let dest: SocketAddr = "10.0.0.2:80".parse().unwrap();
        for (i, peer) in ["10.0.0.7", "10.0.0.8"].iter().enumerate() {
            let k = EdgeKey {
                direction: Direction::Inbound,
                service: Arc::from("web"),
                peer: Some(peer.parse().unwrap()),
                destination: Some(dest),
            };
            t.add(&k, &conns(1, 1000 * (i as u64 + 1)), 100);
        }
        for port in 1..=3 {
            t.add(&key("db", port), &conns(1, port.into()), 100);
        }
        let (rows, folded) = t.by_destination(2);
        assert_eq!(folded, 2);
        assert_eq!(rows.len(), 3);
        let web = rows.iter().find(|r| r.service == "web").unwrap();
        assert_eq!((web.counters.connects, web.counters.bytes_sent), (2, 3000));
        assert_eq!(web.destination, "10.0.0.2:80");
        let db = rows.iter().find(|r| r.service == "db").unwrap();
        assert_eq!(db.destination, "10.0.0.1:3");
        let other = rows.iter().find(|r| r.service == "other").unwrap();
        assert_eq!(other.counters.connects, 2);
    }

    #[test]
    fn processes_are_bounded_most_recent_first_and_not_activity() {
        let mut t = NetTotals::default();
        t.add(&key("a", 1), &conns(1, 0), 10);
        for pid in 1..=6 {
            t.note_process(&key("a", 1), pid, &Arc::from(format!("p{pid}").as_str()));
        }
        t.note_process(&key("a", 1), 5, &Arc::from("p5"));
        let e = &t.edges[&key("a", 1)];
        let pids: Vec<u32> = e.processes.iter().map(|(p, _)| *p).collect();
        assert_eq!(pids, vec![5, 6, 4, 3]);
        // A process noted on an idle edge is not activity.
        let snap = t.clone();
        t.note_process(&key("a", 1), 9, &Arc::from("p9"));
        assert!(t.delta_since(&snap).edges.is_empty());
        // Unknown edges are not created by noting a process.
        t.note_process(&key("zz", 9), 1, &Arc::from("x"));
        assert!(!t.edges.contains_key(&key("zz", 9)));
    }

    #[test]
    fn open_is_a_gauge_that_moves_with_its_edge_and_sums_over_peers() {
        let mut t = NetTotals::default();
        t.add(&key("a", 1), &conns(2, 0), 10);
        t.move_open(None, 0, &key("a", 1), 2);
        // Deltas never touch the gauge.
        t.add(&key("a", 1), &conns(1, 0), 10);
        assert_eq!(t.edges[&key("a", 1)].active(), 2);
        let snap = t.clone();
        let closed = EdgeCounters {
            closes: 1,
            lifetime_ns: 5,
            ..EdgeCounters::default()
        };
        t.add(&key("a", 1), &closed, 10);
        t.move_open(Some(&key("a", 1)), 2, &key("a", 1), 1);
        let d = t.delta_since(&snap);
        let a = &d.edges[&key("a", 1)];
        assert_eq!((a.closes, a.connects, a.open), (1, 0, 1));
        // Renamed: the open connections move to the new name's edge.
        t.move_open(Some(&key("a", 1)), 1, &key("b", 1), 1);
        assert_eq!(t.edges[&key("a", 1)].active(), 0);
        assert_eq!(t.edges[&key("b", 1)].active(), 1);
        let mut other_peer = key("b", 1);
        other_peer.peer = Some("10.0.0.9".parse().unwrap());
        t.move_open(None, 0, &other_peer, 2);
        let (rows, _) = t.by_destination(10);
        let b = rows.iter().find(|r| r.service == "b").unwrap();
        assert_eq!(b.counters.open, 3);
    }

    #[test]
    fn errno_reasons() {
        assert_eq!(
            FailureReason::from_errno(libc::ECONNREFUSED),
            FailureReason::Refused
        );
        assert_eq!(
            FailureReason::from_errno(libc::ETIMEDOUT),
            FailureReason::TimedOut
        );
        assert_eq!(FailureReason::from_errno(0), FailureReason::Aborted);
        assert_eq!(
            FailureReason::from_errno(libc::EHOSTUNREACH),
            FailureReason::Unreachable
        );
        assert_eq!(FailureReason::from_errno(9999), FailureReason::Other);
        for (i, r) in FailureReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
