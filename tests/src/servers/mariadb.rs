//! A private MariaDB server per test, copied from a template made once, and its clients
//! (mariadb, mysqlslap).

use super::*;

/// A private MariaDB server: user `root` without a password (from the socket and from
/// 127.0.0.1), ssl off, on 127.0.0.1:`port` and the unix socket `socket`. The database `insite`
/// exists (empty); the client helpers use it.
pub struct Mariadb {
    pub port: u16,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub log_path: PathBuf,
    server: Server,
}

/// The empty database every [`Mariadb`] has, and its clients' default.
pub const MARIADB_DATABASE: &str = "insite";

impl Mariadb {
    pub fn start() -> Result<Mariadb> {
        retry_on_port_clash(Self::try_start)
    }

    fn try_start() -> Result<Mariadb> {
        let template =
            template(&MARIADB_TEMPLATE, make_mariadb_template).context("MariaDB template")?;
        let owner = Owner::current();
        let dir = server_dir("insite-mariadb-", owner)?;
        let data_dir = dir.path().join("data");
        copy_tree(&template.join("data"), &data_dir)?;
        let socket = dir.path().join("mysqld.sock");
        let init = dir.path().join("init.sql");
        std::fs::write(
            &init,
            format!("CREATE DATABASE IF NOT EXISTS {MARIADB_DATABASE};\n"),
        )
        .context("writing init.sql")?;
        let port = free_port()?;
        let log_path = dir.path().join("mariadbd.log");
        let mut cmd = Command::new(MARIADBD);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data_dir.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--tmpdir={}", dir.path().display()))
            .arg(format!("--init-file={}", init.display()))
            .args([
                "--skip-ssl",
                "--skip-name-resolve",
                "--innodb-log-file-size=8M",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .current_dir(dir.path());
        if is_root() {
            cmd.arg("--user=root");
        }
        let mut server = Server::spawn("mariadbd", cmd, dir, &log_path, libc::SIGTERM)?;
        server.wait_for_log("ready for connections")?;
        server.wait_for_path(&socket)?;
        Ok(Mariadb {
            port,
            socket,
            data_dir,
            log_path,
            server,
        })
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn endpoint(&self, via: Via) -> Endpoint {
        match via {
            Via::Unix => Endpoint::Unix(self.socket.clone()),
            Via::Tcp => Endpoint::Tcp(self.tcp_addr()),
        }
    }

    /// Client options for reaching this server as root (no defaults files, no ssl); they go
    /// right after the program name (`--no-defaults` must come first).
    pub fn client_args(&self, via: Via) -> Vec<String> {
        let mut args = vec![
            "--no-defaults".to_string(),
            "--skip-ssl".to_string(),
            "--user=root".to_string(),
        ];
        match via {
            Via::Unix => {
                args.push("--protocol=SOCKET".to_string());
                args.push(format!("--socket={}", self.socket.display()));
            }
            Via::Tcp => {
                args.push("--protocol=TCP".to_string());
                args.push("--host=127.0.0.1".to_string());
                args.push(format!("--port={}", self.port));
            }
        }
        args
    }

    /// One `mariadb --batch --skip-column-names --unbuffered --force` process in database
    /// `insite`, reading `sql` from stdin: one COM_QUERY per statement, tab-separated rows
    /// without headers, going on after errors (stderr has them; the exit status stays 0).
    pub fn mysql(&self, via: Via, sql: &str) -> Result<Output> {
        let mut cmd = Command::new(MARIADB);
        cmd.args(self.client_args(via)).args([
            "--batch",
            "--skip-column-names",
            "--unbuffered",
            "--force",
            &format!("--database={MARIADB_DATABASE}"),
        ]);
        run_client(&mut cmd, Some(sql.as_bytes()), CLIENT_TIMEOUT)
    }

    pub fn mysql_unix(&self, sql: &str) -> Result<Output> {
        self.mysql(Via::Unix, sql)
    }

    pub fn mysql_tcp(&self, sql: &str) -> Result<Output> {
        self.mysql(Via::Tcp, sql)
    }

    /// One `mysqlslap ARGS` process against this server, e.g.
    /// `["--concurrency=2", "--iterations=1", "--number-of-queries=200", "--auto-generate-sql"]`.
    pub fn mysqlslap(&self, via: Via, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(MYSQLSLAP);
        cmd.args(self.client_args(via)).args(args);
        run_client(&mut cmd, None, CLIENT_TIMEOUT)
    }

    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

static MARIADB_TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();

fn make_mariadb_template() -> Result<PathBuf> {
    let dir = template_dir("insite-mariadb-template-", Owner::current())?;
    let mut cmd = Command::new(MARIADB_INSTALL_DB);
    // root@localhost, root@127.0.0.1 and root@::1 without a password (not unix_socket auth);
    // no `test` database and no anonymous users.
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .args([
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--innodb-log-file-size=8M",
        ])
        .current_dir(&dir);
    if is_root() {
        cmd.arg("--user=root");
    }
    check(
        run_client(&mut cmd, None, START_TIMEOUT)?,
        "mariadb-install-db",
    )?;
    Ok(dir)
}
