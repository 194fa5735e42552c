//! Egress: a service's connects, limited by its cgroup.

use super::*;

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
