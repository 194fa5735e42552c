//! Alerts end to end: Prometheus rule files evaluated by the real agent on its own window,
//! notifications into a real Alertmanager (Debian's, on loopback) and a recording receiver,
//! the outbox across an upstream outage and an agent restart, and refused rule files.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use insite_e2e::{
    agent_bin,
    servers::{alertmanager::rules_dir, Alertmanager, Recorder},
    Agent, Launch,
};

/// Connects to a closed local port about every 10 ms until dropped: each is refused.
struct Refusals {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Refusals {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn rfc3339_ms(s: &str) -> i64 {
    humantime::parse_rfc3339(s)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn alerts_config(state: &Path, rules: &[PathBuf], upstreams: &[String]) -> String {
    let list = |v: Vec<String>| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[alerts]\nstate_dir = {:?}\nrule_files = [{}]\nalertmanagers = [{}]\nresend_delay = \"2s\"\n",
        state.display().to_string(),
        list(rules.iter().map(|p| p.display().to_string()).collect()),
        list(upstreams.to_vec()),
    )
}

/// The alerts named `name` in what the recorder got, in order.
fn notifications(rec: &Recorder, name: &str) -> Vec<serde_json::Value> {
    rec.requests()
        .iter()
        .filter(|r| r.path == "/api/v2/alerts")
        .flat_map(|r| {
            let v: Vec<serde_json::Value> = serde_json::from_str(&r.body).unwrap();
            v.into_iter()
                .filter(|a| a["labels"]["alertname"] == name)
                .collect::<Vec<_>>()
        })
        .collect()
}

mod people;
mod rules;

#[test]
fn fires_in_alertmanager_within_a_second_and_resolves_there() {
    insite_e2e::require_root();
    let am = Alertmanager::start().unwrap();
    let rec = Recorder::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let extra = alerts_config(
        state.path(),
        &[rules_dir().join("connect-refused.yml")],
        &[am.url(), rec.url()],
    );
    let agent = Agent::launch(Launch {
        extra: &extra,
        probes: &["net", "alerts"],
        ..Launch::default()
    });
    assert_eq!(agent.probe("alerts")["attach"], "1 rules");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        notifications(&rec, "ConnectRefused").is_empty(),
        "fired without a workload"
    );

    let workload = Refusals::start();
    let started = Instant::now();
    let first = loop {
        let n = notifications(&rec, "ConnectRefused");
        if let Some(a) = n.into_iter().next() {
            break (a, now_ms());
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no notification: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let (alert, received_ms) = first;
    let active_ms = rfc3339_ms(alert["startsAt"].as_str().unwrap());
    // startsAt is when the condition first held in the agent's window.
    let detection = received_ms - active_ms;
    assert!(
        detection < 1000,
        "the notification took {detection} ms after the condition held"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "condition took {:?}",
        started.elapsed()
    );
    assert_eq!(alert["labels"]["severity"], "page");
    assert_eq!(alert["labels"]["reason"], "refused");
    assert!(alert["annotations"]["summary"]
        .as_str()
        .unwrap()
        .ends_with("refused connects/s"));
    assert!(alert["generatorURL"]
        .as_str()
        .unwrap()
        .starts_with(&format!("http://127.0.0.1:{}/alerts?id=", agent.port)));

    // The real Alertmanager has it, with the same labels and annotations.
    let deadline = Instant::now() + Duration::from_secs(5);
    let in_am = loop {
        let a = am.alerts().unwrap();
        if let Some(x) = a
            .into_iter()
            .find(|a| a["labels"]["alertname"] == "ConnectRefused")
        {
            break x;
        }
        assert!(
            Instant::now() < deadline,
            "not in Alertmanager: {}",
            am.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(in_am["labels"]["severity"], "page");
    assert_eq!(in_am["status"]["state"], "active");
    assert!(in_am["annotations"]["description"]
        .as_str()
        .unwrap()
        .starts_with("connects refused (refused) at "));

    // The CLI and the metrics show it firing.
    let out = agent.cli(&["alerts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("firing") && text.contains("ConnectRefused"),
        "{text}"
    );
    // A scrape may be served the rendering of up to 100 ms ago.
    let m = insite_e2e::Metrics::wait_within(&agent, Duration::from_secs(2), |m| {
        m.value("ALERTS", &[("alertname", "ConnectRefused")])
            .is_some()
    });
    assert_eq!(
        m.value(
            "ALERTS",
            &[("alertname", "ConnectRefused"), ("alertstate", "firing")]
        ),
        Some(1.0),
        "{}\n{}",
        m.0.lines()
            .filter(|l| l.contains("ALERTS"))
            .collect::<Vec<_>>()
            .join("\n"),
        agent.data(r#"{"cmd":"alerts_history"}"#)
    );
    assert!(
        m.value("ALERTS_FOR_STATE", &[("alertname", "ConnectRefused")])
            .unwrap()
            > 0.0
    );

    // Workload gone: resolved in the agent, and gone from Alertmanager's active alerts.
    drop(workload);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = am.alerts().unwrap();
        if !a
            .iter()
            .any(|a| a["labels"]["alertname"] == "ConnectRefused")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still active in Alertmanager: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let n = notifications(&rec, "ConnectRefused");
    let last = n.last().unwrap();
    assert!(
        rfc3339_ms(last["endsAt"].as_str().unwrap()) <= now_ms(),
        "last notice is not a resolve: {last}"
    );
    let history = agent.data(r#"{"cmd":"alerts_history"}"#);
    let changes: Vec<String> = history["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}->{}",
                t["from"].as_str().unwrap(),
                t["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        changes,
        ["inactive->pending", "pending->firing", "firing->resolved"]
    );
    let m = agent.scrape();
    assert!(
        m.value(
            "insite_alerts_notifications_total",
            &[
                ("receiver", &format!("alertmanager {}", am.url())),
                ("result", "sent")
            ]
        )
        .unwrap()
            >= 2.0
    );
    assert!(
        m.value("insite_alert_detection_seconds_count", &[])
            .unwrap()
            >= 2.0
    );
}

/// Upstream down while an alert fires and resolves, the agent restarted in between: once the
/// receivers are back, every notification arrives, in order.
#[test]
fn nothing_is_lost_while_the_upstream_is_down_across_a_restart() {
    insite_e2e::require_root();
    let mut am = Alertmanager::start().unwrap();
    let mut rec = Recorder::start().unwrap();
    am.pause();
    rec.pause();
    let state = tempfile::tempdir().unwrap();
    let extra = alerts_config(
        state.path(),
        &[rules_dir().join("connect-refused.yml")],
        &[am.url(), rec.url()],
    );
    let launch = Launch {
        extra: &extra,
        probes: &["net", "alerts"],
        ..Launch::default()
    };
    let mut agent = Agent::launch(launch);
    let workload = Refusals::start();
    let m = insite_e2e::Metrics::wait_within(&agent, Duration::from_secs(10), |m| {
        m.value(
            "ALERTS",
            &[("alertname", "ConnectRefused"), ("alertstate", "firing")],
        ) == Some(1.0)
    });
    assert!(
        m.value("ALERTS", &[("alertname", "ConnectRefused")])
            .is_some(),
        "never fired"
    );
    // Resent at least once while firing (resend_delay 2s).
    std::thread::sleep(Duration::from_secs(3));
    drop(workload);
    let m = insite_e2e::Metrics::wait_within(&agent, Duration::from_secs(15), |m| {
        m.value("ALERTS", &[("alertname", "ConnectRefused")])
            .is_none()
    });
    assert!(
        m.value("ALERTS", &[("alertname", "ConnectRefused")])
            .is_none(),
        "never resolved"
    );
    std::thread::sleep(Duration::from_millis(500));
    let queued = agent.scrape().value("insite_outbox_records", &[]).unwrap();
    assert!(
        queued >= 6.0,
        "expected fire, resend, resolve for each of 2 receivers: {queued}"
    );
    agent.stop();
    drop(agent);

    // A new agent on the same state: it neither re-pages nor forgets what is queued.
    let agent = Agent::launch(launch);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        agent.scrape().value("insite_outbox_records", &[]),
        Some(queued)
    );
    am.resume().unwrap();
    rec.resume().unwrap();
    let m = insite_e2e::Metrics::wait_within(&agent, Duration::from_secs(60), |m| {
        m.value("insite_outbox_records", &[]) == Some(0.0)
    });
    assert_eq!(
        m.value("insite_outbox_records", &[]),
        Some(0.0),
        "{}",
        agent.log()
    );
    let n = notifications(&rec, "ConnectRefused");
    assert_eq!(n.len() as f64, queued / 2.0, "{n:?}");
    // In order: the firing ones (endsAt after their send), then the one resolve, last.
    let ends: Vec<i64> = n
        .iter()
        .map(|a| rfc3339_ms(a["endsAt"].as_str().unwrap()))
        .collect();
    let starts: Vec<&str> = n.iter().map(|a| a["startsAt"].as_str().unwrap()).collect();
    assert!(
        starts.iter().all(|s| *s == starts[0]),
        "one alert: {starts:?}"
    );
    let resolve = *ends.last().unwrap();
    assert!(
        ends[..ends.len() - 1].iter().all(|e| *e > resolve),
        "the resolve is not last: {ends:?}"
    );
    // Alertmanager got every one too, the resolve included.
    let (_, metrics) =
        insite_e2e::servers::alertmanager::http(am.port, "GET", "/metrics", "").unwrap();
    let received = |status: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("alertmanager_alerts_received_total")
                    && l.contains(&format!("status=\"{status}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        received("firing") + received("resolved"),
        queued / 2.0,
        "{metrics}"
    );
    assert!(received("resolved") >= 1.0);
}

/// Slow queries against a real PostgreSQL and slow syscalls: each rule fires in a real
/// Alertmanager while its workload runs, and resolves there after it stops.
#[test]
fn slow_queries_and_slow_syscalls_fire_and_resolve_in_alertmanager() {
    use insite_e2e::servers::{Postgres, Via};
    insite_e2e::require_root();
    let pg = Postgres::start().unwrap();
    let am = Alertmanager::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let rules = state.path().join("rules.yml");
    std::fs::write(
        &rules,
        r#"groups:
  - name: slow
    rules:
      - alert: SlowQueries
        expr: histogram_quantile(0.9, sum by (le, system) (rate(insite_db_query_duration_seconds_bucket{system="postgresql"}[3s]))) > 0.1
      - alert: SlowSleeps
        expr: histogram_quantile(0.9, sum by (le) (rate(insite_syscall_duration_seconds_bucket{syscall="nanosleep"}[3s]))) > 0.05
"#,
    )
    .unwrap();
    let extra = format!(
        "[syscalls]\nmode = \"full\"\nsyscalls = [\"nanosleep\"]\n\n{}",
        alerts_config(state.path(), &[rules], &[am.url()])
    );
    let agent = Agent::launch(Launch {
        extra: &extra,
        probes: &["syscalls", "db", "alerts"],
        ..Launch::default()
    });
    let active = |name: &str| {
        am.alerts()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == name)
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(!active("SlowQueries") && !active("SlowSleeps"));

    let sql = "SELECT pg_sleep(0.2);\n".repeat(30);
    let queries = std::thread::spawn(move || pg.psql(Via::Tcp, &sql).unwrap());
    let sleeps = std::thread::spawn(|| insite_e2e::nanosleep_calls(60, 100));
    let started = Instant::now();
    while !(active("SlowQueries") && active("SlowSleeps")) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "queries {} sleeps {}: {}",
            active("SlowQueries"),
            active("SlowSleeps"),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = queries.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    sleeps.join().unwrap();
    let stopped = Instant::now();
    while active("SlowQueries") || active("SlowSleeps") {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still active after the workload"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
