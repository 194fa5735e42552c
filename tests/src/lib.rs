//! Harness for the end-to-end tests and the benches (`cargo xtask bench`): start the real
//! `insite-agent` binary with a private config, port and socket; scrape it, talk to its
//! control socket, signal it, stop it.
//!
//! These tests load eBPF programs into the running kernel, so they need root. They run one at
//! a time (`cargo xtask test` passes --test-threads=1): each agent hooks every syscall on the
//! host, and several at once would measure each other.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

mod metrics;
pub mod netns;
pub mod servers;
pub mod wire_clients;

pub use metrics::{parse_sample, scrape, Metrics, Sample};

static ONE_AGENT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The agent binary: $INSITE_AGENT_BIN (set by `cargo xtask test`) or target/release.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("INSITE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/insite-agent")
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "end-to-end tests load eBPF programs and need root: run `cargo xtask test`"
    );
    assert!(
        agent_bin().exists(),
        "{} is missing: run `cargo xtask test` (it builds the agent first)",
        agent_bin().display()
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19820)
}

/// Where the agent's stderr goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stderr {
    /// A file in the agent's directory (`Agent::log`).
    #[default]
    LogFile,
    /// /dev/full: every write fails with ENOSPC, as on a full disk.
    DevFull,
    /// fd 2 closed before exec.
    Closed,
}

/// How to start an agent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Launch<'a> {
    /// TOML appended after the harness's own keys.
    pub extra: &'a str,
    /// TOML appended inside `[control]`.
    pub control_extra: &'a str,
    /// Run as this uid and gid (a world-executable copy of the binary).
    pub uid: Option<u32>,
    pub stderr: Stderr,
    /// Soft RLIMIT_NOFILE to start with (the hard limit stays), e.g. systemd's 1024.
    pub nofile_soft: Option<u64>,
    /// Probe families that must report `attached` before the agent counts as started; any
    /// other state they report is an error.
    pub probes: &'a [&'a str],
}

/// The start of `Agent::check_running`'s error: a measurement taken without the agent is void.
pub const EXITED_DURING_RUN: &str = "insite-agent exited during the measurement";

pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub port: u16,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    _guard: MutexGuard<'static, ()>,
}

/// Writes `extra` TOML after the harness's own [metrics]/[control] keys. The alert engine's
/// state goes next to the socket (never the host's /var/lib/insite-agent) unless `extra` has
/// its own `[alerts]` section.
pub fn config_text(port: u16, socket: &Path, control_extra: &str, extra: &str) -> String {
    let alerts = if extra.contains("[alerts]") {
        String::new()
    } else {
        let dir = socket.parent().unwrap_or(Path::new("/tmp")).join("state");
        format!(
            "[alerts]\nstate_dir = \"{}\"\nrule_files = []\n",
            dir.display()
        )
    };
    format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[control]\nsocket = \"{}\"\n{control_extra}\n\n{extra}\n{alerts}",
        socket.display()
    )
}

impl Agent {
    /// Starts an agent with `extra` config appended and waits until its control socket answers.
    pub fn start(extra: &str) -> Self {
        Self::start_with(extra, "")
    }

    pub fn start_with(extra: &str, control_extra: &str) -> Self {
        Self::spawn(extra, control_extra, None)
    }

    /// Starts the agent as uid/gid `nobody`: it cannot load eBPF programs, and must say so and
    /// keep running everything else.
    pub fn start_unprivileged(extra: &str) -> Self {
        Self::spawn(extra, "", Some(65534))
    }

    fn spawn(extra: &str, control_extra: &str, uid: Option<u32>) -> Self {
        Self::launch(Launch {
            extra,
            control_extra,
            uid,
            ..Launch::default()
        })
    }

    /// Starts an agent as `how` says and waits until its control socket answers.
    pub fn launch(how: Launch<'_>) -> Self {
        Self::try_launch(how).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like `launch`, with an error instead of a panic (for the benches). A metrics port taken
    /// between finding it free and the agent's bind is tried again with another.
    pub fn try_launch(how: Launch<'_>) -> Result<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the agent loads eBPF programs and needs root");
        }
        if !agent_bin().exists() {
            bail!(
                "{} is missing: build it first (cargo build --release -p insite-agent)",
                agent_bin().display()
            );
        }
        let mut last = None;
        for _ in 0..3 {
            match Self::try_launch_once(how) {
                Ok(a) => return Ok(a),
                Err(e) if format!("{e:#}").contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("insite-agent did not start")))
    }

    fn try_launch_once(how: Launch<'_>) -> Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let Launch {
            extra,
            control_extra,
            uid,
            stderr,
            nofile_soft,
            probes,
        } = how;
        let guard = ONE_AGENT_AT_A_TIME
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().context("tempdir")?;
        let socket = dir.path().join("ctl.sock");
        let port = free_port();
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            config_text(port, &socket, control_extra, extra),
        )
        .context("writing the agent's config")?;
        let log_path = dir.path().join("agent.log");
        let log = match stderr {
            Stderr::LogFile => {
                Stdio::from(std::fs::File::create(&log_path).context("creating the log file")?)
            }
            Stderr::DevFull => Stdio::from(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .context("/dev/full")?,
            ),
            // Replaced by a closed fd 2 in pre_exec below.
            Stderr::Closed => Stdio::null(),
        };
        let mut cmd = match uid {
            Some(uid) => {
                let bin = world_executable_copy(dir.path());
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).context("chown")?;
                let mut c = Command::new(bin);
                c.uid(uid).gid(uid);
                c
            }
            None => Command::new(agent_bin()),
        };
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if stderr == Stderr::Closed {
                    libc::close(2);
                }
                if let Some(soft) = nofile_soft {
                    let mut l = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
                        l.rlim_cur = soft.min(l.rlim_max);
                        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
                    }
                }
                Ok(())
            });
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(&config_path)
            .env("INSITE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning insite-agent")?;
        let mut agent = Self {
            child,
            dir,
            socket,
            port,
            config_path,
            log_path,
            _guard: guard,
        };
        agent.wait_ready(probes)?;
        Ok(agent)
    }

    /// Until the control socket answers after two ticks, and every probe in `probes` is
    /// attached.
    fn wait_ready(&mut self, probes: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "agent exited early ({status}):
{}",
                    self.log()
                );
            }
            if let Ok(v) = self.request(r#"{"cmd":"status"}"#) {
                let data = &v["data"];
                let state = |name: &str| {
                    data["probes"]
                        .as_array()
                        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
                        .map(|p| p["state"].as_str().unwrap_or_default().to_string())
                };
                if let Some((p, s)) = probes
                    .iter()
                    .filter_map(|p| state(p).map(|s| (p, s)))
                    .find(|(_, s)| s != "attached")
                {
                    let config = std::fs::read_to_string(&self.config_path).unwrap_or_default();
                    bail!(
                        "the agent's {p} probe is {s}: {data}
config:
{config}
log:
{}",
                        self.log()
                    );
                }
                let attached = probes.iter().all(|p| state(p).is_some());
                if v["ok"] == true && data["ticks"].as_u64().unwrap_or(0) >= 2 && attached {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready after 30s:
{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error with the agent's log if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{EXITED_DURING_RUN} ({status}); log:
{}",
                self.log()
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s; never panics.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One raw request line over the control socket; returns the parsed reply.
    pub fn request(&self, line: &str) -> Result<serde_json::Value> {
        let mut s = UnixStream::connect(&self.socket)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(line.as_bytes())?;
        s.write_all(b"\n")?;
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply)?;
        Ok(serde_json::from_str(reply.trim_end())?)
    }

    /// `data` of a successful control reply.
    pub fn data(&self, line: &str) -> serde_json::Value {
        let v = self.request(line).expect("control request");
        assert_eq!(v["ok"], true, "request {line} failed: {v}");
        v["data"].clone()
    }

    /// The `status` entry of probe family `name`.
    pub fn probe(&self, name: &str) -> serde_json::Value {
        let status = self.data(r#"{"cmd":"status"}"#);
        status["probes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no probe {name} in {status}"))
    }

    /// Runs the CLI against this agent's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .expect("run insite-agent CLI")
    }

    /// GET /metrics; `openmetrics` sets the Accept header Prometheus sends.
    pub fn scrape_with(&self, openmetrics: bool) -> Result<(String, String)> {
        scrape(self.port, openmetrics)
    }

    pub fn scrape(&self) -> Metrics {
        Metrics(self.scrape_with(false).expect("scrape").1)
    }

    /// Waits for `n` more collector ticks.
    pub fn wait_ticks(&self, n: u64) {
        let start = self.data(r#"{"cmd":"status"}"#)["ticks"]
            .as_u64()
            .unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.data(r#"{"cmd":"status"}"#)["ticks"]
            .as_u64()
            .unwrap_or(0)
            < start + n
        {
            assert!(Instant::now() < deadline, "agent stopped ticking");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child process.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill({sig})");
    }

    /// SIGTERM and wait (at most 10 s) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `insite-agent run --config CONFIG`, which must refuse to start: returns its output
/// once it exits; fails the test (killing it) if it is still running after 15 s.
pub fn run_refused(config: &Path) -> Output {
    require_root();
    let mut child = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn insite-agent");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("agent output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("agent output");
            panic!(
                "the agent started instead of refusing {}:\n{}",
                config.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `f` in a child process as uid/gid `nobody` (65534), for permission tests.
pub fn run_as_nobody(program: &Path, args: &[&str]) -> Output {
    use std::os::unix::process::CommandExt as _;
    Command::new(program)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody")
}

/// A copy of the agent binary that `nobody` can execute (the build tree may not be).
pub fn world_executable_copy(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let sub = dir.join("bin");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let to = sub.join("insite-agent");
    std::fs::copy(agent_bin(), &to).expect("copy binary");
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    to
}

/// Names of loaded BPF programs (truncated to 15 bytes by the kernel).
pub fn loaded_program_names() -> Vec<String> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .collect()
}

/// The agent's own BPF map called `name`. Found through the map ids in the agent's
/// /proc/<pid>/fdinfo: other agents on the host have maps of the same name.
pub fn agent_map(agent: &Agent, name: &str) -> Result<aya::maps::MapData> {
    let dir = format!("/proc/{}/fdinfo", agent.pid());
    for entry in std::fs::read_dir(&dir).with_context(|| dir.clone())? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("map_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let map = aya::maps::MapInfo::from_id(id)?;
        if map.name_as_str() == Some(name) {
            return Ok(aya::maps::MapData::from_id(id)?);
        }
    }
    bail!("agent {} holds no map {name}", agent.pid())
}

/// The workload: `n` getppid calls made straight through syscall(2).
pub fn getppid_calls(n: u64) {
    for _ in 0..n {
        // SAFETY: getppid takes no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

/// One nanosleep(2) of `d` (the raw syscall: glibc's nanosleep() would call clock_nanosleep).
pub fn nanosleep_for(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid timespec pointer; null remainder is allowed.
    unsafe { libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, 0usize) };
}

/// The workload: `n` nanosleep(2) calls of `ms` milliseconds each.
pub fn nanosleep_calls(n: u32, ms: u64) {
    for _ in 0..n {
        nanosleep_for(Duration::from_millis(ms));
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounts.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// Removes a (cgroup) directory when dropped, after its processes have exited.
pub struct RemoveDirOnDrop(pub PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
