//! What every bench shares: the agent (the end-to-end tests' launcher and scraper), a
//! bpftrace peer, and the CPU and memory a process used.

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

pub(crate) use insite_e2e::{Agent, EXITED_DURING_RUN};

/// The agent for a bench run, started by the end-to-end tests' launcher: the syscall probe's
/// `attach` mode and `extra` config, ready once every probe in `probes` is attached.
pub(crate) fn start_agent(attach: &str, extra: &str, probes: &[&str]) -> Result<Agent> {
    let config = format!("[syscalls]\nattach = \"{attach}\"\n{extra}\n");
    Agent::try_launch(insite_e2e::Launch {
        extra: &config,
        probes,
        ..Default::default()
    })
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
