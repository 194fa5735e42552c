//! What reaches people and what they say back: signed, grouped webhooks; acknowledgements,
//! silences and escalation through the CLI.

use super::*;

/// Webhooks: signed with HMAC-SHA256 over timestamp and body; a tampered body or a stale
/// timestamp fails the receiver's check. Alerts due together with the same `group_by` labels
/// arrive as one notification.
#[test]
fn webhook_notifications_are_signed_and_grouped() {
    use insite_e2e::servers::alertmanager::verify_signature;
    insite_e2e::require_root();
    let rec = Recorder::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let secret = b"4f1c9e0b7d2a6e83c5b19f04d7a2e6c1";
    let secret_file = state.path().join("secret");
    std::fs::write(&secret_file, [&secret[..], b"\n"].concat()).unwrap();
    let rules = state.path().join("rules.yml");
    // Every attached probe family: one alert each, one alertname; and one more alertname.
    std::fs::write(
        &rules,
        "groups:\n  - name: w\n    rules:\n      - alert: Attached\n        expr: insite_probe_attached{probe=~\"host|alerts\"} > 0\n      - alert: Ticking\n        expr: insite_agent_ticks_total > 0\n",
    )
    .unwrap();
    let extra = format!(
        "{}\n[[alerts.webhooks]]\nurl = {:?}\nsecret_file = {:?}\n",
        alerts_config(state.path(), &[rules], &[]),
        format!("{}/hook", rec.url()),
        secret_file.display().to_string()
    );
    let agent = Agent::launch(Launch {
        extra: &extra,
        probes: &["host", "alerts"],
        ..Launch::default()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.requests().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "{} requests: {}",
            rec.requests().len(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let reqs = rec.requests();
    let now = now_ms() / 1000;
    for r in &reqs {
        assert_eq!(r.path, "/hook");
        verify_signature(secret, r, now, Duration::from_secs(300)).unwrap();
        // One byte changed: refused.
        let mut tampered = r.clone();
        tampered.body = tampered.body.replacen("firing", "firinG", 1);
        assert_eq!(
            verify_signature(secret, &tampered, now, Duration::from_secs(300)),
            Err("signature does not match".into())
        );
        // Replayed ten minutes later: refused.
        assert!(
            verify_signature(secret, r, now + 600, Duration::from_secs(300))
                .unwrap_err()
                .contains("stale")
        );
        // Another secret: refused.
        assert!(verify_signature(
            b"another secret, just as long",
            r,
            now,
            Duration::from_secs(300)
        )
        .is_err());
    }
    // Grouped by alertname: both Attached alerts in one notification, Ticking in another.
    let bodies: Vec<serde_json::Value> = reqs
        .iter()
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect();
    let attached = bodies
        .iter()
        .find(|b| b["groupLabels"]["alertname"] == "Attached")
        .unwrap();
    assert_eq!(
        attached["alerts"].as_array().unwrap().len(),
        2,
        "{attached}"
    );
    assert_eq!(attached["status"], "firing");
    assert_eq!(attached["commonLabels"]["alertname"], "Attached");
    assert!(attached["commonLabels"].get("probe").is_none());
    let ticking = bodies
        .iter()
        .find(|b| b["groupLabels"]["alertname"] == "Ticking")
        .unwrap();
    assert_eq!(ticking["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(ticking["version"], "4");
}

/// Acknowledgements, silences and escalation through the CLI of a real agent: the silenced
/// alert is not notified until the silence ends; the acknowledged one does not escalate; the
/// other escalates with its step and a raised severity.
#[test]
fn silences_mute_acks_stop_escalation_and_the_rest_escalates() {
    insite_e2e::require_root();
    let rec = Recorder::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let secret_file = state.path().join("secret");
    std::fs::write(&secret_file, "a secret of thirty-two bytes....").unwrap();
    let rules = state.path().join("rules.yml");
    std::fs::write(
        &rules,
        "groups:\n  - name: s\n    rules:\n      - alert: Escalates\n        expr: insite_agent_ticks_total > 0\n        labels:\n          severity: warning\n      - alert: Acked\n        expr: insite_agent_uptime_seconds > 0\n        labels:\n          severity: warning\n      - alert: Silenced\n        expr: insite_agent_uptime_seconds > 3\n",
    )
    .unwrap();
    let extra = format!(
        "{}\n[[alerts.webhooks]]\nurl = {:?}\nsecret_file = {:?}\n\n[alerts.rule.Escalates]\nescalate_after = [\"4s\"]\n\n[alerts.rule.Acked]\nescalate_after = [\"4s\"]\n",
        alerts_config(state.path(), &[rules], &[]),
        rec.url(),
        secret_file.display().to_string()
    );
    let agent = Agent::launch(Launch {
        extra: &extra,
        probes: &["alerts"],
        ..Launch::default()
    });
    let out = agent.cli(&[
        "alerts",
        "silence",
        "alertname=Silenced",
        "--for",
        "1h",
        "--comment",
        "maintenance",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let silence = String::from_utf8_lossy(&out.stdout)
        .trim()
        .strip_prefix("silenced ")
        .unwrap()
        .to_string();
    let acked = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let v = agent.data(r#"{"cmd":"alerts"}"#);
            if let Some(a) = v["alerts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["labels"]["alertname"] == "Acked")
            {
                break a["id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let out = agent.cli(&["alerts", "ack", &acked[..6], "--comment", "looking"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_secs(6));

    let alerts_in = |name: &str| -> Vec<serde_json::Value> {
        rec.requests()
            .iter()
            .flat_map(|r| {
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                v["alerts"].as_array().unwrap().clone()
            })
            .filter(|a| a["labels"]["alertname"] == name)
            .collect()
    };
    let esc = alerts_in("Escalates");
    assert!(esc.len() >= 2, "{esc:?}");
    let last = esc.last().unwrap();
    assert_eq!(
        (
            last["labels"]["escalation"].as_str(),
            last["labels"]["severity"].as_str()
        ),
        (Some("1"), Some("critical")),
        "{esc:?}"
    );
    assert!(
        alerts_in("Acked")
            .iter()
            .all(|a| a["labels"].get("escalation").is_none()),
        "{:?}",
        alerts_in("Acked")
    );
    assert!(
        alerts_in("Silenced").is_empty(),
        "{:?}",
        alerts_in("Silenced")
    );
    let v = agent.data(r#"{"cmd":"alerts"}"#);
    let find = |name: &str| {
        v["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("Silenced")["silenced_by"], silence.as_str());
    assert_eq!(find("Silenced")["state"], "firing");
    assert_eq!(find("Acked")["ack"]["by"], "root");
    assert_eq!(find("Acked")["ack"]["comment"], "looking");
    assert_eq!(v["silences"][0]["comment"], "maintenance");
    let text = String::from_utf8_lossy(&agent.cli(&["alerts"]).stdout).to_string();
    assert!(
        text.contains("acknowledged by root") && text.contains(&format!("silenced by {silence}")),
        "{text}"
    );

    // The silence ended: the alert goes out at its next evaluation.
    let out = agent.cli(&["alerts", "unsilence", &silence]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while alerts_in("Silenced").is_empty() {
        assert!(Instant::now() < deadline, "never sent after the silence");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Bad requests: clear errors, nothing changed.
    let out = agent.cli(&["alerts", "ack", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pending or firing alert"));
    let out = agent.cli(&["alerts", "silence", "not a matcher"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected name=value"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
