//! `status`: the agent, its probes and its event streams; and what every view shares (the
//! window and limit a request may ask for).

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    store::{ProbeStatus, Store, WINDOW_RETENTION},
};

pub use crate::store::streams::{rate, EventRates};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
pub const DEFAULT_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 512;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: f64,
    pub started_at_unix: u64,
    pub config_source: String,
    pub metrics_listen: String,
    pub control_socket: String,
    pub tick_interval_ms: u64,
    pub ticks: u64,
    pub last_tick_ms: f64,
    pub probes: Vec<ProbeStatus>,
    pub events: Vec<EventRates>,
    /// How the syscall hooks are kept: `full`, or `sampled` with its duty cycle, and whether
    /// they are attached now.
    #[serde(default)]
    pub syscall_sampling: String,
}

fn syscall_sampling(cfg: &Config, attached: Option<bool>) -> String {
    let s = &cfg.syscalls;
    let mode = match s.mode {
        crate::config::SyscallMode::Full => "full".to_string(),
        crate::config::SyscallMode::Sampled => format!(
            "sampled, {} of every {}",
            humantime::format_duration(s.sample_window),
            humantime::format_duration(s.sample_interval)
        ),
    };
    match attached {
        Some(true) => format!("{mode} (hooks attached now)"),
        Some(false) => format!("{mode} (hooks detached now)"),
        None => mode,
    }
}

pub fn status(store: &Store, cfg: &Config) -> StatusView {
    let latest = store.syscalls.latest();
    StatusView {
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        uptime_seconds: store.started.elapsed().as_secs_f64(),
        started_at_unix: store
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        config_source: store.config_source.to_string(),
        metrics_listen: cfg.metrics.listen.to_string(),
        control_socket: cfg.control.socket.display().to_string(),
        tick_interval_ms: cfg.agent.tick_interval.as_millis() as u64,
        ticks: store.ticks,
        last_tick_ms: store.last_tick.as_secs_f64() * 1e3,
        probes: store.probes.values().cloned().collect(),
        events: store.streams.rates(DEFAULT_WINDOW),
        syscall_sampling: syscall_sampling(cfg, latest.map(|l| l.totals.attached)),
    }
}

/// A window a view reports on, written as a duration ("10s", "1m"): from 1 s up to what the
/// store keeps. Checked as the request is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Window(pub Duration);

impl TryFrom<String> for Window {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_window(Some(&s)).map(Window)
    }
}

impl From<Window> for String {
    fn from(w: Window) -> String {
        humantime::format_duration(w.0).to_string()
    }
}

impl Window {
    /// The window asked for, or the view's default.
    pub fn or(w: Option<Window>, default: Duration) -> Duration {
        w.map_or(default, |w| w.0)
    }
}

/// Parses a window such as "10s" or "1m" and checks it against what the store keeps.
pub fn parse_window(w: Option<&str>) -> Result<Duration, String> {
    let Some(w) = w else {
        return Ok(DEFAULT_WINDOW);
    };
    let d = humantime::parse_duration(w.trim()).map_err(|e| format!("window {w:?}: {e}"))?;
    if d < Duration::from_secs(1) || d > WINDOW_RETENTION {
        return Err(format!(
            "window {w:?}: must be between 1s and {}s",
            WINDOW_RETENTION.as_secs()
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_parsing() {
        assert_eq!(parse_window(None), Ok(DEFAULT_WINDOW));
        assert_eq!(parse_window(Some("60s")), Ok(Duration::from_secs(60)));
        assert_eq!(parse_window(Some("1m")), Ok(Duration::from_secs(60)));
        assert!(parse_window(Some("0s")).is_err());
        assert!(parse_window(Some("500ms")).is_err());
        assert!(parse_window(Some("2m")).is_err());
        assert!(parse_window(Some("soon")).is_err());
        let w: Window = serde_json::from_str("\"1m\"").unwrap();
        assert_eq!(w.0, Duration::from_secs(60));
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"1m\"");
        let e = serde_json::from_str::<Window>("\"2h\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("window \"2h\": must be between 1s and 60s"),
            "{e}"
        );
    }
}
