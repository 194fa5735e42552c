//! Connection edges: who talks to whom, how fast and how well.
//!
//! An edge is (direction, service, peer, destination): "checkout.service -> 10.0.0.5:5432"
//! outbound, or "10.0.0.9 -> 10.0.0.2:443 (nginx.service)" inbound. The reader of the kernel's
//! connection events adds to the edges' cumulative counters; the tick takes a snapshot each
//! second so windows are differences (see `window.rs`). Edge counters sit behind `Arc` so a
//! snapshot shares every edge that did not change since the previous one.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use agent_common::net::MAX_TRACKED_CONNS;

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
    /// Connections given up as closed by reconciliation: the agent never heard of their end
    /// (see [`OpenConns`]). Not in `closes`, and no lifetime.
    pub reconciled: u64,
    /// Connections open now, counted by [`OpenConns`]: a gauge, not a counter (windows carry
    /// the latest).
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

/// One connection: the socket's kernel address and when it was established. A socket holds
/// one connection at a time, and its address is reused only once it is freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub sock: u64,
    pub start_ns: u64,
}

/// One observation of a connection, decoded from a kernel event and named.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnUpdate {
    Connected {
        conn: ConnId,
        connect_ns: u64,
        rtt_ns: u64,
    },
    Failed {
        reason: FailureReason,
    },
    Accepted {
        conn: ConnId,
        rtt_ns: u64,
    },
    Closed {
        conn: ConnId,
        lifetime_ns: u64,
        rtt_ns: u64,
    },
    Sampled {
        rtt_ns: u64,
    },
    Retransmitted,
}

/// What an event carries besides its update: bytes and retransmits since the connection's
/// previous event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
    pub retransmits: u64,
}

/// Everything the network probe counts, cumulative since the agent started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetTotals {
    pub edges: BTreeMap<EdgeKey, Arc<EdgeCounters>>,
    /// Updates that went to an `other` edge because `max_edges` was reached.
    pub overflowed: u64,
    /// Events the reader received.
    pub events: u64,
    /// Events dropped in userspace (undecodable, or an ignored network).
    pub ignored: u64,
    /// Connections not held in the open-connection table because it was full (not in the
    /// `open` gauge).
    pub open_overflowed: u64,
    /// Closes of connections the agent never saw open (their connect or accept event was
    /// lost): not counted as closes on any edge.
    pub closes_unmatched: u64,
    pub kernel: crate::probes::net::NetKernelCounters,
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

    /// Applies one update to its edge, within `max_edges` distinct edges; connections that
    /// open and close are entered in and taken out of `open`.
    pub fn apply(
        &mut self,
        open: &mut OpenConns,
        mut key: EdgeKey,
        update: &ConnUpdate,
        traffic: Traffic,
        max_edges: usize,
    ) {
        if !self.edges.contains_key(&key) && self.edges.len() >= max_edges {
            self.overflowed += 1;
            key = EdgeKey::other(key.direction);
        }
        let e = Arc::make_mut(self.edges.entry(key.clone()).or_default());
        e.bytes_sent = e.bytes_sent.saturating_add(traffic.sent);
        e.bytes_received = e.bytes_received.saturating_add(traffic.received);
        e.retransmits += traffic.retransmits;
        let rtt = |e: &mut EdgeCounters, ns: u64| {
            if ns > 0 {
                e.rtt.record(ns);
            }
        };
        match *update {
            ConnUpdate::Connected {
                conn,
                connect_ns,
                rtt_ns,
            } => {
                e.connects += 1;
                e.connect_time.record(connect_ns);
                rtt(e, rtt_ns);
                open.open(self, conn, key);
            }
            ConnUpdate::Failed { reason, .. } => e.failures[reason.index()] += 1,
            ConnUpdate::Accepted { conn, rtt_ns } => {
                e.connects += 1;
                rtt(e, rtt_ns);
                open.open(self, conn, key);
            }
            ConnUpdate::Closed {
                conn,
                lifetime_ns,
                rtt_ns,
            } => {
                rtt(e, rtt_ns);
                // A close counts on the edge its connection was opened on, and only if the
                // agent saw it open (its connect or accept may have been lost): so connects -
                // closes - reconciled is what is open.
                if !open.close(self, conn, lifetime_ns) {
                    self.closes_unmatched += 1;
                }
            }
            ConnUpdate::Sampled { rtt_ns } => rtt(e, rtt_ns),
            ConnUpdate::Retransmitted => {}
        }
    }

    /// Counts a connection's open or end on the edge `key` (where its open was counted).
    fn edge_conn(&mut self, key: &EdgeKey, what: Lifecycle) {
        let Some(e) = self.edges.get_mut(key) else {
            return;
        };
        let e = Arc::make_mut(e);
        match what {
            Lifecycle::Opened => e.open += 1,
            Lifecycle::Closed { lifetime_ns } => {
                e.open = e.open.saturating_sub(1);
                e.closes += 1;
                e.lifetime_ns = e.lifetime_ns.saturating_add(lifetime_ns);
            }
            Lifecycle::Reconciled => {
                e.open = e.open.saturating_sub(1);
                e.reconciled += 1;
            }
        }
    }
}

/// A step in a connection's life, as counted on its edge.
enum Lifecycle {
    Opened,
    Closed {
        lifetime_ns: u64,
    },
    /// Given up as closed: its close never reached us.
    Reconciled,
}

/// Connections held open at most: the kernel tracks at most `MAX_TRACKED_CONNS` at once,
/// and only lost closes not yet reconciled can add to that.
pub const MAX_OPEN_CONNS: usize = 2 * MAX_TRACKED_CONNS as usize;

/// Reconciliation passes in a row that must miss a connection in the kernel's table before
/// it is given up: its close may still be on its way through the ring buffer at the first.
pub const RECONCILE_MISSES: u8 = 2;

/// The connections open now, by socket, each with the edge its open was counted on. The
/// `open` gauge of the edges follows it, so it does not drift when a close is never heard
/// of (the kernel skipped the program run that would have seen it, or the ring buffer was
/// full): a socket that carries a new connection ends its old one, and `reconcile` ends
/// what the kernel's own table of tracked connections no longer holds.
#[derive(Debug, Default)]
pub struct OpenConns {
    by_sock: HashMap<u64, OpenConn>,
}

#[derive(Debug)]
struct OpenConn {
    start_ns: u64,
    key: EdgeKey,
    /// Reconciliation passes in a row that did not find it in the kernel's table.
    unseen: u8,
}

impl OpenConns {
    pub fn len(&self) -> usize {
        self.by_sock.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_sock.is_empty()
    }

    fn open(&mut self, totals: &mut NetTotals, conn: ConnId, key: EdgeKey) {
        if let Some(old) = self.by_sock.get(&conn.sock) {
            if old.start_ns == conn.start_ns {
                return;
            }
            // The socket was freed and reused: its previous connection ended unheard of.
            if let Some(old) = self.by_sock.remove(&conn.sock) {
                totals.edge_conn(&old.key, Lifecycle::Reconciled);
            }
        }
        if self.by_sock.len() >= MAX_OPEN_CONNS {
            totals.open_overflowed += 1;
            return;
        }
        totals.edge_conn(&key, Lifecycle::Opened);
        self.by_sock.insert(
            conn.sock,
            OpenConn {
                start_ns: conn.start_ns,
                key,
                unseen: 0,
            },
        );
    }

    /// Ends `conn` if it is open; returns whether it was.
    fn close(&mut self, totals: &mut NetTotals, conn: ConnId, lifetime_ns: u64) -> bool {
        let open = self
            .by_sock
            .get(&conn.sock)
            .is_some_and(|c| c.start_ns == conn.start_ns);
        if !open {
            return false;
        }
        if let Some(c) = self.by_sock.remove(&conn.sock) {
            totals.edge_conn(&c.key, Lifecycle::Closed { lifetime_ns });
        }
        true
    }

    /// One pass against the kernel's table (socket -> start of the connection it tracks):
    /// a connection missing from it `RECONCILE_MISSES` passes in a row is given up as
    /// closed, counted as reconciled on its edge. Returns how many were.
    pub fn reconcile(&mut self, totals: &mut NetTotals, kernel: &HashMap<u64, u64>) -> u64 {
        let mut gone = Vec::new();
        for (sock, c) in &mut self.by_sock {
            if kernel.get(sock) == Some(&c.start_ns) {
                c.unseen = 0;
            } else {
                c.unseen = c.unseen.saturating_add(1);
                if c.unseen >= RECONCILE_MISSES {
                    gone.push(*sock);
                }
            }
        }
        for sock in &gone {
            if let Some(c) = self.by_sock.remove(sock) {
                totals.edge_conn(&c.key, Lifecycle::Reconciled);
            }
        }
        gone.len() as u64
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
            events: self.events.saturating_sub(earlier.events),
            ignored: self.ignored.saturating_sub(earlier.ignored),
            open_overflowed: self.open_overflowed.saturating_sub(earlier.open_overflowed),
            closes_unmatched: self
                .closes_unmatched
                .saturating_sub(earlier.closes_unmatched),
            kernel: crate::probes::net::NetKernelCounters {
                events: k.events.saturating_sub(ek.events),
                drops: k.drops.saturating_sub(ek.drops),
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

    fn id(sock: u64) -> ConnId {
        ConnId { sock, start_ns: 1 }
    }

    fn traffic(sent: u64, received: u64, retransmits: u64) -> Traffic {
        Traffic {
            sent,
            received,
            retransmits,
        }
    }

    fn connected(sock: u64) -> ConnUpdate {
        ConnUpdate::Connected {
            conn: id(sock),
            connect_ns: 1000,
            rtt_ns: 50_000,
        }
    }

    fn key(service: &str, port: u16) -> EdgeKey {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        EdgeKey {
            direction: Direction::Outbound,
            service: Arc::from(service),
            peer: Some(ip),
            destination: Some(SocketAddr::new(ip, port)),
        }
    }

    #[test]
    fn updates_fold_into_edges_and_overflow_into_other() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        t.apply(&mut open, key("a", 1), &connected(1), traffic(10, 20, 0), 2);
        t.apply(&mut open, key("a", 1), &connected(2), none, 2);
        t.apply(&mut open, key("b", 1), &connected(3), none, 2);
        t.apply(&mut open, key("c", 1), &connected(4), none, 2);
        let fail = ConnUpdate::Failed {
            reason: FailureReason::Refused,
        };
        t.apply(&mut open, key("a", 1), &fail, none, 2);
        assert_eq!(t.edges.len(), 3);
        assert_eq!(t.overflowed, 1);
        let a = &t.edges[&key("a", 1)];
        assert_eq!(a.connects, 2);
        assert_eq!(a.failure(FailureReason::Refused), 1);
        assert_eq!(a.bytes(), 30);
        assert_eq!(a.rtt.count, 2);
        assert_eq!(t.edges[&EdgeKey::other(Direction::Outbound)].connects, 1);
    }

    #[test]
    fn deltas_skip_unchanged_edges_and_snapshots_share_them() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        t.apply(&mut open, key("a", 1), &connected(1), none, 10);
        t.apply(&mut open, key("b", 1), &connected(2), none, 10);
        let snap = t.clone();
        let retx = ConnUpdate::Retransmitted;
        t.apply(&mut open, key("b", 1), &retx, traffic(0, 0, 3), 10);
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
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let dest: SocketAddr = "10.0.0.2:80".parse().unwrap();
        for (i, peer) in ["10.0.0.7", "10.0.0.8"].iter().enumerate() {
            let k = EdgeKey {
                direction: Direction::Inbound,
                service: Arc::from("web"),
                peer: Some(peer.parse().unwrap()),
                destination: Some(dest),
            };
            let accepted = ConnUpdate::Accepted {
                conn: id(i as u64),
                rtt_ns: 0,
            };
            let sent = 1000 * (i as u64 + 1);
            t.apply(&mut open, k, &accepted, traffic(sent, 0, 0), 100);
        }
        for port in 1..=3 {
            let c = connected(10 + u64::from(port));
            t.apply(
                &mut open,
                key("db", port),
                &c,
                traffic(port.into(), 0, 0),
                100,
            );
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
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        t.apply(
            &mut open,
            key("a", 1),
            &connected(1),
            Traffic::default(),
            10,
        );
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

    fn closed(sock: u64) -> ConnUpdate {
        ConnUpdate::Closed {
            conn: id(sock),
            lifetime_ns: 5,
            rtt_ns: 0,
        }
    }

    /// socket -> start of each connection the kernel tracks.
    fn kernel(socks: &[u64]) -> HashMap<u64, u64> {
        socks.iter().map(|&s| (s, 1)).collect()
    }

    #[test]
    fn a_lost_close_is_reconciled_after_two_passes_and_the_gauge_returns_to_zero() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        for sock in 1..=3 {
            t.apply(&mut open, key("a", 1), &connected(sock), none, 10);
        }
        assert_eq!(t.edges[&key("a", 1)].active(), 3);
        // 1 closes as it should; the close of 2 is lost (the kernel no longer tracks it); 3
        // stays open.
        t.apply(&mut open, key("a", 1), &closed(1), none, 10);
        assert_eq!(open.reconcile(&mut t, &kernel(&[3])), 0, "first miss");
        assert_eq!(t.edges[&key("a", 1)].active(), 2);
        assert_eq!(open.reconcile(&mut t, &kernel(&[3])), 1, "second miss");
        let a = &t.edges[&key("a", 1)];
        assert_eq!((a.active(), a.closes, a.reconciled), (1, 1, 1));
        assert_eq!(a.connects - a.closes - a.reconciled, a.active());
        // 3 stays open through any number of passes while the kernel tracks it.
        for _ in 0..5 {
            assert_eq!(open.reconcile(&mut t, &kernel(&[3])), 0);
        }
        assert_eq!(t.edges[&key("a", 1)].active(), 1);
        assert_eq!(open.len(), 1);
    }

    #[test]
    fn a_close_still_in_flight_at_the_first_pass_is_not_reconciled() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        t.apply(&mut open, key("a", 1), &connected(1), none, 10);
        // The kernel already untracked it; its close event is still in the ring buffer.
        assert_eq!(open.reconcile(&mut t, &kernel(&[])), 0);
        t.apply(&mut open, key("a", 1), &closed(1), none, 10);
        assert_eq!(open.reconcile(&mut t, &kernel(&[])), 0);
        let a = &t.edges[&key("a", 1)];
        assert_eq!((a.active(), a.closes, a.reconciled), (0, 1, 0));
        // One pass found it again: the count of misses starts over.
        t.apply(&mut open, key("a", 1), &connected(2), none, 10);
        assert_eq!(open.reconcile(&mut t, &kernel(&[])), 0);
        assert_eq!(open.reconcile(&mut t, &kernel(&[2])), 0);
        assert_eq!(open.reconcile(&mut t, &kernel(&[])), 0);
        assert_eq!(t.edges[&key("a", 1)].active(), 1);
    }

    #[test]
    fn a_reused_socket_ends_its_previous_connection_and_starts_must_match() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        t.apply(&mut open, key("a", 1), &connected(7), none, 10);
        // The same socket address, a later connection to another edge: the first one's
        // close was lost.
        let later = ConnUpdate::Accepted {
            conn: ConnId {
                sock: 7,
                start_ns: 99,
            },
            rtt_ns: 0,
        };
        t.apply(&mut open, key("b", 2), &later, none, 10);
        let a = &t.edges[&key("a", 1)];
        assert_eq!((a.active(), a.reconciled), (0, 1));
        assert_eq!(t.edges[&key("b", 2)].active(), 1);
        // A close of the old connection (a stale start) does not end the new one, nor count
        // as a close (its end was already counted), and the kernel tracking the socket for
        // another connection does not keep the new one alive.
        t.apply(&mut open, key("a", 1), &closed(7), none, 10);
        assert_eq!(t.edges[&key("b", 2)].active(), 1);
        assert_eq!((t.edges[&key("a", 1)].closes, t.closes_unmatched), (0, 1));
        assert_eq!(open.reconcile(&mut t, &kernel(&[7])), 0);
        assert_eq!(open.reconcile(&mut t, &kernel(&[7])), 1);
        assert_eq!(t.edges[&key("b", 2)].active(), 0);
    }

    #[test]
    fn a_close_counts_where_its_connection_opened_and_only_if_it_was_seen_open() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        // Its connect was lost: a close alone adds bytes, not a close.
        let sent = traffic(500, 0, 0);
        t.apply(&mut open, key("a", 1), &closed(1), sent, 10);
        let a = &t.edges[&key("a", 1)];
        assert_eq!((a.closes, a.lifetime_ns, a.bytes_sent), (0, 0, 500));
        assert_eq!(t.closes_unmatched, 1);
        // Opened on one edge, closed under another key (the service's name changed): the
        // close is counted on the edge of the open.
        t.apply(
            &mut open,
            key("a", 1),
            &connected(2),
            Traffic::default(),
            10,
        );
        t.apply(&mut open, key("b", 1), &closed(2), Traffic::default(), 10);
        let a = &t.edges[&key("a", 1)];
        assert_eq!(
            (a.connects, a.closes, a.lifetime_ns, a.active()),
            (1, 1, 5, 0)
        );
        assert_eq!(t.edges[&key("b", 1)].closes, 0);
    }

    #[test]
    fn open_is_a_gauge_in_windows_and_sums_over_peers() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        t.apply(&mut open, key("a", 1), &connected(1), none, 10);
        t.apply(&mut open, key("a", 1), &connected(2), none, 10);
        let snap = t.clone();
        t.apply(&mut open, key("a", 1), &closed(1), none, 10);
        let d = t.delta_since(&snap);
        let a = &d.edges[&key("a", 1)];
        assert_eq!((a.closes, a.connects, a.open), (1, 0, 1));
        // Reconciled ends are activity of the window they happen in.
        let snap = t.clone();
        open.reconcile(&mut t, &kernel(&[]));
        assert!(t.delta_since(&snap).edges.is_empty());
        open.reconcile(&mut t, &kernel(&[]));
        assert_eq!(t.delta_since(&snap).edges[&key("a", 1)].reconciled, 1);
        let mut other_peer = key("a", 1);
        other_peer.peer = Some("10.0.0.9".parse().unwrap());
        t.apply(&mut open, other_peer, &connected(3), none, 10);
        t.apply(&mut open, key("a", 1), &connected(4), none, 10);
        let (rows, _) = t.by_destination(10);
        assert_eq!(rows[0].counters.open, 2);
    }

    #[test]
    fn the_open_table_is_bounded() {
        let (mut t, mut open) = (NetTotals::default(), OpenConns::default());
        let none = Traffic::default();
        for sock in 0..MAX_OPEN_CONNS as u64 + 3 {
            t.apply(&mut open, key("a", 1), &connected(sock), none, 10);
        }
        assert_eq!(open.len(), MAX_OPEN_CONNS);
        assert_eq!(t.open_overflowed, 3);
        assert_eq!(t.edges[&key("a", 1)].active(), MAX_OPEN_CONNS as u64);
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
