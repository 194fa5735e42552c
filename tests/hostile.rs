//! The agent under hostile input and heavy load (issue 9): text that processes control cannot
//! forge or break the scrape, idle and stalled clients cannot blind it, broken stderr cannot
//! kill it, a wrong socket path cannot delete a file, settings and replies cannot take memory
//! beyond its budget, and a reload during start-up is harmless. Real agent, real kernel, real
//! servers; each test is about one finding and fails on the agent before the fix.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use insite_e2e::{
    agent_bin, cgroup2_root, config_text, require_root, run_refused,
    servers::{Mariadb, Redis, Via},
    Agent, Launch, Metrics, Stderr,
};

/// Only what a test needs: the database probe (no syscall hooks slowing the workloads).
const DB_ONLY: &str = "[syscalls]\nenabled = false\n[net]\nenabled = false\n";

fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (installed by cargo xtask test)");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("write to promtool");
    }
    let out = child.wait_with_output().expect("promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A python3 script run in the root cgroup (so that its service is its process name), as root.
fn python_in_root_cgroup(script: &str) -> String {
    use std::os::unix::process::CommandExt as _;
    let procs = cgroup2_root()
        .expect("a cgroup2 hierarchy")
        .join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]);
    // SAFETY: only a write to a file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FORGED_COMM: &str = "\"} 1\nfake 7\n#";

#[test]
fn process_controlled_text_cannot_forge_or_break_the_scrape() {
    let agent = Agent::start(DB_ONLY);
    let redis = Redis::start().expect("redis");
    let port = redis.port;
    let dest = format!("127.0.0.1:{port}");
    let unix_dir = tempfile::tempdir().unwrap();
    let unix_path = unix_dir.path().join("ev\"il\\x\n}{.sock");
    // A thread named to close the label and forge a line; PING, a command named with a
    // backslash, and a slow command (for the slow-query log); then a RESP "server" on a unix
    // socket whose path is hostile, used by the same thread.
    let script = format!(
        r#"
import ctypes, socket
libc = ctypes.CDLL(None)
libc.prctl(15, {comm:?}.encode(), 0, 0, 0)
s = socket.create_connection(("127.0.0.1", {port}))
for _ in range(3):
    s.sendall(b"*1\r\n$4\r\nPING\r\n"); s.recv(100)
s.sendall(b"*2\r\n$10\r\nback\\slash\r\n$1\r\nk\r\n"); s.recv(200)
s.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$4\r\n0.03\r\n"); s.recv(100)
path = {path:?}
srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(1)
c = socket.socket(socket.AF_UNIX); c.connect(path); a, _ = srv.accept()
for _ in range(2):
    c.sendall(b"*1\r\n$4\r\nPING\r\n"); a.recv(100); a.sendall(b"+PONG\r\n"); c.recv(100)
"#,
        comm = FORGED_COMM,
        port = port,
        path = unix_path.display().to_string(),
    );
    python_in_root_cgroup(&script);
    let unix_dest = format!("unix:{}", unix_path.display());
    let m = Metrics::wait_for(&agent, |m| {
        m.sum(
            "insite_db_query_duration_seconds_count",
            &[
                ("role", "client"),
                ("destination", &dest),
                ("operation", "DEBUG"),
            ],
        ) >= 1.0
            && m.sum(
                "insite_db_query_duration_seconds_count",
                &[("role", "client"), ("destination", &unix_dest)],
            ) >= 2.0
    });

    // The text format parses, and no line was forged.
    promtool_check(&m.0).unwrap_or_else(|e| panic!("promtool rejects the scrape: {e}\n{}", m.0));
    assert!(!m.0.lines().any(|l| l.starts_with("fake")), "{}", m.0);
    // The hostile values arrive intact, as label values.
    let samples = m.samples();
    let pings = samples
        .iter()
        .find(|(n, l, _)| {
            n == "insite_db_query_duration_seconds_count"
                && l.iter().any(|(k, v)| k == "destination" && *v == dest)
                && l.iter().any(|(k, v)| k == "operation" && v == "PING")
                && l.iter().any(|(k, v)| k == "role" && v == "client")
        })
        .unwrap_or_else(|| panic!("no PING series for {dest}:\n{}", m.0));
    let service = &pings.1.iter().find(|(k, _)| k == "service").unwrap().1;
    assert_eq!(service, FORGED_COMM);
    assert_eq!(pings.2, 3.0);
    assert_eq!(
        m.sum(
            "insite_db_query_duration_seconds_count",
            &[
                ("role", "client"),
                ("destination", &unix_dest),
                ("operation", "PING")
            ]
        ),
        2.0
    );
    // A command Redis does not know (and refuses) is `unknown_command`, not free text.
    assert_eq!(
        m.sum(
            "insite_db_query_duration_seconds_count",
            &[
                ("role", "client"),
                ("destination", &dest),
                ("operation", "unknown_command")
            ]
        ),
        1.0
    );
    assert!(!m.0.to_ascii_uppercase().contains("SLASH"), "{}", m.0);

    // OpenMetrics: the same samples, no forged line, one `# EOF` at the end.
    let (_, om) = agent.scrape_with(true).expect("openmetrics scrape");
    assert!(!om.lines().any(|l| l.starts_with("fake")));
    assert_eq!(om.lines().filter(|l| *l == "# EOF").count(), 1);
    assert!(om.trim_end().ends_with("# EOF"));
    for line in om.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            insite_e2e::parse_sample(line).is_some(),
            "unparsable OpenMetrics line {line:?}"
        );
    }

    // The slow-query log line holds the hostile name escaped, on one line.
    let log = agent.log();
    assert!(log.contains("slow query"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("fake")), "{log}");
    assert!(log.contains(r#"\"} 1\nfake 7\n#"#), "{log}");
    // CLI tables too.
    let out = agent.cli(&["queries", "--system", "redis"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.lines().any(|l| l.starts_with("fake")), "{text}");
}

#[test]
fn a_full_or_closed_stderr_costs_log_lines_not_the_agent() {
    for stderr in [Stderr::DevFull, Stderr::Closed] {
        let mut agent = Agent::launch(Launch {
            extra: DB_ONLY,
            stderr,
            ..Launch::default()
        });
        // Reloads log; so does a refused reload.
        agent.signal(libc::SIGHUP);
        std::fs::write(&agent.config_path, "bogus = 1\n").unwrap();
        agent.signal(libc::SIGHUP);
        agent.wait_ticks(4);
        let m = agent.scrape();
        if stderr == Stderr::DevFull {
            assert!(
                m.value("insite_agent_log_lines_dropped_total", &[])
                    .unwrap_or(0.0)
                    >= 3.0,
                "{stderr:?}: {}",
                m.0
            );
        }
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "{stderr:?}: agent died"
        );
        let status = agent.terminate();
        assert!(status.success(), "{stderr:?}: {status}");
        assert!(!agent.socket.exists(), "{stderr:?}: socket left behind");
    }
}

#[test]
fn a_cli_whose_output_is_cut_short_ends_quietly() {
    let agent = Agent::start(DB_ONLY);
    for args in [&["status"][..], &["status", "--json"][..]] {
        let mut child = Command::new(agent_bin())
            .args(args)
            .arg("--control-socket")
            .arg(&agent.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the output is written (like `| head -0`).
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn raise_own_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
}

#[test]
fn idle_and_stalled_clients_cannot_blind_the_agent() {
    raise_own_nofile();
    // systemd's default soft limit: the agent must lift it and keep fds in reserve.
    let agent = Agent::launch(Launch {
        extra: "[syscalls]\nenabled = false\n",
        nofile_soft: Some(1024),
        ..Launch::default()
    });
    let rss0 = rss_kib(agent.pid());
    let errors0 = agent
        .scrape()
        .value("insite_agent_collect_errors_total", &[])
        .unwrap_or(0.0);
    let addr = ("127.0.0.1", agent.port);
    let mut held = Vec::new();
    // 1500 idle connections, 300 that stop half-way through their headers, 200 that ask for
    // /metrics and never read the reply.
    let to: std::net::SocketAddr = (addr.0.parse::<std::net::IpAddr>().unwrap(), addr.1).into();
    let mut refused = 0;
    for i in 0..2000 {
        // A bounded connect: an agent that stopped accepting leaves connects hanging (and
        // then the rest would too).
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) else {
            refused += 1;
            if refused > 20 {
                break;
            }
            continue;
        };
        if (1500..1800).contains(&i) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
        } else if i >= 1800 {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        held.push(s);
    }
    // While they are held: scrapes, the control socket and procfs reads all work.
    let t = Instant::now();
    let m = agent.scrape();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "scrape took {:?}",
        t.elapsed()
    );
    assert!(
        m.value("insite_host_memory_bytes", &[("kind", "total")])
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(agent.data(r#"{"cmd":"status"}"#)["pid"], agent.pid());
    agent.wait_ticks(8);
    let m = agent.scrape();
    assert_eq!(
        m.value("insite_agent_collect_errors_total", &[])
            .unwrap_or(0.0),
        errors0,
        "procfs reads failed while clients were held:\n{}",
        agent.log()
    );
    assert!(
        m.value("insite_agent_http_connections_evicted_total", &[])
            .unwrap_or(0.0)
            > 0.0,
        "{}",
        m.0
    );
    let rss1 = rss_kib(agent.pid());
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} to {rss1} KiB with 2000 clients held"
    );
    // Half-sent headers and untaken replies are dropped within the timeouts.
    std::thread::sleep(Duration::from_secs(12));
    let open = agent
        .scrape()
        .value("insite_agent_http_connections", &[])
        .unwrap_or(f64::MAX);
    assert!(open <= 64.0, "{open} metrics connections still open");
    drop(held);
}

#[test]
fn stalled_control_clients_cannot_lock_out_others() {
    let agent = Agent::launch(Launch {
        extra: DB_ONLY,
        control_extra: "group = \"nogroup\"\nrequest_timeout = \"1s\"\n",
        ..Launch::default()
    });
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // `nobody` (group nogroup) takes every connection it can and pipelines requests that it
    // never reads the replies of.
    let script = format!(
        r#"
import socket, time, sys
held = []
for i in range(64):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect({path:?})
        s.setblocking(False)
        try:
            s.send(b'{{"cmd":"status"}}\n' * 20000)
        except BlockingIOError:
            pass
        held.append(s)
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(6)
"#,
        path = agent.socket.display().to_string()
    );
    use std::os::unix::process::CommandExt as _;
    let mut hog = Command::new("python3")
        .args(["-c", &script])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 as nobody");
    let mut first = String::new();
    BufReader::new(hog.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    // Root is served at once, whatever nobody holds.
    let t = Instant::now();
    assert_eq!(agent.data(r#"{"cmd":"status"}"#)["pid"], agent.pid());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Nobody itself is turned away (busy) while it holds its share.
    let bin = insite_e2e::world_executable_copy(agent.dir.path());
    let sock = agent.socket.display().to_string();
    let out = insite_e2e::run_as_nobody(&bin, &["status", "--control-socket", &sock]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("busy"), "{out:?}");
    // The stalled connections are dropped after the reply timeout: nobody gets in again while
    // the hog still holds its sockets open.
    std::thread::sleep(Duration::from_secs(3));
    let out = insite_e2e::run_as_nobody(&bin, &["status", "--json", "--control-socket", &sock]);
    assert!(out.status.success(), "{out:?}");
    let _ = hog.kill();
    let _ = hog.wait();
}

#[test]
fn the_control_socket_path_never_deletes_a_file() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let precious = dir.path().join("hosts");
    std::fs::write(&precious, "127.0.0.1 localhost\n").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, config_text(0, &precious, "", DB_ONLY)).unwrap();
    let out = run_refused(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a socket") && err.contains("regular file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "127.0.0.1 localhost\n"
    );
}

/// Peak RSS of every child this test process has waited for, in KiB.
fn children_peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss
}

#[test]
fn settings_replies_and_config_files_stay_within_the_memory_budget() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    // Every bound at the largest value its own range accepts: refused as a whole, naming the
    // budget.
    let huge = "[net]\nmax_edges = 65536\ntop_n = 1000\n[db]\nmax_series = 65536\nmax_fingerprints = 100000\n";
    let cfg = dir.path().join("huge.toml");
    std::fs::write(&cfg, config_text(0, &sock, "", huge)).unwrap();
    let out = run_refused(&cfg);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.memory_budget_mib"), "{err}");

    // A 50 MB generated config is refused before it is parsed.
    let big = dir.path().join("big.toml");
    let mut text = config_text(0, &sock, "", "[syscalls]\npids = [");
    while text.len() < 50_000_000 {
        text.push_str("1234567, ");
    }
    text.push_str("1]\n");
    std::fs::write(&big, &text).unwrap();
    drop(text);
    let t = Instant::now();
    let out = run_refused(&big);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("larger than"),
        "{out:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let peak = children_peak_rss_kib();
    assert!(peak < 256 * 1024, "a child peaked at {peak} KiB");

    // Large tables are paged: connections and map answer `limit` rows and say how many
    // there are.
    let agent = Agent::start("[syscalls]\nenabled = false\n[db]\nenabled = false\n");
    // Twelve distinct closed ports: held bound together so the kernel cannot hand out one
    // twice (it did once, and two refusals folded into one edge), then freed before connecting.
    let listeners: Vec<_> = (0..12)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    drop(listeners);
    for port in ports {
        let _ = TcpStream::connect(("127.0.0.1", port));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = agent.data(r#"{"cmd":"connections","limit":5}"#);
        let total = v["total_edges"].as_u64().unwrap_or(0);
        if total >= 12 {
            assert_eq!(v["edges"].as_array().unwrap().len(), 5, "{v}");
            let next = agent.data(r#"{"cmd":"connections","limit":5,"offset":5}"#);
            assert_eq!(next["offset"], 5);
            assert_ne!(v["edges"][0], next["edges"][0]);
            let m = agent.data(r#"{"cmd":"map","limit":3}"#);
            assert_eq!(m["edges"].as_array().unwrap().len(), 3, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "only {total} edges: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = agent
        .request(r#"{"cmd":"connections","limit":1000000}"#)
        .unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("limit"), "{r}");
    let out = agent.cli(&["connections", "--limit", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("showing edges 1..2 of"), "{text}");
}

#[test]
fn a_reload_during_start_up_does_not_kill_the_agent() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let cfg = dir.path().join("c.toml");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    std::fs::write(&cfg, config_text(port, &sock, "", "")).unwrap();
    let mut child = Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // `systemctl reload` right after `start`, again and again while the probes load: from
    // the moment the process runs its own code (it ignores or catches SIGHUP), or 50 ms.
    let t = Instant::now();
    let sighup_handled = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        ["SigIgn:", "SigCgt:"].iter().any(|k| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (libc::SIGHUP - 1)) != 0)
        })
    };
    while !sighup_handled(child.id()) && t.elapsed() < Duration::from_millis(50) {
        std::thread::sleep(Duration::from_micros(200));
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        assert!(
            child.try_wait().unwrap().is_none(),
            "killed by SIGHUP after {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "agent exited");
        if let Ok(mut s) = UnixStream::connect(&sock) {
            s.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            if line.contains("\"ok\":true") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "agent never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn errors_name_their_cause_once_and_where() {
    let agent = Agent::start(DB_ONLY);
    let dir = tempfile::tempdir().unwrap();
    // The metrics port is taken (by the running agent).
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        config_text(agent.port, &dir.path().join("s.sock"), "", ""),
    )
    .unwrap();
    let out = run_refused(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    // The error line, wherever the log thread's lines landed around it.
    let error_line = |err: &str| {
        err.lines()
            .find(|l| l.starts_with("insite-agent: "))
            .unwrap_or_default()
            .to_string()
    };
    let line = error_line(&err);
    assert_eq!(line.matches("Address already in use").count(), 1, "{err}");
    // A control socket path whose directory cannot be made.
    std::fs::write(&cfg, config_text(0, Path::new("/proc/nope/s.sock"), "", "")).unwrap();
    let out = run_refused(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    let last = error_line(&err);
    let cause = last.rsplit(": ").next().unwrap_or_default().to_string();
    assert!(!cause.is_empty());
    assert_eq!(last.matches(&cause).count(), 1, "{err}");
    // Not UTF-8: the line and byte offset are named.
    std::fs::write(&cfg, b"[agent]\ntick_interval = \"1s\"\n\xff = 1\n").unwrap();
    let out = run_refused(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.toml:3: not UTF-8 (invalid byte at offset 29)"),
        "{err}"
    );
}

#[test]
fn query_text_keeps_no_control_bytes() {
    let agent = Agent::start(DB_ONLY);
    let db = Mariadb::start().expect("mariadb");
    // mysqlslap's generated INSERT ends with a NUL byte.
    let out = db
        .mysqlslap(
            Via::Tcp,
            &[
                "--auto-generate-sql",
                "--auto-generate-sql-load-type=write",
                "--number-of-queries=20",
                "--concurrency=1",
                "--iterations=1",
            ],
        )
        .expect("mysqlslap");
    assert!(out.status.success(), "{out:?}");
    let dest = db.tcp_addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agent.cli(&["queries", "--system", "mysql", "--json", "--limit", "100"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let rows: Vec<&serde_json::Value> = v["queries"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r["destination"] == dest.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let inserts: Vec<&str> = rows
            .iter()
            .filter_map(|r| r["fingerprint"].as_str())
            .filter(|f| f.starts_with("INSERT INTO t1"))
            .collect();
        if !inserts.is_empty() {
            for r in &rows {
                for field in ["fingerprint", "sample"] {
                    let s = r[field].as_str().unwrap_or_default();
                    assert!(!s.chars().any(char::is_control), "{field} {s:?}");
                }
            }
            assert!(inserts.iter().all(|f| !f.ends_with(' ')), "{inserts:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no INSERT seen: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
