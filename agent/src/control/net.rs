//! `connections` and `map`: the connection edges over a window, as a table and as a graph
//! (JSON, or Graphviz dot for people).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

use super::{protocol::Command, status::Window};
use crate::store::{
    net::{Direction, EdgeCounters, EdgeKey, FailureReason},
    ProbeState, Store,
};

pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeRow {
    pub direction: Direction,
    pub service: String,
    /// The remote end (the server for outbound, the client for inbound); `other` for the edge
    /// that collects everything past net.max_edges.
    pub peer: String,
    /// Where connections went: the remote `addr:port` (outbound) or the local one (inbound).
    pub destination: String,
    pub connections: u64,
    pub failures: u64,
    pub failures_by_reason: BTreeMap<String, u64>,
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    pub closed: u64,
    /// Open now (not a window figure).
    pub active: u64,
    /// Processes seen on the edge, most recent first: `comm[pid]` (outbound; inbound
    /// connections are accepted in softirq, where the owner is known by its service only).
    #[serde(default)]
    pub processes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsView {
    /// Time the figures really cover (shorter than asked while the agent is young).
    pub window_seconds: f64,
    pub requested_window_seconds: f64,
    /// Edges with activity in the window (or open now), of which `edges` is the page from
    /// `offset`.
    #[serde(default)]
    pub total_edges: usize,
    #[serde(default)]
    pub offset: usize,
    /// Busiest first (bytes, then connections and failures).
    pub edges: Vec<EdgeRow>,
    pub resets_sent: u64,
    pub resets_received: u64,
    /// Retransmits on every TCP socket, tracked or not.
    pub retransmits_all: u64,
    /// Connection updates the kernel counted under `other` because its edge table was full.
    #[serde(default)]
    pub kernel_edges_full: u64,
    pub edges_overflowed: u64,
}

fn ms(v: Option<f64>) -> Option<f64> {
    v.map(|ns| ns / 1e6)
}

fn process_labels(p: &[(u32, std::sync::Arc<str>)]) -> Vec<String> {
    p.iter()
        .map(|(pid, comm)| format!("{comm}[{pid}]"))
        .collect()
}

fn row(k: &EdgeKey, d: &EdgeCounters, active: u64) -> EdgeRow {
    EdgeRow {
        direction: k.direction,
        service: k.service.to_string(),
        peer: k.peer.map_or_else(|| "other".into(), |p| p.to_string()),
        destination: k.destination_label(),
        connections: d.connects,
        failures: d.failures_total(),
        failures_by_reason: FailureReason::ALL
            .iter()
            .filter(|r| d.failure(**r) > 0)
            .map(|r| (r.as_str().to_string(), d.failure(*r)))
            .collect(),
        connect_p50_ms: ms(d.connect_time.quantile_ns(0.5)),
        connect_p99_ms: ms(d.connect_time.quantile_ns(0.99)),
        rtt_p50_ms: ms(d.rtt.quantile_ns(0.5)),
        rtt_p99_ms: ms(d.rtt.quantile_ns(0.99)),
        bytes_sent: d.bytes_sent,
        bytes_received: d.bytes_received,
        retransmits: d.retransmits,
        closed: d.closes,
        active,
        processes: process_labels(&d.processes),
    }
}

/// Edges with activity in the window, or with connections open now.
/// Rows a page holds when the request names no limit, and at most.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;

/// `connections`: edges over `window` (default 60 s), busiest first, `limit` of them
/// (default 1000, at most 10,000) from `offset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionsRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

impl Command for ConnectionsRequest {
    const NAME: &'static str = "connections";
}

/// `map`: the dependency map of the busiest edges, with the arguments of `connections`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MapRequest(pub ConnectionsRequest);

impl Command for MapRequest {
    const NAME: &'static str = "map";
}

/// Which rows of a table a request wants: `limit` rows from `offset` (busiest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: usize,
    pub limit: usize,
}

impl Page {
    /// From a request's optional fields; a limit above [`MAX_LIMIT`] is an error, not a
    /// silent cut.
    pub fn new(offset: Option<usize>, limit: Option<usize>) -> Result<Self, String> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!(
                "limit {limit}: must be between 1 and {MAX_LIMIT} (page with offset)"
            ));
        }
        Ok(Self {
            offset: offset.unwrap_or(0),
            limit,
        })
    }

    pub const ALL: Self = Self {
        offset: 0,
        limit: usize::MAX,
    };
}

pub fn connections(store: &Store, window: Duration, page: Page) -> Result<ConnectionsView, String> {
    let (Some(w), Some(latest)) = (store.net.over(window), store.net.latest()) else {
        return Err(match store.probes.get("net") {
            Some(p) if p.state != ProbeState::Attached => format!(
                "the network probe is {}{}",
                format!("{:?}", p.state).to_lowercase(),
                p.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            _ => "no connection data yet: the first tick has not run".into(),
        });
    };
    let empty = EdgeCounters::default();
    // Rank first, build rows for the page only: a page of a large table costs its rows, not
    // the table's.
    let mut ranked: Vec<_> = latest
        .totals
        .edges
        .iter()
        .filter_map(|(k, now)| {
            let d = w.delta.edges.get(k).map_or(&empty, |d| &**d);
            let active = now.active();
            (d.has_activity() || active > 0).then(|| (k, now, d, active, k.destination_label()))
        })
        .collect();
    let total_edges = ranked.len();
    let weight = |d: &EdgeCounters| {
        (
            d.bytes_sent + d.bytes_received,
            d.connects + d.failures_total(),
        )
    };
    ranked.sort_by(|a, b| {
        weight(b.2).cmp(&weight(a.2)).then_with(|| {
            (a.0.direction, &a.0.service, &a.4).cmp(&(b.0.direction, &b.0.service, &b.4))
        })
    });
    let edges = ranked
        .into_iter()
        .skip(page.offset)
        .take(page.limit)
        .map(|(k, now, d, active, _)| {
            let mut r = row(k, d, active);
            // Processes come from the edge itself, so an idle window still names them.
            if r.processes.is_empty() {
                r.processes = process_labels(&now.processes);
            }
            r
        })
        .collect();
    let k = &w.delta.kernel;
    Ok(ConnectionsView {
        window_seconds: w.span.as_secs_f64(),
        requested_window_seconds: window.as_secs_f64(),
        total_edges,
        offset: page.offset,
        edges,
        resets_sent: k.resets_sent,
        resets_received: k.resets_received,
        retransmits_all: k.retransmits,
        kernel_edges_full: k.edges_full,
        edges_overflowed: w.delta.overflowed,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// A service on this host.
    Service,
    /// An address and port connections went to (remote, or a local listener).
    Endpoint,
    /// A client address of inbound connections.
    Client,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    pub label: String,
    /// For endpoints on this host: the service that accepted connections there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapEdge {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub stats: EdgeRow,
}

/// The dependency map: services -> endpoints (outbound), clients -> local endpoints (inbound).
/// A loopback connection appears as both halves, which meet at the endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapView {
    pub window_seconds: f64,
    /// Edges in the window, of which `edges` (busiest first) is the page from `offset`.
    #[serde(default)]
    pub total_edges: usize,
    #[serde(default)]
    pub offset: usize,
    pub nodes: Vec<Node>,
    pub edges: Vec<MapEdge>,
}

pub fn map(store: &Store, window: Duration, page: Page) -> Result<MapView, String> {
    let c = connections(store, window, page)?;
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges = Vec::new();
    for r in c.edges {
        let endpoint = format!("endpoint:{}", r.destination);
        let ep = nodes.entry(endpoint.clone()).or_insert_with(|| Node {
            id: endpoint.clone(),
            kind: NodeKind::Endpoint,
            label: r.destination.clone(),
            served_by: None,
        });
        let from = match r.direction {
            Direction::Outbound => {
                let id = format!("service:{}", r.service);
                nodes.entry(id.clone()).or_insert_with(|| Node {
                    id: id.clone(),
                    kind: NodeKind::Service,
                    label: r.service.clone(),
                    served_by: None,
                });
                id
            }
            Direction::Inbound => {
                ep.served_by = Some(r.service.clone());
                let id = format!("client:{}", r.peer);
                nodes.entry(id.clone()).or_insert_with(|| Node {
                    id: id.clone(),
                    kind: NodeKind::Client,
                    label: r.peer.clone(),
                    served_by: None,
                });
                id
            }
        };
        edges.push(MapEdge {
            from,
            to: endpoint,
            stats: r,
        });
    }
    Ok(MapView {
        window_seconds: c.window_seconds,
        total_edges: c.total_edges,
        offset: c.offset,
        nodes: nodes.into_values().collect(),
        edges,
    })
}

/// A dot string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' | '\\' => {
                out.push('\\');
                out.push(ch);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(ms) if ms >= 1000.0 => format!("{:.2}s", ms / 1000.0),
        Some(ms) if ms >= 1.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{:.0}us", ms * 1000.0),
    }
}

impl MapView {
    /// Graphviz: services are boxes, endpoints ellipses (labelled with the local service that
    /// serves them), clients plain text; edges carry counts, connect p50/p99 and bytes, and
    /// turn red when connects failed.
    pub fn to_dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "digraph insite {{");
        let _ = writeln!(out, "  rankdir=LR;");
        let _ = writeln!(out, "  node [fontname=\"Helvetica\", fontsize=10];");
        let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=9];");
        for n in &self.nodes {
            let (shape, style, label) = match n.kind {
                NodeKind::Service => (
                    "box",
                    "rounded,filled\", fillcolor=\"#dbe9f6",
                    n.label.clone(),
                ),
                NodeKind::Endpoint => (
                    "ellipse",
                    "solid",
                    match &n.served_by {
                        Some(s) => format!("{}\n({s})", n.label),
                        None => n.label.clone(),
                    },
                ),
                NodeKind::Client => ("plaintext", "solid", n.label.clone()),
            };
            let _ = writeln!(
                out,
                "  {} [shape={shape}, style=\"{style}\", label={}];",
                quote(&n.id),
                quote(&label)
            );
        }
        for e in &self.edges {
            let s = &e.stats;
            let mut label = format!("{} conn", s.connections);
            if s.failures > 0 {
                let _ = write!(label, ", {} failed", s.failures);
            }
            if s.connect_p50_ms.is_some() {
                let _ = write!(
                    label,
                    "\nconnect p50 {} p99 {}",
                    fmt_ms(s.connect_p50_ms),
                    fmt_ms(s.connect_p99_ms)
                );
            }
            if s.bytes_sent + s.bytes_received > 0 {
                let _ = write!(
                    label,
                    "\n{} out / {} in",
                    human_bytes(s.bytes_sent),
                    human_bytes(s.bytes_received)
                );
            }
            let color = if s.failures > 0 { "#c0392b" } else { "#34495e" };
            let width = 1.0 + ((s.connections + s.failures) as f64).log10().max(0.0);
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, color=\"{color}\", penwidth={width:.1}];",
                quote(&e.from),
                quote(&e.to),
                quote(&label)
            );
        }
        let _ = writeln!(out, "}}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::ConfigSource,
        store::net::{EdgeCounters, NetTotals},
    };
    use std::{sync::Arc, time::Instant};

    fn store_with_edges() -> Store {
        let mut st = Store::new(ConfigSource::Defaults, 4);
        let t0 = Instant::now();
        st.net.push(t0, NetTotals::default());
        let mut t = NetTotals::default();
        let out = EdgeKey {
            direction: Direction::Outbound,
            service: Arc::from("api \"v2\""),
            peer: Some("127.0.0.1".parse().unwrap()),
            destination: Some("127.0.0.1:5432".parse().unwrap()),
        };
        let inb = EdgeKey {
            direction: Direction::Inbound,
            service: Arc::from("postgresql.service"),
            peer: Some("127.0.0.1".parse().unwrap()),
            destination: Some("127.0.0.1:5432".parse().unwrap()),
        };
        let mut connected = EdgeCounters {
            connects: 3,
            bytes_sent: 300,
            bytes_received: 15_000,
            ..EdgeCounters::default()
        };
        for _ in 0..3 {
            connected.connect_time.record(2_000_000);
            connected.rtt.record(40_000);
        }
        connected.failures[0] = 1;
        t.add(&out, &connected, 100);
        t.move_open(None, 0, &out, 3);
        let accepted = EdgeCounters {
            connects: 3,
            closes: 1,
            lifetime_ns: 1,
            bytes_sent: 5000,
            bytes_received: 100,
            ..EdgeCounters::default()
        };
        t.add(&inb, &accepted, 100);
        t.move_open(None, 0, &inb, 2);
        st.net.push(t0 + Duration::from_secs(2), t);
        st
    }

    #[test]
    fn connections_view_counts_the_window() {
        let st = store_with_edges();
        let v = connections(&st, Duration::from_secs(60), Page::ALL).unwrap();
        assert_eq!(v.edges.len(), 2);
        let out = v
            .edges
            .iter()
            .find(|e| e.direction == Direction::Outbound)
            .unwrap();
        assert_eq!((out.connections, out.failures, out.active), (3, 1, 3));
        assert_eq!(out.failures_by_reason.get("refused"), Some(&1));
        let p50 = out.connect_p50_ms.unwrap();
        assert!((1.0..=4.2).contains(&p50), "{p50}");
        let inb = v
            .edges
            .iter()
            .find(|e| e.direction == Direction::Inbound)
            .unwrap();
        assert_eq!((inb.connections, inb.closed, inb.active), (3, 1, 2));
    }

    #[test]
    fn map_joins_both_halves_at_the_endpoint_and_renders_dot() {
        let st = store_with_edges();
        let m = map(&st, Duration::from_secs(60), Page::ALL).unwrap();
        assert_eq!(m.nodes.len(), 3);
        let ep = m
            .nodes
            .iter()
            .find(|n| n.kind == NodeKind::Endpoint)
            .unwrap();
        assert_eq!(ep.served_by.as_deref(), Some("postgresql.service"));
        assert!(m.edges.iter().all(|e| e.to == "endpoint:127.0.0.1:5432"));
        let dot = m.to_dot();
        assert!(dot.starts_with("digraph insite {"));
        assert!(
            dot.contains(r#""service:api \"v2\"" -> "endpoint:127.0.0.1:5432""#),
            "{dot}"
        );
        assert!(
            dot.contains(r#""client:127.0.0.1" -> "endpoint:127.0.0.1:5432""#),
            "{dot}"
        );
        assert!(dot.trim_end().ends_with('}'));
    }

    #[test]
    fn no_data_is_an_error() {
        let st = Store::new(ConfigSource::Defaults, 4);
        assert!(connections(&st, DEFAULT_WINDOW, Page::ALL).is_err());
        assert!(map(&st, DEFAULT_WINDOW, Page::ALL).is_err());
    }

    #[test]
    fn byte_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }
}
