//! Connections whose end goes unseen, races with a full accept queue, a stopped agent, and
//! live connections sampled by the walk.

use super::*;

/// Polls the agent until `f` holds on a scrape, or gives up after `secs` and returns the last.
fn scrape_within(agent: &Agent, secs: u64, f: impl Fn(&Metrics) -> bool) -> Metrics {
    Metrics::wait_within(agent, Duration::from_secs(secs), f)
}

/// The agent's table of tracked connections (the kernel's `NET_CONNS`).
fn tracked_conns(agent: &Agent) -> aya::maps::HashMap<aya::maps::MapData, u64, NetConn> {
    let map = insite_e2e::agent_map(agent, "NET_CONNS").expect("the agent's NET_CONNS");
    aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map)).expect("NET_CONNS as a hash")
}

/// The tracked entry (socket, value) of the IPv4 connection with these local/remote ports.
fn tracked_entry(
    conns: &aya::maps::HashMap<aya::maps::MapData, u64, NetConn>,
    sport: u16,
    dport: u16,
) -> Option<(u64, NetConn)> {
    conns
        .iter()
        .filter_map(Result::ok)
        .find(|(_, c)| c.tuple.family == 2 && (c.tuple.sport, c.tuple.dport) == (sport, dport))
}

/// One loopback connection, both ends held open, once the agent counts it open both ways.
fn open_connection(agent: &Agent) -> (TcpStream, TcpStream, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap();
    let client = TcpStream::connect(dest).unwrap();
    let (server, _) = listener.accept().unwrap();
    let d = dest.to_string();
    let m = scrape_until(agent, |m| {
        m.sum("insite_tcp_active_connections", &labels("outbound", &d)) == 1.0
            && m.sum("insite_tcp_active_connections", &labels("inbound", &d)) == 1.0
    });
    for dir in ["outbound", "inbound"] {
        assert_eq!(
            m.sum("insite_tcp_active_connections", &labels(dir, &d)),
            1.0,
            "{dir}: {}",
            m.0
        );
    }
    (client, server, dest)
}

/// (connections, closed, reconciled, active) of one direction to `dest`, over services.
fn conn_counts(m: &Metrics, dir: &str, dest: &str) -> [f64; 4] {
    let l = labels(dir, dest);
    // + 0.0: an empty sum is -0.0.
    [
        "insite_tcp_connections_total",
        "insite_tcp_closed_connections_total",
        "insite_tcp_connections_reconciled_total",
        "insite_tcp_active_connections",
    ]
    .map(|name| m.sum(name, &l) + 0.0)
}

#[test]
fn a_close_that_never_reaches_the_agent_is_reconciled() {
    let agent = Agent::start(NET_ONLY);
    let (client, server, dest) = open_connection(&agent);
    let (cport, sport) = (client.local_addr().unwrap().port(), dest.port());
    // What a state change and a destroy the kernel both skipped leave behind: entries whose
    // socket closes unseen. Each entry moves to a key no socket has (a socket's address is
    // aligned), so the hooks of both ends find nothing when they close, and the entries
    // stay, as stale ones do. Then both ends close, unseen.
    let mut conns = tracked_conns(&agent);
    for (local, remote) in [(cport, sport), (sport, cport)] {
        let (sock, conn) = tracked_entry(&conns, local, remote).expect("the connection is tracked");
        conns.remove(&sock).expect("untrack");
        conns
            .insert(sock | 1, conn, 0)
            .expect("track under a stale key");
    }
    drop(client);
    drop(server);
    let d = dest.to_string();
    let healed = |m: &Metrics| {
        ["outbound", "inbound"]
            .iter()
            .all(|dir| conn_counts(m, dir, &d) == [1.0, 0.0, 1.0, 0.0])
    };
    let m = scrape_within(&agent, 15, healed);
    for dir in ["outbound", "inbound"] {
        assert_eq!(
            conn_counts(&m, dir, &d),
            [1.0, 0.0, 1.0, 0.0],
            "{dir}: (connections, closed, reconciled, active)\n{}",
            m.0
        );
    }
}

#[test]
fn a_close_the_state_hook_misses_is_reported_when_the_socket_is_destroyed() {
    let agent = Agent::start(NET_ONLY);
    let before = agent.scrape();
    let (client, server, dest) = open_connection(&agent);
    let cport = client.local_addr().unwrap().port();
    // The client's entry leaves the table while the connection is reset, and is back before
    // the socket is freed: the state hook sees the CLOSE of an untracked socket, as when
    // the kernel skips its run, and only the destroy hook can report the close.
    let mut conns = tracked_conns(&agent);
    let (sock, conn) = tracked_entry(&conns, cport, dest.port()).expect("client tracked");
    conns.remove(&sock).unwrap();
    linger_zero(&server);
    drop(server);
    let mut client = client;
    let mut buf = [0u8; 1];
    let reset = client.read(&mut buf);
    assert!(
        matches!(&reset, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{reset:?}"
    );
    conns.insert(sock, conn, 0).unwrap();
    drop(client);
    let d = dest.to_string();
    let ended = |m: &Metrics| m.value_or_zero("insite_tcp_ended_at_destroy_total", &[]);
    let m = scrape_within(&agent, 15, |m| {
        conn_counts(m, "outbound", &d) == [1.0, 1.0, 0.0, 0.0]
    });
    assert_eq!(
        conn_counts(&m, "outbound", &d),
        [1.0, 1.0, 0.0, 0.0],
        "(connections, closed, reconciled, active)\n{}",
        m.0
    );
    assert!(ended(&m) - ended(&before) >= 1.0, "{}", m.0);
    // The server's end closed as usual.
    assert_eq!(conn_counts(&m, "inbound", &d), [1.0, 1.0, 0.0, 0.0]);
    assert!(tracked_entry(&conns, cport, dest.port()).is_none());
}

/// SO_LINGER {on, 0}: close() resets the connection instead of a FIN.
fn linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a valid linger struct and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER");
}

/// Rounds of the race of issue 9: a listener with a tiny accept queue that accepts slowly,
/// thousands of non-blocking connects closed at once from four threads, then the listener
/// closed. Softirq state changes then interrupt the state hook running in process context,
/// and the kernel skips them (`recursion_misses`): on the code before the destroy hook and
/// reconciliation about half the rounds left a connection open for good. Prints the port of
/// each round.
const RACE: &str = r#"
import socket, threading, time
ROUNDS, THREADS, PER = 5, 4, 2500
for _ in range(ROUNDS):
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(1)
    port = l.getsockname()[1]
    print(port, flush=True)
    stop = False
    def acceptor():
        while not stop:
            try:
                c, _ = l.accept()
                c.close()
            except OSError:
                return
            time.sleep(0.01)
    def client():
        for _ in range(PER):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                pass
            s.close()
    a = threading.Thread(target=acceptor)
    a.start()
    ts = [threading.Thread(target=client) for _ in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop = True
    l.close()
    a.join()
"#;

#[test]
fn connects_racing_a_full_accept_queue_leave_no_connection_open() {
    let agent = Agent::start(NET_ONLY);
    let before = agent.scrape();
    let out = python(RACE, None);
    let dests: Vec<String> = out
        .lines()
        .map(|p| format!("127.0.0.1:{}", p.trim()))
        .collect();
    assert_eq!(dests.len(), 5, "{out}");
    let settled = |m: &Metrics| {
        dests.iter().all(|d| {
            ["outbound", "inbound"].iter().all(|dir| {
                let [c, cl, r, a] = conn_counts(m, dir, d);
                a == 0.0 && c - cl - r == 0.0
            })
        })
    };
    let m = scrape_within(&agent, 15, settled);
    let delta = |name: &str, l: &[(&str, &str)]| m.sum(name, l) - before.sum(name, l);
    let mut report = format!(
        "isa_net_state missed runs {}, ended at destroy {}, sockets reused {}\n",
        delta(
            "insite_probe_missed_runs_total",
            &[("program", "isa_net_state")]
        ),
        delta("insite_tcp_ended_at_destroy_total", &[]),
        delta("insite_tcp_sockets_reused_total", &[]),
    );
    for d in &dests {
        for dir in ["outbound", "inbound"] {
            let c = conn_counts(&m, dir, d);
            report += &format!(
                "{d} {dir}: connections {} closed {} reconciled {} active {}\n",
                c[0], c[1], c[2], c[3]
            );
        }
    }
    eprintln!("{report}");
    assert!(settled(&m), "{report}");
    // Every connection the destroy hook ended had a state change the kernel skipped.
    assert!(
        delta("insite_tcp_ended_at_destroy_total", &[])
            <= delta(
                "insite_probe_missed_runs_total",
                &[("program", "isa_net_state")]
            ),
        "{report}"
    );
    // Something was measured: handshakes completed (on every round, unless the kernel skipped
    // the runs that would have seen them, which the reconciliation above copes with too).
    let connects: Vec<f64> = dests
        .iter()
        .map(|d| conn_counts(&m, "outbound", d)[0])
        .collect();
    assert!(connects.iter().all(|&c| c > 0.0) || connects.iter().sum::<f64>() > 0.0);
}

/// Sends SIGCONT to a stopped agent when dropped, even if the test panics.
struct Stopped<'a>(&'a Agent);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal(libc::SIGCONT);
    }
}

#[test]
fn counts_stay_exact_while_the_agent_is_stopped() {
    let agent = Agent::start(NET_ONLY);
    let server = echo_server("127.0.0.1:0", 1);
    // With the agent stopped nothing reads the kernel's tables. 4000 connections used to
    // write about 16000 events to a 1 MiB ring buffer that holds about 7700 of them; now
    // the kernel counts them on their edges, and the agent finds them all when it resumes.
    const N: f64 = 4000.0;
    let stopped = Stopped(&agent);
    agent.signal(libc::SIGSTOP);
    python(
        &format!(
            r#"
import socket
for _ in range({N}):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.shutdown(socket.SHUT_WR)
    s.recv(10)
    s.close()
"#,
            N = N as u64,
            port = server.port()
        ),
        None,
    );
    drop(stopped);
    let d = server.to_string();
    // Every connection is counted, and every one ended: closed, or (rarely: once in six CI
    // runs, 2 of 4000) reconciled because no hook saw its end, never both and never neither.
    let settled = |c: [f64; 4]| c[0] == N && c[1] + c[2] == N && c[3] == 0.0;
    let exact = |m: &Metrics| {
        ["outbound", "inbound"]
            .iter()
            .all(|dir| settled(conn_counts(m, dir, &d)))
    };
    let m = scrape_within(&agent, 15, exact);
    for dir in ["outbound", "inbound"] {
        let c = conn_counts(&m, dir, &d);
        assert!(
            settled(c),
            "{dir}: (connections, closed, reconciled, active) = {c:?}\n{}",
            m.0
        );
    }
    let out = labels("outbound", &d);
    assert_eq!(
        m.sum("insite_tcp_connect_duration_seconds_count", &out),
        N,
        "every connect timed"
    );
}

#[test]
fn a_live_connection_is_sampled_without_a_hook_on_every_receive() {
    // Bytes and RTT of a connection that stays open arrive with the periodic walk over the
    // kernel's TCP sockets, not only at its close; no program runs on the receive path.
    let agent = Agent::start(&format!("{NET_ONLY}[net]\nsample_interval = \"200ms\"\n"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while total < 300_000 {
            total += s.read(&mut buf).unwrap();
        }
        s
    });
    let mut c = std::net::TcpStream::connect(dest).unwrap();
    c.write_all(&vec![b'x'; 300_000]).unwrap();
    let server_side = reader.join().unwrap();
    let dest = dest.to_string();
    let out = labels("outbound", &dest);
    let m = scrape_until(&agent, |m| {
        m.value_or_zero("insite_tcp_sent_bytes_total", &out) >= 300_000.0
    });
    assert!(
        m.value_or_zero("insite_tcp_sent_bytes_total", &out) >= 300_000.0,
        "bytes of the open connection not sampled:\n{}",
        m.0
    );
    // The walks are counted and timed, at the configured interval or slower.
    assert!(
        m.value_or_zero("insite_net_walks_total", &[]) >= 1.0,
        "{}",
        m.0
    );
    assert!(m.value_or_zero("insite_net_walk_interval_seconds", &[]) >= 0.2);
    let status = agent.probe("net");
    let attach = status["attach"].as_str().unwrap_or_default().to_string();
    assert!(attach.contains("iter/tcp"), "{status}");
    assert!(!attach.contains("tcp_rcv_space_adjust"), "{status}");
    drop((c, server_side));
}

/// `agent.kernel_log`: off by default, and then nothing comes from the kernel programs; at
/// `debug` the network programs say which process's connect failed and why (ECONNREFUSED).
#[test]
fn the_kernel_log_speaks_only_when_asked() {
    let want = format!(
        "kernel: net: connect from pid {} failed: errno {}",
        std::process::id(),
        libc::ECONNREFUSED
    );
    for (level, expect) in [("off", false), ("debug", true)] {
        let agent = Agent::start(&format!(
            "[agent]\nkernel_log = \"{level}\"\n[syscalls]\nenabled = false\n[db]\nenabled = false\n"
        ));
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        // The failure is counted once the fold has run; the log line comes before it.
        scrape_within(&agent, 10, |m| {
            m.sum(
                "insite_tcp_connect_failures_total",
                &[("reason", "refused")],
            ) >= 1.0
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while expect && !agent.log().contains(&want) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = agent.log();
        assert_eq!(log.contains(&want), expect, "kernel_log = {level}:\n{log}");
        assert_eq!(
            log.contains("kernel: "),
            expect,
            "kernel_log = {level}:\n{log}"
        );
    }
}
