//! Counting receivers: a UDP socket and a TCP listener, each with its own thread.

use std::{
    collections::HashMap,
    io,
    mem::{size_of, MaybeUninit},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use super::{
    pin_current_thread,
    socket::{big_rcvbuf, sockaddr_ip, socket_drops},
};

/// Receive buffer asked for by the counters: large enough that at a few hundred thousand
/// datagrams a second the counter's thread can fall behind for a while without the socket
/// dropping (the default, about 200 KiB, holds a millisecond or two of a flood).
const RCVBUF: libc::c_int = 8 << 20;

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

/// A receiver's thread and the flag that stops it.
struct Worker {
    what: &'static str,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Worker {
    /// Runs `f` on a thread named `name` until the flag it is given is set.
    fn spawn(
        name: &str,
        what: &'static str,
        f: impl FnOnce(&AtomicBool) -> io::Result<()> + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&flag))
            .with_context(|| format!("spawning the {what} thread"))?;
        Ok(Self {
            what,
            stop,
            thread: Some(thread),
        })
    }

    /// Sets the flag and waits for the thread; an error if it failed.
    fn stop(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            None => Ok(()),
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("the {} thread panicked", self.what))?
                .context(self.what),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A UDP socket whose thread counts the datagrams that reach it, in all and per source
/// address, until stopped. The socket asks for an 8 MiB receive buffer (root gets it past
/// net.core.rmem_max) and the thread takes up to 64 datagrams per system call, so that in a
/// measurement the receiver is not what drops; `drops()` says whether it did.
pub struct UdpCounter {
    addr: SocketAddr,
    counts: Arc<UdpCounts>,
    sock: Arc<UdpSocket>,
    worker: Worker,
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
        let worker = {
            let (sock, counts) = (sock.clone(), counts.clone());
            Worker::spawn("udp-counter", "UDP counter", move |stop| {
                if let Some(cpu) = cpu {
                    pin_current_thread(cpu).map_err(io::Error::other)?;
                }
                count_datagrams(&sock, &counts, stop)
            })?
        };
        Ok(Self {
            addr,
            counts,
            sock,
            worker,
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
        self.worker.stop()
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
    worker: Worker,
}

impl TcpAcceptCounter {
    /// Listens on `addr` (port 0: any) and starts accepting.
    pub fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let worker = {
            let accepted = accepted.clone();
            Worker::spawn("tcp-accept-counter", "TCP accept counter", move |stop| {
                accept_loop(&listener, &accepted, stop)
            })?
        };
        Ok(Self {
            addr,
            accepted,
            worker,
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
        self.worker.stop()
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
