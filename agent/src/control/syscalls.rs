//! `syscalls`: the top syscalls by count and by p99 over a window, with recent slow calls.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    protocol::Command,
    status::{rate, Window, MAX_LIMIT},
};
use crate::{
    config::Config,
    store::{syscalls::SlowCall, Store},
    syscall_names,
};

/// `syscalls`: the top syscalls over `window` (default 10 s), `limit` rows a table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Command for SyscallsRequest {
    const NAME: &'static str = "syscalls";
}

/// `trace_syscalls`: the syscall hooks attached for `duration` (up to an hour), every call
/// counted until it ends, also in sampled mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSyscallsRequest {
    pub duration: TraceDuration,
}

impl Command for TraceSyscallsRequest {
    const NAME: &'static str = "trace_syscalls";
}

/// How long a trace runs: more than 0 s and at most `MAX_TRACE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TraceDuration(pub Duration);

impl TryFrom<String> for TraceDuration {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        use crate::probes::sampling::MAX_TRACE;
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| format!("duration {s:?}: {e} (e.g. \"30s\")"))?;
        if d.is_zero() || d > MAX_TRACE {
            return Err(format!(
                "duration {s:?}: must be more than 0s and at most {}",
                humantime::format_duration(MAX_TRACE)
            ));
        }
        Ok(Self(d))
    }
}

impl From<TraceDuration> for String {
    fn from(d: TraceDuration) -> String {
        humantime::format_duration(d.0).to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyscallRow {
    pub syscall: String,
    pub count: u64,
    pub per_second: f64,
    pub errors: u64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub mean_us: Option<f64>,
}

/// The reply to a trace request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyscallTraceView {
    /// The configured mode, which the trace ends back in.
    pub mode: String,
    pub seconds_left: f64,
    pub until_unix_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyscallsView {
    /// Time the figures really cover (shorter than asked while the agent is young).
    pub window_seconds: f64,
    pub requested_window_seconds: f64,
    /// `sampled` or `full`: how the hooks are kept (see `[syscalls] mode`).
    #[serde(default)]
    pub mode: String,
    /// Of `window_seconds`, how long the hooks were attached: the counts are of the calls
    /// made in that time (all of it in full mode).
    #[serde(default)]
    pub observed_seconds: f64,
    pub total_calls: u64,
    pub slow_threshold_ms: f64,
    pub by_count: Vec<SyscallRow>,
    pub by_p99: Vec<SyscallRow>,
    /// Most recent first.
    pub slow_calls: Vec<SlowCall>,
}

/// Extends the running trace to `d` from now (a longer one running is kept) and says until
/// when it runs.
pub fn trace(
    trace: &crate::probes::sampling::TraceUntil,
    cfg: &Config,
    d: Duration,
) -> SyscallTraceView {
    let until = std::time::Instant::now() + d;
    trace.send_modify(|t| *t = Some(t.map_or(until, |t| t.max(until))));
    let until = (*trace.borrow()).unwrap_or(until);
    let left = until.saturating_duration_since(std::time::Instant::now());
    let until_unix_ms = std::time::SystemTime::now()
        .checked_add(left)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |t| t.as_millis() as u64);
    SyscallTraceView {
        mode: cfg.syscalls.mode.as_str().into(),
        seconds_left: left.as_secs_f64(),
        until_unix_ms,
    }
}

pub fn syscalls(
    store: &Store,
    cfg: &Config,
    window: Duration,
    limit: usize,
) -> Result<SyscallsView, String> {
    let limit = limit.clamp(1, MAX_LIMIT);
    let Some(w) = store.syscalls.over(window) else {
        return Err(match store.probes.get("syscalls") {
            Some(p) if p.state != crate::store::ProbeState::Attached => format!(
                "the syscall probe is {:?}{}",
                p.state,
                p.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
            .to_lowercase(),
            _ => "no syscall data yet: the first tick has not run".into(),
        });
    };
    // In sampled mode the calls were counted only while the hooks were attached: a rate over
    // that time estimates the host's (and the view says it is one).
    let observed = Duration::from_nanos(w.delta.observed_ns).min(w.span);
    let rate_span = match cfg.syscalls.mode {
        crate::config::SyscallMode::Full => w.span,
        crate::config::SyscallMode::Sampled => observed,
    };
    let rows: Vec<SyscallRow> = w
        .delta
        .by_nr
        .iter()
        .map(|(nr, c)| {
            let us = |q: f64| c.latency.quantile_ns(q).map(|ns| ns / 1e3);
            SyscallRow {
                syscall: syscall_names::label(*nr),
                count: c.latency.count,
                per_second: rate(c.latency.count, rate_span),
                errors: c.errors,
                p50_us: us(0.5),
                p90_us: us(0.9),
                p99_us: us(0.99),
                mean_us: c.latency.mean_ns().map(|ns| ns / 1e3),
            }
        })
        .collect();
    let total_calls = rows.iter().map(|r| r.count).sum();
    let mut by_count = rows.clone();
    by_count.sort_by(|a, b| b.count.cmp(&a.count).then(a.syscall.cmp(&b.syscall)));
    by_count.truncate(limit);
    let mut by_p99 = rows;
    by_p99.sort_by(|a, b| {
        b.p99_us
            .partial_cmp(&a.p99_us)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.syscall.cmp(&b.syscall))
    });
    by_p99.truncate(limit);
    Ok(SyscallsView {
        window_seconds: w.span.as_secs_f64(),
        requested_window_seconds: window.as_secs_f64(),
        mode: cfg.syscalls.mode.as_str().into(),
        observed_seconds: observed.as_secs_f64(),
        total_calls,
        slow_threshold_ms: cfg.syscalls.slow_threshold.as_secs_f64() * 1e3,
        by_count,
        by_p99,
        slow_calls: store.slow_calls.iter().rev().take(limit).cloned().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::ConfigSource,
        control::status::{status, DEFAULT_WINDOW},
        store::syscalls::{SyscallCounters, SyscallTotals},
    };
    use std::time::Instant;

    #[test]
    fn syscalls_view_ranks_by_count_and_p99() {
        let mut store = Store::new(ConfigSource::Defaults, 10);
        let t0 = Instant::now();
        store.syscalls.push(t0, SyscallTotals::default());
        let mut t = SyscallTotals::default();
        let mut fast = SyscallCounters::default();
        for _ in 0..100 {
            fast.latency.record(300);
        }
        let mut slow = SyscallCounters::default();
        for _ in 0..3 {
            slow.latency.record(50_000_000);
        }
        slow.errors = 1;
        t.by_nr.insert(110, fast); // getppid
        t.by_nr.insert(35, slow); // nanosleep
                                  // Hooks attached for 1 s of the 2 s (a sampling window).
        t.observed_ns = 1_000_000_000;
        store.syscalls.push(t0 + Duration::from_secs(2), t);
        let mut full = Config::default();
        full.syscalls.mode = crate::config::SyscallMode::Full;
        let v = syscalls(&store, &full, Duration::from_secs(10), 10).unwrap();
        assert_eq!(v.total_calls, 103);
        assert_eq!(v.by_count[0].syscall, "getppid");
        assert_eq!(v.by_count[0].count, 100);
        assert!((v.by_count[0].per_second - 50.0).abs() < 1e-9);
        // Sampled: the rate is over the time the calls could be seen, and says so.
        let v = syscalls(&store, &Config::default(), Duration::from_secs(10), 10).unwrap();
        assert_eq!(v.mode, "sampled");
        assert!((v.observed_seconds - 1.0).abs() < 1e-9);
        assert!((v.by_count[0].per_second - 100.0).abs() < 1e-9);
        assert_eq!(v.by_p99[0].syscall, "nanosleep");
        assert_eq!(v.by_p99[0].errors, 1);
        let p99 = v.by_p99[0].p99_us.unwrap();
        assert!((33_554.0..=67_109.0).contains(&p99), "{p99}");
        let v1 = syscalls(&store, &Config::default(), Duration::from_secs(10), 1).unwrap();
        assert_eq!(v1.by_count.len(), 1);
    }

    #[test]
    fn no_data_is_an_error_not_a_panic() {
        let store = Store::new(ConfigSource::Defaults, 10);
        assert!(syscalls(&store, &Config::default(), DEFAULT_WINDOW, 10).is_err());
        let s = status(&store, &Config::default());
        assert!(s.events.is_empty());
    }
}
