//! Start-up, reload and shutdown of the real agent.

use std::{process::Command, time::Duration};

use insite_e2e::{agent_bin, config_text, loaded_program_names, require_root, Agent};

fn run_with_config(text: &str) -> std::process::Output {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap()
}

#[test]
fn bad_config_fails_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    for (extra, key, line) in [
        ("[syscalls]\ntop_n = 0\n", "syscalls.top_n", ":9:"),
        (
            "[agent]\ntick_interval = \"10ms\"\n",
            "agent.tick_interval",
            ":9:",
        ),
        (
            "[syscalls]\nslow_treshold = \"1ms\"\n",
            "slow_treshold",
            ":9",
        ),
        (
            "[syscalls]\nsyscalls = [\"getppid\", \"bogus\"]\n",
            "syscalls.syscalls",
            ":9:",
        ),
    ] {
        let text = config_text(1, &sock, "", extra);
        let out = run_with_config(&text);
        assert!(!out.status.success(), "{extra:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{extra:?}: {err}");
        assert!(
            err.contains(line),
            "{extra:?} should name line {line}: {err}"
        );
        assert!(!sock.exists());
    }
    let out = Command::new(agent_bin())
        .args(["run", "--config", "/nonexistent/insite.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/insite.toml"));
}

#[test]
fn bad_reload_keeps_serving_and_good_reload_applies() {
    let agent = Agent::start("[syscalls]\nmode = \"full\"\nslow_threshold = \"10ms\"\n");
    let text = std::fs::read_to_string(&agent.config_path).unwrap();

    std::fs::write(
        &agent.config_path,
        format!("{text}\n[syscalls]\nbroken = true\n"),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    let v = agent.data(r#"{"cmd":"syscalls"}"#);
    assert_eq!(v["slow_threshold_ms"], 10.0);
    assert!(agent.log().contains("config rejected"), "{}", agent.log());
    assert!(
        agent
            .scrape()
            .value("insite_probe_attached", &[("probe", "syscalls")])
            == Some(1.0)
    );

    let good = text.replace("slow_threshold = \"10ms\"", "slow_threshold = \"25ms\"");
    std::fs::write(&agent.config_path, good).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = agent.data(r#"{"cmd":"syscalls"}"#);
        if v["slow_threshold_ms"] == 25.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reload not applied: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The kernel side follows: a 15 ms call is no longer slow, a 40 ms one is.
    let me = std::process::id();
    insite_e2e::nanosleep_calls(1, 15);
    insite_e2e::nanosleep_calls(1, 40);
    agent.wait_ticks(2);
    let v = agent.data(r#"{"cmd":"syscalls","limit":512}"#);
    let mine: Vec<u64> = v["slow_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pid"] == me && c["syscall"] == "nanosleep")
        .map(|c| c["duration_ns"].as_u64().unwrap())
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert!(mine[0] >= 40_000_000);
}

#[test]
fn sigterm_leaves_nothing_behind() {
    let mut agent = Agent::start("");
    let names = loaded_program_names();
    assert!(names.iter().any(|n| n.starts_with("isa_btf_")), "{names:?}");
    let status = agent.terminate();
    assert!(status.success(), "exit status {status}:\n{}", agent.log());
    assert!(!agent.socket.exists(), "control socket left behind");
    // Links go when the agent closes them; the kernel then frees tracing programs after an
    // RCU-tasks grace period, so give it a few seconds.
    let t0 = std::time::Instant::now();
    loop {
        let names = loaded_program_names();
        if !names.iter().any(|n| n.starts_with("isa_")) {
            eprintln!("programs gone {:?} after exit", t0.elapsed());
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "programs left loaded: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", agent.port)).is_err());
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut agent = Agent::start("");
    agent.signal(libc::SIGINT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = agent.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(!agent.socket.exists());
}

#[test]
fn second_agent_on_the_same_socket_refuses_to_start() {
    let agent = Agent::start("");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, config_text(0, &agent.socket, "", "")).unwrap();
    let out = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
    assert_eq!(agent.data(r#"{"cmd":"status"}"#)["pid"], agent.pid());
}

#[test]
fn without_privileges_the_probe_fails_alone_and_the_rest_runs() {
    let agent = Agent::start_unprivileged("");
    let probe = agent.probe("syscalls");
    assert_eq!(probe["state"], "failed", "{probe}");
    let why = probe["error"].as_str().unwrap_or("");
    assert!(why.contains("ermitted") || why.contains("EPERM"), "{probe}");
    // Each family fails on its own, with its own cause.
    let net = agent.probe("net");
    assert_eq!(net["state"], "failed", "{net}");
    assert!(
        net["error"].as_str().unwrap_or("").contains("ermitted"),
        "{net}"
    );
    assert_eq!(agent.probe("host")["state"], "attached");
    agent.wait_ticks(2);
    let m = agent.scrape();
    assert_eq!(
        m.value(
            "insite_probe_attached",
            &[("probe", "syscalls"), ("state", "failed")]
        ),
        Some(0.0)
    );
    assert!(
        m.value("insite_host_memory_bytes", &[("kind", "total")])
            .unwrap()
            > 0.0
    );
    assert!(m.value("insite_agent_ticks_total", &[]).unwrap() >= 2.0);
    let r = agent.request(r#"{"cmd":"syscalls"}"#).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("failed"), "{r}");
    // It says once, at start, what it lacks and what it needs...
    let log = agent.log();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("lacks the privileges"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(
        said[0].contains("CAP_BPF") && said[0].contains("CAP_PERFMON") && said[0].contains("root"),
        "{log}"
    );
    // ...and its exit status says it could not do its job.
    let mut agent = agent;
    let status = agent.terminate();
    assert_eq!(status.code(), Some(77), "{status}: {}", agent.log());
}
