//! The rule engine: every tick, one scrape of the agent's own exposition goes into the window,
//! each group whose interval is up is evaluated, and its rules' alerts move through their
//! lifecycle. What is due upstream comes out; sending it is the caller's (through the outbox).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    alerting::{Alert, Extras, RuleState, State, Transition},
    files::RuleSet,
    promql::{EvalCache, Sample, Value},
    silence::{Ack, Silence, MAX_SILENCES},
    tsdb::{Bounds, Ingested, Tsdb},
};

/// Transitions kept for `alerts history`.
pub const HISTORY: usize = 1000;

/// What one tick produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ingested: Ingested,
    /// Rules evaluated this tick.
    pub evaluated: usize,
    pub elapsed: Duration,
    pub transitions: Vec<Transition>,
    /// Notifications due, each with the time Alertmanager may consider it valid until.
    pub due: Vec<Due>,
}

#[derive(Debug, Clone)]
pub struct Due {
    pub alert: Alert,
    /// The rule's own webhook grouping, if it has one.
    pub group_by: Option<Vec<String>>,
    pub ends_at_ms: i64,
    pub first: bool,
}

/// What survives a restart: every rule's alerts and the history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Persisted {
    pub rules: BTreeMap<String, RuleState>,
    pub history: VecDeque<Transition>,
    #[serde(default)]
    pub silences: Vec<Silence>,
}

#[derive(Debug)]
pub struct Engine {
    set: RuleSet,
    tsdb: Tsdb,
    /// By rule key (file, group, position, name), in the set's order.
    state: Persisted,
    next_eval: Vec<i64>,
    /// Each group's rule keys, made once at `load` rather than formatted every tick.
    rule_keys: Vec<Vec<String>>,
    /// Each group's rules' extras (`[alerts.rule.<alertname>]`), in the same order.
    extras: Vec<Vec<Arc<Extras>>>,
    resend_ms: i64,
    /// Range results shared by the rules of one tick (`rate(x[1m])` in a warning and a
    /// critical rule is read once).
    cache: EvalCache,
}

/// A rule's key: where it is, so two rules of one name (a warning and a critical) stay apart.
pub fn rule_key(file: &std::path::Path, group: &str, index: usize, name: &str) -> String {
    format!("{}\t{group}\t{index}\t{name}", file.display())
}

impl Engine {
    pub fn new(bounds: Bounds, resend: Duration) -> Self {
        Self {
            set: RuleSet::empty(),
            tsdb: Tsdb::new(bounds),
            state: Persisted::default(),
            next_eval: Vec::new(),
            rule_keys: Vec::new(),
            extras: Vec::new(),
            resend_ms: resend.as_millis() as i64,
            cache: EvalCache::default(),
        }
    }

    pub fn set_resend(&mut self, resend: Duration) {
        self.resend_ms = resend.as_millis() as i64;
    }

    /// Swaps in a new rule set. Alerts of rules that are still there (same file, group,
    /// position and name) keep their state; the rest are dropped.
    pub fn load(&mut self, set: RuleSet) {
        self.load_with(set, &BTreeMap::new());
    }

    /// `load`, with the rules' extras by alert name.
    pub fn load_with(&mut self, set: RuleSet, extras: &BTreeMap<String, Arc<Extras>>) {
        let mut needs = set.needs();
        for e in extras.values() {
            if let Some(c) = &e.clear {
                needs.merge(&c.needs());
            }
        }
        self.tsdb.set_needs(&needs);
        self.extras = (set.groups.iter())
            .map(|g| {
                (g.rules.iter())
                    .map(|r| extras.get(&r.name).cloned().unwrap_or_default())
                    .collect()
            })
            .collect();
        let mut kept = BTreeMap::new();
        for (file, group, i, rule) in keys(&set) {
            let k = rule_key(file, group, i, &rule);
            kept.insert(k.clone(), self.state.rules.remove(&k).unwrap_or_default());
        }
        self.state.rules = kept;
        self.next_eval = vec![i64::MIN; set.groups.len()];
        self.rule_keys = (set.groups.iter())
            .map(|g| {
                (g.rules.iter().enumerate())
                    .map(|(i, r)| rule_key(&g.file, &g.name, i, &r.name))
                    .collect()
            })
            .collect();
        self.set = set;
    }

    /// Puts back what was persisted (after `load`, at start).
    pub fn restore(&mut self, p: Persisted) {
        for (k, s) in p.rules {
            if let Some(slot) = self.state.rules.get_mut(&k) {
                *slot = s;
            }
        }
        self.state.history = p.history;
        self.state.silences = p.silences;
    }

    pub fn persisted(&self) -> &Persisted {
        &self.state
    }

    pub fn rules(&self) -> &RuleSet {
        &self.set
    }

    pub fn tsdb(&self) -> &Tsdb {
        &self.tsdb
    }

    pub fn tick(&mut self, at_ms: i64, exposition: &str) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome {
            ingested: self.tsdb.ingest(at_ms, exposition),
            ..Default::default()
        };
        for (gi, g) in self.set.groups.iter().enumerate() {
            let Some(next) = self.next_eval.get_mut(gi) else {
                continue;
            };
            if at_ms < *next {
                continue;
            }
            let interval_ms = g.interval.map_or(0, |d| d.as_millis() as i64);
            *next = if interval_ms > 0 {
                at_ms + interval_ms
            } else {
                at_ms
            };
            let valid_ms = 4 * self.resend_ms.max(interval_ms);
            let keys = self.rule_keys.get(gi).map_or(&[][..], Vec::as_slice);
            let extras = self.extras.get(gi).map_or(&[][..], Vec::as_slice);
            let silences = &self.state.silences;
            for ((rule, key), ex) in g.rules.iter().zip(keys).zip(extras) {
                let Some(st) = self.state.rules.get_mut(key) else {
                    continue;
                };
                let vector = |v: Value| match v {
                    Value::Vector(v) => v,
                    // As Prometheus: a scalar is one series without labels.
                    Value::Scalar(v) => vec![Sample {
                        labels: Default::default(),
                        value: v,
                    }],
                };
                let result = vector(rule.expr.eval_cached(&self.tsdb, at_ms, &mut self.cache));
                let clear = match &ex.clear {
                    Some(c) => vector(c.eval_cached(&self.tsdb, at_ms, &mut self.cache)),
                    None => Vec::new(),
                };
                out.evaluated += 1;
                out.transitions
                    .extend(st.step_with(rule, ex, at_ms, &result, &clear));
                let muted = |a: &Alert| {
                    if silences.is_empty() {
                        return None;
                    }
                    let labels = a.labels_out();
                    silences
                        .iter()
                        .find(|s| s.mutes(&labels, at_ms))
                        .map(|s| s.id.clone())
                };
                for a in st.due_with(at_ms, self.resend_ms, &ex.escalate_after_ms, muted) {
                    let first = a.state == State::Firing
                        && a.last_sent_ms == Some(at_ms)
                        && a.fired_at_ms == Some(at_ms);
                    out.due.push(Due {
                        ends_at_ms: a.resolved_at_ms.unwrap_or(at_ms + valid_ms),
                        first,
                        group_by: ex.group_by.clone(),
                        alert: a,
                    });
                }
            }
        }
        self.cache.clear();
        for t in &out.transitions {
            if self.state.history.len() >= HISTORY {
                self.state.history.pop_front();
            }
            self.state.history.push_back(t.clone());
        }
        out.elapsed = started.elapsed();
        out
    }

    /// Every alert that is pending, firing or recently resolved, with its rule's key.
    pub fn alerts(&self) -> impl Iterator<Item = (&str, &Alert)> {
        self.state
            .rules
            .iter()
            .flat_map(|(k, s)| s.alerts.values().map(move |a| (k.as_str(), a)))
    }

    /// Adds a silence (expired ones are dropped first); refuses past [`MAX_SILENCES`].
    pub fn silence(&mut self, s: Silence, now_ms: i64) -> Result<(), String> {
        self.state.silences.retain(|x| x.ends_at_ms > now_ms);
        if self.state.silences.len() >= MAX_SILENCES {
            return Err(format!(
                "{MAX_SILENCES} silences are active; expire some first"
            ));
        }
        self.state.silences.push(s);
        Ok(())
    }

    /// Ends a silence now; whether it was there.
    pub fn unsilence(&mut self, id: &str) -> bool {
        let n = self.state.silences.len();
        self.state.silences.retain(|s| s.id != id);
        n != self.state.silences.len()
    }

    pub fn silences(&self, now_ms: i64) -> Vec<Silence> {
        self.state
            .silences
            .iter()
            .filter(|s| s.ends_at_ms > now_ms)
            .cloned()
            .collect()
    }

    /// Acknowledges the pending or firing alert `id` (or the one alert whose id starts with
    /// it, at least 4 characters).
    pub fn ack(&mut self, id: &str, ack: Ack) -> Result<Alert, String> {
        let live = |a: &Alert| matches!(a.state, State::Pending | State::Firing);
        let mut found: Vec<&mut Alert> = (self.state.rules.values_mut())
            .flat_map(|r| r.alerts.values_mut())
            .filter(|a| live(a) && (a.id == id || (id.len() >= 4 && a.id.starts_with(id))))
            .collect();
        match found.len() {
            0 => Err(format!("no pending or firing alert {id:?}")),
            1 => {
                let a = found.remove(0);
                a.ack = Some(ack);
                Ok(a.clone())
            }
            n => Err(format!("{id:?} names {n} alerts; give more of the id")),
        }
    }

    pub fn history(&self) -> &VecDeque<Transition> {
        &self.state.history
    }
}

fn keys(set: &RuleSet) -> impl Iterator<Item = (&std::path::Path, &str, usize, String)> {
    set.groups.iter().flat_map(|g| {
        g.rules
            .iter()
            .enumerate()
            .map(move |(i, r)| (g.file.as_path(), g.name.as_str(), i, r.name.clone()))
    })
}
