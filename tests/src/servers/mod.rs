//! Real database servers for the end-to-end tests: a private PostgreSQL 15 cluster, MariaDB
//! 10.11 and Redis 7 instance per test, each on a free 127.0.0.1 port AND a unix socket in its
//! own temporary directory, and the real command-line clients to talk to them.
//!
//! Nothing here uses or needs a cluster or service that the Debian packages set up. Each server
//! is stopped, and its directory removed, when its struct is dropped (also while a failing test
//! unwinds); a server that is never dropped (kept in a `static`) is stopped by an exit handler.
//! The data directories are copied from a template made once per test binary (initdb and
//! mariadb-install-db each take over a second; a copy takes a fraction of that).
//!
//! The servers run as root's children: PostgreSQL as the `postgres` system user (initdb and
//! postgres refuse root), MariaDB and Redis as root. Without root everything runs as the
//! current user instead.
//!
//! Every client helper runs ONE client process and waits for it (at most [`CLIENT_TIMEOUT`]),
//! so a test knows how many connections and queries it made: psql and mariadb read the SQL from
//! stdin and send each `;`-terminated statement as its own query (psql: one simple-protocol
//! Query message each), and go on after a failing statement. The helpers return the client's
//! [`Output`] whatever its exit status; an `Err` means it could not be run or timed out.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    os::unix::{
        fs::PermissionsExt as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{mpsc, Mutex, Once, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::wire_clients::Endpoint;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const MARIADBD: &str = "/usr/sbin/mariadbd";
const MARIADB_INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
const MARIADB: &str = "/usr/bin/mariadb";
const MYSQLSLAP: &str = "/usr/bin/mysqlslap";
const REDIS_SERVER: &str = "/usr/bin/redis-server";
const REDIS_CLI: &str = "/usr/bin/redis-cli";
const REDIS_BENCHMARK: &str = "/usr/bin/redis-benchmark";

/// How long a server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a server may take to stop after its shutdown signal before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one client process (psql, mariadb, redis-cli, pgbench, ...) may run.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

/// How a client reaches a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The server's unix socket.
    Unix,
    /// 127.0.0.1:<port>.
    Tcp,
}

pub mod alertmanager;
mod mariadb;
mod postgres;
mod redis;

pub use alertmanager::{Alertmanager, Recorder};
pub use mariadb::{Mariadb, MARIADB_DATABASE};
pub use postgres::Postgres;
pub use redis::Redis;

// ---------------------------------------------------------------------------------------------
// Server processes, their directories, and cleanup
// ---------------------------------------------------------------------------------------------

/// A running server process and its directory: stopped (shutdown signal, then SIGKILL after
/// [`STOP_TIMEOUT`]) and removed when dropped.
struct Server {
    name: &'static str,
    child: Child,
    stop_signal: i32,
    log_path: PathBuf,
    // Dropped (removed) after the process has stopped.
    _dir: tempfile::TempDir,
}

impl Server {
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: tempfile::TempDir,
        log_path: &Path,
        stop_signal: i32,
    ) -> Result<Server> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {name} ({})", describe(&cmd)))?;
        live_add(Live {
            pid: Some(child.id() as i32),
            signal: stop_signal,
            dir: dir.path().to_path_buf(),
        });
        Ok(Server {
            name,
            child,
            stop_signal,
            log_path: log_path.to_path_buf(),
            _dir: dir,
        })
    }

    /// Waits until the log has `needle` (the server's own "ready" line: no connection is made,
    /// so an agent already running sees no extra traffic).
    fn wait_for_log(&mut self, needle: &str) -> Result<()> {
        self.wait_until(|s| {
            std::fs::read_to_string(&s.log_path)
                .unwrap_or_default()
                .contains(needle)
        })
        .with_context(|| format!("waiting for {:?}", needle))
    }

    fn wait_for_path(&mut self, path: &Path) -> Result<()> {
        self.wait_until(|_| path.exists())
            .with_context(|| format!("waiting for {}", path.display()))
    }

    fn wait_until(&mut self, mut ready: impl FnMut(&Self) -> bool) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(self) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during startup ({status}); log:\n{}",
                    self.name,
                    log_tail(&self.log_path)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} not ready after {START_TIMEOUT:?}; log:\n{}",
                    self.name,
                    log_tail(&self.log_path)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own (not yet reaped) child.
            unsafe { libc::kill(pid, self.stop_signal) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                eprintln!(
                    "{} (pid {pid}) ignored signal {}: killing it",
                    self.name, self.stop_signal
                );
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        live_remove(pid);
    }
}

/// What the exit handler must stop and remove: servers never dropped, and the templates.
struct Live {
    pid: Option<i32>,
    signal: i32,
    dir: PathBuf,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());

fn live_add(l: Live) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain extern "C" function.
        unsafe { libc::atexit(cleanup_at_exit) };
    });
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).push(l);
}

fn live_remove(pid: i32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|l| l.pid != Some(pid));
}

extern "C" fn cleanup_at_exit() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for l in &live {
        if let Some(pid) = l.pid {
            // SAFETY: our own child, never reaped (its struct was never dropped).
            unsafe { libc::kill(pid, l.signal) };
        }
    }
    for l in &live {
        if let Some(pid) = l.pid {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                // SAFETY: waitpid on our own child with a valid status pointer.
                let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                if r != 0 {
                    break;
                }
                if Instant::now() > deadline {
                    // SAFETY: as above.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&l.dir);
    }
}

/// The template made once per test binary by `make` (or the error it failed with).
fn template(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    make: fn() -> Result<PathBuf>,
) -> Result<&'static Path> {
    cell.get_or_init(|| make().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("{e}"))
}

/// A directory kept until the test binary exits (removed by the exit handler).
fn template_dir(prefix: &str, owner: Owner) -> Result<PathBuf> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a template directory")?
        .keep();
    live_add(Live {
        pid: None,
        signal: 0,
        dir: dir.clone(),
    });
    owner.chown(&dir)?;
    Ok(dir)
}

/// A server's own directory (mode 0755: its sockets are reachable by anyone).
fn server_dir(prefix: &str, owner: Owner) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a server directory")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    owner.chown(dir.path())?;
    Ok(dir)
}

fn make_dir(path: &Path, owner: Owner) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("mkdir {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    owner.chown(path)
}

/// `cp -a`: keeps owners and modes (the data directories must stay the servers' own).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .context("running cp")?;
    check(out, &format!("cp -a {} {}", from.display(), to.display()))
}

/// The user a server runs as: the named system user when we are root, else ourselves.
#[derive(Clone, Copy)]
struct Owner(Option<(u32, u32)>);

impl Owner {
    fn current() -> Owner {
        Owner(None)
    }

    fn apply(self, cmd: &mut Command) {
        if let Some((uid, gid)) = self.0 {
            cmd.uid(uid).gid(gid);
        }
    }

    fn chown(self, path: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.0 {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(())
    }
}

fn run_as(user: &str) -> Result<Owner> {
    if !is_root() {
        return Ok(Owner::current());
    }
    Ok(Owner(Some(user_ids(user)?)))
}

/// (uid, gid) of a system user (the benches' servers run as the same users).
pub fn user_ids(user: &str) -> Result<(u32, u32)> {
    let name = std::ffi::CString::new(user)?;
    // SAFETY: passwd is plain data, all-zero is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and length; getpwnam_r (thread-safe, unlike getpwnam) fills `pwd`,
    // its strings in `buf`, and sets `found` to `&pwd` or to null.
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
        bail!(
            "no system user {user:?} (is its server package installed? `cargo xtask setup --tests`)"
        );
    }
    Ok((pwd.pw_uid, pwd.pw_gid))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")?
        .port())
}

/// Another free port if the one picked was taken before the server could bind it.
fn retry_on_port_clash<T>(start: fn() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        match start() {
            Err(e) if attempt < 2 && format!("{e:#}").contains("already in use") => attempt += 1,
            other => return other,
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// `out` if it succeeded, else an error with its stderr and stdout.
fn check(out: Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Runs one client process with `stdin`, collecting its output; kills it after `timeout`.
fn run_client(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let pid = child.id() as i32;
    let writer = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(input)) => {
            let input = input.to_vec();
            Some(std::thread::spawn(move || {
                // A client that exits early closes its stdin: not our error to report.
                let _ = pipe.write_all(&input);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take().context("stdout pipe")?;
    let mut err_pipe = child.stderr.take().context("stderr pipe")?;
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = Vec::new();
        let _ = out_pipe.read_to_end(&mut stdout);
        let _ = tx.send((child.wait(), stdout));
    });
    let (status, stdout) = match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            // SAFETY: our own child, not yet reaped (the waiter has not sent).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = rx.recv();
            bail!("{what} did not finish within {timeout:?}");
        }
    };
    let status = status.with_context(|| format!("waiting for {what}"))?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stderr = err_reader.join().unwrap_or_default();
    if let Some(sig) = status.signal() {
        bail!(
            "{what} killed by signal {sig}:\n{}",
            String::from_utf8_lossy(&stderr)
        );
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}
