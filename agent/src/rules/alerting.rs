//! One alerting rule's alerts through their lifecycle, as Prometheus runs them: a series the
//! expression returns is *pending*, *firing* once it held for `for`, and *resolved* when it
//! stops holding (after `keep_firing_for`). Resolved alerts are kept a while, so their end
//! reaches the receivers and `alerts history` can show them.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::{
    files::AlertRule,
    promql::{Labels, Sample},
    silence::Ack,
    template::Template,
};

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
    /// Who acknowledged it (stops its escalation).
    #[serde(default)]
    pub ack: Option<Ack>,
    /// The silence that keeps it from being notified now.
    #[serde(default)]
    pub silenced_by: Option<String>,
    /// Held firing because it changed state too often (flap suppression).
    #[serde(default)]
    pub flapping: bool,
    /// Escalation steps taken (each after its `escalate_after`, while unacknowledged).
    #[serde(default)]
    pub escalation: usize,
}

/// Severities an escalation step raises through, lowest first.
pub const SEVERITIES: [&str; 4] = ["info", "warning", "critical", "page"];

impl Alert {
    /// The labels it is exported and notified with: its own, `flapping="true"` while held,
    /// and `escalation` with a raised `severity` once escalated.
    pub fn labels_out(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        if self.flapping {
            l.insert("flapping".into(), "true".into());
        }
        if self.escalation > 0 {
            l.insert("escalation".into(), self.escalation.to_string());
            let base = l
                .get("severity")
                .and_then(|s| SEVERITIES.iter().position(|x| x == s))
                .unwrap_or(1);
            let raised = SEVERITIES[(base + self.escalation).min(SEVERITIES.len() - 1)];
            l.insert("severity".into(), raised.into());
        }
        l
    }
}

/// The agent-side extras of a rule (`[alerts.rule.<alertname>]`), compiled.
#[derive(Debug, Clone, Default)]
pub struct Extras {
    /// Hysteresis: a firing alert stays firing while this (laxer) expression holds for it.
    pub clear: Option<super::promql::Expr>,
    /// Flap suppression: more than `max` changes of state within `window_ms` hold it firing.
    pub flap: Option<(usize, i64)>,
    /// Escalation: after each of these (since firing, unacknowledged), one step up.
    pub escalate_after_ms: Vec<i64>,
    /// Webhook grouping for this rule's alerts (overrides the webhook's `group_by`).
    pub group_by: Option<Vec<String>>,
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
    /// Recent changes of state (to firing, to resolved) by alert id, for flap suppression.
    #[serde(default)]
    pub changes: BTreeMap<String, VecDeque<i64>>,
    #[serde(skip)]
    ids: Ids,
}

/// The alert id of each series of the last result (when the rule's labels do not read
/// `$value`, the id depends only on the series): an alert still held costs a look-up, not its
/// labels built, templated and hashed again every evaluation.
#[derive(Debug, Clone, Default)]
struct Ids(foldhash::HashMap<Labels, String>);

/// A cache: states are equal whatever it holds.
impl PartialEq for Ids {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl RuleState {
    /// Folds one evaluation's result at `at_ms` into the alerts; returns what changed.
    pub fn step(&mut self, rule: &AlertRule, at_ms: i64, result: &[Sample]) -> Vec<Transition> {
        self.step_with(rule, &Extras::default(), at_ms, result, &[])
    }

    /// `step` with the rule's extras, and the result of its clear expression (hysteresis).
    pub fn step_with(
        &mut self,
        rule: &AlertRule,
        extras: &Extras,
        at_ms: i64,
        result: &[Sample],
        clear: &[Sample],
    ) -> Vec<Transition> {
        let mut out = Vec::new();
        let mut held = std::collections::BTreeSet::new();
        let ids_hold = !rule.labels.values().any(Template::reads_value);
        let annotations_move = rule.annotations.values().any(Template::reads_value);
        let clearing: std::collections::BTreeSet<String> = clear
            .iter()
            .map(|s| fingerprint(&labels_of(rule, s).0))
            .collect();
        let mut ids = std::mem::take(&mut self.ids.0);
        let mut next_ids = foldhash::HashMap::default();
        for s in result {
            let known = ids_hold.then(|| ids.remove(&s.labels)).flatten();
            let (id, built) = match known {
                Some(id) => (id, None),
                None => {
                    let built = labels_of(rule, s);
                    (fingerprint(&built.0), Some(built))
                }
            };
            if ids_hold {
                next_ids.insert(s.labels.clone(), id.clone());
            }
            held.insert(id.clone());
            match self.alerts.get_mut(&id) {
                Some(a) if matches!(a.state, State::Pending | State::Firing) => {
                    a.value = s.value;
                    match built {
                        Some((_, annotations)) => a.annotations = annotations,
                        None if annotations_move => a.annotations = annotations_of(rule, s),
                        None => {}
                    }
                    a.last_held_ms = at_ms;
                }
                _ => {
                    let (labels, annotations) = built.unwrap_or_else(|| labels_of(rule, s));
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
                        ack: None,
                        silenced_by: None,
                        flapping: false,
                        escalation: 0,
                    };
                    out.push(transition(&a, at_ms, State::Inactive, State::Pending));
                    self.alerts.insert(id, a);
                }
            }
        }
        self.ids.0 = next_ids;
        let for_ms = rule.for_.as_millis() as i64;
        let keep_ms = rule.keep_firing_for.as_millis() as i64;
        // Changes of state within the flap window, by id (old ones dropped first).
        let flap = extras.flap;
        for c in self.changes.values_mut() {
            let window = flap.map_or(0, |f| f.1);
            while c.front().is_some_and(|t| at_ms - t > window) {
                c.pop_front();
            }
        }
        self.changes.retain(|_, c| !c.is_empty());
        let recent = |changes: &BTreeMap<String, VecDeque<i64>>, id: &str| {
            changes.get(id).map_or(0, VecDeque::len)
        };
        let mut flips = Vec::new();
        for (id, a) in self.alerts.iter_mut() {
            if held.contains(id) {
                if a.state == State::Pending && at_ms - a.active_at_ms >= for_ms {
                    a.state = State::Firing;
                    a.fired_at_ms = Some(at_ms);
                    out.push(transition(a, at_ms, State::Pending, State::Firing));
                    flips.push(id.clone());
                }
                continue;
            }
            if a.state == State::Firing && clearing.contains(id) {
                // Hysteresis: the laxer clear condition still holds.
                a.last_held_ms = at_ms;
                continue;
            }
            if a.state == State::Firing && at_ms - a.last_held_ms >= keep_ms {
                let flapping = flap.is_some_and(|(max, _)| recent(&self.changes, id) > max);
                a.flapping = flapping;
                if !flapping {
                    a.state = State::Resolved;
                    a.resolved_at_ms = Some(at_ms);
                    out.push(transition(a, at_ms, State::Firing, State::Resolved));
                    flips.push(id.clone());
                }
            }
        }
        for id in flips {
            self.changes.entry(id).or_default().push_back(at_ms);
        }
        if let Some((max, _)) = flap {
            for (id, a) in self.alerts.iter_mut() {
                if a.state == State::Firing && held.contains(id) {
                    a.flapping = a.flapping && recent(&self.changes, id) > max;
                }
            }
        }
        self.alerts.retain(|id, a| match a.state {
            _ if held.contains(id) => true,
            State::Pending => {
                out.push(transition(a, at_ms, State::Pending, State::Inactive));
                false
            }
            State::Firing => true,
            State::Resolved | State::Inactive => {
                at_ms - a.resolved_at_ms.unwrap_or(at_ms) < RESOLVED_RETENTION_MS
            }
        });
        out
    }

    /// The alerts a notification is due for at `at_ms` (as Prometheus decides it): firing ones
    /// never sent or last sent `resend_ms` ago, resolved ones whose resolve was not sent.
    /// Marks them sent.
    pub fn due(&mut self, at_ms: i64, resend_ms: i64) -> Vec<Alert> {
        self.due_with(at_ms, resend_ms, &[], |_| None)
    }

    /// `due`, with escalation (`escalate_after_ms`: an unacknowledged firing alert steps up
    /// and is sent at once) and silences (`muted` names the silence that mutes an alert: it
    /// is neither sent nor marked sent, so it goes out once the silence ends).
    pub fn due_with(
        &mut self,
        at_ms: i64,
        resend_ms: i64,
        escalate_after_ms: &[i64],
        muted: impl Fn(&Alert) -> Option<String>,
    ) -> Vec<Alert> {
        let mut due = Vec::new();
        for a in self.alerts.values_mut() {
            let mut escalated = false;
            if a.state == State::Firing && a.ack.is_none() {
                let firing_for = at_ms - a.fired_at_ms.unwrap_or(at_ms);
                let step = escalate_after_ms
                    .iter()
                    .filter(|t| firing_for >= **t)
                    .count();
                if step > a.escalation {
                    a.escalation = step;
                    escalated = true;
                }
            }
            a.silenced_by = muted(a);
            let send = match a.state {
                State::Firing => escalated || a.last_sent_ms.is_none_or(|t| at_ms - t >= resend_ms),
                State::Resolved => a.last_sent_ms.is_some_and(|t| Some(t) < a.resolved_at_ms),
                State::Pending | State::Inactive => false,
            };
            if send && a.silenced_by.is_none() {
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
    (labels, annotations_of(rule, s))
}

fn annotations_of(rule: &AlertRule, s: &Sample) -> BTreeMap<String, String> {
    (rule.annotations.iter())
        .map(|(k, t)| (k.clone(), t.render(&s.labels, s.value)))
        .collect()
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
