//! The metrics endpoint's HTTP server: `GET /metrics` (and `/`), hardened against clients that
//! connect and stall. Any local user (or anyone, with `metrics.listen = 0.0.0.0:...`) can
//! reach it, so:
//!
//! - at most `metrics.max_connections` connections are open at once: a new one closes the
//!   oldest (counted), so clients that connect and stall can neither use up the agent's file
//!   descriptors nor keep a scraper out (a scrape is the youngest connection, done in
//!   milliseconds);
//! - request headers must arrive within `metrics.header_timeout`, a connection that sends
//!   nothing for `metrics.idle_timeout` is closed, and a client that takes no bytes of its
//!   reply for `metrics.write_timeout` is dropped;
//! - one rendering of the registry is shared by every scrape within [`RENDER_TTL`], so a
//!   thousand concurrent scrapes cost one rendering and a reference each, not a copy each.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Query, State},
    http::header,
    response::IntoResponse,
    routing::get,
    Router,
};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_io_timeout::TimeoutStream;
use tracing::{debug, info};

use super::prometheus::{openmetrics_to_text, render, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
use crate::store::SharedStore;

/// A rendering younger than this answers a scrape (the store changes once per tick, 100 ms at
/// the fastest).
const RENDER_TTL: Duration = Duration::from_millis(100);

/// The server's limits (from `[metrics]`, fitted under the fd limit by `limits::fd_budget`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
}

/// Self-metrics of the endpoint.
#[derive(Debug, Clone, Default)]
pub struct HttpMetrics {
    pub open: Gauge,
    pub evicted: Counter,
}

impl HttpMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "insite_agent_http_connections",
            "Connections to the metrics endpoint open now",
            self.open.clone(),
        );
        r.register(
            "insite_agent_http_connections_evicted",
            "Connections to the metrics endpoint closed to make room for a new one (the oldest, when metrics.max_connections were open)",
            self.evicted.clone(),
        );
    }
}

/// The registry and its last rendering in both formats: what scrapes are served, and what
/// the rule engine reads every tick (one rendering serves both within [`RENDER_TTL`]).
pub struct Exposition {
    registry: Registry,
    last: Mutex<Option<Rendered>>,
    /// For `GET /alerts` (where an alert's `generatorURL` points).
    store: SharedStore,
}

#[derive(Clone)]
pub struct Rendered {
    at: Instant,
    pub openmetrics: Bytes,
    text: Bytes,
}

impl Exposition {
    pub fn new(registry: Registry, store: SharedStore) -> Arc<Self> {
        Arc::new(Self {
            registry,
            last: Mutex::new(None),
            store,
        })
    }

    pub fn get(&self) -> Result<Rendered, std::fmt::Error> {
        if let Ok(last) = self.last.lock() {
            if let Some(r) = last.as_ref().filter(|r| r.at.elapsed() < RENDER_TTL) {
                return Ok(r.clone());
            }
        }
        self.fresh()
    }

    /// A rendering of the store as it is now (the rule engine's, right after a tick); scrapes
    /// within [`RENDER_TTL`] share it.
    pub fn fresh(&self) -> Result<Rendered, std::fmt::Error> {
        let om = render(&self.registry)?;
        let text = openmetrics_to_text(&om);
        let r = Rendered {
            at: Instant::now(),
            openmetrics: Bytes::from(om),
            text: Bytes::from(text),
        };
        if let Ok(mut last) = self.last.lock() {
            *last = Some(r.clone());
        }
        Ok(r)
    }
}

/// OpenMetrics when the client asks for it (Prometheus does), the classic text format otherwise.
fn wants_openmetrics(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn metrics(
    State(scrapes): State<Arc<Exposition>>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    match scrapes.get() {
        Ok(r) if wants_openmetrics(&headers) => (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            r.openmetrics,
        )
            .into_response(),
        Ok(r) => ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], r.text).into_response(),
        Err(_) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}

/// The alert engine's view as JSON (`?id=` narrows it to one alert): what an alert's
/// `generatorURL` opens.
async fn alerts(
    State(scrapes): State<Arc<Exposition>>,
    Query(q): Query<BTreeMap<String, String>>,
) -> impl IntoResponse {
    let view = scrapes
        .store
        .read()
        .ok()
        .and_then(|s| s.alerts.clone())
        .unwrap_or_default();
    let body = match q.get("id") {
        Some(id) => serde_json::to_vec(&view.alerts.iter().find(|a| &a.id == id)),
        None => serde_json::to_vec(&view),
    };
    match body {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn index() -> impl IntoResponse {
    "insite-agent: metrics at /metrics, alerts at /alerts\n"
}

/// Binds `addr` (fails fast if taken) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    exposition: Arc<Exposition>,
    limits: Limits,
    stats: HttpMetrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, max_connections = limits.max_connections, "metrics endpoint listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/alerts", get(alerts))
        .route("/", get(index))
        .with_state(exposition);
    // Open connections by accept order, each with the sender that closes it.
    let open: Arc<Mutex<BTreeMap<u64, oneshot::Sender<()>>>> = Arc::default();
    let mut next_id = 0u64;
    Ok(async move {
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        debug!(error = %crate::probes::error_chain(&e), "metrics endpoint accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return Ok(()),
            };
            let id = next_id;
            next_id += 1;
            let (close_tx, close_rx) = oneshot::channel();
            if let Ok(mut open) = open.lock() {
                while open.len() >= limits.max_connections {
                    // Dropping the sender closes that connection.
                    if open.pop_first().is_none() {
                        break;
                    }
                    stats.evicted.inc();
                }
                open.insert(id, close_tx);
            }
            let _ = stream.set_nodelay(true);
            let mut io = TimeoutStream::new(stream);
            io.set_read_timeout(Some(limits.idle_timeout));
            io.set_write_timeout(Some(limits.write_timeout));
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let gauge = stats.open.clone();
            gauge.inc();
            let open = open.clone();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(Box::pin(io)), service);
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        debug!(error = %crate::probes::error_chain(&e), "metrics connection ended");
                    },
                    // Evicted (its sender dropped): the connection closes as it is dropped.
                    _ = close_rx => {}
                }
                if let Ok(mut open) = open.lock() {
                    open.remove(&id);
                }
                gauge.dec();
            });
        }
    })
}
