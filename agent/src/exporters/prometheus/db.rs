//! The database probe's families: query timings per (system, operation, role, destination,
//! service), top N, and what the kernel could not count or name.

use super::*;

/// The database families.
pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    cfg: &Config,
) -> Result<(), std::fmt::Error> {
    let top_n = cfg.db.top_n;
    if let Some(latest) = st.db.latest() {
        let t = &latest.totals;
        queries(e, t, top_n)?;
    }
    Ok(())
}

fn queries(
    e: &mut DescriptorEncoder<'_>,
    t: &DbTotals,
    top_n: usize,
) -> Result<(), std::fmt::Error> {
    let (rows, folded) = top_series(&t.ops, top_n);
    let labels = |k: &OpKey| -> Labels {
        vec![
            ("system".into(), k.system.as_str().into()),
            ("operation".into(), LabelValue::from(&k.operation)),
            ("role".into(), k.role.as_str().into()),
            ("destination".into(), LabelValue::from(&k.destination)),
            ("service".into(), LabelValue::from(&k.service)),
        ]
    };
    histogram(
        e,
        "insite_db_query_duration",
        "Time from a query's request to its response, measured in the kernel on the socket (client role: sent to received; server role: received to sent)",
        rows.iter().map(|(k, v)| (labels(k), &v.duration)),
    )?;
    counter(
        e,
        "insite_db_query_errors",
        "Queries answered with an error (PostgreSQL ErrorResponse, MySQL ERR packet, Redis error reply; PostgreSQL pipelined statements skipped after an error)",
        None,
        rows.iter().map(|(k, v)| (labels(k), v.errors as f64)),
    )?;
    counter(
        e,
        "insite_db_queries_untimed",
        "Queries counted in the kernel but not timed: sent while 64 were already in flight on their connection (their outcome is not known either). A series' queries are its insite_db_query_duration_count plus this",
        None,
        rows.iter().map(|(k, v)| (labels(k), v.untimed as f64)),
    )?;
    counter(
        e,
        "insite_redis_keyspace_misses",
        "Redis reads (GET and friends) answered with a null reply",
        None,
        rows.iter()
            .filter(|(k, _)| k.system == System::Redis)
            .map(|(k, v)| {
                let mut ls = labels(k);
                ls.remove(0);
                (ls, v.misses as f64)
            }),
    )?;
    gauge(
        e,
        "insite_db_series_folded",
        "Query series folded into operation/destination/service=\"other\" by the top-N bound (db.top_n)",
        None,
        [(vec![], folded as f64)],
    )?;
    let mut losses: Vec<_> = t.losses.iter().collect();
    losses.sort_by(|a, b| a.0.cmp(b.0));
    let loss_labels = |k: &LossKey| -> Labels {
        vec![
            ("system".into(), k.system.as_str().into()),
            ("role".into(), k.role.as_str().into()),
            ("destination".into(), LabelValue::from(&k.destination)),
            ("service".into(), LabelValue::from(&k.service)),
        ]
    };
    counter(
        e,
        "insite_db_requests_lost",
        "Requests seen on a recognised connection but not timed: reason=untimed (beyond 64 in flight; responses still matched in order; counted per operation in insite_db_queries_untimed), desync (in flight when the framing was lost: not counted as queries), event_lost (completed, but the kernel's count table was full: not counted as queries)",
        None,
        losses.iter().flat_map(|(k, v)| {
            [
                ("untimed", v.untimed),
                ("desync", v.desync),
                ("event_lost", v.event_lost),
            ]
            .into_iter()
            .map(|(reason, n)| {
                let mut ls = loss_labels(k);
                ls.push(("reason".into(), reason.into()));
                (ls, n as f64)
            })
        }),
    )?;
    counter(
        e,
        "insite_db_bytes_not_decoded",
        "Bytes of reads and writes on recognised connections left undecoded: the rest of one after its framing was lost or past the kernel's step cap (the requests in them are not counted)",
        None,
        losses.iter().map(|(k, v)| (loss_labels(k), v.bytes as f64)),
    )?;
    let k = &t.kernel;
    let cap_help = format!(
        "Reads and writes whose walk stopped at the kernel's step cap ({} steps); each is also a desync",
        agent_common::db::DB_MAX_STEPS
    );
    for (name, help, v) in [
        ("insite_db_step_cap_hits", cap_help.as_str(), k.step_cap),
        ("insite_db_connections_recognised", "Connections recognised as PostgreSQL, MySQL or Redis by their bytes", k.conns),
        ("insite_db_sockets_passed_over", "Sockets whose first reads and writes fit no database protocol: the probe stopped looking at them", k.gave_up),
        ("insite_db_tls_connections", "Recognised connections that switched to TLS (not decoded)", k.tls),
        ("insite_db_requests_untimed", "Requests not timed because too many were in flight on their connection", k.inflight_full),
        ("insite_db_desyncs", "Times a connection's framing was lost; its requests in flight were dropped", k.desync),
        ("insite_db_storage_failures", "Connections whose kernel state could not be allocated", k.storage_failed),
        ("insite_db_unmatched_responses", "Queries whose statement text never reached userspace (counted as operation=\"unknown\")", t.unmatched),
        ("insite_db_statement_texts", "Statement texts the kernel sent because userspace had not named their statement key yet", k.texts),
        ("insite_db_stats_full", "Completions not counted because the kernel's count table was full", k.stats_full),
        ("insite_db_slow_events_lost", "Slow-query events lost to a full ring buffer (the queries are counted all the same)", k.slow_lost),
        ("insite_db_series_overflowed", "Queries counted under an other series because db.max_series was reached", t.ops_overflowed),
        ("insite_db_fingerprints_overflowed", "Queries counted under the fingerprint other because db.max_fingerprints was reached", t.fingerprints_overflowed),
        ("insite_db_events_undecodable", "Query events from the kernel that could not be decoded", t.undecodable),
    ] {
        counter(e, name, help, None, [(vec![], v as f64)])?;
    }
    let tb = &t.tables;
    gauge(
        e,
        "insite_db_collector_entries",
        "Entries in the database collector's bounded tables: connections (16384 at most), statement keys named (16384), prepared statements (8192), parsed prefixes (1024), and the kernel's count table (8192)",
        None,
        [
            ("connections", tb.connections),
            ("keys", tb.keys),
            ("statements", tb.statements),
            ("parse_cache", tb.parse_cache),
            ("kernel_stats", tb.kernel_stats),
        ]
        .map(|(table, n)| (l("table", table), n as f64)),
    )?;
    Ok(())
}
