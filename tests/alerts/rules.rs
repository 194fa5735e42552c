//! Rule files: refused with where and why, the running rules kept; promtool and the agent on
//! every rule file in the repository.

use super::*;

#[test]
fn rule_files_refused_with_file_group_rule_and_reason_and_the_running_rules_stay() {
    insite_e2e::require_root();
    let state = tempfile::tempdir().unwrap();
    let rules = state.path().join("rules.yml");
    std::fs::copy(rules_dir().join("refused/function.yml"), &rules).unwrap();
    let extra = alerts_config(state.path(), std::slice::from_ref(&rules), &[]);
    let mut agent = Agent::launch(Launch {
        extra: &extra,
        probes: &["alerts"],
        ..Launch::default()
    });
    // At start: running, with no rules, and saying why.
    let v = agent.data(r#"{"cmd":"alerts"}"#);
    assert_eq!(v["rules"], 0);
    let why = v["refused"].as_str().unwrap();
    for part in [
        rules.to_str().unwrap(),
        "group \"functions\"",
        "rule \"Relabelled\"",
        "label_replace",
    ] {
        assert!(why.contains(part), "{part} not in: {why}");
    }
    // A good file on SIGHUP: loaded.
    std::fs::copy(rules_dir().join("connect-refused.yml"), &rules).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.data(r#"{"cmd":"alerts"}"#)["rules"] != 1 {
        assert!(Instant::now() < deadline, "not reloaded: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.data(r#"{"cmd":"alerts"}"#)["refused"].is_null());
    // Bad again: refused, the running rule stays.
    std::fs::copy(rules_dir().join("refused/template.yml"), &rules).unwrap();
    agent.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = agent.data(r#"{"cmd":"alerts"}"#);
        if let Some(why) = v["refused"].as_str() {
            assert!(
                why.contains("rule \"Ranged\"") && why.contains("range"),
                "{why}"
            );
            assert_eq!(v["rules"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "not refused: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.check_running().unwrap();
}

/// Every rule file in the repository is accepted by promtool; the agent accepts the good
/// ones and refuses each in `tests/rules/refused` naming what it cannot evaluate.
#[test]
fn rule_files_pass_promtool_and_the_agent_says_what_it_refuses() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut good: Vec<PathBuf> = std::fs::read_dir(root.join("systemd/rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    good.push(rules_dir().join("connect-refused.yml"));
    let refused: Vec<PathBuf> = std::fs::read_dir(rules_dir().join("refused"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(good.len() >= 2 && refused.len() >= 3);
    for f in good.iter().chain(&refused) {
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(f)
            .output()
            .expect("promtool (cargo xtask setup --tests installs it)");
        assert!(
            out.status.success(),
            "promtool refused {}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    for f in &good {
        let out = Command::new(agent_bin())
            .args(["alerts", "check"])
            .arg(f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (f, says) in [
        ("recording.yml", "recording rules are not supported"),
        ("function.yml", "label_replace"),
        ("template.yml", "range"),
    ] {
        let path = rules_dir().join("refused").join(f);
        let out = Command::new(agent_bin())
            .args(["alerts", "check"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{f} accepted");
        assert!(
            err.contains(path.to_str().unwrap())
                && err.contains("group")
                && err.contains("rule")
                && err.contains(says),
            "{f}: {err}"
        );
    }
}
