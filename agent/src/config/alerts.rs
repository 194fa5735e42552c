//! `[alerts]`: Prometheus alerting-rule files the agent evaluates on its own window, where
//! the notifications go, and where the alerts' state and the upstream outbox live.

use std::collections::BTreeMap;

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    pub enabled: bool,
    /// Rule files, in Prometheus' own format; each entry may be a glob. A glob that matches
    /// nothing is no error (the shipped rules may not be installed); a named file that is
    /// missing or wrong is.
    pub rule_files: Vec<String>,
    /// Prometheus Alertmanagers (`http://host:port`, an optional path prefix); every
    /// notification goes to each of them, as Prometheus sends it.
    pub alertmanagers: Vec<String>,
    /// Generic JSON webhooks, signed with HMAC-SHA256 (`[[alerts.webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
    /// Where the alerts' state and the upstream outbox are kept across restarts.
    pub state_dir: PathBuf,
    /// Series the rule window keeps at most (only those the rules read are kept at all).
    pub max_series: usize,
    /// A firing alert is sent again this often while it fires (Alertmanager forgets alerts
    /// it has not heard of for its `resolve_timeout`).
    #[serde(with = "humantime_serde")]
    pub resend_delay: Duration,
    /// The outbox's bound: notifications kept while the upstream is down (oldest dropped
    /// first, counted).
    pub outbox_max_records: u64,
    pub outbox_max_bytes: u64,
    /// The address Alertmanager's `generatorURL` points at; absent: the metrics endpoint.
    pub external_url: Option<String>,
    /// Agent-side extras per alert name (what promtool would refuse in a rule file).
    pub rule: BTreeMap<String, RuleExtras>,
}

/// `[[alerts.webhooks]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// A file holding the shared secret (at least 16 bytes; a trailing newline is ignored).
    pub secret_file: PathBuf,
    /// Alerts due together with the same values of these labels go in one notification.
    #[serde(default = "default_group_by")]
    pub group_by: Vec<String>,
}

fn default_group_by() -> Vec<String> {
    vec!["alertname".into()]
}

/// `[alerts.rule.<alertname>]`: what Prometheus' rule format has no key for (promtool
/// refuses unknown keys in rule files), for every rule of that alert name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleExtras {
    /// Hysteresis: once firing, the alert resolves only when this laxer expression stops
    /// holding for it too (same output labels as the rule's expression).
    pub clear_expr: Option<String>,
    /// Flap suppression: an alert that changes state more than `flap_max_changes` times in
    /// `flap_window` is held firing, marked `flapping="true"`.
    pub flap_max_changes: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub flap_window: Option<Duration>,
    /// Escalation: a firing alert nobody acknowledged is re-sent after each of these times
    /// (since it fired) with `escalation="<step>"` and its `severity` raised one step.
    pub escalate_after: Vec<String>,
    /// Webhook grouping for this alert (overrides the webhook's `group_by`).
    pub group_by: Option<Vec<String>>,
}

impl RuleExtras {
    /// Compiled for the engine; the error names the key under `alerts.rule.<name>`.
    pub fn compile(&self) -> Result<crate::rules::alerting::Extras, (String, String)> {
        let clear = self
            .clear_expr
            .as_deref()
            .map(crate::rules::promql::Expr::compile)
            .transpose()
            .map_err(|e| ("clear_expr".to_string(), e.to_string()))?;
        let flap = match (self.flap_max_changes, self.flap_window) {
            (None, None) => None,
            (Some(n), Some(w)) if n > 0 && !w.is_zero() => Some((n, w.as_millis() as i64)),
            _ => {
                return Err((
                    "flap_max_changes".into(),
                    "set both flap_max_changes (at least 1) and flap_window (above zero)".into(),
                ))
            }
        };
        let mut escalate_after_ms = Vec::new();
        for (i, t) in self.escalate_after.iter().enumerate() {
            let d = humantime::parse_duration(t)
                .map_err(|e| (format!("escalate_after[{i}]"), format!("{t:?}: {e}")))?;
            let ms = d.as_millis() as i64;
            if escalate_after_ms.last().is_some_and(|l| *l >= ms) || ms == 0 {
                return Err((
                    format!("escalate_after[{i}]"),
                    "times must be above zero and increasing".into(),
                ));
            }
            escalate_after_ms.push(ms);
        }
        if let Some(l) = self
            .group_by
            .iter()
            .flatten()
            .find(|l| !crate::rules::template::is_label_name(l))
        {
            return Err(("group_by".into(), format!("{l:?} is not a label name")));
        }
        Ok(crate::rules::alerting::Extras {
            clear,
            flap,
            escalate_after_ms,
            group_by: self.group_by.clone(),
        })
    }
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/insite-agent";
pub const DEFAULT_RULE_FILES: &str = "/etc/insite-agent/rules/*.yml";

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rule_files: vec![DEFAULT_RULE_FILES.into()],
            alertmanagers: Vec::new(),
            webhooks: Vec::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            max_series: 4096,
            resend_delay: Duration::from_secs(60),
            outbox_max_records: 100_000,
            outbox_max_bytes: 64 << 20,
            external_url: None,
            rule: BTreeMap::new(),
        }
    }
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), Violation> {
        let v = |key: &str, reason: String| Violation {
            key: format!("alerts.{key}"),
            reason,
        };
        for (i, am) in self.alertmanagers.iter().enumerate() {
            crate::upstream::http::Endpoint::parse(am)
                .map_err(|e| v(&format!("alertmanagers[{i}]"), e.to_string()))?;
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            crate::upstream::http::Endpoint::parse(&w.url)
                .map_err(|e| v(&format!("webhooks[{i}].url"), e.to_string()))?;
            if !w.secret_file.is_absolute() {
                return Err(v(
                    &format!("webhooks[{i}].secret_file"),
                    "must be an absolute path".into(),
                ));
            }
            if let Some(l) = w
                .group_by
                .iter()
                .find(|l| !crate::rules::template::is_label_name(l))
            {
                return Err(v(
                    &format!("webhooks[{i}].group_by"),
                    format!("{l:?} is not a label name"),
                ));
            }
        }
        for (name, extras) in &self.rule {
            extras
                .compile()
                .map_err(|(key, why)| v(&format!("rule.{name}.{key}"), why))?;
        }
        if let Some(u) = &self.external_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(v(
                    "external_url",
                    "must start with http:// or https://".into(),
                ));
            }
        }
        if !(1..=1_000_000).contains(&self.max_series) {
            return Err(v("max_series", "must be between 1 and 1000000".into()));
        }
        if self.resend_delay < Duration::from_secs(1) {
            return Err(v("resend_delay", "must be at least 1s".into()));
        }
        if self.outbox_max_records == 0 || self.outbox_max_bytes < 4096 {
            return Err(v(
                "outbox_max_records",
                "the outbox needs room for at least one record and 4096 bytes".into(),
            ));
        }
        for (i, f) in self.rule_files.iter().enumerate() {
            if f.is_empty() {
                return Err(v(&format!("rule_files[{i}]"), "is empty".into()));
            }
        }
        Ok(())
    }
}
