//! Agent configuration: TOML, deserialized with serde, validated with errors that name the file,
//! the line, the key and the reason.
//!
//! A missing file at the default path means built-in defaults; a file that exists but is wrong
//! is an error, at start-up and on reload (where the running config stays in force).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::syscall_names;

mod agent;
pub mod alerts;
mod db;
mod host;
mod net;
pub mod ratelimit;
mod syscalls;

pub use agent::{AgentConfig, ControlConfig, KernelLog, MetricsConfig};
pub use alerts::AlertsConfig;
pub use db::{DbConfig, DbRole, SlowThresholds};
pub use host::HostConfig;
pub use net::{parse_cidr, NetConfig};
pub use ratelimit::RatelimitConfig;
pub use syscalls::{AttachMode, SyscallMode, SyscallsConfig};

/// Where `insite-agent run` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/insite-agent/config.toml";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9820";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/insite-agent/control.sock";

pub const MIN_TICK: Duration = Duration::from_millis(100);
pub const MAX_TICK: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    pub metrics: MetricsConfig,
    pub control: ControlConfig,
    pub syscalls: SyscallsConfig,
    pub net: NetConfig,
    pub db: DbConfig,
    pub host: HostConfig,
    pub ratelimit: RatelimitConfig,
    pub alerts: AlertsConfig,
}

/// Where the running config came from (shown by `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConfigSource {
    Defaults,
    File { path: PathBuf },
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Defaults => f.write_str("built-in defaults"),
            Self::File { path } => write!(f, "{}", path.display()),
        }
    }
}

/// Largest config file read: a config is a page of settings; a file far larger is a mistake
/// (or generated), and refused before it costs memory to parse.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

enum ReadError {
    Io(std::io::Error),
    TooLarge,
}

/// The file's bytes, at most [`MAX_CONFIG_BYTES`] of them (read, not trusted from its size:
/// /proc-like files report 0).
fn read_capped(path: &Path) -> Result<Vec<u8>, ReadError> {
    use std::io::Read as _;
    let f = std::fs::File::open(path).map_err(ReadError::Io)?;
    let mut bytes = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ReadError::TooLarge);
    }
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} is larger than {limit} bytes; refusing to parse it")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}:{line}: not UTF-8 (invalid byte at offset {offset})", path.display())]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        offset: usize,
    },
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{}{}: invalid value for `{key}`: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
}

impl ConfigError {
    /// The dotted key the error is about, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A validation failure before it is placed in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    pub reason: String,
}

fn violation(key: impl Into<String>, reason: impl Into<String>) -> Violation {
    Violation {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Loads the config. `explicit` is whether the user named the path: only the default path
    /// may be missing.
    pub fn load(path: &Path, explicit: bool) -> Result<(Self, ConfigSource), ConfigError> {
        let bytes = match read_capped(path) {
            Ok(b) => b,
            Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok((Self::default(), ConfigSource::Defaults));
            }
            Err(ReadError::Io(source)) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(ReadError::TooLarge) => {
                return Err(ConfigError::TooLarge {
                    path: path.to_path_buf(),
                    limit: MAX_CONFIG_BYTES,
                })
            }
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let offset = e.valid_up_to();
            ConfigError::NotUtf8 {
                path: path.to_path_buf(),
                line: bytes[..offset].iter().filter(|&&b| b == b'\n').count() + 1,
                offset,
            }
        })?;
        let cfg = Self::parse(text, path)?;
        drop(bytes);
        // Parsing a large file leaves its buffers in the allocator's free lists.
        crate::limits::trim_heap();
        Ok((
            cfg,
            ConfigSource::File {
                path: path.to_path_buf(),
            },
        ))
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: e.span().map(|s| line_at(text, s.start)),
            message: e.message().trim().to_string(),
        })?;
        let cfg: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| line_at(text, s.start))
                .or_else(|| line_of_key(text, &key));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                key,
                reason: inner.message().trim().to_string(),
            }
        })?;
        cfg.validate().map_err(|v| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: line_of_key(text, &v.key),
            key: v.key,
            reason: v.reason,
        })?;
        Ok(cfg)
    }

    /// Checks values that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), Violation> {
        let tick = self.agent.tick_interval;
        if tick < MIN_TICK || tick > MAX_TICK {
            return Err(violation(
                "agent.tick_interval",
                format!(
                    "{} is out of range: must be between {} and {}",
                    humantime::format_duration(tick),
                    humantime::format_duration(MIN_TICK),
                    humantime::format_duration(MAX_TICK)
                ),
            ));
        }

        let budget = self.agent.memory_budget_mib;
        if !(64..=1 << 20).contains(&budget) {
            return Err(violation(
                "agent.memory_budget_mib",
                "must be between 64 and 1048576",
            ));
        }

        let m = &self.metrics;
        if !(1..=4096).contains(&m.max_connections) {
            return Err(violation(
                "metrics.max_connections",
                "must be between 1 and 4096",
            ));
        }
        for (key, t, max) in [
            ("metrics.header_timeout", m.header_timeout, 60),
            ("metrics.idle_timeout", m.idle_timeout, 3600),
            ("metrics.write_timeout", m.write_timeout, 300),
        ] {
            if t < Duration::from_millis(100) || t > Duration::from_secs(max) {
                return Err(violation(
                    key,
                    format!(
                        "must be between 100ms and {}",
                        humantime::format_duration(Duration::from_secs(max))
                    ),
                ));
            }
        }

        let c = &self.control;
        if !c.socket.is_absolute() {
            return Err(violation("control.socket", "must be an absolute path"));
        }
        if c.socket.file_name().is_none() {
            return Err(violation("control.socket", "must name a file"));
        }
        if let Some(g) = &c.group {
            if g.is_empty() {
                return Err(violation(
                    "control.group",
                    "must not be empty (omit it instead)",
                ));
            }
        }
        if !(256..=1024 * 1024).contains(&c.max_request_bytes) {
            return Err(violation(
                "control.max_request_bytes",
                "must be between 256 and 1048576",
            ));
        }
        if c.request_timeout.is_zero() || c.request_timeout > Duration::from_secs(300) {
            return Err(violation(
                "control.request_timeout",
                "must be more than 0s and at most 5m",
            ));
        }
        if !(4..=1024).contains(&c.max_connections) {
            return Err(violation(
                "control.max_connections",
                "must be between 4 and 1024",
            ));
        }
        if c.max_connections_per_uid == 0 || c.max_connections_per_uid > c.max_connections {
            return Err(violation(
                "control.max_connections_per_uid",
                "must be between 1 and control.max_connections",
            ));
        }

        self.syscalls.validate()?;
        self.net.validate()?;
        self.db.validate()?;
        self.ratelimit.validate()?;
        self.alerts.validate()?;
        self.check_budget()?;
        Ok(())
    }
}

impl Config {
    /// The bounded tables' worst case must fit `agent.memory_budget_mib`; the error names the
    /// setting that costs most, with the figures.
    fn check_budget(&self) -> Result<(), Violation> {
        let e = crate::budget::estimate(self);
        let budget = self.agent.memory_budget_mib;
        if crate::budget::mib(e.total) <= budget {
            return Ok(());
        }
        let key = e
            .parts
            .iter()
            .find(|(k, _)| k.contains('.'))
            .map_or("agent.memory_budget_mib", |(k, _)| *k);
        let parts: Vec<String> = e
            .parts
            .iter()
            .map(|(k, b)| format!("{k} {} MiB", crate::budget::mib(*b)))
            .collect();
        Err(violation(
            key,
            format!(
                "these bounds may take up to {} MiB ({}), more than agent.memory_budget_mib = {budget}: lower them, or raise agent.memory_budget_mib (and the unit's MemoryMax)",
                crate::budget::mib(e.total),
                parts.join(", ")
            ),
        ))
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(0, |head| head.bytes().filter(|&b| b == b'\n').count())
        + 1
}

/// Line of a dotted key (`syscalls.top_n`) in the document, if it is there.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut parts = key.split('.');
    let first = parts.next()?;
    let mut item = doc.get_ref().get(first)?;
    for part in parts {
        // Array indices in serde paths look like `comms[3]`: stop at the array itself.
        let name = part.split('[').next().unwrap_or(part);
        match item.get_ref().as_table().and_then(|t| t.get(name)) {
            Some(next) => item = next,
            None => break,
        }
    }
    Some(line_at(text, item.span().start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn invalid(text: &str) -> (String, Option<usize>, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                key, line, reason, ..
            }) => (key, line, reason),
            other => panic!("expected an invalid-value error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn shipped_example_is_the_defaults() {
        let example = include_str!("../../../systemd/config.example.toml");
        assert_eq!(parse(example).unwrap(), Config::default());
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn full_file_parses() {
        let cfg = parse(
            r#"
[agent]
tick_interval = "100ms"
kernel_log = "warn"
[metrics]
listen = "0.0.0.0:9999"
[control]
socket = "/tmp/x.sock"
group = "adm"
allowed_uids = [1000]
allowed_gids = [4]
max_request_bytes = 4096
request_timeout = "2s"
[syscalls]
enabled = true
attach = "raw_tracepoint"
mode = "full"
sample_window = "2s"
sample_interval = "20s"
slow_threshold = "5ms"
comms = ["postgres"]
pids = [1]
cgroups = ["/system.slice/nginx.service"]
syscalls = ["read", "write"]
top_n = 20
slow_log_size = 10
[host]
enabled = false
"#,
        )
        .unwrap();
        assert_eq!(cfg.agent.tick_interval, Duration::from_millis(100));
        assert_eq!(cfg.agent.kernel_log, KernelLog::Warn);
        assert_eq!(cfg.metrics.listen.port(), 9999);
        assert_eq!(cfg.control.group.as_deref(), Some("adm"));
        assert_eq!(cfg.syscalls.attach, AttachMode::RawTracepoint);
        assert_eq!(cfg.syscalls.mode, SyscallMode::Full);
        assert_eq!(cfg.syscalls.sample_window, Duration::from_secs(2));
        assert_eq!(cfg.syscalls.slow_threshold, Duration::from_millis(5));
        assert_eq!(cfg.syscalls.syscalls, vec!["read", "write"]);
        assert!(!cfg.host.enabled);
    }

    #[test]
    fn unknown_top_level_key_is_named_with_line() {
        let err = parse("\n\nbogus = 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        assert!(err.contains("test.toml:3"), "{err}");
    }

    #[test]
    fn unknown_nested_key_is_named() {
        let err = parse("[syscalls]\nslow_treshold = \"1ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("slow_treshold"), "{err}");
        assert!(err.contains(":2"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        for (text, key, line) in [
            ("[agent]\ntick_interval = 5\n", "agent.tick_interval", 2),
            (
                "[agent]\ntick_interval = \"fast\"\n",
                "agent.tick_interval",
                2,
            ),
            ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen", 2),
            (
                "[control]\nallowed_uids = [\"root\"]\n",
                "control.allowed_uids",
                2,
            ),
            ("[syscalls]\nenabled = \"yes\"\n", "syscalls.enabled", 2),
            ("[syscalls]\nattach = \"kprobe\"\n", "syscalls.attach", 2),
            ("[syscalls]\nmode = \"some\"\n", "syscalls.mode", 2),
            ("[agent]\nkernel_log = \"verbose\"\n", "agent.kernel_log", 2),
            ("[db]\nroles = [\"primary\"]\n", "db.roles", 2),
            (
                "[syscalls]\nsample_window = \"20s\"\n",
                "syscalls.sample_window",
                2,
            ),
            ("[syscalls]\npids = [-1]\n", "syscalls.pids", 2),
            ("[host]\nenabled = 1\n", "host.enabled", 2),
        ] {
            let (k, l, _) = invalid(text);
            assert!(
                k.starts_with(key),
                "{text:?}: key {k} should start with {key}"
            );
            assert_eq!(l, Some(line), "{text:?}");
        }
    }

    #[test]
    fn syntax_error_has_line() {
        match parse("[agent]\ntick_interval = \n") {
            Err(ConfigError::Syntax { line, .. }) => assert_eq!(line, Some(2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_range_values_name_key_and_line() {
        for (text, key, line) in [
            (
                "[agent]\ntick_interval = \"50ms\"\n",
                "agent.tick_interval",
                2,
            ),
            (
                "[agent]\ntick_interval = \"11s\"\n",
                "agent.tick_interval",
                2,
            ),
            (
                "[control]\nsocket = \"relative.sock\"\n",
                "control.socket",
                2,
            ),
            ("[control]\nsocket = \"/\"\n", "control.socket", 2),
            ("[control]\ngroup = \"\"\n", "control.group", 2),
            (
                "[control]\nmax_request_bytes = 10\n",
                "control.max_request_bytes",
                2,
            ),
            (
                "[control]\nmax_request_bytes = 2000000\n",
                "control.max_request_bytes",
                2,
            ),
            (
                "[control]\nrequest_timeout = \"0s\"\n",
                "control.request_timeout",
                2,
            ),
            (
                "[control]\nrequest_timeout = \"1h\"\n",
                "control.request_timeout",
                2,
            ),
            ("[syscalls]\ncomms = [\"\"]\n", "syscalls.comms", 2),
            (
                "[syscalls]\ncomms = [\"a-very-long-process-name\"]\n",
                "syscalls.comms",
                2,
            ),
            ("[syscalls]\npids = [0]\n", "syscalls.pids", 2),
            (
                "[syscalls]\ncgroups = [\"system.slice\"]\n",
                "syscalls.cgroups",
                2,
            ),
            (
                "[syscalls]\nsyscalls = [\"read\", \"frobnicate\"]\n",
                "syscalls.syscalls",
                2,
            ),
            ("[syscalls]\ntop_n = 0\n", "syscalls.top_n", 2),
            ("[syscalls]\ntop_n = 100000\n", "syscalls.top_n", 2),
            (
                "[syscalls]\nslow_log_size = 0\n",
                "syscalls.slow_log_size",
                2,
            ),
            ("[db]\ntop_n = 0\n", "db.top_n", 2),
            ("[db]\nmax_series = 8\n", "db.max_series", 2),
            ("[db]\nroles = []\n", "db.roles", 2),
            ("[db]\nmax_fingerprints = 1\n", "db.max_fingerprints", 2),
            ("[db]\nslow_log_capacity = 0\n", "db.slow_log_capacity", 2),
            (
                "[db.slow_threshold]\nredis = \"0s\"\n",
                "db.slow_threshold.redis",
                2,
            ),
            (
                "[db]\nenabled = true\n[db.slow_threshold]\npostgresql = \"2h\"\n",
                "db.slow_threshold.postgresql",
                4,
            ),
        ] {
            let (k, l, reason) = invalid(text);
            assert_eq!(k, key, "{text:?}");
            assert_eq!(l, Some(line), "{text:?}");
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn too_many_filter_entries() {
        let pids: Vec<String> = (1..=1100).map(|p| p.to_string()).collect();
        let text = format!("[syscalls]\npids = [{}]\n", pids.join(","));
        let (k, _, _) = invalid(&text);
        assert_eq!(k, "syscalls.pids");
    }

    #[test]
    fn error_message_names_file_line_and_key() {
        let err = parse("[syscalls]\n\ntop_n = 0\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "test.toml:3: invalid value for `syscalls.top_n`: must be between 1 and 512"
        );
    }

    #[test]
    fn oversized_and_non_utf8_files_are_refused_with_where() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        let line = "# padding padding padding padding padding padding padding padding\n";
        std::fs::write(
            &big,
            line.repeat((MAX_CONFIG_BYTES as usize / line.len()) + 2),
        )
        .unwrap();
        match Config::load(&big, true) {
            Err(e @ ConfigError::TooLarge { .. }) => assert!(e.to_string().contains("larger than")),
            other => panic!("{other:?}"),
        }
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, b"[agent]\ntick_interval = \"1s\"\n\xff\xfe = 1\n").unwrap();
        let e = Config::load(&bad, true).unwrap_err().to_string();
        assert!(
            e.ends_with("bad.toml:3: not UTF-8 (invalid byte at offset 29)"),
            "{e}"
        );
    }

    #[test]
    fn settings_beyond_the_memory_budget_are_refused() {
        // Each at the largest value its own range accepts: far beyond the default budget.
        let (key, _, reason) = invalid(
            "[net]\nmax_edges = 65536\ntop_n = 1000\n[db]\nmax_series = 65536\nmax_fingerprints = 100000\n",
        );
        assert_eq!(key, "db.max_fingerprints");
        assert!(reason.contains("agent.memory_budget_mib = 224"), "{reason}");
        assert!(reason.contains("net.max_edges 1792 MiB"), "{reason}");
        // The defaults fit, and a raised budget admits more.
        assert!(crate::budget::mib(crate::budget::estimate(&Config::default()).total) <= 224);
        let cfg = parse("[agent]\nmemory_budget_mib = 1024\n[net]\nmax_edges = 16384\n").unwrap();
        assert_eq!(cfg.net.max_edges, 16384);
    }

    #[test]
    fn missing_default_file_is_defaults_but_explicit_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        let (cfg, src) = Config::load(&p, false).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(src, ConfigSource::Defaults);
        assert!(matches!(
            Config::load(&p, true),
            Err(ConfigError::Read { .. })
        ));
    }
}
