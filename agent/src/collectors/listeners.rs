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

/// (local port, inode) of every TCP socket in LISTEN of `family`, from a NETLINK_SOCK_DIAG dump
/// (netlink-packet-sock-diag builds the request and decodes the replies).
fn listening_sockets(family: u8) -> std::io::Result<Vec<(u16, u64)>> {
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_sock_diag::{
        constants::{AF_INET6, IPPROTO_TCP},
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
        SockDiagMessage,
    };
    use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = 1;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let mut req = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id,
        })
        .into(),
    );
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let Some(data) = buf.get(..n) else {
            return Ok(out);
        };
        if data.is_empty() || parse_dump(data, &mut out)? || out.len() > MAX_LISTENERS {
            return Ok(out);
        }
    }
}

/// Adds the (port, inode) pairs of one datagram of a dump; true once the dump is done.
fn parse_dump(mut data: &[u8], out: &mut Vec<(u16, u64)>) -> std::io::Result<bool> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_sock_diag::SockDiagMessage;
    while !data.is_empty() {
        let Ok(msg) = NetlinkMessage::<SockDiagMessage>::deserialize(data) else {
            break;
        };
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => return Err(e.to_io()),
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                out.push((r.header.socket_id.source_port, u64::from(r.header.inode)));
            }
            _ => {}
        }
        if len == 0 {
            break;
        }
        // Messages are 4-byte aligned.
        data = data.get((len + 3) & !3..).unwrap_or_default();
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
        msg[4..6].copy_from_slice(&20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        assert!(!parse_dump(&msg, &mut out).unwrap());
        assert!(out.is_empty());
        // A zero-length header cannot loop.
        assert!(!parse_dump(&[0u8; 32], &mut out).unwrap());
        // Pseudo-random datagrams, most with a plausible header, never panic the decoder.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..20_000u32 {
            let len = 16 + (round as usize % 200);
            let mut d: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if round % 2 == 0 {
                d[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
                d[4..6].copy_from_slice(&20u16.to_ne_bytes());
            }
            let _ = parse_dump(&d, &mut out);
        }
    }
}
