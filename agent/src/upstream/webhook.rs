//! A generic JSON webhook, signed: the body is Alertmanager's webhook payload (version 4), and
//! each attempt carries `X-Insite-Timestamp` (unix seconds, at the attempt) and
//! `X-Insite-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`. A receiver
//! recomputes the HMAC over the timestamp and the exact body, compares in constant time, and
//! refuses a timestamp more than [`REPLAY_WINDOW`] from its clock: a captured request cannot be
//! replayed later, and a retry after an outage is signed afresh.

use std::time::Duration;

use std::collections::BTreeMap;

use bytes::Bytes;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::rules::{alerting::State, engine::Due};

use super::{
    alertmanager::rfc3339,
    http::{post, Endpoint},
    sender::{unix_ms, Delivery, Receiver},
};

pub const TIMESTAMP_HEADER: &str = "x-insite-timestamp";
pub const SIGNATURE_HEADER: &str = "x-insite-signature";
/// How far a receiver should accept a timestamp from its own clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(300);
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Webhook {
    name: String,
    endpoint: Endpoint,
    secret: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Url(#[from] super::http::EndpointError),
    #[error("secret_file {path}: {why}")]
    Secret { path: String, why: String },
}

impl Webhook {
    pub fn new(url: &str, secret_file: &std::path::Path) -> Result<Self, WebhookError> {
        let endpoint = Endpoint::parse(url)?;
        let secret_err = |why: String| WebhookError::Secret {
            path: secret_file.display().to_string(),
            why,
        };
        let secret = std::fs::read(secret_file).map_err(|e| secret_err(e.to_string()))?;
        // A trailing newline is an editor's, not the secret's.
        let secret = secret.trim_ascii().to_vec();
        if secret.len() < 16 {
            return Err(secret_err(
                "holds fewer than 16 bytes; use a long random secret".into(),
            ));
        }
        Ok(Self {
            name: format!("webhook {url}"),
            endpoint,
            secret,
        })
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, "<timestamp>.<body>").
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes a key of any length; this cannot happen.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

impl Receiver for Webhook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn deliver(&self, payload: &serde_json::Value) -> Delivery {
        let body = match serde_json::to_vec(payload) {
            Ok(b) => b,
            Err(e) => return Delivery::Rejected(format!("cannot encode: {e}")),
        };
        let ts = unix_ms() / 1000;
        let headers = [
            (TIMESTAMP_HEADER, ts.to_string()),
            (SIGNATURE_HEADER, signature(&self.secret, ts, &body)),
        ];
        match post(&self.endpoint, "", &headers, Bytes::from(body), TIMEOUT).await {
            Ok(r) if (200..300).contains(&r.status) => Delivery::Accepted,
            Ok(r) if (400..500).contains(&r.status) && r.status != 429 && r.status != 401 => {
                Delivery::Rejected(format!("HTTP {}: {}", r.status, r.body.trim()))
            }
            Ok(r) => Delivery::Failed(format!("HTTP {}: {}", r.status, r.body.trim())),
            Err(e) => Delivery::Failed(crate::probes::error_chain(&e)),
        }
    }
}

/// Alertmanager's webhook payload (version 4) for one group of due alerts.
pub fn payload(
    receiver: &str,
    group: &[&Due],
    group_by: &[String],
    base_url: &str,
) -> serde_json::Value {
    let labels: Vec<BTreeMap<String, String>> =
        group.iter().map(|d| d.alert.labels_out()).collect();
    let group_labels: BTreeMap<String, String> = match (group.first(), labels.first()) {
        (Some(d), Some(l)) => (d.group_by.as_deref().unwrap_or(group_by).iter())
            .map(|k| (k.clone(), l.get(k).cloned().unwrap_or_default()))
            .collect(),
        _ => BTreeMap::new(),
    };
    let common = |all: Vec<&BTreeMap<String, String>>| -> BTreeMap<String, String> {
        let mut it = all.into_iter();
        let mut c = it.next().cloned().unwrap_or_default();
        for l in it {
            c.retain(|k, v| l.get(k) == Some(v));
        }
        c
    };
    let common_labels = common(labels.iter().collect());
    let common_annotations = common(group.iter().map(|d| &d.alert.annotations).collect());
    let firing = group.iter().any(|d| d.alert.state == State::Firing);
    let alerts: Vec<serde_json::Value> = group
        .iter()
        .zip(&labels)
        .map(|(d, l)| {
            serde_json::json!({
                "status": if d.alert.state == State::Firing { "firing" } else { "resolved" },
                "labels": l,
                "annotations": d.alert.annotations,
                "startsAt": rfc3339(d.alert.active_at_ms),
                "endsAt": if d.alert.state == State::Firing { "0001-01-01T00:00:00Z".to_string() } else { rfc3339(d.ends_at_ms) },
                "generatorURL": format!("{}/alerts?id={}", base_url.trim_end_matches('/'), d.alert.id),
                "fingerprint": d.alert.id,
            })
        })
        .collect();
    serde_json::json!({
        "version": "4",
        "groupKey": serde_json::to_string(&group_labels).unwrap_or_default(),
        "truncatedAlerts": 0,
        "status": if firing { "firing" } else { "resolved" },
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": common_annotations,
        "externalURL": base_url,
        "alerts": alerts,
    })
}

/// Splits what is due into groups by the values of `group_by`, in first-seen order.
pub fn groups<'a>(due: &'a [Due], group_by: &[String]) -> Vec<Vec<&'a Due>> {
    let mut keys: Vec<Vec<(&str, Option<&str>)>> = Vec::new();
    let mut out: Vec<Vec<&Due>> = Vec::new();
    for d in due {
        // The rule's own grouping, else the webhook's; the label names are part of the key.
        let by = d.group_by.as_deref().unwrap_or(group_by);
        let key: Vec<(&str, Option<&str>)> = (by.iter())
            .map(|k| (k.as_str(), d.alert.labels.get(k).map(String::as_str)))
            .collect();
        match keys
            .iter()
            .position(|k| *k == key)
            .and_then(|i| out.get_mut(i))
        {
            Some(g) => g.push(d),
            None => {
                keys.push(key);
                out.push(vec![d]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value Python's `hmac.new(b"Jefe", b'1700000000.{"a":1}', sha256)` gives: what a
    /// receiver in another language computes.
    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        assert_eq!(
            signature(b"Jefe", 1_700_000_000, br#"{"a":1}"#),
            "sha256=fa5f6481efc59da48b19c9dc10196c9953e5651f8304b3a318b6b87d70272e0a"
        );
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefe", 2, b"x"));
        assert_ne!(signature(b"Jefe", 1, b"x"), signature(b"Jefx", 1, b"x"));
    }
}
