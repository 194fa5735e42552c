//! Syscall latency probe: maps and records.

use crate::{HIST_BUCKETS, TASK_COMM_LEN};

/// Highest syscall number (exclusive) that is tracked. x86_64 uses < 470 today; x32 numbers
/// (bit 30 set) and anything else out of range is ignored.
pub const MAX_SYSCALLS: u32 = 512;

/// Words of the `SYSCALL_SEEN` bitmap (one bit per syscall number).
pub const SEEN_WORDS: usize = (MAX_SYSCALLS as usize).div_ceil(64);

/// Capacity of each process-selector filter map.
pub const MAX_FILTER_ENTRIES: u32 = 1024;

/// Ring buffer size for slow-call events (a power of two, multiple of the page size).
pub const SLOW_RINGBUF_BYTES: u32 = 256 * 1024;

/// `SyscallConfig::filter_flags`: trace only pids in `SYSCALL_FILTER_PIDS`.
pub const FILTER_PID: u32 = 1 << 0;
/// `SyscallConfig::filter_flags`: trace only comms in `SYSCALL_FILTER_COMMS`.
pub const FILTER_COMM: u32 = 1 << 1;
/// `SyscallConfig::filter_flags`: trace only cgroups in `SYSCALL_FILTER_CGROUPS`.
pub const FILTER_CGROUP: u32 = 1 << 2;
/// `SyscallConfig::filter_flags`: trace only syscalls marked in `SYSCALL_FILTER_NRS`.
pub const FILTER_SYSCALL: u32 = 1 << 3;
/// The process selectors: a task is traced when it matches any enabled one.
pub const FILTER_PROCESS_MASK: u32 = FILTER_PID | FILTER_COMM | FILTER_CGROUP;

/// Runtime configuration of the syscall probe, element 0 of `SYSCALL_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallConfig {
    /// Calls at least this long are sent to the ring buffer; 0 disables slow-call events.
    pub slow_threshold_ns: u64,
    /// `FILTER_*` bits.
    pub filter_flags: u32,
    pub _reserved: u32,
    /// When the hooks were last attached (`bpf_ktime_get_ns`). A start older than this was
    /// recorded in an earlier sampling window and its exit missed: never timed against now.
    pub window_start_ns: u64,
}

/// Per-thread start of the call in flight (task-local storage `SYSCALL_START`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallStart {
    /// `bpf_ktime_get_ns` at sys_enter; 0 means no call in flight.
    pub start_ns: u64,
    pub nr: u64,
}

/// The call in flight on a CPU (`SYSCALL_INFLIGHT`): the fast path for calls that do not
/// block. `task` tags the owner (a `task_struct` address); `start_ns` 0 means none.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InflightSyscall {
    pub task: u64,
    pub start_ns: u64,
    pub nr: u64,
}

/// Per-CPU, per-syscall aggregate, element `nr` of `SYSCALL_STATS`. Monotonic counters:
/// userspace computes deltas.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SyscallStats {
    pub count: u64,
    /// Calls that returned a negative errno.
    pub errors: u64,
    pub total_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}

impl SyscallStats {
    pub const ZERO: Self = Self {
        count: 0,
        errors: 0,
        total_ns: 0,
        buckets: [0; HIST_BUCKETS],
    };
}

/// A call that took at least `slow_threshold_ns`, sent through `SYSCALL_SLOW_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlowSyscallEvent {
    /// `bpf_ktime_get_ns` at sys_exit (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub duration_ns: u64,
    pub cgroup_id: u64,
    pub ret: i64,
    pub pid: u32,
    pub tid: u32,
    pub nr: u32,
    pub _reserved: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

// No implicit padding: every size is the plain sum of its fields.
const _: () = assert!(core::mem::size_of::<SyscallConfig>() == 24);
const _: () = assert!(core::mem::size_of::<SyscallStart>() == 16);
const _: () = assert!(core::mem::size_of::<InflightSyscall>() == 24);
const _: () = assert!(core::mem::size_of::<SyscallStats>() == 8 * (3 + HIST_BUCKETS));
const _: () = assert!(core::mem::size_of::<SlowSyscallEvent>() == 8 * 4 + 4 * 4 + TASK_COMM_LEN);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), no padding (asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::SyscallConfig {}
    unsafe impl aya::Pod for super::SyscallStart {}
    unsafe impl aya::Pod for super::InflightSyscall {}
    unsafe impl aya::Pod for super::SyscallStats {}
    unsafe impl aya::Pod for super::SlowSyscallEvent {}
}
