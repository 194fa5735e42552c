//! Edges as the agent reports them: loopback connects, refusals, bytes and services; the
//! dependency map; ignored ports and networks; a disabled probe.

use super::*;

#[test]
fn loopback_connects_refusals_bytes_and_services() {
    let agent = Agent::start(NET_ONLY);
    let server = echo_server("127.0.0.1:0", 3000);
    let server6 = echo_server("[::1]:0", 10);
    let refused = closed_port("127.0.0.1");
    let (unit, procs, _cg) = service_cgroup("net");
    const K: u64 = 25;
    const SENT: u64 = 700;
    python(
        &format!(
            r#"
import socket
for _ in range({K}):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.sendall(b"q" * {SENT})
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
for _ in range(4):
    try:
        socket.create_connection(("127.0.0.1", {refused}))
        raise SystemExit("connected to a closed port")
    except ConnectionRefusedError:
        pass
for _ in range(3):
    s = socket.create_connection(("::1", {port6}))
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    s.close()
"#,
            port = server.port(),
            port6 = server6.port()
        ),
        Some(&procs),
    );
    let dest = server.to_string();
    let out: Vec<(&str, &str)> =
        [labels("outbound", &dest), vec![("service", unit.as_str())]].concat();
    let refused_dest = format!("127.0.0.1:{refused}");
    let v6 = server6.to_string();
    let comm = my_comm();
    let inbound = [labels("inbound", &dest), vec![("service", comm.as_str())]].concat();
    // The agent folds the kernel's counts every 250 ms: wait for all of them.
    let m = scrape_until(&agent, |m| {
        m.value_or_zero("insite_tcp_closed_connections_total", &out) >= K as f64
            && m.value_or_zero("insite_tcp_connections_total", &inbound) >= K as f64
            && m.value_or_zero(
                "insite_tcp_connect_failures_total",
                &[
                    ("destination", refused_dest.as_str()),
                    ("reason", "refused"),
                ],
            ) >= 4.0
            && m.value_or_zero("insite_tcp_connections_total", &labels("outbound", &v6)) >= 3.0
    });
    // Exactly K handshakes from the service's cgroup to that destination, all timed.
    assert_eq!(
        m.value("insite_tcp_connections_total", &out),
        Some(K as f64),
        "{}",
        m.0
    );
    assert_eq!(
        m.value("insite_tcp_connect_duration_seconds_count", &out),
        Some(K as f64)
    );
    // Loopback handshakes take microseconds: all of them under 2^27 ns (134 ms).
    let fast = [out.clone(), vec![("le", "0.134217728")]].concat();
    assert_eq!(
        m.value("insite_tcp_connect_duration_seconds_bucket", &fast),
        Some(K as f64)
    );
    // Payload bytes, plus one sequence number each for SYN and FIN (the kernel's
    // bytes_acked/bytes_received count them, as tcp_info does).
    let sent = m.value_or_zero("insite_tcp_sent_bytes_total", &out);
    let recv = m.value_or_zero("insite_tcp_received_bytes_total", &out);
    assert!(
        (K * SENT) as f64 <= sent && sent <= (K * (SENT + 2)) as f64,
        "sent {sent}"
    );
    assert!(
        (K * 3000) as f64 <= recv && recv <= (K * 3002) as f64,
        "received {recv}"
    );
    assert!(m.value_or_zero("insite_tcp_rtt_seconds_count", &out) >= K as f64);
    assert_eq!(m.value("insite_tcp_active_connections", &out), Some(0.0));

    // The server side: K accepts on that local address, owned by this test process (found
    // through its listening socket: the test runs in the root cgroup).
    assert_eq!(
        m.value("insite_tcp_connections_total", &inbound),
        Some(K as f64),
        "{}",
        m.0
    );

    assert_eq!(
        m.value(
            "insite_tcp_connect_failures_total",
            &[
                ("destination", refused_dest.as_str()),
                ("service", unit.as_str()),
                ("reason", "refused")
            ]
        ),
        Some(4.0)
    );
    assert_eq!(
        m.value("insite_tcp_connections_total", &labels("outbound", &v6)),
        Some(3.0)
    );
    assert!(m.value_or_zero("insite_tcp_resets_total", &[("direction", "received")]) >= 4.0);

    // The same through the control socket and the CLI.
    let v = agent.data(r#"{"cmd":"connections","window":"60s"}"#);
    let edges = v["edges"].as_array().unwrap();
    let e = edges
        .iter()
        .find(|e| e["direction"] == "outbound" && e["destination"] == dest.as_str())
        .unwrap_or_else(|| panic!("no edge to {dest}: {v:#}"));
    assert_eq!(e["service"], unit.as_str());
    assert_eq!(e["connections"], K);
    // The process behind the service: the python client, by comm and pid.
    let procs = e["processes"].as_array().unwrap();
    assert!(
        procs
            .iter()
            .any(|p| p.as_str().is_some_and(|p| p.starts_with("python3["))),
        "{e:#}"
    );
    assert!(e["connect_p99_ms"].as_f64().unwrap() < 134.0);
    let r = edges
        .iter()
        .find(|e| e["destination"] == refused_dest.as_str())
        .unwrap();
    assert_eq!(r["failures_by_reason"]["refused"], 4);
    let text = agent.cli(&["connections", "--window", "30s"]);
    assert!(text.status.success(), "{text:?}");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&unit) && text.contains(&dest), "{text}");
    assert!(text.contains("refused 4"), "{text}");
}

#[test]
fn dependency_map_renders_with_graphviz() {
    let agent = Agent::start(NET_ONLY);
    let server = echo_server("127.0.0.1:0", 10);
    let refused = closed_port("127.0.0.1");
    let (unit, procs, _cg) = service_cgroup("map");
    python(
        &format!(
            r#"
import socket
for _ in range(3):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.shutdown(socket.SHUT_WR)
    s.recv(100)
    s.close()
try:
    socket.create_connection(("127.0.0.1", {refused}))
except ConnectionRefusedError:
    pass
"#,
            port = server.port()
        ),
        Some(&procs),
    );
    let dest = server.to_string();
    let refused_dest = format!("127.0.0.1:{refused}");
    scrape_until(&agent, |m| {
        m.value_or_zero("insite_tcp_connections_total", &labels("outbound", &dest)) >= 3.0
            && m.value_or_zero("insite_tcp_connections_total", &labels("inbound", &dest)) >= 3.0
            && m.value_or_zero(
                "insite_tcp_connect_failures_total",
                &[("destination", refused_dest.as_str())],
            ) >= 1.0
    });
    let out = agent.cli(&["map", "--dot"]);
    assert!(out.status.success(), "{out:?}");
    let dot = String::from_utf8(out.stdout).unwrap();
    let edge = format!("\"service:{unit}\" -> \"endpoint:{dest}\"");
    assert!(dot.contains(&edge), "missing {edge} in\n{dot}");
    let failed = format!("\"service:{unit}\" -> \"endpoint:127.0.0.1:{refused}\"");
    assert!(dot.contains(&failed), "missing {failed} in\n{dot}");
    assert!(dot.contains("\"client:127.0.0.1\" -> \"endpoint:"), "{dot}");

    // Graphviz parses it and draws every edge.
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("dot (Debian package graphviz; `cargo xtask setup --tests` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dot.as_bytes())
        .unwrap();
    let svg = child.wait_with_output().unwrap();
    assert!(
        svg.status.success(),
        "{}",
        String::from_utf8_lossy(&svg.stderr)
    );
    let svg = String::from_utf8_lossy(&svg.stdout);
    assert!(svg.contains("<svg"), "{svg}");
    // Graphviz writes '-' in SVG text as an entity.
    assert!(
        svg.contains(&unit.replace('-', "&#45;")),
        "the service is not drawn: {svg}"
    );
    let arrows = dot.matches(" -> ").count();
    assert_eq!(svg.matches("class=\"edge\"").count(), arrows);

    // JSON has the same graph.
    let out = agent.cli(&["map", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["edges"].as_array().unwrap().len(), arrows);
}

#[test]
fn ignored_ports_and_networks_are_not_counted() {
    let server = echo_server("127.0.0.1:0", 1);
    let other = echo_server("127.0.0.1:0", 1);
    let server6 = echo_server("[::1]:0", 1);
    let agent = Agent::start(&format!(
        "{NET_ONLY}\n[net]\nignore_ports = [{}]\nignore_cidrs = [\"::1/128\"]\n",
        server.port()
    ));
    for addr in [server, other, server6] {
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let _ = s.read_to_end(&mut Vec::new());
        }
    }
    let m = scrape_until(&agent, |m| {
        m.value_or_zero(
            "insite_tcp_connections_total",
            &labels("outbound", &other.to_string()),
        ) >= 2.0
            && m.value_or_zero("insite_net_events_ignored_total", &[]) >= 4.0
    });
    assert_eq!(
        m.value(
            "insite_tcp_connections_total",
            &labels("outbound", &other.to_string())
        ),
        Some(2.0)
    );
    assert!(
        !m.0.contains(&format!("destination=\"{server}\"")),
        "{}",
        m.0
    );
    assert!(
        !m.0.contains(&format!("destination=\"{server6}\"")),
        "{}",
        m.0
    );
    assert!(m.value_or_zero("insite_net_events_ignored_total", &[]) >= 4.0);
}

#[test]
fn disabled_network_probe_shows_and_the_rest_runs() {
    let agent = Agent::start("[net]\nenabled = false\n");
    assert_eq!(agent.probe("net")["state"], "disabled");
    assert_eq!(agent.probe("syscalls")["state"], "attached");
    let m = agent.scrape();
    assert_eq!(
        m.value(
            "insite_probe_attached",
            &[("probe", "net"), ("state", "disabled")]
        ),
        Some(0.0)
    );
    let r = agent.request(r#"{"cmd":"connections"}"#).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("disabled"), "{r}");
}
