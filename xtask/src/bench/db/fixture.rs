//! The servers and the agent a run measures: the end-to-end tests' Redis and PostgreSQL and
//! their agent launcher, and a scratch directory.

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
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Our redis-server and PostgreSQL cluster: the end-to-end tests' servers
/// (`insite_e2e::servers`), and a scratch directory for the tools' output. Fields drop in
/// order: the servers stop before the directory is removed.
pub(crate) struct Fixture {
    pub(crate) pg: Postgres,
    pub(crate) redis: Redis,
    pub(crate) dir: TempDir,
}

impl Fixture {
    pub(crate) fn start(scale: u32) -> Result<Self> {
        let dir = TempDir::new()?;
        let redis = Redis::start().context("starting redis-server")?;
        let pg = Postgres::start().context("starting PostgreSQL")?;
        let fx = Self { pg, redis, dir };
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

    /// pgbench against the cluster's unix socket.
    pub(crate) fn pgbench_cmd(&self) -> Command {
        let mut cmd = Command::new(format!("{PG_BIN}/pgbench"));
        cmd.envs(self.pg.env(Via::Unix));
        cmd
    }

    /// The agent's `destination` label of the pgbench connections.
    pub(crate) fn pg_destination(&self) -> String {
        format!("unix:{}", self.pg.unix_path().display())
    }

    pub(crate) fn redis_destination(&self) -> String {
        format!("127.0.0.1:{}", self.redis.port)
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
            .args(["-h", "127.0.0.1", "-p", &self.redis.port.to_string()])
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

/// The agent for one round's agent phase: the database probe on (with `roles`), the syscall
/// and network probes on only with `keep_probes`; ready once the database probe is attached.
pub(crate) fn start_db_agent(keep_probes: bool, roles: Roles) -> Result<Agent> {
    let probes = if keep_probes {
        "[syscalls]\nenabled = true\n[net]\nenabled = true\n"
    } else {
        "[syscalls]\nenabled = false\n[net]\nenabled = false\n"
    };
    let config = format!("{probes}[db]\nenabled = true\n{}", roles.config());
    Agent::try_launch(insite_e2e::Launch {
        extra: &config,
        probes: &["db"],
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------
