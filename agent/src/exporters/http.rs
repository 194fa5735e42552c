//! The metrics endpoint's HTTP server: `GET /metrics` (and `/`), hardened against clients that
//! connect and stall. Any local user (or anyone, with `metrics.listen = 0.0.0.0:...`) can
//! reach it, so:
//!
//! - at most `metrics.max_connections` connections are served at once; more are closed as
//!   soon as they are accepted (counted), so idle clients cannot use up the agent's file
//!   descriptors;
//! - request headers must arrive within `metrics.header_timeout`, a connection that sends
//!   nothing for `metrics.idle_timeout` is closed, and a client that takes no bytes of its
//!   reply for `metrics.write_timeout` is dropped;
//! - one rendering of the registry is shared by every scrape within [`RENDER_TTL`], so a
//!   thousand concurrent scrapes cost one rendering and a reference each, not a copy each.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_io_timeout::TimeoutStream;
use tracing::{debug, info};

use super::prometheus::{openmetrics_to_text, render, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

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
    pub rejected: Counter,
}

impl HttpMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "insite_agent_http_connections",
            "Connections to the metrics endpoint open now",
            self.open.clone(),
        );
        r.register(
            "insite_agent_http_connections_rejected",
            "Connections to the metrics endpoint closed at once because metrics.max_connections were open",
            self.rejected.clone(),
        );
    }
}

/// The registry and its last rendering in both formats.
struct Scrapes {
    registry: Registry,
    last: Mutex<Option<Rendered>>,
}

#[derive(Clone)]
struct Rendered {
    at: Instant,
    openmetrics: Bytes,
    text: Bytes,
}

impl Scrapes {
    fn get(&self) -> Result<Rendered, std::fmt::Error> {
        if let Ok(last) = self.last.lock() {
            if let Some(r) = last.as_ref().filter(|r| r.at.elapsed() < RENDER_TTL) {
                return Ok(r.clone());
            }
        }
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
    State(scrapes): State<Arc<Scrapes>>,
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

async fn index() -> impl IntoResponse {
    "insite-agent: metrics at /metrics\n"
}

/// Binds `addr` (fails fast if taken) and returns the server future.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    limits: Limits,
    stats: HttpMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, max_connections = limits.max_connections, "metrics endpoint listening");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .with_state(Arc::new(Scrapes {
            registry,
            last: Mutex::new(None),
        }));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
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
                _ = crate::daemon::shutdown_requested(&mut shutdown) => return Ok(()),
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                stats.rejected.inc();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let mut io = TimeoutStream::new(stream);
            io.set_read_timeout(Some(limits.idle_timeout));
            io.set_write_timeout(Some(limits.write_timeout));
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let open = stats.open.clone();
            open.inc();
            tokio::spawn(async move {
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(Box::pin(io)), service);
                if let Err(e) = conn.await {
                    debug!(error = %crate::probes::error_chain(&e), "metrics connection ended");
                }
                open.dec();
                drop(permit);
            });
        }
    })
}
