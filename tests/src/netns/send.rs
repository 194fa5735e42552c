//! Paced senders: a UDP flood and a stream of TCP connects, at absolute deadlines.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::socket::{setsockopt, sockaddr, socket_error};

/// Hands out send slots at absolute deadlines: slot i is due at `start + i / per_sec`, so
/// that time lost to one late wake-up is made up by the following slots instead of lowering
/// the rate, and the total over `dur` is `per_sec * dur` whenever the sender can keep up.
/// When it cannot, slots come as fast as they are taken (the achieved rate shows it).
pub(super) struct Pacer {
    pub(super) start: Instant,
    per_sec: u128,
    dur: Duration,
    pub(super) total: u64,
    issued: u64,
}

impl Pacer {
    pub(super) fn new(per_sec: u64, dur: Duration) -> Self {
        let total = (u128::from(per_sec) * dur.as_nanos() / 1_000_000_000) as u64;
        Self {
            start: Instant::now(),
            per_sec: per_sec.into(),
            dur,
            total,
            issued: 0,
        }
    }

    /// Slots due by `elapsed` (the first at 0).
    pub(super) fn due(&self, elapsed: Duration) -> u64 {
        let due = elapsed.as_nanos() * self.per_sec / 1_000_000_000 + 1;
        (due.min(u128::from(self.total))) as u64
    }

    /// Takes up to `max` of the slots due now without waiting (possibly none); None once
    /// `dur` is over or every slot has been handed out.
    fn take(&mut self, max: u64) -> Option<u64> {
        let elapsed = self.start.elapsed();
        if elapsed >= self.dur || self.issued >= self.total {
            return None;
        }
        let n = self
            .due(elapsed)
            .saturating_sub(self.issued)
            .min(max.max(1));
        self.issued += n;
        Some(n)
    }

    /// Waits until a slot is due and takes up to `max` of the due ones (a batch, so that the
    /// clock is read once per batch, not per packet); None once `dur` is over or every slot
    /// has been handed out.
    ///
    /// Waiting: sleeps while the next slot is more than 2 ms away, yields the CPU while it is
    /// more than 20 µs away, spins closer in (a sleep's wake-up is 50 µs late or more).
    pub(super) fn next(&mut self, max: u64) -> Option<u64> {
        loop {
            match self.take(max)? {
                0 => {}
                n => return Some(n),
            }
            let next_ns = u128::from(self.issued) * 1_000_000_000 / self.per_sec;
            let elapsed = self.start.elapsed().as_nanos();
            let wait = Duration::from_nanos(next_ns.saturating_sub(elapsed) as u64);
            if wait > Duration::from_millis(2) {
                std::thread::sleep(wait - Duration::from_millis(1));
            } else if wait > Duration::from_micros(20) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// Packets sent per clock read by `udp_flood`: small enough that a batch is a few tens of
/// microseconds at the highest rates, so the pacing stays smooth at that scale.
const FLOOD_BATCH: u64 = 16;

/// Whether a send error means "this packet was not sent" rather than a broken setup: a full
/// socket or device queue (EAGAIN, ENOBUFS), or an ICMP error from an earlier packet reported
/// on this one (ECONNREFUSED and friends, on a connected UDP socket).
fn send_dropped(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
        || matches!(
            e.raw_os_error(),
            Some(
                libc::ENOBUFS
                    | libc::ECONNREFUSED
                    | libc::EHOSTUNREACH
                    | libc::ENETUNREACH
                    | libc::EINTR
            )
        )
}

/// Sends `payload`-byte UDP datagrams from `from` (port 0: any) to `to` at `pps` for `dur`,
/// paced by absolute deadlines; returns how many the kernel took. A datagram the socket or
/// device queue had no room for counts as not sent, not as an error. Above what the thread
/// can do it sends as fast as it can: across a veth on the 2-CPU dev VM that is 150k to 300k
/// pps (veth runs the receive path on the sending CPU, so it depends on what the host does
/// with the packets).
pub fn udp_flood(
    from: SocketAddr,
    to: SocketAddr,
    pps: u64,
    dur: Duration,
    payload: usize,
) -> Result<u64> {
    if pps == 0 {
        bail!("udp_flood: pps must be at least 1");
    }
    let sock = UdpSocket::bind(from).with_context(|| format!("binding {from}"))?;
    // Connected: the route is looked up once, not per datagram.
    sock.connect(to)
        .with_context(|| format!("connecting to {to}"))?;
    sock.set_nonblocking(true)?;
    let buf = vec![0x5au8; payload];
    let mut pacer = Pacer::new(pps, dur);
    let mut sent = 0u64;
    while let Some(n) = pacer.next(FLOOD_BATCH) {
        for _ in 0..n {
            match sock.send(&buf) {
                Ok(_) => sent += 1,
                Err(e) if send_dropped(&e) => {}
                Err(e) => return Err(e).with_context(|| format!("sending to {to}")),
            }
        }
    }
    Ok(sent)
}

/// A non-blocking TCP socket bound to `from_ip` (any port) whose connect to `to` has begun;
/// None when the connect failed at once (refused on loopback, no route). An error when the
/// socket could not be made or bound.
fn start_connect(from_ip: IpAddr, to: SocketAddr) -> io::Result<Option<OwnedFd>> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Closing resets the connection (SO_LINGER 0) instead of leaving it in TIME_WAIT: a few
    // hundred connects a second from one address would otherwise use up its ephemeral ports
    // within a minute.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger)?;
    let (local, len) = sockaddr(SocketAddr::new(from_ip, 0));
    // SAFETY: a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (remote, len) = sockaddr(to);
    // SAFETY: a valid sockaddr of `len` bytes.
    let r = unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return Ok(None);
    }
    Ok(Some(sock))
}

/// Makes TCP connections from `from_ip` to `to` at `per_sec` for `dur`, paced like
/// `udp_flood`, and closes each as soon as it is established; returns (attempted, succeeded).
///
/// Connects do not wait for each other: each one that has not completed within
/// `connect_timeout` (e.g. 200 ms: its SYN was dropped, and the first retry would come only
/// after 1 s) counts as failed and is closed, while the next ones start on time. Connects
/// still in flight when `dur` ends get their timeout to finish. Refused or otherwise failed
/// connects are failures, not errors; an error means a connect could not be started at all.
pub fn tcp_connects(
    from_ip: IpAddr,
    to: SocketAddr,
    per_sec: u64,
    dur: Duration,
    connect_timeout: Duration,
) -> Result<(u64, u64)> {
    if per_sec == 0 {
        bail!("tcp_connects: per_sec must be at least 1");
    }
    let mut pacer = Pacer::new(per_sec, dur);
    let mut pending: Vec<(OwnedFd, Instant)> = Vec::new();
    let (mut attempted, mut succeeded) = (0u64, 0u64);
    let mut done = false;
    while !done || !pending.is_empty() {
        if !done {
            // With nothing in flight the pacer waits for the next slot; otherwise the poll
            // below (1 ms at most) is the wait.
            let slots = if pending.is_empty() {
                pacer.next(64)
            } else {
                pacer.take(64)
            };
            match slots {
                None => done = true,
                Some(n) => {
                    for _ in 0..n {
                        attempted += 1;
                        let started = start_connect(from_ip, to)
                            .with_context(|| format!("connecting from {from_ip} to {to}"))?;
                        if let Some(fd) = started {
                            pending.push((fd, Instant::now()));
                        }
                    }
                }
            }
        }
        if pending.is_empty() {
            continue;
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        // A millisecond at most: the next connect may be due sooner.
        // SAFETY: a valid array of pollfd of the length passed.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("poll");
            }
            continue;
        }
        let now = Instant::now();
        let mut keep = Vec::with_capacity(pending.len());
        for ((fd, started), pfd) in pending.drain(..).zip(&fds) {
            let revents = pfd.revents;
            if revents != 0 {
                if socket_error(fd.as_raw_fd()).is_ok_and(|e| e == 0)
                    && revents & libc::POLLOUT != 0
                {
                    succeeded += 1;
                }
                // Dropped: closed (reset) at once.
            } else if now.duration_since(started) < connect_timeout {
                keep.push((fd, started));
            }
        }
        pending = keep;
    }
    Ok((attempted, succeeded))
}
