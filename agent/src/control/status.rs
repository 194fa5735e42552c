//! `status`: the agent, its probes and its event streams; and what every view shares (the
//! window and limit a request may ask for).

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{
    config::Config,
    store::{syscalls::SyscallTotals, window::WindowDelta, ProbeStatus, Store, WINDOW_RETENTION},
};

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

/// Events of one stream, and how many were lost, over the last 10 s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRates {
    pub stream: String,
    pub total: u64,
    pub per_second: f64,
    pub dropped_total: u64,
    pub dropped_per_second: f64,
}

pub(crate) fn rate(n: u64, span: Duration) -> f64 {
    if span.is_zero() {
        0.0
    } else {
        n as f64 / span.as_secs_f64()
    }
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
    let w: Option<WindowDelta<SyscallTotals>> = store.syscalls.over(DEFAULT_WINDOW);
    let latest = store.syscalls.latest();
    let mut events = Vec::new();
    if let Some(l) = latest {
        let (ev, dr, span) = w.as_ref().map_or((0, 0, Duration::ZERO), |w| {
            (w.delta.slow_events, w.delta.slow_drops, w.span)
        });
        events.push(EventRates {
            stream: "syscall_slow".into(),
            total: l.totals.slow_events,
            per_second: rate(ev, span),
            dropped_total: l.totals.slow_drops,
            dropped_per_second: rate(dr, span),
        });
    }
    if let Some(l) = store.db.latest() {
        let w = store.db.over(DEFAULT_WINDOW);
        let (ev, dr, span) = w.as_ref().map_or((0, 0, Duration::ZERO), |w| {
            (w.delta.kernel.events, w.delta.kernel.drops, w.span)
        });
        events.push(EventRates {
            stream: "db_events".into(),
            total: l.totals.kernel.events,
            per_second: rate(ev, span),
            dropped_total: l.totals.kernel.drops,
            dropped_per_second: rate(dr, span),
        });
    }
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
        events,
        syscall_sampling: syscall_sampling(cfg, latest.map(|l| l.totals.attached)),
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
    }
}
