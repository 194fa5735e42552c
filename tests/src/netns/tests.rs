//! On loopback, in the host's namespace: no root needed. The namespace itself is tested
//! end to end (tests/net/netns.rs).

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    time::{Duration, Instant},
};

use super::{
    send::Pacer,
    socket::{sockaddr, sockaddr_ip},
    *,
};

#[test]
fn the_pacer_hands_out_every_slot_on_time() {
    let mut p = Pacer::new(1000, Duration::from_millis(100));
    assert_eq!(p.total, 100);
    // The first slot is due at once.
    assert_eq!(p.due(Duration::ZERO), 1);
    assert_eq!(p.due(Duration::from_micros(999)), 1);
    assert_eq!(p.due(Duration::from_millis(1)), 2);
    // Never more than the total, however late.
    assert_eq!(p.due(Duration::from_secs(5)), 100);
    let mut taken = 0;
    while let Some(n) = p.next(8) {
        assert!((1..=8).contains(&n));
        taken += n;
    }
    let late = p.start.elapsed();
    assert!(taken <= 100);
    // Either every slot was handed out, or the time was over.
    assert!(
        taken == 100 || late >= Duration::from_millis(100),
        "{taken} in {late:?}"
    );
}

#[test]
fn a_paced_flood_arrives_at_its_rate() {
    let mut rx = UdpCounter::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dur = Duration::from_millis(500);
    let sent = udp_flood(
        "127.0.0.1:0".parse().unwrap(),
        rx.local_addr(),
        20_000,
        dur,
        32,
    )
    .unwrap();
    // 10000 slots; a noisy machine may lose a few to a stall at the very end.
    assert!((9_500..=10_000).contains(&sent), "sent {sent}");
    std::thread::sleep(Duration::from_millis(100));
    rx.stop().unwrap();
    assert_eq!(rx.count() + rx.drops().unwrap(), sent);
    let by = rx.by_source();
    assert_eq!(by.len(), 1);
    assert_eq!(by.get(&IpAddr::from([127, 0, 0, 1])), Some(&rx.count()));
}

#[test]
fn paced_connects_are_accepted_and_counted() {
    let mut server = TcpAcceptCounter::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (attempted, ok) = tcp_connects(
        IpAddr::from([127, 0, 0, 1]),
        server.local_addr(),
        200,
        Duration::from_millis(500),
        Duration::from_millis(200),
    )
    .unwrap();
    assert!((90..=100).contains(&attempted), "attempted {attempted}");
    assert_eq!(ok, attempted);
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.count() < ok && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    server.stop().unwrap();
    assert_eq!(server.count(), ok);
}

#[test]
fn connects_to_a_closed_port_fail_without_an_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    let (attempted, ok) = tcp_connects(
        IpAddr::from([127, 0, 0, 1]),
        to,
        100,
        Duration::from_millis(200),
        Duration::from_millis(200),
    )
    .unwrap();
    assert!(attempted >= 15, "attempted {attempted}");
    assert_eq!(ok, 0);
}

#[test]
fn sockaddrs_round_trip() {
    for a in ["10.231.7.3:9000", "[::1]:53"] {
        let a: SocketAddr = a.parse().unwrap();
        let (ss, _) = sockaddr(a);
        assert_eq!(sockaddr_ip(&ss), Some(a.ip()));
    }
}
