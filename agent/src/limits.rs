//! Process-wide limits the agent sets for itself at start-up, so that no client can use up
//! what the agent needs to keep working: file descriptors and heap memory.
//!
//! File descriptors: the soft RLIMIT_NOFILE is raised to the hard limit (systemd starts
//! services with a soft limit of 1024). Connections to the metrics endpoint and the control
//! socket are capped, and the caps are lowered, if needed, so that [`FD_RESERVE`] descriptors
//! always stay free for the probes' maps, procfs reads and cgroup lookups: a flood of idle
//! clients never makes `/proc/stat` fail with EMFILE.

use tracing::{debug, warn};

/// Descriptors kept free of client connections: the probes' maps, programs and links (about
/// 80), procfs and cgroup files read during a tick, sock_diag sockets, logging.
pub const FD_RESERVE: u64 = 256;

/// The file descriptor limit after start-up, and how the connection caps fit under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    pub soft: u64,
    pub hard: u64,
    /// Cap for metrics connections that fits under `soft` with the control cap and the reserve.
    pub metrics_connections: usize,
    pub control_connections: usize,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and fits the connection caps under it.
pub fn fd_budget(metrics_connections: usize, control_connections: usize) -> FdBudget {
    let (mut soft, hard) =
        match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "getrlimit(RLIMIT_NOFILE)");
                (1024, 1024)
            }
        };
    if soft < hard {
        match nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
        {
            Ok(()) => {
                debug!(
                    from = soft,
                    to = hard,
                    "raised the soft file descriptor limit"
                );
                soft = hard;
            }
            Err(e) => warn!(soft, hard, error = %e, "could not raise the file descriptor limit"),
        }
    }
    let room = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    let (mut m, mut c) = (metrics_connections, control_connections);
    if m + c > room {
        // Share what there is in proportion, at least a few each.
        let total = (m + c).max(1);
        m = (room * m / total).max(4);
        c = (room * c / total).max(4);
        warn!(
            soft,
            metrics.max_connections = m,
            control.max_connections = c,
            "file descriptor limit too low for the configured connection caps; lowered them (raise LimitNOFILE)"
        );
    }
    FdBudget {
        soft,
        hard,
        metrics_connections: m,
        control_connections: c,
    }
}

/// Gives free heap memory back to the system after a large one-off allocation (a big reply or
/// scrape, a config parse): glibc otherwise keeps it in its free lists for the process's
/// lifetime, and RSS never comes down.
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory; it takes the allocator's own locks.
    unsafe { libc::malloc_trim(0) };
}

/// The heap as glibc's allocator sees it: bytes in use, and bytes free but kept (in its free
/// lists and arenas), over every arena.
pub fn heap() -> (u64, u64) {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) as u64, (m.fordblks) as u64)
}

/// Caps glibc's malloc arenas. Each thread that allocates may otherwise get its own arena
/// (up to 8 per CPU), and memory freed in one is not reused by another: bursts of work on
/// many tokio threads fragment into RSS that stays.
pub fn cap_malloc_arenas() {
    // SAFETY: mallopt only tunes the allocator; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_under_the_limit() {
        let b = fd_budget(64, 32);
        assert!(b.soft >= b.hard.min(1024));
        assert!(
            b.metrics_connections as u64 + b.control_connections as u64 + FD_RESERVE
                <= b.soft.max(FD_RESERVE + 8)
        );
    }
}
