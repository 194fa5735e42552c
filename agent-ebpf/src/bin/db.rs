//! Database and cache queries timed off the wire: PostgreSQL, MySQL/MariaDB and Redis, over
//! TCP and unix-domain sockets, from the `sock:sock_send_length` and `sock:sock_recv_length`
//! tracepoints (tp_btf).
//!
//! Both fire once per socket read or write, after the data moved, with the socket and the byte
//! count. The bytes themselves are still in the caller's buffer, whose address is in the
//! syscall's arguments (`bpf_task_pt_regs`). A socket whose first request matches one of the
//! protocols gets state in its own storage (freed with it); the rest cost a storage lookup and
//! a 16-byte read per I/O.
//!
//! Per connection the program walks the protocol's framing in both directions, keeps the start
//! times of requests in flight in a FIFO, and pairs each response with the oldest one: Redis
//! pipelines and pipelined PostgreSQL Executes are timed one by one.
//!
//! Each request gets a statement key: a hash of its first bytes (Redis: up to the command
//! name; SQL: the text with numeric and string literals skipped; PostgreSQL Bind and named
//! Parse: the statement's name, salted with the connection, whose statements those are).
//! Completions are counted in `DB_STATS` by (cgroup, destination, key, system, role,
//! outcome) with a log2 histogram, consecutive ones that share all of it in one update. The
//! request's text goes to userspace only while its key is not in `DB_KNOWN`, which userspace
//! fills as it names keys; a request slower than its system's threshold sends one event. A
//! full ring buffer delays names and the slow log and never changes a count.
//!
//! Each walker is a `bpf_loop` callback of one step (RESP: a type byte and the rest of its
//! header line, or a jump over a bulk payload; PostgreSQL and MySQL: a message), verified once
//! and run up to `DB_MAX_STEPS` times per read or write (Redis: across every iovec segment). Walkers keep their state in the connection's storage and the
//! per-CPU scratch, not in registers, so a step is the same code whatever came before.
//!
//! Nothing the walkers identify is dropped silently: a request is timed (and counted in
//! `DB_STATS` when it completes), or counted untimed (too many in flight; its response is matched and
//! dropped so that later requests keep their own), or counted as dropped at a desync; bytes
//! left undecoded are counted. Per connection these go to userspace in a loss event.
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::{
    db::{
        counters, kind, outcome, role, system, DbConnEvent, DbLossEvent, DbOffsets, DbSettings,
        DbSlowEvent, DbStat, DbStatKey, DbTextEvent, DB_GIVE_UP, DB_HAVE_UNIX, DB_INFLIGHT,
        DB_KNOWN_ENTRIES, DB_MAX_STEPS, DB_PATH_LEN, DB_PREFIX_LEN, DB_RINGBUF_BYTES,
        DB_ROLE_CLIENT, DB_ROLE_SERVER, DB_STATS_ENTRIES, DB_STATS_OTHER_ENTRIES,
    },
    log2_bucket, HIST_BUCKETS,
};
use agent_ebpf::{
    util::{self, atomic_add, load, now_ns},
    SkStorage,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_probe_read_kernel_buf,
        generated::{bpf_get_current_task_btf, bpf_loop, bpf_probe_read_user, bpf_task_pt_regs},
    },
    macros::{btf_map, btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::BtfTracePointContext,
};

const AF_UNIX: u16 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
const MSG_PEEK: i32 = 2;

// x86_64 syscall numbers and `struct pt_regs` offsets (a fixed ABI).
const NR_READ: u64 = 0;
const NR_WRITE: u64 = 1;
const NR_READV: u64 = 19;
const NR_WRITEV: u64 = 20;
const NR_SENDTO: u64 = 44;
const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
const NR_RECVMSG: u64 = 47;
const REGS_SI: usize = 13 * 8;
const REGS_ORIG_AX: usize = 15 * 8;
/// `struct user_msghdr.msg_iov`.
const MSGHDR_IOV: usize = 16;

/// Bytes of each read or write copied for the walkers at once (a power of two).
const SCRATCH: usize = 1024;
const SCRATCH_MASK: u32 = (SCRATCH - 1) as u32;
/// PostgreSQL response messages walked per read; past them a long result's end is found by
/// its last message (ReadyForQuery), which completes what is in flight: nothing is lost.
const PG_RESP_MAX_MSGS: u32 = 96;

/// Walker programs in `DB_WALKERS`.
const WALK_PG: u32 = 0;
const WALK_MYSQL: u32 = 1;
const WALK_RESP_REQ: u32 = 2;
const WALK_RESP_RESP: u32 = 3;
/// PostgreSQL Sync groups in flight per connection (a power of two).
const PG_SYNCS: usize = 16;
const WAKEUP_EVERY: u32 = 64;
/// Completions one `DB_STATS` update may carry.
const MAX_RUN: u32 = 1 << 20;
/// Bytes of a Redis request hashed for its key: the array header, the command name's header
/// and the name (`*3\r\n$3\r\nSET\r\n`); a longer name is cut.
const RESP_KEY_BYTES: u32 = 48;
/// `BPF_NOEXIST`.
const NOEXIST: u64 = 1;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const INFLIGHT_MASK: u64 = (DB_INFLIGHT - 1) as u64;

/// Scratch::done: the step cap stopped the walk with bytes left.
const CAPPED: u8 = 0;
/// The walk ended by itself.
const DONE: u8 = 1;

/// Conn::phase
const READY: u8 = 0;
/// PostgreSQL: an untyped startup packet comes next from the client.
const PG_STARTUP: u8 = 1;
/// PostgreSQL: the SSL/GSS request awaits its one-byte answer.
const PG_SSL_WAIT: u8 = 2;
/// MySQL: greeting seen, authentication under way.
const MY_HANDSHAKE: u8 = 3;
/// Encrypted: nothing more to read.
const TLS: u8 = 4;

/// FIFO entry flags (PostgreSQL).
const Q_EXEC: u8 = 1;

/// RESP walker states.
const R_TYPE: u8 = 0;
const R_NUM: u8 = 1;
const R_NUM_LF: u8 = 2;
const R_LINE: u8 = 3;
const R_BAD: u8 = 4;
/// How far a RESP step got in its token.
const T_MORE: u8 = 0;
const T_DONE: u8 = 1;
const T_BAD: u8 = 2;
/// Bytes of a token one RESP step reads (a number with its CRLF is at most 23).
const TOKEN_BYTES: u32 = 64;
/// What a RESP number counts.
const N_AGG: u8 = 1;
const N_MAP: u8 = 2;
const N_BULK: u8 = 3;
/// Flags of the top-level RESP value being read.
const TOP_ERR: u8 = 1;
const TOP_NULL: u8 = 2;

/// A RESP walker for one direction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Resp {
    num: u64,
    /// Payload bytes (plus CRLF) of a bulk string still to pass.
    skip: u64,
    /// Elements still owed by the top-level value being read (0: between values).
    remaining: u32,
    state: u8,
    num_kind: u8,
    neg: u8,
    /// The element being read is the top-level value itself.
    at_top: u8,
    top: u8,
    _pad: [u8; 7],
}

/// What we remember about a recognised connection, in the socket's storage.
#[repr(C)]
#[derive(Clone, Copy)]
struct Conn {
    sk: u64,
    conn_id: u64,
    /// Sequence numbers: `head` is the oldest request in flight, `tail` the next to assign.
    head: u64,
    tail: u64,
    start: [u64; DB_INFLIGHT],
    /// Statement keys of the requests in flight.
    key: [u64; DB_INFLIGHT],
    qflags: [u8; DB_INFLIGHT],
    /// Where `DB_STATS` counts this connection: its owner (cgroup and command name) and its
    /// destination, set when it is recognised or changes owner.
    owner: u64,
    dest: u64,
    /// Bytes of a length-framed message (PostgreSQL, MySQL) that continue in the next read or
    /// write, per direction.
    req_skip: u64,
    resp_skip: u64,
    req: Resp,
    resp: Resp,
    /// MySQL: a command's header came alone; its body (command byte first) comes next.
    my_cmd_pending: u64,
    /// MySQL: a response header came alone (time it arrived); the outcome byte comes next.
    my_resp_pending_ns: u64,
    pid: u32,
    system: u8,
    role: u8,
    phase: u8,
    /// PostgreSQL: an ErrorResponse arrived for the simple query in flight.
    pg_err: u8,
    /// PostgreSQL: an Execute failed; the server skips to the next Sync.
    pg_aborted: u8,
    /// PostgreSQL: framing lost inside a long response; only a trailing ReadyForQuery tells
    /// where it ends.
    pg_hunt: u8,
    _pad: [u8; 6],
    /// PostgreSQL: where each Sync group in flight ends (the `tail` after its Sync or Query).
    syncs: [u64; PG_SYNCS],
    sync_head: u64,
    sync_tail: u64,
    /// PostgreSQL: untimed requests of each Sync group in flight, and of the open one.
    sync_untimed: [u32; PG_SYNCS],
    pg_open_untimed: u32,
    _pad2: u32,
    /// Untimed requests in flight (the FIFO was full). RESP and MySQL keep their order: `gap`
    /// counts those that follow each slot, `swallow` the responses still owed to those ahead
    /// of the head. PostgreSQL's are done with their Sync group.
    untimed: u64,
    swallow: u64,
    gap: [u32; DB_INFLIGHT],
    /// Losses not yet sent in a loss event (`loss_pending` set when any).
    loss_untimed: u32,
    loss_desync: u32,
    loss_event: u32,
    loss_pending: u32,
    loss_bytes: u64,
    loss_from: u64,
    loss_to: u64,
    /// The connection event was lost to a full ring: sent again on the next read or write.
    conn_pending: u32,
    _pad3: u32,
    /// The last statement key found in `DB_KNOWN`, and in which generation of it: a run of
    /// one statement (a pipeline) looks it up once.
    known_key: u64,
    known_gen: u64,
}

#[btf_map]
static DB_CONNS: SkStorage<Conn> = SkStorage::new();

/// Reads and writes of a socket that fit no database protocol, up to `DB_GIVE_UP`: then it is
/// not a database connection and costs only the lookups (decided once per socket, freed with
/// it).
#[btf_map]
static DB_NOT_DB: SkStorage<u32> = SkStorage::new();

/// What the first bytes of a socket without state said.
enum Seen {
    /// A database connection whose bytes are to be walked.
    Db(*mut Conn),
    /// A database connection whose handshake was consumed here, or one that could not get
    /// its state (tried again on the next read or write).
    Handled,
    /// Nothing a database protocol starts with.
    Other,
}

/// Per-CPU working memory of one read or write: a window of its bytes, the walk's position,
/// and the completions not yet counted.
#[repr(C)]
struct Scratch {
    /// Slack past SCRATCH so that header reads at a masked offset stay inside.
    buf: [u8; SCRATCH + 16],
    /// The segment of the user buffer being walked and its length (`at`, `base` count from
    /// its start); later segments (readv/writev) are `seg_rest` bytes from the iovec at
    /// `iov_next`.
    buf_addr: u64,
    iov_next: u64,
    now: u64,
    len: u32,
    seg_rest: u32,
    /// `buf` holds bytes `base..base + copied` of the user buffer.
    base: u32,
    copied: u32,
    at: u32,
    span: u32,
    /// How the walk ended: `DONE`, or `CAPPED` (the step cap; bytes may be left).
    done: u8,
    /// The bytes travel in the request direction (client to server).
    req: u8,
    _pad: [u8; 6],
    /// Completions not yet counted: `run_count` of statement `run_key` with one outcome and
    /// one latency bucket, `run_sum` ns together.
    run_key: u64,
    run_sum: u64,
    run_count: u32,
    run_bucket: u32,
    run_outcome: u8,
    /// What `complete` passes to its loop: the outcome, and the end (0: now).
    done_result: u8,
    _pad2: [u8; 6],
    done_end: u64,
    /// This connection's system's slow threshold (0: none), and the generation of
    /// `DB_KNOWN`, read once per walk.
    slow_ns: u64,
    known_gen: u64,
    /// A statement-key hash in progress (see `hash_step`).
    hash_h: u64,
    hash_i: u32,
    hash_end: u32,
    hash_nuls: u32,
    hash_ident: u32,
    hash_quote: u32,
    /// Where `read_text` found the request's bytes: the window (`buf` from `key_off`), or
    /// `text`.
    key_in_buf: u32,
    key_off: u32,
    _pad4: u32,
    /// The first bytes of a request, for its key.
    text: [u8; DB_PREFIX_LEN + 16],
    /// Zeros: the initial value of a `DB_STATS` entry.
    zero: DbStat,
    /// Texts sent lately (see `sent_lately`).
    sent_key: [u64; SENT_SLOTS],
    sent_at: [u64; SENT_SLOTS],
}

/// What a `bpf_loop` step gets: the connection and the scratch, as the verifier knows them.
#[repr(C)]
struct LoopCtx {
    c: *mut Conn,
    w: *mut Scratch,
}

#[map]
static DB_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The protocol walkers, each its own program (see `WALK_*`), loaded for the same tracepoint
/// prototype as the entry programs so that they can be tail-called.
#[map]
static DB_WALKERS: ProgramArray = ProgramArray::with_max_entries(4, 0);

#[map]
static DB_EVENTS: RingBuf = RingBuf::with_byte_size(DB_RINGBUF_BYTES, 0);

#[map]
static DB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map]
static DB_PENDING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The counts: see `DbStatKey`. Shared by every CPU, updated with atomic adds.
#[map]
static DB_STATS: HashMap<DbStatKey, DbStat> = HashMap::with_max_entries(DB_STATS_ENTRIES, 0);

/// Where a request is counted when `DB_STATS` is full: its series without the statement (key
/// 0), so that a flood of distinct statements costs names, never counts.
#[map]
static DB_STATS_OTHER: HashMap<DbStatKey, DbStat> =
    HashMap::with_max_entries(DB_STATS_OTHER_ENTRIES, 0);

/// Statement keys userspace has named: their text is not sent again.
#[map]
static DB_KNOWN: LruHashMap<u64, u8> = LruHashMap::with_max_entries(DB_KNOWN_ENTRIES, 0);

#[map]
static DB_SETTINGS: Array<DbSettings> = Array::with_max_entries(1, 0);

/// Field offsets from the kernel's BTF, set by userspace at load (see `net.rs`).
#[unsafe(no_mangle)]
static DB_OFFSETS: DbOffsets = DbOffsets {
    flags: 0,
    skc_family: 0,
    sk_type: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    unix_addr: 0,
    unix_peer: 0,
    unix_address_name: 0,
    unix_address_len: 0,
    roles: 0,
};

#[inline(always)]
fn offsets() -> DbOffsets {
    // SAFETY: a static of our own; volatile so the compiler does not fold the placeholder.
    unsafe { core::ptr::read_volatile(&DB_OFFSETS) }
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn isa_db_send(ctx: BtfTracePointContext) -> i32 {
    // sock_send_length(struct sock *sk, int ret, int flags)
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    if let Some(walker) = on_io(sk, ret, true) {
        // SAFETY: our own program array and context; on success this does not return.
        unsafe { DB_WALKERS.tail_call(&ctx, walker) };
        bump(counters::DESYNC);
    }
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn isa_db_recv(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if flags & MSG_PEEK != 0 {
        return 0;
    }
    if let Some(walker) = on_io(sk, ret, false) {
        // SAFETY: as above.
        unsafe { DB_WALKERS.tail_call(&ctx, walker) };
        bump(counters::DESYNC);
    }
    0
}

/// The walkers: same prototype as the entry programs (`sock_*_length`), never attached, only
/// tail-called with the scratch set up by `on_io`.
#[btf_tracepoint(function = "sock_send_length")]
pub fn isa_db_walk_pg(ctx: BtfTracePointContext) -> i32 {
    if let Some((c, w)) = walk_state(&ctx) {
        let req = w.req != 0;
        pg_walk(c, w, req);
        later_segments(c, w, req);
        finish(c, w);
    }
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn isa_db_walk_mysql(ctx: BtfTracePointContext) -> i32 {
    if let Some((c, w)) = walk_state(&ctx) {
        let req = w.req != 0;
        my_walk(c, w, req);
        // A response's first packet is all MySQL reads of it.
        if req {
            later_segments(c, w, req);
        }
        finish(c, w);
    }
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn isa_db_walk_resp_req(ctx: BtfTracePointContext) -> i32 {
    if let Some((c, w)) = walk_state(&ctx) {
        run_steps(c, w, DB_MAX_STEPS, resp_step_req);
        if capped(w) {
            step_cap(c, w, true);
        }
        finish(c, w);
    }
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn isa_db_walk_resp_resp(ctx: BtfTracePointContext) -> i32 {
    if let Some((c, w)) = walk_state(&ctx) {
        run_steps(c, w, DB_MAX_STEPS, resp_step_resp);
        if capped(w) {
            step_cap(c, w, false);
        }
        finish(c, w);
    }
    0
}

type Step = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

/// Runs `step` until it stops the walk or `max` steps have run (`bpf_loop`: the step is
/// verified once, however many times it runs).
#[inline(always)]
fn run_steps(c: &mut Conn, w: &mut Scratch, max: u32, step: Step) {
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
fn capped(w: &Scratch) -> bool {
    vget(&w.done) == CAPPED && (vget(&w.at) < vget(&w.len) || vget(&w.seg_rest) > 0)
}

/// PostgreSQL and MySQL walk the first segment of a readv/writev only: the rest is not
/// decoded, and the framing of this direction is lost (counted).
#[inline(always)]
fn later_segments(c: &mut Conn, w: &mut Scratch, req: bool) {
    if vget(&w.seg_rest) > 0 {
        vset(&mut w.at, vget(&w.len));
        desync(c, w, req);
    }
}

/// The rest of this read or write will not be walked: its framing is lost (counted).
#[inline(always)]
fn step_cap(c: &mut Conn, w: &mut Scratch, req: bool) {
    bump(counters::STEP_CAP);
    desync(c, w, req);
}

/// A step's view of the walk. Returns 1 (stop) when `go` is false.
#[inline(always)]
fn step_with(ctx: *mut core::ffi::c_void, go: impl FnOnce(&mut Conn, &mut Scratch) -> bool) -> i64 {
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

extern "C" fn resp_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, resp_step::<true>)
}

extern "C" fn resp_step_resp(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, resp_step::<false>)
}

extern "C" fn pg_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| pg_step(c, w, true))
}

extern "C" fn pg_step_resp(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| pg_step(c, w, false))
}

extern "C" fn my_step_req(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, my_step)
}

/// The connection and the scratch `on_io` prepared.
#[inline(always)]
fn walk_state(ctx: &BtfTracePointContext) -> Option<(&'static mut Conn, &'static mut Scratch)> {
    let sk: *const u8 = ctx.arg(0);
    let c = DB_CONNS.get(sk)?;
    let w = DB_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: the socket's storage and the per-CPU scratch, both live for this run.
    Some(unsafe { (&mut *c, &mut *w) })
}

#[inline(always)]
fn bump(counter: u32) {
    util::bump(&DB_COUNTERS, counter);
}

#[inline(always)]
fn bump_by(counter: u32, n: u64) {
    if let Some(v) = DB_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe { *v += n };
    }
}

#[inline(always)]
fn read_user(dst: *mut u8, len: u32, src: u64) -> bool {
    // SAFETY: the helper checks both addresses; a fault returns an error.
    unsafe { bpf_probe_read_user(dst.cast(), len, src as *const _) == 0 }
}

/// The user buffer a read or write used, from the syscall's arguments: its first segment
/// (address, and how many of the `ret` bytes are in it), the user address of the next
/// `struct iovec` (readv/writev, recvmsg/sendmsg) and how many bytes the later segments hold.
#[inline(always)]
fn user_buffer(ret: u32) -> Option<(u64, u32, u64, u32)> {
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
fn next_segment(w: &mut Scratch) -> bool {
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
fn on_io(sk: *const u8, ret: i32, send: bool) -> Option<u32> {
    if ret <= 0 {
        return None;
    }
    let off = offsets();
    let family: u16 = load(sk, off.skc_family);
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
fn fill(s: &mut Scratch, from: u32) -> u32 {
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
fn not_db(sk: *const u8, misses: Option<*mut u32>) {
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
fn recognise(sk: *const u8, ret: u32, send: bool, family: u16, off: &DbOffsets) -> Seen {
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
fn wakeup_flags() -> u64 {
    util::wakeup_flags(&DB_PENDING, WAKEUP_EVERY)
}

#[inline(always)]
fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(FNV_PRIME)
}

/// Who owns the connection and where it goes: sets where `DB_STATS` counts it, and tells
/// userspace the names (again on a later read or write if the ring is full).
#[inline(always)]
fn conn_event(sk: *const u8, c: &mut Conn, family: u16, off: &DbOffsets) {
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
            u16::from_be(load::<u16>(sk, off.skc_dport))
        } else {
            load::<u16>(sk, off.skc_num)
        };
        if family == AF_INET {
            let a: u32 = load(
                sk,
                if client {
                    off.skc_daddr
                } else {
                    off.skc_rcv_saddr
                },
            );
            dest = mix(dest, a as u64);
        } else {
            let a: [u64; 2] = load(
                sk,
                if client {
                    off.skc_v6_daddr
                } else {
                    off.skc_v6_rcv_saddr
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
            let d: [u8; 4] = load(sk, off.skc_daddr);
            let s: [u8; 4] = load(sk, off.skc_rcv_saddr);
            (*p).daddr = [d[0], d[1], d[2], d[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            (*p).saddr = [s[0], s[1], s[2], s[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        } else if family == AF_INET6 {
            (*p).daddr = load(sk, off.skc_v6_daddr);
            (*p).saddr = load(sk, off.skc_v6_rcv_saddr);
        }
        if family != AF_UNIX {
            (*p).dport = u16::from_be(load::<u16>(sk, off.skc_dport));
            (*p).sport = load::<u16>(sk, off.skc_num);
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

/// Starts timing a request; returns its sequence number, or None if too many are in flight:
/// then it is counted untimed and, but for PostgreSQL (done by Sync group), noted after the
/// last slot so that its response is matched in order.
#[inline(always)]
fn push(c: &mut Conn, flags: u8, key: u64, now: u64) -> Option<u64> {
    let (head, tail) = (vget(&c.head), vget(&c.tail));
    if tail.wrapping_sub(head) >= DB_INFLIGHT as u64 {
        bump(counters::INFLIGHT_FULL);
        vadd(&mut c.untimed, 1);
        vadd(&mut c.loss_untimed, 1);
        vset(&mut c.loss_pending, 1);
        if c.system == system::POSTGRESQL {
            vadd(&mut c.pg_open_untimed, 1);
        } else {
            let last = (tail.wrapping_sub(1) & INFLIGHT_MASK) as usize;
            if last < DB_INFLIGHT {
                c.gap[last] += 1;
            }
        }
        return None;
    }
    let i = (tail & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        c.start[i] = now;
        c.key[i] = key;
        c.qflags[i] = flags;
        c.gap[i] = 0;
    }
    vset(&mut c.tail, tail + 1);
    Some(tail)
}

#[inline(always)]
fn head_flags(c: &Conn) -> Option<u8> {
    let head = vget(&c.head);
    if head == vget(&c.tail) {
        return None;
    }
    let i = (head & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        Some(vget(&c.qflags[i]))
    } else {
        None
    }
}

/// Times a request that starts at `at` of this read or write (or counts it untimed), and
/// sends its text if its statement key is not known yet.
#[inline(always)]
fn note_request(c: &mut Conn, w: &mut Scratch, flags: u8, at: u32) {
    let key = statement_key(c, w, flags, at);
    let gen = vget(&w.known_gen);
    if vget(&c.known_key) != key || vget(&c.known_gen) != gen {
        // SAFETY: a lookup; the value is not kept.
        if unsafe { DB_KNOWN.get(key) }.is_some() {
            vset(&mut c.known_key, key);
            vset(&mut c.known_gen, gen);
        } else if !sent_lately(w, key) {
            text_event(c, key, w.buf_addr, at, w.len);
        }
    }
    if push(c, flags, key, w.now).is_none() {
        account(c, w, key, outcome::UNTIMED, 1, 0, 0);
    }
}

/// This CPU sent `key`'s text less than `TEXT_RESEND_NS` ago (else notes that it sends it
/// now): a statement new while userspace is slow to name it (or stopped) costs a text every
/// `TEXT_RESEND_NS` per CPU, not one per request.
#[inline(always)]
fn sent_lately(w: &mut Scratch, key: u64) -> bool {
    let i = ((key ^ (key >> 29)) & (SENT_SLOTS as u64 - 1)) as usize;
    if i >= SENT_SLOTS {
        return false;
    }
    let now = w.now;
    if w.sent_key[i] == key && now.wrapping_sub(w.sent_at[i]) < TEXT_RESEND_NS {
        return true;
    }
    w.sent_key[i] = key;
    w.sent_at[i] = now;
    false
}

/// Finds up to `max` (at most `DB_PREFIX_LEN`) bytes of the request at `at` for its key:
/// in the scratch window if they are there (nearly always: it holds the read or write's
/// first KiB), else copied into `w.text` (a user read costs 100 to 200 ns here). Returns how
/// many; `kb` reads them.
#[inline(always)]
fn read_text(w: &mut Scratch, at: u32, max: u32) -> u32 {
    let mut n = vget(&w.len).saturating_sub(at);
    if n > max {
        n = max;
    }
    if n > DB_PREFIX_LEN as u32 {
        n = DB_PREFIX_LEN as u32;
    }
    let base = vget(&w.base);
    if at >= base && at + n <= base + vget(&w.copied) {
        vset(&mut w.key_in_buf, 1);
        vset(&mut w.key_off, at - base);
        return n;
    }
    vset(&mut w.key_in_buf, 0);
    vset(&mut w.key_off, 0);
    if n == 0 || !read_user(w.text.as_mut_ptr(), n, vget(&w.buf_addr) + at as u64) {
        return 0;
    }
    n
}

/// Byte `i` of the bytes `read_text` found.
#[inline(always)]
fn kb(w: &Scratch, i: u32) -> u8 {
    key_byte(w, vget(&w.key_in_buf), vget(&w.key_off), i)
}

#[inline(always)]
fn key_byte(w: &Scratch, in_buf: u32, off: u32, i: u32) -> u8 {
    if in_buf != 0 {
        w.buf[((off + i) & SCRATCH_MASK) as usize]
    } else {
        w.text[(i & (DB_PREFIX_LEN as u32 - 1)) as usize]
    }
}

/// The statement key of the request at `at`: the same for every run of one statement (as
/// far as its first `DB_PREFIX_LEN` bytes tell), different for different statements.
#[inline(always)]
fn statement_key(c: &Conn, w: &mut Scratch, flags: u8, at: u32) -> u64 {
    // Per role: each end's text names its own process.
    let seed = mix(
        FNV_OFFSET,
        c.system as u64 | (flags as u64) << 8 | (c.role as u64) << 16,
    );
    match c.system {
        system::REDIS => {
            // Up to the end of the command name: `*N\r\n$L\r\nNAME\r\n` (an inline command:
            // its first line).
            let n = read_text(w, at, RESP_KEY_BYTES);
            let lines = if kb(w, 0) == b'*' { 3 } else { 1 };
            let (in_buf, off) = (vget(&w.key_in_buf), vget(&w.key_off));
            let (mut h, mut nl) = (seed, 0);
            for i in 0..RESP_KEY_BYTES {
                if i >= n || nl >= lines {
                    break;
                }
                let b = key_byte(w, in_buf, off, i);
                h = mix(h, b as u64);
                if b == b'\n' {
                    nl += 1;
                }
            }
            h
        }
        system::POSTGRESQL => {
            let n = read_text(w, at, DB_PREFIX_LEN as u32);
            if n < 6 {
                return mix(seed, c.conn_id);
            }
            let t = kb(w, 0);
            let mlen = u32::from_be_bytes([kb(w, 1), kb(w, 2), kb(w, 3), kb(w, 4)]);
            let end = if mlen < n { mlen + 1 } else { n };
            let seed = mix(seed, t as u64);
            match t {
                // A simple query: its text.
                b'Q' => text_hash(w, seed, 5, end, 1),
                // An unnamed statement: its text, whoever parses it.
                b'P' if kb(w, 5) == 0 => text_hash(w, seed, 5, end, 2),
                // A named statement (Parse) or one bound by name (Bind): the name means
                // something on this connection only.
                b'P' | b'B' => mix(text_hash(w, seed, 5, end, 2), c.conn_id),
                _ => mix(seed, c.conn_id),
            }
        }
        _ => {
            // MySQL: the command byte, and a query's or prepared statement's text.
            let n = read_text(w, at, DB_PREFIX_LEN as u32);
            let cmd = kb(w, 0);
            let seed = mix(seed, cmd as u64);
            if n > 1 && (cmd == 0x03 || cmd == 0x16) {
                text_hash(w, seed, 1, n, 0)
            } else {
                seed
            }
        }
    }
}

/// Hash of `w.text[from..to]` with numeric literals (digits not inside a word) and the insides
/// of quoted strings skipped, ending after the `nuls`th NUL byte (0: at `to`).
#[inline(always)]
fn text_hash(w: &mut Scratch, seed: u64, from: u32, to: u32, nuls: u32) -> u64 {
    vset(&mut w.hash_h, seed);
    vset(&mut w.hash_i, from);
    vset(&mut w.hash_end, to);
    vset(&mut w.hash_nuls, nuls);
    vset(&mut w.hash_ident, 0);
    vset(&mut w.hash_quote, 0);
    let mut l = LoopCtx {
        c: core::ptr::null_mut(),
        w: core::ptr::from_mut(w),
    };
    // SAFETY: as in `run_steps`.
    unsafe {
        bpf_loop(
            (DB_PREFIX_LEN / HASH_CHUNK) as u32 + 1,
            hash_step as *mut _,
            (&raw mut l).cast(),
            0,
        )
    };
    vget(&w.hash_h)
}

/// Keys whose text each CPU remembers sending (a power of two), and for how long.
const SENT_SLOTS: usize = 32;
const TEXT_RESEND_NS: u64 = 50_000_000;

/// Bytes one `hash_step` takes.
const HASH_CHUNK: usize = 8;

/// `HASH_CHUNK` bytes of a `text_hash`; 1 when done.
extern "C" fn hash_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `text_hash` passes its `LoopCtx`, whose scratch pointer is the per-CPU scratch.
    let w = unsafe { &mut *(*ctx.cast::<LoopCtx>()).w };
    let mut h = vget(&w.hash_h);
    let mut i = vget(&w.hash_i);
    let mut end = vget(&w.hash_end);
    let mut nuls = vget(&w.hash_nuls);
    let mut ident = vget(&w.hash_ident);
    let mut quote = vget(&w.hash_quote);
    let (in_buf, off) = (vget(&w.key_in_buf), vget(&w.key_off));
    for _ in 0..HASH_CHUNK {
        if i >= end {
            break;
        }
        let b = key_byte(w, in_buf, off, i);
        i += 1;
        if quote != 0 {
            if b == b'\'' {
                quote = 0;
            }
            continue;
        }
        if b == 0 {
            h = mix(h, 0);
            ident = 0;
            if nuls == 1 {
                end = i;
            } else if nuls > 1 {
                nuls -= 1;
            }
            continue;
        }
        if b == b'\'' {
            quote = 1;
            ident = 0;
            h = mix(h, b'?' as u64);
            continue;
        }
        let digit = b.wrapping_sub(b'0') < 10;
        if digit && ident == 0 {
            continue;
        }
        let word = (b | 0x20).wrapping_sub(b'a') < 26 || b == b'_' || b == b'$' || b >= 0x80;
        h = mix(h, b as u64);
        ident = (word || digit) as u32;
    }
    vset(&mut w.hash_h, h);
    vset(&mut w.hash_i, i);
    vset(&mut w.hash_end, end);
    vset(&mut w.hash_nuls, nuls);
    vset(&mut w.hash_ident, ident);
    vset(&mut w.hash_quote, quote);
    (i >= end) as i64
}

/// Completes the oldest `count` timed requests in flight with `result`.
#[inline(always)]
fn note_done(c: &mut Conn, w: &mut Scratch, result: u8, count: u64) {
    let inflight = vget(&c.tail).wrapping_sub(vget(&c.head));
    let n = if count > inflight { inflight } else { count };
    if n == 0 || n > DB_INFLIGHT as u64 {
        return;
    }
    complete(c, w, result, n, 0);
}

/// One response, in order (RESP, MySQL): it answers an untimed request ahead of the head if
/// any is owed one, else the head, whose own untimed followers are owed the next responses.
#[inline(always)]
fn reply_done(c: &mut Conn, w: &mut Scratch, result: u8, end: u64) {
    let owed = vget(&c.swallow);
    if owed > 0 {
        vset(&mut c.swallow, owed - 1);
        let u = vget(&c.untimed);
        vset(&mut c.untimed, u.saturating_sub(1));
        return;
    }
    let head = vget(&c.head);
    if head == vget(&c.tail) {
        // Nothing in flight: a push message, or a response to a request not seen.
        return;
    }
    let i = (head & INFLIGHT_MASK) as usize;
    if i < DB_INFLIGHT {
        vset(&mut c.swallow, vget(&c.gap[i]) as u64);
        c.gap[i] = 0;
    }
    complete(c, w, result, 1, end);
}

/// Completes the `n` oldest timed requests with `result` at `end` (0: now).
#[inline(always)]
fn complete(c: &mut Conn, w: &mut Scratch, result: u8, n: u64, end: u64) {
    if n == 1 {
        complete_one(c, w, result, end);
        return;
    }
    vset(&mut w.done_result, result);
    vset(&mut w.done_end, end);
    let mut l = LoopCtx {
        c: core::ptr::from_mut(c),
        w: core::ptr::from_mut(w),
    };
    // SAFETY: as in `run_steps`.
    unsafe { bpf_loop(n as u32, complete_step as *mut _, (&raw mut l).cast(), 0) };
}

extern "C" fn complete_step(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    step_with(ctx, |c, w| {
        let (r, e) = (vget(&w.done_result), vget(&w.done_end));
        complete_one(c, w, r, e);
        true
    })
}

/// Completes the head request: adds it to the run of completions to count (consecutive
/// ones of one statement, outcome and latency bucket: one update), and sends a slow-query
/// event if it took at least the threshold.
#[inline(always)]
fn complete_one(c: &mut Conn, w: &mut Scratch, result: u8, end: u64) {
    let head = vget(&c.head);
    let i = (head & INFLIGHT_MASK) as usize;
    let (start, key) = if i < DB_INFLIGHT {
        (c.start[i], c.key[i])
    } else {
        (0, 0)
    };
    vset(&mut c.head, head + 1);
    let end = if end != 0 { end } else { w.now };
    let d = end.saturating_sub(start);
    let slow = vget(&w.slow_ns);
    if slow != 0 && d >= slow {
        slow_event(c, key, result, start, end);
    }
    let bucket = log2_bucket(d) as u32;
    let run = vget(&w.run_count);
    if run != 0
        && run < MAX_RUN
        && vget(&w.run_key) == key
        && vget(&w.run_outcome) == result
        && vget(&w.run_bucket) == bucket
    {
        vset(&mut w.run_count, run + 1);
        vadd(&mut w.run_sum, d);
    } else {
        flush_run(c, w);
        vset(&mut w.run_key, key);
        vset(&mut w.run_outcome, result);
        vset(&mut w.run_bucket, bucket);
        vset(&mut w.run_sum, d);
        vset(&mut w.run_count, 1);
    }
}

/// Counts the run of completions, if any.
#[inline(always)]
fn flush_run(c: &mut Conn, w: &mut Scratch) {
    let n = vget(&w.run_count);
    if n == 0 {
        return;
    }
    vset(&mut w.run_count, 0);
    let (key, o, sum, b) = (
        vget(&w.run_key),
        vget(&w.run_outcome),
        vget(&w.run_sum),
        vget(&w.run_bucket),
    );
    account(c, w, key, o, n, sum, b);
}

/// The entry of `k`, inserted (zeroed) if missing; None if the map is full.
#[inline(always)]
fn stat_entry(map: &HashMap<DbStatKey, DbStat>, k: &DbStatKey, w: &Scratch) -> Option<*mut DbStat> {
    if let Some(v) = map.get_ptr_mut(k) {
        return Some(v);
    }
    // Another CPU may insert it first: then this one finds it. By reference: a copy of the
    // zeros would take 176 bytes of the 512-byte stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let _ = map.insert(k, &w.zero, NOEXIST);
    map.get_ptr_mut(k)
}

/// Adds `n` requests of statement `key` with `outcome`, `sum` ns together, all in latency
/// bucket `bucket`, to this connection's series in `DB_STATS`.
#[inline(always)]
fn account(c: &mut Conn, w: &Scratch, key: u64, outcome: u8, n: u32, sum: u64, bucket: u32) {
    let mut k = DbStatKey {
        owner: c.owner,
        dest: c.dest,
        key,
        system: c.system,
        role: c.role,
        outcome,
        _pad: [0; 5],
    };
    let v = match stat_entry(&DB_STATS, &k, w) {
        Some(v) => v,
        None => {
            k.key = 0;
            match stat_entry(&DB_STATS_OTHER, &k, w) {
                Some(v) => v,
                None => {
                    bump_by(counters::STATS_FULL, n as u64);
                    vadd(&mut c.loss_event, n);
                    vset(&mut c.loss_pending, 1);
                    return;
                }
            }
        }
    };
    // SAFETY: a map value, alive while this program runs; other CPUs update it too, with
    // atomic adds like these.
    unsafe {
        atomic_add(&raw mut (*v).count, n as u64);
        if outcome != outcome::UNTIMED {
            atomic_add(&raw mut (*v).sum_ns, sum);
            let b = bucket as usize;
            if b < HIST_BUCKETS {
                atomic_add(&raw mut (*v).buckets[b], n);
            }
        }
    }
}

/// The end of a walk: what is left to count and to report.
#[inline(always)]
fn finish(c: &mut Conn, w: &mut Scratch) {
    flush_run(c, w);
    if vget(&c.loss_pending) != 0 {
        loss_event(c);
    }
}

/// Drops the requests in flight: the framing of one direction is lost, responses can no
/// longer be told apart. Counts the timed ones (untimed ones were counted when seen), and the
/// bytes of this read or write left undecoded; the direction resynchronises on its next read
/// or write.
#[inline(always)]
fn desync(c: &mut Conn, w: &mut Scratch, req: bool) {
    bump(counters::DESYNC);
    let (head, tail) = (vget(&c.head), vget(&c.tail));
    let mut timed = tail.wrapping_sub(head);
    if timed > DB_INFLIGHT as u64 {
        timed = DB_INFLIGHT as u64;
    }
    if timed > 0 {
        bump_by(counters::LOST_DESYNC, timed);
        vadd(&mut c.loss_desync, timed as u32);
        if vget(&c.loss_to) != vget(&c.loss_from) {
            vset(&mut c.loss_to, tail);
        } else {
            vset(&mut c.loss_from, tail - timed);
            vset(&mut c.loss_to, tail);
        }
        vset(&mut c.loss_pending, 1);
    }
    let (at, len) = (vget(&w.at), vget(&w.len));
    let left = (len.saturating_sub(at) + vget(&w.seg_rest)) as u64;
    if left > 0 {
        bump_by(counters::BYTES_NOT_DECODED, left);
        vadd(&mut c.loss_bytes, left);
        vset(&mut c.loss_pending, 1);
    }
    // Nothing more of this read or write is walked.
    vset(&mut w.at, len);
    vset(&mut w.seg_rest, 0);
    c.head = tail;
    c.untimed = 0;
    c.swallow = 0;
    c.sync_head = c.sync_tail;
    c.pg_open_untimed = 0;
    c.pg_err = 0;
    c.pg_aborted = 0;
    if req {
        c.req_skip = 0;
        c.req = Resp::zero();
        c.my_cmd_pending = 0;
    } else {
        c.resp_skip = 0;
        c.resp = Resp::zero();
        c.my_resp_pending_ns = 0;
        c.pg_hunt = 0;
    }
}

/// Loop state lives in map memory, read and written with volatile accesses: the verifier then
/// sees no data-dependent registers at the loop head and prunes every path after the first.
#[inline(always)]
fn vget<T: Copy>(p: &T) -> T {
    // SAFETY: a reference is a valid pointer.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn vset<T: Copy>(p: &mut T, v: T) {
    // SAFETY: a reference is a valid pointer.
    unsafe { core::ptr::write_volatile(p, v) }
}

#[inline(always)]
fn vadd<T: Copy + core::ops::Add<Output = T>>(p: &mut T, n: T) {
    let v = vget(p);
    vset(p, v + n);
}

/// Sends the connection's pending losses; on a full ring they wait for a later read or write.
#[inline(always)]
fn loss_event(c: &mut Conn) {
    let Some(mut e) = DB_EVENTS.reserve::<DbLossEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::LOSS;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p)._pad = 0;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).untimed = c.loss_untimed;
        (*p).desync = c.loss_desync;
        (*p).event_lost = c.loss_event;
        (*p)._pad2 = 0;
        (*p).bytes = c.loss_bytes;
        (*p).dropped_from = c.loss_from;
        (*p).dropped_to = c.loss_to;
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
    c.loss_untimed = 0;
    c.loss_desync = 0;
    c.loss_event = 0;
    c.loss_bytes = 0;
    c.loss_from = 0;
    c.loss_to = 0;
    c.loss_pending = 0;
}

/// A request that took at least the slow threshold; a full ring loses the event (counted),
/// never the count.
#[inline(always)]
fn slow_event(c: &Conn, key: u64, result: u8, start: u64, end: u64) {
    let Some(mut e) = DB_EVENTS.reserve::<DbSlowEvent>(0) else {
        bump(counters::DROPS);
        bump(counters::SLOW_LOST);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::SLOW;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p).outcome = result;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).key = key;
        (*p).start_ns = start;
        (*p).end_ns = end;
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
}

/// The first bytes of a request whose statement key userspace has not named.
#[inline(always)]
fn text_event(c: &Conn, key: u64, buf: u64, at: u32, len: u32) {
    let Some(mut e) = DB_EVENTS.reserve::<DbTextEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let p = e.as_mut_ptr();
    let avail = len.saturating_sub(at);
    let mut n = avail;
    if n > DB_PREFIX_LEN as u32 {
        n = DB_PREFIX_LEN as u32;
    }
    // SAFETY: reserved ring space of exactly this type; every field is written.
    unsafe {
        (*p).kind = kind::TEXT;
        (*p).system = c.system;
        (*p).role = c.role;
        (*p)._pad = 0;
        (*p).pid = c.pid;
        (*p).sk = c.sk;
        (*p).conn_id = c.conn_id;
        (*p).key = key;
        (*p).len = avail;
        (*p).prefix_len = 0;
        if n > 0 && read_user((*p).prefix.as_mut_ptr(), n, buf + at as u64) {
            (*p).prefix_len = n;
        }
    }
    e.submit(wakeup_flags());
    bump(counters::EVENTS);
    bump(counters::TEXTS);
}

#[inline(always)]
fn byte(s: &Scratch, i: u32) -> u8 {
    s.buf[(i & SCRATCH_MASK) as usize]
}

/// Where bytes `at..at + n` of this read or write are in the scratch window (n <= 16), after
/// moving the window there if they are not in it; None if the user buffer cannot be read.
#[inline(always)]
fn window(w: &mut Scratch, at: u32, n: u32) -> Option<usize> {
    let base = vget(&w.base);
    if at >= base && at + n <= base + vget(&w.copied) {
        return Some(((at - base) & SCRATCH_MASK) as usize);
    }
    vset(&mut w.base, at);
    let got = fill(w, at);
    vset(&mut w.copied, got);
    (got >= n).then_some(0)
}

/// The 5-byte PostgreSQL message header at `at`: type and length (which counts itself).
#[inline(always)]
fn pg_header(w: &mut Scratch, at: u32) -> (u8, u32) {
    let Some(i) = window(w, at, 5) else {
        return (0, 0);
    };
    let h = &w.buf[i..i + 5];
    (h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]))
}

#[inline(always)]
fn pg_walk(c: &mut Conn, w: &mut Scratch, req: bool) {
    if c.phase == PG_SSL_WAIT {
        if req {
            return;
        }
        // One byte: 'S' (or 'G') and the rest is encrypted, 'N' and a startup packet follows.
        if w.copied > 0 && byte(w, 0) == b'N' {
            c.phase = PG_STARTUP;
        } else {
            c.phase = TLS;
            bump(counters::TLS);
        }
        return;
    }
    if c.phase == PG_STARTUP {
        if req {
            c.phase = READY;
        }
        return;
    }
    if !req && c.pg_hunt != 0 {
        pg_tail_ready(c, w);
        return;
    }
    let len = w.len as u64;
    let skip = if req { c.req_skip } else { c.resp_skip };
    if skip >= len {
        if req {
            c.req_skip = skip - len;
        } else {
            c.resp_skip = skip - len;
        }
        return;
    }
    if req {
        c.req_skip = 0;
    } else {
        c.resp_skip = 0;
    }
    vset(&mut w.at, skip as u32);
    // Where the current request's messages began (Parse/Bind... before its Execute).
    vset(&mut w.span, skip as u32);
    if req {
        run_steps(c, w, DB_MAX_STEPS, pg_step_req);
        if capped(w) {
            step_cap(c, w, true);
        }
    } else {
        run_steps(c, w, PG_RESP_MAX_MSGS, pg_step_resp);
        if capped(w) {
            // Too many messages for one pass (a long result): find its end by its last message.
            c.pg_hunt = 1;
            pg_tail_ready(c, w);
        }
    }
}

/// One PostgreSQL message at `w.at`; false when the walk of this read or write is over.
#[inline(always)]
fn pg_step(c: &mut Conn, w: &mut Scratch, req: bool) -> bool {
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        return false;
    }
    if at + 5 > len {
        // A header split across reads.
        if req {
            desync(c, w, true);
        } else {
            c.pg_hunt = 1;
        }
        return false;
    }
    let (t, mlen) = pg_header(w, at);
    if mlen < 4 {
        desync(c, w, req);
        return false;
    }
    let end = at as u64 + 1 + mlen as u64;
    if req {
        match t {
            b'Q' | b'E' => {
                let span = vget(&w.span);
                note_request(c, w, if t == b'E' { Q_EXEC } else { 0 }, span);
                if t == b'Q' {
                    sync_push(c);
                }
                vset(&mut w.span, end as u32);
            }
            b'S' => {
                // A group that runs nothing (Parse/Describe only: a prepared statement)
                // is still a round trip, and userspace learns the statement's SQL from it.
                let span = vget(&w.span);
                if span < at {
                    note_request(c, w, 0, span);
                }
                sync_push(c);
                vset(&mut w.span, end as u32);
            }
            b'P' | b'B' | b'D' | b'C' | b'H' | b'X' | b'p' | b'd' | b'c' | b'f' | b'F' => {}
            _ => {
                desync(c, w, true);
                return false;
            }
        }
    } else {
        // A message completes the head only if the head belongs to the oldest Sync group:
        // otherwise it answers an untimed request of that group.
        let ours = head_in_oldest_group(c);
        match t {
            b'C' | b'I' | b's' => {
                if ours && head_flags(c).is_some_and(|f| f & Q_EXEC != 0) {
                    note_done(c, w, outcome::OK, 1);
                }
            }
            b'E' => match head_flags(c) {
                Some(f) if ours && f & Q_EXEC != 0 => {
                    note_done(c, w, outcome::ERROR, 1);
                    c.pg_aborted = 1;
                }
                Some(_) if ours => c.pg_err = 1,
                // An untimed request of the oldest group failed: the rest of it is skipped.
                _ => c.pg_aborted = 1,
            },
            b'Z' => pg_ready(c, w),
            b'1' | b'2' | b'3' | b'n' | b't' | b'T' | b'D' | b'N' | b'A' | b'S' | b'K' | b'R'
            | b'G' | b'H' | b'W' | b'd' | b'c' | b'v' | b'V' => {}
            _ => {
                desync(c, w, false);
                return false;
            }
        }
    }
    if end > len as u64 {
        if req {
            c.req_skip = end - len as u64;
        } else {
            c.resp_skip = end - len as u64;
        }
        vset(&mut w.at, len);
        return false;
    }
    vset(&mut w.at, end as u32);
    true
}

/// The head request belongs to the oldest Sync group in flight (or no group is).
#[inline(always)]
fn head_in_oldest_group(c: &Conn) -> bool {
    let sh = vget(&c.sync_head);
    sh == vget(&c.sync_tail)
        || vget(&c.head) < vget(&c.syncs[(sh & (PG_SYNCS as u64 - 1)) as usize])
}

/// A Sync (or simple Query) closes a group: its ReadyForQuery completes what is left of it.
#[inline(always)]
fn sync_push(c: &mut Conn) {
    let st = vget(&c.sync_tail);
    if st.wrapping_sub(vget(&c.sync_head)) >= PG_SYNCS as u64 {
        return;
    }
    let j = (st & (PG_SYNCS as u64 - 1)) as usize;
    c.syncs[j] = vget(&c.tail);
    c.sync_untimed[j] = vget(&c.pg_open_untimed);
    vset(&mut c.pg_open_untimed, 0);
    vset(&mut c.sync_tail, st + 1);
}

/// ReadyForQuery: the requests of the oldest group still in flight are done: a simple query
/// (failed if an ErrorResponse came), or Executes the server skipped after an error (or whose
/// CommandCompletes were in a part of a long response that was not walked). Its untimed
/// requests are done too.
#[inline(always)]
fn pg_ready(c: &mut Conn, w: &mut Scratch) {
    let aborted = c.pg_aborted != 0;
    let failed = c.pg_err != 0;
    c.pg_aborted = 0;
    c.pg_err = 0;
    let sh = vget(&c.sync_head);
    if sh == vget(&c.sync_tail) {
        return;
    }
    let j = (sh & (PG_SYNCS as u64 - 1)) as usize;
    let end = vget(&c.syncs[j]);
    let untimed = vget(&c.sync_untimed[j]) as u64;
    c.sync_untimed[j] = 0;
    let left = vget(&c.untimed).saturating_sub(untimed);
    vset(&mut c.untimed, left);
    vset(&mut c.sync_head, sh + 1);
    let n = end.wrapping_sub(vget(&c.head));
    if n == 0 || n > DB_INFLIGHT as u64 {
        return;
    }
    let result = match head_flags(c) {
        _ if aborted => outcome::SKIPPED,
        Some(f) if f & Q_EXEC == 0 && failed => outcome::ERROR,
        _ => outcome::OK,
    };
    note_done(c, w, result, n);
}

/// In a long response whose messages were not all walked: a read that ends with
/// ReadyForQuery ends it.
#[inline(always)]
fn pg_tail_ready(c: &mut Conn, w: &mut Scratch) {
    let len = w.len;
    if len < 6 {
        return;
    }
    let mut t = [0u8; 6];
    let at = len - 6;
    let base = vget(&w.base);
    if at >= base && len <= base + vget(&w.copied) {
        let i = ((at - base) & SCRATCH_MASK) as usize;
        t.copy_from_slice(&w.buf[i..i + 6]);
    } else if !read_user(t.as_mut_ptr(), 6, w.buf_addr + at as u64) {
        return;
    }
    if t[0] != b'Z' || t[1..5] != [0, 0, 0, 5] {
        return;
    }
    c.pg_hunt = 0;
    c.resp_skip = 0;
    pg_ready(c, w);
}

#[inline(always)]
fn my_walk(c: &mut Conn, w: &mut Scratch, req: bool) {
    let len = w.len;
    let copied = w.copied;
    if !req {
        if c.my_resp_pending_ns != 0 {
            // The outcome byte of a response whose header came alone.
            let t = c.my_resp_pending_ns;
            c.my_resp_pending_ns = 0;
            let r = if copied > 0 && byte(w, 0) == 0xff {
                outcome::ERROR
            } else {
                outcome::OK
            };
            reply_done(c, w, r, t);
            return;
        }
        if c.phase == MY_HANDSHAKE {
            // Authentication ends with OK (or ERR); switch requests and more data go on.
            if copied >= 5 && (byte(w, 4) == 0x00 || byte(w, 4) == 0xff) {
                c.phase = READY;
            }
            return;
        }
        // The first packet after a command is its response; rows that follow are not walked
        // (the classic protocol has one command in flight).
        if c.head == c.tail && c.swallow == 0 {
            return;
        }
        if len == 4 {
            c.my_resp_pending_ns = w.now;
            return;
        }
        if copied >= 5 {
            let r = if byte(w, 4) == 0xff {
                outcome::ERROR
            } else {
                outcome::OK
            };
            reply_done(c, w, r, 0);
        }
        return;
    }
    let mut at: u32 = 0;
    if c.my_cmd_pending != 0 {
        // The body of a command whose header came alone: the command byte is first.
        let plen = c.my_cmd_pending;
        c.my_cmd_pending = 0;
        my_command(c, w, 0, plen);
        if plen > len as u64 {
            c.req_skip = plen - len as u64;
            return;
        }
        at = plen as u32;
    } else if c.req_skip > 0 {
        if c.req_skip >= len as u64 {
            c.req_skip -= len as u64;
            return;
        }
        at = c.req_skip as u32;
        c.req_skip = 0;
    }
    vset(&mut w.at, at);
    run_steps(c, w, DB_MAX_STEPS, my_step_req);
    if capped(w) {
        step_cap(c, w, true);
    }
}

/// One MySQL packet the client sent, at `w.at`; false when the walk is over.
#[inline(always)]
fn my_step(c: &mut Conn, w: &mut Scratch) -> bool {
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        return false;
    }
    if at + 4 > len {
        desync(c, w, true);
        return false;
    }
    let Some(i) = window(w, at, 4) else {
        desync(c, w, true);
        return false;
    };
    let h = [w.buf[i], w.buf[i + 1], w.buf[i + 2], w.buf[i + 3]];
    let plen = u32::from_le_bytes([h[0], h[1], h[2], 0]) as u64;
    let seq = h[3];
    if c.phase == MY_HANDSHAKE {
        // A 32-byte handshake response is an SSL request: TLS follows.
        if seq == 1 && plen == 32 {
            c.phase = TLS;
            bump(counters::TLS);
            return false;
        }
    } else if seq == 0 {
        if at + 4 == len {
            c.my_cmd_pending = plen;
            vset(&mut w.at, len);
            return false;
        }
        my_command(c, w, at + 4, plen);
    }
    let end = at as u64 + 4 + plen;
    if end > len as u64 {
        c.req_skip = end - len as u64;
        vset(&mut w.at, len);
        return false;
    }
    vset(&mut w.at, end as u32);
    true
}

/// A command packet's body at `at`: starts timing commands that get a response.
#[inline(always)]
fn my_command(c: &mut Conn, w: &mut Scratch, at: u32, plen: u64) {
    if plen == 0 {
        return;
    }
    let Some(i) = window(w, at, 1) else {
        return;
    };
    let cmd = w.buf[i];
    // COM_QUIT, COM_STMT_SEND_LONG_DATA and COM_STMT_CLOSE get no response.
    if cmd == 0x01 || cmd == 0x18 || cmd == 0x19 {
        return;
    }
    note_request(c, w, 0, at);
}

impl Resp {
    const fn zero() -> Self {
        Self {
            num: 0,
            skip: 0,
            remaining: 0,
            state: R_TYPE,
            num_kind: 0,
            neg: 0,
            at_top: 0,
            top: 0,
            _pad: [0; 7],
        }
    }
}

/// One RESP step: a jump over a bulk payload, or a token: a type byte and what follows it up
/// to its CRLF (a number) or LF (a simple value or inline command), at most `TOKEN_BYTES`
/// bytes; a longer one goes on in the next step. Requests are top-level arrays (or inline
/// lines), each response one top-level value however nested. False when the walk of this
/// read or write is over.
#[inline(always)]
fn resp_step<const REQ: bool>(c: &mut Conn, w: &mut Scratch) -> bool {
    let req = REQ;
    let at = vget(&w.at);
    let len = vget(&w.len);
    if at >= len {
        // RESP state is kept per direction, so a segment boundary is like a read boundary.
        return next_segment(w);
    }
    let r = if req { &mut c.req } else { &mut c.resp };
    let skip = vget(&r.skip);
    if skip > 0 {
        let left = (len - at) as u64;
        if skip > left {
            vset(&mut r.skip, skip - left);
            vset(&mut w.at, len);
            return next_segment(w);
        }
        vset(&mut w.at, at + skip as u32);
        vset(&mut r.skip, 0);
        if vget(&r.remaining) == 0 && !req {
            let o = resp_outcome(vget(&r.top));
            reply_done(c, w, o, 0);
        }
        return true;
    }
    let Some(i) = window(w, at, 1) else {
        desync(c, w, req);
        return false;
    };
    if vget(&r.state) == R_TYPE {
        let b = w.buf[i];
        vset(&mut w.at, at + 1);
        let r = if req { &mut c.req } else { &mut c.resp };
        if vget(&r.remaining) == 0 {
            vset(&mut r.remaining, 1);
            vset(&mut r.at_top, 1);
            vset(&mut r.top, 0);
            if req {
                note_request(c, w, 0, at);
            }
        }
        let r = if req { &mut c.req } else { &mut c.resp };
        vset(&mut r.num, 0);
        vset(&mut r.neg, 0);
        let (state, nk, flag) = match b {
            b'*' | b'~' | b'>' => (R_NUM, N_AGG, 0),
            b'%' | b'|' => (R_NUM, N_MAP, 0),
            b'$' | b'=' | b'!' => (R_NUM, N_BULK, 0),
            b'-' => (R_LINE, 0, TOP_ERR),
            b'_' => (R_LINE, 0, TOP_NULL),
            b'+' | b':' | b',' | b'#' | b'(' => (R_LINE, 0, 0),
            // An inline command: one line.
            _ if req && vget(&r.at_top) != 0 => (R_LINE, 0, 0),
            _ => (R_BAD, 0, 0),
        };
        if state == R_BAD {
            desync(c, w, req);
            return false;
        }
        vset(&mut r.state, state);
        vset(&mut r.num_kind, nk);
        if vget(&r.at_top) != 0 {
            let v = vget(&r.top) | flag;
            vset(&mut r.top, v);
        }
    }
    // The rest of the token, as far as the window goes.
    let mut end = T_MORE;
    for _ in 0..TOKEN_BYTES {
        let at = vget(&w.at);
        let base = vget(&w.base);
        if at >= vget(&w.len) || at < base || at >= base + vget(&w.copied) {
            break;
        }
        let b = w.buf[((at - base) & SCRATCH_MASK) as usize];
        vset(&mut w.at, at + 1);
        let r = if req { &mut c.req } else { &mut c.resp };
        match vget(&r.state) {
            R_NUM => {
                if b.is_ascii_digit() {
                    let n = vget(&r.num);
                    if n < (1 << 40) {
                        vset(&mut r.num, n * 10 + (b - b'0') as u64);
                    }
                } else if b == b'-' {
                    vset(&mut r.neg, 1);
                } else if b == b'\r' {
                    vset(&mut r.state, R_NUM_LF);
                } else {
                    end = T_BAD;
                    break;
                }
            }
            R_NUM_LF => {
                if b != b'\n' {
                    end = T_BAD;
                    break;
                }
                resp_number_done(r);
                end = T_DONE;
                break;
            }
            R_LINE => {
                // A simple value (or inline command) runs to its LF.
                if b == b'\n' {
                    vset(&mut r.state, R_TYPE);
                    let v = vget(&r.remaining).saturating_sub(1);
                    vset(&mut r.remaining, v);
                    vset(&mut r.at_top, 0);
                    end = T_DONE;
                    break;
                }
            }
            _ => break,
        }
    }
    if end == T_BAD {
        desync(c, w, req);
        return false;
    }
    let r = if req { &mut c.req } else { &mut c.resp };
    let skip = vget(&r.skip);
    if end == T_DONE && skip > 0 {
        // A bulk string's header: its payload is passed in this step when this segment
        // holds it (nearly always), not in a step of its own.
        let at = vget(&w.at);
        if skip <= (vget(&w.len).saturating_sub(at)) as u64 {
            vset(&mut w.at, at + skip as u32);
            vset(&mut r.skip, 0);
        }
    }
    if end == T_DONE && !req && vget(&r.remaining) == 0 && vget(&r.skip) == 0 {
        let o = resp_outcome(vget(&r.top));
        reply_done(c, w, o, 0);
    }
    true
}

/// An aggregate's count or a bulk string's length has been read.
#[inline(always)]
fn resp_number_done(r: &mut Resp) {
    vset(&mut r.state, R_TYPE);
    {
        let v = vget(&r.remaining).saturating_sub(1);
        vset(&mut r.remaining, v);
    }
    let null = vget(&r.neg) != 0;
    let at_top = vget(&r.at_top) != 0;
    if null && at_top {
        {
            let v = vget(&r.top) | TOP_NULL;
            vset(&mut r.top, v);
        }
    }
    vset(&mut r.at_top, 0);
    if null {
        return;
    }
    let num = vget(&r.num);
    if vget(&r.num_kind) == N_BULK {
        vset(&mut r.skip, num + 2);
    } else {
        let mut n = num;
        if vget(&r.num_kind) == N_MAP {
            n *= 2;
        }
        if n > 1 << 24 {
            n = 1 << 24;
        }
        {
            let v = vget(&r.remaining) + n as u32;
            vset(&mut r.remaining, v);
        }
    }
}

#[inline(always)]
fn resp_outcome(top: u8) -> u8 {
    if top & TOP_ERR != 0 {
        outcome::ERROR
    } else if top & TOP_NULL != 0 {
        outcome::NULL
    } else {
        outcome::OK
    }
}
