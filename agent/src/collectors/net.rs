//! What the kernel counted per connection edge, folded into the store's edges each tick; the
//! walks over the TCP sockets that sample live connections; and the reconciliation of
//! connections whose end went unseen.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    net::{conn_state, direction, NetEdge, NetEdgeKey, FAILURE_REASONS},
    TASK_COMM_LEN,
};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    cgroups::{service_of, CgroupNames},
    listeners::ListenerOwners,
};
use crate::{
    config::Config,
    names::{cgroup2_root, comm_str},
    probes::net::{ConnTable, EdgeTable},
    store::{
        histogram::Log2Histogram,
        net::{Direction, EdgeCounters, EdgeKey, NetTotals},
        SharedStore,
    },
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// How often the kernel's edge table is folded into the store.
pub const FOLD_INTERVAL: Duration = Duration::from_millis(250);
/// How often the tracked connections are checked against the walks that should have found
/// them. A connection whose end went unseen is ended within two walks and this.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(3);
/// A kernel edge unchanged this long, with nothing open on it, leaves the kernel's table.
const EDGE_IDLE: Duration = Duration::from_secs(600);

/// A walk over the TCP sockets that completed: its number and when it started (the kernel's
/// monotonic clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walk {
    pub gen: u64,
    pub started_ns: u64,
}

/// The last two completed walks, as the walker publishes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walks {
    pub previous: Walk,
    pub last: Walk,
}

/// The kernel's monotonic clock (`bpf_ktime_get_ns`), in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// What userspace knows of one kernel edge.
#[derive(Debug)]
struct Seen {
    /// The kernel's counters when last folded.
    last: NetEdge,
    /// The store edge its counts and open connections went to (`None`: not yet, or an
    /// ignored network).
    at: Option<EdgeKey>,
    /// What it adds to the `open` gauge of `at`.
    open: u64,
    /// Its connections userspace ended (found stale), which the kernel still counts open.
    reconciled: u64,
    /// Its peer is in an ignored network: counted as ignored, named nowhere.
    ignored: bool,
    changed: Instant,
}

impl Seen {
    fn new(now: Instant) -> Self {
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
    fn open_now(&self) -> u64 {
        let l = &self.last;
        let kernel = l.connects.wrapping_sub(l.closes).wrapping_sub(l.reconciled) as i64;
        kernel.saturating_sub(self.reconciled as i64).max(0) as u64
    }
}

/// Folds the kernel's per-edge counts into the store's edges: differences since the last
/// fold, named after the edge's service, within `net.max_edges`.
pub struct Folder {
    names: Names,
    seen: HashMap<NetEdgeKey, Seen>,
    /// The kernel's `other` edges (outbound, inbound) when last folded.
    other: [Seen; 2],
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

    fn with_names(names: Names) -> Self {
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
    fn reconciled(&mut self, k: &NetEdgeKey, totals: &mut NetTotals, now: Instant) {
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
    fn forget_idle(&mut self) {
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
    fn of(cfg: &Config) -> Self {
        Self {
            max_edges: cfg.net.max_edges,
            ignored: cfg.net.ignored_networks(),
        }
    }

    fn ignores(&self, ip: IpAddr) -> bool {
        self.ignored.iter().any(|n| n.contains(&ip))
    }
}

/// Adds the difference between `v` and what `s` last saw to the store edge `key`, and moves
/// the edge's open connections there.
fn apply(
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
fn delta(v: &NetEdge, last: &NetEdge) -> EdgeCounters {
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
fn edge_key(k: &NetEdgeKey, names: &mut Names) -> Option<EdgeKey> {
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

/// Folds the kernel's edges into the store every `FOLD_INTERVAL`, removes idle ones, and
/// ends the connections the walks stopped finding, until the task is aborted at shutdown (a
/// failing read is logged once per streak and tried again next time).
pub async fn run_collector(
    (mut edges, mut conns): (EdgeTable, ConnTable),
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
    walks: Option<watch::Receiver<Walks>>,
) {
    let mut folder = Folder::new();
    let mut fold_cfg = (config.borrow().clone(), FoldConfig::default());
    fold_cfg.1 = FoldConfig::of(&fold_cfg.0);
    let mut tick = tokio::time::interval(FOLD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reconcile = Instant::now();
    let mut failing = false;
    loop {
        tick.tick().await;
        let cfg = config.borrow().clone();
        if !Arc::ptr_eq(&cfg, &fold_cfg.0) {
            fold_cfg = (cfg.clone(), FoldConfig::of(&cfg));
        }
        let read = edges.read().and_then(|e| {
            Ok((
                e,
                [
                    edges.other(direction::OUTBOUND)?,
                    edges.other(direction::INBOUND)?,
                ],
            ))
        });
        let (entries, other) = match read {
            Ok(r) => {
                failing = false;
                r
            }
            Err(e) => {
                if !failing {
                    warn!(error = %crate::probes::error_chain(&e), "reading the kernel's connection edges");
                }
                failing = true;
                continue;
            }
        };
        // Stale connections are read before taking the store lock (the read takes time in
        // proportion to the host's connections).
        let stale = match &walks {
            Some(w) if last_reconcile.elapsed() >= RECONCILE_INTERVAL => {
                last_reconcile = Instant::now();
                let walks = *w.borrow();
                stale_conns(&conns, walks)
            }
            _ => Vec::new(),
        };
        let now = Instant::now();
        if let Ok(mut st) = store.write() {
            let t = &mut st.net_live;
            folder.fold(&entries, other, t, &fold_cfg.1, now);
            for (sock, k) in &stale {
                if let Some(k) = k {
                    folder.reconciled(k, t, now);
                }
                conns.remove(*sock);
            }
        }
        if !stale.is_empty() {
            debug!(
                reconciled = stale.len(),
                "connections whose end went unseen ended"
            );
        }
        for k in &folder.idle {
            edges.remove(k);
        }
        folder.forget_idle();
    }
}

/// Tracked connections that two walks in a row, both started after the connection was, did
/// not find: their socket is gone and their end went unseen. (socket, edge) of each.
fn stale_conns(conns: &ConnTable, walks: Walks) -> Vec<(u64, Option<NetEdgeKey>)> {
    if walks.previous.gen == 0 {
        return Vec::new();
    }
    match conns.read() {
        Ok(entries) => entries
            .into_iter()
            .filter(|(_, c)| {
                u64::from(c.walk) < walks.previous.gen && c.start_ns < walks.previous.started_ns
            })
            // A connect that never completed counted nothing: only its entry goes.
            .map(|(sock, c)| {
                (
                    sock,
                    (c.state == conn_state::ESTABLISHED).then(|| c.edge_key()),
                )
            })
            .collect(),
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "reading the tracked connections");
            Vec::new()
        }
    }
}

/// Samples the live connections once per `net.sample_interval` by walking the kernel's TCP
/// sockets (see `NetProbe::walk`), until shutdown. The walk runs on a blocking thread: it
/// takes time in proportion to the host's sockets.
pub async fn run_walker(
    probe: std::sync::Arc<std::sync::Mutex<crate::probes::net::NetProbe>>,
    store: SharedStore,
    config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
    walks: watch::Sender<Walks>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut failing = false;
    let mut last_took = Duration::ZERO;
    let mut gen = 0u64;
    loop {
        let every = walk_interval(config.borrow().net.sample_interval, last_took);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        let p = probe.clone();
        gen += 1;
        let walk = Walk {
            gen,
            started_ns: monotonic_ns(),
        };
        let walked = tokio::task::spawn_blocking(move || match p.lock() {
            Ok(mut p) => {
                let t = std::time::Instant::now();
                p.walk(walk.gen)
                    .map(|()| t.elapsed())
                    .map_err(|e| crate::probes::error_chain(&e))
            }
            Err(_) => Err("network probe lock poisoned".to_string()),
        })
        .await;
        match walked {
            Ok(Ok(took)) => {
                failing = false;
                last_took = took;
                walks.send_modify(|w| {
                    w.previous = w.last;
                    w.last = walk;
                });
                if let Ok(mut st) = store.write() {
                    let w = &mut st.net_walk;
                    w.walks += 1;
                    w.seconds_total += took.as_secs_f64();
                    w.last_seconds = took.as_secs_f64();
                    w.interval_seconds = every.as_secs_f64();
                }
            }
            Ok(Err(e)) => {
                // Once per failing streak; the next interval tries again.
                if !failing {
                    warn!(error = %e, "sampling live connections");
                }
                failing = true;
            }
            Err(e) => warn!(error = %e, "sampling live connections: task failed"),
        }
    }
}

/// The walk costs the agent time in proportion to the host's TCP sockets (TIME_WAIT ones
/// too): it runs at most once per this many times its own duration, so it takes at most
/// 0.5% of a CPU whatever the host holds, and live connections are sampled less often on
/// hosts with very many sockets.
const WALK_DUTY: u32 = 200;

/// Time until the next walk: the sample interval, or longer when the last walk was slow.
fn walk_interval(sample_interval: Duration, last_took: Duration) -> Duration {
    sample_interval.max(last_took.saturating_mul(WALK_DUTY))
}

/// Service names by cgroup id, cached, with interned strings (every event of an edge shares
/// one allocation).
pub struct Names {
    cgroups: CgroupNames,
    listeners: ListenerOwners,
    interned: std::collections::HashMap<String, Arc<str>>,
    /// Services named for what an event carries: the events of one service cost a lookup,
    /// no allocation. Named again after `EVENT_NAME_TTL` (a cgroup found by a later scan).
    by_event: std::collections::HashMap<EventOwner, (Arc<str>, Instant)>,
    comms: std::collections::HashMap<[u8; TASK_COMM_LEN], Arc<str>>,
}

/// What names an event's service: its cgroup, command name and (inbound) listening port.
type EventOwner = (u64, [u8; TASK_COMM_LEN], u16);

/// How long a service named from an event's (cgroup, command, port) is reused.
const EVENT_NAME_TTL: Duration = Duration::from_secs(10);
/// Entries of each event-name cache before it starts afresh.
const MAX_EVENT_NAMES: usize = 10_000;

impl Names {
    pub fn new() -> Self {
        Self {
            cgroups: CgroupNames::new(cgroup2_root()),
            listeners: ListenerOwners::new(),
            interned: std::collections::HashMap::new(),
            by_event: std::collections::HashMap::new(),
            comms: std::collections::HashMap::new(),
        }
    }

    /// [`Self::service`] for an event's raw command name, cached.
    pub(crate) fn service_of_event(
        &mut self,
        cgroup_id: u64,
        comm: &[u8; TASK_COMM_LEN],
        listen_port: Option<u16>,
    ) -> Arc<str> {
        let key = (cgroup_id, *comm, listen_port.unwrap_or(0));
        if let Some((name, at)) = self.by_event.get(&key) {
            if at.elapsed() < EVENT_NAME_TTL {
                return name.clone();
            }
        }
        let name = self.service(cgroup_id, &comm_str(comm), listen_port);
        if self.by_event.len() >= MAX_EVENT_NAMES {
            self.by_event = std::collections::HashMap::new();
        }
        self.by_event.insert(key, (name.clone(), Instant::now()));
        name
    }

    /// An event's raw command name, interned and cached.
    pub(crate) fn comm(&mut self, comm: &[u8; TASK_COMM_LEN]) -> Arc<str> {
        if let Some(c) = self.comms.get(comm) {
            return c.clone();
        }
        let name = self.intern(comm_str(comm));
        if self.comms.len() >= MAX_EVENT_NAMES {
            self.comms = std::collections::HashMap::new();
        }
        self.comms.insert(*comm, name.clone());
        name
    }

    /// The systemd unit of the cgroup; else the cgroup path (unless it is the root); else the
    /// process name (for inbound connections: of the listener on `listen_port`); else
    /// `unknown`.
    pub(crate) fn service(
        &mut self,
        cgroup_id: u64,
        comm: &str,
        listen_port: Option<u16>,
    ) -> Arc<str> {
        let path = self.cgroups.resolve(cgroup_id);
        let name = path
            .as_deref()
            .and_then(service_of)
            .or_else(|| path.filter(|p| p != "/"))
            .or_else(|| (!comm.is_empty()).then(|| comm.to_string()))
            .or_else(|| listen_port.and_then(|p| self.listeners.owner(p)))
            .unwrap_or_else(|| "unknown".to_string());
        self.intern(name)
    }

    /// One shared allocation per distinct name (bounded).
    pub(crate) fn intern(&mut self, name: String) -> Arc<str> {
        if self.interned.len() > 10_000 {
            self.interned.clear();
        }
        self.interned
            .entry(name)
            .or_insert_with_key(|k| Arc::from(k.as_str()))
            .clone()
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

fn addr(family: u16, raw: &[u8; 16]) -> Option<IpAddr> {
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
            cgroups: CgroupNames::new(None),
            listeners: ListenerOwners::new(),
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

    #[test]
    fn the_walk_runs_at_most_half_a_percent_of_the_time() {
        let s = Duration::from_secs(1);
        assert_eq!(walk_interval(s, Duration::ZERO), s);
        assert_eq!(walk_interval(s, Duration::from_millis(2)), s);
        assert_eq!(
            walk_interval(s, Duration::from_millis(20)),
            Duration::from_secs(4)
        );
    }
}
