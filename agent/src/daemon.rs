//! `insite-agent run`: start-up, the running agent, reload and shutdown.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    collectors::{self, TickMetrics},
    config::{Config, ConfigSource},
    control, exporters, limits,
    probes::{self, db::DbProbe, net::NetProbe, privileges, syscalls::SyscallProbe},
    store::{ProbeState, ProbeStatus, SharedStore, Store},
};

/// Command-line overrides; they win over the file, at start-up and on every reload.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub control_socket: Option<PathBuf>,
}

impl Overrides {
    fn apply(&self, cfg: &mut Config) {
        if let Some(a) = self.metrics_listen {
            cfg.metrics.listen = a;
        }
        if let Some(p) = &self.control_socket {
            cfg.control.socket = p.clone();
        }
    }
}

pub struct RunArgs {
    pub config_path: PathBuf,
    pub config_explicit: bool,
    pub overrides: Overrides,
}

fn load(args: &RunArgs) -> anyhow::Result<(Config, ConfigSource)> {
    let (mut cfg, src) = Config::load(&args.config_path, args.config_explicit)?;
    args.overrides.apply(&mut cfg);
    cfg.validate().map_err(|v| {
        anyhow::anyhow!(
            "invalid value for `{}` (from the command line): {}",
            v.key,
            v.reason
        )
    })?;
    Ok((cfg, src))
}

/// Exit status of a run whose eBPF probes all failed for want of privileges (sysexits'
/// EX_NOPERM): the agent served what it could, and says at exit that it could not do its job.
pub const EXIT_NO_PRIVILEGES: u8 = 77;

pub fn run(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    // Before anything else: a `systemctl reload` (SIGHUP) during start-up must not kill the
    // agent (SIGHUP's default action). Ignored until the handlers exist; the config is read
    // after they do, so no reload is lost.
    // SAFETY: sets the disposition of one signal; no handler code runs.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
    limits::cap_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("insite-agent")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    // Handlers first: signals that arrive while the probes load wait in these streams.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let (cfg, source) = load(&args)?;
    info!(config = %source, "insite-agent {} starting", env!("CARGO_PKG_VERSION"));
    let fds = limits::fd_budget(cfg.metrics.max_connections, cfg.control.max_connections);
    let mut cfg = cfg;
    cfg.control.max_connections = fds.control_connections;
    cfg.control.max_connections_per_uid = cfg
        .control
        .max_connections_per_uid
        .min(fds.control_connections);
    let store: SharedStore = Arc::new(RwLock::new(Store::new(source, cfg.syscalls.slow_log_size)));
    // Every task stops when this is cancelled: dependencies point down, so nothing below
    // the daemon knows how shutdown is decided.
    let shutdown = CancellationToken::new();
    let (cfg_tx, cfg_rx) = watch::channel(Arc::new(cfg.clone()));

    // Servers first: a port or socket conflict is a start-up error, before any probe loads.
    let top_n = Arc::new(AtomicUsize::new(cfg.syscalls.top_n));
    let tick_metrics = TickMetrics::default();
    let net_top_n = Arc::new(AtomicUsize::new(cfg.net.top_n));
    let db_top_n = Arc::new(AtomicUsize::new(cfg.db.top_n));
    let http_metrics = exporters::http::HttpMetrics::default();
    let mut registry = exporters::prometheus::registry(
        store.clone(),
        top_n.clone(),
        net_top_n.clone(),
        db_top_n.clone(),
        &tick_metrics,
    );
    http_metrics.register(&mut registry);
    let metrics_server = exporters::http::serve(
        cfg.metrics.listen,
        registry,
        exporters::http::Limits {
            max_connections: fds.metrics_connections,
            header_timeout: cfg.metrics.header_timeout,
            idle_timeout: cfg.metrics.idle_timeout,
            write_timeout: cfg.metrics.write_timeout,
        },
        http_metrics,
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("metrics.listen {}", cfg.metrics.listen))?;
    let (listener, access, socket_file) = control::server::bind(&cfg.control)?;
    let socket_path = cfg.control.socket.clone();

    let missing = privileges::missing_for_ebpf();
    let want_ebpf = cfg.syscalls.enabled || cfg.net.enabled || cfg.db.enabled;
    if want_ebpf && !missing.is_empty() {
        error!(
            missing = %missing.join(", "),
            "insite-agent lacks the privileges its eBPF probes need: run it as root, or with {} (systemd: AmbientCapabilities=). It goes on with what does not need them (host signals, endpoints).",
            privileges::NEEDED.join(" ")
        );
    }
    probes::prepare_host();
    let syscall_probe = attach_syscalls(&cfg, &store);
    let net_probe = attach_net(&cfg, &store);
    let db_probe = attach_db(&cfg, &store);
    // Loading parsed the kernel's BTF (several MiB) twice; give that memory back rather than
    // keep it in the allocator's free lists for the agent's lifetime.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    if let Ok(mut st) = store.write() {
        st.set_probe(ProbeStatus {
            name: "host".into(),
            state: if cfg.host.enabled {
                ProbeState::Attached
            } else {
                ProbeState::Disabled
            },
            attach: cfg.host.enabled.then(|| "procfs".into()),
            error: None,
            missed_runs: Default::default(),
        });
    }

    let mut tasks = tokio::task::JoinSet::new();
    let (trace_tx, trace_rx) = watch::channel(None);
    if let Some(p) = &syscall_probe {
        tasks.spawn(probes::sampling::run(
            p.clone(),
            cfg_rx.clone(),
            trace_rx,
            shutdown.clone(),
        ));
        let ring = p.lock().ok().and_then(|mut p| p.take_ring());
        if let Some(ring) = ring {
            tasks.spawn(collectors::syscalls::run_slow_reader(ring, store.clone()));
        }
    }
    if let Some(p) = &net_probe {
        let tables = p.lock().ok().and_then(|mut p| p.take_tables());
        // Walks over the TCP sockets sample live connections and find the ones whose end
        // went unseen; without the iterator the receive-path hook samples.
        let walks = if p.lock().is_ok_and(|p| p.has_walker()) {
            let (tx, rx) = watch::channel(collectors::net::Walks::default());
            tasks.spawn(collectors::net::run_walker(
                p.clone(),
                store.clone(),
                cfg_rx.clone(),
                tx,
                shutdown.clone(),
            ));
            Some(rx)
        } else {
            None
        };
        if let Some(tables) = tables {
            tasks.spawn(collectors::net::run_collector(
                tables,
                store.clone(),
                cfg_rx.clone(),
                walks,
            ));
        }
    }
    if let Some(p) = &db_probe {
        let maps = p.lock().ok().and_then(|mut p| p.take_maps());
        if let Some(maps) = maps {
            tasks.spawn(collectors::db::run_event_reader(
                maps,
                store.clone(),
                cfg_rx.clone(),
            ));
        }
    }
    tasks.spawn(collectors::run_ticks(
        store.clone(),
        syscall_probe.clone(),
        net_probe.clone(),
        db_probe.clone(),
        cfg_rx.clone(),
        tick_metrics,
        shutdown.clone(),
    ));
    tasks.spawn(async move {
        if let Err(e) = metrics_server.await {
            error!(error = %crate::probes::error_chain(&e), "metrics endpoint stopped");
        }
    });
    tasks.spawn(control::server::serve(
        listener,
        control::server::Context {
            store: store.clone(),
            config: cfg_rx.clone(),
            access,
            syscall_trace: syscall_probe.is_some().then(|| Arc::new(trace_tx)),
        },
        shutdown.clone(),
    ));
    info!("insite-agent running");

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                reload(&args, &cfg_tx, &store, syscall_probe.as_ref(), net_probe.as_ref(), (&top_n, &net_top_n, &db_top_n));
            }
        }
    }

    shutdown.cancel();
    // Servers finish in-flight requests quickly; the slow-call reader only ever waits on the
    // ring buffer, so stop everything now rather than wait on it.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    tasks.shutdown().await;
    // Dropping the probe detaches its programs and frees its maps.
    drop(syscall_probe);
    drop(net_probe);
    drop(db_probe);
    control::server::remove_socket(&socket_path, socket_file);
    let failed_for_privileges = store.read().ok().is_some_and(|st| {
        let ebpf: Vec<&ProbeStatus> = st
            .probes
            .values()
            .filter(|p| p.name != "host" && p.state != ProbeState::Disabled)
            .collect();
        !ebpf.is_empty()
            && ebpf.iter().all(|p| {
                p.state == ProbeState::Failed
                    && p.error
                        .as_deref()
                        .is_some_and(privileges::is_permission_error)
            })
    });
    if failed_for_privileges {
        error!(
            "insite-agent stopped; it ran without the privileges its eBPF probes need (exit status {EXIT_NO_PRIVILEGES})"
        );
        return Ok(std::process::ExitCode::from(EXIT_NO_PRIVILEGES));
    }
    info!("insite-agent stopped");
    Ok(std::process::ExitCode::SUCCESS)
}

fn attach_syscalls(cfg: &Config, store: &SharedStore) -> Option<Arc<Mutex<SyscallProbe>>> {
    attach_family(store, "syscalls", cfg.syscalls.enabled, || {
        SyscallProbe::attach(&cfg.syscalls)
            .map(|(p, problems)| {
                let how = p.mode().to_string();
                (p, how, problems)
            })
            .map_err(|e| probes::error_chain(&e))
    })
}

fn attach_net(cfg: &Config, store: &SharedStore) -> Option<Arc<Mutex<NetProbe>>> {
    attach_family(store, "net", cfg.net.enabled, || {
        NetProbe::attach(&cfg.net)
            .map(|(p, problems)| {
                let how = format!("tp_btf: {}", p.attached().join(", "));
                (p, how, problems)
            })
            .map_err(|e| probes::error_chain(&e))
    })
}

fn attach_db(cfg: &Config, store: &SharedStore) -> Option<Arc<Mutex<DbProbe>>> {
    attach_family(store, "db", cfg.db.enabled, || {
        DbProbe::attach(cfg.db.role_bits())
            .map(|(p, problems)| {
                let how = format!("tp_btf: {}", p.attached().join(", "));
                (p, how, problems)
            })
            .map_err(|e| probes::error_chain(&e))
    })
}

/// Attaches one probe family unless it is disabled, and records how that went in the store:
/// attached (how, and any non-fatal problems), disabled, or failed (why). A failure is logged
/// and the agent goes on without the family.
fn attach_family<P>(
    store: &SharedStore,
    name: &str,
    enabled: bool,
    attach: impl FnOnce() -> Result<(P, String, Vec<String>), String>,
) -> Option<Arc<Mutex<P>>> {
    let status = |state, attach: Option<String>, error: Option<String>| ProbeStatus {
        name: name.into(),
        state,
        attach,
        error,
        missed_runs: Default::default(),
    };
    let (st, probe) = if !enabled {
        (status(ProbeState::Disabled, None, None), None)
    } else {
        match attach() {
            Ok((p, how, problems)) => (
                status(
                    ProbeState::Attached,
                    Some(how),
                    (!problems.is_empty()).then(|| problems.join("; ")),
                ),
                Some(Arc::new(Mutex::new(p))),
            ),
            Err(why) => {
                error!(probe = name, error = %why, "probe failed; the agent continues without it");
                (status(ProbeState::Failed, None, Some(why)), None)
            }
        }
    };
    if let Ok(mut s) = store.write() {
        s.set_probe(st);
    }
    probe
}

/// SIGHUP: re-read the config; apply it if it is good, keep the running one if not.
fn reload(
    args: &RunArgs,
    cfg_tx: &watch::Sender<Arc<Config>>,
    store: &SharedStore,
    probe: Option<&Arc<Mutex<SyscallProbe>>>,
    net_probe: Option<&Arc<Mutex<NetProbe>>>,
    (top_n, net_top_n, db_top_n): (&AtomicUsize, &AtomicUsize, &AtomicUsize),
) {
    let (new, source) = match load(args) {
        Ok(x) => x,
        Err(e) => {
            error!(error = %probes::error_chain(e.as_ref()), "SIGHUP: config rejected; keeping the running config");
            return;
        }
    };
    let old = cfg_tx.borrow().clone();
    for (what, changed) in [
        ("metrics.listen", old.metrics.listen != new.metrics.listen),
        ("control", old.control != new.control),
        (
            "syscalls.enabled",
            old.syscalls.enabled != new.syscalls.enabled,
        ),
        (
            "syscalls.attach",
            old.syscalls.attach != new.syscalls.attach,
        ),
        ("net.enabled", old.net.enabled != new.net.enabled),
        ("db.enabled", old.db.enabled != new.db.enabled),
        ("db.roles", old.db.roles != new.db.roles),
    ] {
        if changed {
            warn!(
                key = what,
                "SIGHUP: this setting takes effect at the next restart"
            );
        }
    }
    if let Some(p) = probe {
        if let Ok(mut p) = p.lock() {
            match p.apply_config(&new.syscalls) {
                Ok(problems) => {
                    if let Ok(mut st) = store.write() {
                        if let Some(s) = st.probes.get_mut("syscalls") {
                            s.error = (!problems.is_empty()).then(|| problems.join("; "));
                        }
                    }
                }
                Err(e) => {
                    error!(error = %crate::probes::error_chain(&e), "SIGHUP: could not apply syscall settings")
                }
            }
        }
    }
    if let Some(p) = net_probe {
        if let Ok(mut p) = p.lock() {
            if let Err(e) = p.apply_config(&new.net) {
                error!(error = %crate::probes::error_chain(&e), "SIGHUP: could not apply network settings");
            }
        }
    }
    top_n.store(new.syscalls.top_n, Ordering::Relaxed);
    net_top_n.store(new.net.top_n, Ordering::Relaxed);
    db_top_n.store(new.db.top_n, Ordering::Relaxed);
    if let Ok(mut st) = store.write() {
        st.set_slow_capacity(new.syscalls.slow_log_size);
        st.config_source = source;
    }
    // Settings that need a restart stay as they run.
    let mut applied = new;
    applied.metrics = old.metrics.clone();
    applied.control = old.control.clone();
    applied.syscalls.enabled = old.syscalls.enabled;
    applied.net.enabled = old.net.enabled;
    applied.db.enabled = old.db.enabled;
    applied.db.roles = old.db.roles.clone();
    applied.syscalls.attach = old.syscalls.attach;
    let _ = cfg_tx.send(Arc::new(applied));
    info!("SIGHUP: config reloaded");
}
