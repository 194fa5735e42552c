//! The servers and the agent a run measures: a scratch directory, Redis and PostgreSQL
//! started for the bench, the agent with its config, and their stopping.

use super::*;

/// A directory removed with everything in it when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Result<Self> {
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
    pub(crate) fn subdir(&self, name: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
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
pub(crate) struct Server {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
    pub(crate) signal: i32,
    pub(crate) log: PathBuf,
}

impl Server {
    pub(crate) fn spawn(
        name: &'static str,
        cmd: &mut Command,
        log: &Path,
        signal: i32,
    ) -> Result<Self> {
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
    pub(crate) fn wait_ready(&mut self, needle: &str, path: Option<&Path>) -> Result<()> {
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
pub(crate) fn stop_child(child: &mut Child, signal: i32, grace: Duration, name: &str) {
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
pub(crate) struct Fixture {
    pub(crate) pg: Server,
    pub(crate) pg_port: u16,
    pub(crate) pg_socket_dir: PathBuf,
    pub(crate) redis: Server,
    pub(crate) redis_port: u16,
    pub(crate) dir: TempDir,
}

impl Fixture {
    pub(crate) fn start(scale: u32) -> Result<Self> {
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

    pub(crate) fn pgbench_cmd(&self) -> Command {
        let mut cmd = Command::new(format!("{PG_BIN}/pgbench"));
        cmd.env("PGHOST", &self.pg_socket_dir)
            .env("PGPORT", self.pg_port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres");
        cmd
    }

    /// The agent's `destination` label of the pgbench connections.
    pub(crate) fn pg_destination(&self) -> String {
        format!(
            "unix:{}",
            self.pg_socket_dir
                .join(format!(".s.PGSQL.{}", self.pg_port))
                .display()
        )
    }

    pub(crate) fn redis_destination(&self) -> String {
        format!("127.0.0.1:{}", self.redis_port)
    }

    pub(crate) fn destination(&self, w: &Workload) -> String {
        match w.kind {
            Kind::Redis { .. } => self.redis_destination(),
            Kind::Pg { .. } => self.pg_destination(),
        }
    }

    /// Calls per command from `INFO commandstats` (`config|get` as `CONFIG`, summed).
    pub(crate) fn redis_commandstats(&self) -> Result<BTreeMap<String, u64>> {
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

pub(crate) fn start_redis(dir: &TempDir) -> Result<(Server, u16)> {
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

pub(crate) fn start_postgres(dir: &TempDir) -> Result<(Server, u16, PathBuf)> {
    let owner = insite_e2e::servers::user_ids("postgres")?;
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
pub(crate) struct BenchAgent {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
}

impl BenchAgent {
    pub(crate) fn start(
        parent: &Path,
        round: usize,
        keep_probes: bool,
        roles: Roles,
    ) -> Result<Self> {
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
    pub(crate) fn wait_ready(&mut self, log_path: &Path, cfg: &Path) -> Result<()> {
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

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_running(&mut self) -> Result<()> {
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

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------
