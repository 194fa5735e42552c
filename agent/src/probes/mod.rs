//! Kernel side: the embedded eBPF objects, how they are loaded and attached.
//!
//! One object per probe family, each loaded and attached on its own: a kernel that lacks what
//! one family needs degrades that family (visible in `status` and in
//! `insite_probe_attached`), and the others keep running.

pub mod bpf_sys;
pub mod btf;
pub mod db;
pub mod kernel_log;
pub mod net;
pub mod privileges;
pub mod ratelimit;
pub mod sampling;
pub mod syscalls;

use std::path::Path;

use tracing::{debug, info, warn};

/// The object of the syscall family, built by build.rs from `agent-ebpf`.
pub(crate) static SYSCALLS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/insite-syscalls"));

/// The object of the network family.
pub(crate) static NET_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/insite-net"));

/// The object of the database and cache family.
pub(crate) static DB_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/insite-db"));

/// The object of the rate-limit family.
pub(crate) static RATELIMIT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/insite-ratelimit"));

/// What can go wrong in a family's kernel side: loading its object, reading the kernel's BTF,
/// its maps and programs, attaching. The one error type of the probes layer; each variant
/// names its own step and leaves the cause to `source()`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("loading the {object} object")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("kernel BTF")]
    Btf(#[from] btf::BtfError),
    #[error("kernel BTF for tp_btf")]
    AyaBtf(#[from] aya::BtfError),
    #[error("could not attach with any method: {0}")]
    NoAttach(String),
    #[error("creating the TCP socket iterator")]
    Walk(#[source] aya::programs::links::LinkError),
    #[error("running the TCP socket iterator")]
    WalkRead(#[source] std::io::Error),
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("reading map {name}")]
    Read {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("reading program {program}'s info")]
    ProgramInfo {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the kernel skipped of each of `programs` (loaded and attached ones of `ebpf`):
/// tp_btf and raw tracepoint programs are not re-entered on a CPU where they already run, so
/// every miss is an event the program never saw.
pub(crate) fn missed_runs(
    ebpf: &aya::Ebpf,
    programs: impl IntoIterator<Item = &'static str>,
) -> Result<Vec<(&'static str, u64)>, ProbeError> {
    use std::os::fd::AsFd as _;
    programs
        .into_iter()
        .map(|name| {
            let p = ebpf.program(name).ok_or(ProbeError::MissingProgram(name))?;
            let fd = p.fd().map_err(|source| ProbeError::Program {
                what: name.to_string(),
                source,
            })?;
            let n = bpf_sys::recursion_misses(fd.as_fd()).map_err(|source| {
                ProbeError::ProgramInfo {
                    program: name,
                    source,
                }
            })?;
            Ok((name, n))
        })
        .collect()
}

/// `.map_err(map_err("NAME"))`: a map operation's error, naming the map.
pub(crate) fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> ProbeError {
    move |source| ProbeError::Map { name, source }
}

/// Every entry of a hash map: batched, `chunk` entries per syscall (a table of thousands
/// read one by one would cost two syscalls an entry); kernels without batch lookups (before
/// 5.6) get one lookup per entry.
pub(crate) fn read_hash<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
    name: &'static str,
    chunk: u32,
) -> Result<Vec<(K, V)>, ProbeError> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    match bpf_sys::lookup_batch(map.map().fd().as_fd(), chunk) {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name)),
        Err(source) => Err(ProbeError::Read { name, source }),
    }
}

/// Slot `idx` of a per-CPU counter array, summed over CPUs.
pub(crate) fn percpu_sum(
    map: &aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    name: &'static str,
    idx: u32,
) -> Result<u64, ProbeError> {
    Ok(map.get(&idx, 0).map_err(map_err(name))?.iter().sum())
}

/// Takes a map out of a loaded object, as the typed wrapper `conv` makes of it.
pub(crate) fn take_map<T>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
    conv: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?;
    conv(map).map_err(map_err(name))
}

const TRACEFS_MAGIC: i64 = 0x7472_6163;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes the host ready for loading probes: mounts tracefs and bpffs where they are missing
/// (plain VMs and containers; systemd hosts have both) and lifts the memlock limit on kernels
/// that still charge BPF memory to it. Failures are logged, never fatal: each probe reports
/// what it could not do.
pub fn prepare_host() {
    ensure_mounted(Path::new("/sys/kernel/tracing"), "tracefs", TRACEFS_MAGIC);
    ensure_mounted(Path::new("/sys/fs/bpf"), "bpf", BPF_FS_MAGIC);
    raise_memlock();
}

fn ensure_mounted(target: &Path, fstype: &str, magic: i64) {
    match nix::sys::statfs::statfs(target) {
        Ok(s) if s.filesystem_type().0 == magic => {
            debug!(path = %target.display(), fstype, "already mounted");
            return;
        }
        Ok(_) => {}
        Err(e) => {
            debug!(path = %target.display(), error = %crate::probes::error_chain(&e), "cannot stat mount point");
            return;
        }
    }
    match nix::mount::mount(
        Some("nodev"),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => info!(path = %target.display(), fstype, "mounted"),
        Err(e) => {
            warn!(path = %target.display(), fstype, error = %crate::probes::error_chain(&e), "could not mount")
        }
    }
}

fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads a valid, initialised struct.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        // Kernels >= 5.11 charge BPF memory to the memory cgroup instead; harmless there.
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not lift RLIMIT_MEMLOCK (fine on kernels that account BPF memory to memcg)"
        );
    }
}

/// The `sock_common` offsets every socket probe reads, from the kernel's BTF.
pub(crate) fn sock_offsets(
    btf: &btf::KernelBtf,
) -> Result<agent_common::sock::SockOffsets, btf::BtfError> {
    let mut o = [0u32; 7];
    for (slot, path) in o.iter_mut().zip(agent_common::sock::SockOffsets::PATHS) {
        *slot = btf.field("sock", path)?.offset;
    }
    Ok(agent_common::sock::SockOffsets::from_array(o))
}

/// An error with every cause in its chain (`failed to create map X: Operation not
/// permitted`), for status and logs: aya's outer errors alone rarely say why. Every error type
/// of the agent names only its own step and leaves its cause to `source()`, so the chain is
/// joined as it is, without de-duplication (`tests/hostile.rs` checks a cause shows once).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// For the tests that load eBPF programs (ignored by default; `cargo xtask test` runs them
/// as root): fails clearly when run without root.
#[cfg(test)]
pub(crate) fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test loads eBPF programs and needs root");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `X`")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_the_cause_once() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            error_chain(&e),
            "failed to create map `X`: Operation not permitted (os error 1)"
        );
        let plain = std::io::Error::other("plain");
        assert_eq!(error_chain(&plain), "plain");
        // Three levels, each named once.
        #[derive(Debug, thiserror::Error)]
        #[error("loading the object")]
        struct Top(#[source] Outer);
        let e = Top(Outer(std::io::Error::from_raw_os_error(libc::EPERM)));
        assert_eq!(
            error_chain(&e),
            "loading the object: failed to create map `X`: Operation not permitted (os error 1)"
        );
    }
}
