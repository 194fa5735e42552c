//! Collectors: every tick, read the kernel maps and procfs and fold what they say into the
//! store, one family after another (`TickSource`). Events from the rings arrive on each
//! family's own tasks, as they happen.

pub mod cgroups;
pub mod db;
pub mod host;
pub mod listeners;
pub mod net;
pub mod services;
pub mod syscalls;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tokio::sync::watch;
use tracing::warn;

use crate::{
    config::Config,
    store::{SharedStore, Store},
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

/// Writes one family's tick reading into the store, under its write lock (no I/O in it).
pub type Fold = Box<dyn FnOnce(&mut Store) + Send>;

/// Runs the kernel skipped, per program of a family.
pub type MissedRuns = Vec<(&'static str, u64)>;

/// What one family read at a tick: its fold, and what failed on the way (the fold may still
/// carry the rest).
#[derive(Default)]
pub struct Reading {
    pub fold: Option<Fold>,
    pub error: Option<String>,
}

impl Reading {
    pub fn fold(f: impl FnOnce(&mut Store) + Send + 'static) -> Self {
        Self {
            fold: Some(Box::new(f)),
            error: None,
        }
    }

    pub fn with_error(mut self, error: Option<String>) -> Self {
        self.error = error;
        self
    }

    /// The reading of a family's kernel read `read` (`None`: not attached, nothing to do):
    /// `fold` runs with what was read, or with `None` when the read failed (the error is
    /// reported).
    pub fn of<T: Send + 'static, E: std::error::Error + 'static>(
        read: Option<Result<T, E>>,
        fold: impl FnOnce(&mut Store, Option<T>) + Send + 'static,
    ) -> Self {
        match read {
            None => Self::default(),
            Some(Ok(t)) => Self::fold(move |st| fold(st, Some(t))),
            Some(Err(e)) => {
                let error = crate::probes::error_chain(&e);
                Self::fold(move |st| fold(st, None)).with_error(Some(error))
            }
        }
    }
}

/// What the tick loop asks of every family.
pub trait TickSource: Send + Sync {
    /// The family's name, as in `status` and every metric's `probe` label.
    fn name(&self) -> &'static str;
    /// Reads the family's kernel maps (or procfs) outside the store's lock.
    fn read(&self, now: Instant) -> Reading;
    /// The kernel's skipped runs of the family's programs, when it has any attached.
    fn missed_runs(&self) -> Option<Result<MissedRuns, String>> {
        None
    }
}

/// Runs until `shutdown` is cancelled. The tick follows `config` (reloads change it).
pub async fn run_ticks(
    store: SharedStore,
    families: Vec<Arc<dyn TickSource>>,
    mut config: watch::Receiver<Arc<Config>>,
    metrics: TickMetrics,
    ticked: watch::Sender<u64>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = config.borrow().agent.tick_interval;
    let mut interval = new_interval(tick);
    let mut last_trim = Instant::now();
    let mut folds: Vec<Fold> = Vec::with_capacity(families.len());
    let mut missed: Vec<(&'static str, MissedRuns)> = Vec::with_capacity(families.len());
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            changed = config.changed() => {
                if changed.is_err() { return; }
                let cfg = config.borrow_and_update().clone();
                if cfg.agent.tick_interval != tick {
                    tick = cfg.agent.tick_interval;
                    interval = new_interval(tick);
                }
                continue;
            }
            _ = shutdown.cancelled() => return,
        }
        let now = Instant::now();
        for f in &families {
            let reading = f.read(now);
            if let Some(e) = reading.error {
                metrics.collect_errors.inc();
                warn!(family = f.name(), error = %e, "tick: reading the family's counts");
            }
            folds.extend(reading.fold);
            match f.missed_runs() {
                Some(Ok(runs)) => missed.push((f.name(), runs)),
                Some(Err(e)) => {
                    metrics.collect_errors.inc();
                    warn!(family = f.name(), error = %e, "tick: reading programs' missed runs");
                }
                None => {}
            }
        }
        let took = now.elapsed();
        if let Ok(mut st) = store.write() {
            for fold in folds.drain(..) {
                fold(&mut st);
            }
            for (probe, runs) in missed.drain(..) {
                if let Some(p) = st.probes.get_mut(probe) {
                    p.missed_runs = runs
                        .into_iter()
                        .map(|(prog, n)| (prog.to_string(), n))
                        .collect();
                }
            }
            st.ticks += 1;
            st.last_tick = took;
        }
        folds.clear();
        missed.clear();
        // What reads the store right after a tick (the alert engine) starts now.
        ticked.send_modify(|n| *n += 1);
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
