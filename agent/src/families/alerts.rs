//! `alerts`: Prometheus alerting rules evaluated on the agent's own window every tick, their
//! alerts' lifecycle kept across restarts, and notifications sent upstream through the
//! outbox. No kernel programs: it reads what the other families export.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use tokio::{sync::Notify, task::JoinSet};
use tracing::{error, info, warn};

use super::{keep, Attached, Family, Spawn};
use crate::{
    collectors::{Reading, TickSource},
    config::Config,
    control::{
        alerts::{
            AlertsAckRequest, AlertsChanged, AlertsHistoryRequest, AlertsRequest,
            AlertsSilenceRequest, AlertsUnsilenceRequest, HistoryView,
        },
        protocol::{Command as _, Request},
        reply, Views,
    },
    exporters::{http::Exposition, prometheus::EncodeFamily},
    outbox::{Bound, Outbox},
    rules::{
        alerting::Extras,
        engine::{Engine, Outcome, Persisted},
        files::RuleSet,
        silence::{comment, user_name, Ack, Matcher, Silence, MAX_MATCHERS},
    },
    store::{
        alerts::{AlertsView, OutboxView, WindowView},
        SharedStore, Store,
    },
    untrusted::LogField,
    upstream::{
        alertmanager::{self, Alertmanager},
        sender::{self, unix_ms, Envelope, Receiver as _, SharedStats},
        webhook::{self, Webhook},
    },
};

const STATE_FILE: &str = "alerts.json";
const OUTBOX_FILE: &str = "outbox.redb";

#[derive(Default)]
pub struct Alerts(Arc<Inner>);

/// One receiver's queue: its name in the outbox, what wakes its sender, what it is sent.
struct Queue {
    name: String,
    wake: Arc<Notify>,
    /// `None`: an Alertmanager (everything due in one batch); `Some`: a webhook, one
    /// notification per group of these labels.
    group_by: Option<Vec<String>>,
}

#[derive(Default)]
struct Inner {
    engine: Mutex<Option<Engine>>,
    outbox: Mutex<Option<Arc<Outbox>>>,
    stats: SharedStats,
    /// The receivers' queues in the outbox.
    receivers: Mutex<Vec<Queue>>,
    refused: Mutex<Option<String>>,
}

impl TickSource for Alerts {
    fn name(&self) -> &'static str {
        "alerts"
    }

    // The engine runs on its own task, after the collectors (see `spawn`).
    fn read(&self, _now: std::time::Instant) -> Reading {
        Reading::default()
    }
}

impl Views for Alerts {
    fn commands(&self) -> &'static [&'static str] {
        &[
            AlertsRequest::NAME,
            AlertsHistoryRequest::NAME,
            AlertsAckRequest::NAME,
            AlertsSilenceRequest::NAME,
            AlertsUnsilenceRequest::NAME,
        ]
    }

    fn answer(&self, req: Request, st: &Store, cfg: &Config) -> Result<String, String> {
        match req.cmd.as_str() {
            AlertsAckRequest::NAME | AlertsSilenceRequest::NAME | AlertsUnsilenceRequest::NAME => {
                self.change(req, cfg)
            }
            AlertsRequest::NAME => {
                req.args::<AlertsRequest>()?;
                reply(&st.alerts.clone().unwrap_or_default())
            }
            AlertsHistoryRequest::NAME => {
                let r: AlertsHistoryRequest = req.args()?;
                let eng = self
                    .0
                    .engine
                    .lock()
                    .map_err(|_| "internal: engine unavailable")?;
                let h = eng.as_ref().map(|e| e.history()).into_iter().flatten();
                let mut transitions: Vec<_> =
                    h.rev().take(r.limit.unwrap_or(100)).cloned().collect();
                transitions.reverse();
                reply(&HistoryView { transitions })
            }
            other => Err(format!("alerts has no command {other:?}")),
        }
    }
}

impl Family for Alerts {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.alerts.enabled
    }

    fn needs_ebpf(&self, _cfg: &Config) -> bool {
        false
    }

    fn attach(&self, cfg: &Config) -> Result<Attached, String> {
        let a = &cfg.alerts;
        std::fs::create_dir_all(&a.state_dir)
            .map_err(|e| format!("alerts.state_dir {}: {e}", a.state_dir.display()))?;
        let outbox = Outbox::open(
            &a.state_dir.join(OUTBOX_FILE),
            Bound {
                records: a.outbox_max_records,
                bytes: a.outbox_max_bytes,
            },
        )
        .map_err(|e| format!("outbox: {}", crate::probes::error_chain(&e)))?;
        let mut engine = Engine::new(crate::budget::window_bounds(cfg), a.resend_delay);
        let mut problems = Vec::new();
        match RuleSet::load(&a.rule_files) {
            Ok(set) => engine.load_with(set, &extras(cfg)),
            Err(e) => {
                error!(error = %LogField(&e.to_string()), "alert rules refused; the agent runs without them until a reload reads good ones");
                problems.push(format!("rules refused: {e}"));
                self.set_refused(Some(e.to_string()));
            }
        }
        match read_state(&a.state_dir) {
            Ok(Some(p)) => engine.restore(p),
            Ok(None) => {}
            Err(e) => problems.push(format!(
                "previous alert state unreadable ({e}); starting afresh"
            )),
        }
        let rules = engine.rules().rules().count();
        *self.0.engine.lock().map_err(|_| "internal")? = Some(engine);
        *self.0.outbox.lock().map_err(|_| "internal")? = Some(Arc::new(outbox));
        Ok(Attached {
            how: format!("{rules} rules"),
            problems,
        })
    }

    fn spawn(&self, ctx: &Spawn, tasks: &mut JoinSet<()>) {
        let Some(outbox) = self.0.outbox.lock().ok().and_then(|o| o.clone()) else {
            return;
        };
        let cfg = ctx.config.borrow().clone();
        let mut queues = Vec::new();
        let mut start = |name: &str, group_by| {
            let wake = Arc::new(Notify::new());
            queues.push(Queue {
                name: name.to_string(),
                wake: wake.clone(),
                group_by,
            });
            wake
        };
        for url in &cfg.alerts.alertmanagers {
            match Alertmanager::new(url) {
                Ok(am) => {
                    let wake = start(am.name(), None);
                    tasks.spawn(sender::drain(
                        am,
                        outbox.clone(),
                        wake,
                        self.0.stats.clone(),
                        ctx.shutdown.clone(),
                    ));
                }
                Err(e) => warn!(url = %LogField(url), error = %e, "alertmanager skipped"),
            }
        }
        for w in &cfg.alerts.webhooks {
            match Webhook::new(&w.url, &w.secret_file) {
                Ok(hook) => {
                    let wake = start(hook.name(), Some(w.group_by.clone()));
                    tasks.spawn(sender::drain(
                        hook,
                        outbox.clone(),
                        wake,
                        self.0.stats.clone(),
                        ctx.shutdown.clone(),
                    ));
                }
                Err(e) => {
                    error!(url = %LogField(&w.url), error = %LogField(&e.to_string()), "webhook skipped")
                }
            }
        }
        if let Ok(mut r) = self.0.receivers.lock() {
            *r = queues;
        }
        let inner = self.0.clone();
        let (store, exposition, shutdown) = (
            ctx.store.clone(),
            ctx.exposition.clone(),
            ctx.shutdown.clone(),
        );
        let config = ctx.config.clone();
        let mut ticks = ctx.ticks.clone();
        tasks.spawn(async move {
            // Right after each collector tick: the store has just taken the tick's readings.
            loop {
                tokio::select! {
                    r = ticks.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                let cfg = config.borrow().clone();
                let (i, st, ex, ob) = (
                    inner.clone(),
                    store.clone(),
                    exposition.clone(),
                    outbox.clone(),
                );
                if tokio::task::spawn_blocking(move || i.tick(&cfg, &st, &ex, &ob))
                    .await
                    .is_err()
                {
                    error!("alert engine tick panicked; alerts stop");
                    return;
                }
            }
        });
    }

    fn metrics(&self) -> EncodeFamily {
        crate::exporters::prometheus::encode_alerts
    }

    fn keep_restart_keys(&self, running: &Config, new: &mut Config) -> Vec<&'static str> {
        let (r, n) = (&running.alerts, &mut new.alerts);
        let mut changed = Vec::new();
        keep(&mut changed, "alerts.enabled", &r.enabled, &mut n.enabled);
        keep(
            &mut changed,
            "alerts.state_dir",
            &r.state_dir,
            &mut n.state_dir,
        );
        keep(
            &mut changed,
            "alerts.alertmanagers",
            &r.alertmanagers,
            &mut n.alertmanagers,
        );
        keep(
            &mut changed,
            "alerts.max_series",
            &r.max_series,
            &mut n.max_series,
        );
        keep(
            &mut changed,
            "alerts.outbox_max_records",
            &r.outbox_max_records,
            &mut n.outbox_max_records,
        );
        keep(
            &mut changed,
            "alerts.outbox_max_bytes",
            &r.outbox_max_bytes,
            &mut n.outbox_max_bytes,
        );
        changed
    }

    /// Re-reads the rule files: a good set replaces the running one (alerts of unchanged
    /// rules keep their state); a refused one leaves it running.
    fn reload(&self, cfg: &Config, _store: &SharedStore) {
        let set = match RuleSet::load(&cfg.alerts.rule_files) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %LogField(&e.to_string()), "SIGHUP: alert rules refused; the running rules stay");
                self.set_refused(Some(e.to_string()));
                return;
            }
        };
        self.set_refused(None);
        if let Ok(mut eng) = self.0.engine.lock() {
            if let Some(e) = eng.as_mut() {
                let n = set.rules().count();
                e.load_with(set, &extras(cfg));
                e.set_resend(cfg.alerts.resend_delay);
                info!(rules = n, "alert rules reloaded");
            }
        }
    }
}

/// Every `[alerts.rule.<name>]`, compiled (the config's validation refused what does not).
fn extras(cfg: &Config) -> std::collections::BTreeMap<String, Arc<Extras>> {
    (cfg.alerts.rule.iter())
        .filter_map(|(name, x)| Some((name.clone(), Arc::new(x.compile().ok()?))))
        .collect()
}

/// Longest silence accepted.
const MAX_SILENCE: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

impl Alerts {
    /// Acks, silences and unsilences: applied to the engine and saved at once.
    fn change(&self, req: Request, cfg: &Config) -> Result<String, String> {
        let who = user_name(req.uid);
        let now = unix_ms();
        let mut guard = self
            .0
            .engine
            .lock()
            .map_err(|_| "internal: engine unavailable")?;
        let engine = guard.as_mut().ok_or("alerts are not running")?;
        let changed = match req.cmd.as_str() {
            AlertsAckRequest::NAME => {
                let r: AlertsAckRequest = req.args()?;
                let a = engine.ack(
                    &r.id,
                    Ack {
                        by: who.clone(),
                        at_ms: now,
                        comment: comment(r.comment.as_deref().unwrap_or("")),
                    },
                )?;
                info!(id = %a.id, by = %LogField(&who), "alert acknowledged");
                AlertsChanged {
                    id: a.id,
                    what: "acknowledged".into(),
                }
            }
            AlertsSilenceRequest::NAME => {
                let r: AlertsSilenceRequest = req.args()?;
                if r.matchers.is_empty() || r.matchers.len() > MAX_MATCHERS {
                    return Err(format!("a silence takes 1 to {MAX_MATCHERS} matchers"));
                }
                let matchers = (r.matchers.iter())
                    .map(|m| Matcher::parse(m))
                    .collect::<Result<Vec<_>, _>>()?;
                let d = humantime::parse_duration(&r.for_)
                    .map_err(|e| format!("for {:?}: {e}", r.for_))?;
                if d.is_zero() || d > MAX_SILENCE {
                    return Err("for: must be above zero and at most 30 days".into());
                }
                let id = crate::rules::alerting::fingerprint(
                    &[
                        ("matchers".to_string(), format!("{matchers:?}")),
                        ("at".to_string(), now.to_string()),
                    ]
                    .into(),
                );
                engine.silence(
                    Silence {
                        id: id.clone(),
                        matchers,
                        starts_at_ms: now,
                        ends_at_ms: now + d.as_millis() as i64,
                        created_by: who.clone(),
                        comment: comment(r.comment.as_deref().unwrap_or("")),
                    },
                    now,
                )?;
                info!(id = %id, by = %LogField(&who), "alerts silenced");
                AlertsChanged {
                    id,
                    what: "silenced".into(),
                }
            }
            _ => {
                let r: AlertsUnsilenceRequest = req.args()?;
                if !engine.unsilence(&r.id) {
                    return Err(format!("no silence {:?}", r.id));
                }
                AlertsChanged {
                    id: r.id,
                    what: "unsilenced".into(),
                }
            }
        };
        write_state(&cfg.alerts.state_dir, engine.persisted())
            .map_err(|e| format!("changed, but not saved: {e}"))?;
        reply(&changed)
    }

    fn set_refused(&self, why: Option<String>) {
        if let Ok(mut r) = self.0.refused.lock() {
            *r = why;
        }
    }
}

impl Inner {
    /// One engine tick: the exposition in, the alerts moved on, what is due into the outbox,
    /// the state persisted when it changed, the view updated.
    fn tick(&self, cfg: &Config, store: &SharedStore, exposition: &Exposition, outbox: &Outbox) {
        // Without rules there is nothing to read: no rendering of the exposition every tick.
        // (Rendered before the engine's lock is taken: the rendering takes the store's.)
        let has_rules = (self.engine.lock().ok())
            .is_some_and(|e| e.as_ref().is_some_and(|e| !e.rules().groups.is_empty()));
        let rendered = if has_rules {
            match exposition.fresh() {
                Ok(r) => Some(r),
                Err(_) => return,
            }
        } else {
            None
        };
        let Ok(mut guard) = self.engine.lock() else {
            return;
        };
        let Some(engine) = guard.as_mut() else {
            return;
        };
        let out = match &rendered {
            Some(r) => engine.tick(unix_ms(), &String::from_utf8_lossy(&r.openmetrics)),
            None => Outcome::default(),
        };
        self.send(cfg, &out, outbox);
        if !out.transitions.is_empty() || !out.due.is_empty() {
            if let Err(e) = write_state(&cfg.alerts.state_dir, engine.persisted()) {
                warn!(error = %e, "alert state not saved; a restart may re-send or forget");
            }
        }
        let view = self.view(engine, &out, outbox);
        drop(guard);
        if let Ok(mut st) = store.write() {
            let (mut evaluation, evaluations) = st
                .alerts
                .as_ref()
                .map(|v| (v.evaluation, v.evaluations))
                .unwrap_or_default();
            evaluation.record(out.elapsed.as_nanos() as u64);
            st.alerts = Some(AlertsView {
                evaluation,
                evaluations: evaluations + 1,
                ..view
            });
        }
    }

    /// One notification per receiver for everything due this tick (Prometheus batches too).
    fn send(&self, cfg: &Config, out: &Outcome, outbox: &Outbox) {
        if out.due.is_empty() {
            return;
        }
        let base = cfg
            .alerts
            .external_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.metrics.listen));
        let detect_from_ms: Vec<i64> = out
            .due
            .iter()
            .filter(|d| d.first)
            .map(|d| d.alert.active_at_ms)
            .collect();
        let Ok(receivers) = self.receivers.lock() else {
            return;
        };
        for q in receivers.iter() {
            let payloads = match &q.group_by {
                None => vec![(
                    alertmanager::payload(&out.due, &base),
                    detect_from_ms.clone(),
                )],
                Some(by) => webhook::groups(&out.due, by)
                    .into_iter()
                    .map(|g| {
                        let detect = g
                            .iter()
                            .filter(|d| d.first)
                            .map(|d| d.alert.active_at_ms)
                            .collect();
                        (webhook::payload(&q.name, &g, by, &base), detect)
                    })
                    .collect(),
            };
            for (payload, detect_from_ms) in payloads {
                let Ok(body) = serde_json::to_vec(&Envelope {
                    detect_from_ms,
                    payload,
                }) else {
                    continue;
                };
                match outbox.push(&q.name, &body) {
                    Ok(_) => q.wake.notify_one(),
                    Err(e) => {
                        warn!(receiver = %LogField(&q.name), error = %crate::probes::error_chain(&e), "notification not queued")
                    }
                }
            }
        }
    }

    fn view(&self, engine: &Engine, out: &Outcome, outbox: &Outbox) -> AlertsView {
        let set = engine.rules();
        let mut alerts: Vec<_> = engine.alerts().map(|(_, a)| a.clone()).collect();
        alerts.sort_by(|a, b| {
            (a.labels.get("alertname"), &a.labels).cmp(&(b.labels.get("alertname"), &b.labels))
        });
        let w = engine.tsdb().stats();
        let ob = outbox.stats().unwrap_or_default();
        let (notifications, detection) = match self.stats.lock() {
            Ok(s) => {
                let mut n: std::collections::BTreeMap<
                    String,
                    std::collections::BTreeMap<String, u64>,
                > = Default::default();
                for ((r, res), c) in &s.results {
                    n.entry(r.clone())
                        .or_default()
                        .insert((*res).to_string(), *c);
                }
                (n, s.detection)
            }
            Err(_) => Default::default(),
        };
        AlertsView {
            silences: engine.silences(unix_ms()),
            files: set.files.iter().map(|f| f.display().to_string()).collect(),
            groups: set.groups.len(),
            rules: set.rules().count(),
            refused: self.refused.lock().ok().and_then(|r| r.clone()),
            alerts,
            window: WindowView {
                series: w.series,
                bytes: w.bytes,
                refused_total: w.refused_total,
            },
            outbox: OutboxView {
                records: ob.records,
                bytes: ob.bytes,
                dropped: ob.dropped,
                oldest_age_seconds: ob.oldest_age.map(|d| d.as_secs_f64()),
            },
            receivers: self
                .receivers
                .lock()
                .map(|r| r.iter().map(|q| q.name.clone()).collect())
                .unwrap_or_default(),
            notifications,
            detection,
            last_evaluation_seconds: out.elapsed.as_secs_f64(),
            ..Default::default()
        }
    }
}

fn read_state(dir: &Path) -> Result<Option<Persisted>, String> {
    match std::fs::read(dir.join(STATE_FILE)) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Written whole to a temporary file, synced, then renamed over the old one: a crash leaves
/// the old state or the new, never half of one.
fn write_state(dir: &Path, p: &Persisted) -> Result<(), String> {
    use std::io::Write as _;
    let tmp: PathBuf = dir.join(format!("{STATE_FILE}.tmp"));
    let body = serde_json::to_vec(p).map_err(|e| e.to_string())?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
    f.write_all(&body)
        .and_then(|_| f.sync_all())
        .map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, dir.join(STATE_FILE)).map_err(|e| e.to_string())?;
    Ok(())
}
