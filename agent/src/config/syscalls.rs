//! `[syscalls]`: the syscall probe's mode, filters, slow-call threshold and bounds.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// tp_btf where the kernel allows it, raw tracepoints otherwise.
    Auto,
    TpBtf,
    RawTracepoint,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::TpBtf => "tp_btf",
            Self::RawTracepoint => "raw_tracepoint",
        })
    }
}

/// How the syscall hooks are kept on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyscallMode {
    /// Hooks attached for `sample_window` of every `sample_interval`: counts are of the calls
    /// made while attached (`insite_syscall_observed_seconds_total` says how long that was).
    Sampled,
    /// Hooks attached all the time: every call is counted (equal to `strace -c`).
    Full,
}

impl SyscallMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sampled => "sampled",
            Self::Full => "full",
        }
    }
}

impl fmt::Display for SyscallMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyscallsConfig {
    pub enabled: bool,
    pub attach: AttachMode,
    /// `sampled` (default: a bounded tax on every workload) or `full` (exact counts).
    pub mode: SyscallMode,
    /// In sampled mode, the hooks are attached for this long...
    #[serde(with = "humantime_serde")]
    pub sample_window: Duration,
    /// ...at the start of every interval this long.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Calls at least this long become slow-call events; "0s" turns events off.
    #[serde(with = "humantime_serde")]
    pub slow_threshold: Duration,
    /// Trace only these processes (by comm, pid or cgroup path; a task matching any is traced).
    /// All empty: every process.
    pub comms: Vec<String>,
    pub pids: Vec<u32>,
    pub cgroups: Vec<PathBuf>,
    /// Trace only these syscalls (x86_64 names). Empty: all.
    pub syscalls: Vec<String>,
    /// Most syscalls exported with their own label; the rest fold into `syscall="other"`.
    pub top_n: usize,
    /// Recent slow calls kept in memory for `insite-agent syscalls`.
    pub slow_log_size: usize,
}

impl Default for SyscallsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            attach: AttachMode::Auto,
            mode: SyscallMode::Sampled,
            sample_window: Duration::from_secs(1),
            sample_interval: Duration::from_secs(10),
            slow_threshold: Duration::from_millis(10),
            comms: Vec::new(),
            pids: Vec::new(),
            cgroups: Vec::new(),
            syscalls: Vec::new(),
            top_n: 100,
            slow_log_size: 256,
        }
    }
}

impl SyscallsConfig {
    /// Checks values that the types alone do not constrain.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        let max = agent_common::syscalls::MAX_FILTER_ENTRIES as usize;
        for (key, len) in [
            ("syscalls.comms", self.comms.len()),
            ("syscalls.pids", self.pids.len()),
            ("syscalls.cgroups", self.cgroups.len()),
        ] {
            if len > max {
                return Err(violation(key, format!("at most {max} entries")));
            }
        }
        for comm in &self.comms {
            if comm.is_empty() || comm.len() >= agent_common::TASK_COMM_LEN {
                return Err(violation(
                    "syscalls.comms",
                    format!(
                        "{comm:?}: a comm is 1 to 15 bytes (the kernel truncates longer names)"
                    ),
                ));
            }
        }
        if self.pids.contains(&0) {
            return Err(violation("syscalls.pids", "pid 0 is not a process"));
        }
        for cg in &self.cgroups {
            if !cg.is_absolute() {
                return Err(violation(
                    "syscalls.cgroups",
                    format!("{}: must be an absolute cgroup path", cg.display()),
                ));
            }
        }
        for name in &self.syscalls {
            if syscall_names::number(name).is_none() {
                return Err(violation(
                    "syscalls.syscalls",
                    format!("{name:?} is not an x86_64 syscall name"),
                ));
            }
        }
        if self.top_n == 0 || self.top_n > agent_common::syscalls::MAX_SYSCALLS as usize {
            return Err(violation(
                "syscalls.top_n",
                format!(
                    "must be between 1 and {}",
                    agent_common::syscalls::MAX_SYSCALLS
                ),
            ));
        }
        if self.sample_window < Duration::from_millis(100)
            || self.sample_window > self.sample_interval
        {
            return Err(violation(
                "syscalls.sample_window",
                "must be at least 100ms and at most syscalls.sample_interval",
            ));
        }
        if self.sample_interval > Duration::from_secs(3600) {
            return Err(violation("syscalls.sample_interval", "must be at most 1h"));
        }
        if self.slow_log_size == 0 || self.slow_log_size > 100_000 {
            return Err(violation(
                "syscalls.slow_log_size",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}
