//! Collectors: every tick, read the kernel maps and procfs and fold what they say into the
//! store. Slow-call and connection events arrive on their own tasks, as they happen.

pub mod cgroups;
pub mod db;
pub mod host;
pub mod listeners;
pub mod net;
pub mod services;
pub mod syscalls;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    config::Config,
    probes::{db::DbProbe, net::NetProbe, syscalls::SyscallProbe},
    store::SharedStore,
};

/// Self-metrics the tick loop updates.
#[derive(Clone, Debug)]
pub struct TickMetrics {
    pub ticks: Counter,
    pub tick_duration: Histogram,
    pub collect_errors: Counter,
}

impl Default for TickMetrics {
    fn default() -> Self {
        Self {
            ticks: Counter::default(),
            // 50 us .. ~400 ms
            tick_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(50e-6, 2.0, 14),
            ),
            collect_errors: Counter::default(),
        }
    }
}

/// How often the tick loop returns free heap memory to the system.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Runs until `shutdown` is cancelled. The tick follows `config` (reloads change it).
pub async fn run_ticks(
    store: SharedStore,
    syscalls: Option<Arc<Mutex<SyscallProbe>>>,
    net: Option<Arc<Mutex<NetProbe>>>,
    db: Option<Arc<Mutex<DbProbe>>>,
    mut config: watch::Receiver<Arc<Config>>,
    metrics: TickMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = config.borrow().agent.tick_interval;
    let mut host_enabled = config.borrow().host.enabled;
    let mut interval = new_interval(tick);
    let mut host = host::HostCollector::new();
    let mut last_trim = Instant::now();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = config.changed() => {
                if changed.is_err() { return; }
                let cfg = config.borrow_and_update().clone();
                host_enabled = cfg.host.enabled;
                if cfg.agent.tick_interval != tick {
                    tick = cfg.agent.tick_interval;
                    interval = new_interval(tick);
                }
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        let sys = match &syscalls {
            Some(p) => match p.lock() {
                Ok(mut p) => match p.read() {
                    Ok(t) => Some(t),
                    Err(e) => {
                        metrics.collect_errors.inc();
                        warn!(error = %crate::probes::error_chain(&e), "reading syscall maps");
                        None
                    }
                },
                Err(_) => None,
            },
            None => None,
        };
        let net_counters = match &net {
            Some(p) => match p.lock().map(|p| p.read_counters()) {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    metrics.collect_errors.inc();
                    warn!(error = %crate::probes::error_chain(&e), "reading network probe counters");
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let db_counters = match &db {
            Some(p) => match p.lock().map(|p| p.read_counters()) {
                Ok(Ok(c)) => Some(c),
                Ok(Err(e)) => {
                    metrics.collect_errors.inc();
                    warn!(error = %crate::probes::error_chain(&e), "reading database probe counters");
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let missed = missed_runs(&syscalls, &net, &db, &metrics);
        let host_sample = if host_enabled {
            match host.sample() {
                Ok(s) => Some(s),
                Err(e) => {
                    metrics.collect_errors.inc();
                    warn!(error = %crate::probes::error_chain(&e), "reading host signals");
                    None
                }
            }
        } else {
            None
        };
        let took = now.elapsed();
        if let Ok(mut st) = store.write() {
            if let Some(t) = sys {
                st.syscalls.push(now, t);
            }
            if net.is_some() {
                if let Some(c) = net_counters {
                    st.net_live.kernel = c;
                }
                // Cheap: edges are shared with the previous snapshot unless they changed.
                let snap = st.net_live.clone();
                st.net.push(now, snap);
            }
            if db.is_some() {
                if let Some(c) = db_counters {
                    st.db_live.kernel = c;
                }
                let snap = st.db_live.clone();
                st.db.push(now, snap);
            }
            for (probe, runs) in missed {
                if let Some(p) = st.probes.get_mut(probe) {
                    p.missed_runs = runs
                        .into_iter()
                        .map(|(prog, n)| (prog.to_string(), n))
                        .collect();
                }
            }
            st.host = host_sample;
            st.ticks += 1;
            st.last_tick = took;
        }
        metrics.ticks.inc();
        metrics.tick_duration.observe(took.as_secs_f64());
        // Hand memory freed since (snapshots aged out, scrapes, replies) back to the system
        // every 10 s, so RSS follows what the agent holds rather than its highest point.
        if last_trim.elapsed() >= TRIM_EVERY {
            crate::limits::trim_heap();
            last_trim = Instant::now();
        }
    }
}

type MissedRuns = Vec<(&'static str, u64)>;

/// The kernel's skipped runs of every attached program, by probe family.
fn missed_runs(
    syscalls: &Option<Arc<Mutex<SyscallProbe>>>,
    net: &Option<Arc<Mutex<NetProbe>>>,
    db: &Option<Arc<Mutex<DbProbe>>>,
    metrics: &TickMetrics,
) -> Vec<(&'static str, MissedRuns)> {
    fn read<P, E: std::error::Error + 'static>(
        probe: &Option<Arc<Mutex<P>>>,
        f: impl FnOnce(&P) -> Result<MissedRuns, E>,
        metrics: &TickMetrics,
    ) -> Option<MissedRuns> {
        let p = probe.as_ref()?.lock().ok()?;
        match f(&p) {
            Ok(v) => Some(v),
            Err(e) => {
                metrics.collect_errors.inc();
                warn!(error = %crate::probes::error_chain(&e), "reading programs' missed runs");
                None
            }
        }
    }
    let mut out = Vec::new();
    if let Some(v) = read(syscalls, SyscallProbe::missed_runs, metrics) {
        out.push(("syscalls", v));
    }
    if let Some(v) = read(net, NetProbe::missed_runs, metrics) {
        out.push(("net", v));
    }
    if let Some(v) = read(db, DbProbe::missed_runs, metrics) {
        out.push(("db", v));
    }
    out
}

/// A ring-buffer record as the `#[repr(C)]` event type the kernel wrote (agent-common), or
/// `None` if the record is too short to be one.
pub(crate) fn decode_event<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is plain data (aya::Pod) and read_unaligned copes with the
    // ring buffer's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn new_interval(period: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(period);
    // A late tick is folded into the next one rather than replayed in a burst.
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}
