//! Connection events from the kernel ring buffer into the store's connection edges.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    net::{conn_state, direction, kind, NetEvent, NET_DRAIN_INTERVAL_MS},
    TASK_COMM_LEN,
};
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, warn};

use super::{
    cgroups::{service_of, CgroupNames},
    listeners::ListenerOwners,
};
use crate::{
    config::Config,
    probes::{cgroup2_root, net::ConnTable, syscalls::comm_str},
    store::{
        net::{ConnId, ConnUpdate, Direction, EdgeKey, FailureReason, Traffic},
        SharedStore,
    },
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// One decoded event: the edge it belongs to and what happened on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub key: EdgeKey,
    pub update: ConnUpdate,
    /// The process that connected (outbound events), by pid and comm.
    pub process: Option<(u32, Arc<str>)>,
    pub traffic: Traffic,
}

/// Reads connection events until the ring buffer's fd fails (the probe was dropped).
pub async fn run_event_reader(
    ring: RingBuf<MapData>,
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "cannot poll the connection-event ring buffer");
            return;
        }
    };
    let mut names = Names::new();
    let mut nets_of = {
        let cfg = config.borrow().clone();
        let nets = cfg.net.ignored_networks();
        (cfg, nets)
    };
    // The kernel wakes us only when a batch has built up (see wakeup_flags in the kernel
    // program); the timer drains whatever trickled in meanwhile.
    let mut drain = tokio::time::interval(Duration::from_millis(NET_DRAIN_INTERVAL_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        debug!(error = %crate::probes::error_chain(&e), "connection-event ring buffer closed");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    batch.push(super::decode_event::<NetEvent>(&item));
                }
                guard.clear_ready();
            }
            _ = drain.tick() => {
                let ring = fd.get_mut();
                while let Some(item) = ring.next() {
                    batch.push(super::decode_event::<NetEvent>(&item));
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        // The networks are parsed once per config (reload), not per batch.
        let cfg = config.borrow().clone();
        if !Arc::ptr_eq(&cfg, &nets_of.0) {
            nets_of = (cfg.clone(), cfg.net.ignored_networks());
        }
        let (max_edges, ignored_nets) = (cfg.net.max_edges, &nets_of.1);
        // Name everything before taking the store lock: a cgroup rescan reads the tree.
        let mut observations = Vec::with_capacity(batch.len());
        let mut ignored = 0u64;
        for ev in &batch {
            match ev.as_ref().and_then(|ev| observe(ev, &mut names)) {
                Some(o)
                    if o.key
                        .peer
                        .is_some_and(|p| ignored_nets.iter().any(|n| n.contains(&p))) =>
                {
                    ignored += 1
                }
                Some(o) => observations.push(o),
                None => ignored += 1,
            }
        }
        if let Ok(mut st) = store.write() {
            let st = &mut *st;
            let (t, open) = (&mut st.net_live, &mut st.net_open);
            t.events += batch.len() as u64;
            t.ignored += ignored;
            for o in observations {
                let key = o.process.as_ref().map(|_| o.key.clone());
                t.apply(open, o.key, &o.update, o.traffic, max_edges);
                if let (Some(key), Some((pid, comm))) = (key, &o.process) {
                    t.note_process(&key, *pid, comm);
                }
            }
        }
    }
}

/// How often the open connections are checked against the kernel's table. With
/// `RECONCILE_MISSES` passes a lost close is healed within 6 to 9 s; a pass reads the whole
/// table in a few batched syscalls.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(3);

/// Samples the live connections once per `net.sample_interval` by walking the kernel's TCP
/// sockets (see `NetProbe::walk`), until shutdown. The walk runs on a blocking thread: it
/// takes time in proportion to the host's sockets.
pub async fn run_walker(
    probe: std::sync::Arc<std::sync::Mutex<crate::probes::net::NetProbe>>,
    store: SharedStore,
    config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    let mut last_took = Duration::ZERO;
    loop {
        let every = walk_interval(config.borrow().net.sample_interval, last_took);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::daemon::shutdown_requested(&mut shutdown) => return,
        }
        let p = probe.clone();
        let walked = tokio::task::spawn_blocking(move || match p.lock() {
            Ok(mut p) => {
                let t = std::time::Instant::now();
                p.walk()
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

/// Reconciles the open connections against the kernel's table of tracked ones, forever
/// (the task is aborted at shutdown).
pub async fn run_reconciler(table: ConnTable, store: SharedStore) {
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        // Read before taking the store lock: the events applied meanwhile are what the two
        // passes allow for.
        let kernel: std::collections::HashMap<u64, u64> = match table.read() {
            Ok(entries) => {
                failing = false;
                entries
                    .into_iter()
                    .filter(|(_, c)| c.state == conn_state::ESTABLISHED)
                    .map(|(sock, c)| (sock, c.start_ns))
                    .collect()
            }
            Err(e) => {
                // Once per failing streak: a pass that cannot read gives up nothing.
                if !failing {
                    warn!(error = %crate::probes::error_chain(&e), "reconciling open connections");
                }
                failing = true;
                continue;
            }
        };
        if let Ok(mut st) = store.write() {
            let st = &mut *st;
            let n = st.net_open.reconcile(&mut st.net_live, &kernel);
            if n > 0 {
                debug!(
                    reconciled = n,
                    open = st.net_open.len(),
                    "connections closed by reconciliation"
                );
            }
        }
    }
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

/// The edge and update an event stands for; `None` for events we cannot place.
pub fn observe(ev: &NetEvent, names: &mut Names) -> Option<Observation> {
    let local = addr(ev.family, &ev.saddr)?;
    let remote = addr(ev.family, &ev.daddr)?;
    let (dir, destination) = match ev.direction {
        direction::OUTBOUND => (Direction::Outbound, SocketAddr::new(remote, ev.dport)),
        direction::INBOUND => (Direction::Inbound, SocketAddr::new(local, ev.sport)),
        _ => return None,
    };
    let rtt_ns = u64::from(ev.srtt_us) * 1000;
    // A connection starts at its CONNECT or ACCEPT event; a CLOSE is stamped a lifetime later.
    let started = |start_ns| ConnId {
        sock: ev.sock,
        start_ns,
    };
    let update = match ev.kind {
        kind::CONNECT => ConnUpdate::Connected {
            conn: started(ev.ts_ns),
            connect_ns: ev.duration_ns,
            rtt_ns,
        },
        kind::CONNECT_FAILED => ConnUpdate::Failed {
            reason: FailureReason::from_errno(ev.error),
        },
        kind::ACCEPT => ConnUpdate::Accepted {
            conn: started(ev.ts_ns),
            rtt_ns,
        },
        kind::CLOSE => ConnUpdate::Closed {
            conn: started(ev.ts_ns.saturating_sub(ev.duration_ns)),
            lifetime_ns: ev.duration_ns,
            rtt_ns,
        },
        kind::SAMPLE => ConnUpdate::Sampled { rtt_ns },
        kind::RETRANSMIT => ConnUpdate::Retransmitted,
        _ => return None,
    };
    let listen_port = (dir == Direction::Inbound).then_some(ev.sport);
    let service = names.service_of_event(ev.cgroup_id, &ev.comm, listen_port);
    let process = (ev.pid != 0).then(|| (ev.pid, names.comm(&ev.comm)));
    Some(Observation {
        key: EdgeKey {
            direction: dir,
            service,
            peer: Some(remote),
            destination: Some(destination),
        },
        update,
        process,
        traffic: Traffic {
            sent: ev.bytes_sent,
            received: ev.bytes_received,
            retransmits: u64::from(ev.retransmits),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_without_cgroups() -> Names {
        Names {
            cgroups: CgroupNames::new(None),
            listeners: ListenerOwners::new(),
            interned: Default::default(),
            by_event: Default::default(),
            comms: Default::default(),
        }
    }

    fn event(kind: u8, dir: u8, family: u16) -> NetEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        let mut daddr = [0u8; 16];
        if family == AF_INET {
            saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
            daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        } else {
            saddr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
            daddr = "::ffff:192.0.2.7".parse::<Ipv6Addr>().unwrap().octets();
        }
        NetEvent {
            ts_ns: 1,
            sock: 0xffff_0000,
            cgroup_id: u64::MAX,
            duration_ns: 3_000_000,
            bytes_sent: 100,
            bytes_received: 200,
            saddr,
            daddr,
            pid: 42,
            srtt_us: 250,
            retransmits: 2,
            error: libc::ECONNREFUSED,
            sport: 40000,
            dport: 5432,
            family,
            kind,
            direction: dir,
            comm,
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

    #[test]
    fn outbound_connect_is_keyed_by_remote_destination() {
        let mut names = names_without_cgroups();
        let o = observe(
            &event(kind::CONNECT, direction::OUTBOUND, AF_INET),
            &mut names,
        )
        .unwrap();
        assert_eq!(o.key.direction, Direction::Outbound);
        assert_eq!(&*o.key.service, "curl");
        assert_eq!(o.key.destination_label(), "10.0.0.2:5432");
        assert_eq!(
            o.update,
            ConnUpdate::Connected {
                conn: ConnId {
                    sock: 0xffff_0000,
                    start_ns: 1
                },
                connect_ns: 3_000_000,
                rtt_ns: 250_000
            }
        );
        assert_eq!(
            (o.traffic.sent, o.traffic.received, o.traffic.retransmits),
            (100, 200, 2)
        );
    }

    #[test]
    fn inbound_is_keyed_by_local_port_and_v4_mapped_peers_are_v4() {
        let mut names = names_without_cgroups();
        let mut ev = event(kind::ACCEPT, direction::INBOUND, AF_INET6);
        ev.comm = [0; 16];
        let o = observe(&ev, &mut names).unwrap();
        assert_eq!(o.key.destination_label(), "[fd00::1]:40000");
        assert_eq!(o.key.peer, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(&*o.key.service, "unknown");
    }

    #[test]
    fn a_close_names_the_connection_its_connect_started() {
        let mut names = names_without_cgroups();
        let mut ev = event(kind::CLOSE, direction::OUTBOUND, AF_INET);
        ev.ts_ns = 5_000_000;
        ev.duration_ns = 3_000_000;
        let o = observe(&ev, &mut names).unwrap();
        assert_eq!(
            o.update,
            ConnUpdate::Closed {
                conn: ConnId {
                    sock: 0xffff_0000,
                    start_ns: 2_000_000
                },
                lifetime_ns: 3_000_000,
                rtt_ns: 250_000
            }
        );
    }

    #[test]
    fn failures_and_junk() {
        let mut names = names_without_cgroups();
        let o = observe(
            &event(kind::CONNECT_FAILED, direction::OUTBOUND, AF_INET),
            &mut names,
        )
        .unwrap();
        assert_eq!(
            o.update,
            ConnUpdate::Failed {
                reason: FailureReason::Refused
            }
        );
        assert!(observe(&event(99, direction::OUTBOUND, AF_INET), &mut names).is_none());
        assert!(observe(&event(kind::CONNECT, 7, AF_INET), &mut names).is_none());
        assert!(observe(&event(kind::CONNECT, direction::OUTBOUND, 1), &mut names).is_none());
        assert!(crate::collectors::decode_event::<NetEvent>(&[0u8; 8]).is_none());
    }
}
