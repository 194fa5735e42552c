//! The two bpf(2) commands aya 0.14 does not wrap for us: a program's recursion misses
//! (`ProgramInfo` keeps its `bpf_prog_info` private and has no getter for them) and batched
//! map reads. Each is one syscall on a zeroed `bpf_attr` from aya-obj's generated bindings.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// bpf(2) with `attr`; the kernel reads `size_of::<bpf_attr>()` bytes of it and writes only
/// through the user pointers the command's fields carry.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` does with it during the call.
unsafe fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for the pointers; `attr` is a live, initialised bpf_attr
    // of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a union of plain integer structs: all-zero is valid (and what the
    // kernel requires of the bytes a command does not use).
    unsafe { MaybeUninit::<bpf_attr>::zeroed().assume_init() }
}

/// Runs of the program the kernel skipped because the same program was already running on
/// that CPU (`bpf_prog_info.recursion_misses`, 5.12+; 0 on older kernels, which do not fill
/// it in). For tp_btf and raw tracepoints that is an event this program never saw.
pub fn recursion_misses(prog: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: bpf_prog_info is plain integers: all-zero is valid.
    let mut info: bpf_prog_info = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = prog.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: the kernel writes at most info_len bytes to `info`, which outlives the call.
    // The pointers it could follow in `info` (map ids, instructions, ...) are all zero, so
    // it fills in none of them.
    unsafe { sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info.recursion_misses)
}

/// Every (key, value) of a hash map, `chunk` entries per syscall (BPF_MAP_LOOKUP_BATCH,
/// 5.6+). Entries that change during the walk may be missed or seen twice, as with any
/// iteration of a live map. `K` and `V` must be the map's exact key and value types (the
/// caller's typed aya map has checked their sizes).
pub fn lookup_batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    map: BorrowedFd<'_>,
    chunk: u32,
) -> io::Result<Vec<(K, V)>> {
    let chunk = chunk.max(1);
    let mut keys = vec![K::default(); chunk as usize];
    let mut values = vec![V::default(); chunk as usize];
    // The hash map's batch token is a u32 bucket index; a u64 leaves room to spare.
    let mut token: u64 = 0;
    let mut out = Vec::new();
    let mut first = true;
    loop {
        let mut attr = zeroed_attr();
        attr.batch.in_batch = if first {
            0
        } else {
            std::ptr::from_ref(&token) as u64
        };
        attr.batch.out_batch = std::ptr::from_mut(&mut token) as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk;
        attr.batch.map_fd = map.as_raw_fd() as u32;
        // SAFETY: `keys` and `values` hold `chunk` elements of the map's key and value types,
        // the kernel writes at most `count` of each; `token` is read and written through the
        // batch pointers. All outlive the call.
        let res = unsafe { sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // SAFETY: `batch` is the member this command uses; the kernel set its count.
        let n = (unsafe { attr.batch.count }).min(chunk) as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match res {
            Ok(_) => first = false,
            // ENOENT: the walk is complete (the last entries came with it).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}
