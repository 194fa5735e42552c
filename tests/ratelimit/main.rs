//! The rate-limit family against the real kernel: XDP on a veth pair's host side, traffic
//! from a network namespace, cgroup connect hooks for a test cgroup. Every test needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use insite_e2e::{
    netns::{tcp_connects, udp_flood, Netns, TcpAcceptCounter, UdpCounter},
    require_root, run_as_nobody, world_executable_copy, Agent, Launch, Metrics,
};

/// Polls `f` for up to 15 s.
fn poll<T>(f: impl Fn() -> Option<T>) -> T {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < until, "condition not met within 15 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const ONLY: &str = "[syscalls]\nenabled = false\n[net]\nenabled = false\n[db]\nenabled = false\n";

/// A pin directory of its own per test, removed (with every pin in it) when dropped.
struct Pins(PathBuf);

impl Pins {
    fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/insite-e2e-{}-{tag}",
            std::process::id()
        )))
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(ns: &Netns, pins: &Pins, rules: &str) -> Agent {
    start_with(ns, pins, rules, "")
}

fn start_with(ns: &Netns, pins: &Pins, rules: &str, control_extra: &str) -> Agent {
    let extra = format!(
        "{ONLY}[ratelimit]\ninterfaces = [\"{}\"]\npin_dir = \"{}\"\n{rules}",
        ns.host_if(),
        pins.0.display()
    );
    Agent::try_launch(Launch {
        extra: &extra,
        control_extra,
        probes: &["ratelimit"],
        ..Default::default()
    })
    .expect("agent starts with the rules")
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Floods from `from` in the namespace to the host's `port` at `pps` for `secs`; returns what
/// the host's socket received from that source.
fn flood(ns: &Netns, from: Ipv4Addr, port: u16, pps: u64, secs: u64, payload: usize) -> u64 {
    let rx = UdpCounter::bind(sa(ns.host_addr(), port)).expect("bind the receiver");
    let to = sa(ns.host_addr(), port);
    let sent = ns
        .run(move || udp_flood(sa(from, 0), to, pps, Duration::from_secs(secs), payload))
        .join()
        .expect("sender thread")
        .expect("joined the namespace")
        .expect("flood");
    std::thread::sleep(Duration::from_millis(200));
    let got = *rx.by_source().get(&IpAddr::V4(from)).unwrap_or(&0);
    assert!(
        sent >= pps * secs * 8 / 10,
        "the sender managed only {sent} datagrams"
    );
    got
}

fn within(got: u64, want: u64, pct: u64) -> bool {
    got.abs_diff(want) * 100 <= want * pct
}

fn counter(m: &Metrics, name: &str, rule: &str, level: &str) -> f64 {
    m.value_or_zero(name, &[("rule", rule), ("level", level)])
}

/// Floods from 10.231.<ns>.<host> at each pps at once; returns what arrived from each.
fn floods(ns: &Netns, port: u16, srcs: &[(u8, u64)], secs: u64) -> Vec<u64> {
    let rx = UdpCounter::bind(sa(ns.host_addr(), port)).expect("bind");
    let to = sa(ns.host_addr(), port);
    let base = ns.ns_addr().octets();
    let ips: Vec<Ipv4Addr> = srcs
        .iter()
        .map(|&(h, _)| Ipv4Addr::new(base[0], base[1], base[2], h))
        .collect();
    let hs: Vec<_> = srcs
        .iter()
        .zip(&ips)
        .map(|(&(_, pps), &from)| {
            ns.run(move || udp_flood(sa(from, 0), to, pps, Duration::from_secs(secs), 16))
        })
        .collect();
    for h in hs {
        h.join().expect("thread").expect("netns").expect("flood");
    }
    std::thread::sleep(Duration::from_millis(200));
    let by = rx.by_source();
    ips.iter()
        .map(|ip| *by.get(&IpAddr::V4(*ip)).unwrap_or(&0))
        .collect()
}

mod control;
mod egress;
mod ingress;
