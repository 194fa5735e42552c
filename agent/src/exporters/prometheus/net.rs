//! The network probe's families: connection edges per (direction, destination, service),
//! top N by traffic, and the walks over the sockets.

use super::*;

/// The network families.
pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    cfg: &Config,
) -> Result<(), std::fmt::Error> {
    let top_n = cfg.net.top_n;
    if let Some(latest) = st.net.latest() {
        let t = &latest.totals;
        edges(e, t, top_n)?;
    }
    let w = &st.net_walk;
    if w.walks > 0 {
        counter(
            e,
            "insite_net_walks",
            "Walks over the kernel's TCP sockets that sample live connections",
            None,
            [(vec![], w.walks as f64)],
        )?;
        counter(
            e,
            "insite_net_walk",
            "Time the agent spent walking the kernel's TCP sockets (it grows with the host's sockets, TIME_WAIT ones included)",
            Some(&Unit::Seconds),
            [(vec![], w.seconds_total)],
        )?;
        gauge(
            e,
            "insite_net_walk_interval",
            "Interval between walks now: net.sample_interval, or 200 times the last walk's duration when that is longer",
            Some(&Unit::Seconds),
            [(vec![], w.interval_seconds)],
        )?;
    }
    Ok(())
}

fn edges(
    e: &mut DescriptorEncoder<'_>,
    t: &NetTotals,
    top_n: usize,
) -> Result<(), std::fmt::Error> {
    let (rows, folded) = t.by_destination(top_n);
    let labels = |r: &DestinationSeries| -> Labels {
        vec![
            ("direction".into(), r.direction.as_str().into()),
            ("destination".into(), r.destination.clone().into()),
            ("service".into(), r.service.clone().into()),
        ]
    };
    histogram(
        e,
        "insite_tcp_connect_duration",
        "TCP connect time, SYN sent to ESTABLISHED (outbound connections)",
        rows.iter()
            .filter(|r| r.direction == Direction::Outbound)
            .map(|r| (labels(r), &r.counters.connect_time)),
    )?;
    histogram(
        e,
        "insite_tcp_rtt",
        "Smoothed RTT of TCP connections, sampled at handshake, at most once per sample interval while data flows, and at close",
        rows.iter().map(|r| (labels(r), &r.counters.rtt)),
    )?;
    let per = |f: fn(&EdgeCounters) -> u64| -> Vec<(Labels, f64)> {
        rows.iter()
            .map(|r| (labels(r), f(&r.counters) as f64))
            .collect()
    };
    counter(
        e,
        "insite_tcp_connections",
        "TCP connections established: outbound connects, inbound accepts (per local listening address)",
        None,
        per(|c| c.connects),
    )?;
    counter(
        e,
        "insite_tcp_connect_failures",
        "Outbound TCP connects that failed, by reason (refused, timed_out, reset, unreachable, aborted, other)",
        None,
        rows.iter().flat_map(|r| {
            FailureReason::ALL.iter().filter_map(move |&reason| {
                let n = r.counters.failure(reason);
                (n > 0).then(|| {
                    let mut ls = labels(r);
                    ls.push(("reason".into(), reason.as_str().into()));
                    (ls, n as f64)
                })
            })
        }),
    )?;
    gauge(
        e,
        "insite_tcp_active_connections",
        "TCP connections open now (those established since the agent started)",
        None,
        per(EdgeCounters::active),
    )?;
    counter(
        e,
        "insite_tcp_closed_connections",
        "TCP connections closed after being established",
        None,
        per(|c| c.closes),
    )?;
    counter(
        e,
        "insite_tcp_connections_reconciled",
        "TCP connections given up as closed because the kernel stopped tracking them and their close never reached the agent (not in insite_tcp_closed_connections_total)",
        None,
        per(|c| c.reconciled),
    )?;
    counter(
        e,
        "insite_tcp_connection_lifetime",
        "Summed lifetime of closed TCP connections (divide by closed connections for the mean)",
        Some(&Unit::Seconds),
        rows.iter()
            .map(|r| (labels(r), r.counters.lifetime_ns as f64 / 1e9)),
    )?;
    counter(
        e,
        "insite_tcp_sent",
        "Bytes sent and acknowledged by the peer (counted at samples and at close)",
        Some(&Unit::Bytes),
        per(|c| c.bytes_sent),
    )?;
    counter(
        e,
        "insite_tcp_received",
        "Bytes received (counted at samples and at close)",
        Some(&Unit::Bytes),
        per(|c| c.bytes_received),
    )?;
    counter(
        e,
        "insite_tcp_retransmits",
        "Segments retransmitted on tracked TCP connections (the kernel's total_retrans; counted at samples, retransmits and close)",
        None,
        per(|c| c.retransmits),
    )?;
    gauge(
        e,
        "insite_tcp_series_folded",
        "Destinations folded into destination=\"other\" by the top-N bound (net.top_n)",
        None,
        [(vec![], folded as f64)],
    )?;
    counter(
        e,
        "insite_tcp_edges_overflowed",
        "Connection updates counted under the `other` edge because net.max_edges was reached",
        None,
        [(vec![], t.overflowed as f64)],
    )?;
    counter(
        e,
        "insite_tcp_all_retransmits",
        "Retransmission attempts on any TCP socket, tracked or not (tcp_retransmit_skb; includes attempts the device refused, which the kernel's own counters leave out)",
        None,
        [(vec![], t.kernel.retransmits as f64)],
    )?;
    counter(
        e,
        "insite_tcp_resets",
        "TCP resets sent and received (tcp_send_reset, tcp_receive_reset)",
        None,
        [
            (l("direction", "sent"), t.kernel.resets_sent as f64),
            (l("direction", "received"), t.kernel.resets_received as f64),
        ],
    )?;
    counter(
        e,
        "insite_tcp_untracked_connections",
        "Connections the kernel could not start tracking (connection map insert failed)",
        None,
        [(vec![], t.kernel.track_failed as f64)],
    )?;
    counter(
        e,
        "insite_tcp_ended_at_destroy",
        "Tracked TCP connections whose close (or failed connect) the state hook missed, reported when their socket was destroyed (tcp_destroy_sock)",
        None,
        [(vec![], t.kernel.ended_at_destroy as f64)],
    )?;
    counter(
        e,
        "insite_tcp_kernel_edges_full",
        "TCP connection updates the kernel counted under the `other` edge because its edge table was full",
        None,
        [(vec![], t.kernel.edges_full as f64)],
    )?;
    counter(
        e,
        "insite_tcp_sockets_reused",
        "Tracked TCP connections ended (counted reconciled) because their socket started a new connection while the kernel still tracked the old one",
        None,
        [(vec![], t.kernel.reused as f64)],
    )?;
    counter(
        e,
        "insite_net_events_ignored",
        "Connection events (handshakes, closes, failed connects) on edges to networks in net.ignore_cidrs, counted on no edge",
        None,
        [(vec![], t.ignored as f64)],
    )?;
    Ok(())
}
