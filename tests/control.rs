//! Control socket and Prometheus endpoint: access control, bad input, formats.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    process::Command,
    time::Duration,
};

use insite_e2e::{run_as_nobody, world_executable_copy, Agent};

#[test]
fn status_lists_the_probes() {
    let agent = Agent::start("");
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probes = v["probes"].as_array().unwrap();
    let sys = probes.iter().find(|p| p["name"] == "syscalls").unwrap();
    assert_eq!(sys["state"], "attached", "{v:#}");
    assert_eq!(sys["attach"], "tp_btf");
    assert_eq!(v["pid"], agent.pid());
    assert!(v["config_source"]
        .as_str()
        .unwrap()
        .ends_with("config.toml"));
    let text = agent.cli(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("syscalls   attached"));

    let m = agent.scrape();
    assert_eq!(
        m.value("insite_probe_attached", &[("probe", "syscalls")]),
        Some(1.0)
    );
    assert_eq!(
        m.value("insite_probe_attached", &[("probe", "host")]),
        Some(1.0)
    );
}

#[test]
fn missed_runs_are_shown_for_every_attached_program() {
    let agent = Agent::start("");
    let expected: [(&str, &[&str]); 3] = [
        (
            "syscalls",
            &["isa_btf_enter", "isa_btf_exit", "isa_btf_switch"],
        ),
        (
            "net",
            &[
                "isa_net_destroy",
                "isa_net_reset_received",
                "isa_net_reset_sent",
                "isa_net_retransmit",
                "isa_net_state",
                "isa_net_walk",
            ],
        ),
        ("db", &["isa_db_recv", "isa_db_send"]),
    ];
    // Read first by status, then scraped: counters only grow in between.
    let status = agent.data(r#"{"cmd":"status"}"#);
    let m = agent.scrape();
    for (probe, programs) in expected {
        let p = status["probes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == probe))
            .unwrap_or_else(|| panic!("no probe {probe}: {status:#}"));
        let missed = p["missed_runs"].as_object().expect("missed_runs");
        let mut names: Vec<&str> = missed.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, programs, "{probe}: {p:#}");
        for prog in programs {
            let exported = m
                .value(
                    "insite_probe_missed_runs_total",
                    &[("probe", probe), ("program", prog)],
                )
                .unwrap_or_else(|| panic!("no series for {probe}/{prog}:\n{}", m.0));
            let shown = missed[*prog].as_u64().expect("a count") as f64;
            assert!(shown <= exported, "{probe}/{prog}: {shown} > {exported}");
        }
    }
    let text = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.matches("missed runs").count(), 3, "{text}");
}

#[test]
fn disabled_probe_shows_and_the_rest_keeps_running() {
    let agent = Agent::start("[syscalls]\nenabled = false\n");
    let sys = agent.probe("syscalls");
    assert_eq!(sys["state"], "disabled");
    let m = agent.scrape();
    assert_eq!(
        m.value("insite_probe_attached", &[("probe", "syscalls")]),
        Some(0.0)
    );
    assert!(
        m.value("insite_host_memory_bytes", &[("kind", "total")])
            .unwrap()
            > 0.0
    );
    let r = agent.request(r#"{"cmd":"syscalls"}"#).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("disabled"), "{r}");
}

#[test]
fn promtool_accepts_the_scrape_and_openmetrics_is_negotiated() {
    let agent = Agent::start("");
    // Something for every network family: a connection that closes and one that is refused.
    drop(std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(std::net::TcpStream::connect(closed).is_err());
    agent.wait_ticks(2);
    let (ctype, text) = agent.scrape_with(false).unwrap();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    for name in [
        "insite_syscall_duration_seconds_bucket",
        "insite_syscall_errors_total",
        "insite_host_cpu_seconds_total",
        "insite_host_memory_bytes",
        "insite_host_load",
        "insite_host_pressure_stall_seconds_total",
        "insite_host_network_receive_bytes_total",
        "insite_agent_ticks_total",
        "insite_agent_tick_duration_seconds_bucket",
        "insite_ringbuf_drops_total",
        "insite_probe_attached",
        "insite_tcp_connect_duration_seconds_bucket",
        "insite_tcp_connect_failures_total",
        "insite_tcp_connections_total",
        "insite_tcp_active_connections",
        "insite_tcp_rtt_seconds_bucket",
        "insite_tcp_sent_bytes_total",
        "insite_tcp_received_bytes_total",
        "insite_tcp_retransmits_total",
        "insite_tcp_series_folded",
        "insite_host_tcp_listen_overflows_total",
    ] {
        assert!(
            text.contains(&format!("\n{name}")),
            "{name} missing from scrape"
        );
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (ctype, om) = agent.scrape_with(true).unwrap();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(om.trim_end().ends_with("# EOF"));
    assert!(om.contains("# TYPE insite_syscall_duration_seconds histogram"));
    assert!(om.contains("# UNIT insite_syscall_duration_seconds seconds"));
}

#[test]
fn root_only_socket_refuses_nobody() {
    let agent = Agent::start("");
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let bin = world_executable_copy(agent.dir.path());
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = agent.socket.to_str().unwrap().to_string();
    let out = run_as_nobody(&bin, &["status", "--control-socket", &sock]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ermission denied"),
        "{out:?}"
    );

    // Even if the file mode is loosened by hand, the peer credentials check refuses.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_as_nobody(&bin, &["status", "--control-socket", &sock]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 65534"), "{err}");
    // The agent is still serving root.
    assert_eq!(agent.data(r#"{"cmd":"status"}"#)["pid"], agent.pid());
}

#[test]
fn configured_group_may_use_the_socket() {
    let agent = Agent::start_with("", "group = \"nogroup\"\n");
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(meta.gid(), 65534);
    let bin = world_executable_copy(agent.dir.path());
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = run_as_nobody(
        &bin,
        &[
            "status",
            "--json",
            "--control-socket",
            agent.socket.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn bad_requests_get_errors_and_the_agent_keeps_serving() {
    let agent = Agent::start("");
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"\xff\xfe garbage\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut replies = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        replies.push(serde_json::from_str::<serde_json::Value>(l.trim_end()).unwrap());
    }
    assert_eq!(replies[0]["ok"], false);
    assert_eq!(replies[1]["ok"], false);
    assert!(replies[1]["error"].as_str().unwrap().contains("nope"));
    assert_eq!(replies[2]["ok"], true);

    // A line over the cap is refused and the connection closed.
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b'a'; 200_000]);
    let mut l = String::new();
    BufReader::new(&s).read_line(&mut l).unwrap();
    assert!(l.contains("too large"), "{l}");

    // Half a request then silence: no crash, other clients unaffected.
    let mut idle = UnixStream::connect(&agent.socket).unwrap();
    idle.write_all(b"{\"cmd\":").unwrap();
    assert_eq!(agent.data(r#"{"cmd":"status"}"#)["pid"], agent.pid());
}
