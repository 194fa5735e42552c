//! Drains one receiver's queue in the outbox: oldest first, one record at a time, acked only
//! once the receiver took it; a failure is retried with exponential backoff and jitter, so
//! the order holds and nothing is lost while the receiver is down (or the agent restarts).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{outbox::Outbox, untrusted::LogField};

/// What goes into the outbox: the receiver's payload, and when the conditions it reports
/// first held (for the detection-latency histogram).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub detect_from_ms: Vec<i64>,
    pub payload: serde_json::Value,
}

/// How one delivery attempt ended.
#[derive(Debug)]
pub enum Delivery {
    Accepted,
    /// The receiver refused it for good (a 4xx): it is dropped, counted, and the queue goes on.
    Rejected(String),
    /// Try again later (connection refused, timeout, 5xx).
    Failed(String),
}

pub trait Receiver: Send + Sync + 'static {
    /// Queue name in the outbox, and the `receiver` label.
    fn name(&self) -> &str;
    fn deliver(&self, payload: &serde_json::Value) -> impl Future<Output = Delivery> + Send;
}

/// Delivery counts by (receiver, result), and the detection latencies observed.
#[derive(Debug, Default)]
pub struct SenderStats {
    pub results: BTreeMap<(String, &'static str), u64>,
    pub detection: crate::store::histogram::Log2Histogram,
}

pub type SharedStats = Arc<Mutex<SenderStats>>;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

fn count(stats: &SharedStats, receiver: &str, result: &'static str) {
    if let Ok(mut s) = stats.lock() {
        *s.results.entry((receiver.to_string(), result)).or_default() += 1;
    }
}

pub async fn drain<R: Receiver>(
    r: R,
    outbox: Arc<Outbox>,
    wake: Arc<Notify>,
    stats: SharedStats,
    shutdown: CancellationToken,
) {
    let name = r.name().to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let batch = {
            let (o, n) = (outbox.clone(), name.clone());
            tokio::task::spawn_blocking(move || o.peek(&n, 32)).await
        };
        let batch = match batch {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(receiver = %LogField(&name), error = %crate::probes::error_chain(&e), "outbox read failed");
                Vec::new()
            }
            Err(_) => return,
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.cancelled() => return,
            }
            continue;
        }
        for rec in batch {
            let env: Envelope = match serde_json::from_slice(&rec.body) {
                Ok(e) => e,
                Err(e) => {
                    warn!(receiver = %LogField(&name), seq = rec.seq, error = %e, "outbox record unreadable; dropped");
                    count(&stats, &name, "unreadable");
                    ack(&outbox, &name, rec.seq).await;
                    continue;
                }
            };
            loop {
                let result = tokio::select! {
                    d = r.deliver(&env.payload) => d,
                    _ = shutdown.cancelled() => return,
                };
                match result {
                    Delivery::Accepted => {
                        count(&stats, &name, "sent");
                        let now = unix_ms();
                        if let Ok(mut s) = stats.lock() {
                            for t in &env.detect_from_ms {
                                s.detection.record(((now - t).max(0) as u64) * 1_000_000);
                            }
                        }
                        backoff = BACKOFF_MIN;
                        break;
                    }
                    Delivery::Rejected(why) => {
                        warn!(receiver = %LogField(&name), seq = rec.seq, reason = %LogField(&why), "receiver refused a notification; dropped");
                        count(&stats, &name, "rejected");
                        break;
                    }
                    Delivery::Failed(why) => {
                        debug!(receiver = %LogField(&name), seq = rec.seq, reason = %LogField(&why), retry_in = ?backoff, "delivery failed");
                        count(&stats, &name, "failed");
                        tokio::select! {
                            _ = tokio::time::sleep(jitter(backoff)) => {}
                            _ = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            ack(&outbox, &name, rec.seq).await;
        }
    }
}

async fn ack(outbox: &Arc<Outbox>, name: &str, seq: u64) {
    let (o, n) = (outbox.clone(), name.to_string());
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || o.ack(&n, seq)).await {
        warn!(receiver = %LogField(name), seq, error = %crate::probes::error_chain(&e), "outbox ack failed; the record may be sent twice");
    }
}

/// `d` scaled by a factor in [0.8, 1.2), so receivers coming back are not hit in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let f = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(f)
}

pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
