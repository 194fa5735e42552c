//! `cargo xtask bench db`: what the agent's database probe costs real database traffic, and
//! whether it counts every query, in one run.
//!
//! The bench starts its own redis-server (127.0.0.1, a free port, no persistence) and its own
//! PostgreSQL 15 cluster (initdb into a temporary directory as the `postgres` user, ssl and
//! fsync off, a private unix socket directory, `pgbench -i`), both removed at the end, also
//! when the bench fails (drop guards). Workloads, from the tools' own clients:
//! - `redis-benchmark -t set,get -c 20` over TCP, without and with pipelining (`-P 16`);
//! - `pgbench -S` (select-only) `-c 4 -j 2 -T <secs>` over the unix socket, in the simple and
//!   the prepared query mode (and the extended one with `--pg-extended`).
//!
//! Each round runs every workload without the agent (baseline), then every workload with one
//! agent started for the round; a closing baseline follows the last round. A run with the agent
//! is compared with the mean of the baselines just before and just after it (which cancels a
//! drift), and the summary gives mean ± standard deviation of the throughputs and the mean
//! per-round ratio with a rough 95% interval, so that a reader can tell a difference from noise.
//!
//! Count check, for each run with the agent: the metrics are scraped before and after it (after
//! the counts have settled: the agent drains its ring every 100 ms), and the delta of
//! `insite_db_query_duration_seconds_count` for the workload's destination, per role, is
//! compared with what the client and the server say they did: Redis's own `INFO commandstats`
//! (read before and after, outside the counted window) and redis-benchmark's completed requests;
//! pgbench's processed transactions (one SELECT each) plus its fixed set-up queries.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{bench::usage, util::agent_bin};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
const REDIS_BENCHMARK: &str = "/usr/bin/redis-benchmark";

/// The target: throughput with the agent at least this share of the baseline's.
const TARGET: f64 = 0.97;
const REDIS_CLIENTS: u32 = 20;
const REDIS_PIPELINE: u32 = 16;
const PG_CLIENTS: u32 = 4;
const PG_THREADS: u32 = 2;

/// The queries pgbench 15 sends besides its transactions, once per run, on its first
/// connection: `SELECT count(*) FROM pgbench_branches` (the scale), a catalog SELECT (is
/// pgbench_accounts partitioned), `vacuum pgbench_branches`, `vacuum pgbench_tellers` and
/// `truncate pgbench_history` (the vacuum step that `-n` would skip).
const PGBENCH_SETUP: &[(&str, u64)] = &[("SELECT", 2), ("TRUNCATE", 1), ("VACUUM", 2)];

const DURATION_COUNT: &str = "insite_db_query_duration_seconds_count";

/// How long a server may take to start, and a tool to finish beyond its planned time.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const TOOL_SLACK: Duration = Duration::from_secs(120);
/// The agent's counts are settled when two scrapes this far apart agree: longer than the
/// store's 1 s snapshots plus the collector's 250 ms fold of the kernel's counts.
const SETTLE_STEP: Duration = Duration::from_millis(1300);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Opts {
    pub rounds: u32,
    pub seconds: u32,
    pub requests: Option<u64>,
    pub scale: u32,
    pub pg_extended: bool,
    pub keep_probes: bool,
    pub bpf_stats: bool,
    /// `db.roles` of the agent: "client", "server" or "both".
    pub roles: Roles,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Roles {
    Both,
    Client,
    Server,
}

impl Roles {
    fn config(self) -> &'static str {
        match self {
            Self::Both => "roles = [\"client\", \"server\"]\n",
            Self::Client => "roles = [\"client\"]\n",
            Self::Server => "roles = [\"server\"]\n",
        }
    }

    fn client(self) -> bool {
        self != Self::Server
    }

    fn server(self) -> bool {
        self != Self::Client
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads and their results
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// redis-benchmark GET and SET, `pipeline` commands per write (1: none).
    Redis { pipeline: u32 },
    /// pgbench -S in this query mode.
    Pg { mode: &'static str },
}

struct Workload {
    kind: Kind,
    /// redis-benchmark `-n` (per test, so twice this many requests in all).
    redis_n: u64,
}

impl Workload {
    fn name(&self) -> String {
        match self.kind {
            Kind::Redis { pipeline: 1 } => "redis GET+SET".to_string(),
            Kind::Redis { pipeline } => format!("redis GET+SET -P {pipeline}"),
            Kind::Pg { mode } => format!("pgbench -S -M {mode}"),
        }
    }

    fn unit(&self) -> &'static str {
        match self.kind {
            Kind::Redis { .. } => "req/s",
            Kind::Pg { .. } => "tps",
        }
    }

    fn describe(&self, fx: &Fixture, secs: u32) -> String {
        match self.kind {
            Kind::Redis { pipeline } => format!(
                "redis-benchmark -t set,get -n {} -c {REDIS_CLIENTS}{} over TCP 127.0.0.1:{}; \
                 requests/s of GET and SET together",
                self.redis_n,
                if pipeline > 1 {
                    format!(" -P {pipeline}")
                } else {
                    " (no pipelining)".to_string()
                },
                fx.redis_port
            ),
            Kind::Pg { mode } => format!(
                "pgbench -S -c {PG_CLIENTS} -j {PG_THREADS} -T {secs} -M {mode} over {}; \
                 transactions/s (one SELECT each, without connection time)",
                fx.pg_destination()
            ),
        }
    }

    fn system(&self) -> &'static str {
        match self.kind {
            Kind::Redis { .. } => "redis",
            Kind::Pg { .. } => "postgresql",
        }
    }
}

/// One run of a workload.
struct Run {
    /// Requests (Redis, GET and SET together) or transactions (pgbench) per second.
    rate: f64,
    /// What the tool says it completed, by operation (pgbench: its transactions as SELECT).
    done: BTreeMap<String, u64>,
    /// pgbench's failed transactions (0 for Redis).
    failed: u64,
    /// Tracers this bench did not start, seen before or after the run.
    foreign: Vec<String>,
}

/// One run with the agent.
struct AgentRun {
    run: Run,
    /// Seconds the tool ran.
    wall: f64,
    /// With `--bpf-stats`: nanoseconds the agent's db programs ran in the kernel during the
    /// run (tail-called walkers included in their callers' time).
    bpf_ns: Option<u64>,
    cpu_pct: f64,
    rss_kib: u64,
    check: Check,
}

/// The count check of one run with the agent.
struct Check {
    /// Queries that should be counted once per role, by operation.
    expected: BTreeMap<String, u64>,
    /// What the agent counted for the workload's destination, by operation.
    client: BTreeMap<String, u64>,
    server: BTreeMap<String, u64>,
    /// Redis only: the server's commands (INFO commandstats delta) that redis-benchmark did not
    /// report as completed requests (its start-up CONFIG GETs), by operation.
    extra: BTreeMap<String, u64>,
    /// Redis only: GET/SET the server ran that differ from redis-benchmark's completed count.
    tool_vs_server: Option<String>,
    /// Query errors the agent counted for the destination (both roles).
    errors: f64,
    /// The roles the agent follows; the other's count must be empty.
    roles: Roles,
    /// Deltas of the agent's loss counters (host-wide), `None` where the agent lacks one.
    kernel: Vec<(&'static str, Option<f64>)>,
    /// Events written to the db ring during the run (host-wide).
    ring_events: f64,
}

impl Check {
    fn matched(&self) -> bool {
        let want = |followed: bool| {
            if followed {
                self.expected.clone()
            } else {
                BTreeMap::new()
            }
        };
        self.client == want(self.roles.client()) && self.server == want(self.roles.server())
    }
}

/// The agent's counters reported with every count check: (label, metric, ring filter).
const KERNEL_COUNTERS: &[(&str, &str, bool)] = &[
    ("ring drops", "insite_ringbuf_drops_total", true),
    ("desyncs", "insite_db_desyncs_total", false),
    ("untimed", "insite_db_requests_untimed_total", false),
    ("unmatched", "insite_db_unmatched_responses_total", false),
    ("texts sent", "insite_db_statement_texts_total", false),
    (
        "storage failures",
        "insite_db_storage_failures_total",
        false,
    ),
    ("undecodable", "insite_db_events_undecodable_total", false),
    (
        "series overflowed",
        "insite_db_series_overflowed_total",
        false,
    ),
];

// ---------------------------------------------------------------------------------------------
// Temporary directory, servers, agent (all stopped and removed when dropped)
// ---------------------------------------------------------------------------------------------

/// A directory removed with everything in it when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("insite-bench-db-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing a stale {}", path.display()))?;
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
        Ok(Self(path))
    }

    /// A new subdirectory, mode 0755, owned by `owner` (uid, gid) when given.
    fn subdir(&self, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
        let p = self.0.join(name);
        std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", p.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", p.display()))?;
        }
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process: sent `signal`, then killed after 20 s, when dropped.
struct Server {
    name: &'static str,
    child: Child,
    signal: i32,
    log: PathBuf,
}

impl Server {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path, signal: i32) -> Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().context("log file")?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({})", crate::util::describe(cmd)))?;
        Ok(Self {
            name,
            child,
            signal,
            log: log.to_path_buf(),
        })
    }

    /// Waits until the log has `needle` and `path` (a socket) exists.
    fn wait_ready(&mut self, needle: &str, path: Option<&Path>) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(needle) && path.is_none_or(Path::exists) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited while starting ({status}); log:\n{log}",
                    self.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {START_TIMEOUT:?}; log:\n{log}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        stop_child(
            &mut self.child,
            self.signal,
            Duration::from_secs(20),
            self.name,
        );
    }
}

/// Sends `signal` to our child, waits up to `grace`, then kills it.
fn stop_child(child: &mut Child, signal: i32, grace: Duration, name: &str) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + grace;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!(
            "bench db: {name} (pid {}) did not stop: killing it",
            child.id()
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Our redis-server and PostgreSQL cluster. Fields drop in order: the servers stop before
/// their directory is removed.
struct Fixture {
    pg: Server,
    pg_port: u16,
    pg_socket_dir: PathBuf,
    redis: Server,
    redis_port: u16,
    dir: TempDir,
}

impl Fixture {
    fn start(scale: u32) -> Result<Self> {
        let dir = TempDir::new()?;
        let (redis, redis_port) = start_redis(&dir).context("starting redis-server")?;
        let (pg, pg_port, pg_socket_dir) = start_postgres(&dir).context("starting PostgreSQL")?;
        let fx = Self {
            pg,
            pg_port,
            pg_socket_dir,
            redis,
            redis_port,
            dir,
        };
        let t = Instant::now();
        let out = run_tool(
            fx.pgbench_cmd()
                .args(["-i", "-q", "-s", &scale.to_string()]),
            &fx.dir.0,
            START_TIMEOUT * 5,
        )?;
        if !out.ok {
            bail!("pgbench -i failed: {}\n{}", out.stderr, out.stdout);
        }
        eprintln!(
            "bench db: pgbench -i -s {scale} took {:.1}s",
            t.elapsed().as_secs_f64()
        );
        Ok(fx)
    }

    fn pgbench_cmd(&self) -> Command {
        let mut cmd = Command::new(format!("{PG_BIN}/pgbench"));
        cmd.env("PGHOST", &self.pg_socket_dir)
            .env("PGPORT", self.pg_port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres");
        cmd
    }

    /// The agent's `destination` label of the pgbench connections.
    fn pg_destination(&self) -> String {
        format!(
            "unix:{}",
            self.pg_socket_dir
                .join(format!(".s.PGSQL.{}", self.pg_port))
                .display()
        )
    }

    fn redis_destination(&self) -> String {
        format!("127.0.0.1:{}", self.redis_port)
    }

    fn destination(&self, w: &Workload) -> String {
        match w.kind {
            Kind::Redis { .. } => self.redis_destination(),
            Kind::Pg { .. } => self.pg_destination(),
        }
    }

    /// Calls per command from `INFO commandstats` (`config|get` as `CONFIG`, summed).
    fn redis_commandstats(&self) -> Result<BTreeMap<String, u64>> {
        let out = Command::new(REDIS_CLI)
            .args(["-h", "127.0.0.1", "-p", &self.redis_port.to_string()])
            .args(["INFO", "commandstats"])
            .output()
            .context("running redis-cli INFO commandstats")?;
        if !out.status.success() {
            bail!(
                "redis-cli INFO commandstats failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut m = BTreeMap::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((cmd, fields)) = rest.split_once(':') else {
                continue;
            };
            let calls = fields
                .split(',')
                .find_map(|f| f.strip_prefix("calls="))
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("commandstats line {line:?}"))?;
            let op = cmd.split('|').next().unwrap_or(cmd).to_ascii_uppercase();
            *m.entry(op).or_insert(0) += calls;
        }
        Ok(m)
    }
}

fn start_redis(dir: &TempDir) -> Result<(Server, u16)> {
    let rdir = dir.subdir("redis", None)?;
    let mut last = None;
    for attempt in 0..3 {
        let port = free_port()?;
        let log = rdir.join(format!("redis-{attempt}.log"));
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&rdir)
            .current_dir(&rdir);
        let mut server = Server::spawn("redis-server", &mut cmd, &log, libc::SIGTERM)?;
        match server.wait_ready("Ready to accept connections", None) {
            Ok(()) => return Ok((server, port)),
            // Another process took the port between our probe and the server's bind.
            Err(e) if format!("{e:#}").contains("in use") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("redis-server did not start")))
}

fn start_postgres(dir: &TempDir) -> Result<(Server, u16, PathBuf)> {
    let owner = user_ids("postgres")?;
    let pgdir = dir.subdir("pg", Some(owner))?;
    let data = pgdir.join("data");
    let mut initdb = Command::new(format!("{PG_BIN}/initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync"])
        .args(["-E", "UTF8", "--locale=C"])
        .env("LC_ALL", "C")
        .current_dir(&pgdir)
        .uid(owner.0)
        .gid(owner.1);
    let out = run_tool(&mut initdb, &dir.0, START_TIMEOUT)?;
    if !out.ok {
        bail!("initdb failed: {}\n{}", out.stderr, out.stdout);
    }
    let sock = dir.subdir("pg-socket", Some(owner))?;
    let mut last = None;
    for attempt in 0..3 {
        let port = free_port()?;
        let log = pgdir.join(format!("postgres-{attempt}.log"));
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&sock)
            .args([
                "-c",
                "ssl=off",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
            ])
            .args(["-c", "full_page_writes=off", "-c", "logging_collector=off"])
            .env("LC_ALL", "C")
            .current_dir(&pgdir)
            .uid(owner.0)
            .gid(owner.1);
        // SIGINT is PostgreSQL's fast shutdown.
        let mut server = Server::spawn("postgres", &mut cmd, &log, libc::SIGINT)?;
        let socket = sock.join(format!(".s.PGSQL.{port}"));
        match server.wait_ready(
            "database system is ready to accept connections",
            Some(&socket),
        ) {
            Ok(()) => return Ok((server, port, sock)),
            Err(e) if format!("{e:#}").contains("in use") => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("postgres did not start")))
}

/// The agent, started for one round.
struct BenchAgent {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl BenchAgent {
    fn start(parent: &Path, round: usize, keep_probes: bool, roles: Roles) -> Result<Self> {
        let dir = parent.join(format!("agent-{round}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut last = None;
        for attempt in 0..3 {
            let port = free_port()?;
            let probes = if keep_probes {
                "[syscalls]\nenabled = true\n[net]\nenabled = true\n"
            } else {
                "[syscalls]\nenabled = false\n[net]\nenabled = false\n"
            };
            let cfg = dir.join("config.toml");
            std::fs::write(
                &cfg,
                format!(
                    "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[control]\nsocket = \"{}\"\n\
                     {probes}[db]\nenabled = true\n{roles}",
                    dir.join("ctl.sock").display(),
                    roles = roles.config(),
                ),
            )
            .with_context(|| format!("writing {}", cfg.display()))?;
            let log_path = dir.join(format!("agent-{attempt}.log"));
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = Command::new(agent_bin())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", agent_bin().display()))?;
            let mut agent = Self {
                child,
                port,
                dir: dir.clone(),
            };
            match agent.wait_ready(&log_path, &cfg) {
                Ok(()) => return Ok(agent),
                Err(e) if format!("{e:#}").contains("in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("insite-agent did not start")))
    }

    /// Until the metrics endpoint answers and says the db probe is attached.
    fn wait_ready(&mut self, log_path: &Path, cfg: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = scrape(self.port) {
                let attached = |state: &str| {
                    m.sum(
                        "insite_probe_attached",
                        &[("probe", "db"), ("state", state)],
                    )
                };
                if attached("attached") == 1.0 {
                    return Ok(());
                }
                if let Some(s) = m
                    .label_values("insite_probe_attached", &[("probe", "db")], "state")
                    .into_iter()
                    .find(|s| s != "attached" && s != "disabled")
                {
                    bail!(
                        "the agent's db probe is {s}; log:\n{}",
                        std::fs::read_to_string(log_path).unwrap_or_default()
                    );
                }
            }
            let exited = self.child.try_wait()?;
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                let cfg = std::fs::read_to_string(cfg).unwrap_or_default();
                bail!(
                    "insite-agent did not become ready ({}); config:\n{cfg}log:\n{log}",
                    exited.map_or("timed out".to_string(), |s| s.to_string())
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let mut log = String::new();
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().ends_with(".log") {
                    log.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
            bail!(
                "{} ({status}); log:\n{log}",
                crate::bench::EXITED_DURING_RUN
            );
        }
        Ok(())
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        stop_child(
            &mut self.child,
            libc::SIGTERM,
            Duration::from_secs(15),
            "insite-agent",
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

/// (uid, gid) of a system user.
fn user_ids(user: &str) -> Result<(u32, u32)> {
    let name = CString::new(user)?;
    // SAFETY: passwd is plain data; all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and length; getpwnam_r fills `pwd` (strings in `buf`) and sets
    // `found` to `&pwd` or to null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("no system user {user:?} (is postgresql installed? `cargo xtask setup --tests`)");
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

struct ToolOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs one client process to the end (killed after `timeout`), its output in files under
/// `dir`: no reader threads compete with the measured run.
fn run_tool(cmd: &mut Command, dir: &Path, timeout: Duration) -> Result<ToolOutput> {
    let what = crate::util::describe(cmd);
    let out_path = dir.join("tool.stdout");
    let err_path = dir.join("tool.stderr");
    let out = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let err = std::fs::File::create(&err_path)
        .with_context(|| format!("creating {}", err_path.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| format!("reading {}", p.display()))
    };
    Ok(ToolOutput {
        ok: status.success(),
        stdout: read(&out_path)?,
        stderr: read(&err_path)?,
    })
}

/// One run of `w`; `ours` is the agent this bench started for it, if any.
fn run_workload(fx: &Fixture, w: &Workload, secs: u32, ours: Option<u32>) -> Result<Run> {
    let mut foreign = crate::util::foreign_tracers(ours);
    let (mut cmd, timeout) = match w.kind {
        Kind::Redis { pipeline } => {
            let mut cmd = Command::new(REDIS_BENCHMARK);
            cmd.args(["-h", "127.0.0.1", "-p", &fx.redis_port.to_string()])
                .args(["-t", "set,get", "-n", &w.redis_n.to_string()])
                .args(["-c", &REDIS_CLIENTS.to_string()]);
            if pipeline > 1 {
                cmd.args(["-P", &pipeline.to_string()]);
            }
            // Sized to take `secs`; four times that is clearly wrong.
            (cmd, Duration::from_secs(u64::from(secs) * 4) + TOOL_SLACK)
        }
        Kind::Pg { mode } => {
            let mut cmd = fx.pgbench_cmd();
            cmd.args(["-S", "-c", &PG_CLIENTS.to_string()])
                .args(["-j", &PG_THREADS.to_string(), "-T", &secs.to_string()])
                .args(["-M", mode]);
            (cmd, Duration::from_secs(u64::from(secs)) + TOOL_SLACK)
        }
    };
    let out = run_tool(&mut cmd, &fx.dir.0, timeout)?;
    let what = crate::util::describe(&cmd);
    if !out.ok {
        bail!("{what} failed:\n{}\n{}", out.stderr, out.stdout);
    }
    let mut run = match w.kind {
        Kind::Redis { .. } => parse_redis_benchmark(&out.stdout),
        Kind::Pg { mode } => parse_pgbench(&out.stdout, mode),
    }
    .with_context(|| format!("reading the output of {what}:\n{}", out.stdout))?;
    foreign.extend(crate::util::foreign_tracers(ours));
    foreign.sort();
    foreign.dedup();
    run.foreign = foreign;
    Ok(run)
}

/// redis-benchmark's default report: per test "====== SET ======", "  N requests completed in
/// S seconds" and "  throughput summary: R requests per second" (progress lines end in '\r').
fn parse_redis_benchmark(out: &str) -> Result<Run> {
    let mut test: Option<String> = None;
    let mut done = BTreeMap::new();
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();
    for line in out.split(['\r', '\n']).map(str::trim) {
        if let Some(t) = line
            .strip_prefix("======")
            .and_then(|l| l.strip_suffix("======"))
        {
            test = Some(t.trim().to_ascii_uppercase());
        } else if let Some(n) = line.strip_suffix(" seconds").and_then(|l| {
            l.split_once(" requests completed in ")
                .and_then(|(n, _)| n.trim().parse::<u64>().ok())
        }) {
            let t = test.clone().context("a result before its test's header")?;
            done.insert(t, n);
        } else if let Some(r) = line
            .strip_prefix("throughput summary:")
            .and_then(|l| l.trim().strip_suffix("requests per second"))
        {
            let t = test.clone().context("a result before its test's header")?;
            rates.insert(t, r.trim().parse::<f64>().context("throughput")?);
        }
    }
    if done.len() != 2 || rates.len() != 2 || done.keys().ne(rates.keys()) {
        bail!("expected completed requests and throughput for GET and SET");
    }
    // Requests of both tests over the time both took.
    let total: u64 = done.values().sum();
    let time: f64 = done
        .iter()
        .map(|(t, n)| *n as f64 / rates.get(t).copied().unwrap_or(f64::NAN))
        .sum();
    Ok(Run {
        rate: total as f64 / time,
        done,
        failed: 0,
        foreign: Vec::new(),
    })
}

/// pgbench's report: "query mode: M", "number of transactions actually processed: N",
/// "number of failed transactions: F (...)", "tps = R (without initial connection time)".
fn parse_pgbench(out: &str, mode: &str) -> Result<Run> {
    let field = |key: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .map(str::trim)
            .with_context(|| format!("no {key:?}"))
    };
    let seen_mode = field("query mode:")?;
    if seen_mode != mode {
        bail!("pgbench ran in query mode {seen_mode}, not {mode}");
    }
    let processed: u64 = field("number of transactions actually processed:")?
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .context("processed transactions")?;
    let failed: u64 = field("number of failed transactions:")
        .ok()
        .and_then(|f| f.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let tps: f64 = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .find(|l| l.contains("without initial connection time"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no tps (without initial connection time)")?;
    Ok(Run {
        rate: tps,
        done: BTreeMap::from([("SELECT".to_string(), processed)]),
        failed,
        foreign: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

struct Series {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

struct Metrics(Vec<Series>);

impl Metrics {
    fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(parse_series).collect())
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }

    /// Summed values of `name` by the value of `label`.
    fn by_label(&self, name: &str, filter: &[(&str, &str)], label: &str) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for s in self.matching(name, filter) {
            if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
                *m.entry(v.clone()).or_insert(0.0) += s.value;
            }
        }
        m
    }

    fn label_values(&self, name: &str, filter: &[(&str, &str)], label: &str) -> Vec<String> {
        self.by_label(name, filter, label).into_keys().collect()
    }
}

/// `name{k="v",...} value` or `name value` (Prometheus text format); comments and blank
/// lines give `None`.
fn parse_series(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            r = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Series {
        name,
        labels,
        value,
    })
}

/// GET /metrics over HTTP/1.0 (the body ends at the close: no chunking).
fn scrape(port: u16) -> Result<Metrics> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .context("sending the metrics request")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("reading /metrics")?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("/metrics: no end of the HTTP header")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("/metrics answered {status:?}");
    }
    Ok(Metrics::parse(body))
}

/// A scrape once the counts for `dest` have stopped changing (two scrapes `SETTLE_STEP` apart
/// agree), so that everything before it has been drained and counted.
fn settled(port: u16, dest: &str) -> Result<Metrics> {
    let key = |m: &Metrics| m.sum(DURATION_COUNT, &[("destination", dest)]);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut prev = scrape(port)?;
    loop {
        std::thread::sleep(SETTLE_STEP);
        let m = scrape(port)?;
        if key(&m) == key(&prev) {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("the agent's counts for {dest} were still changing after {SETTLE_TIMEOUT:?}");
        }
        prev = m;
    }
}

fn delta_by_op(
    a: &Metrics,
    b: &Metrics,
    system: &str,
    role: &str,
    dest: &str,
) -> BTreeMap<String, u64> {
    let f = [("system", system), ("role", role), ("destination", dest)];
    // Timed and untimed (beyond 64 in flight on a connection) together.
    let counts = |m: &Metrics| {
        let mut c = m.by_label(DURATION_COUNT, &f, "operation");
        for (op, v) in m.by_label("insite_db_queries_untimed_total", &f, "operation") {
            *c.entry(op).or_insert(0.0) += v;
        }
        c
    };
    let before = counts(a);
    counts(b)
        .into_iter()
        .map(|(op, v)| {
            (
                op.clone(),
                (v - before.get(&op).copied().unwrap_or(0.0)).round() as u64,
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Runs with the agent
// ---------------------------------------------------------------------------------------------

fn run_with_agent(
    fx: &Fixture,
    w: &Workload,
    secs: u32,
    agent: &mut BenchAgent,
    bpf_stats: bool,
    roles: Roles,
) -> Result<AgentRun> {
    let dest = fx.destination(w);
    let system = w.system();
    let redis_before = match w.kind {
        Kind::Redis { .. } => Some(fx.redis_commandstats()?),
        Kind::Pg { .. } => None,
    };
    let m0 = settled(agent.port, &dest)?;
    let pid = agent.pid();
    let bpf0 = bpf_stats.then(|| bpf_run_time(pid)).flatten();
    let u0 = usage(pid);
    let t = Instant::now();
    let run = run_workload(fx, w, secs, Some(pid));
    let wall = t.elapsed().as_secs_f64();
    let u1 = usage(pid);
    let bpf1 = bpf_stats.then(|| bpf_run_time(pid)).flatten();
    let bpf_ns = bpf0.zip(bpf1).map(|(a, b)| b.saturating_sub(a));
    agent.check_running()?;
    let run = run?;
    let m1 = settled(agent.port, &dest)?;
    let redis_after = match w.kind {
        Kind::Redis { .. } => Some(fx.redis_commandstats()?),
        Kind::Pg { .. } => None,
    };

    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (cpu_pct, rss_kib) = match (u0, u1) {
        (Some(a), Some(b)) => (
            b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / tck / wall * 100.0,
            b.rss_kib,
        ),
        _ => (f64::NAN, 0),
    };

    let mut extra = BTreeMap::new();
    let mut tool_vs_server = None;
    let expected: BTreeMap<String, u64> = match (redis_before, redis_after) {
        (Some(before), Some(after)) => {
            // The before-INFO ran after the first read and is counted in the second; it was
            // sent before the counted window.
            let ran: BTreeMap<String, u64> = after
                .iter()
                .filter(|(op, _)| op.as_str() != "INFO")
                .map(|(op, n)| {
                    (
                        op.clone(),
                        n.saturating_sub(before.get(op).copied().unwrap_or(0)),
                    )
                })
                .filter(|(_, n)| *n > 0)
                .collect();
            for (op, n) in &ran {
                match run.done.get(op) {
                    Some(d) if d != n => {
                        tool_vs_server = Some(format!(
                            "redis-benchmark completed {d} {op}, the server ran {n}"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        extra.insert(op.clone(), *n);
                    }
                }
            }
            ran
        }
        _ => {
            let mut e = run.done.clone();
            for (op, n) in PGBENCH_SETUP {
                *e.entry((*op).to_string()).or_insert(0) += n;
            }
            e
        }
    };
    let mut client = delta_by_op(&m0, &m1, system, "client", &dest);
    let mut server = delta_by_op(&m0, &m1, system, "server", &dest);
    // The bench's own INFO commandstats calls: the agent folds the kernel's counts every
    // 250 ms, so the one sent just before the run may be counted in it or before it.
    if matches!(w.kind, Kind::Redis { .. }) {
        client.remove("INFO");
        server.remove("INFO");
    }
    let errors = m1.sum("insite_db_query_errors_total", &[("destination", &dest)])
        - m0.sum("insite_db_query_errors_total", &[("destination", &dest)]);
    let kernel = KERNEL_COUNTERS
        .iter()
        .map(|(label, name, ring)| {
            let f: &[(&str, &str)] = if *ring { &[("ring", "db_events")] } else { &[] };
            let v = m1.has(name).then(|| m1.sum(name, f) - m0.sum(name, f));
            (*label, v)
        })
        .collect();
    let ring = [("ring", "db_events")];
    let ring_events =
        m1.sum("insite_ringbuf_events_total", &ring) - m0.sum("insite_ringbuf_events_total", &ring);
    Ok(AgentRun {
        run,
        wall,
        bpf_ns,
        cpu_pct,
        rss_kib,
        check: Check {
            expected,
            client,
            server,
            extra,
            tool_vs_server,
            errors,
            roles,
            kernel,
            ring_events,
        },
    })
}

/// One agent for the round, every workload with it.
fn agent_phase(fx: &Fixture, ws: &[Workload], o: &Opts, round: usize) -> Result<Vec<AgentRun>> {
    let mut agent = BenchAgent::start(&fx.dir.0, round, o.keep_probes, o.roles)?;
    // Run-time statistics while the fd is open.
    let stats = if o.bpf_stats {
        Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling kernel.bpf_stats")?,
        )
    } else {
        None
    };
    let runs = ws
        .iter()
        .map(|w| {
            run_with_agent(fx, w, o.seconds, &mut agent, stats.is_some(), o.roles)
                .with_context(|| w.name())
        })
        .collect();
    drop(stats);
    runs
}

/// Nanoseconds the db programs of the agent `pid` have run (programs it holds an fd of, found
/// in /proc/<pid>/fdinfo, whose names start with `isa_db`; only entry programs count runs, a
/// tail-called walker's time is its caller's).
fn bpf_run_time(pid: u32) -> Option<u64> {
    let mut ids = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.insert(id);
        }
    }
    let ns = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("isa_db")))
        .map(|p| p.run_time().as_nanos() as u64)
        .sum();
    Some(ns)
}

fn baseline_phase(fx: &Fixture, ws: &[Workload], secs: u32) -> Result<Vec<Run>> {
    ws.iter()
        .map(|w| run_workload(fx, w, secs, None).with_context(|| w.name()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Machine noise
// ---------------------------------------------------------------------------------------------

/// (CPU ticks the whole machine spent busy, ticks of this bench and its descendants: servers,
/// clients, agents, also those reaped), so that the difference of two readings is what other
/// processes used in between. Summing every other process's own times
/// instead would be wrong: a parent that reaps a long build during the bench gets all of the
/// build's time, most of it from before, added at once.
fn cpu_ticks() -> (u64, u64) {
    let machine = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .lines()
                .next()?
                .strip_prefix("cpu ")?
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // user, nice, system, irq, softirq: with tick-based accounting a tick in irq or
            // softirq context is also charged to the task it interrupted (as system time).
            // idle, iowait and steal are not; guest is part of user.
            Some(f.get(..3)?.iter().sum::<u64>() + f.get(5..7)?.iter().sum::<u64>())
        })
        .unwrap_or(0);
    let me = std::process::id();
    let mut procs: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(Result::ok) {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let Some((_, after)) = stat.rsplit_once(')') else {
                continue;
            };
            let f: Vec<&str> = after.split_whitespace().collect();
            // ppid [1]; utime, stime, cutime, cstime [11..=14] after "comm)".
            let ppid = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let ticks = f
                .get(11..=14)
                .and_then(|v| v.iter().map(|x| x.parse::<u64>().ok()).sum::<Option<u64>>())
                .unwrap_or(0);
            procs.insert(pid, (ppid, ticks));
        }
    }
    let ours = |mut pid: u32| {
        for _ in 0..64 {
            if pid == me {
                return true;
            }
            match procs.get(&pid) {
                Some((ppid, _)) if *ppid != 0 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let own = procs
        .iter()
        .filter(|(pid, _)| ours(**pid))
        .map(|(_, (_, t))| *t)
        .sum();
    (machine, own)
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample standard deviation (NaN below two values).
fn sd(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return f64::NAN;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Half-width of a ~95% interval for the mean of `v` (Student's t).
fn ci95(v: &[f64]) -> f64 {
    const T: [f64; 10] = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23];
    let n = v.len();
    if n < 2 {
        return f64::NAN;
    }
    T.get(n - 2).copied().unwrap_or(2.1) * sd(v) / (n as f64).sqrt()
}

/// The verdict on `TARGET` for per-round ratios with mean `m` and interval ±`u`: (short, with
/// the reason).
fn verdict(m: f64, u: f64) -> (&'static str, String) {
    if u.is_nan() {
        return if m >= TARGET {
            ("met?", "met (one round: no interval)".to_string())
        } else {
            ("MISSED?", "MISSED (one round: no interval)".to_string())
        };
    }
    if m - u >= TARGET {
        ("met", format!("met (the whole interval is above {TARGET})"))
    } else if m + u < TARGET {
        (
            "MISSED",
            format!("MISSED (the whole interval is below {TARGET})"),
        )
    } else if m >= TARGET {
        (
            "met? (within noise)",
            format!(
                "met on the mean, but not clearly: the noise (±{u:.3}) is larger than the \
                 margin ({:+.3}); more --rounds or a quieter machine",
                m - TARGET
            ),
        )
    } else {
        (
            "missed? (within noise)",
            format!(
                "missed on the mean, but not clearly: the noise (±{u:.3}) is larger than the \
                 shortfall ({:+.3}); more --rounds or a quieter machine",
                m - TARGET
            ),
        )
    }
}

fn fmt_ops(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "nothing".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn total(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

// ---------------------------------------------------------------------------------------------
// The bench
// ---------------------------------------------------------------------------------------------

pub fn run(o: Opts) -> Result<()> {
    let rounds = o.rounds.max(1) as usize;
    let secs = o.seconds.max(1);
    let o = Opts { seconds: secs, ..o };
    let started = Instant::now();
    // SAFETY: sysconf has no preconditions.
    let (tck, ncpu) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN).max(1) as f64,
        )
    };

    eprintln!(
        "bench db: starting redis-server and PostgreSQL (initdb, pgbench -i -s {})",
        o.scale
    );
    let fx = Fixture::start(o.scale)?;

    let mut ws = vec![
        Workload {
            kind: Kind::Redis { pipeline: 1 },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Redis {
                pipeline: REDIS_PIPELINE,
            },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Pg { mode: "simple" },
            redis_n: 0,
        },
        Workload {
            kind: Kind::Pg { mode: "prepared" },
            redis_n: 0,
        },
    ];
    if o.pg_extended {
        ws.push(Workload {
            kind: Kind::Pg { mode: "extended" },
            redis_n: 0,
        });
    }

    // Warm-up, not reported; it also sizes the Redis runs to take about `secs` each.
    eprintln!("bench db: warm-up");
    for w in &mut ws {
        match w.kind {
            Kind::Redis { pipeline } => {
                let probe_n = if pipeline > 1 { 200_000 } else { 20_000 };
                let probe = Workload {
                    kind: w.kind,
                    redis_n: o.requests.unwrap_or(probe_n),
                };
                let r = run_workload(&fx, &probe, 1, None).context("warm-up")?;
                // Two tests (SET, GET) of n requests each: n = rate * secs / 2.
                let sized = (r.rate * f64::from(secs) / 2.0 / 1000.0).ceil() as u64 * 1000;
                w.redis_n = o.requests.unwrap_or(sized.max(1000));
            }
            Kind::Pg { .. } => {
                run_workload(&fx, w, 1, None).context("warm-up")?;
            }
        }
    }

    println!(
        "bench db: {} workloads, {rounds} rounds of [baseline, agent] + a closing baseline \
         (each phase runs every workload; one agent per agent phase)",
        ws.len()
    );
    for w in &ws {
        println!("  {:<24} {}", w.name(), w.describe(&fx, secs));
    }
    println!(
        "servers: redis-server (pid {}) on 127.0.0.1:{} (--save '' --appendonly no), \
         PostgreSQL 15 (pid {}; pgbench -i -s {}, ssl/fsync off) on {} and 127.0.0.1:{}; \
         temp dir {}",
        fx.redis.child.id(),
        fx.redis_port,
        fx.pg.child.id(),
        o.scale,
        fx.pg_destination(),
        fx.pg_port,
        fx.dir.0.display()
    );
    println!(
        "agent: {} --config <tmp>, {}, db probe on; private metrics port and control socket{}",
        agent_bin().display(),
        if o.keep_probes {
            "syscalls and net probes ON (--keep-probes)"
        } else {
            "syscalls and net probes off (--keep-probes keeps them on)"
        },
        if o.bpf_stats {
            "; kernel.bpf_stats on during the agent phases (--bpf-stats)"
        } else {
            ""
        }
    );

    let ticks_before = cpu_ticks();
    let bench_start = Instant::now();
    let mut base: Vec<Vec<Run>> = Vec::with_capacity(rounds + 1);
    let mut agent: Vec<Vec<AgentRun>> = Vec::with_capacity(rounds);
    eprint!("bench db: round");
    for r in 1..=rounds {
        eprint!(" {r}/{rounds}");
        base.push(baseline_phase(&fx, &ws, secs)?);
        // Once more if the agent exited mid-run (something else on a shared machine may signal
        // it); a second exit, or an agent that does not start, ends the bench.
        agent.push(match agent_phase(&fx, &ws, &o, r) {
            Err(e) if format!("{e:#}").contains(crate::bench::EXITED_DURING_RUN) => {
                eprintln!("\nbench db: retrying the agent phase once: {e:#}");
                agent_phase(&fx, &ws, &o, r)?
            }
            other => other?,
        });
    }
    base.push(baseline_phase(&fx, &ws, secs)?);
    eprintln!(" done");
    let ticks_after = cpu_ticks();
    let others = (ticks_after.0.saturating_sub(ticks_before.0))
        .saturating_sub(ticks_after.1.saturating_sub(ticks_before.1));
    let pct = |ticks: u64| ticks as f64 / tck / bench_start.elapsed().as_secs_f64() / ncpu * 100.0;
    let others_pct = pct(others);
    let own_pct = pct(ticks_after.1.saturating_sub(ticks_before.1));

    let mut summary = Vec::new();
    let mut any_foreign = false;
    for (i, w) in ws.iter().enumerate() {
        let b: Vec<f64> = base.iter().map(|p| p[i].rate).collect();
        let a: Vec<f64> = agent.iter().map(|p| p[i].run.rate).collect();
        let ratios: Vec<f64> = (0..rounds)
            .map(|r| a[r] / ((b[r] + b[r + 1]) / 2.0))
            .collect();
        let runs_of = |r: usize| [&base[r][i], &agent[r][i].run, &base[r + 1][i]];
        let mark = |r: usize| runs_of(r).iter().any(|s| !s.foreign.is_empty());

        println!();
        println!("== {} ({}) ==", w.name(), w.describe(&fx, secs));
        println!(
            "  {:>5} {:>11} {:>11} {:>7} {:>9} {:>10}  counted per role (client / server / expected)",
            "round",
            format!("baseline {}", w.unit()).trim_end(),
            "agent",
            "ratio",
            "agent cpu",
            "agent rss",
        );
        for r in 0..rounds {
            let ar = &agent[r][i];
            let c = &ar.check;
            println!(
                "  {:>5} {:>11.0} {:>11.0} {:>7.3} {:>8.1}% {:>6} MiB  {} / {} / {} {}{}",
                r + 1,
                b[r],
                a[r],
                ratios[r],
                ar.cpu_pct,
                ar.rss_kib / 1024,
                total(&c.client),
                total(&c.server),
                total(&c.expected),
                if c.matched() { "matched" } else { "MISMATCH" },
                if mark(r) { " *" } else { "" }
            );
        }
        println!("  {:>5} {:>11.0}", "close", b[rounds]);

        // Count check details.
        let checks: Vec<&Check> = agent.iter().map(|p| &p[i].check).collect();
        let matched = checks.iter().filter(|c| c.matched()).count();
        let first = &agent[0][i];
        match w.kind {
            Kind::Redis { .. } => {
                let extra = fmt_ops(&first.check.extra);
                println!(
                    "  count check: expected = the server's own INFO commandstats over the run \
                     = redis-benchmark's completed requests ({} in round 1) + its start-up \
                     commands not in its report ({extra} in round 1); {matched}/{rounds} runs \
                     matched exactly, every role followed",
                    fmt_ops(&first.run.done),
                );
            }
            Kind::Pg { .. } => println!(
                "  count check: expected = pgbench's processed transactions (one SELECT each; \
                 {} in round 1) + its set-up queries ({}); {matched}/{rounds} runs matched \
                 exactly, every role followed",
                first.run.done.get("SELECT").copied().unwrap_or(0),
                fmt_ops(
                    &PGBENCH_SETUP
                        .iter()
                        .map(|(k, v)| ((*k).to_string(), *v))
                        .collect()
                )
            ),
        }
        for (r, ar) in agent.iter().map(|p| &p[i]).enumerate() {
            let c = &ar.check;
            if !c.matched() {
                let lost: Vec<String> = c
                    .kernel
                    .iter()
                    .filter_map(|(k, v)| Some((k, (*v)?)))
                    .filter(|(_, v)| *v > 0.0)
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect();
                println!(
                    "    round {}: expected {}; client {}; server {}; agent counters in this run: \
                     {}",
                    r + 1,
                    fmt_ops(&c.expected),
                    fmt_ops(&c.client),
                    fmt_ops(&c.server),
                    if lost.is_empty() {
                        "all 0".to_string()
                    } else {
                        lost.join(", ")
                    }
                );
            }
            if let Some(d) = &c.tool_vs_server {
                println!("    round {}: {d}", r + 1);
            }
            if ar.run.failed > 0 {
                println!(
                    "    round {}: pgbench reported {} failed transactions",
                    r + 1,
                    ar.run.failed
                );
            }
        }
        let errors: f64 = checks.iter().map(|c| c.errors).sum();
        let events: f64 = checks.iter().map(|c| c.ring_events).sum();
        let wall: f64 = agent.iter().map(|p| p[i].wall).sum();
        let counted: u64 = checks
            .iter()
            .map(|c| total(&c.client) + total(&c.server))
            .sum();
        let mut kernel = String::new();
        let mut losses = Vec::new();
        for (k, (label, _)) in checks[0].kernel.iter().enumerate() {
            let vals: Vec<Option<f64>> = checks.iter().map(|c| c.kernel[k].1).collect();
            let s = if vals.iter().all(Option::is_some) {
                let sum = vals.iter().flatten().sum::<f64>();
                if sum > 0.0 {
                    losses.push(format!("{label} {sum:.0}"));
                }
                format!("{sum:.0}")
            } else {
                "n/a".to_string()
            };
            let _ = write!(kernel, "{}{label} {s}", if k == 0 { "" } else { ", " });
        }
        println!(
            "  agent counters over its runs (host-wide): {kernel}; query errors at this \
             destination {errors:.0}; db ring events {events:.0} ({:.2} per counted query, \
             {:.0}/s while the tool ran)",
            events / counted.max(1) as f64,
            events / wall
        );

        let bpf: Option<Vec<u64>> = agent.iter().map(|p| p[i].bpf_ns).collect();
        if let Some(bpf) = bpf {
            let ns: u64 = bpf.iter().sum();
            let queries: u64 = checks.iter().map(|c| total(&c.expected)).sum();
            println!(
                "  in-kernel (kernel.bpf_stats): the db programs ran {:.0} ns per query (its \
                 client and server sockets together), {:.1}% of the machine's CPU time while \
                 the tool ran",
                ns as f64 / queries.max(1) as f64,
                ns as f64 / (wall * ncpu * 1e9) * 100.0
            );
        }
        let (bm, bs) = (mean(&b), sd(&b));
        let (am, asd) = (mean(&a), sd(&a));
        let (rm, ru) = (mean(&ratios), ci95(&ratios));
        let neighbours: Vec<f64> = b.windows(2).map(|p| (p[1] / p[0] - 1.0).abs()).collect();
        let noise = mean(&neighbours);
        let (short, v) = verdict(rm, ru);
        println!(
            "  baseline {bm:.0} ± {bs:.0} {u} (sd, {} runs), agent {am:.0} ± {asd:.0} {u} ({} runs); \
             ratio agent/baseline {rm:.3} ± {ru:.3} (~95%); neighbouring baselines differ by \
             {:.1}% on average",
            b.len(),
            a.len(),
            noise * 100.0,
            u = w.unit()
        );
        println!("  target >= {TARGET}: {v}");
        if (1.0 - rm).abs() < noise {
            println!(
                "  (the agent's difference from the baseline, {:+.1}%, is smaller than the \
                 baselines' own round-to-round difference)",
                (rm - 1.0) * 100.0
            );
        }
        let cpu: Vec<f64> = agent.iter().map(|p| p[i].cpu_pct).collect();
        let rss = agent.iter().map(|p| p[i].rss_kib).max().unwrap_or(0);
        any_foreign |= (0..rounds).any(mark);
        summary.push((
            w.name(),
            format!("{bm:.0} ± {bs:.0}"),
            format!("{am:.0} ± {asd:.0}"),
            format!("{rm:.3} ± {ru:.3}"),
            short.to_string(),
            format!("{:.1}%", mean(&cpu)),
            format!("{:.1} MiB", rss as f64 / 1024.0),
            format!("{matched}/{rounds}"),
            if losses.is_empty() {
                "none".to_string()
            } else {
                losses.join(", ")
            },
        ));
    }

    println!();
    if any_foreign {
        println!(
            "* tracers this bench did not start (another insite-agent or bpftrace) ran during \
             these rounds: they slow the baselines too, so those ratios are unreliable"
        );
    }
    println!(
        "noise: other processes used {others_pct:.1}% of the machine's {ncpu} CPUs during the \
         rounds (this bench's servers, clients and agents {own_pct:.1}%){}",
        if others_pct > 5.0 {
            " (busy: the figures are disturbed; rerun on a quiet machine)"
        } else {
            ""
        }
    );
    println!();
    println!(
        "summary ({rounds} rounds; throughput mean ± sd; ratio = agent / mean of the baselines \
         before and after, mean over rounds ± ~95%; agent cpu = mean % of one CPU while the \
         workload ran; rss = max VmRSS)"
    );
    println!(
        "  {:<24} {:>16} {:>16} {:>14}  {:<22} {:>9} {:>10} {:>7}  agent losses",
        "workload",
        "baseline",
        "agent",
        "ratio",
        "target >= 0.97",
        "agent cpu",
        "agent rss",
        "counts",
    );
    for (name, bl, ag, ratio, v, cpu, rss, counts, losses) in &summary {
        println!(
            "  {name:<24} {bl:>16} {ag:>16} {ratio:>14}  {v:<22} {cpu:>9} {rss:>10} {counts:>7}  \
             {losses}"
        );
    }
    println!("bench db: {:.0}s in all", started.elapsed().as_secs_f64());
    drop(fx);
    Ok(())
}
