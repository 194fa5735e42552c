//! insite-agent kernel programs: one object per probe family (`src/bin/*`), so that each
//! family loads, attaches and fails on its own. This library holds what they share.
//!
//! It is also what `agent` names as a build-dependency, so cargo rebuilds the agent (whose
//! build.rs compiles the kernel objects) when this crate changes.
#![no_std]
// Atomic adds: core's atomic types lack fetch_add on the bpf target; the intrinsic lowers to
// the BPF atomic add instruction.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Every panic path is rejected by the verifier, so this is never reached.
    loop {}
}

/// Declares the object's license (GPL: required for the tracing helpers we call).
#[macro_export]
macro_rules! license {
    () => {
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}

/// Local storage map, BTF-defined (the libbpf convention; aya-ebpf 0.2 has no wrapper):
/// state that lives in a kernel object itself and is freed with it. `KIND` is the map type.
#[repr(C)]
pub struct LocalStorage<T, const KIND: usize> {
    r#type: *const [i32; KIND],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    // BPF_F_NO_PREALLOC, which local storage requires.
    map_flags: *const [i32; aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize],
}

/// Task-local storage (BPF_MAP_TYPE_TASK_STORAGE): per-thread state in the task itself. A
/// lookup is a pointer chase from the current task, far cheaper on the syscall hot path than
/// hashing a tid into a hash map, and the kernel frees it with the task.
pub type TaskStorage<T> =
    LocalStorage<T, { aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize }>;

/// Socket-local storage (BPF_MAP_TYPE_SK_STORAGE): state in the socket itself, freed with it,
/// so a connection that closes without our noticing (unix sockets have no state tracepoint)
/// leaks nothing.
pub type SkStorage<T> =
    LocalStorage<T, { aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize }>;

// SAFETY: a placeholder the loader patches; never dereferenced from Rust.
unsafe impl<T, const KIND: usize> Sync for LocalStorage<T, KIND> {}

impl<T, const KIND: usize> Default for LocalStorage<T, KIND> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const KIND: usize> LocalStorage<T, KIND> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }
}

/// Storage get flag: create the value (zeroed) if missing.
#[cfg(target_arch = "bpf")]
const GET_F_CREATE: u64 = aya_ebpf::bindings::BPF_LOCAL_STORAGE_GET_F_CREATE as u64;

impl<T> TaskStorage<T> {
    /// The current task's value, created zeroed on first use; `None` if the kernel could not
    /// allocate it.
    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    pub fn current_or_insert(&self) -> Option<*mut T> {
        self.lookup_task(GET_F_CREATE)
    }

    /// The current task's value if it has one.
    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    pub fn current(&self) -> Option<*mut T> {
        self.lookup_task(0)
    }

    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    fn lookup_task(&self, flags: u64) -> Option<*mut T> {
        use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get};
        // SAFETY: the map pointer is this map; the task is the current one (a trusted BTF
        // pointer); a null value asks for zero-initialised storage when creating.
        let p = unsafe {
            bpf_task_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                bpf_get_current_task_btf(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }
}

impl<T> SkStorage<T> {
    /// The socket's value if it has one. `sk` must be a `struct sock *` the program was given.
    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    pub fn get(&self, sk: *const u8) -> Option<*mut T> {
        self.lookup_sk(sk, 0)
    }

    /// The socket's value, created zeroed if it has none; `None` if it could not be allocated.
    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    pub fn get_or_insert(&self, sk: *const u8) -> Option<*mut T> {
        self.lookup_sk(sk, GET_F_CREATE)
    }

    #[cfg(target_arch = "bpf")]
    #[inline(always)]
    fn lookup_sk(&self, sk: *const u8, flags: u64) -> Option<*mut T> {
        use aya_ebpf::helpers::generated::bpf_sk_storage_get;
        // SAFETY: the map pointer is this map; the socket is a trusted BTF pointer from the
        // tracepoint's arguments.
        let p = unsafe {
            bpf_sk_storage_get(
                core::ptr::from_ref(self).cast_mut().cast(),
                sk.cast_mut().cast(),
                core::ptr::null_mut(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }
}

/// Small pieces every probe family's programs use.
#[cfg(target_arch = "bpf")]
pub mod util {
    use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray};

    /// Adds one to slot `idx` of a per-CPU counter array.
    #[inline(always)]
    pub fn bump(counters: &PerCpuArray<u64>, idx: u32) {
        if let Some(c) = counters.get_ptr_mut(idx) {
            // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
            unsafe { *c += 1 };
        }
    }

    /// Reads a `T` at `base + off`, where `base` is a BTF-typed kernel pointer the program was
    /// given (or loaded from one) and `off` a known constant: the verifier turns it into a
    /// fault-tolerant load (a bad address reads as zero), checked against the type's BTF.
    #[inline(always)]
    pub fn load<T: Copy>(base: *const u8, off: u32) -> T {
        // SAFETY: see above.
        unsafe { core::ptr::read_volatile(base.wrapping_add(off as usize).cast::<T>()) }
    }

    /// `*p += v`, atomically (BPF `lock` add: no result, no ordering): map values every CPU
    /// updates.
    ///
    /// # Safety
    /// `p` points into a map value.
    #[inline(always)]
    pub unsafe fn atomic_add<T: Copy>(p: *mut T, v: T) {
        use core::intrinsics::{atomic_xadd, AtomicOrdering};
        // SAFETY: the caller's.
        unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
    }

    /// Stores `new` at `p` if it holds `old` (BPF cmpxchg, a full barrier); returns whether it
    /// did.
    ///
    /// # Safety
    /// `p` points into a map value.
    #[inline(always)]
    pub unsafe fn atomic_cas(p: *mut u64, old: u64, new: u64) -> bool {
        use core::intrinsics::{atomic_cxchg, AtomicOrdering};
        // SAFETY: the caller's.
        unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
                .1
        }
    }

    #[inline(always)]
    pub fn now_ns() -> u64 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_ns() }
    }

    /// Ring-buffer submit flags that wake the reader once per `every` events written on this
    /// CPU (`pending` counts them): a wakeup costs more than the event, and the reader also
    /// drains on a timer.
    #[inline(always)]
    pub fn wakeup_flags(pending: &PerCpuArray<u32>, every: u32) -> u64 {
        const BPF_RB_NO_WAKEUP: u64 = 1;
        const BPF_RB_FORCE_WAKEUP: u64 = 2;
        let Some(n) = pending.get_ptr_mut(0) else {
            return 0;
        };
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe {
            *n += 1;
            if *n >= every {
                *n = 0;
                BPF_RB_FORCE_WAKEUP
            } else {
                BPF_RB_NO_WAKEUP
            }
        }
    }
}
