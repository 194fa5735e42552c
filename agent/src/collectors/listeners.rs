//! Which process listens on a local port: names the service of inbound connections when the
//! socket's cgroup does not (hosts without systemd, where everything sits in the root cgroup).
//!
//! The kernel sees an accepted connection in softirq context, where the current task is
//! whoever was interrupted, so the owner is looked up instead: a sock_diag netlink dump of the
//! LISTEN sockets gives their inodes (the kernel walks only the listening hash, however many
//! connections the host has: /proc/net/tcp would list every TIME_WAIT entry), and a walk of
//! /proc/*/fd finds the process. The walk is bounded and runs at most once per
//! `RESCAN_INTERVAL`, only when an unknown port shows up; a port that stays unknown is not
//! asked about again for `NEGATIVE_TTL`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

const RESCAN_INTERVAL: Duration = Duration::from_secs(2);
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Bounds on one walk.
const MAX_PROCESSES: usize = 20_000;
const MAX_LISTENERS: usize = 10_000;

#[derive(Debug, Default)]
pub struct ListenerOwners {
    /// Local port -> process name.
    by_port: HashMap<u16, String>,
    /// Ports no listener was found for, and since when.
    unknown: HashMap<u16, Instant>,
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
            .unknown
            .get(&port)
            .is_some_and(|t| t.elapsed() < NEGATIVE_TTL)
        {
            return None;
        }
        if self
            .last_scan
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
        {
            self.scan();
        }
        let found = self.by_port.get(&port).cloned();
        if found.is_none() {
            if self.unknown.len() >= MAX_LISTENERS {
                self.unknown.clear();
            }
            self.unknown.insert(port, Instant::now());
        }
        found
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.by_port.clear();
        let mut inode_port: HashMap<u64, u16> = HashMap::new();
        for family in [libc::AF_INET, libc::AF_INET6] {
            match listening_sockets(family as u8) {
                Ok(list) => {
                    for (port, inode) in list.into_iter().take(MAX_LISTENERS) {
                        inode_port.insert(inode, port);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %crate::probes::error_chain(&e), family, "sock_diag dump of listeners")
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

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, then a 48-byte sockid.
const REQ_LEN: usize = 56;
/// Offsets in `struct inet_diag_msg`: the sockid (source port first) and the inode.
const MSG_SPORT: usize = 4;
const MSG_INODE: usize = 68;
const MSG_LEN: usize = 72;

/// (local port, inode) of every TCP socket in LISTEN of `family`, from a NETLINK_SOCK_DIAG dump.
fn listening_sockets(family: u8) -> std::io::Result<Vec<(u16, u64)>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: plain socket(2); the fd is owned (and closed) by OwnedFd.
    let fd = unsafe {
        let raw = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        OwnedFd::from_raw_fd(raw)
    };
    let mut req = [0u8; NLMSG_HDR + REQ_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence
    req[NLMSG_HDR] = family;
    req[NLMSG_HDR + 1] = libc::IPPROTO_TCP as u8;
    req[NLMSG_HDR + 4..NLMSG_HDR + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: sending a valid buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own, of the length given.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let Some(data) = buf.get(..n as usize) else {
            return Ok(out);
        };
        if data.is_empty() || parse_dump(data, &mut out)? || out.len() > MAX_LISTENERS {
            return Ok(out);
        }
    }
}

/// Adds the (port, inode) pairs of one datagram of a dump; true once the dump is done.
fn parse_dump(mut data: &[u8], out: &mut Vec<(u16, u64)>) -> std::io::Result<bool> {
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    while data.len() >= NLMSG_HDR {
        let (Some(len), Some(kind)) = (
            u32_at(data, 0),
            data.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]])),
        ) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDR || len > data.len() {
            break;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(data, NLMSG_HDR).map_or(0, |e| (e as i32).unsigned_abs());
                return Err(std::io::Error::from_raw_os_error(errno as i32));
            }
            SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_LEN => {
                let msg = &data[NLMSG_HDR..len];
                let port = u16::from_be_bytes([msg[MSG_SPORT], msg[MSG_SPORT + 1]]);
                if let Some(inode) = u32_at(msg, MSG_INODE) {
                    out.push((port, u64::from(inode)));
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or_default();
    }
    Ok(false)
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
        // ...and is remembered as unknown rather than rescanned for.
        assert!(fresh.unknown.contains_key(&port));
    }

    #[test]
    fn dump_lists_listeners_of_both_families() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        let p4 = v4.local_addr().unwrap().port();
        let p6 = v6.local_addr().unwrap().port();
        let l4 = listening_sockets(libc::AF_INET as u8).unwrap();
        let l6 = listening_sockets(libc::AF_INET6 as u8).unwrap();
        assert!(l4.iter().any(|(p, i)| *p == p4 && *i > 0), "{l4:?}");
        assert!(l6.iter().any(|(p, _)| *p == p6), "{l6:?}");
        // A connected socket is not a listener.
        let _c = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
        let again = listening_sockets(libc::AF_INET as u8).unwrap();
        assert_eq!(again.iter().filter(|(p, _)| *p == p4).count(), 1);
    }

    #[test]
    fn truncated_and_garbage_dumps_do_not_panic() {
        let mut out = Vec::new();
        for data in [
            &[][..],
            &[1, 2, 3],
            &[0xff; 15],
            &[0xff; 100],
            &[16, 0, 0, 0, 3, 0],
        ] {
            let _ = parse_dump(data, &mut out);
        }
        // A header claiming more than is there ends the datagram.
        let mut msg = [0u8; 40];
        msg[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        msg[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        assert!(!parse_dump(&msg, &mut out).unwrap());
        assert!(out.is_empty());
    }
}
