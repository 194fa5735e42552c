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

#[test]
fn a_udp_flood_at_10x_is_admitted_at_the_limit() {
    require_root();
    let ns = Netns::new(41).expect("netns");
    let pins = Pins::new("udp10");
    // XDP in the driver (veth has it); the other tests take `auto`, which is TC on veth.
    let agent = start(
        &ns,
        &pins,
        "attach = \"native\"\n[[ratelimit.rules]]\nname = \"udp\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 2000, burst = 100 }\n",
    );
    let got = flood(&ns, ns.ns_addr(), 9000, 20_000, 10, 16);
    let want = 2000 * 10 + 100;
    eprintln!("10x: admitted {got} of {want}");
    assert_eq!(
        agent.data(r#"{"cmd":"limits"}"#)["interfaces"][0]["mode"],
        "xdp-native"
    );
    assert!(within(got, want, 5), "admitted {got}, want {want} +-5%");
    agent.wait_ticks(2);
    let m = agent.scrape();
    let passed = counter(&m, "insite_ratelimit_passed_total", "udp", "source");
    let dropped = counter(&m, "insite_ratelimit_dropped_total", "udp", "source");
    assert!(
        within(passed as u64, got, 2),
        "passed {passed} vs received {got}"
    );
    assert!(dropped > (got * 5) as f64, "dropped {dropped}");
    // The flooding source tops the drops of the last read of the per-source table.
    let top = poll(|| {
        let v = agent.data(r#"{"cmd":"limits_top"}"#);
        let first = v["sources"][0].clone();
        (first["source"] == ns.ns_addr().to_string()).then_some(first)
    });
    assert_eq!(top["rule"], "udp");
    assert!(top["dropped"].as_u64().unwrap_or(0) > 10_000, "{top}");
}

#[test]
fn a_udp_flood_at_100x_from_both_cpus_is_admitted_at_the_limit() {
    require_root();
    let ns = Netns::new(42).expect("netns");
    let pins = Pins::new("udp100");
    let agent = start(
        &ns,
        &pins,
        "attach = \"generic\"\n[[ratelimit.rules]]\nname = \"udp\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 1000, burst = 50 }\n",
    );
    // One source, two sending threads, one on each CPU: the kernel runs the program on both,
    // and the bucket they share admits the rate once.
    let rx = UdpCounter::bind(sa(ns.host_addr(), 9000)).expect("bind");
    let to = sa(ns.host_addr(), 9000);
    let from = ns.ns_addr();
    let senders: Vec<_> = (0..2)
        .map(|cpu| {
            ns.run(move || {
                insite_e2e::netns::pin_current_thread(cpu)?;
                udp_flood(sa(from, 0), to, 50_000, Duration::from_secs(10), 16)
            })
        })
        .collect();
    let sent: u64 = senders
        .into_iter()
        .map(|h| h.join().expect("thread").expect("netns").expect("flood"))
        .sum();
    std::thread::sleep(Duration::from_millis(200));
    let got = rx.count();
    let want = 1000 * 10 + 50;
    eprintln!("100x over two CPUs: sent {sent}, admitted {got} of {want}");
    assert_eq!(
        agent.data(r#"{"cmd":"limits"}"#)["interfaces"][0]["mode"],
        "xdp-generic"
    );
    assert!(sent >= 80_000 * 10 / 2, "the senders managed only {sent}");
    assert!(within(got, want, 5), "admitted {got}, want {want} +-5%");
}

#[test]
fn new_connections_are_limited_per_source_at_10x_and_100x() {
    require_root();
    let ns = Netns::new(43).expect("netns");
    let pins = Pins::new("conn");
    let _agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"syn\"\nprotocol = \"tcp\"\nports = [9100, 9101]\nunit = \"connections\"\nper_source = { rate = 20, burst = 5 }\n",
    );
    // Each factor on its own port: the source's bucket is per rule, so the second run starts
    // with a full burst, as the first did.
    for (factor, port) in [(10u64, 9100u16), (100, 9101)] {
        let mut acc = TcpAcceptCounter::bind(sa(ns.host_addr(), port)).expect("listen");
        let to = sa(ns.host_addr(), port);
        let from = IpAddr::V4(ns.ns_addr());
        let per_sec = 20 * factor;
        let (attempted, ok) = ns
            .run(move || {
                tcp_connects(
                    from,
                    to,
                    per_sec,
                    Duration::from_secs(10),
                    Duration::from_millis(200),
                )
            })
            .join()
            .expect("thread")
            .expect("netns")
            .expect("connects");
        std::thread::sleep(Duration::from_millis(300));
        let accepted = acc.count();
        let _ = acc.stop();
        let want = 20 * 10 + 5;
        eprintln!("connections at {factor}x: attempted {attempted}, established {ok}, accepted {accepted} of {want}");
        assert!(attempted >= per_sec * 9, "attempted only {attempted}");
        assert!(
            within(accepted, want, 5),
            "{factor}x: accepted {accepted}, want {want} +-5%"
        );
    }
}

#[test]
fn a_flooding_source_does_not_starve_a_compliant_one() {
    require_root();
    let ns = Netns::new(44).expect("netns");
    ns.add_ns_addr("10.231.44.3/24").expect("address");
    let pins = Pins::new("isolation");
    let _agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"each\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 1000, burst = 50 }\n",
    );
    let got = floods(&ns, 9000, &[(2, 20_000), (3, 300)], 10);
    eprintln!("a flood and a compliant source: {got:?}");
    assert!(
        got[1] * 100 >= 3000 * 95,
        "compliant source cut to {}",
        got[1]
    );
    assert!(within(got[0], 10_050, 5), "flood: {}", got[0]);
}

#[test]
fn an_aggregate_caps_every_source_together() {
    require_root();
    let ns = Netns::new(50).expect("netns");
    ns.add_ns_addr("10.231.50.3/24").expect("address");
    let pins = Pins::new("aggregate");
    let _agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"tiers\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 1000, burst = 50 }\naggregate = { rate = 1600, burst = 50 }\n",
    );
    let got = floods(&ns, 9000, &[(2, 20_000), (3, 20_000)], 5);
    let total: u64 = got.iter().sum();
    eprintln!("two floods under an aggregate: {got:?}, total {total}");
    // Per source alone would pass 1000/s each (10,000 in all).
    assert!(within(total, 8050, 5), "total {total}, want 8,050 +-5%");
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

#[test]
fn bytes_cost_their_size() {
    require_root();
    let ns = Netns::new(45).expect("netns");
    let pins = Pins::new("bytes");
    let _agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"bytes\"\nprotocol = \"udp\"\nports = [9000]\nunit = \"bytes\"\nper_source = { rate = 100000, burst = 5000 }\n",
    );
    // 1000-byte payloads are 1042-byte frames: 100,000 B/s passes about 96 a second, where a
    // packet limit of the same number would pass all 1000 a second.
    let got = flood(&ns, ns.ns_addr(), 9000, 1000, 10, 1000);
    let want = (100_000 * 10 + 5000) / 1042;
    eprintln!("bytes: admitted {got} of {want}");
    assert!(within(got, want, 5), "admitted {got}, want {want} +-5%");
}

#[test]
fn classes_select_sources_and_the_allowlist_bypasses_every_rule() {
    require_root();
    let ns = Netns::new(46).expect("netns");
    for a in ["10.231.46.3/24", "10.231.46.4/24"] {
        ns.add_ns_addr(a).expect("address");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let class = dir.path().join("lab.cidr");
    std::fs::write(
        &class,
        "# the lab\n10.231.46.3/32\n\n2001:db8::/32 # v6 too\n",
    )
    .expect("class file");
    let pins = Pins::new("classes");
    let _agent = start(
        &ns,
        &pins,
        &format!(
            "allow = [\"10.231.46.4\"]\nclasses = {{ lab = \"{}\" }}\n[[ratelimit.rules]]\nname = \"lab\"\nprotocol = \"udp\"\nports = [9000]\nsources = [\"lab\"]\nper_source = {{ rate = 100, burst = 10 }}\n[[ratelimit.rules]]\nname = \"everyone\"\nprotocol = \"udp\"\nports = [9001]\nper_source = {{ rate = 100, burst = 10 }}\n",
            class.display()
        ),
    );
    // Port 9000: only the class is limited.
    let lab = flood(&ns, Ipv4Addr::new(10, 231, 46, 3), 9000, 1000, 3, 16);
    let other = flood(&ns, Ipv4Addr::new(10, 231, 46, 2), 9000, 1000, 3, 16);
    // Port 9001 limits everyone but the allowlisted source.
    let allowed = flood(&ns, Ipv4Addr::new(10, 231, 46, 4), 9001, 1000, 3, 16);
    let limited = flood(&ns, Ipv4Addr::new(10, 231, 46, 2), 9001, 1000, 3, 16);
    eprintln!("class {lab}, outside it {other}, allowlisted {allowed}, limited {limited}");
    assert!(within(lab, 310, 10), "in the class: {lab}");
    assert!(other >= 2900, "outside the class: {other}");
    assert!(allowed >= 2900, "allowlisted: {allowed}");
    assert!(within(limited, 310, 10), "not allowlisted: {limited}");
}

#[test]
fn the_sliding_window_admits_the_limit() {
    require_root();
    let ns = Netns::new(47).expect("netns");
    let pins = Pins::new("window");
    let _agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"win\"\nprotocol = \"udp\"\nports = [9000]\nalgorithm = \"sliding_window\"\nwindow = \"100ms\"\nper_source = { rate = 1000 }\n",
    );
    let got = flood(&ns, ns.ns_addr(), 9000, 10_000, 10, 16);
    // 100 a window of 100 ms; the flood's first window may add up to one window's 100.
    eprintln!("sliding window: admitted {got} of 10000");
    assert!(within(got, 10_000, 5), "admitted {got}");
}

#[test]
fn raising_a_limit_live_takes_effect_at_once_and_resets_no_other_bucket() {
    require_root();
    let ns = Netns::new(48).expect("netns");
    let pins = Pins::new("live");
    let agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"a\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 100, burst = 10 }\n[[ratelimit.rules]]\nname = \"b\"\nprotocol = \"udp\"\nports = [9001]\nper_source = { rate = 100, burst = 2000 }\n",
    );
    // Drain b's big burst, then raise a.
    let b1 = flood(&ns, ns.ns_addr(), 9001, 5000, 2, 16);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a.toml");
    std::fs::write(&file, "[[rules]]\nname = \"a\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 2000, burst = 10 }\n").expect("rules file");
    let out = agent.cli(&["limits", "set", file.to_str().unwrap_or_default()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = flood(&ns, ns.ns_addr(), 9000, 5000, 2, 16);
    // b kept its drained bucket: 2 s refill, no new burst of 2000.
    let b2 = flood(&ns, ns.ns_addr(), 9001, 5000, 2, 16);
    eprintln!("b drained {b1}; a after the change {a}; b after it {b2}");
    assert!(b1 >= 2000, "b's burst: {b1}");
    assert!(within(a, 4010, 5), "a at its new rate: {a}");
    // Refilled at 100/s since it was drained; a reset bucket would pass its 2000 again.
    assert!(b2 <= 1000, "b's bucket was reset: {b2}");
    let v = agent.data(r#"{"cmd":"limits"}"#);
    let rules = v["rules"].as_array().cloned().unwrap_or_default();
    let a = rules
        .iter()
        .find(|r| r["rule"]["name"] == "a")
        .expect("rule a listed");
    assert_eq!(a["origin"], "limits set");
    assert_eq!(a["rule"]["per_source"]["rate"], 2000);
}

#[test]
fn invalid_rules_are_refused_by_name_and_field_and_the_running_ones_stay() {
    require_root();
    let ns = Netns::new(49).expect("netns");
    let pins = Pins::new("bad");
    let agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"keep\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 100, burst = 10 }\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (body, expect) in [
        ("[[rules]]\nname = \"z\"\nper_source = { rate = 0 }\n", "rules[z].per_source.rate"),
        ("[[rules]]\nname = \"c\"\nsources = [\"10.0.0.0/33\"]\nper_source = { rate = 5 }\n", "rules[c].sources"),
        ("[[rules]]\nname = \"u\"\nper_source = { rate = 5 }\ncolour = \"red\"\n", "colour"),
        ("[[rules]]\nname = \"e\"\ndirection = \"egress\"\nunit = \"connections\"\nper_source = { rate = 5 }\n", "rules[e].service"),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, body).expect("rules file");
        let out = agent.cli(&["limits", "set", file.to_str().unwrap_or_default()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {body}");
        assert!(err.contains(expect), "{expect:?} not in {err}");
    }
    let v = agent.data(r#"{"cmd":"limits"}"#);
    let names: Vec<String> = v["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|r| r["rule"]["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(names, ["keep"]);
    // Still enforced.
    let got = flood(&ns, ns.ns_addr(), 9000, 1000, 2, 16);
    assert!(within(got, 210, 10), "{got}");
}

#[test]
fn connects_from_a_limited_service_get_eperm_or_econnrefused_and_other_cgroups_do_not() {
    require_root();
    let Some(root) = insite_e2e::cgroup2_root() else {
        panic!("no cgroup2 hierarchy");
    };
    let name = format!("insite-e2e-rl-{}.service", std::process::id());
    let cg = root.join(&name);
    std::fs::create_dir(&cg).expect("test cgroup");
    let _rm = insite_e2e::RemoveDirOnDrop(cg.clone());
    let ns = Netns::new(51).expect("netns");
    let pins = Pins::new("egress");
    let agent = start(
        &ns,
        &pins,
        &format!("[[ratelimit.rules]]\nname = \"out\"\ndirection = \"egress\"\nservice = \"{name}\"\nprotocol = \"tcp\"\nunit = \"connections\"\nper_source = {{ rate = 10, burst = 5 }}\n"),
    );
    let mut acc = TcpAcceptCounter::bind(sa(Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let port = acc.local_addr().port();
    // 100 connects in about a second from inside the cgroup, then from outside it.
    let script = format!(
        "import socket,time,errno\nok=perm=refused=other=0\nfor i in range(100):\n    s=socket.socket()\n    try:\n        s.connect(('127.0.0.1',{port})); ok+=1\n    except OSError as e:\n        if e.errno==errno.EPERM: perm+=1\n        elif e.errno==errno.ECONNREFUSED: refused+=1\n        else: other+=1\n    s.close(); time.sleep(0.01)\nprint(ok,perm,refused,other)\n"
    );
    let run = |inside: bool| -> (u64, u64, u64, u64) {
        let cmd = if inside {
            format!(
                "echo $$ > {}/cgroup.procs && exec python3 -c \"$0\"",
                cg.display()
            )
        } else {
            "exec python3 -c \"$0\"".to_string()
        };
        let out = std::process::Command::new("sh")
            .args(["-c", &cmd, &script])
            .output()
            .expect("python");
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(
            v.len(),
            4,
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (v[0], v[1], v[2], v[3])
    };
    let inside = run(true);
    let outside = run(false);
    // The same rule answering ECONNREFUSED instead, changed live.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("out.toml");
    std::fs::write(
        &file,
        format!("[[rules]]\nname = \"out\"\ndirection = \"egress\"\nservice = \"{name}\"\nprotocol = \"tcp\"\nunit = \"connections\"\nrefuse_with = \"econnrefused\"\nper_source = {{ rate = 10, burst = 5 }}\n"),
    )
    .expect("rules file");
    let out = agent.cli(&["limits", "set", file.to_str().unwrap_or_default()]);
    assert!(out.status.success(), "{out:?}");
    let refused = run(true);
    let _ = acc.stop();
    eprintln!("egress: inside (ok, eperm, econnrefused, other) {inside:?}, outside {outside:?}, refusing {refused:?}");
    let v = agent.data(r#"{"cmd":"limits"}"#);
    assert_eq!(v["egress_hooked"], true, "{}", agent.probe("ratelimit"));
    // About 1.1 s of connects at 10/s with a burst of 5: 15 or so pass.
    assert!((10..=22).contains(&inside.0), "inside passed {}", inside.0);
    assert_eq!(
        inside.0 + inside.1,
        100,
        "every refusal is EPERM: {inside:?}"
    );
    assert_eq!(outside, (100, 0, 0, 0));
    assert!((8..=22).contains(&refused.0), "{refused:?}");
    assert_eq!(
        refused.0 + refused.2,
        100,
        "every refusal is ECONNREFUSED: {refused:?}"
    );
}

#[test]
fn enforcement_survives_a_killed_agent_and_the_next_one_adopts_it() {
    require_root();
    let ns = Netns::new(52).expect("netns");
    let pins = Pins::new("restart");
    let rules = "[[ratelimit.rules]]\nname = \"udp\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 1000, burst = 50 }\n";
    let mut agent = start(&ns, &pins, rules);
    let first = flood(&ns, ns.ns_addr(), 9000, 10_000, 2, 16);
    agent.wait_ticks(2);
    let before = agent.scrape();
    agent.signal(libc::SIGKILL);
    let _ = agent.child.wait();
    // Nobody in userspace now: the pinned program goes on limiting.
    let down = flood(&ns, ns.ns_addr(), 9000, 10_000, 3, 16);
    drop(agent);
    let agent = start(&ns, &pins, rules);
    agent.wait_ticks(2);
    let after = agent.scrape();
    let v = agent.data(r#"{"cmd":"limits"}"#);
    let dropped = |m: &Metrics| counter(m, "insite_ratelimit_dropped_total", "udp", "source");
    eprintln!(
        "first {first}, while down {down}; dropped {} then {}; adopted {}",
        dropped(&before),
        dropped(&after),
        v["adopted_maps"]
    );
    assert!(within(first, 2050, 5), "{first}");
    assert!(within(down, 3000, 5), "while the agent was down: {down}");
    assert!(v["adopted_maps"].as_u64().unwrap_or(0) >= 9, "{v}");
    // The counters went on in the kernel: the new agent shows the drops made while it was away.
    assert!(
        dropped(&after) >= dropped(&before) + 20_000.0,
        "before {}, after {}",
        dropped(&before),
        dropped(&after)
    );
}

#[test]
fn tc_ingress_enforces_the_same_rules() {
    require_root();
    let ns = Netns::new(53).expect("netns");
    let pins = Pins::new("tc");
    let agent = start(
        &ns,
        &pins,
        "attach = \"tc\"\n[[ratelimit.rules]]\nname = \"udp\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 1000, burst = 50 }\n",
    );
    let v = agent.data(r#"{"cmd":"limits"}"#);
    assert_eq!(v["interfaces"][0]["mode"], "tc", "{v}");
    assert!(agent.probe("ratelimit")["attach"]
        .as_str()
        .unwrap_or_default()
        .contains("(tc)"));
    let got = flood(&ns, ns.ns_addr(), 9000, 10_000, 5, 16);
    eprintln!("tc: admitted {got} of 5050");
    assert!(within(got, 5050, 5), "admitted {got}");
    assert!(pins
        .0
        .join("v1/links")
        .join(format!("tc-{}", ns.host_if()))
        .exists());
}

#[test]
fn the_new_source_budget_fails_open_or_closed_per_rule() {
    require_root();
    let ns = Netns::new(54).expect("netns");
    let hosts: Vec<u8> = (10..16).collect();
    for h in &hosts {
        ns.add_ns_addr(&format!("10.231.54.{h}/24"))
            .expect("address");
    }
    let pins = Pins::new("budget");
    let agent = start(
        &ns,
        &pins,
        "new_sources = { rate = 1, burst = 3 }\n[[ratelimit.rules]]\nname = \"closed\"\nprotocol = \"udp\"\nports = [9000]\nfail = \"closed\"\nper_source = { rate = 100000 }\n[[ratelimit.rules]]\nname = \"open\"\nprotocol = \"udp\"\nports = [9001]\nper_source = { rate = 100000 }\n",
    );
    let srcs: Vec<(u8, u64)> = hosts.iter().map(|&h| (h, 50)).collect();
    // Six new sources at once with room for three (and one more a second): the rest are
    // dropped under the fail-closed rule...
    let closed = floods(&ns, 9000, &srcs, 1);
    // ...and pass unlimited under the fail-open one (the budget is spent by now).
    let open = floods(&ns, 9001, &srcs, 1);
    eprintln!("new sources: closed {closed:?}, open {open:?}");
    let starved = closed.iter().filter(|&&n| n == 0).count();
    assert!(starved >= 2, "closed: {closed:?}");
    assert!(open.iter().all(|&n| n >= 45), "open: {open:?}");
    agent.wait_ticks(2);
    let m = agent.scrape();
    assert!(counter(&m, "insite_ratelimit_dropped_total", "closed", "new_source") >= 90.0);
    assert!(counter(&m, "insite_ratelimit_passed_total", "open", "new_source") >= 90.0);
    assert!(m.value_or_zero("insite_ratelimit_sources_total", &[("event", "refused")]) >= 4.0);
}

#[test]
fn ipv6_sources_and_classes_are_limited() {
    require_root();
    let ns = Netns::new(55).expect("netns");
    insite_e2e::netns::ip(&[
        "-6",
        "addr",
        "add",
        "fd00:231:55::1/64",
        "dev",
        ns.host_if(),
        "nodad",
    ])
    .expect("host v6");
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:231:55::2/64",
        "dev",
        ns.ns_if(),
        "nodad",
    ])
    .expect("ns v6");
    ns.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:231:55::3/64",
        "dev",
        ns.ns_if(),
        "nodad",
    ])
    .expect("ns v6");
    let dir = tempfile::tempdir().expect("tempdir");
    let class = dir.path().join("v6.cidr");
    std::fs::write(&class, "fd00:231:55::2/128\n").expect("class file");
    let pins = Pins::new("v6");
    let _agent = start(
        &ns,
        &pins,
        &format!(
            "classes = {{ six = \"{}\" }}\n[[ratelimit.rules]]\nname = \"v6\"\nprotocol = \"udp\"\nports = [9000]\nsources = [\"six\"]\nper_source = {{ rate = 500, burst = 20 }}\n",
            class.display()
        ),
    );
    let host: IpAddr = "fd00:231:55::1".parse::<Ipv6Addr>().expect("addr").into();
    let rx = UdpCounter::bind(SocketAddr::new(host, 9000)).expect("bind");
    let to = SocketAddr::new(host, 9000);
    let hs: Vec<_> = ["fd00:231:55::2", "fd00:231:55::3"]
        .into_iter()
        .map(|a| {
            let from = SocketAddr::new(a.parse::<Ipv6Addr>().expect("addr").into(), 0);
            ns.run(move || udp_flood(from, to, 5000, Duration::from_secs(4), 16))
        })
        .collect();
    for h in hs {
        h.join().expect("thread").expect("netns").expect("flood");
    }
    std::thread::sleep(Duration::from_millis(200));
    let by = rx.by_source();
    let got = |a: &str| *by.get(&a.parse::<IpAddr>().expect("addr")).unwrap_or(&0);
    let (limited, free) = (got("fd00:231:55::2"), got("fd00:231:55::3"));
    eprintln!("v6: in the class {limited}, outside it {free}");
    assert!(within(limited, 2020, 5), "in the class: {limited}");
    assert!(free >= 19_000, "outside the class: {free}");
}

#[test]
fn load_adaptation_scales_a_rule_under_cpu_pressure_and_back() {
    require_root();
    let ns = Netns::new(56).expect("netns");
    let pins = Pins::new("adaptive");
    let agent = start(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"calm\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 400, burst = 10 }\nadaptive = { pressure = \"cpu\", above = 0.3, factor = 0.25, below = 0.2 }\n",
    );
    let scale = || {
        agent
            .scrape()
            .value("insite_ratelimit_scale", &[("rule", "calm")])
    };
    assert_eq!(scale(), Some(1.0));
    // More runnable threads than CPUs: tasks wait for a CPU, which PSI counts as pressure.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(60);
    while scale() != Some(0.25) {
        assert!(Instant::now() < until, "never scaled down: {}", agent.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    // The kernel enforces the scaled rate: 100/s.
    let m = agent.scrape();
    assert_eq!(
        m.value(
            "insite_ratelimit_rate",
            &[("rule", "calm"), ("level", "source")]
        ),
        Some(100.0)
    );
    let scaled = flood(&ns, ns.ns_addr(), 9000, 2000, 3, 16);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        let _ = h.join();
    }
    let until = Instant::now() + Duration::from_secs(90);
    while scale() != Some(1.0) {
        assert!(Instant::now() < until, "never scaled back: {}", agent.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let back = flood(&ns, ns.ns_addr(), 9000, 2000, 3, 16);
    eprintln!("adaptive: scaled {scaled} in 3 s, back {back}");
    assert!(within(scaled, 310, 10), "scaled down: {scaled}");
    assert!(within(back, 1210, 10), "back up: {back}");
    let m = agent.scrape();
    assert!(m.value_or_zero("insite_ratelimit_adaptations_total", &[]) >= 2.0);
    assert!(agent
        .log()
        .contains("rate limit scaled down under pressure"));
}

#[test]
fn only_a_privileged_client_may_change_the_rules() {
    require_root();
    let ns = Netns::new(57).expect("netns");
    let pins = Pins::new("privileged");
    let agent = start_with(
        &ns,
        &pins,
        "[[ratelimit.rules]]\nname = \"keep\"\nprotocol = \"udp\"\nports = [9000]\nper_source = { rate = 100 }\n",
        "group = \"nogroup\"\n",
    );
    let bin = world_executable_copy(agent.dir.path());
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let file = agent.dir.path().join("more.toml");
    std::fs::write(
        &file,
        "[[rules]]\nname = \"more\"\nper_source = { rate = 5 }\n",
    )
    .expect("file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let sock = agent.socket.to_str().unwrap_or_default().to_string();
    let f = file.to_str().unwrap_or_default().to_string();
    for args in [
        vec!["limits", "set", f.as_str()],
        vec!["limits", "del", "keep"],
        vec!["limits", "flush"],
    ] {
        let mut a = args.clone();
        a.extend(["--control-socket", sock.as_str()]);
        let out = run_as_nobody(&bin, &a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("permission denied"),
            "{args:?}: {err}"
        );
    }
    // Reading is fine, and nothing changed.
    let out = run_as_nobody(&bin, &["limits", "--json", "--control-socket", &sock]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["rules"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["state"], "enforcing");
    assert!(within(flood(&ns, ns.ns_addr(), 9000, 1000, 2, 16), 300, 10));
    // Root flushes: programs detached, pins gone, traffic unlimited.
    let out = agent.cli(&["limits", "flush"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(agent.data(r#"{"cmd":"limits"}"#)["state"], "flushed");
    assert!(!pins.0.join("v1").exists());
    assert_eq!(flood(&ns, ns.ns_addr(), 9000, 1000, 2, 16), 2000);
}
