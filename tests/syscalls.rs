//! The syscall probe, end to end: real kernel, real agent, known workloads.

use insite_e2e::{getppid_calls, nanosleep_calls, Agent};

/// The mode whose counts are exact (the default, sampled, counts only inside its windows).
const FULL: &str = "[syscalls]\nmode = \"full\"\n";

const LE_33MS: &str = "0.033554432"; // 2^25 ns
const LE_67MS: &str = "0.067108864"; // 2^26 ns

fn hist_bucket(m: &insite_e2e::Metrics, syscall: &str, le: &str) -> f64 {
    m.value_or_zero(
        "insite_syscall_duration_seconds_bucket",
        &[("syscall", syscall), ("le", le)],
    )
}

fn count(m: &insite_e2e::Metrics, syscall: &str) -> f64 {
    m.value_or_zero(
        "insite_syscall_duration_seconds_count",
        &[("syscall", syscall)],
    )
}

/// Calls of `syscall` counted between two scrapes.
fn delta(before: &insite_e2e::Metrics, after: &insite_e2e::Metrics, syscall: &str) -> f64 {
    count(after, syscall) - count(before, syscall)
}

#[test]
fn workload_is_counted_and_sleeps_land_in_their_bucket() {
    let agent = Agent::start(FULL);
    let before = agent.scrape();
    getppid_calls(20_000);
    nanosleep_calls(5, 50);
    agent.wait_ticks(2);
    let after = agent.scrape();
    for le in [LE_33MS, LE_67MS] {
        assert!(
            after
                .value(
                    "insite_syscall_duration_seconds_bucket",
                    &[("syscall", "nanosleep"), ("le", le)]
                )
                .is_some(),
            "no le={le} bucket in the scrape"
        );
    }

    let getppid = delta(&before, &after, "getppid");
    assert!(getppid >= 20_000.0, "getppid counted {getppid}, made 20000");

    // 50 ms sleeps: above 2^25 ns (33.5 ms), at most 2^26 ns (67.1 ms).
    let in_bucket = (hist_bucket(&after, "nanosleep", LE_67MS)
        - hist_bucket(&after, "nanosleep", LE_33MS))
        - (hist_bucket(&before, "nanosleep", LE_67MS) - hist_bucket(&before, "nanosleep", LE_33MS));
    assert!(
        in_bucket >= 5.0,
        "50 ms sleeps in (33.5 ms, 67.1 ms]: {in_bucket}"
    );
    let sum = after.value_or_zero(
        "insite_syscall_duration_seconds_sum",
        &[("syscall", "nanosleep")],
    ) - before.value_or_zero(
        "insite_syscall_duration_seconds_sum",
        &[("syscall", "nanosleep")],
    );
    assert!(sum >= 0.25, "nanosleep time {sum}s, slept 5 x 50 ms");
}

#[test]
fn pid_filter_counts_exactly_this_process() {
    let me = std::process::id();
    let agent = Agent::start(&format!("[syscalls]\nmode = \"full\"\npids = [{me}]\n"));
    let before = agent.scrape();
    getppid_calls(12_345);
    nanosleep_calls(3, 20);
    // Children are other processes: their execve must not be counted.
    for _ in 0..5 {
        let _ = std::process::Command::new("/bin/true").status();
    }
    agent.wait_ticks(2);
    let after = agent.scrape();
    assert_eq!(delta(&before, &after, "getppid"), 12_345.0);
    assert_eq!(delta(&before, &after, "nanosleep"), 3.0);
    assert_eq!(delta(&before, &after, "execve"), 0.0);
    // The agent's own reads of the maps are another process too.
    assert_eq!(count(&after, "bpf"), 0.0);
}

#[test]
fn syscall_set_filter_keeps_only_named_syscalls() {
    let agent = Agent::start("[syscalls]\nmode = \"full\"\nsyscalls = [\"getppid\"]\n");
    getppid_calls(1_000);
    nanosleep_calls(1, 1);
    agent.wait_ticks(2);
    let m = agent.scrape();
    assert!(count(&m, "getppid") >= 1_000.0);
    for other in ["nanosleep", "read", "bpf", "epoll_wait"] {
        assert_eq!(
            m.value(
                "insite_syscall_duration_seconds_count",
                &[("syscall", other)]
            ),
            None,
            "{other} should not be traced"
        );
    }
}

#[test]
fn slow_calls_are_reported_with_process_and_duration() {
    let me = std::process::id();
    let agent = Agent::start("[syscalls]\nmode = \"full\"\nslow_threshold = \"10ms\"\n");
    nanosleep_calls(3, 30);
    getppid_calls(100);
    agent.wait_ticks(2);
    let v = agent.data(r#"{"cmd":"syscalls","window":"10s","limit":512}"#);
    let slow: Vec<&serde_json::Value> = v["slow_calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["pid"] == me && c["syscall"] == "nanosleep")
        .collect();
    assert_eq!(slow.len(), 3, "{v:#}");
    for c in slow {
        assert!(c["duration_ns"].as_u64().unwrap() >= 30_000_000, "{c}");
        assert_eq!(c["ret"], 0);
        assert!(c["cgroup_id"].as_u64().unwrap() > 0);
    }
    // No getppid call takes 10 ms: none may be reported as slow.
    assert!(!v["slow_calls"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["pid"] == me && c["syscall"] == "getppid"));
    let status = agent.data(r#"{"cmd":"status"}"#);
    let ev = &status["events"][0];
    assert_eq!(ev["stream"], "syscall_slow");
    assert!(ev["total"].as_u64().unwrap() >= 3);
    let m = agent.scrape();
    assert!(m.value_or_zero("insite_ringbuf_events_total", &[("ring", "syscall_slow")]) >= 3.0);
    assert_eq!(
        m.value("insite_ringbuf_drops_total", &[("ring", "syscall_slow")]),
        Some(0.0)
    );
}

#[test]
fn errors_are_counted() {
    let me = std::process::id();
    let agent = Agent::start(&format!("[syscalls]\nmode = \"full\"\npids = [{me}]\n"));
    let before = agent.scrape();
    for _ in 0..50 {
        // close(-1) fails with EBADF every time.
        // SAFETY: closing an invalid fd has no effect besides the error.
        unsafe { libc::syscall(libc::SYS_close, -1i64) };
    }
    agent.wait_ticks(2);
    let after = agent.scrape();
    let errs = after.value_or_zero("insite_syscall_errors_total", &[("syscall", "close")])
        - before.value_or_zero("insite_syscall_errors_total", &[("syscall", "close")]);
    assert_eq!(errs, 50.0);
}

#[test]
fn raw_tracepoint_attachment_works_too() {
    let agent = Agent::start("[syscalls]\nmode = \"full\"\nattach = \"raw_tracepoint\"\n");
    let probe = agent.probe("syscalls");
    assert_eq!(probe["state"], "attached");
    assert_eq!(probe["attach"], "raw_tracepoint");
    let before = agent.scrape();
    getppid_calls(5_000);
    agent.wait_ticks(2);
    let after = agent.scrape();
    assert!(delta(&before, &after, "getppid") >= 5_000.0);
}

#[test]
fn cli_views_show_the_workload() {
    let agent = Agent::start(FULL);
    getppid_calls(50_000);
    agent.wait_ticks(2);
    let out = agent.cli(&["syscalls", "--window", "10s"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("top by count:"), "{text}");
    assert!(text.contains("getppid"), "{text}");

    let out = agent.cli(&["syscalls", "--window", "10s", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = v["by_count"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["syscall"] == "getppid")
        .cloned()
        .expect("getppid row");
    assert!(row["count"].as_u64().unwrap() >= 50_000);
    assert!(row["p99_us"].as_f64().unwrap() > 0.0);

    let bad = agent.cli(&["syscalls", "--window", "2h"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("window"));
}

#[test]
fn comm_filter_traces_only_named_threads() {
    // comm is per thread: a thread named by the test is its own selector.
    let agent = Agent::start("[syscalls]\nmode = \"full\"\ncomms = [\"isa-comm-probe\"]\n");
    let before = agent.scrape();
    std::thread::Builder::new()
        .name("isa-comm-probe".into())
        .spawn(|| getppid_calls(4_321))
        .unwrap()
        .join()
        .unwrap();
    getppid_calls(10_000); // this thread's comm is not selected
    agent.wait_ticks(2);
    let after = agent.scrape();
    assert_eq!(delta(&before, &after, "getppid"), 4_321.0);
}

#[test]
fn cgroup_filter_traces_only_that_cgroup() {
    use std::os::unix::process::CommandExt as _;
    let root = insite_e2e::cgroup2_root().expect("a cgroup2 hierarchy");
    let name = format!("insite-e2e-{}", std::process::id());
    let dir = root.join(&name);
    std::fs::create_dir(&dir).unwrap();
    let _cleanup = insite_e2e::RemoveDirOnDrop(dir.clone());

    let agent = Agent::start(&format!(
        "[syscalls]\nmode = \"full\"\ncgroups = [\"/{name}\"]\n"
    ));
    assert!(
        agent.probe("syscalls")["error"].is_null(),
        "{}",
        agent.probe("syscalls")
    );
    let before = agent.scrape();
    let procs = dir.join("cgroup.procs");
    let mut child = std::process::Command::new("python3");
    child.args([
        "-c",
        "import os, time\nfor _ in range(3000): os.getppid()\ntime.sleep(0.03)",
    ]);
    // SAFETY: only async-signal-safe calls (write to a file) between fork and exec.
    unsafe {
        child.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    assert!(child.status().unwrap().success());
    getppid_calls(20_000); // outside the cgroup
    agent.wait_ticks(2);
    let after = agent.scrape();
    let got = delta(&before, &after, "getppid");
    assert!(
        (3_000.0..20_000.0).contains(&got),
        "getppid in the cgroup: {got}"
    );
    // The child's 30 ms sleep is a slow call, attributed to its cgroup by path.
    let v = agent.data(r#"{"cmd":"syscalls","limit":512}"#);
    let cg = format!("/{name}");
    let slow = v["slow_calls"].as_array().unwrap();
    assert!(
        slow.iter().any(|c| c["cgroup"] == cg.as_str()
            && c["duration_ns"].as_u64().unwrap() >= 30_000_000),
        "no slow call from {cg}: {v:#}"
    );
}

#[test]
fn missing_cgroup_is_reported_not_fatal() {
    let agent =
        Agent::start("[syscalls]\nmode = \"full\"\ncgroups = [\"/no/such/insite/cgroup\"]\n");
    let probe = agent.probe("syscalls");
    assert_eq!(probe["state"], "attached");
    assert!(
        probe["error"]
            .as_str()
            .unwrap_or("")
            .contains("/no/such/insite/cgroup"),
        "{probe}"
    );
    getppid_calls(1_000);
    agent.wait_ticks(2);
    // Only the missing cgroup was asked for: nothing is traced.
    assert_eq!(
        agent.scrape().value(
            "insite_syscall_duration_seconds_count",
            &[("syscall", "getppid")]
        ),
        None
    );
}

#[test]
fn blocking_calls_across_threads_are_each_timed_once() {
    // Sleeping calls switch out mid-call (their start is parked in task storage and found
    // again on whatever CPU they wake on); getppid never does (per-CPU fast path). Both must be
    // counted exactly, with sleeps timed at least as long as they slept.
    let me = std::process::id();
    let agent = Agent::start(&format!("[syscalls]\nmode = \"full\"\npids = [{me}]\n"));
    let before = agent.scrape();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..500 {
                    getppid_calls(1);
                    insite_e2e::nanosleep_for(std::time::Duration::from_micros(50));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    agent.wait_ticks(2);
    let after = agent.scrape();
    assert_eq!(delta(&before, &after, "getppid"), 2_000.0);
    assert_eq!(delta(&before, &after, "nanosleep"), 2_000.0);
    // 50 us sleeps: none may be timed under 2^15 ns (32.8 us).
    const LE_32US: &str = "0.000032768"; // 2^15 ns
    assert!(
        after
            .value(
                "insite_syscall_duration_seconds_bucket",
                &[("syscall", "nanosleep"), ("le", LE_32US)]
            )
            .is_some(),
        "no le={LE_32US} bucket in the scrape"
    );
    let short =
        hist_bucket(&after, "nanosleep", LE_32US) - hist_bucket(&before, "nanosleep", LE_32US);
    assert_eq!(short, 0.0, "sleeps timed shorter than they slept");
}

/// Scrapes until the hooks are (or are not) attached, as the agent's last tick read them.
fn wait_attached(agent: &Agent, on: bool) -> insite_e2e::Metrics {
    let want = if on { 1.0 } else { 0.0 };
    let m = insite_e2e::Metrics::wait_for(agent, |m| {
        m.value("insite_syscall_hooks_attached", &[]) == Some(want)
    });
    assert_eq!(
        m.value("insite_syscall_hooks_attached", &[]),
        Some(want),
        "hooks never {}",
        if on { "attached" } else { "detached" }
    );
    m
}

#[test]
fn sampled_mode_counts_inside_its_windows_and_says_so() {
    // Windows of 500 ms every 2 s: a steady getppid loop over 4 s (two whole intervals) is
    // counted about a quarter of the time, and observed_seconds says how long.
    let me = std::process::id();
    let agent = Agent::start(&format!(
        "[syscalls]\nmode = \"sampled\"\nsample_window = \"500ms\"\nsample_interval = \"2s\"\npids = [{me}]\n"
    ));
    let before = agent.scrape();
    let t = std::time::Instant::now();
    let mut made = 0u64;
    while t.elapsed() < std::time::Duration::from_secs(4) {
        getppid_calls(1_000);
        made += 1_000;
    }
    let elapsed = t.elapsed().as_secs_f64();
    agent.wait_ticks(2);
    let after = agent.scrape();
    let counted = delta(&before, &after, "getppid");
    let observed = after.value_or_zero("insite_syscall_observed_seconds_total", &[])
        - before.value_or_zero("insite_syscall_observed_seconds_total", &[]);
    assert!(
        counted > 0.0 && counted < 0.6 * made as f64,
        "counted {counted} of {made}"
    );
    // Two windows of 0.5 s in 4 s (the ticks bracketing the scrapes add up to ~0.3 s).
    assert!((0.6..=1.6).contains(&observed), "observed {observed} s");
    // The rate over the observed time estimates the loop's rate (slower while hooked).
    let estimate = counted / observed;
    let real = made as f64 / elapsed;
    assert!(
        estimate > 0.3 * real && estimate < 1.5 * real,
        "estimated {estimate:.0}/s, made {real:.0}/s"
    );
    assert!(
        after
            .value(
                "insite_syscall_duration_seconds_count",
                &[("syscall", "getppid"), ("mode", "sampled")]
            )
            .is_some(),
        "series not labelled mode=\"sampled\""
    );
    let v = agent.data(r#"{"cmd":"syscalls","window":"4s"}"#);
    assert_eq!(v["mode"], "sampled", "{v}");
    let status = agent.data(r#"{"cmd":"status"}"#);
    assert!(
        status["syscall_sampling"]
            .as_str()
            .unwrap()
            .starts_with("sampled, 500ms of every 2s (hooks "),
        "{status}"
    );
    assert!(v["observed_seconds"].as_f64().unwrap() < v["window_seconds"].as_f64().unwrap());
}

#[test]
fn a_trace_counts_every_call_then_the_windows_resume() {
    // One 100 ms window an hour: detached right after start-up, until a trace.
    let me = std::process::id();
    let agent = Agent::start(&format!(
        "[syscalls]\nsample_window = \"100ms\"\nsample_interval = \"1h\"\npids = [{me}]\n"
    ));
    let before = wait_attached(&agent, false);
    getppid_calls(5_000);
    agent.wait_ticks(2);
    let detached = agent.scrape();
    assert_eq!(delta(&before, &detached, "getppid"), 0.0);

    let r = agent.data(r#"{"cmd":"trace_syscalls","duration":"3s"}"#);
    assert_eq!(r["mode"], "sampled", "{r}");
    assert!(r["seconds_left"].as_f64().unwrap() > 2.0, "{r}");
    let tracing = wait_attached(&agent, true);
    getppid_calls(12_345);
    agent.wait_ticks(2);
    let traced = agent.scrape();
    assert_eq!(delta(&tracing, &traced, "getppid"), 12_345.0);

    let after_trace = wait_attached(&agent, false);
    getppid_calls(1_000);
    agent.wait_ticks(2);
    assert_eq!(delta(&after_trace, &agent.scrape(), "getppid"), 0.0);

    // Bad durations are refused by name; the CLI runs a trace and reports on it.
    for bad in ["0s", "2h", "soon"] {
        let r = agent
            .request(&format!(r#"{{"cmd":"trace_syscalls","duration":"{bad}"}}"#))
            .unwrap();
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(r["error"].as_str().unwrap().contains("duration"), "{r}");
    }
    let out = agent.cli(&["syscalls", "--trace", "1s", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("tracing every syscall"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["observed_seconds"].as_f64().unwrap() >= 0.8, "{v}");
}

#[test]
fn full_mode_is_labelled_and_always_attached() {
    let agent = Agent::start(FULL);
    getppid_calls(100);
    agent.wait_ticks(2);
    let m = agent.scrape();
    assert!(m
        .value(
            "insite_syscall_duration_seconds_count",
            &[("syscall", "getppid"), ("mode", "full")]
        )
        .is_some());
    assert_eq!(
        m.value("insite_syscall_hooks_attached", &[("mode", "full")]),
        Some(1.0)
    );
}
