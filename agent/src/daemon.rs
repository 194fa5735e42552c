//! `insite-agent run`: start-up, the running agent, reload and shutdown.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    collectors::{self, TickMetrics, TickSource},
    config::{Config, ConfigSource},
    control::{self, Views},
    exporters,
    families::{self, Family},
    limits,
    probes::{self, privileges},
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
    let families = families::all();

    // Servers first: a port or socket conflict is a start-up error, before any probe loads.
    let tick_metrics = TickMetrics::default();
    let http_metrics = exporters::http::HttpMetrics::default();
    let mut registry = exporters::prometheus::registry(store.clone(), &tick_metrics);
    for f in &families {
        families::register(f.as_ref(), &mut registry, store.clone(), cfg_rx.clone());
    }
    http_metrics.register(&mut registry);
    let exposition = exporters::http::Exposition::new(registry, store.clone());
    let metrics_server = exporters::http::serve(
        cfg.metrics.listen,
        exposition.clone(),
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
    let want_ebpf = families
        .iter()
        .any(|f| f.needs_ebpf(&cfg) && f.enabled(&cfg));
    if want_ebpf && !missing.is_empty() {
        error!(
            missing = %missing.join(", "),
            "insite-agent lacks the privileges its eBPF probes need: run it as root, or with {} (systemd: AmbientCapabilities=). It goes on with what does not need them (host signals, endpoints).",
            privileges::NEEDED.join(" ")
        );
    }
    probes::prepare_host();
    for f in &families {
        families::attach(f.as_ref(), &cfg, &store);
    }
    // Loading parsed the kernel's BTF (several MiB) once per probe; give that memory back
    // rather than keep it in the allocator's free lists for the agent's lifetime.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };

    let mut tasks = tokio::task::JoinSet::new();
    let (ticked, ticks) = watch::channel(0u64);
    let spawn = families::Spawn {
        ticks,
        store: store.clone(),
        config: cfg_rx.clone(),
        shutdown: shutdown.clone(),
        exposition,
    };
    for f in &families {
        f.spawn(&spawn, &mut tasks);
    }
    tasks.spawn(collectors::run_ticks(
        store.clone(),
        families
            .iter()
            .map(|f| f.clone() as Arc<dyn TickSource>)
            .collect(),
        cfg_rx.clone(),
        tick_metrics,
        ticked,
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
            families: families
                .iter()
                .map(|f| f.clone() as Arc<dyn Views>)
                .collect(),
        },
        shutdown.clone(),
    ));
    info!("insite-agent running");

    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reload(&args, &cfg_tx, &store, &families),
        }
    }

    shutdown.cancel();
    // Servers finish in-flight requests quickly; the slow-call reader only ever waits on the
    // ring buffer, so stop everything now rather than wait on it.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    tasks.shutdown().await;
    // Detaching drops each probe: its programs detach and its maps are freed.
    for f in &families {
        f.detach();
    }
    control::server::remove_socket(&socket_path, socket_file);
    let last = cfg_tx.borrow().clone();
    let ebpf_families: Vec<&str> = families
        .iter()
        .filter(|f| f.needs_ebpf(&last))
        .map(|f| f.name())
        .collect();
    let failed_for_privileges = store.read().ok().is_some_and(|st| {
        let ebpf: Vec<&ProbeStatus> = st
            .probes
            .values()
            .filter(|p| ebpf_families.contains(&p.name.as_str()) && p.state != ProbeState::Disabled)
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

/// SIGHUP: re-read the config; apply it if it is good, keep the running one if not.
fn reload(
    args: &RunArgs,
    cfg_tx: &watch::Sender<Arc<Config>>,
    store: &SharedStore,
    families: &[Arc<dyn Family>],
) {
    let (mut new, source) = match load(args) {
        Ok(x) => x,
        Err(e) => {
            error!(error = %probes::error_chain(e.as_ref()), "SIGHUP: config rejected; keeping the running config");
            return;
        }
    };
    let old = cfg_tx.borrow().clone();
    // Settings that need a restart stay as they run.
    let mut changed = Vec::new();
    families::keep(
        &mut changed,
        "metrics.listen",
        &old.metrics.listen,
        &mut new.metrics.listen,
    );
    families::keep(&mut changed, "control", &old.control, &mut new.control);
    families::keep(
        &mut changed,
        "agent.kernel_log",
        &old.agent.kernel_log,
        &mut new.agent.kernel_log,
    );
    for f in families {
        changed.extend(f.keep_restart_keys(&old, &mut new));
    }
    for key in changed {
        warn!(key, "SIGHUP: this setting takes effect at the next restart");
    }
    for f in families {
        f.reload(&new, store);
    }
    if let Ok(mut st) = store.write() {
        st.config_source = source;
    }
    let _ = cfg_tx.send(Arc::new(new));
    info!("SIGHUP: config reloaded");
}
