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
    sock::af::{INET as AF_INET, INET6 as AF_INET6},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::{
    config::Config,
    probes::net::{ConnTable, EdgeTable},
    store::{
        histogram::Log2Histogram,
        net::{Direction, EdgeCounters, EdgeKey, NetTotals},
        SharedStore,
    },
};

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

mod fold;

pub use fold::{FoldConfig, Folder};

/// How long before a collector tick the edges are folded, so the tick (and the alert engine
/// right after it) sees them fresh rather than up to a fold interval late.
const FOLD_LEAD: Duration = Duration::from_millis(40);

/// Folds the kernel's edges into the store just before each collector tick (and at least every
/// `FOLD_INTERVAL`), removes idle ones, and
/// ends the connections the walks stopped finding, until the task is aborted at shutdown (a
/// failing read is logged once per streak and tried again next time).
pub async fn run_collector(
    (mut edges, mut conns): (EdgeTable, ConnTable),
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
    walks: Option<watch::Receiver<Walks>>,
    mut ticks: watch::Receiver<u64>,
) {
    let mut folder = Folder::new();
    let mut fold_cfg = (config.borrow().clone(), FoldConfig::default());
    fold_cfg.1 = FoldConfig::of(&fold_cfg.0);
    let mut last_reconcile = Instant::now();
    let mut failing = false;
    let (mut last_tick, mut last_fold) = (Instant::now(), Instant::now());
    loop {
        let tick_every = config.borrow().agent.tick_interval;
        let before_tick = last_tick + tick_every.saturating_sub(FOLD_LEAD);
        let every = last_fold + FOLD_INTERVAL;
        let deadline = if before_tick > last_fold {
            before_tick.min(every)
        } else {
            every
        };
        tokio::select! {
            r = ticks.changed() => {
                if r.is_err() {
                    return;
                }
                last_tick = Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        last_fold = Instant::now();
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

#[cfg(test)]
mod tests {
    use super::*;

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
