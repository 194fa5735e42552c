//! A private Redis server per test, and its clients (redis-cli, redis-benchmark).

use super::*;

/// A private Redis server: no persistence, DEBUG allowed (DEBUG SLEEP), on 127.0.0.1:`port`
/// and the unix socket `socket`.
pub struct Redis {
    pub port: u16,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    server: Server,
}

impl Redis {
    pub fn start() -> Result<Redis> {
        retry_on_port_clash(Self::try_start)
    }

    fn try_start() -> Result<Redis> {
        let dir = server_dir("insite-redis-", Owner::current())?;
        let socket = dir.path().join("redis.sock");
        let port = free_port()?;
        let log_path = dir.path().join("redis.log");
        let mut cmd = Command::new(REDIS_SERVER);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "777"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path());
        let mut server = Server::spawn("redis-server", cmd, dir, &log_path, libc::SIGTERM)?;
        server.wait_for_log("Ready to accept connections")?;
        server.wait_for_path(&socket)?;
        Ok(Redis {
            port,
            socket,
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

    fn conn_args(&self, via: Via) -> Vec<String> {
        match via {
            Via::Unix => vec!["-s".to_string(), self.socket.display().to_string()],
            Via::Tcp => vec![
                "-h".to_string(),
                "127.0.0.1".to_string(),
                "-p".to_string(),
                self.port.to_string(),
            ],
        }
    }

    /// One `redis-cli ARGS` process (raw output: not a terminal).
    pub fn cli(&self, via: Via, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(REDIS_CLI);
        cmd.args(self.conn_args(via)).args(args);
        run_client(&mut cmd, None, CLIENT_TIMEOUT)
    }

    pub fn cli_tcp(&self, args: &[&str]) -> Result<Output> {
        self.cli(Via::Tcp, args)
    }

    pub fn cli_unix(&self, args: &[&str]) -> Result<Output> {
        self.cli(Via::Unix, args)
    }

    /// One `redis-benchmark ARGS` process, e.g. `["-n", "1000", "-c", "4", "-t", "get,set"]`.
    pub fn benchmark(&self, via: Via, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(REDIS_BENCHMARK);
        cmd.args(self.conn_args(via)).args(args);
        run_client(&mut cmd, None, CLIENT_TIMEOUT)
    }

    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}
