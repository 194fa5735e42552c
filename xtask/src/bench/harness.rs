//! What every bench shares: the agent started with a config and waited for, a bpftrace peer,
//! and the CPU and memory a process used.

use super::*;

pub(crate) struct Usage {
    pub cpu_ticks: u64,
    pub rss_kib: u64,
}

pub(crate) fn usage(pid: u32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // fields after "comm)": state is [0]; utime [11], stime [12]
    let cpu_ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(Usage { cpu_ticks, rss_kib })
}

/// The start of `Agent::check_running`'s error.
pub(crate) const EXITED_DURING_RUN: &str = "insite-agent exited during the measurement";

pub(crate) struct Agent {
    pub child: Child,
    dir: PathBuf,
}

impl Agent {
    pub fn start(attach: &str, extra: &str) -> Result<Self> {
        Self::start_requiring(attach, extra, &[])
    }

    /// Like `start`, and also waits until each probe named in `probes` reports `attached`
    /// (fails at once if one reports anything else but `disabled` while starting).
    pub fn start_requiring(attach: &str, extra: &str, probes: &[&str]) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("insite-bench-{}-{attach}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let sock = dir.join("ctl.sock");
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[metrics]\nlisten = \"127.0.0.1:0\"\n[control]\nsocket = \"{}\"\n[syscalls]\nattach = \"{attach}\"\n{extra}\n",
                sock.display()
            ),
        )?;
        let log_path = dir.join("agent.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting insite-agent")?;
        let mut agent = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = Command::new(agent_bin())
                .args(["status", "--json", "--control-socket"])
                .arg(&sock)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            let mut problem = None;
            let ok = status.as_deref().is_some_and(|s| {
                s.contains("\"attached\"")
                    && probes.iter().all(|p| match probe_state(s, p).as_deref() {
                        Some("attached") => true,
                        Some("disabled") | None => false,
                        Some(other) => {
                            problem = Some(format!("probe {p} is {other}: {s}"));
                            false
                        }
                    })
            });
            if ok {
                break;
            }
            let exited = agent.child.try_wait()?.is_some();
            if problem.is_some() || exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let config = std::fs::read_to_string(&cfg).unwrap_or_default();
                agent.stop();
                bail!(
                    "insite-agent did not become ready{}\nconfig:\n{config}log:\n{log}",
                    problem.map(|p| format!(" ({p})")).unwrap_or_default(),
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(agent)
    }

    /// An error with the agent's log if it has exited (a run measured without it is void).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            bail!("{EXITED_DURING_RUN} ({status}); log:\n{log}");
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `state` of probe `name` in `insite-agent status --json` output ("attached", "disabled",
/// "failed", ...), without a JSON parser: the probe objects are flat, so the text between the
/// braces around `"name": "<name>"` is that probe's object.
fn probe_state(status_json: &str, name: &str) -> Option<String> {
    let flat: String = status_json.split_whitespace().collect();
    let at = flat.find(&format!("\"name\":\"{name}\""))?;
    let start = flat[..at].rfind('{')?;
    let end = at + flat[at..].find('}')?;
    let obj = &flat[start..end];
    let v = obj.split_once("\"state\":\"")?.1;
    Some(v.split('"').next()?.to_string())
}

/// A bpftrace one-liner, started and waited for until its probes are live.
pub(crate) struct Bpftrace {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Bpftrace {
    pub fn start(prog: &str) -> Result<Self> {
        let mut child = Command::new("bpftrace")
            .args(["-e", prog])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace (apt-get install bpftrace)")?;
        let stdout = child.stdout.take().context("bpftrace stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        // bpftrace prints "Attaching N probes..." once its probes are live.
        match lines.next() {
            Some(Ok(l)) if l.contains("Attaching") => {}
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("bpftrace did not attach: {other:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self { child, lines })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT (bpftrace prints its maps and exits); returns what it printed.
    pub fn stop(mut self) -> String {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let out: Vec<String> = self.lines.by_ref().map_while(Result::ok).collect();
        let _ = self.child.wait();
        out.join("\n")
    }
}

/// Summed (run time ns, runs) of the loaded programs whose name starts with `prefix`, as the
/// kernel counts them while run-time statistics are enabled.
pub(crate) fn bpf_run_time(prefix: &str) -> (u64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with(prefix)))
        .fold((0, 0), |(t, n), p| {
            (t + p.run_time().as_nanos() as u64, n + p.run_count())
        })
}
