//! What every family names things by: a task's command name as the kernel hands it over, and
//! where the cgroup v2 hierarchy is mounted (cgroup ids resolve to paths below it).

use std::path::PathBuf;

/// Decodes a comm (NUL-padded, not necessarily UTF-8: a process sets it) for display. The
/// result is still untrusted: escape it where it is written.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    mounts
        .into_iter()
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comms_stop_at_the_first_nul_and_survive_bad_utf8() {
        assert_eq!(comm_str(b"postgres\0\0\0\0\0\0\0\0"), "postgres");
        assert_eq!(comm_str(b"0123456789abcdef"), "0123456789abcdef");
        assert_eq!(comm_str(b"a\xffb\0"), "a\u{fffd}b");
    }

    #[test]
    fn cgroup2_is_found_here() {
        // The build machines have cgroup2 (hybrid or unified); the id lookups depend on it.
        let root = cgroup2_root().expect("cgroup2 mounted");
        assert!(root.join("cgroup.procs").exists(), "{}", root.display());
    }
}
