//! One alerting rule's alerts through their lifecycle, as Prometheus runs them: a series the
//! expression returns is *pending*, *firing* once it held for `for`, and *resolved* when it
//! stops holding (after `keep_firing_for`). Resolved alerts are kept a while, so their end
//! reaches the receivers and `alerts history` can show them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{files::AlertRule, promql::Sample};

/// How long a resolved alert is kept (Prometheus keeps them 15 min, to resend the resolve).
pub const RESOLVED_RETENTION_MS: i64 = 15 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Inactive,
    Pending,
    Firing,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Inactive => "inactive",
            State::Pending => "pending",
            State::Firing => "firing",
            State::Resolved => "resolved",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable across restarts: a hash of the alert's labels.
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub state: State,
    pub value: f64,
    pub active_at_ms: i64,
    pub fired_at_ms: Option<i64>,
    pub resolved_at_ms: Option<i64>,
    /// Last evaluation whose result held this alert (for `keep_firing_for`).
    pub last_held_ms: i64,
    /// When a notification for it last went to the outbox.
    pub last_sent_ms: Option<i64>,
}

/// A state change, for `alerts history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: i64,
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub from: State,
    pub to: State,
    pub value: f64,
}

/// One rule's alerts by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    pub alerts: BTreeMap<String, Alert>,
}

impl RuleState {
    /// Folds one evaluation's result at `at_ms` into the alerts; returns what changed.
    pub fn step(&mut self, rule: &AlertRule, at_ms: i64, result: &[Sample]) -> Vec<Transition> {
        let mut out = Vec::new();
        let mut held = std::collections::BTreeSet::new();
        for s in result {
            let (labels, annotations) = labels_of(rule, s);
            let id = fingerprint(&labels);
            held.insert(id.clone());
            match self.alerts.get_mut(&id) {
                Some(a) if matches!(a.state, State::Pending | State::Firing) => {
                    a.value = s.value;
                    a.annotations = annotations;
                    a.last_held_ms = at_ms;
                }
                _ => {
                    let a = Alert {
                        id: id.clone(),
                        labels,
                        annotations,
                        state: State::Pending,
                        value: s.value,
                        active_at_ms: at_ms,
                        fired_at_ms: None,
                        resolved_at_ms: None,
                        last_held_ms: at_ms,
                        last_sent_ms: None,
                    };
                    out.push(transition(&a, at_ms, State::Inactive, State::Pending));
                    self.alerts.insert(id, a);
                }
            }
        }
        let for_ms = rule.for_.as_millis() as i64;
        let keep_ms = rule.keep_firing_for.as_millis() as i64;
        self.alerts.retain(|id, a| {
            if held.contains(id) {
                if a.state == State::Pending && at_ms - a.active_at_ms >= for_ms {
                    a.state = State::Firing;
                    a.fired_at_ms = Some(at_ms);
                    out.push(transition(a, at_ms, State::Pending, State::Firing));
                }
                return true;
            }
            match a.state {
                State::Pending => {
                    out.push(transition(a, at_ms, State::Pending, State::Inactive));
                    false
                }
                State::Firing if at_ms - a.last_held_ms < keep_ms => true,
                State::Firing => {
                    a.state = State::Resolved;
                    a.resolved_at_ms = Some(at_ms);
                    out.push(transition(a, at_ms, State::Firing, State::Resolved));
                    true
                }
                State::Resolved | State::Inactive => {
                    at_ms - a.resolved_at_ms.unwrap_or(at_ms) < RESOLVED_RETENTION_MS
                }
            }
        });
        out
    }

    /// The alerts a notification is due for at `at_ms` (as Prometheus decides it): firing ones
    /// never sent or last sent `resend_ms` ago, resolved ones whose resolve was not sent.
    /// Marks them sent.
    pub fn due(&mut self, at_ms: i64, resend_ms: i64) -> Vec<Alert> {
        let mut due = Vec::new();
        for a in self.alerts.values_mut() {
            let send = match a.state {
                State::Firing => a.last_sent_ms.is_none_or(|t| at_ms - t >= resend_ms),
                State::Resolved => a.last_sent_ms.is_some_and(|t| Some(t) < a.resolved_at_ms),
                State::Pending | State::Inactive => false,
            };
            if send {
                a.last_sent_ms = Some(at_ms);
                due.push(a.clone());
            }
        }
        due
    }
}

fn transition(a: &Alert, at_ms: i64, from: State, to: State) -> Transition {
    Transition {
        at_ms,
        id: a.id.clone(),
        labels: a.labels.clone(),
        from,
        to,
        value: a.value,
    }
}

/// The alert's labels (the series' without its name, the rule's over them, `alertname`
/// last) and its annotations, templated with the series' labels and value.
fn labels_of(rule: &AlertRule, s: &Sample) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels: BTreeMap<String, String> = s
        .labels
        .iter()
        .filter(|(k, _)| *k != "__name__")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, t) in &rule.labels {
        labels.insert(k.clone(), t.render(&s.labels, s.value));
    }
    labels.insert("alertname".into(), rule.name.clone());
    let annotations = rule
        .annotations
        .iter()
        .map(|(k, t)| (k.clone(), t.render(&s.labels, s.value)))
        .collect();
    (labels, annotations)
}

/// FNV-1a over the sorted labels: an id that is the same after a restart.
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}
