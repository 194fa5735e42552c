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
//!
//! Here: the maps, the hooks and the walkers' entry points. `io`: which buffer, the scratch
//! window, recognising a connection. `fifo`: requests in flight, statement keys and counts.
//! `events`: what goes to userspace. `pg`, `mysql`, `resp`: one step of each protocol.
#![no_std]
#![no_main]

agent_ebpf::license!();

mod events;
mod fifo;
mod io;
mod mysql;
mod pg;
mod resp;

use events::*;
use fifo::*;
use io::*;
use mysql::*;
use pg::*;
use resp::*;

use agent_common::db::walker::{
    MYSQL as WALK_MYSQL, PG as WALK_PG, RESP_REQ as WALK_RESP_REQ, RESP_RESP as WALK_RESP_RESP,
};
use agent_common::{
    db::{
        counters, kind, outcome, role, system, DbConnEvent, DbLossEvent, DbOffsets, DbSettings,
        DbSlowEvent, DbStat, DbStatKey, DbTextEvent, DB_GIVE_UP, DB_HAVE_UNIX, DB_INFLIGHT,
        DB_KNOWN_ENTRIES, DB_MAX_STEPS, DB_PATH_LEN, DB_PREFIX_LEN, DB_RINGBUF_BYTES,
        DB_ROLE_CLIENT, DB_ROLE_SERVER, DB_STATS_ENTRIES, DB_STATS_OTHER_ENTRIES,
    },
    log2_bucket,
    sock::af::{INET as AF_INET, INET6 as AF_INET6, UNIX as AF_UNIX},
    HIST_BUCKETS,
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

/// PostgreSQL Sync groups in flight per connection (a power of two).
const PG_SYNCS: usize = 16;
const WAKEUP_EVERY: u32 = 64;
/// Completions one `DB_STATS` update may carry.
const MAX_RUN: u32 = 1 << 20;
/// Bytes of a Redis request hashed for its key: the array header, the command name's header
/// and the name (`*3\r\n$3\r\nSET\r\n`); a longer name is cut.
const RESP_KEY_BYTES: u32 = 48;
/// `BPF_NOEXIST`.
const NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;
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
static DB_WALKERS: ProgramArray =
    ProgramArray::with_max_entries(agent_common::db::walker::COUNT, 0);

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
    sk_type: 0,
    sock: agent_common::sock::SockOffsets::ZERO,
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
