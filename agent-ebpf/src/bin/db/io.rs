//! Reads and writes: which user buffer holds the bytes, the per-CPU scratch window over
//! them, recognising a database connection on its first request, and the connection event.

use super::*;

pub(crate) type Step = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

/// Runs `step` until it stops the walk or `max` steps have run (`bpf_loop`: the step is
/// verified once, however many times it runs).
#[inline(always)]
pub(crate) fn run_steps(c: &mut Conn, w: &mut Scratch, max: u32, step: Step) {
    vset(&mut w.done, CAPPED);
    let mut l = LoopCtx {
        c: core::ptr::from_mut(c),
        w: core::ptr::from_mut(w),
    };
    // SAFETY: `step` is a static function of the helper's callback type; `l` outlives the
    // call, which runs `step` on this CPU only.
    unsafe { bpf_loop(max, step as *mut _, (&raw mut l).cast(), 0) };
}

/// The step cap stopped the walk with bytes of this read or write left.
#[inline(always)]
pub(crate) fn capped(w: &Scratch) -> bool {
    vget(&w.done) == CAPPED && (vget(&w.at) < vget(&w.len) || vget(&w.seg_rest) > 0)
}

/// PostgreSQL and MySQL walk the first segment of a readv/writev only: the rest is not
/// decoded, and the framing of this direction is lost (counted).
#[inline(always)]
pub(crate) fn later_segments(c: &mut Conn, w: &mut Scratch, req: bool) {
    if vget(&w.seg_rest) > 0 {
        vset(&mut w.at, vget(&w.len));
        desync(c, w, req);
    }
}

/// The rest of this read or write will not be walked: its framing is lost (counted).
#[inline(always)]
pub(crate) fn step_cap(c: &mut Conn, w: &mut Scratch, req: bool) {
    bump(counters::STEP_CAP);
    desync(c, w, req);
}

/// A step's view of the walk. Returns 1 (stop) when `go` is false.
#[inline(always)]
pub(crate) fn step_with(
    ctx: *mut core::ffi::c_void,
    go: impl FnOnce(&mut Conn, &mut Scratch) -> bool,
) -> i64 {
    // SAFETY: `run_steps` passes its `LoopCtx`, whose pointers are the connection's storage
    // and the per-CPU scratch of this run.
    let (c, w) = unsafe {
        let l = &*ctx.cast::<LoopCtx>();
        (&mut *l.c, &mut *l.w)
    };
    if go(c, w) {
        0
    } else {
        vset(&mut w.done, DONE);
        1
    }
}

pub(crate) extern "C" fn resp_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, resp_step::<true>)
}

pub(crate) extern "C" fn resp_step_resp(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, resp_step::<false>)
}

pub(crate) extern "C" fn pg_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| pg_step(c, w, true))
}

pub(crate) extern "C" fn pg_step_resp(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| pg_step(c, w, false))
}

pub(crate) extern "C" fn my_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, my_step)
}

/// The connection and the scratch `on_io` prepared.
#[inline(always)]
pub(crate) fn walk_state(
    ctx: &BtfTracePointContext,
) -> Option<(&'static mut Conn, &'static mut Scratch)> {
    let sk: *const u8 = ctx.arg(0);
    let c = DB_CONNS.get(sk)?;
    let w = DB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the socket's storage and the per-CPU scratch, both live for this run.
    Some(unsafe { (&mut *c, &mut *w) })
}

#[inline(always)]
pub(crate) fn bump(counter: u32) {
    util::bump(&DB_COUNTERS, counter);
}

#[inline(always)]
pub(crate) fn bump_by(counter: u32, n: u64) {
    if let Some(v) = DB_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe { *v += n };
    }
}

#[inline(always)]
pub(crate) fn read_user(dst: *mut u8, len: u32, src: u64) -> bool {
    // SAFETY: the helper checks both addresses; a fault returns an error.
    unsafe { bpf_probe_read_user(dst.cast(), len, src as *const _) == 0 }
}

/// The user buffer a read or write used, from the syscall's arguments: its first segment
/// (address, and how many of the `ret` bytes are in it), the user address of the next
/// `struct iovec` (readv/writev, recvmsg/sendmsg) and how many bytes the later segments hold.
#[inline(always)]
pub(crate) fn user_buffer(ret: u32) -> Option<(u64, u32, u64, u32)> {
    // SAFETY: the current task is a trusted pointer; the result is its saved user registers.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    // SAFETY: pt_regs is a BTF type; constant offsets inside it.
    let nr: u64 = unsafe { core::ptr::read_volatile(regs.add(REGS_ORIG_AX).cast()) };
    let si: u64 = unsafe { core::ptr::read_volatile(regs.add(REGS_SI).cast()) };
    let iov_ptr = match nr {
        NR_READ | NR_WRITE | NR_RECVFROM | NR_SENDTO => return Some((si, ret, 0, 0)),
        NR_READV | NR_WRITEV => si,
        NR_RECVMSG | NR_SENDMSG => {
            let mut p = 0u64;
            if !read_user((&raw mut p).cast(), 8, si + MSGHDR_IOV as u64) {
                return None;
            }
            p
        }
        // io_uring, sendfile, splice, compat syscalls: not followed.
        _ => return None,
    };
    let mut iov = [0u64; 2];
    if !read_user(iov.as_mut_ptr().cast(), 16, iov_ptr) {
        return None;
    }
    let first = if iov[1] < ret as u64 {
        iov[1] as u32
    } else {
        ret
    };
    Some((iov[0], first, iov_ptr + 16, ret - first))
}

/// The walk reached the end of a segment: moves to the next one of a readv/writev (or
/// recvmsg/sendmsg); false if there is none (or it cannot be read: the rest stays counted in
/// `seg_rest`).
#[inline(always)]
pub(crate) fn next_segment(w: &mut Scratch) -> bool {
    let rest = vget(&w.seg_rest);
    if rest == 0 {
        return false;
    }
    let mut iov = [0u64; 2];
    if !read_user(iov.as_mut_ptr().cast(), 16, vget(&w.iov_next)) {
        return false;
    }
    let n = if iov[1] < rest as u64 {
        iov[1] as u32
    } else {
        rest
    };
    vadd(&mut w.iov_next, 16);
    vset(&mut w.seg_rest, rest - n);
    vset(&mut w.buf_addr, iov[0]);
    vset(&mut w.len, n);
    vset(&mut w.at, 0);
    vset(&mut w.base, 0);
    vset(&mut w.copied, 0);
    true
}

/// Filters, recognises and prepares the scratch; returns the walker to tail-call.
#[inline(always)]
pub(crate) fn on_io(sk: *const u8, ret: i32, send: bool) -> Option<u32> {
    if ret <= 0 {
        return None;
    }
    let off = offsets();
    let family: u16 = load(sk, off.sock.skc_family);
    if family != AF_INET && family != AF_INET6 && family != AF_UNIX {
        return None;
    }
    let ty: u16 = load(sk, off.sk_type);
    if ty != SOCK_STREAM {
        return None;
    }
    let conn = match DB_CONNS.get(sk) {
        Some(c) => c,
        None => {
            let misses = DB_NOT_DB.get(sk);
            if let Some(m) = misses {
                // SAFETY: this socket's own storage.
                if unsafe { *m } >= DB_GIVE_UP {
                    return None;
                }
            }
            match recognise(sk, ret as u32, send, family, &off) {
                Seen::Db(c) => c,
                Seen::Handled => return None,
                Seen::Other => {
                    not_db(sk, misses);
                    return None;
                }
            }
        }
    };
    // SAFETY: storage of this socket; tracepoints on one socket may run on two CPUs at once
    // (a reader and a writer), which at worst misorders a request with its own response: the
    // FIFO indices stay in range because every index is masked.
    let c = unsafe { &mut *conn };
    if c.phase == TLS {
        return None;
    }
    let (buf, len, iov_next, seg_rest) = user_buffer(ret as u32)?;
    let w = DB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch; programs do not preempt each other on one CPU.
    let w = unsafe { &mut *w };
    w.buf_addr = buf;
    w.len = len;
    w.iov_next = iov_next;
    w.seg_rest = seg_rest;
    w.base = 0;
    w.copied = fill(w, 0);
    w.run_count = 0;
    w.at = 0;
    let request_dir = (c.role == role::CLIENT) == send;
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if pid != c.pid || c.conn_pending != 0 {
        c.pid = pid;
        conn_event(sk, c, family, &off);
    }
    (w.slow_ns, w.known_gen) = match DB_SETTINGS.get(0) {
        Some(s) => (s.slow_ns[(c.system & 3) as usize], s.known_gen),
        None => (0, 0),
    };
    w.now = now_ns();
    w.req = request_dir as u8;
    match c.system {
        system::POSTGRESQL => Some(WALK_PG),
        system::MYSQL => Some(WALK_MYSQL),
        system::REDIS if request_dir => Some(WALK_RESP_REQ),
        system::REDIS => Some(WALK_RESP_RESP),
        _ => None,
    }
}

/// Copies up to SCRATCH bytes of the user buffer from `from` into the scratch; returns how many.
#[inline(always)]
pub(crate) fn fill(s: &mut Scratch, from: u32) -> u32 {
    let len = s.len;
    if from >= len {
        return 0;
    }
    let mut n = len - from;
    if n > SCRATCH as u32 {
        n = SCRATCH as u32;
    }
    if read_user(s.buf.as_mut_ptr(), n, s.buf_addr + from as u64) {
        n
    } else {
        0
    }
}

/// One more read or write of `sk` that fit no database protocol.
#[inline(always)]
pub(crate) fn not_db(sk: *const u8, misses: Option<*mut u32>) {
    let m = match misses {
        Some(m) => m,
        None => match DB_NOT_DB.get_or_insert(sk) {
            Some(m) => m,
            None => return,
        },
    };
    // SAFETY: this socket's own storage. A reader and a writer racing may lose an increment:
    // the verdict comes a read or write later.
    unsafe {
        *m += 1;
        if *m == DB_GIVE_UP {
            bump(counters::GAVE_UP);
        }
    }
}

/// A read or write of a socket without state: is it one of ours?
#[inline(always)]
pub(crate) fn recognise(sk: *const u8, ret: u32, send: bool, family: u16, off: &DbOffsets) -> Seen {
    let Some((buf, n, _, _)) = user_buffer(ret) else {
        return Seen::Other;
    };
    if n < 5 {
        return Seen::Other;
    }
    let mut h = [0u8; 16];
    let want = if n < 16 { n } else { 16 };
    if !read_user(h.as_mut_ptr(), want, buf) {
        return Seen::Other;
    }
    let be32 = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let le24 = u32::from_le_bytes([h[0], h[1], h[2], 0]);
    let letter = |b: u8| b.is_ascii_alphabetic() || b == b'(' || b == b' ' || b == b'\n';
    // (system, phase, the data is a request: else a server greeting)
    let (sys, phase, request) = if n >= 8 && be32(0) == n && be32(4) == 196_608 {
        (system::POSTGRESQL, READY, true) // startup packet: consumed here
    } else if n == 8 && be32(0) == 8 && (be32(4) == 80_877_103 || be32(4) == 80_877_104) {
        (system::POSTGRESQL, PG_SSL_WAIT, true)
    } else if (h[0] == b'Q' && be32(1) + 1 == n && be32(1) >= 5 && letter(h[5]))
        || (h[0] == b'P' && be32(1) >= 6 && be32(1) < n && (h[5] == 0 || letter(h[5])))
    {
        // A simple query alone, or a Parse: an established connection the agent joins late.
        (system::POSTGRESQL, READY, true)
    } else if h[3] == 0 && le24 + 4 == n && h[4] == 0x0a && h[5].is_ascii_digit() {
        (system::MYSQL, MY_HANDSHAKE, false) // server greeting: consumed here
    } else if h[3] == 0 && le24 + 4 == n && h[4] == 0x03 && letter(h[5]) {
        (system::MYSQL, READY, true)
    } else if h[0] == b'*'
        && h[1].is_ascii_digit()
        && h[1] != b'0'
        && ((h[2] == b'\r' && h[3] == b'\n' && h[4] == b'$')
            || (h[2].is_ascii_digit() && h[3] == b'\r' && h[4] == b'\n' && h[5] == b'$'))
    {
        (system::REDIS, READY, true)
    } else {
        return Seen::Other;
    };
    // Who sends requests is the client; who sends the greeting is the server.
    let end = if send == request {
        role::CLIENT
    } else {
        role::SERVER
    };
    let bit = if end == role::CLIENT {
        DB_ROLE_CLIENT
    } else {
        DB_ROLE_SERVER
    };
    if off.roles != 0 && off.roles & bit == 0 {
        // An end `db.roles` leaves out: never looked at again, and no connection state.
        if let Some(m) = DB_NOT_DB.get_or_insert(sk) {
            // SAFETY: this socket's own storage.
            unsafe { *m = DB_GIVE_UP };
        }
        return Seen::Handled;
    }
    let Some(conn) = DB_CONNS.get_or_insert(sk) else {
        bump(counters::STORAGE_FAILED);
        aya_log_ebpf::warn!(
            &(),
            "db: no socket storage for a recognised connection: not followed"
        );
        return Seen::Handled;
    };
    bump(counters::CONNS);
    // SAFETY: fresh, zeroed storage of this socket.
    let c = unsafe { &mut *conn };
    c.sk = sk as u64;
    c.conn_id = now_ns();
    c.system = sys;
    c.role = end;
    c.phase = phase;
    c.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    conn_event(sk, c, family, off);
    // A startup packet or greeting is not walked; for a request, say so by returning the state
    // and letting the walker see the same bytes.
    let consumed = (sys == system::POSTGRESQL && request && phase == READY && h[0] == 0)
        || phase == PG_SSL_WAIT
        || phase == MY_HANDSHAKE;
    if consumed {
        return Seen::Handled;
    }
    Seen::Db(conn)
}

#[inline(always)]
pub(crate) fn wakeup_flags() -> u64 {
    util::wakeup_flags(&DB_PENDING, WAKEUP_EVERY)
}

#[inline(always)]
pub(crate) fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(FNV_PRIME)
}

/// Who owns the connection and where it goes: sets where `DB_STATS` counts it, and tells
/// userspace the names (again on a later read or write if the ring is full).
#[inline(always)]
pub(crate) fn conn_event(sk: *const u8, c: &mut Conn, family: u16, off: &DbOffsets) {
    // SAFETY: a helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    c.owner = mix(
        mix(
            mix(FNV_OFFSET, cgroup_id),
            u64::from_le_bytes([
                comm[0], comm[1], comm[2], comm[3], comm[4], comm[5], comm[6], comm[7],
            ]),
        ),
        u64::from_le_bytes([
            comm[8], comm[9], comm[10], comm[11], comm[12], comm[13], comm[14], comm[15],
        ]),
    );
    let client = c.role == role::CLIENT;
    // The unix socket's listening address (shared by the listener and every accepted
    // socket): names a unix destination.
    let mut uaddr = 0u64;
    if family == AF_UNIX && off.flags & DB_HAVE_UNIX != 0 {
        // An accepted socket carries the address as its own, a client finds it on its peer.
        let mut owner = sk as u64;
        if client {
            let mut peer = 0u64;
            // SAFETY: a kernel read checked by the helper.
            let _ = unsafe {
                bpf_probe_read_kernel_buf(
                    sk.wrapping_add(off.unix_peer as usize),
                    core::slice::from_raw_parts_mut((&raw mut peer).cast::<u8>(), 8),
                )
            };
            owner = peer;
        }
        if owner != 0 {
            // SAFETY: as above.
            let _ = unsafe {
                bpf_probe_read_kernel_buf(
                    (owner as *const u8).wrapping_add(off.unix_addr as usize),
                    core::slice::from_raw_parts_mut((&raw mut uaddr).cast::<u8>(), 8),
                )
            };
        }
    }
    // The server's end: the peer's address seen from the client, its own on the server.
    let mut dest = mix(FNV_OFFSET, family as u64);
    if family == AF_UNIX {
        dest = mix(dest, uaddr);
    } else {
        let port = if client {
            u16::from_be(load::<u16>(sk, off.sock.skc_dport))
        } else {
            load::<u16>(sk, off.sock.skc_num)
        };
        if family == AF_INET {
            let a: u32 = load(
                sk,
                if client {
                    off.sock.skc_daddr
                } else {
                    off.sock.skc_rcv_saddr
                },
            );
            dest = mix(dest, a as u64);
        } else {
            let a: [u64; 2] = load(
                sk,
                if client {
                    off.sock.skc_v6_daddr
                } else {
                    off.sock.skc_v6_rcv_saddr
                },
            );
            dest = mix(mix(dest, a[0]), a[1]);
        }
        dest = mix(dest, port as u64);
    }
    c.dest = dest;
    let Some(mut e) = DB_EVENTS.reserve::<DbConnEvent>(0) else {
        bump(counters::DROPS);
        c.conn_pending = 1;
        return;
    };
    c.conn_pending = 0;
    let p = e.as_mut_ptr();
    // SAFETY: reserved ring space of exactly this type; every field is written below.
    unsafe {
        (*p).kind = kind::CONN;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p).family = family as u8;
        (*p).pid = c.pid;
        (*p).sk = sk as u64;
        (*p).conn_id = c.conn_id;
        (*p).cgroup_id = cgroup_id;
        (*p).comm = comm;
        (*p).owner = c.owner;
        (*p).saddr = [0; 16];
        (*p).daddr = [0; 16];
        (*p).sport = 0;
        (*p).dport = 0;
        (*p).path_len = 0;
        (*p)._pad = 0;
        (*p).dest = dest;
        (*p).path = [0; DB_PATH_LEN];
        if family == AF_INET {
            let d: [u8; 4] = load(sk, off.sock.skc_daddr);
            let s: [u8; 4] = load(sk, off.sock.skc_rcv_saddr);
            (*p).daddr = [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            (*p).saddr = [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        } else if family == AF_INET6 {
            (*p).daddr = load(sk, off.sock.skc_v6_daddr);
            (*p).saddr = load(sk, off.sock.skc_v6_rcv_saddr);
        }
        if family != AF_UNIX {
            (*p).dport = u16::from_be(load::<u16>(sk, off.sock.skc_dport));
            (*p).sport = load::<u16>(sk, off.sock.skc_num);
        }
        if uaddr != 0 {
            let mut alen = 0i32;
            let _ = bpf_probe_read_kernel_buf(
                (uaddr as *const u8).wrapping_add(off.unix_address_len as usize),
                core::slice::from_raw_parts_mut((&raw mut alen).cast::<u8>(), 4),
            );
            // sockaddr_un: a 2-byte family, then the path.
            if bpf_probe_read_kernel_buf(
                (uaddr as *const u8).wrapping_add(off.unix_address_name as usize + 2),
                &mut (*p).path,
            )
            .is_ok()
            {
                let l = alen - 2;
                (*p).path_len = if l < 0 {
                    0
                } else if l > DB_PATH_LEN as i32 {
                    DB_PATH_LEN as u32
                } else {
                    l as u32
                };
            }
        }
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
}

/// A byte of the scratch window.
#[inline(always)]
pub(crate) fn byte(s: &Scratch, i: u32) -> u8 {
    s.buf[(i & SCRATCH_MASK) as usize]
}

/// Where bytes `at..at + n` of this read or write are in the scratch window (n <= 16), after
/// moving the window there if they are not in it; None if the user buffer cannot be read.
#[inline(always)]
pub(crate) fn window(w: &mut Scratch, at: u32, n: u32) -> Option<usize> {
    let base = vget(&w.base);
    if at >= base && at + n <= base + vget(&w.copied) {
        return Some(((at - base) & SCRATCH_MASK) as usize);
    }
    vset(&mut w.base, at);
    let got = fill(w, at);
    vset(&mut w.copied, got);
    (got >= n).then_some(0)
}
