//! Rule files, alert lifecycle and the engine's schedule, on real rule text and real
//! exposition text.

use std::{path::Path, time::Duration};

use super::{
    alerting::{RuleState, State},
    engine::Engine,
    files::{duration, parse, AlertRule, RuleSet},
    promql::{Labels, Sample},
    tsdb::Bounds,
};

fn rule(yaml_rule: &str) -> AlertRule {
    let text = format!("groups:\n  - name: g\n    rules:\n{yaml_rule}");
    let groups = parse(Path::new("t.yml"), &text).unwrap();
    AlertRule::clone(&groups[0].rules[0])
}

fn sample(pairs: &[(&str, &str)], value: f64) -> Sample {
    Sample {
        labels: Labels::from_pairs(pairs.iter().copied()),
        value,
    }
}

fn refused(yaml: &str) -> String {
    parse(Path::new("f.yml"), yaml).unwrap_err().to_string()
}

#[test]
fn rule_files_parse_as_prometheus_writes_them() {
    let g = parse(
        Path::new("r.yml"),
        "groups:\n  - name: a\n    interval: 1s\n    rules:\n      - alert: High\n        expr: |\n          insite_agent_ticks_total > 5\n        for: 1m30s\n        keep_firing_for: 10s\n        labels:\n          severity: page\n        annotations:\n          summary: 'at {{ $value }}'\n",
    )
    .unwrap();
    assert_eq!(g[0].interval, Some(Duration::from_secs(1)));
    let r = &g[0].rules[0];
    assert_eq!(
        (r.for_, r.keep_firing_for),
        (Duration::from_secs(90), Duration::from_secs(10))
    );
    assert_eq!(r.name, "High");
    assert!(parse(Path::new("e.yml"), "").unwrap().is_empty());
}

#[test]
fn bad_rule_files_name_file_group_rule_and_reason() {
    let head = "groups:\n  - name: g\n    rules:\n";
    for (yaml, says) in [
        (format!("{head}      - record: a:b\n        expr: up\n"), "f.yml: group \"g\": rule \"a:b\": recording rules are not supported"),
        (format!("{head}      - alert: A\n        expr: up\n        for: 5\n"), "rule \"A\": for: \"5\" is not a Prometheus duration"),
        (format!("{head}      - alert: A\n        expr: up\n        labels:\n          bad-name: x\n"), "rule \"A\": labels: \"bad-name\" is not a valid label name"),
        (format!("{head}      - alert: A\n        expr: up\n        annotations:\n          s: '{{{{ .Foo }}}}'\n"), "rule \"A\": annotations.s: template action"),
        (format!("{head}      - alert: A\n        expr: up\n        unknown: 1\n"), "unknown field `unknown`"),
        (format!("{head}      - alert: 'not a name'\n        expr: up\n"), "is not a valid metric name"),
        (format!("{head}      - alert: A\n        expr: 'rate(up[5m]'\n"), "rule \"A\": expr:"),
        ("groups:\n  - name: g\n    rules: []\n  - name: g\n    rules: []\n".into(), "group \"g\": group name repeated"),
        ("groups:\n  - name: g\n    limit: 3\n    rules: []\n".into(), "group \"g\": limit: not supported"),
        ("groups:\n  - name: g\n    interval: 0s\n    rules: []\n".into(), "interval: must be above zero"),
    ] {
        let e = refused(&yaml);
        assert!(e.contains(says), "{yaml}\n=> {e}");
    }
}

#[test]
fn durations_are_prometheus_durations() {
    assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(duration("0"), Ok(Duration::ZERO));
    assert_eq!(duration("0s"), Ok(Duration::ZERO));
    for bad in ["5", "-1s", "1.5", "1x", "", "-5", "0x"] {
        assert!(duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_missing_named_file_is_an_error_and_an_empty_glob_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.yml").display().to_string();
    let e = RuleSet::load(std::slice::from_ref(&missing)).unwrap_err();
    assert!(e.to_string().contains("nope.yml: cannot read"), "{e}");
    let glob = dir.path().join("*.yml").display().to_string();
    assert_eq!(RuleSet::load(&[glob]).unwrap().groups.len(), 0);
}

#[test]
fn for_holds_an_alert_pending_until_it_has_held_long_enough() {
    let r = rule("      - alert: A\n        expr: up > 0\n        for: 1s\n");
    let mut st = RuleState::default();
    let s = [sample(&[("__name__", "up"), ("job", "x")], 1.0)];
    let t = st.step(&r, 0, &s);
    assert_eq!((t[0].from, t[0].to), (State::Inactive, State::Pending));
    assert!(st.step(&r, 750, &s).is_empty());
    let a = st.alerts.values().next().unwrap();
    assert_eq!(a.state, State::Pending);
    assert_eq!(a.labels.get("alertname").map(String::as_str), Some("A"));
    assert!(!a.labels.contains_key("__name__"));
    let t = st.step(&r, 1000, &s);
    assert_eq!((t[0].from, t[0].to), (State::Pending, State::Firing));
    // Pending and gone: dropped, never fired.
    let mut st = RuleState::default();
    st.step(&r, 0, &s);
    let t = st.step(&r, 500, &[]);
    assert_eq!((t[0].from, t[0].to), (State::Pending, State::Inactive));
    assert!(st.alerts.is_empty());
}

#[test]
fn keep_firing_for_holds_a_firing_alert_after_its_condition_stops() {
    let r = rule("      - alert: A\n        expr: up > 0\n        keep_firing_for: 2s\n");
    let mut st = RuleState::default();
    let s = [sample(&[("job", "x")], 1.0)];
    let t = st.step(&r, 0, &s);
    assert_eq!(
        t.iter().map(|t| t.to).collect::<Vec<_>>(),
        [State::Pending, State::Firing]
    );
    assert!(st.step(&r, 1000, &[]).is_empty());
    assert!(st.step(&r, 1999, &[]).is_empty());
    assert_eq!(st.alerts.values().next().unwrap().state, State::Firing);
    let t = st.step(&r, 2000, &[]);
    assert_eq!((t[0].from, t[0].to), (State::Firing, State::Resolved));
    // Without keep_firing_for it resolves at the first evaluation without it.
    let r = rule("      - alert: A\n        expr: up > 0\n");
    let mut st = RuleState::default();
    st.step(&r, 0, &s);
    assert_eq!(st.step(&r, 250, &[])[0].to, State::Resolved);
}

#[test]
fn notifications_are_due_at_fire_every_resend_and_once_at_resolve() {
    let r = rule("      - alert: A\n        expr: up > 0\n        labels:\n          team: '{{ $labels.job }}-db'\n");
    let mut st = RuleState::default();
    let s = [sample(&[("job", "x")], 1.0)];
    st.step(&r, 0, &s);
    let due = st.due(0, 1000);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].labels.get("team").map(String::as_str), Some("x-db"));
    st.step(&r, 500, &s);
    assert!(st.due(500, 1000).is_empty());
    st.step(&r, 1000, &s);
    assert_eq!(st.due(1000, 1000).len(), 1);
    st.step(&r, 1250, &[]);
    let due = st.due(1250, 1000);
    assert_eq!((due.len(), due[0].state), (1, State::Resolved));
    assert!(st.due(1500, 1000).is_empty(), "the resolve is sent once");
    // Resolved alerts are kept for a while, then forgotten.
    st.step(&r, 1250 + super::alerting::RESOLVED_RETENTION_MS - 1, &[]);
    assert_eq!(st.alerts.len(), 1);
    st.step(&r, 1250 + super::alerting::RESOLVED_RETENTION_MS, &[]);
    assert!(st.alerts.is_empty());
}

#[test]
fn ids_are_stable_and_tell_label_sets_apart() {
    use super::alerting::fingerprint;
    let a = [
        ("alertname".to_string(), "A".to_string()),
        ("x".into(), "1".into()),
    ]
    .into();
    let b = [
        ("alertname".to_string(), "A".to_string()),
        ("x".into(), "2".into()),
    ]
    .into();
    assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    assert_ne!(fingerprint(&a), fingerprint(&b));
    assert_eq!(fingerprint(&a).len(), 16);
}

fn engine_with(yaml: &str) -> Engine {
    engine_in(&tempfile::tempdir().unwrap(), yaml)
}

/// Rule state is kept by file, group, position and name: reloads read the same path.
fn engine_in(dir: &tempfile::TempDir, yaml: &str) -> Engine {
    let f = dir.path().join("r.yml");
    std::fs::write(&f, yaml).unwrap();
    let set = RuleSet::load(&[f.display().to_string()]).unwrap();
    let mut e = Engine::new(Bounds::default(), Duration::from_secs(60));
    e.load(set);
    e
}

fn exposition(ticks: u64) -> String {
    format!("# TYPE insite_agent_ticks counter\ninsite_agent_ticks_total {ticks}\n# EOF\n")
}

#[test]
fn the_engine_evaluates_each_group_at_its_interval_and_fires_on_the_window() {
    let mut e = engine_with(
        "groups:\n  - name: every-tick\n    rules:\n      - alert: Ticking\n        expr: rate(insite_agent_ticks_total[1s]) > 1\n  - name: slow\n    interval: 1s\n    rules:\n      - alert: Many\n        expr: insite_agent_ticks_total > 100\n",
    );
    let mut evaluated = 0;
    let mut fired = Vec::new();
    for i in 0..8i64 {
        let o = e.tick(1_000_000 + i * 250, &exposition(i as u64 * 100));
        evaluated += o.evaluated;
        fired.extend(
            o.due
                .iter()
                .map(|d| (i, d.alert.labels["alertname"].clone(), d.first)),
        );
    }
    // every-tick: 8 evaluations; slow: at 0 ms and 1000 ms.
    assert_eq!(evaluated, 8 + 2);
    assert!(
        fired.contains(&(1, "Ticking".to_string(), true)),
        "{fired:?}"
    );
    assert!(fired.contains(&(4, "Many".to_string(), true)), "{fired:?}");
    assert_eq!(e.history().len(), 4);
}

#[test]
fn a_reload_keeps_the_state_of_unchanged_rules() {
    let yaml = "groups:\n  - name: g\n    rules:\n      - alert: Up\n        expr: insite_agent_ticks_total > 0\n        for: 10s\n";
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine_in(&dir, yaml);
    e.tick(0, &exposition(1));
    let before: Vec<_> = e.alerts().map(|(_, a)| a.clone()).collect();
    assert_eq!(before.len(), 1);
    let p = e.persisted().clone();
    let mut again = engine_in(&dir, yaml);
    again.restore(p);
    let after: Vec<_> = again.alerts().map(|(_, a)| a.clone()).collect();
    assert_eq!(before, after);
    // A changed rule set drops what no longer exists.
    let mut other = engine_in(&dir, &yaml.replace("Up", "Down"));
    other.restore(e.persisted().clone());
    assert_eq!(other.alerts().count(), 0);
}

use super::{
    alerting::Extras,
    silence::{Ack, Matcher, Silence},
};

#[test]
fn hysteresis_keeps_a_firing_alert_while_the_clear_condition_holds() {
    let r = rule("      - alert: A\n        expr: up > 0\n");
    let ex = Extras::default();
    let s = [sample(&[("job", "x")], 1.0)];
    let mut st = RuleState::default();
    st.step_with(&r, &ex, 0, &s, &[]);
    // Condition gone, the laxer one still there: firing.
    assert!(st.step_with(&r, &ex, 250, &[], &s).is_empty());
    assert_eq!(st.alerts.values().next().unwrap().state, State::Firing);
    // Both gone: resolved.
    let t = st.step_with(&r, &ex, 500, &[], &[]);
    assert_eq!(t[0].to, State::Resolved);
}

#[test]
fn an_alert_that_flaps_is_held_firing_and_marked() {
    let r = rule("      - alert: A\n        expr: up > 0\n");
    let ex = Extras {
        flap: Some((2, 10_000)),
        ..Extras::default()
    };
    let s = [sample(&[("job", "x")], 1.0)];
    let mut st = RuleState::default();
    let states = |st: &RuleState| st.alerts.values().next().map(|a| (a.state, a.flapping));
    st.step_with(&r, &ex, 0, &s, &[]); // fires: 1 change
    st.step_with(&r, &ex, 1000, &[], &[]); // resolves: 2
    assert_eq!(states(&st), Some((State::Resolved, false)));
    st.step_with(&r, &ex, 2000, &s, &[]); // fires again: 3
    let t = st.step_with(&r, &ex, 3000, &[], &[]); // would resolve: held
    assert!(t.is_empty(), "{t:?}");
    assert_eq!(states(&st), Some((State::Firing, true)));
    let a = st.alerts.values().next().unwrap();
    assert_eq!(
        a.labels_out().get("flapping").map(String::as_str),
        Some("true")
    );
    // Quiet for the window: the changes age out, and it resolves.
    let t = st.step_with(&r, &ex, 13_001, &[], &[]);
    assert_eq!(t[0].to, State::Resolved);
    assert_eq!(states(&st), Some((State::Resolved, false)));
}

#[test]
fn an_unacknowledged_alert_escalates_and_an_acknowledged_one_does_not() {
    let r = rule(
        "      - alert: A\n        expr: up > 0\n        labels:\n          severity: warning\n",
    );
    let ex = Extras {
        escalate_after_ms: vec![1000, 2000],
        ..Extras::default()
    };
    let s = [sample(&[("job", "x")], 1.0)];
    let mut st = RuleState::default();
    st.step_with(&r, &ex, 0, &s, &[]);
    assert_eq!(
        st.due_with(0, 60_000, &ex.escalate_after_ms, |_| None)
            .len(),
        1
    );
    st.step_with(&r, &ex, 500, &s, &[]);
    assert!(st
        .due_with(500, 60_000, &ex.escalate_after_ms, |_| None)
        .is_empty());
    st.step_with(&r, &ex, 1000, &s, &[]);
    let due = st.due_with(1000, 60_000, &ex.escalate_after_ms, |_| None);
    assert_eq!(due.len(), 1, "escalation re-sends before resend_delay");
    let l = due[0].labels_out();
    assert_eq!(
        (l["escalation"].as_str(), l["severity"].as_str()),
        ("1", "critical")
    );
    for a in st.alerts.values_mut() {
        a.ack = Some(Ack {
            by: "root".into(),
            at_ms: 1500,
            comment: "on it".into(),
        });
    }
    st.step_with(&r, &ex, 2000, &s, &[]);
    assert!(st
        .due_with(2000, 60_000, &ex.escalate_after_ms, |_| None)
        .is_empty());
    assert_eq!(st.alerts.values().next().unwrap().escalation, 1);
}

#[test]
fn a_silence_mutes_notifications_until_it_ends_and_acks_find_alerts_by_id_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = engine_in(
        &dir,
        "groups:\n  - name: g\n    rules:\n      - alert: Up\n        expr: insite_agent_ticks_total > 0\n",
    );
    e.silence(
        Silence {
            id: "s1".into(),
            matchers: vec![Matcher::parse("alertname=Up").unwrap()],
            starts_at_ms: 0,
            ends_at_ms: 1000,
            created_by: "root".into(),
            comment: String::new(),
        },
        0,
    )
    .unwrap();
    let o = e.tick(0, &exposition(1));
    assert!(o.due.is_empty());
    let (_, a) = e.alerts().next().unwrap();
    assert_eq!(
        (a.state, a.silenced_by.as_deref()),
        (State::Firing, Some("s1"))
    );
    let id = a.id.clone();
    // The silence over: sent at the next evaluation, as a first notification.
    let o = e.tick(1000, &exposition(2));
    assert_eq!(o.due.len(), 1);
    assert!(e.unsilence("s1") || e.silences(1000).is_empty());
    assert!(e
        .ack(
            &id[..4],
            Ack {
                by: "root".into(),
                at_ms: 1,
                comment: String::new()
            }
        )
        .is_ok());
    assert!(e
        .ack(
            "zzzz",
            Ack {
                by: "root".into(),
                at_ms: 1,
                comment: String::new()
            }
        )
        .is_err());
    assert!(e.alerts().next().unwrap().1.ack.is_some());
    // Silences and acks survive a restart.
    let p = e.persisted().clone();
    let mut again = engine_in(&dir, "groups:\n  - name: g\n    rules:\n      - alert: Up\n        expr: insite_agent_ticks_total > 0\n");
    again.restore(p);
    assert!(again.alerts().next().unwrap().1.ack.is_some());
}

/// A held alert keeps its id without its labels being rebuilt, but its annotations still follow
/// the value; a rule label that reads the value makes each value another alert, as in
/// Prometheus.
#[test]
fn held_alerts_follow_their_value_and_value_labels_make_new_alerts() {
    let r = rule(
        "      - alert: A\n        expr: up\n        annotations:\n          at: '{{ $value }}'\n",
    );
    let mut st = RuleState::default();
    st.step(&r, 0, &[sample(&[("job", "a")], 1.0)]);
    st.step(&r, 250, &[sample(&[("job", "a")], 2.0)]);
    let a: Vec<_> = st.alerts.values().collect();
    assert_eq!(a.len(), 1);
    assert_eq!((a[0].value, a[0].annotations["at"].as_str()), (2.0, "2"));
    assert_eq!(a[0].active_at_ms, 0);

    let r = rule(
        "      - alert: B\n        expr: up\n        labels:\n          level: '{{ $value }}'\n",
    );
    let mut st = RuleState::default();
    st.step(&r, 0, &[sample(&[("job", "a")], 1.0)]);
    st.step(&r, 250, &[sample(&[("job", "a")], 2.0)]);
    let mut levels: Vec<_> = (st.alerts.values())
        .map(|a| (a.labels["level"].as_str(), a.state))
        .collect();
    levels.sort();
    assert_eq!(levels, vec![("1", State::Resolved), ("2", State::Firing)]);
}
