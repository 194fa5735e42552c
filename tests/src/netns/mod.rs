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
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    thread::JoinHandle,
};

use anyhow::{bail, Context as _, Result};

mod receive;
mod send;
mod socket;
#[cfg(test)]
mod tests;

pub use receive::{TcpAcceptCounter, UdpCounter};
pub use send::{tcp_connects, udp_flood};

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
