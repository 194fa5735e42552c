//! A network namespace joined to the host by a veth pair, and paced traffic across it: what
//! the network end-to-end tests and the rate-limit bench (`cargo xtask bench ratelimit`) use
//! to make traffic that arrives on a real interface from addresses other than the host's own.
//!
//! Traffic over loopback never crosses an interface that XDP or a TC program on a veth sees,
//! and comes from the host's own addresses; a namespace gives a second host inside the first.
//! Senders run on a thread that joins the namespace (`Netns::run`), so a test or bench keeps
//! its own sockets, counters and agent in the host's namespace and needs no helper processes.
//!
//! Building a namespace needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); the senders and
//! receivers themselves need nothing but sockets, and work on loopback too.

use std::{
    collections::HashMap,
    io,
    mem::{size_of, MaybeUninit},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Runs `ip ARGS`; an error with its stderr when it fails.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(())
}

/// A network namespace with a veth pair to the host: host side 10.231.<n>.1/24, namespace
/// side 10.231.<n>.2/24 (and lo up). The namespace and the pair are deleted when dropped.
///
/// `n` picks the /24, so that tests and benches that run at the same time each use their own;
/// the names carry this process's id, so that two processes using the same `n` at least fail
/// on the address rather than delete each other's namespace.
pub struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    n: u8,
}

impl Netns {
    /// Creates the namespace and the pair (as root). Whatever was made before a step failed
    /// is removed again.
    pub fn new(n: u8) -> Result<Self> {
        let id = std::process::id() % 100_000;
        let name = format!("isa-e2e-{id}-{n}");
        ip(&["netns", "add", &name])?;
        // From here on, dropping `me` removes what exists.
        let me = Self {
            name,
            // At most 3 + 5 + 1 + 3 = 12 bytes: interface names are limited to 15.
            host_if: format!("isa{id}h{n}"),
            ns_if: format!("isa{id}n{n}"),
            n,
        };
        ip(&[
            "link",
            "add",
            &me.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &me.ns_if,
        ])?;
        ip(&["link", "set", &me.ns_if, "netns", &me.name])?;
        let host_cidr = format!("{}/24", me.host_addr());
        ip(&["addr", "add", &host_cidr, "dev", &me.host_if])?;
        ip(&["link", "set", &me.host_if, "up"])?;
        me.add_ns_addr(&format!("{}/24", me.ns_addr()))?;
        me.exec(&["ip", "link", "set", &me.ns_if, "up"])?;
        me.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// The namespace's name (`ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's end of the veth pair (where host-side XDP and TC programs attach).
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The namespace's end of the veth pair.
    pub fn ns_if(&self) -> &str {
        &self.ns_if
    }

    /// 10.231.<n>.1, on the host's end.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.n, 1)
    }

    /// 10.231.<n>.2, on the namespace's end.
    pub fn ns_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.n, 2)
    }

    /// The host end's interface index.
    pub fn host_ifindex(&self) -> Result<u32> {
        let c = std::ffi::CString::new(self.host_if.as_str())?;
        // SAFETY: a valid NUL-terminated string.
        match unsafe { libc::if_nametoindex(c.as_ptr()) } {
            0 => Err(io::Error::last_os_error()).with_context(|| self.host_if.clone()),
            i => Ok(i),
        }
    }

    /// Adds an address to the namespace's end, e.g. "10.231.<n>.3/24", so that one namespace
    /// can send from several sources (bind a sender to it).
    pub fn add_ns_addr(&self, cidr: &str) -> Result<()> {
        self.exec(&["ip", "addr", "add", cidr, "dev", &self.ns_if])
    }

    /// Runs a command inside the namespace (`ip netns exec`) and waits for it.
    pub fn exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Starts `python3 -u -c script` inside the namespace, its stdout piped; returns the child.
    pub fn spawn_python(&self, script: &str) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-u", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .context("spawning python3 in the namespace")
    }

    /// Runs `f` on a new OS thread that has joined the namespace first, so that the sockets
    /// `f` makes live there. Only that thread changes namespace (a network namespace belongs
    /// to a thread, not to the process); it ends when `f` returns. The result is an error
    /// when the thread could not join the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter_netns(&path)?;
            Ok(f())
        })
    }
}

/// Moves the calling thread into the network namespace that `path` names.
fn enter_netns(path: &str) -> Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on an fd we hold open; it affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's end; the
        // second delete is for when the pair never made it into the namespace.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: sched_setaffinity on this thread with a zeroed, then filled, set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("pinning to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Hands out send slots at absolute deadlines: slot i is due at `start + i / per_sec`, so
/// that time lost to one late wake-up is made up by the following slots instead of lowering
/// the rate, and the total over `dur` is `per_sec * dur` whenever the sender can keep up.
/// When it cannot, slots come as fast as they are taken (the achieved rate shows it).
struct Pacer {
    start: Instant,
    per_sec: u128,
    dur: Duration,
    total: u64,
    issued: u64,
}

impl Pacer {
    fn new(per_sec: u64, dur: Duration) -> Self {
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
    fn due(&self, elapsed: Duration) -> u64 {
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
    fn next(&mut self, max: u64) -> Option<u64> {
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

/// A sockaddr for `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The IP address in a sockaddr the kernel filled in.
fn sockaddr_ip(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast() };
            Some(IpAddr::from(sin6.sin6_addr.s6_addr))
        }
        _ => None,
    }
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

fn setsockopt<T>(fd: RawFd, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a valid T of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pending error of a socket (SO_ERROR), 0 for none.
fn socket_error(fd: RawFd) -> io::Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to an int and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(err)
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

/// Receive buffer asked for by the counters: large enough that at a few hundred thousand
/// datagrams a second the counter's thread can fall behind for a while without the socket
/// dropping (the default, about 200 KiB, holds a millisecond or two of a flood).
const RCVBUF: libc::c_int = 8 << 20;

/// Sets SO_RCVBUF to `bytes`: SO_RCVBUFFORCE (root: past net.core.rmem_max) where allowed,
/// SO_RCVBUF (capped at rmem_max) otherwise.
fn big_rcvbuf(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &bytes)
        .or_else(|_| setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &bytes))
}

/// Datagrams a socket dropped for want of buffer space (SO_MEMINFO).
fn socket_drops(fd: RawFd) -> io::Result<u64> {
    // SK_MEMINFO_VARS (9) values in today's kernels; room for more, which the kernel may add.
    let mut info = [0u32; 16];
    let mut len = size_of::<[u32; 16]>() as libc::socklen_t;
    // SAFETY: valid pointers to the array and its length.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let drops = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (drops + 1) * size_of::<u32>() {
        return Err(io::Error::other("SO_MEMINFO without a drop count"));
    }
    Ok(u64::from(info[drops]))
}

/// How often the receivers' threads look at their stop flag.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Datagrams taken per recvmmsg(2) call, and the bytes kept of each (the rest is cut off:
/// only the count matters).
const RECV_BATCH: usize = 64;
const RECV_KEEP: usize = 128;

#[derive(Default)]
struct UdpCounts {
    total: AtomicU64,
    by_source: Mutex<HashMap<IpAddr, u64>>,
}

/// A UDP socket whose thread counts the datagrams that reach it, in all and per source
/// address, until stopped. The socket asks for an 8 MiB receive buffer (root gets it past
/// net.core.rmem_max) and the thread takes up to 64 datagrams per system call, so that in a
/// measurement the receiver is not what drops; `drops()` says whether it did.
pub struct UdpCounter {
    addr: SocketAddr,
    counts: Arc<UdpCounts>,
    stop: Arc<AtomicBool>,
    sock: Arc<UdpSocket>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl UdpCounter {
    /// Binds `addr` (port 0: any) and starts counting.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        Self::bind_pinned(addr, None)
    }

    /// `bind`, with the counting thread pinned to `cpu`.
    pub fn bind_pinned(addr: SocketAddr, cpu: Option<usize>) -> Result<Self> {
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?;
        big_rcvbuf(sock.as_raw_fd(), RCVBUF).context("setting the receive buffer")?;
        sock.set_read_timeout(Some(POLL_EVERY))?;
        let addr = sock.local_addr()?;
        let sock = Arc::new(sock);
        let counts = Arc::new(UdpCounts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sock, counts, stop) = (sock.clone(), counts.clone(), stop.clone());
            std::thread::Builder::new()
                .name("udp-counter".into())
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(cpu).map_err(io::Error::other)?;
                    }
                    count_datagrams(&sock, &counts, &stop)
                })
                .context("spawning the counter thread")?
        };
        Ok(Self {
            addr,
            counts,
            stop,
            sock,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams counted so far.
    pub fn count(&self) -> u64 {
        self.counts.total.load(Ordering::Relaxed)
    }

    /// Datagrams counted so far, per source address.
    pub fn by_source(&self) -> HashMap<IpAddr, u64> {
        self.counts
            .by_source
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Datagrams the socket dropped because its buffer was full (the receiver fell behind).
    pub fn drops(&self) -> Result<u64> {
        socket_drops(self.sock.as_raw_fd()).context("SO_MEMINFO")
    }

    /// Stops the thread (within 50 ms) once it has taken what the socket holds; the counts
    /// stay readable. An error if the thread failed.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            None => Ok(()),
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the UDP counter thread panicked"))?
                .context("UDP counter"),
        }
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The longest a stopping counter goes on taking datagrams that are still arriving.
const DRAIN_AT_MOST: Duration = Duration::from_secs(1);

/// The counter's loop: recvmmsg in batches (MSG_WAITFORONE: returns as soon as one datagram
/// is there, with as many more as are queued). Once `stop` is set it takes what is queued
/// without waiting and returns when the socket is empty (or after `DRAIN_AT_MOST`, should a
/// sender still be going).
fn count_datagrams(sock: &UdpSocket, counts: &UdpCounts, stop: &AtomicBool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; RECV_KEEP]; RECV_BATCH];
    // SAFETY: all-zero sockaddr_storage and mmsghdr values are valid; the pointers in the
    // headers are set below before use.
    let mut names: Vec<libc::sockaddr_storage> =
        vec![unsafe { MaybeUninit::zeroed().assume_init() }; RECV_BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: RECV_KEEP,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..RECV_BATCH)
        // SAFETY: as above.
        .map(|_| unsafe { MaybeUninit::<libc::mmsghdr>::zeroed().assume_init() })
        .collect();
    let mut local: HashMap<IpAddr, u64> = HashMap::new();
    let mut stopping: Option<Instant> = None;
    loop {
        if stopping.is_none() && stop.load(Ordering::Relaxed) {
            stopping = Some(Instant::now());
        }
        if stopping.is_some_and(|t| t.elapsed() > DRAIN_AT_MOST) {
            return Ok(());
        }
        let flags = if stopping.is_some() {
            libc::MSG_DONTWAIT
        } else {
            libc::MSG_WAITFORONE
        };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_len = 0;
        }
        // SAFETY: `msgs` holds RECV_BATCH headers whose buffers outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                RECV_BATCH as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                // Nothing queued (the read timeout, or MSG_DONTWAIT).
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    if stopping.is_some() {
                        return Ok(());
                    }
                    continue;
                }
                io::ErrorKind::Interrupted => continue,
                // An ICMP error for something sent from this socket's port: not a datagram.
                _ if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                _ => return Err(e),
            }
        }
        let n = n as usize;
        local.clear();
        for name in &names[..n] {
            if let Some(ip) = sockaddr_ip(name) {
                *local.entry(ip).or_default() += 1;
            }
        }
        // Per source first, so that by_source() never exceeds count() by more than a batch.
        {
            let mut m = counts.by_source.lock().unwrap_or_else(|e| e.into_inner());
            for (ip, c) in &local {
                *m.entry(*ip).or_default() += c;
            }
        }
        counts.total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A TCP listener whose thread accepts connections, counts them and closes them at once,
/// until stopped. Its backlog is the kernel's maximum (std asks for SOMAXCONN), so that a
/// burst of connects is not refused by a full accept queue.
pub struct TcpAcceptCounter {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TcpAcceptCounter {
    /// Listens on `addr` (port 0: any) and starts accepting.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            std::thread::Builder::new()
                .name("tcp-accept-counter".into())
                .spawn(move || accept_loop(&listener, &accepted, &stop))
                .context("spawning the accept thread")?
        };
        Ok(Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the thread (within 50 ms) once it has accepted what is queued; the count stays
    /// readable. An error if the thread failed.
    pub fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            None => Ok(()),
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the TCP accept thread panicked"))?
                .context("TCP accept counter"),
        }
    }
}

impl Drop for TcpAcceptCounter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn accept_loop(listener: &TcpListener, accepted: &AtomicU64, stop: &AtomicBool) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        match listener.accept() {
            // Closed at once (dropped).
            Ok(_) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
            {
                continue
            }
            // Out of fds or memory for a moment: the connection stays queued.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        pfd.revents = 0;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, POLL_EVERY.as_millis() as libc::c_int) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! On loopback, in the host's namespace: no root needed. The namespace itself is tested
    //! end to end (tests/net/netns.rs).

    use super::*;

    #[test]
    fn the_pacer_hands_out_every_slot_on_time() {
        let mut p = Pacer::new(1000, Duration::from_millis(100));
        assert_eq!(p.total, 100);
        // The first slot is due at once.
        assert_eq!(p.due(Duration::ZERO), 1);
        assert_eq!(p.due(Duration::from_micros(999)), 1);
        assert_eq!(p.due(Duration::from_millis(1)), 2);
        // Never more than the total, however late.
        assert_eq!(p.due(Duration::from_secs(5)), 100);
        let mut taken = 0;
        while let Some(n) = p.next(8) {
            assert!((1..=8).contains(&n));
            taken += n;
        }
        let late = p.start.elapsed();
        assert!(taken <= 100);
        // Either every slot was handed out, or the time was over.
        assert!(
            taken == 100 || late >= Duration::from_millis(100),
            "{taken} in {late:?}"
        );
    }

    #[test]
    fn a_paced_flood_arrives_at_its_rate() {
        let mut rx = UdpCounter::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let dur = Duration::from_millis(500);
        let sent = udp_flood(
            "127.0.0.1:0".parse().unwrap(),
            rx.local_addr(),
            20_000,
            dur,
            32,
        )
        .unwrap();
        // 10000 slots; a noisy machine may lose a few to a stall at the very end.
        assert!((9_500..=10_000).contains(&sent), "sent {sent}");
        std::thread::sleep(Duration::from_millis(100));
        rx.stop().unwrap();
        assert_eq!(rx.count() + rx.drops().unwrap(), sent);
        let by = rx.by_source();
        assert_eq!(by.len(), 1);
        assert_eq!(by.get(&IpAddr::from([127, 0, 0, 1])), Some(&rx.count()));
    }

    #[test]
    fn paced_connects_are_accepted_and_counted() {
        let mut server = TcpAcceptCounter::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (attempted, ok) = tcp_connects(
            IpAddr::from([127, 0, 0, 1]),
            server.local_addr(),
            200,
            Duration::from_millis(500),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!((90..=100).contains(&attempted), "attempted {attempted}");
        assert_eq!(ok, attempted);
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.count() < ok && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        server.stop().unwrap();
        assert_eq!(server.count(), ok);
    }

    #[test]
    fn connects_to_a_closed_port_fail_without_an_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let (attempted, ok) = tcp_connects(
            IpAddr::from([127, 0, 0, 1]),
            to,
            100,
            Duration::from_millis(200),
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(attempted >= 15, "attempted {attempted}");
        assert_eq!(ok, 0);
    }

    #[test]
    fn sockaddrs_round_trip() {
        for a in ["10.231.7.3:9000", "[::1]:53"] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, _) = sockaddr(a);
            assert_eq!(sockaddr_ip(&ss), Some(a.ip()));
        }
    }
}
