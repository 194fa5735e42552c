//! `queries`: the top normalized queries over a window, for every database on the host at
//! once (pg_stat_statements-like), and the recent slow queries.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{protocol::Command, status::Window};
use crate::store::{
    db::{Role, SlowQuery, System},
    ProbeState, Store,
};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 1000;

/// `queries`: the top fingerprints over `window` (default 60 s) of one `system` (all when
/// absent or `all`), ordered by `sort`, and the recent slow queries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueriesRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    #[serde(
        default,
        deserialize_with = "system_filter",
        skip_serializing_if = "Option::is_none"
    )]
    pub system: Option<System>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<Sort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Command for QueriesRequest {
    const NAME: &'static str = "queries";
}

/// A system by any of its names (`postgres`, `mariadb`, ...); `all` or empty for every one.
fn system_filter<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<System>, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref() {
        None | Some("") | Some("all") => Ok(None),
        Some(s) => System::parse(s).map(Some).ok_or_else(|| {
            serde::de::Error::custom(format!("system {s:?}: must be postgresql, mysql or redis"))
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sort {
    P99,
    Count,
    /// Total time spent (count x mean), as pg_stat_statements orders by default.
    #[default]
    Total,
}

impl Sort {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "p99" => Ok(Sort::P99),
            "count" => Ok(Sort::Count),
            "total" => Ok(Sort::Total),
            _ => Err(format!("sort {s:?}: must be one of p99, count, total")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRow {
    pub system: System,
    pub role: Role,
    pub operation: String,
    /// The normalized query: literals replaced by `?`, lists folded.
    pub fingerprint: String,
    /// A recent example (masked unless db.log_raw_text).
    pub sample: String,
    /// Queries counted, timed or not.
    pub count: u64,
    /// Of which not timed (sent while 64 were in flight on their connection).
    pub untimed: u64,
    pub errors: u64,
    pub misses: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub total_ms: f64,
    pub per_second: f64,
    pub destination: String,
    /// `comm[pid]` of the most recent sender (client) or server process.
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueriesView {
    pub window_seconds: f64,
    pub requested_window_seconds: f64,
    pub sort: Sort,
    pub system: Option<System>,
    /// Fingerprints with queries in the window (before `limit`).
    pub fingerprints: usize,
    pub queries: Vec<QueryRow>,
    /// Most recent first.
    pub slow: Vec<SlowQuery>,
    pub events: u64,
    pub events_dropped: u64,
    pub unmatched: u64,
    pub desyncs: u64,
    pub untimed: u64,
    /// Requests seen but not timed, for any reason (untimed, desync, event lost).
    #[serde(default)]
    pub lost: u64,
    /// Bytes of reads and writes not decoded.
    #[serde(default)]
    pub bytes_not_decoded: u64,
    pub tls_connections: u64,
    pub fingerprints_overflowed: u64,
}

pub fn queries(
    store: &Store,
    system: Option<System>,
    window: Duration,
    sort: Sort,
    limit: usize,
) -> Result<QueriesView, String> {
    let Some(w) = store.db.over(window) else {
        return Err(match store.probes.get("db") {
            Some(p) if p.state != ProbeState::Attached => format!(
                "the database probe is {}{}",
                format!("{:?}", p.state).to_lowercase(),
                p.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            _ => "no query data yet: the first tick has not run".into(),
        });
    };
    let secs = w.span.as_secs_f64().max(1e-3);
    let ms = |ns: Option<f64>| ns.map(|v| v / 1e6);
    let mut rows: Vec<QueryRow> = w
        .delta
        .fingerprints
        .iter()
        .filter(|(k, _)| system.is_none_or(|s| s == k.system))
        .map(|(k, f)| {
            let h = &f.stats.duration;
            QueryRow {
                system: k.system,
                role: k.role,
                operation: f.operation.to_string(),
                fingerprint: k.fingerprint.to_string(),
                sample: f.sample.to_string(),
                count: f.stats.count(),
                untimed: f.stats.untimed,
                errors: f.stats.errors,
                misses: f.stats.misses,
                p50_ms: ms(h.quantile_ns(0.5)),
                p99_ms: ms(h.quantile_ns(0.99)),
                mean_ms: ms(h.mean_ns()),
                total_ms: h.sum_ns as f64 / 1e6,
                per_second: f.stats.count() as f64 / secs,
                destination: k.destination.to_string(),
                process: f
                    .process
                    .as_ref()
                    .map(|(pid, comm)| format!("{comm}[{pid}]")),
            }
        })
        .collect();
    let fingerprints = rows.len();
    rows.sort_by(|a, b| {
        let key = |r: &QueryRow| match sort {
            Sort::P99 => r.p99_ms.unwrap_or(0.0),
            Sort::Count => r.count as f64,
            Sort::Total => r.total_ms,
        };
        key(b)
            .total_cmp(&key(a))
            .then_with(|| b.count.cmp(&a.count))
            .then_with(|| {
                (a.system, a.role, &a.fingerprint).cmp(&(b.system, b.role, &b.fingerprint))
            })
    });
    rows.truncate(limit.clamp(1, MAX_LIMIT));
    let slow = store
        .db_slow
        .iter()
        .rev()
        .filter(|s| system.is_none_or(|x| x == s.system))
        .take(limit.clamp(1, MAX_LIMIT))
        .cloned()
        .collect();
    // The kernel's totals over all connections: exact even when a loss event was dropped.
    let k = &w.delta.kernel;
    Ok(QueriesView {
        window_seconds: w.span.as_secs_f64(),
        requested_window_seconds: window.as_secs_f64(),
        sort,
        system,
        fingerprints,
        queries: rows,
        slow,
        events: w.delta.events,
        events_dropped: k.drops,
        unmatched: w.delta.unmatched,
        desyncs: k.desync,
        untimed: k.inflight_full,
        lost: k.inflight_full + k.lost_desync + k.stats_full,
        bytes_not_decoded: k.bytes_not_decoded,
        tls_connections: k.tls,
        fingerprints_overflowed: w.delta.fingerprints_overflowed,
    })
}
