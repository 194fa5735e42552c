//! Ingress: how exactly each kind of rule admits what it should, at XDP and at TC.

use super::*;

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
fn an_interface_named_with_quotes_and_backslashes_is_escaped_where_it_is_written() {
    require_root();
    // Linux allows quotes and backslashes in a link's name (not '/', ':' or whitespace).
    let host = format!("q\"{}\\x", std::process::id() % 10_000);
    let peer = format!("qp{}", std::process::id() % 10_000);
    insite_e2e::netns::ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])
        .expect("a veth with a quote in its name");
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = insite_e2e::netns::ip(&["link", "del", &self.0]);
        }
    }
    let _gone = Gone(host.clone());
    let pins = Pins::new("quoted");
    let toml_name = host.replace('\\', "\\\\").replace('"', "\\\"");
    let extra = format!(
        "{ONLY}[ratelimit]\ninterfaces = [\"{toml_name}\"]\npin_dir = \"{}\"\n[[ratelimit.rules]]\nname = \"q\"\nprotocol = \"udp\"\nports = [9000]\nper_source = {{ rate = 10 }}\n",
        pins.0.display()
    );
    let agent = Agent::try_launch(Launch {
        extra: &extra,
        probes: &["ratelimit"],
        ..Default::default()
    })
    .expect("agent starts");
    // JSON carries the name exactly.
    let v = agent.data(r#"{"cmd":"limits"}"#);
    assert_eq!(v["interfaces"][0]["interface"], host.as_str(), "{v}");
    // The log quotes it as one field, escapes included.
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("rate limits attached"))
        .unwrap_or_default();
    let escaped = format!("interface={:?}", host);
    assert!(line.contains(&escaped), "{escaped} not in {line}");
    // The CLI's table shows the backslash escaped, on one line.
    let out = agent.cli(&["limits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.contains("ingress on"))
        .unwrap_or_default();
    assert!(row.contains("\\\\x"), "{text}");
}
