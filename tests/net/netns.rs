//! Across a veth pair to a network namespace: peers, a SYN retry's bucket, retransmits on a
//! lossy path.

use super::*;

use insite_e2e::netns::{ip, Netns};

/// Waits for a line on the child's stdout (the server saying it listens).
fn wait_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead as _;
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut line = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut line)
        .expect("read line");
    line
}

const NS_SERVER: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(64)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
    c.close()
"#;

#[test]
fn connects_across_a_veth_pair_are_attributed_to_the_peer() {
    let ns = Netns::new(1).expect("network namespace");
    let mut server = ns.spawn_python(NS_SERVER).expect("python3");
    assert!(wait_line(&mut server).contains("listening"));
    let agent = Agent::start(NET_ONLY);
    for _ in 0..5 {
        let mut s = TcpStream::connect("10.231.1.2:8080").expect("connect across the veth");
        s.write_all(b"hello").unwrap();
    }
    let dest = "10.231.1.2:8080";
    let m = scrape_until(&agent, |m| {
        m.value_or_zero(
            "insite_tcp_closed_connections_total",
            &labels("outbound", dest),
        ) >= 5.0
            && m.value_or_zero("insite_tcp_connections_total", &labels("inbound", dest)) >= 5.0
    });
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        m.value("insite_tcp_connections_total", &labels("outbound", dest)),
        Some(5.0),
        "{}",
        m.0
    );
    // The namespace's side of the same connections: accepted on 10.231.1.2:8080 from the
    // host's address.
    let v = agent.data(r#"{"cmd":"connections"}"#);
    let inbound = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == "inbound" && e["destination"] == dest)
        .unwrap_or_else(|| panic!("no inbound edge to {dest}: {v:#}"));
    assert_eq!(inbound["peer"], "10.231.1.1");
    assert_eq!(inbound["connections"], 5);
    let outbound = v["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == "outbound" && e["destination"] == dest)
        .unwrap();
    assert_eq!(outbound["peer"], "10.231.1.2");
    assert!(outbound["bytes_sent"].as_u64().unwrap() >= 25);
}

/// A listener with an accept queue of one connection, which the test never drains by itself.
fn tiny_backlog_listener() -> TcpListener {
    // SAFETY: plain socket calls on a fresh fd we own; sockaddr_in is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), len),
            0
        );
        // Backlog 0: the queue is full as soon as one connection waits in it.
        assert_eq!(libc::listen(fd, 0), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// The exported bucket bound (le, in seconds) that holds a duration: 2^k ns.
fn bucket_le(d: Duration) -> (f64, f64) {
    let ns = d.as_nanos() as u64;
    let k = 64 - ns.leading_zeros(); // 2^(k-1) <= ns < 2^k
    ((1u64 << (k - 1)) as f64 / 1e9, (1u64 << k) as f64 / 1e9)
}

#[test]
fn a_connect_that_waits_for_a_syn_retry_lands_in_its_bucket() {
    let agent = Agent::start(NET_ONLY);
    let listener = tiny_backlog_listener();
    let addr = listener.local_addr().unwrap();
    let before = agent.scrape();
    // The first connection fills the queue; the second one's SYN is dropped, and its connect
    // completes on the SYN retry (initial RTO: 1 s) once the test has accepted the first.
    let _first = TcpStream::connect(addr).unwrap();
    let second = std::thread::spawn(move || {
        let t = Instant::now();
        let s = TcpStream::connect(addr).unwrap();
        (t.elapsed(), s)
    });
    std::thread::sleep(Duration::from_millis(300));
    let _a = listener.accept().unwrap();
    let (took, _s) = second.join().unwrap();
    assert!(
        took >= Duration::from_millis(900),
        "connect took {took:?}: no SYN retry"
    );
    let dest = addr.to_string();
    let m = scrape_until(&agent, |m| {
        m.value_or_zero(
            "insite_tcp_connect_duration_seconds_count",
            &labels("outbound", &dest),
        ) >= 2.0
    });
    let (lo, hi) = bucket_le(took);
    let bucket = |le: f64| {
        let le = format!("{le}");
        m.value_or_zero(
            "insite_tcp_connect_duration_seconds_bucket",
            &[labels("outbound", &dest), vec![("le", le.as_str())]].concat(),
        )
    };
    // Cumulative buckets: one connect up to `lo` (the fast first one), both up to `hi`.
    assert_eq!(bucket(lo), 1.0, "took {took:?}: {}", m.0);
    assert_eq!(bucket(hi), 2.0, "took {took:?}: {}", m.0);
    // The dropped SYN is a listen-queue overflow, host-wide.
    let overflows = |m: &Metrics| m.value_or_zero("insite_host_tcp_listen_overflows_total", &[]);
    assert!(
        overflows(&m) > overflows(&before),
        "no listen overflow counted"
    );
}

#[test]
fn retransmits_rise_while_the_path_drops_packets() {
    let ns = Netns::new(2).expect("network namespace");
    let mut server = ns.spawn_python(NS_SERVER).expect("python3");
    assert!(wait_line(&mut server).contains("listening"));
    let agent = Agent::start(NET_ONLY);
    let before = agent.scrape();
    let mut s = TcpStream::connect("10.231.2.2:8080").expect("connect");
    s.write_all(b"before the loss").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Loss: point the host's neighbour entry for the peer at a MAC nobody has. Segments leave
    // the host (so TCP counts real retransmissions, on its timer: 200 ms, then doubling) and
    // the namespace's end discards them as addressed to another host.
    let peer = "10.231.2.2";
    ip(&[
        "neigh",
        "replace",
        peer,
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        ns.host_if(),
        "nud",
        "permanent",
    ])
    .expect("neighbour entry");
    s.write_all(&[b'x'; 1000]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    ip(&["neigh", "del", peer, "dev", ns.host_if()]).expect("neighbour entry");
    s.write_all(b"after").unwrap();
    drop(s);
    let dest = "10.231.2.2:8080";
    let m = scrape_until(&agent, |m| {
        m.value_or_zero(
            "insite_tcp_closed_connections_total",
            &labels("outbound", dest),
        ) >= 1.0
    });
    let _ = server.kill();
    let _ = server.wait();
    let all = |m: &Metrics| m.value_or_zero("insite_tcp_all_retransmits_total", &[]);
    assert!(
        all(&m) - all(&before) >= 2.0,
        "all-socket retransmits: {}",
        all(&m) - all(&before)
    );
    let on_edge = m.value_or_zero("insite_tcp_retransmits_total", &labels("outbound", dest));
    assert!(
        on_edge >= 2.0,
        "retransmits on the edge: {on_edge}\n{}",
        m.0
    );
}

/// The shared harness itself, without an agent: threads that joined the namespace flood a
/// host-side UDP port from two of its addresses and connect to a host-side listener, and the
/// host's counters see each source; the rest of the process stays in the host's namespace.
#[test]
fn namespace_threads_send_from_each_of_its_addresses() {
    use insite_e2e::netns::{tcp_connects, udp_flood, TcpAcceptCounter, UdpCounter};
    use std::net::{IpAddr, Ipv4Addr, UdpSocket};

    insite_e2e::require_root();
    let ns = Netns::new(3).expect("network namespace");
    ns.add_ns_addr("10.231.3.3/24").expect("second address");
    assert!(ns.host_ifindex().expect("ifindex") > 0);
    let second = Ipv4Addr::new(10, 231, 3, 3);
    // Only the threads that join it are in the namespace.
    assert!(UdpSocket::bind((ns.ns_addr(), 0)).is_err());
    let mut rx = UdpCounter::bind(SocketAddr::from((ns.host_addr(), 0))).expect("udp counter");
    let mut server =
        TcpAcceptCounter::bind(SocketAddr::from((ns.host_addr(), 0))).expect("accept counter");
    let (to, tcp_to) = (rx.local_addr(), server.local_addr());

    let dur = Duration::from_millis(400);
    let floods: Vec<_> = [ns.ns_addr(), second]
        .into_iter()
        .map(|src| {
            let h = ns.run(move || udp_flood(SocketAddr::from((src, 0)), to, 5_000, dur, 64));
            (src, h)
        })
        .collect();
    let connects = ns.run(move || {
        tcp_connects(
            IpAddr::from(second),
            tcp_to,
            100,
            dur,
            Duration::from_millis(200),
        )
    });
    let mut sent_by = Vec::new();
    for (src, h) in floods {
        let sent = h
            .join()
            .expect("flood thread")
            .expect("setns")
            .expect("flood");
        assert!((1_900..=2_000).contains(&sent), "{src} sent {sent}");
        sent_by.push((IpAddr::from(src), sent));
    }
    let (attempted, ok) = connects
        .join()
        .expect("connect thread")
        .expect("setns")
        .expect("connects");
    assert!((35..=40).contains(&attempted), "attempted {attempted}");
    assert_eq!(ok, attempted);

    let deadline = Instant::now() + Duration::from_secs(2);
    while server.count() < ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    rx.stop().expect("udp counter");
    server.stop().expect("accept counter");
    assert_eq!(server.count(), ok);
    assert_eq!(rx.drops().expect("drops"), 0);
    let by = rx.by_source();
    for (src, sent) in &sent_by {
        assert_eq!(by.get(src), Some(sent), "{by:?}");
    }
    assert_eq!(rx.count(), sent_by.iter().map(|(_, s)| s).sum::<u64>());
}
