//! The network probe, end to end: real kernel, real agent, real sockets, network namespaces.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agent_common::net::NetConn;
use insite_e2e::{Agent, Metrics, RemoveDirOnDrop};

/// Only the network probe: the syscall hooks would slow the workloads down for nothing.
const NET_ONLY: &str = "[syscalls]\nenabled = false\n";

fn labels<'a>(dir: &'a str, dest: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![("direction", dir), ("destination", dest)]
}

/// A cgroup named like a systemd unit, removed when dropped.
fn service_cgroup(tag: &str) -> (String, PathBuf, RemoveDirOnDrop) {
    let root = insite_e2e::cgroup2_root().expect("a cgroup2 hierarchy");
    let unit = format!("insite-e2e-{tag}-{}.service", std::process::id());
    let dir = root.join(&unit);
    std::fs::create_dir(&dir).expect("create cgroup");
    (unit, dir.join("cgroup.procs"), RemoveDirOnDrop(dir))
}

/// Runs a python3 script, optionally inside a cgroup (joined before exec).
fn python(script: &str, procs: Option<&Path>) -> String {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", script]);
    if let Some(p) = procs {
        let p = p.to_path_buf();
        // SAFETY: only a write to a file between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&p, b"0"));
        }
    }
    let out = cmd.output().expect("python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A listener that accepts, reads to EOF and answers `reply` bytes, in a thread.
fn echo_server(addr: &str, reply: usize) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("bind");
    let local = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = s.write_all(&vec![b'r'; reply]);
        }
    });
    local
}

/// A port on `ip` where nothing listens.
fn closed_port(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

fn my_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim()
        .to_string()
}

/// Polls the agent until `f` holds on a scrape, or gives up after 5 s and returns the last one.
fn scrape_until(agent: &Agent, f: impl Fn(&Metrics) -> bool) -> Metrics {
    Metrics::wait_within(agent, Duration::from_secs(5), f)
}

mod edges;
mod lifecycle;
mod netns;
