//! Types shared by the kernel programs (`agent-ebpf`) and the userspace agent.
//!
//! Every type here crosses the kernel/user boundary byte for byte: `#[repr(C)]`, fixed-size
//! fields ordered so that there is no implicit padding (checked at compile time below), and no
//! pointers. Change a layout here and both sides change together.
#![no_std]

pub mod db;
pub mod net;
pub mod ratelimit;
pub mod sock;
pub mod syscalls;

/// Length of `task_struct::comm` (including the trailing NUL).
pub const TASK_COMM_LEN: usize = 16;

/// Number of log2 latency buckets kept in the kernel.
///
/// Bucket `i` counts durations `d` (in nanoseconds) with `2^i <= d < 2^(i+1)`; bucket 0 also
/// holds `d == 0` and the last bucket holds everything at or above `2^(HIST_BUCKETS-1)` ns
/// (about 9 minutes), so no observation is ever lost to the range.
pub const HIST_BUCKETS: usize = 40;

/// The log2 bucket of a duration in nanoseconds (see [`HIST_BUCKETS`]).
#[inline(always)]
pub fn log2_bucket(ns: u64) -> usize {
    if ns == 0 {
        return 0;
    }
    let b = (63 - ns.leading_zeros()) as usize;
    if b >= HIST_BUCKETS {
        HIST_BUCKETS - 1
    } else {
        b
    }
}

/// Indices into the per-CPU `COUNTERS` array: self-observability of the kernel side.
pub mod counters {
    /// Slow-syscall events written to the ring buffer.
    pub const SLOW_EVENTS: u32 = 0;
    /// Slow-syscall events lost because the ring buffer was full.
    pub const SLOW_DROPS: u32 = 1;
    /// Calls whose start could not be parked in task storage when they switched out.
    pub const START_DROPS: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}
