//! What the eBPF probes need from the process's privileges, checked once at start so that an
//! agent started without them says so plainly (instead of three EPERMs in `status`).
//!
//! On kernels 5.8+ loading and attaching the tracing programs needs CAP_BPF and CAP_PERFMON
//! (CAP_SYS_ADMIN stands in for both, as on older kernels); mounting bpffs and tracefs where
//! they are missing needs CAP_SYS_ADMIN.

/// Capabilities to grant instead of running as root (see README, Requirements).
pub const NEEDED: &[&str] = &["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"];

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capabilities of this process (`CapEff` in /proc/self/status).
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Capabilities the probes need that this process lacks (empty: it has what they need, or
/// its capabilities cannot be read, and the probes will tell).
pub fn missing_for_ebpf() -> Vec<&'static str> {
    let Some(caps) = effective() else {
        return Vec::new();
    };
    missing(caps)
}

fn missing(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut out = Vec::new();
    if !has(CAP_BPF) && !admin {
        out.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !admin {
        out.push("CAP_PERFMON");
    }
    out
}

/// Whether a probe's failure (its error chain) is a refusal for want of privileges.
pub fn is_permission_error(chain: &str) -> bool {
    chain.contains("Operation not permitted")
        || chain.contains("Permission denied")
        || chain.contains("EPERM")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities() {
        assert_eq!(missing(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert_eq!(missing(1 << CAP_BPF), vec!["CAP_PERFMON"]);
        assert!(is_permission_error(
            "loading: Operation not permitted (os error 1)"
        ));
        assert!(!is_permission_error("no struct sock in kernel BTF"));
    }
}
