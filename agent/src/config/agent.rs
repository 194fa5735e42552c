//! `[agent]`, `[metrics]` and `[control]`: the agent's own settings, its two endpoints and
//! their bounds.

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// How often collectors read the kernel maps and procfs.
    #[serde(with = "humantime_serde")]
    pub tick_interval: Duration,
    /// Memory the bounded tables may take at worst (see `budget`); settings whose worst case
    /// exceeds it are refused. Keep it below the unit's MemoryMax.
    pub memory_budget_mib: u64,
    /// The probes' own diagnostics from the kernel (aya-log): rare events such as a full
    /// table, or at `debug` every failed connect. Off by default; set at start.
    pub kernel_log: KernelLog,
}

/// How much the kernel programs log (`agent.kernel_log`), most severe first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLog {
    #[default]
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

impl KernelLog {
    /// The value of the programs' `AYA_LOG_LEVEL` (aya-log's levels: error 1 .. debug 4).
    pub fn level(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`).
    pub listen: SocketAddr,
    /// Connections open at once; a new one closes the oldest.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection that sends nothing for this long is closed (keep-alive included).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A client that takes none of its reply for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: PathBuf,
    /// Group that owns the socket; when set the socket is 0660 and the group's members may use
    /// it. Unset: 0600, root only.
    pub group: Option<String>,
    /// Extra uids allowed besides root (checked with SO_PEERCRED).
    pub allowed_uids: Vec<u32>,
    /// Extra gids allowed besides `group` (checked with SO_PEERCRED, primary gid of the peer).
    pub allowed_gids: Vec<u32>,
    /// Largest request line accepted, in bytes.
    pub max_request_bytes: usize,
    /// Time a client has to send a complete request, and to take each reply.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Connections served at once; one in eight (at least one) is kept for root and the
    /// agent's own uid.
    pub max_connections: usize,
    /// Connections one uid other than root and the agent's may hold at once.
    pub max_connections_per_uid: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            tick_interval: Duration::from_millis(250),
            memory_budget_mib: 224,
            kernel_log: KernelLog::Off,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9820))),
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_request_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(5),
            max_connections: 32,
            max_connections_per_uid: 8,
        }
    }
}
