//! x86_64 syscall numbers <-> names.

#[path = "syscall_table.rs"]
mod table;

/// Name of syscall `nr`, if it has one.
pub fn name(nr: u32) -> Option<&'static str> {
    table::X86_64.get(nr as usize).copied().flatten()
}

/// Label value for syscall `nr`: its name, or `sys_<nr>` for numbers without one.
pub fn label(nr: u32) -> String {
    name(nr).map_or_else(|| format!("sys_{nr}"), str::to_string)
}

/// Number of the syscall called `name`.
pub fn number(name: &str) -> Option<u32> {
    table::X86_64
        .iter()
        .position(|n| *n == Some(name))
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        assert_eq!(name(0), Some("read"));
        assert_eq!(name(1), Some("write"));
        assert_eq!(name(35), Some("nanosleep"));
        assert_eq!(name(39), Some("getpid"));
        assert_eq!(name(110), Some("getppid"));
        assert_eq!(name(230), Some("clock_nanosleep"));
        assert_eq!(name(435), Some("clone3"));
    }

    #[test]
    fn gaps_and_out_of_range() {
        assert_eq!(name(335), None); // unassigned between 334 and 424
        assert_eq!(name(100_000), None);
        assert_eq!(label(335), "sys_335");
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
    }
}
