//! Syscall numbers <-> names for the host's architecture, from the `syscalls` crate's tables
//! (generated from the kernel's own syscall tables; they name every x86_64 syscall the UAPI
//! header we used to carry named, and the 21 added since, up to `file_setattr`).

use std::str::FromStr as _;

use syscalls::Sysno;

/// Name of syscall `nr`, if it has one.
pub fn name(nr: u32) -> Option<&'static str> {
    Sysno::new(nr as usize).map(|s| s.name())
}

/// Label value for syscall `nr`: its name, or `sys_<nr>` for numbers without one.
pub fn label(nr: u32) -> String {
    name(nr).map_or_else(|| format!("sys_{nr}"), str::to_string)
}

/// Number of the syscall called `name`.
pub fn number(name: &str) -> Option<u32> {
    Sysno::from_str(name)
        .ok()
        .and_then(|s| u32::try_from(s.id()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn known_numbers() {
        assert_eq!(name(0), Some("read"));
        assert_eq!(name(1), Some("write"));
        assert_eq!(name(35), Some("nanosleep"));
        assert_eq!(name(39), Some("getpid"));
        assert_eq!(name(110), Some("getppid"));
        assert_eq!(name(230), Some("clock_nanosleep"));
        assert_eq!(name(435), Some("clone3"));
        assert_eq!(name(335), Some("uretprobe"));
        assert_eq!(name(451), Some("cachestat"));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gaps_and_out_of_range() {
        assert_eq!(name(340), None); // unassigned between 336 and 424
        assert_eq!(name(100_000), None);
        assert_eq!(label(340), "sys_340");
        assert_eq!(label(110), "getppid");
    }

    #[test]
    fn round_trip() {
        for nr in 0..agent_common::syscalls::MAX_SYSCALLS {
            if let Some(n) = name(nr) {
                assert_eq!(number(n), Some(nr), "{n}");
            }
        }
        assert_eq!(number("nope"), None);
        assert_eq!(number(""), None);
    }
}
