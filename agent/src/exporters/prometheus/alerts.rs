//! Alerts: `ALERTS` and `ALERTS_FOR_STATE` as Prometheus exports them, and the engine's own
//! costs, its window, its outbox and its receivers.

use super::*;
use crate::exporters::labels::named;
use crate::{rules::alerting::State, store::alerts::AlertsView};

pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    _cfg: &Config,
) -> Result<(), std::fmt::Error> {
    match &st.alerts {
        Some(v) => view(e, v),
        None => Ok(()),
    }
}

fn alert_labels(a: &crate::rules::alerting::Alert) -> Labels {
    let mut ls = Labels::new();
    for (k, v) in a.labels_out() {
        ls.extend(named(&k, v));
    }
    ls
}

fn view(e: &mut DescriptorEncoder<'_>, v: &AlertsView) -> Result<(), std::fmt::Error> {
    let live = || {
        v.alerts
            .iter()
            .filter(|a| matches!(a.state, State::Pending | State::Firing))
    };
    gauge(
        e,
        "ALERTS",
        "Alerts pending and firing, as Prometheus exports them",
        None,
        live().map(|a| {
            let mut ls = alert_labels(a);
            ls.extend(l("alertstate", a.state.as_str()));
            (ls, 1.0)
        }),
    )?;
    gauge(
        e,
        "ALERTS_FOR_STATE",
        "When each pending or firing alert became active (unix seconds)",
        None,
        live().map(|a| (alert_labels(a), a.active_at_ms as f64 / 1000.0)),
    )?;
    gauge(
        e,
        "insite_alerts_rules",
        "Alerting rules loaded",
        None,
        [(Labels::new(), v.rules as f64)],
    )?;
    histogram(
        e,
        "insite_alerts_evaluation",
        "Time one engine tick took: the exposition read into the window and every due rule evaluated",
        [(Labels::new(), &v.evaluation)],
    )?;
    histogram(
        e,
        "insite_alert_detection",
        "From an alert's condition first holding to its first firing notification accepted upstream",
        [(Labels::new(), &v.detection)],
    )?;
    counter(
        e,
        "insite_alerts_notifications",
        "Notification deliveries by receiver and result (sent; failed: retried; rejected: refused for good and dropped)",
        None,
        v.notifications.iter().flat_map(|(r, m)| {
            m.iter().map(move |(res, c)| {
                let mut ls = l("receiver", r.clone());
                ls.extend(l("result", res.clone()));
                (ls, *c as f64)
            })
        }),
    )?;
    gauge(
        e,
        "insite_outbox_records",
        "Notifications waiting in the upstream outbox",
        None,
        [(Labels::new(), v.outbox.records as f64)],
    )?;
    gauge(
        e,
        "insite_outbox",
        "Bytes the upstream outbox holds",
        Some(&Unit::Bytes),
        [(Labels::new(), v.outbox.bytes as f64)],
    )?;
    gauge(
        e,
        "insite_outbox_oldest_age",
        "Age of the oldest notification waiting in the outbox (0 when empty)",
        Some(&Unit::Seconds),
        [(Labels::new(), v.outbox.oldest_age_seconds.unwrap_or(0.0))],
    )?;
    counter(
        e,
        "insite_outbox_dropped",
        "Notifications the outbox dropped at its bound (oldest first)",
        None,
        [(Labels::new(), v.outbox.dropped as f64)],
    )?;
    gauge(
        e,
        "insite_alerts_window_series",
        "Series the rule window holds (only those the rules read)",
        None,
        [(Labels::new(), v.window.series as f64)],
    )?;
    gauge(
        e,
        "insite_alerts_window",
        "Heap the rule window holds",
        Some(&Unit::Bytes),
        [(Labels::new(), v.window.bytes as f64)],
    )?;
    counter(
        e,
        "insite_alerts_window_refused_series",
        "New series the rule window refused at alerts.max_series",
        None,
        [(Labels::new(), v.window.refused_total as f64)],
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, RwLock};

    use super::*;
    use crate::{
        config::ConfigSource,
        rules::{
            alerting::Alert,
            promql::{Expr, Value},
            tsdb::{Bounds, Tsdb},
        },
    };

    /// Alert labels carry the workload's text (a service name, a destination): quotes,
    /// backslashes and newlines in them leave the exposition parseable, and read back exactly.
    #[test]
    fn hostile_alert_labels_are_escaped_and_read_back_exactly() {
        let hostile = "svc\"} 1\nfake_metric 7\n# EOF\\x";
        let mut st = Store::new(ConfigSource::Defaults, 1);
        st.alerts = Some(AlertsView {
            alerts: vec![Alert {
                id: "0123456789abcdef".into(),
                labels: [
                    ("alertname".to_string(), "A".to_string()),
                    ("service".to_string(), hostile.to_string()),
                ]
                .into(),
                annotations: Default::default(),
                state: State::Firing,
                value: 1.0,
                active_at_ms: 1000,
                fired_at_ms: Some(1000),
                resolved_at_ms: None,
                last_held_ms: 1000,
                last_sent_ms: None,
                ack: None,
                silenced_by: None,
                flapping: false,
                escalation: 0,
            }],
            ..Default::default()
        });
        let store = Arc::new(RwLock::new(st));
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(Config::default()));
        let mut r = Registry::default();
        r.register_collector(Box::new(FamilyCollector {
            store,
            config: rx,
            encode,
        }));
        let text = render(&r).unwrap();
        assert!(!text.contains("\nfake_metric"), "{text}");
        let e = Expr::compile("ALERTS").unwrap();
        let mut db = Tsdb::new(Bounds::default());
        db.set_needs(&e.needs());
        db.ingest(1_700_000_000_000, &text);
        let Value::Vector(v) = e.eval(&db, 1_700_000_000_000) else {
            panic!("not a vector");
        };
        assert_eq!(v.len(), 1, "{text}");
        assert_eq!(v[0].labels.get("service"), Some(hostile));
        assert_eq!(v[0].labels.get("alertstate"), Some("firing"));
    }
}
