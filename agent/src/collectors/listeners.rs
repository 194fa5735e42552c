//! Which process listens on a local port: names the service of inbound connections when the
//! socket's cgroup does not (hosts without systemd, where everything sits in the root cgroup).
//!
//! The kernel sees an accepted connection in softirq context, where the current task is
//! whoever was interrupted, so the owner comes from procfs instead: LISTEN sockets in
//! /proc/net/tcp{,6} give the inode, a walk of /proc/*/fd finds the process. The walk is
//! bounded and runs at most once per `RESCAN_INTERVAL`, only when an unknown port shows up.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use procfs::net::TcpState;

const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Bounds on one walk.
const MAX_PROCESSES: usize = 20_000;
const MAX_LISTENERS: usize = 10_000;

#[derive(Debug, Default)]
pub struct ListenerOwners {
    /// Local port -> process name.
    by_port: HashMap<u16, String>,
    last_scan: Option<Instant>,
}

impl ListenerOwners {
    pub fn new() -> Self {
        Self::default()
    }

    /// The name of the process listening on `port` in the agent's network namespace.
    pub fn owner(&mut self, port: u16) -> Option<String> {
        if let Some(c) = self.by_port.get(&port) {
            return Some(c.clone());
        }
        if self
            .last_scan
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
        {
            self.scan();
        }
        self.by_port.get(&port).cloned()
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.by_port.clear();
        let mut inode_port: HashMap<u64, u16> = HashMap::new();
        for table in [procfs::net::tcp(), procfs::net::tcp6()] {
            for e in table.into_iter().flatten() {
                if e.state == TcpState::Listen && inode_port.len() < MAX_LISTENERS {
                    inode_port.insert(e.inode, e.local_address.port());
                }
            }
        }
        if inode_port.is_empty() {
            return;
        }
        let Ok(procs) = procfs::process::all_processes() else {
            return;
        };
        for p in procs.take(MAX_PROCESSES).flatten() {
            let Ok(fds) = p.fd() else { continue };
            let mut comm = None;
            for fd in fds.flatten() {
                if let procfs::process::FDTarget::Socket(inode) = fd.target {
                    if let Some(port) = inode_port.remove(&inode) {
                        let name = comm.get_or_insert_with(|| {
                            p.stat()
                                .map(|s| s.comm)
                                .unwrap_or_else(|_| format!("pid {}", p.pid))
                        });
                        self.by_port.insert(port, name.clone());
                    }
                }
            }
            if inode_port.is_empty() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let me = procfs::process::Process::myself()
            .unwrap()
            .stat()
            .unwrap()
            .comm;
        let mut owners = ListenerOwners::new();
        assert_eq!(owners.owner(port), Some(me));
        // A port nobody listens on is unknown, and does not rescan within the interval.
        drop(l);
        let mut fresh = ListenerOwners::new();
        assert_eq!(fresh.owner(port), None);
    }
}
