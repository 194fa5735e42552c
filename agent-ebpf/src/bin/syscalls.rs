//! Syscall latency: sys_enter records a start time, sys_exit folds the duration into a per-CPU
//! log2 histogram keyed by syscall number and, past the slow threshold, emits an event.
//!
//! Where the start time lives is the hot-path design. Most calls do not block: they enter and
//! exit on one CPU with no other task in between, so the start goes into a per-CPU slot tagged
//! with the task (an inlined array access). When the task is switched out mid-call (it
//! blocked, or was preempted), sched_switch moves the slot into the task's own local storage,
//! where sys_exit finds it on whatever CPU the task wakes up on. Task storage costs a helper
//! call with locking, so only calls that switched pay for it.
//!
//! In sampled mode userspace attaches and detaches the hooks (`probes/sampling.rs`); a start
//! recorded before the current window opened is never timed (`window_start_ns`).
//!
//! Two attachment flavours share one body: tp_btf (cheapest on 6.x kernels) and raw tracepoints
//! (the fallback where BTF-typed tracing is unavailable). Userspace attaches exactly one pair.
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::{
    counters, log2_bucket,
    syscalls::{
        InflightSyscall, SlowSyscallEvent, SyscallConfig, SyscallStart, SyscallStats,
        FILTER_CGROUP, FILTER_COMM, FILTER_PID, FILTER_PROCESS_MASK, FILTER_SYSCALL,
        MAX_FILTER_ENTRIES, MAX_SYSCALLS, SEEN_WORDS, SLOW_RINGBUF_BYTES,
    },
    TASK_COMM_LEN,
};
use agent_ebpf::TaskStorage;
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task_btf, bpf_ktime_get_ns,
    },
    macros::{btf_map, btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};

#[map]
static SYSCALL_CONFIG: Array<SyscallConfig> = Array::with_max_entries(1, 0);

#[map]
static SYSCALL_STATS: PerCpuArray<SyscallStats> = PerCpuArray::with_max_entries(MAX_SYSCALLS, 0);

/// The call in flight on each CPU (fast path).
#[map]
static SYSCALL_INFLIGHT: PerCpuArray<InflightSyscall> = PerCpuArray::with_max_entries(1, 0);

/// The call in flight of a task that was switched out during it.
#[btf_map]
static SYSCALL_START: TaskStorage<SyscallStart> = TaskStorage::new();

#[map]
static SYSCALL_SLOW_EVENTS: RingBuf = RingBuf::with_byte_size(SLOW_RINGBUF_BYTES, 0);

#[map]
static SYSCALL_FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static SYSCALL_FILTER_COMMS: HashMap<[u8; TASK_COMM_LEN], u8> =
    HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static SYSCALL_FILTER_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map]
static SYSCALL_FILTER_NRS: Array<u8> = Array::with_max_entries(MAX_SYSCALLS, 0);

/// One bit per syscall number that has been counted: userspace reads only those slots.
#[map]
static SYSCALL_SEEN: Array<[u64; SEEN_WORDS]> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[btf_tracepoint(function = "sys_enter")]
pub fn isa_btf_enter(ctx: BtfTracePointContext) -> i32 {
    // sys_enter(struct pt_regs *regs, long id)
    let id: i64 = ctx.arg(1);
    on_enter(id);
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn isa_btf_exit(ctx: BtfTracePointContext) -> i32 {
    // sys_exit(struct pt_regs *regs, long ret)
    let ret: i64 = ctx.arg(1);
    on_exit(ret);
    0
}

#[btf_tracepoint(function = "sched_switch")]
pub fn isa_btf_switch(_ctx: BtfTracePointContext) -> i32 {
    on_switch();
    0
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn isa_raw_enter(ctx: RawTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    on_enter(id);
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn isa_raw_exit(ctx: RawTracePointContext) -> i32 {
    let ret: i64 = ctx.arg(1);
    on_exit(ret);
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn isa_raw_switch(_ctx: RawTracePointContext) -> i32 {
    on_switch();
    0
}

/// The running task, as the tag of the per-CPU slot.
#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: no preconditions; the pointer is only compared, never dereferenced here.
    unsafe { bpf_get_current_task_btf() as u64 }
}

#[inline(always)]
fn bump(counter: u32) {
    agent_ebpf::util::bump(&COUNTERS, counter);
}

#[inline(always)]
fn on_enter(id: i64) {
    if id < 0 || id >= MAX_SYSCALLS as i64 {
        return;
    }
    let nr = id as u32;
    let flags = match SYSCALL_CONFIG.get(0) {
        Some(cfg) => cfg.filter_flags,
        None => 0,
    };
    if flags != 0 && !selected(flags, nr) {
        return;
    }
    let Some(slot) = SYSCALL_INFLIGHT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; sched_switch empties it before another task can run here.
    unsafe {
        (*slot).task = current_task();
        (*slot).nr = nr as u64;
        (*slot).start_ns = bpf_ktime_get_ns();
    }
}

/// sched_switch fires while the outgoing task is still current: park its call in flight (if
/// any) in its task storage, freeing this CPU's slot for the next task.
#[inline(always)]
fn on_switch() {
    let Some(slot) = SYSCALL_INFLIGHT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; the storage is the outgoing (current) task's own.
    unsafe {
        let start = (*slot).start_ns;
        if start == 0 {
            return;
        }
        (*slot).start_ns = 0;
        if (*slot).task != current_task() {
            return;
        }
        match SYSCALL_START.current_or_insert() {
            Some(parked) => {
                (*parked).start_ns = start;
                (*parked).nr = (*slot).nr;
            }
            None => {
                bump(counters::START_DROPS);
                aya_log_ebpf::warn!(
                    &(),
                    "syscalls: no task storage for a call that blocked: untimed"
                );
            }
        }
    }
}

#[inline(always)]
fn selected(flags: u32, nr: u32) -> bool {
    if flags & FILTER_SYSCALL != 0 {
        match SYSCALL_FILTER_NRS.get(nr) {
            Some(v) if *v != 0 => {}
            _ => return false,
        }
    }
    if flags & FILTER_PROCESS_MASK == 0 {
        return true;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if flags & FILTER_PID != 0 && SYSCALL_FILTER_PIDS.get_ptr(tgid).is_some() {
        return true;
    }
    if flags & FILTER_CGROUP != 0 {
        // SAFETY: no preconditions.
        let cg = unsafe { bpf_get_current_cgroup_id() };
        if SYSCALL_FILTER_CGROUPS.get_ptr(cg).is_some() {
            return true;
        }
    }
    if flags & FILTER_COMM != 0 {
        if let Ok(comm) = bpf_get_current_comm() {
            if SYSCALL_FILTER_COMMS.get_ptr(comm).is_some() {
                return true;
            }
        }
    }
    false
}

#[inline(always)]
fn on_exit(ret: i64) {
    let Some((start, nr)) = take_start() else {
        return;
    };
    let (threshold, window_start) = match SYSCALL_CONFIG.get(0) {
        Some(cfg) => (cfg.slow_threshold_ns, cfg.window_start_ns),
        None => (0, 0),
    };
    if start < window_start {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let duration = now.saturating_sub(start);

    mark_seen(nr);
    if let Some(stats) = SYSCALL_STATS.get_ptr_mut(nr) {
        let b = log2_bucket(duration);
        // SAFETY: per-CPU element; log2_bucket() < HIST_BUCKETS.
        unsafe {
            (*stats).count += 1;
            (*stats).total_ns += duration;
            if (-4095..0).contains(&ret) {
                (*stats).errors += 1;
            }
            if let Some(bucket) = (*stats).buckets.get_mut(b) {
                *bucket += 1;
            }
        }
    }

    if threshold != 0 && duration >= threshold {
        emit_slow(now, duration, ret, bpf_get_current_pid_tgid(), nr);
    }
}

/// The start and number of the current task's call: from this CPU's slot when the call did
/// not switch out, from its task storage when it did. Either is emptied.
#[inline(always)]
fn take_start() -> Option<(u64, u32)> {
    let task = current_task();
    if let Some(slot) = SYSCALL_INFLIGHT.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe {
            if (*slot).start_ns != 0 && (*slot).task == task {
                let start = (*slot).start_ns;
                (*slot).start_ns = 0;
                return Some((start, (*slot).nr as u32));
            }
        }
    }
    let parked = SYSCALL_START.current()?;
    // SAFETY: the current task's own storage.
    unsafe {
        let start = (*parked).start_ns;
        if start == 0 {
            return None;
        }
        (*parked).start_ns = 0;
        Some((start, (*parked).nr as u32))
    }
}

/// Sets the syscall's bit once; after that it is a load and a branch. Two CPUs setting bits
/// of one word at the same moment may lose one (no atomic OR on older BPF ISAs): userspace
/// sweeps every slot now and then, so a lost bit delays a syscall, never hides it.
#[inline(always)]
fn mark_seen(nr: u32) {
    let Some(seen) = SYSCALL_SEEN.get_ptr_mut(0) else {
        return;
    };
    let bit = 1u64 << (nr & 63);
    // SAFETY: single-element array; the index is masked into range.
    unsafe {
        if let Some(word) = (*seen).get_mut((nr >> 6) as usize & (SEEN_WORDS - 1)) {
            if *word & bit == 0 {
                *word |= bit;
            }
        }
    }
}

#[inline(always)]
fn emit_slow(now: u64, duration: u64, ret: i64, pid_tgid: u64, nr: u32) {
    let Some(mut entry) = SYSCALL_SLOW_EVENTS.reserve::<SlowSyscallEvent>(0) else {
        bump(counters::SLOW_DROPS);
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    entry.write(SlowSyscallEvent {
        ts_ns: now,
        duration_ns: duration,
        // SAFETY: no preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ret,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        nr,
        _reserved: 0,
        comm,
    });
    entry.submit(0);
    bump(counters::SLOW_EVENTS);
}
