//! A private PostgreSQL 15 cluster per test, copied from a template made once, and its clients
//! (psql, pgbench).

use super::*;

/// A private PostgreSQL 15 cluster: trust authentication, ssl off, fsync off, on
/// 127.0.0.1:`port` and `<socket_dir>/.s.PGSQL.<port>`. Database and user: `postgres`.
pub struct Postgres {
    pub port: u16,
    pub socket_dir: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    server: Server,
}

impl Postgres {
    pub fn start() -> Result<Postgres> {
        retry_on_port_clash(Self::try_start)
    }

    fn try_start() -> Result<Postgres> {
        let template = template(&PG_TEMPLATE, make_pg_template).context("PostgreSQL template")?;
        let owner = run_as("postgres")?;
        let dir = server_dir("insite-pg-", owner)?;
        let data_dir = dir.path().join("data");
        copy_tree(&template.join("data"), &data_dir)?;
        let socket_dir = dir.path().join("sock");
        make_dir(&socket_dir, owner)?;
        let port = free_port()?;
        let log_path = dir.path().join("postgres.log");
        let mut cmd = Command::new(format!("{PG_BIN}/postgres"));
        cmd.arg("-D")
            .arg(&data_dir)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&socket_dir)
            .args(["-c", "ssl=off"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "logging_collector=off"])
            .args(["-c", "log_destination=stderr"])
            .env("LC_ALL", "C")
            .current_dir(dir.path());
        owner.apply(&mut cmd);
        // SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to leave).
        let mut server = Server::spawn("postgres", cmd, dir, &log_path, libc::SIGINT)?;
        server.wait_for_log("database system is ready to accept connections")?;
        server.wait_for_path(&socket_dir.join(format!(".s.PGSQL.{port}")))?;
        Ok(Postgres {
            port,
            socket_dir,
            data_dir,
            log_path,
            server,
        })
    }

    /// `<socket_dir>/.s.PGSQL.<port>`.
    pub fn unix_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// For the raw client in [`crate::wire_clients`].
    pub fn endpoint(&self, via: Via) -> Endpoint {
        match via {
            Via::Unix => Endpoint::Unix(self.unix_path()),
            Via::Tcp => Endpoint::Tcp(self.tcp_addr()),
        }
    }

    /// `postgresql://postgres@127.0.0.1:<port>/postgres?sslmode=disable`
    pub fn url(&self) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// libpq's environment for reaching this server (PGHOST is the socket directory for
    /// [`Via::Unix`]); every libpq client (psql, pgbench, ...) honours it.
    pub fn env(&self, via: Via) -> Vec<(&'static str, String)> {
        let host = match via {
            Via::Unix => self.socket_dir.display().to_string(),
            Via::Tcp => "127.0.0.1".to_string(),
        };
        vec![
            ("PGHOST", host),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", "postgres".to_string()),
            ("PGDATABASE", "postgres".to_string()),
        ]
    }

    /// One `psql -X -q -A -t -v ON_ERROR_STOP=0` process reading `sql` from stdin: each
    /// statement is one Query message, results unaligned without headers (`SELECT 1` prints
    /// `1`). Over TCP, psql first asks for SSL (sslmode=prefer) and is told no.
    pub fn psql(&self, via: Via, sql: &str) -> Result<Output> {
        let mut cmd = Command::new(format!("{PG_BIN}/psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-f", "-"])
            .envs(self.env(via));
        run_client(&mut cmd, Some(sql.as_bytes()), CLIENT_TIMEOUT)
    }

    pub fn psql_unix(&self, sql: &str) -> Result<Output> {
        self.psql(Via::Unix, sql)
    }

    pub fn psql_tcp(&self, sql: &str) -> Result<Output> {
        self.psql(Via::Tcp, sql)
    }

    /// One `pgbench ARGS` process against this server (connection settings from [`Self::env`]),
    /// e.g. `["-i", "-q"]` then `["-S", "-c", "2", "-t", "500"]`.
    pub fn pgbench(&self, via: Via, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(format!("{PG_BIN}/pgbench"));
        cmd.args(args).envs(self.env(via));
        run_client(&mut cmd, None, CLIENT_TIMEOUT)
    }

    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

static PG_TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn make_pg_template() -> Result<PathBuf> {
    let owner = run_as("postgres")?;
    let dir = template_dir("insite-pg-template-", owner)?;
    let mut cmd = Command::new(format!("{PG_BIN}/initdb"));
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .env("LC_ALL", "C")
        .current_dir(&dir);
    owner.apply(&mut cmd);
    check(run_client(&mut cmd, None, START_TIMEOUT)?, "initdb")?;
    Ok(dir)
}
