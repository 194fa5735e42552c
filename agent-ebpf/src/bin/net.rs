//! TCP connection lifecycle: connect time and failures, accepts, lifetime, RTT, bytes and
//! retransmits, from the `sock:inet_sock_set_state` and `tcp:*` tracepoints (tp_btf).
//!
//! Nothing here runs per packet. State transitions happen a handful of times per connection;
//! RTT and byte counts are read from the socket itself at those transitions and, for live
//! connections, once per sample interval by a walk over the kernel's TCP sockets (`iter/tcp`,
//! run by userspace), or where there is no such iterator from `tcp_rcv_space_adjust`. Each connection's state lives in a hash
//! keyed by the socket's address; every event carries byte and retransmit deltas since the
//! previous one, so userspace only adds.
//!
//! The kernel skips a run of a tp_btf program that would start while the same program is
//! already running on that CPU (a softirq state change interrupting one in process context),
//! so a connection's end can go unseen. `tcp_destroy_sock`, which every TCP socket passes
//! once, ends whatever is still tracked then; userspace reconciles its open connections
//! against `NET_CONNS` for what neither saw (or what the ring buffer dropped).
//!
//! On these VMs a helper call costs a hundred nanoseconds or more, so the programs count them:
//! uninteresting transitions return before the first, fields are plain loads, and the reader
//! is woken once per batch of events.
//!
//! Kernel struct fields are read with plain loads at offsets that userspace resolved from the
//! running kernel's BTF and set as the read-only global `NET_OFFSETS` (see
//! `agent_common::net::NetOffsets`): the verifier knows their values, checks every load against
//! the BTF, and makes it fault-tolerant. No helper call per field.
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::{
    net::{
        conn_state::{CONNECTING, ESTABLISHED},
        counters, direction, kind, NetConfig, NetConn as Conn, NetEvent, NetOffsets,
        NetTuple as Tuple, MAX_TRACKED_CONNS, NET_HAVE_SK_CGROUP, NET_RINGBUF_BYTES, PORT_SLOTS,
    },
    TASK_COMM_LEN,
};
use agent_ebpf::util::{self, load, now_ns};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::bpf_skc_to_tcp_sock,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Wake the reader every this many events per CPU (see `wakeup_flags`).
const WAKEUP_EVERY: u32 = 64;

#[map]
static NET_CONFIG: Array<NetConfig> = Array::with_max_entries(1, 0);

/// Field offsets, set by userspace at load from the kernel's BTF. A read-only global: the
/// verifier knows its value, so `sk + offset` is a typed pointer with a known offset and a
/// field read is one inlined load it checks against the BTF, not a helper call.
#[unsafe(no_mangle)]
static NET_OFFSETS: NetOffsets = NetOffsets {
    flags: 0,
    sk_err: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    tp_srtt_us: 0,
    tp_bytes_acked: 0,
    tp_bytes_received: 0,
    tp_total_retrans: 0,
    sk_cgroup: 0,
    cgroup_kn: 0,
    kn_id: 0,
    sk_socket: 0,
    skc_state: 0,
};

#[inline(always)]
fn offsets() -> NetOffsets {
    // SAFETY: a static of our own; volatile so the compiler does not fold the zero placeholder.
    unsafe { core::ptr::read_volatile(&NET_OFFSETS) }
}

/// Connections being tracked, by socket address. A plain (preallocated) hash: an LRU would
/// evict live connections silently, and socket storage, measured here, costs more per
/// connection (an allocation per socket). Full means new connections go untracked, counted.
#[map]
static NET_CONNS: HashMap<u64, Conn> = HashMap::with_max_entries(MAX_TRACKED_CONNS, 0);

#[map]
static NET_EVENTS: RingBuf = RingBuf::with_byte_size(NET_RINGBUF_BYTES, 0);

#[map]
static NET_IGNORE_PORTS: Array<u8> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
static NET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

/// Events written on each CPU since it last woke the reader.
#[map]
static NET_PENDING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn isa_net_state(ctx: BtfTracePointContext) -> i32 {
    // inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    on_state(sk, old, new);
    0
}

/// The backstop. Every full TCP socket passes here once, when it is freed; one still in our
/// map missed the state change that should have ended it: the kernel skips a tp_btf program
/// that is already running on this CPU (a softirq state change interrupting a run in process
/// context) and only counts the skipped run in the program's recursion_misses. Report the
/// connection's end now, so that no connection stays open forever and no stale entry stays
/// in the map. On the common path (not tracked) this costs the hook and one hash lookup.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn isa_net_destroy(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let Some(c) = tracked(sk) else { return 0 };
    let now = now_ns();
    let elapsed = now.saturating_sub(c.start_ns);
    if c.state == ESTABLISHED {
        emit(sk, c, kind::CLOSE, now, elapsed, 0);
    } else if !syn_acked(sk) {
        // The error may have been read (and cleared) by the application by now: 0 then,
        // reported as aborted.
        let err: i32 = load(sk, offsets().sk_err);
        emit(sk, c, kind::CONNECT_FAILED, now, elapsed, err);
    }
    // A connect whose SYN was acknowledged did complete, unseen: as on a missed ESTABLISHED
    // in `on_state`, neither a connect nor a failure is reported for it.
    bump(counters::ENDED_AT_DESTROY);
    untrack(sk);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn isa_net_retransmit(ctx: BtfTracePointContext) -> i32 {
    bump(counters::RETRANSMITS);
    let sk: *const u8 = ctx.arg(0);
    sample(sk, kind::RETRANSMIT, true);
    0
}

/// Samples every tracked live connection, run by userspace once per sample interval over the
/// kernel's TCP sockets (a BPF iterator, `iter/tcp`): the receive path pays nothing. Its
/// context is `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common
/// *sk_common; uid_t uid; }`, and a last call with no socket ends the walk.
///
/// # Safety
/// Called by the kernel with its iterator context.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub unsafe extern "C" fn isa_net_walk(ctx: *mut core::ffi::c_void) -> i32 {
    // SAFETY: the context's second member; the verifier checks the load against its BTF.
    let sk = unsafe { core::ptr::read_volatile(ctx.cast::<*const u8>().add(1)) };
    if sk.is_null() {
        return 0;
    }
    // Most sockets a busy host holds are not live connections (TIME_WAIT, requests): one
    // load decides, before the hash lookup.
    if load::<u8>(sk, offsets().skc_state) as i32 != TCP_ESTABLISHED {
        return 0;
    }
    sample(sk, kind::SAMPLE, true);
    0
}

/// The fallback where the kernel has no TCP iterator: samples from the receive path, which
/// calls this on every receive that copied data (before its own once-per-RTT check).
#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn isa_net_sample(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    sample(sk, kind::SAMPLE, false);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn isa_net_reset_sent(_ctx: BtfTracePointContext) -> i32 {
    bump(counters::RESETS_SENT);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn isa_net_reset_received(_ctx: BtfTracePointContext) -> i32 {
    bump(counters::RESETS_RECEIVED);
    0
}

#[inline(always)]
fn bump(counter: u32) {
    util::bump(&NET_COUNTERS, counter);
}

#[inline(always)]
fn ignored(port: u16) -> bool {
    matches!(NET_IGNORE_PORTS.get(port as u32), Some(v) if *v != 0)
}

/// The connection state of a socket we track, if we do.
#[inline(always)]
fn tracked(sk: *const u8) -> Option<&'static mut Conn> {
    let c = NET_CONNS.get_ptr_mut(sk as u64)?;
    // SAFETY: a value of our own map, valid for this program run.
    Some(unsafe { &mut *c })
}

#[inline(always)]
fn untrack(sk: *const u8) {
    let _ = NET_CONNS.remove(sk as u64);
}

// Only TCP reaches SYN_SENT and SYN_RECV (SCTP shares the tracepoint but has neither state), so
// starting to track needs no protocol check, and every later transition finds the socket in
// our map or ignores it.
#[inline(always)]
fn on_state(sk: *const u8, old: i32, new: i32) {
    // Six of a connection's ten or so transitions (FIN_WAIT*, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
    // LISTEN -> SYN_RECV) need nothing: decide on the states alone, before any helper call.
    let wanted = new == TCP_SYN_SENT
        || old == TCP_SYN_SENT
        || new == TCP_CLOSE
        || (old == TCP_SYN_RECV && new == TCP_ESTABLISHED);
    if !wanted {
        return;
    }
    if new == TCP_SYN_SENT {
        // connect(): process context, so the current task is the one connecting.
        start(sk, direction::OUTBOUND, true);
    } else if old == TCP_SYN_SENT {
        // ESTABLISHED: connected; CLOSE: failed. (SYN_RECV, a simultaneous open, goes on to
        // ESTABLISHED from there.)
        let Some(c) = tracked(sk) else { return };
        if new == TCP_ESTABLISHED {
            connected(sk, c, now_ns());
        } else if new == TCP_CLOSE {
            let now = now_ns();
            let err: i32 = load(sk, offsets().sk_err);
            let elapsed = now.saturating_sub(c.start_ns);
            emit(sk, c, kind::CONNECT_FAILED, now, elapsed, err);
            untrack(sk);
        }
    } else if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        // A listener's child completing its handshake has no `struct socket` until accept();
        // a socket that has one came here by connecting (a simultaneous open).
        if load::<u64>(sk, offsets().sk_socket) != 0 {
            if let Some(c) = tracked(sk) {
                if c.state == CONNECTING {
                    connected(sk, c, now_ns());
                }
            }
            return;
        }
        // Softirq context: the owner is known by the socket's cgroup.
        if let Some(mut c) = start(sk, direction::INBOUND, false) {
            let now = c.start_ns;
            emit(sk, &mut c, kind::ACCEPT, now, 0, 0);
        }
    } else if new == TCP_CLOSE {
        let Some(c) = tracked(sk) else { return };
        if c.state == ESTABLISHED {
            let now = now_ns();
            let lifetime = now.saturating_sub(c.start_ns);
            emit(sk, c, kind::CLOSE, now, lifetime, 0);
        }
        untrack(sk);
    }
}

/// Whether the peer acknowledged our SYN (`bytes_acked` counts it as one byte).
#[inline(always)]
fn syn_acked(sk: *const u8) -> bool {
    // SAFETY: `sk` is the tracepoint's socket argument, as the helper requires.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }
        .cast::<u8>()
        .cast_const();
    !tp.is_null() && load::<u64>(tp, offsets().tp_bytes_acked) != 0
}

/// An outbound connect completed: time it, and from now on time the connection's life.
#[inline(always)]
fn connected(sk: *const u8, c: &mut Conn, now: u64) {
    let elapsed = now.saturating_sub(c.start_ns);
    // connect() enters SYN_SENT before it picks the local port: read the addresses again.
    c.tuple = read_tuple(sk);
    c.start_ns = now;
    c.state = ESTABLISHED;
    c.last_sample_ns = now;
    emit(sk, c, kind::CONNECT, now, elapsed, 0);
}

/// Starts tracking a connection (unless one of its ports is ignored); returns what it stored.
/// An inbound connection is established from the start; an outbound one is connecting.
#[inline(always)]
fn start(sk: *const u8, dir: u8, process_context: bool) -> Option<Conn> {
    let tuple = read_tuple(sk);
    if ignored(tuple.sport) || ignored(tuple.dport) {
        return None;
    }
    // In process context the task is the socket's user: its cgroup is one helper call away.
    // In softirq, the socket's own cgroup (three dependent loads) names the owner.
    let (cgroup_id, pid, comm) = if process_context {
        (
            // SAFETY: no preconditions.
            unsafe { bpf_get_current_cgroup_id() },
            (bpf_get_current_pid_tgid() >> 32) as u32,
            bpf_get_current_comm().unwrap_or_default(),
        )
    } else {
        (sock_cgroup(sk), 0, [0u8; TASK_COMM_LEN])
    };
    let now = now_ns();
    let conn = Conn {
        start_ns: now,
        last_sample_ns: now,
        cgroup_id,
        bytes_acked: 0,
        bytes_received: 0,
        pid,
        total_retrans: 0,
        comm,
        tuple,
        direction: dir,
        state: if dir == direction::INBOUND {
            ESTABLISHED
        } else {
            CONNECTING
        },
        _pad: [0; 6],
    };
    if NET_CONNS.insert(sk as u64, conn, 0).is_err() {
        bump(counters::TRACK_FAILED);
        return None;
    }
    Some(conn)
}

/// The cgroup (v2) the socket was created in: `sk->sk_cgrp_data.cgroup->kn->id`.
#[inline(always)]
fn sock_cgroup(sk: *const u8) -> u64 {
    let o = offsets();
    if o.flags & NET_HAVE_SK_CGROUP == 0 {
        return 0;
    }
    let cgrp = load::<u64>(sk, o.sk_cgroup) as *const u8;
    if cgrp.is_null() {
        return 0;
    }
    let kn = load::<u64>(cgrp, o.cgroup_kn) as *const u8;
    if kn.is_null() {
        return 0;
    }
    load(kn, o.kn_id)
}

/// A live-connection sample or a retransmit: RTT and byte deltas, rate-limited per connection
/// (retransmits are always reported: they are what the user is looking for).
#[inline(always)]
fn sample(sk: *const u8, what: u8, always: bool) {
    let Some(c) = tracked(sk) else { return };
    if c.state != ESTABLISHED {
        return;
    }
    let Some(cfg) = NET_CONFIG.get(0) else {
        return;
    };
    let now = now_ns();
    if !always && now.saturating_sub(c.last_sample_ns) < cfg.sample_interval_ns {
        return;
    }
    c.last_sample_ns = now;
    emit(sk, c, what, now, 0, 0);
}

/// Wake the reader only once a batch has built up: a wakeup per event would cost more than the
/// event on a host that opens tens of thousands of connections a second. Userspace also drains
/// the ring on a short timer, so a trickle of events is never stranded.
#[inline(always)]
fn wakeup_flags() -> u64 {
    util::wakeup_flags(&NET_PENDING, WAKEUP_EVERY)
}

/// The socket's addresses and ports.
#[inline(always)]
fn read_tuple(sk: *const u8) -> Tuple {
    let o = offsets();
    let mut t = Tuple {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: load(sk, o.skc_num),
        dport: u16::from_be(load::<u16>(sk, o.skc_dport)),
        family: load(sk, o.skc_family),
        _pad: 0,
    };
    if t.family == AF_INET {
        t.saddr[..4].copy_from_slice(&load::<u32>(sk, o.skc_rcv_saddr).to_ne_bytes());
        t.daddr[..4].copy_from_slice(&load::<u32>(sk, o.skc_daddr).to_ne_bytes());
    } else if t.family == AF_INET6 {
        t.saddr = load_in6(sk, o.skc_v6_rcv_saddr);
        t.daddr = load_in6(sk, o.skc_v6_daddr);
    }
    t
}

/// A `struct in6_addr` as four 32-bit loads (its alignment).
#[inline(always)]
fn load_in6(sk: *const u8, off: u32) -> [u8; 16] {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w: u32 = load(sk, off + 4 * i as u32);
        a[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        i += 1;
    }
    a
}

/// Writes one event for `c`. Events after the first carry byte and retransmit deltas, read
/// from the socket now, against what the previous event of this connection reported (the
/// handshake events skip those reads: nothing has flowed yet).
#[inline(always)]
fn emit(sk: *const u8, c: &mut Conn, what: u8, now: u64, duration_ns: u64, error: i32) {
    let Some(mut entry) = NET_EVENTS.reserve::<NetEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let o = offsets();
    // The tcp_sock fields lie past `struct sock`: reach them through a pointer typed as
    // tcp_sock (NULL for anything that is not a full TCP socket).
    // SAFETY: `sk` is the tracepoint's socket argument, as the helper requires.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }
        .cast::<u8>()
        .cast_const();
    let (mut sent, mut received, mut retransmits, mut srtt_us) = (0, 0, 0, 0);
    if !tp.is_null() {
        srtt_us = load::<u32>(tp, o.tp_srtt_us) >> 3;
        if what != kind::CONNECT && what != kind::ACCEPT {
            let acked: u64 = load(tp, o.tp_bytes_acked);
            let rcvd: u64 = load(tp, o.tp_bytes_received);
            let retrans: u32 = load(tp, o.tp_total_retrans);
            sent = acked.saturating_sub(c.bytes_acked);
            received = rcvd.saturating_sub(c.bytes_received);
            retransmits = retrans.saturating_sub(c.total_retrans);
            c.bytes_acked = acked;
            c.bytes_received = rcvd;
            c.total_retrans = retrans;
        }
    }
    let ev = NetEvent {
        ts_ns: now,
        sock: sk as u64,
        cgroup_id: c.cgroup_id,
        duration_ns,
        bytes_sent: sent,
        bytes_received: received,
        saddr: c.tuple.saddr,
        daddr: c.tuple.daddr,
        pid: c.pid,
        srtt_us,
        retransmits,
        error,
        sport: c.tuple.sport,
        dport: c.tuple.dport,
        family: c.tuple.family,
        kind: what,
        direction: c.direction,
        comm: c.comm,
    };
    entry.write(ev);
    entry.submit(wakeup_flags());
    bump(counters::EVENTS);
}
