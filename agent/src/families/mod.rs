//! Signal families, each declared in one place.
//!
//! A family (`syscalls`, `net`, `db`, `host`, ...) has its own file in every layer it uses
//! (probes -> collectors -> store -> exporters / control) and plugs them in here through
//! [`Family`]: the daemon attaches, starts, reloads and detaches it; the tick loop reads it
//! ([`TickSource`]); the control socket answers its commands ([`Views`]); the Prometheus
//! registry holds its collector. Adding a family is its own files, its config section, and
//! one line in [`all`].

pub mod alerts;
pub mod db;
pub mod host;
pub mod net;
pub mod ratelimit;
pub mod syscalls;

use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::{sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::{
    collectors::TickSource,
    config::Config,
    control::Views,
    exporters::prometheus::{EncodeFamily, FamilyCollector},
    store::{ProbeState, ProbeStatus, SharedStore},
};

/// Every family, in the order they attach and appear in `status`.
pub fn all() -> Vec<Arc<dyn Family>> {
    vec![
        Arc::new(syscalls::Syscalls::default()),
        Arc::new(net::Net::default()),
        Arc::new(db::Db::default()),
        Arc::new(host::Host::default()),
        Arc::new(ratelimit::Ratelimit::default()),
        Arc::new(alerts::Alerts::default()),
    ]
}

/// What a family declares beyond its tick reading and its commands.
pub trait Family: TickSource + Views {
    /// Whether the config turns it on.
    fn enabled(&self, cfg: &Config) -> bool;
    /// Whether it loads eBPF programs under `cfg` (and so needs the privileges for them).
    fn needs_ebpf(&self, _cfg: &Config) -> bool {
        true
    }
    /// Loads and attaches what it reads from: kernel programs and maps, or procfs.
    fn attach(&self, cfg: &Config) -> Result<Attached, String>;
    /// Starts its own tasks (ring readers, walkers, samplers), once attached.
    fn spawn(&self, _ctx: &Spawn, _tasks: &mut JoinSet<()>) {}
    /// Renders its metrics from the store at scrape time.
    fn metrics(&self) -> EncodeFamily;
    /// Puts back, in a reloaded config, the keys it can change only at a restart, and names
    /// those that were changed.
    fn keep_restart_keys(&self, _running: &Config, _new: &mut Config) -> Vec<&'static str> {
        Vec::new()
    }
    /// Applies a reloaded config to what runs (kernel settings, store bounds).
    fn reload(&self, _cfg: &Config, _store: &SharedStore) {}
    /// Detaches its programs and frees its maps (at shutdown, after its tasks stopped).
    fn detach(&self) {}
}

/// How a family attached, and what degraded on the way.
#[derive(Debug, Default)]
pub struct Attached {
    pub how: String,
    pub problems: Vec<String>,
}

/// What a family's tasks are given.
pub struct Spawn {
    pub store: SharedStore,
    pub config: watch::Receiver<Arc<Config>>,
    pub shutdown: CancellationToken,
    /// Collector ticks completed: changes right after each tick's readings are in the store.
    pub ticks: watch::Receiver<u64>,
    /// The agent's own exposition, as a scrape sees it (the rule engine reads it).
    pub exposition: Arc<crate::exporters::http::Exposition>,
}

/// Attaches the family unless it is disabled, and records how that went in the store:
/// attached (how, and any non-fatal problems), disabled, or failed (why). A failure is logged
/// and the agent goes on without the family.
pub fn attach(f: &dyn Family, cfg: &Config, store: &SharedStore) {
    let status = |state, attach: Option<String>, error: Option<String>| ProbeStatus {
        name: f.name().into(),
        state,
        attach,
        error,
        missed_runs: Default::default(),
    };
    let st = if !f.enabled(cfg) {
        status(ProbeState::Disabled, None, None)
    } else {
        match f.attach(cfg) {
            Ok(a) => status(
                ProbeState::Attached,
                Some(a.how),
                (!a.problems.is_empty()).then(|| a.problems.join("; ")),
            ),
            Err(why) => {
                error!(probe = f.name(), error = %why, "probe failed; the agent continues without it");
                status(ProbeState::Failed, None, Some(why))
            }
        }
    };
    if let Ok(mut s) = store.write() {
        s.set_probe(st);
    }
}

/// Registers the family's collector.
pub fn register(
    f: &dyn Family,
    r: &mut Registry,
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
) {
    r.register_collector(Box::new(FamilyCollector {
        store,
        config,
        encode: f.metrics(),
    }));
}

/// Keeps the running value of a restart-only key in a reloaded config; names it if it changed.
pub(crate) fn keep<T: PartialEq + Clone>(
    changed: &mut Vec<&'static str>,
    key: &'static str,
    running: &T,
    new: &mut T,
) {
    if running != new {
        changed.push(key);
        *new = running.clone();
    }
}

/// A family's probe once attached: set once at start, read by its tasks and the tick,
/// taken at shutdown.
pub(crate) struct Slot<P>(Mutex<Option<Arc<Mutex<P>>>>);

impl<P> Default for Slot<P> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<P> Slot<P> {
    pub fn set(&self, p: P) {
        if let Ok(mut s) = self.0.lock() {
            *s = Some(Arc::new(Mutex::new(p)));
        }
    }

    pub fn get(&self) -> Option<Arc<Mutex<P>>> {
        self.0.lock().ok()?.clone()
    }

    /// Runs `f` on the probe, if attached (`None` if not, or if a holder panicked).
    pub fn with<R>(&self, f: impl FnOnce(&mut P) -> R) -> Option<R> {
        let p = self.get()?;
        let mut p = p.lock().ok()?;
        Some(f(&mut p))
    }

    /// The probe's skipped runs, for `TickSource::missed_runs` (`None` when not attached).
    pub fn missed_runs(
        &self,
        f: impl FnOnce(&P) -> Result<crate::collectors::MissedRuns, crate::probes::ProbeError>,
    ) -> Option<Result<crate::collectors::MissedRuns, String>> {
        self.with(|p| f(p).map_err(|e| crate::probes::error_chain(&e)))
    }

    pub fn take(&self) -> Option<Arc<Mutex<P>>> {
        self.0.lock().ok()?.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names and commands are unique across families: the first family that lists a
    /// command would answer it, and a second `probe` label would merge two families.
    #[test]
    fn names_and_commands_are_unique() {
        let mut names = std::collections::BTreeSet::new();
        let mut cmds = std::collections::BTreeSet::from(["status"]);
        for f in all() {
            assert!(names.insert(f.name()), "{} twice", f.name());
            for c in f.commands() {
                assert!(cmds.insert(*c), "{c} twice");
            }
        }
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn restart_keys_are_kept_and_named() {
        let running = Config::default();
        let mut new = Config::default();
        new.syscalls.enabled = !running.syscalls.enabled;
        new.db.roles = vec![];
        new.net.top_n = running.net.top_n + 1;
        let mut changed = Vec::new();
        for f in all() {
            changed.extend(f.keep_restart_keys(&running, &mut new));
        }
        assert_eq!(changed, ["syscalls.enabled", "db.roles"]);
        assert_eq!(new.syscalls.enabled, running.syscalls.enabled);
        assert_eq!(new.db.roles, running.db.roles);
        assert_eq!(new.net.top_n, running.net.top_n + 1);
    }
}
