//! Rules changed live, refused, adapted, guarded, and enforced across a restart.

use super::*;

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
