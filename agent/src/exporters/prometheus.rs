//! Prometheus exposition: the store's families in OpenMetrics text (and the classic text
//! format); `http` serves them.
//!
//! Metrics are rendered from the store at scrape time (a `Collector`), so a scrape costs one
//! read lock and no work happens between scrapes. Agent self-metrics that are plain counters
//! live in the registry as ordinary prometheus-client metrics.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};

use super::labels::{l, LabelValue, Labels};
use crate::{
    collectors::TickMetrics,
    store::{
        db::{top_series, DbTotals, LossKey, OpKey, System},
        histogram::Log2Histogram,
        net::{DestinationSeries, Direction, EdgeCounters, FailureReason, NetTotals},
        syscalls::SyscallCounters,
        DiskReading, NetDevReading, ProbeState, SharedStore,
    },
    syscall_names,
};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Exported histogram buckets: le = 2^k ns for k in this range (about 1 us to 69 s), then +Inf.
/// Kernel bucket i ([2^i, 2^(i+1)) ns) lands in le = 2^(i+1).
const EXPORT_MIN_POW: usize = 10;
const EXPORT_MAX_POW: usize = 36;

/// Builds the registry: store-backed families plus the tick self-metrics.
pub fn registry(
    store: SharedStore,
    top_n: Arc<AtomicUsize>,
    net_top_n: Arc<AtomicUsize>,
    db_top_n: Arc<AtomicUsize>,
    tick: &TickMetrics,
) -> Registry {
    let mut r = Registry::default();
    r.register(
        "insite_agent_ticks",
        "Collector ticks completed",
        tick.ticks.clone(),
    );
    r.register_with_unit(
        "insite_agent_tick_duration",
        "Time one collector tick took (map and procfs reads)",
        Unit::Seconds,
        tick.tick_duration.clone(),
    );
    r.register(
        "insite_agent_collect_errors",
        "Collector reads that failed (kernel maps or procfs)",
        tick.collect_errors.clone(),
    );
    r.register_collector(Box::new(StoreCollector {
        store,
        top_n,
        net_top_n,
        db_top_n,
    }));
    r
}

#[derive(Debug)]
struct StoreCollector {
    store: SharedStore,
    top_n: Arc<AtomicUsize>,
    net_top_n: Arc<AtomicUsize>,
    db_top_n: Arc<AtomicUsize>,
}

fn counter<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A family of log2 latency histograms in seconds, one per row.
fn histogram<'h>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, &'h Log2Histogram)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in rows {
        m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            h.sum_ns as f64 / 1e9,
            h.count,
            &export_buckets(h),
            None,
        )?;
    }
    Ok(())
}

/// Per-bucket counts (not cumulative) at the exported bounds, in seconds.
pub fn export_buckets(h: &Log2Histogram) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(EXPORT_MAX_POW - EXPORT_MIN_POW + 2);
    let mut first = 0;
    for (i, &n) in h.buckets.iter().enumerate() {
        if i < EXPORT_MIN_POW {
            first += n;
        }
    }
    out.push(((1u64 << EXPORT_MIN_POW) as f64 / 1e9, first));
    for pow in EXPORT_MIN_POW + 1..=EXPORT_MAX_POW {
        out.push((
            (1u64 << pow) as f64 / 1e9,
            h.buckets.get(pow - 1).copied().unwrap_or(0),
        ));
    }
    let rest: u64 = h.buckets.iter().skip(EXPORT_MAX_POW).sum();
    out.push((f64::MAX, rest));
    out
}

/// The top `n` syscalls by count keep their label; the rest fold into `other`.
fn top_n_syscalls(
    by_nr: &std::collections::BTreeMap<u32, SyscallCounters>,
    n: usize,
) -> (Vec<(String, SyscallCounters)>, usize) {
    let mut all: Vec<(u32, SyscallCounters)> = by_nr.iter().map(|(k, v)| (*k, *v)).collect();
    all.sort_by(|a, b| {
        b.1.latency
            .count
            .cmp(&a.1.latency.count)
            .then(a.0.cmp(&b.0))
    });
    let mut rows: Vec<(String, SyscallCounters)> = Vec::new();
    let mut other = SyscallCounters::default();
    let mut folded = 0;
    for (i, (nr, c)) in all.into_iter().enumerate() {
        if i < n {
            rows.push((syscall_names::label(nr), c));
        } else {
            other.add(&c);
            folded += 1;
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    if folded > 0 {
        rows.push(("other".to_string(), other));
    }
    (rows, folded)
}

impl Collector for StoreCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Ok(st) = self.store.read() else {
            return Ok(());
        };
        let e = &mut enc;

        gauge(
            e,
            "insite_agent_info",
            "Agent build information (always 1)",
            None,
            [(l("version", env!("CARGO_PKG_VERSION")), 1.0)],
        )?;
        gauge(
            e,
            "insite_agent_uptime",
            "Time since the agent started",
            Some(&Unit::Seconds),
            [(vec![], st.started.elapsed().as_secs_f64())],
        )?;
        if let Some((rss, cpu)) = self_usage() {
            gauge(
                e,
                "insite_agent_resident_memory",
                "Resident memory of the agent process",
                Some(&Unit::Bytes),
                [(vec![], rss)],
            )?;
            let (in_use, free) = crate::limits::heap();
            gauge(
                e,
                "insite_agent_heap",
                "Heap memory of the agent: in_use (what it holds), free (kept by the allocator, not returned to the system)",
                Some(&Unit::Bytes),
                [
                    (l("kind", "in_use"), in_use as f64),
                    (l("kind", "free"), free as f64),
                ],
            )?;
            counter(
                e,
                "insite_agent_cpu",
                "CPU time used by the agent process (user + system)",
                Some(&Unit::Seconds),
                [(vec![], cpu)],
            )?;
        }
        counter(
            e,
            "insite_agent_log_lines_dropped",
            "Log lines lost: stderr failed (full disk, closed or broken pipe) or the log queue was full (stalled reader)",
            None,
            [(vec![], crate::logging::dropped_lines() as f64)],
        )?;
        gauge(
            e,
            "insite_probe_attached",
            "Whether a probe family is attached (1) or not (0: disabled or failed)",
            None,
            st.probes.values().map(|p| {
                (
                    vec![
                        ("probe", p.name.clone().into()),
                        ("state", format!("{:?}", p.state).to_lowercase().into()),
                    ],
                    if p.state == ProbeState::Attached {
                        1.0
                    } else {
                        0.0
                    },
                )
            }),
        )?;

        counter(
            e,
            "insite_probe_missed_runs",
            "Runs of a probe's program the kernel skipped because it was already running on that CPU (bpf_prog_info.recursion_misses): events the program never saw",
            None,
            st.probes.values().flat_map(|p| {
                p.missed_runs.iter().map(|(prog, n)| {
                    (
                        vec![
                            ("probe", LabelValue::from(p.name.clone())),
                            ("program", prog.clone().into()),
                        ],
                        *n as f64,
                    )
                })
            }),
        )?;

        // One family per name: rings of every probe are rows of the same two counters.
        let mut ring_events: Vec<(Labels, f64)> = Vec::new();
        let mut ring_drops: Vec<(Labels, f64)> = Vec::new();
        if let Some(latest) = st.syscalls.latest() {
            let t = &latest.totals;
            let (rows, folded) = top_n_syscalls(&t.by_nr, self.top_n.load(Ordering::Relaxed));
            // The mode says what the counts are: every call (full), or the calls made while
            // the hooks were attached (sampled; see insite_syscall_observed_seconds_total).
            let mode = t.mode.map_or("full", |m| m.as_str());
            let labels = |name: &String| {
                let mut v = l("syscall", name.clone());
                v.push(("mode", mode.into()));
                v
            };
            histogram(
                e,
                "insite_syscall_duration",
                "Syscall latency (sys_enter to sys_exit), log2 buckets from the kernel; mode=\"sampled\": only calls made while the hooks were attached",
                rows.iter().map(|(name, c)| (labels(name), &c.latency)),
            )?;
            counter(
                e,
                "insite_syscall_errors",
                "Syscalls that returned an error (-errno); mode as insite_syscall_duration_seconds",
                None,
                rows.iter().map(|(name, c)| (labels(name), c.errors as f64)),
            )?;
            counter(
                e,
                "insite_syscall_observed",
                "Time the syscall hooks were attached: rate(insite_syscall_duration_seconds_count) / rate(this) estimates the host's call rate in sampled mode",
                Some(&Unit::Seconds),
                [(vec![], t.observed_ns as f64 / 1e9)],
            )?;
            gauge(
                e,
                "insite_syscall_hooks_attached",
                "1 while the syscall hooks are attached (always in full mode, during windows and traces in sampled mode)",
                None,
                [(l("mode", mode), if t.attached { 1.0 } else { 0.0 })],
            )?;
            gauge(
                e,
                "insite_syscall_series_folded",
                "Syscalls folded into syscall=\"other\" by the top-N bound",
                None,
                [(vec![], folded as f64)],
            )?;
            ring_events.push((l("ring", "syscall_slow"), t.slow_events as f64));
            ring_drops.push((l("ring", "syscall_slow"), t.slow_drops as f64));
            counter(
                e,
                "insite_syscall_untimed",
                "Syscalls not timed because their start could not be parked in task storage (allocation failed)",
                None,
                [(vec![], t.start_drops as f64)],
            )?;
        }
        counter(
            e,
            "insite_syscall_slow_calls_received",
            "Slow-call events received by the agent",
            None,
            [(vec![], st.slow_received as f64)],
        )?;
        if let Some(latest) = st.net.latest() {
            let t = &latest.totals;
            encode_net(e, t, self.net_top_n.load(Ordering::Relaxed))?;
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
        if let Some(latest) = st.db.latest() {
            let t = &latest.totals;
            ring_events.push((l("ring", "db_events"), t.kernel.events as f64));
            ring_drops.push((l("ring", "db_events"), t.kernel.drops as f64));
            encode_db(e, t, self.db_top_n.load(Ordering::Relaxed))?;
        }
        counter(
            e,
            "insite_ringbuf_events",
            "Events written to a kernel ring buffer",
            None,
            ring_events,
        )?;
        counter(
            e,
            "insite_ringbuf_drops",
            "Events lost because a kernel ring buffer was full",
            None,
            ring_drops,
        )?;

        if let Some(h) = &st.host {
            counter(
                e,
                "insite_host_cpu",
                "CPU time of all CPUs by mode (/proc/stat)",
                Some(&Unit::Seconds),
                h.cpu_seconds.iter().map(|(m, v)| (l("mode", *m), *v)),
            )?;
            gauge(
                e,
                "insite_host_cpus",
                "Online CPUs",
                None,
                [(vec![], h.cpus as f64)],
            )?;
            gauge(
                e,
                "insite_host_memory",
                "Memory by kind (/proc/meminfo)",
                Some(&Unit::Bytes),
                [
                    (l("kind", "total"), h.memory_total_bytes as f64),
                    (l("kind", "available"), h.memory_available_bytes as f64),
                    (l("kind", "free"), h.memory_free_bytes as f64),
                    (l("kind", "cached"), h.memory_cached_bytes as f64),
                    (l("kind", "swap_total"), h.swap_total_bytes as f64),
                    (l("kind", "swap_free"), h.swap_free_bytes as f64),
                ],
            )?;
            gauge(
                e,
                "insite_host_load",
                "Load average",
                None,
                [
                    (l("window", "1m"), h.load1),
                    (l("window", "5m"), h.load5),
                    (l("window", "15m"), h.load15),
                ],
            )?;
            counter(
                e,
                "insite_host_pressure_stall",
                "Time tasks were stalled on a resource (PSI total)",
                Some(&Unit::Seconds),
                h.pressure.iter().map(|p| {
                    (
                        vec![("resource", p.resource.into()), ("kind", p.kind.into())],
                        p.stall_seconds_total,
                    )
                }),
            )?;
            gauge(
                e,
                "insite_host_pressure_avg10",
                "Share of the last 10 s that tasks were stalled on a resource (PSI avg10 / 100)",
                Some(&Unit::Other("ratio".into())),
                h.pressure.iter().map(|p| {
                    (
                        vec![("resource", p.resource.into()), ("kind", p.kind.into())],
                        p.avg10 / 100.0,
                    )
                }),
            )?;
            type DiskField = fn(&DiskReading) -> f64;
            let disk_counters: [(&str, &str, Option<Unit>, DiskField); 5] = [
                (
                    "insite_host_disk_reads_completed",
                    "Disk reads completed",
                    None,
                    |d| d.reads_completed as f64,
                ),
                (
                    "insite_host_disk_writes_completed",
                    "Disk writes completed",
                    None,
                    |d| d.writes_completed as f64,
                ),
                (
                    "insite_host_disk_read",
                    "Bytes read from disk",
                    Some(Unit::Bytes),
                    |d| d.read_bytes as f64,
                ),
                (
                    "insite_host_disk_written",
                    "Bytes written to disk",
                    Some(Unit::Bytes),
                    |d| d.written_bytes as f64,
                ),
                (
                    "insite_host_disk_io_time",
                    "Time the disk was busy with I/O",
                    Some(Unit::Seconds),
                    |d| d.io_seconds,
                ),
            ];
            for (name, help, unit, field) in disk_counters {
                let rows = h
                    .disks
                    .iter()
                    .map(|d| (l("device", d.device.clone()), field(d)));
                counter(e, name, help, unit.as_ref(), rows)?;
            }
            type NetField = fn(&NetDevReading) -> u64;
            let net_counters: [(&str, &str, Option<Unit>, NetField); 8] = [
                (
                    "insite_host_network_receive",
                    "Bytes received by a network device",
                    Some(Unit::Bytes),
                    |d| d.rx_bytes,
                ),
                (
                    "insite_host_network_transmit",
                    "Bytes sent by a network device",
                    Some(Unit::Bytes),
                    |d| d.tx_bytes,
                ),
                (
                    "insite_host_network_receive_packets",
                    "Packets received by a network device",
                    None,
                    |d| d.rx_packets,
                ),
                (
                    "insite_host_network_transmit_packets",
                    "Packets sent by a network device",
                    None,
                    |d| d.tx_packets,
                ),
                (
                    "insite_host_network_receive_errors",
                    "Receive errors of a network device",
                    None,
                    |d| d.rx_errors,
                ),
                (
                    "insite_host_network_transmit_errors",
                    "Transmit errors of a network device",
                    None,
                    |d| d.tx_errors,
                ),
                (
                    "insite_host_network_receive_drops",
                    "Received packets dropped by a network device",
                    None,
                    |d| d.rx_dropped,
                ),
                (
                    "insite_host_network_transmit_drops",
                    "Outgoing packets dropped by a network device",
                    None,
                    |d| d.tx_dropped,
                ),
            ];
            for (name, help, unit, field) in net_counters {
                let rows = h
                    .net_devices
                    .iter()
                    .map(|d| (l("device", d.device.clone()), field(d) as f64));
                counter(e, name, help, unit.as_ref(), rows)?;
            }
            if let Some(t) = &h.tcp {
                gauge(
                    e,
                    "insite_host_tcp_established",
                    "TCP connections in ESTABLISHED or CLOSE-WAIT, all sockets (/proc/net/snmp)",
                    None,
                    [(vec![], t.established as f64)],
                )?;
                for (name, help, v) in [
                    ("insite_host_tcp_active_opens", "TCP connects started (/proc/net/snmp)", t.active_opens),
                    ("insite_host_tcp_passive_opens", "TCP handshakes answered by listeners (/proc/net/snmp)", t.passive_opens),
                    ("insite_host_tcp_attempt_fails", "TCP handshakes that failed (/proc/net/snmp)", t.attempt_fails),
                    ("insite_host_tcp_retransmitted_segments", "TCP segments retransmitted (/proc/net/snmp)", t.retrans_segs),
                    ("insite_host_tcp_resets_sent", "TCP segments sent with RST (/proc/net/snmp)", t.out_rsts),
                    ("insite_host_tcp_listen_overflows", "Handshakes dropped because a listener's accept queue was full (/proc/net/netstat)", t.listen_overflows),
                    ("insite_host_tcp_listen_drops", "Handshakes dropped by listeners for any reason (/proc/net/netstat)", t.listen_drops),
                ] {
                    counter(e, name, help, None, [(vec![], v as f64)])?;
                }
            }
        }
        Ok(())
    }
}

fn encode_net(
    e: &mut DescriptorEncoder<'_>,
    t: &NetTotals,
    top_n: usize,
) -> Result<(), std::fmt::Error> {
    let (rows, folded) = t.by_destination(top_n);
    let labels = |r: &DestinationSeries| -> Labels {
        vec![
            ("direction", r.direction.as_str().into()),
            ("destination", r.destination.clone().into()),
            ("service", r.service.clone().into()),
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
                    ls.push(("reason", reason.as_str().into()));
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

fn encode_db(
    e: &mut DescriptorEncoder<'_>,
    t: &DbTotals,
    top_n: usize,
) -> Result<(), std::fmt::Error> {
    let (rows, folded) = top_series(&t.ops, top_n);
    let labels = |k: &OpKey| -> Labels {
        vec![
            ("system", k.system.as_str().into()),
            ("operation", LabelValue::from(&k.operation)),
            ("role", k.role.as_str().into()),
            ("destination", LabelValue::from(&k.destination)),
            ("service", LabelValue::from(&k.service)),
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
            ("system", k.system.as_str().into()),
            ("role", k.role.as_str().into()),
            ("destination", LabelValue::from(&k.destination)),
            ("service", LabelValue::from(&k.service)),
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
                ls.push(("reason", reason.into()));
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

/// The agent's own RSS (bytes) and CPU time (seconds).
fn self_usage() -> Option<(f64, f64)> {
    let me = procfs::process::Process::myself().ok()?;
    let stat = me.stat().ok()?;
    let page = procfs::page_size() as f64;
    let tps = procfs::ticks_per_second() as f64;
    Some((
        stat.rss as f64 * page,
        (stat.utime + stat.stime) as f64 / tps,
    ))
}

/// Renders the registry.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Rewrites OpenMetrics text into the Prometheus text format (0.0.4), for clients that did not
/// ask for OpenMetrics (curl, promtool, older scrapers): counter families are named with their
/// `_total` suffix, and `# UNIT` / `# EOF` lines go.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, "counter")) = rest.split_once(' ') {
                counters.insert(name);
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("HELP", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("TYPE", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("# {kind} {name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::histogram::Log2Histogram;

    #[test]
    fn export_buckets_cover_every_observation() {
        let mut h = Log2Histogram::default();
        for ns in [1u64, 500, 2_000, 50_000_000, 1 << 38] {
            h.record(ns);
        }
        let b = export_buckets(&h);
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), h.count);
        assert_eq!(b.first().unwrap().1, 2); // 1 ns and 500 ns are below 1.024 us
        assert_eq!(b.last().unwrap().0, f64::MAX);
        assert_eq!(b.last().unwrap().1, 1); // 2^38 ns is past 2^36
                                            // 50 ms sits in (2^25, 2^26] ns
        let i = b
            .iter()
            .position(|x| x.1 == 1 && x.0 > 0.03 && x.0 < 0.1)
            .unwrap();
        assert!((b[i].0 - 0.067108864).abs() < 1e-9, "{}", b[i].0);
    }

    #[test]
    fn text_format_names_counters_with_total() {
        let om = "# HELP a_b Thing.\n# TYPE a_b counter\n# UNIT a_b bytes\na_b_total 1\n# HELP g G.\n# TYPE g gauge\ng 2\n# EOF\n";
        let t = openmetrics_to_text(om);
        assert_eq!(
            t,
            "# HELP a_b_total Thing.\n# TYPE a_b_total counter\na_b_total 1\n# HELP g G.\n# TYPE g gauge\ng 2\n"
        );
    }

    /// Label values from arbitrary bytes (a fixed pseudo-random sequence, biased towards the
    /// bytes the formats care about, plus known attacks) through the real encoders: promtool
    /// accepts the text format, and both formats hold exactly the samples written.
    #[test]
    fn arbitrary_label_bytes_never_break_the_exposition() {
        #[derive(Debug)]
        struct Hostile(Vec<String>);
        impl Collector for Hostile {
            fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
                gauge(
                    &mut enc,
                    "insite_test_hostile",
                    "Label values from arbitrary bytes",
                    None,
                    self.0.iter().enumerate().map(|(i, v)| {
                        (
                            vec![
                                ("value", LabelValue::from(v.clone())),
                                ("i", i.to_string().into()),
                            ],
                            i as f64,
                        )
                    }),
                )?;
                counter(
                    &mut enc,
                    "insite_test_hostile_events",
                    "Counter with the same labels",
                    None,
                    self.0.iter().map(|v| (l("value", v.clone()), 1.0)),
                )
            }
        }
        let mut values: Vec<String> = [
            "\"} 1\nfake 7\n#",
            "ev\"il\\x\n}{",
            "back\\slash",
            "\\",
            "\"",
            "\n",
            "# EOF",
            "\u{0}\u{1}\r\t\u{7f}\u{85}\u{2028}\u{202e}",
            "",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 24) as usize;
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(match x % 8 {
                    0 => b'\\',
                    1 => b'"',
                    2 => b'\n',
                    3 => b'}',
                    _ => (x >> 8) as u8,
                });
            }
            x ^= x << 13;
            values.push(String::from_utf8_lossy(&bytes).into_owned());
        }
        let n = values.len();
        let mut reg = Registry::default();
        reg.register_collector(Box::new(Hostile(values)));
        let om = render(&reg).unwrap();
        let text = openmetrics_to_text(&om);
        for (format, body) in [("openmetrics", &om), ("text", &text)] {
            let samples = body.lines().filter(|l| !l.starts_with('#')).count();
            assert_eq!(samples, 2 * n, "{format}: samples were added or merged");
            assert!(!body.lines().any(|l| l.starts_with("fake")), "{format}");
        }
        assert_eq!(om.lines().filter(|l| *l == "# EOF").count(), 1);
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is needed by this test: `cargo xtask test` installs it");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn top_n_folds_into_other() {
        let mut m = std::collections::BTreeMap::new();
        for nr in 0..10u32 {
            let mut c = SyscallCounters::default();
            for _ in 0..=nr {
                c.latency.record(100);
            }
            m.insert(nr, c);
        }
        let (rows, folded) = top_n_syscalls(&m, 3);
        assert_eq!(folded, 7);
        assert_eq!(rows.len(), 4);
        let other = rows.iter().find(|r| r.0 == "other").unwrap();
        assert_eq!(other.1.latency.count, (1..=7).sum::<u64>());
        let (rows, folded) = top_n_syscalls(&m, 100);
        assert_eq!((rows.len(), folded), (10, 0));
    }
}
