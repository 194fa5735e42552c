//! Database and cache queries timed off the wire: real PostgreSQL, MariaDB and Redis servers
//! (started by the harness), real clients (their own CLIs and raw-protocol clients for
//! pipelines), the real agent and kernel. Counts are exact: each query is seen once by the
//! client's socket (role="client") and once by the server's (role="server").

use std::{
    process::Output,
    time::{Duration, Instant},
};

use insite_e2e::{
    require_root,
    servers::{Mariadb, Postgres, Redis, Via},
    wire_clients::{encode_command, redis_pipeline, PgConn, PgResult, RedisConn, Reply},
    Agent, Metrics,
};
use serde_json::Value;

const DB_ONLY: &str = "[syscalls]\nenabled = false\n[net]\nenabled = false\n";

const DURATION: &str = "insite_db_query_duration_seconds_count";
const ERRORS: &str = "insite_db_query_errors_total";
const MISSES: &str = "insite_redis_keyspace_misses_total";
const LOST: &str = "insite_db_requests_lost_total";

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "client failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Queries of `system` with `operation`, by `role`, to `destination`, over every service.
fn count(m: &Metrics, system: &str, op: &str, role: &str, dest: &str) -> f64 {
    m.sum(
        DURATION,
        &[
            ("system", system),
            ("operation", op),
            ("role", role),
            ("destination", dest),
        ],
    )
}

fn errors(m: &Metrics, system: &str, role: &str, dest: &str) -> f64 {
    m.sum(
        ERRORS,
        &[("system", system), ("role", role), ("destination", dest)],
    )
}

/// Observations of one series in the histogram bucket (lo, hi] (seconds, exported bounds).
fn in_bucket(m: &Metrics, labels: &[(&str, &str)], lo: &str, hi: &str) -> f64 {
    let at = |le: &str| {
        let mut l = labels.to_vec();
        l.push(("le", le));
        m.sum("insite_db_query_duration_seconds_bucket", &l)
    };
    at(hi) - at(lo)
}

/// 50 ms lies in the exported bucket (0.033554432, 0.067108864].
const LO_50MS: &str = "0.033554432";
const HI_50MS: &str = "0.067108864";

/// `promtool check metrics` passes the scrape, database series included.
fn promtool_accepts(m: &Metrics) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask test)");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(m.0.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn queries_json(agent: &Agent, args: &[&str]) -> Value {
    let mut all = vec!["queries", "--json", "--limit", "100"];
    all.extend_from_slice(args);
    let o = agent.cli(&all);
    ok(&o);
    serde_json::from_slice(&o.stdout).expect("queries --json")
}

/// Redis requests of `role` to `dest` the agent accounted for: (timed, in every operation;
/// counted as lost, for every reason).
fn redis_accounted(m: &Metrics, role: &str, dest: &str) -> (f64, f64) {
    let labels = [("system", "redis"), ("role", role), ("destination", dest)];
    (m.sum(DURATION, &labels), m.sum(LOST, &labels))
}

/// What the agent says about requests it could not time, for failure messages.
fn loss_report(m: &Metrics, dest: &str) -> String {
    let mut out = String::new();
    for line in m.0.lines() {
        if line.starts_with("insite_db_query_duration_seconds_count")
            || line.starts_with("insite_db_queries_untimed_total")
        {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        if line.starts_with("insite_db_requests_lost_total")
            || line.starts_with("insite_db_bytes_not_decoded_total")
        {
            if line.contains(&format!("destination=\"{dest}\"")) {
                out.push_str(line);
                out.push('\n');
            }
        } else if line.starts_with("insite_db_requests_untimed_total")
            || line.starts_with("insite_db_desyncs_total")
            || line.starts_with("insite_db_step_cap_hits_total")
            || line.starts_with("insite_ringbuf_drops_total{ring=\"db_events\"}")
            || line.starts_with("insite_db_unmatched_responses_total")
            || line.starts_with("insite_db_stats_full_total")
            || line.starts_with("insite_db_series_folded")
            || line.starts_with("insite_db_collector_entries")
            || line.starts_with("insite_db_query_duration_seconds_count")
            || line.starts_with("insite_db_queries_untimed_total")
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

mod exact;
mod overload;
mod protocols;
mod selection;
