//! The fold of the kernel's per-edge counts into the store's edges: differences since the
//! last read, named after each edge's service, within `net.max_edges`; the `open` gauge;
//! connections reconciled.

use super::*;
use crate::collectors::services::Names;

/// What userspace knows of one kernel edge.
#[derive(Debug)]
pub(super) struct Seen {
    /// The kernel's counters when last folded.
    pub(super) last: NetEdge,
    /// The store edge its counts and open connections went to (`None`: not yet, or an
    /// ignored network).
    pub(super) at: Option<EdgeKey>,
    /// What it adds to the `open` gauge of `at`.
    pub(super) open: u64,
    /// Its connections userspace ended (found stale), which the kernel still counts open.
    pub(super) reconciled: u64,
    /// Its peer is in an ignored network: counted as ignored, named nowhere.
    pub(super) ignored: bool,
    pub(super) changed: Instant,
}

impl Seen {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            last: NetEdge::default(),
            at: None,
            open: 0,
            reconciled: 0,
            ignored: false,
            changed: now,
        }
    }

    /// Connections open on it now.
    pub(super) fn open_now(&self) -> u64 {
        let l = &self.last;
        let kernel = l.connects.wrapping_sub(l.closes).wrapping_sub(l.reconciled) as i64;
        kernel.saturating_sub(self.reconciled as i64).max(0) as u64
    }
}

/// Folds the kernel's per-edge counts into the store's edges: differences since the last
/// fold, named after the edge's service, within `net.max_edges`.
pub struct Folder {
    pub(super) names: Names,
    pub(super) seen: HashMap<NetEdgeKey, Seen>,
    /// The kernel's `other` edges (outbound, inbound) when last folded.
    pub(super) other: [Seen; 2],
    /// Idle kernel edges found by the last fold, to remove from the kernel's table.
    pub idle: Vec<NetEdgeKey>,
}

impl Default for Folder {
    fn default() -> Self {
        Self::new()
    }
}

impl Folder {
    pub fn new() -> Self {
        Self::with_names(Names::new())
    }

    pub(super) fn with_names(names: Names) -> Self {
        let now = Instant::now();
        Self {
            names,
            seen: HashMap::new(),
            other: [Seen::new(now), Seen::new(now)],
            idle: Vec::new(),
        }
    }

    /// Kernel edges it knows of.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Adds what changed in `entries` (every kernel edge) and `other` (the kernel's `other`
    /// edges, outbound then inbound) to `totals`.
    pub fn fold(
        &mut self,
        entries: &[(NetEdgeKey, NetEdge)],
        other: [NetEdge; 2],
        totals: &mut NetTotals,
        cfg: &FoldConfig,
        now: Instant,
    ) {
        self.idle.clear();
        for (k, v) in entries {
            let s = self.seen.entry(*k).or_insert_with(|| Seen::new(now));
            if *v == s.last && (s.at.is_some() || s.ignored) {
                if now.duration_since(s.changed) >= EDGE_IDLE && s.open_now() == 0 {
                    self.idle.push(*k);
                }
                continue;
            }
            let key = edge_key(k, &mut self.names);
            let Some(key) = key.filter(|k| !k.peer.is_some_and(|p| cfg.ignores(p))) else {
                // Counted, never named: an ignored network (or an address family we do not
                // know).
                let d = delta(v, &s.last);
                totals.ignored += d.connects + d.closes + d.failures_total();
                s.ignored = true;
                s.last = *v;
                s.changed = now;
                continue;
            };
            let pid = (v.last_pid != s.last.last_pid || v.connects != s.last.connects)
                .then_some(v.last_pid)
                .filter(|&p| p != 0);
            apply(s, &key, v, totals, cfg.max_edges, now);
            if let (Some(pid), Some(at)) = (pid, &s.at) {
                let comm = self.names.comm(&k.comm);
                totals.note_process(at, pid, &comm);
            }
        }
        for (i, v) in other.iter().enumerate() {
            let dir = if i == 0 {
                Direction::Outbound
            } else {
                Direction::Inbound
            };
            let s = &mut self.other[i];
            if *v != s.last {
                apply(s, &EdgeKey::other(dir), v, totals, usize::MAX, now);
            }
        }
    }

    /// Ends a connection the kernel tracked but that is gone unseen: counted as reconciled on
    /// its edge, and no longer open there.
    pub(super) fn reconciled(&mut self, k: &NetEdgeKey, totals: &mut NetTotals, now: Instant) {
        let s = self.seen.entry(*k).or_insert_with(|| Seen::new(now));
        s.reconciled += 1;
        s.changed = now;
        if let Some(at) = s.at.clone() {
            let gone = EdgeCounters {
                reconciled: 1,
                ..EdgeCounters::default()
            };
            totals.add(&at, &gone, usize::MAX);
            let open = s.open_now();
            totals.move_open(Some(&at), s.open, &at, open);
            s.open = open;
        }
    }

    /// Forgets the edges it handed over as idle (they left the kernel's table).
    pub(super) fn forget_idle(&mut self) {
        for k in &self.idle {
            self.seen.remove(k);
        }
        self.idle.clear();
    }
}

/// What a fold needs of the config.
#[derive(Debug, Clone, Default)]
pub struct FoldConfig {
    pub max_edges: usize,
    pub ignored: Vec<ipnet::IpNet>,
}

impl FoldConfig {
    pub(super) fn of(cfg: &Config) -> Self {
        Self {
            max_edges: cfg.net.max_edges,
            ignored: cfg.net.ignored_networks(),
        }
    }

    pub(super) fn ignores(&self, ip: IpAddr) -> bool {
        self.ignored.iter().any(|n| n.contains(&ip))
    }
}

/// Adds the difference between `v` and what `s` last saw to the store edge `key`, and moves
/// the edge's open connections there.
pub(super) fn apply(
    s: &mut Seen,
    key: &EdgeKey,
    v: &NetEdge,
    totals: &mut NetTotals,
    max: usize,
    now: Instant,
) {
    let d = delta(v, &s.last);
    let at = totals.add(key, &d, max);
    s.last = *v;
    s.changed = now;
    let open = s.open_now();
    totals.move_open(s.at.as_ref(), s.open, &at, open);
    s.open = open;
    s.at = Some(at);
}

/// `v - last` as edge counters (wrapping: the kernel's 32-bit fields wrap).
pub(super) fn delta(v: &NetEdge, last: &NetEdge) -> EdgeCounters {
    let hist = |buckets: &[u32], before: &[u32], sum: u64, sum_before: u64| {
        let mut h = Log2Histogram {
            sum_ns: sum.wrapping_sub(sum_before),
            ..Log2Histogram::default()
        };
        for (i, b) in h.buckets.iter_mut().enumerate() {
            *b = u64::from(buckets[i].wrapping_sub(before[i]));
            h.count += *b;
        }
        h
    };
    let mut failures = [0u64; FAILURE_REASONS];
    for (i, f) in failures.iter_mut().enumerate() {
        *f = u64::from(v.failures[i].wrapping_sub(last.failures[i]));
    }
    EdgeCounters {
        connects: v.connects.wrapping_sub(last.connects),
        failures,
        connect_time: hist(
            &v.connect_buckets,
            &last.connect_buckets,
            v.connect_sum_ns,
            last.connect_sum_ns,
        ),
        rtt: hist(
            &v.rtt_buckets,
            &last.rtt_buckets,
            v.rtt_sum_ns,
            last.rtt_sum_ns,
        ),
        closes: v.closes.wrapping_sub(last.closes),
        lifetime_ns: v.lifetime_ns.wrapping_sub(last.lifetime_ns),
        bytes_sent: v.bytes_sent.wrapping_sub(last.bytes_sent),
        bytes_received: v.bytes_received.wrapping_sub(last.bytes_received),
        retransmits: v.retransmits.wrapping_sub(last.retransmits),
        reconciled: v.reconciled.wrapping_sub(last.reconciled),
        open: 0,
        processes: Vec::new(),
    }
}

/// The store edge a kernel edge is named as; `None` for an address family we do not know.
pub(super) fn edge_key(k: &NetEdgeKey, names: &mut Names) -> Option<EdgeKey> {
    let peer = addr(k.family, &k.peer)?;
    let dest = SocketAddr::new(addr(k.family, &k.dest)?, k.dport);
    let dir = match k.direction {
        direction::OUTBOUND => Direction::Outbound,
        direction::INBOUND => Direction::Inbound,
        _ => return None,
    };
    let listen_port = (dir == Direction::Inbound).then_some(k.dport);
    Some(EdgeKey {
        direction: dir,
        service: names.service_of_event(k.cgroup_id, &k.comm, listen_port),
        peer: Some(peer),
        destination: Some(dest),
    })
}

pub(super) fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        // v4-mapped addresses (an AF_INET6 socket talking to an IPv4 peer) show as IPv4.
        AF_INET6 => Some(Ipv6Addr::from(*raw).to_canonical()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::net::FailureReason;

    fn folder() -> Folder {
        Folder::with_names(Names {
            cgroups: crate::collectors::cgroups::CgroupNames::new(None),
            listeners: crate::collectors::listeners::ListenerOwners::new(),
            interned: Default::default(),
            by_event: Default::default(),
            comms: Default::default(),
        })
    }

    fn cfg() -> FoldConfig {
        FoldConfig {
            max_edges: 100,
            ignored: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    fn kkey(dir: u8, peer: [u8; 4]) -> NetEdgeKey {
        let mut k = NetEdgeKey {
            cgroup_id: u64::MAX,
            comm: [0; 16],
            peer: [0; 16],
            dest: [0; 16],
            dport: 5432,
            family: AF_INET,
            direction: dir,
            _pad: [0; 3],
        };
        k.comm[..4].copy_from_slice(b"curl");
        k.peer[..4].copy_from_slice(&peer);
        k.dest[..4].copy_from_slice(if dir == direction::OUTBOUND {
            &peer
        } else {
            &[10, 0, 0, 1]
        });
        k
    }

    fn store_key(f: &mut Folder, k: &NetEdgeKey) -> EdgeKey {
        edge_key(k, &mut f.names).unwrap()
    }

    #[test]
    fn kernel_counts_fold_as_differences_under_their_service() {
        let mut f = folder();
        let mut t = NetTotals::default();
        let now = Instant::now();
        let k = kkey(direction::OUTBOUND, [10, 0, 0, 2]);
        let mut v = NetEdge {
            connects: 3,
            closes: 1,
            lifetime_ns: 7,
            bytes_sent: 100,
            last_pid: 42,
            connect_sum_ns: 3000,
            ..NetEdge::default()
        };
        v.connect_buckets[agent_common::log2_bucket(1000)] = 3;
        v.failures[agent_common::net::failure_index(libc::ECONNREFUSED)] = 4;
        f.fold(&[(k, v)], Default::default(), &mut t, &cfg(), now);
        let key = store_key(&mut f, &k);
        assert_eq!(&*key.service, "curl");
        assert_eq!(key.destination_label(), "10.0.0.2:5432");
        let e = &t.edges[&key];
        assert_eq!(
            (e.connects, e.closes, e.active(), e.bytes_sent),
            (3, 1, 2, 100)
        );
        assert_eq!(e.connect_time.count, 3);
        assert_eq!(e.connect_time.sum_ns, 3000);
        assert_eq!(e.failure(FailureReason::Refused), 4);
        assert_eq!(e.processes, vec![(42, Arc::from("curl"))]);
        // Only what changed is added; the gauge follows the kernel's.
        v.connects = 5;
        v.closes = 4;
        v.connect_buckets[agent_common::log2_bucket(1000)] = 5;
        f.fold(&[(k, v)], Default::default(), &mut t, &cfg(), now);
        let e = &t.edges[&key];
        assert_eq!((e.connects, e.closes, e.active()), (5, 4, 1));
        assert_eq!(e.connect_time.count, 5);
        assert_eq!(e.failure(FailureReason::Refused), 4);
    }

    #[test]
    fn ignored_networks_and_full_kernel_tables() {
        let mut f = folder();
        let mut t = NetTotals::default();
        let k = kkey(direction::INBOUND, [192, 0, 2, 7]);
        let v = NetEdge {
            connects: 2,
            closes: 2,
            ..NetEdge::default()
        };
        let other = [
            NetEdge::default(),
            NetEdge {
                connects: 9,
                closes: 8,
                ..NetEdge::default()
            },
        ];
        f.fold(&[(k, v)], other, &mut t, &cfg(), Instant::now());
        assert_eq!(t.ignored, 4);
        assert_eq!(t.edges.len(), 1);
        let o = &t.edges[&EdgeKey::other(Direction::Inbound)];
        assert_eq!((o.connects, o.active()), (9, 1));
    }

    #[test]
    fn a_connection_ended_unseen_is_reconciled_and_leaves_the_gauge() {
        let mut f = folder();
        let mut t = NetTotals::default();
        let now = Instant::now();
        let k = kkey(direction::OUTBOUND, [10, 0, 0, 2]);
        let v = NetEdge {
            connects: 2,
            ..NetEdge::default()
        };
        f.fold(&[(k, v)], Default::default(), &mut t, &cfg(), now);
        f.reconciled(&k, &mut t, now);
        let key = store_key(&mut f, &k);
        let e = &t.edges[&key];
        assert_eq!((e.connects, e.reconciled, e.active()), (2, 1, 1));
        // The kernel still counts it open: it stays out of the gauge, and its edge is not
        // idle while the other one is open.
        f.fold(
            &[(k, v)],
            Default::default(),
            &mut t,
            &cfg(),
            now + EDGE_IDLE,
        );
        assert_eq!(t.edges[&key].active(), 1);
        assert!(f.idle.is_empty());
        // The other one closes; the edge goes idle once nothing is open for EDGE_IDLE.
        let closed = NetEdge { closes: 1, ..v };
        f.fold(&[(k, closed)], Default::default(), &mut t, &cfg(), now);
        let e = &t.edges[&key];
        assert_eq!((e.closes, e.reconciled, e.active()), (1, 1, 0));
        f.fold(
            &[(k, closed)],
            Default::default(),
            &mut t,
            &cfg(),
            now + EDGE_IDLE,
        );
        assert_eq!(f.idle, vec![k]);
        f.forget_idle();
        assert!(f.is_empty());
    }

    #[test]
    fn the_kernel_and_userspace_agree_on_failure_reasons() {
        for (i, r) in FailureReason::ALL.iter().enumerate() {
            let errno = match r {
                FailureReason::Refused => libc::ECONNREFUSED,
                FailureReason::TimedOut => libc::ETIMEDOUT,
                FailureReason::Reset => libc::ECONNRESET,
                FailureReason::Unreachable => libc::EHOSTUNREACH,
                FailureReason::Aborted => 0,
                FailureReason::Other => libc::EPIPE,
            };
            assert_eq!(agent_common::net::failure_index(errno), i, "{r:?}");
            assert_eq!(FailureReason::from_errno(errno), *r);
        }
        for errno in [libc::ENETUNREACH, libc::EHOSTDOWN, libc::ENETDOWN] {
            assert_eq!(agent_common::net::failure_index(errno), 3);
        }
    }
}
