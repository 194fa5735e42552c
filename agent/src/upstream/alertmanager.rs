//! Prometheus Alertmanager, API v2: `POST /api/v2/alerts` with the alerts as Prometheus
//! sends them (labels, annotations, `startsAt`, `endsAt`, `generatorURL`). Every listed
//! Alertmanager gets every notification, from its own queue.

use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use super::{
    http::{post, Endpoint},
    sender::{Delivery, Receiver},
};
use crate::rules::engine::Due;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmAlert<'a> {
    pub labels: std::collections::BTreeMap<String, String>,
    pub annotations: &'a std::collections::BTreeMap<String, String>,
    pub starts_at: String,
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
}

/// The body for a batch of due alerts.
pub fn payload(due: &[Due], base_url: &str) -> serde_json::Value {
    let alerts: Vec<AmAlert<'_>> = due
        .iter()
        .map(|d| AmAlert {
            labels: d.alert.labels_out(),
            annotations: &d.alert.annotations,
            starts_at: rfc3339(d.alert.active_at_ms),
            ends_at: rfc3339(d.ends_at_ms),
            generator_url: format!(
                "{}/alerts?id={}",
                base_url.trim_end_matches('/'),
                d.alert.id
            ),
        })
        .collect();
    serde_json::to_value(alerts).unwrap_or(serde_json::Value::Null)
}

pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

pub struct Alertmanager {
    name: String,
    endpoint: Endpoint,
}

impl Alertmanager {
    pub fn new(url: &str) -> Result<Self, super::http::EndpointError> {
        Ok(Self {
            name: format!("alertmanager {url}"),
            endpoint: Endpoint::parse(url)?,
        })
    }
}

impl Receiver for Alertmanager {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, payload: &serde_json::Value) -> Delivery {
        let body = match serde_json::to_vec(payload) {
            Ok(b) => Bytes::from(b),
            Err(e) => return Delivery::Rejected(format!("cannot encode: {e}")),
        };
        match post(&self.endpoint, "/api/v2/alerts", &[], body, TIMEOUT).await {
            Ok(r) if (200..300).contains(&r.status) => Delivery::Accepted,
            Ok(r) if (400..500).contains(&r.status) && r.status != 429 => {
                Delivery::Rejected(format!("HTTP {}: {}", r.status, r.body.trim()))
            }
            Ok(r) => Delivery::Failed(format!("HTTP {}: {}", r.status, r.body.trim())),
            Err(e) => Delivery::Failed(crate::probes::error_chain(&e)),
        }
    }
}
