//! Prometheus exposition: the store's families in OpenMetrics text (and the classic text
//! format); `http` serves them.
//!
//! Metrics are rendered from the store at scrape time (a `Collector`), so a scrape costs one
//! read lock and no work happens between scrapes. Agent self-metrics that are plain counters
//! live in the registry as ordinary prometheus-client metrics.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::{Registry, Unit},
};

mod alerts;
mod db;
mod host;
mod net;
mod ratelimit;
mod syscalls;

pub use alerts::encode as encode_alerts;
pub use db::encode as encode_db;
pub use host::encode as encode_host;
pub use net::encode as encode_net;
pub use ratelimit::encode as encode_ratelimit;
pub use syscalls::encode as encode_syscalls;

use super::labels::{l, LabelValue, Labels};
use crate::{
    collectors::TickMetrics,
    config::Config,
    store::{
        db::{top_series, DbTotals, LossKey, OpKey, System},
        histogram::Log2Histogram,
        net::{DestinationSeries, Direction, EdgeCounters, FailureReason, NetTotals},
        syscalls::SyscallCounters,
        DiskReading, HostSample, NetDevReading, ProbeState, SharedStore, Store,
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

/// Builds the registry with what belongs to no family: the agent's own metrics, its
/// probes' states and every family's rings. Each family then registers its own collector
/// (see `families`).
pub fn registry(store: SharedStore, tick: &TickMetrics) -> Registry {
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
    r.register_collector(Box::new(AgentCollector { store }));
    r
}

/// The config a family's collector reads its bounds from at scrape time (reloads change it).
pub type ConfigRx = tokio::sync::watch::Receiver<Arc<Config>>;

/// One family's metrics, rendered from the store at scrape time with the bounds of the
/// running config. Each family registers one with its own `encode`.
pub struct FamilyCollector {
    pub store: SharedStore,
    pub config: ConfigRx,
    pub encode: EncodeFamily,
}

pub type EncodeFamily =
    fn(&mut DescriptorEncoder<'_>, &Store, &Config) -> Result<(), std::fmt::Error>;

impl std::fmt::Debug for FamilyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FamilyCollector").finish_non_exhaustive()
    }
}

impl Collector for FamilyCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let cfg = self.config.borrow().clone();
        let Ok(st) = self.store.read() else {
            return Ok(());
        };
        (self.encode)(&mut enc, &st, &cfg)
    }
}

#[derive(Debug)]
struct AgentCollector {
    store: SharedStore,
}

fn counter<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    scalars(enc, name, help, unit, MetricType::Counter, rows)
}

fn gauge<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    scalars(enc, name, help, unit, MetricType::Gauge, rows)
}

/// A family of counters or gauges, one sample per row.
fn scalars<'a>(
    enc: &mut DescriptorEncoder<'a>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, f64)>,
) -> Result<(), std::fmt::Error> {
    let counter = matches!(kind, MetricType::Counter);
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in rows {
        let e = m.encode_family(&labels)?;
        if counter {
            ConstCounter::new(v).encode(e)?;
        } else {
            ConstGauge::new(v).encode(e)?;
        }
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

impl Collector for AgentCollector {
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
                        ("probe".into(), p.name.clone().into()),
                        (
                            "state".into(),
                            format!("{:?}", p.state).to_lowercase().into(),
                        ),
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
                            ("probe".into(), LabelValue::from(p.name.clone())),
                            ("program".into(), prog.clone().into()),
                        ],
                        *n as f64,
                    )
                })
            }),
        )?;

        // One family per name: the rings of every family are rows of the same two counters.
        let rings: Vec<_> = st.streams.totals().collect();
        counter(
            e,
            "insite_ringbuf_events",
            "Events written to a kernel ring buffer",
            None,
            rings.iter().map(|(r, t)| (l("ring", *r), t.events as f64)),
        )?;
        counter(
            e,
            "insite_ringbuf_drops",
            "Events lost because a kernel ring buffer was full",
            None,
            rings.iter().map(|(r, t)| (l("ring", *r), t.drops as f64)),
        )?;
        Ok(())
    }
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

    /// Every family is described once, whichever file of this module writes it: a second
    /// HELP line for a name makes the whole scrape unparsable.
    #[test]
    fn each_family_is_described_once() {
        let store: SharedStore = Arc::new(std::sync::RwLock::new(crate::store::Store::new(
            crate::config::ConfigSource::Defaults,
            4,
        )));
        if let Ok(mut st) = store.write() {
            let now = std::time::Instant::now();
            st.syscalls.push(now, Default::default());
            st.net.push(now, Default::default());
            st.db.push(now, Default::default());
            st.net_walk.walks = 1;
            st.host = Some(HostSample::default());
            st.streams.record(now, "a_ring", Default::default());
        }
        let (_tx, config) = tokio::sync::watch::channel(Arc::new(Config::default()));
        let mut r = registry(store.clone(), &TickMetrics::default());
        let families: [EncodeFamily; 4] = [encode_syscalls, encode_net, encode_db, encode_host];
        for encode in families {
            r.register_collector(Box::new(FamilyCollector {
                store: store.clone(),
                config: config.clone(),
                encode,
            }));
        }
        let text = render(&r).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for name in text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .filter_map(|l| l.split(' ').next())
        {
            assert!(seen.insert(name.to_string()), "{name} twice in\n{text}");
        }
        assert!(
            seen.contains("insite_syscall_slow_calls_received"),
            "{text}"
        );
        assert!(seen.contains("insite_tcp_kernel_edges_full"), "{text}");
        assert!(seen.contains("insite_host_cpu_seconds"), "{text}");
        assert!(
            text.contains("insite_ringbuf_events_total{ring=\"a_ring\"} 0.0"),
            "{text}"
        );
    }

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
                                ("value".into(), LabelValue::from(v.clone())),
                                ("i".into(), i.to_string().into()),
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
}
