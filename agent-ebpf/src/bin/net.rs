//! TCP connection lifecycle: connect time and failures, accepts, lifetime, RTT, bytes and
//! retransmits, from the `sock:inet_sock_set_state` and `tcp:*` tracepoints (tp_btf), counted
//! in the kernel per edge (service, peer, destination) in `NET_EDGES`.
//!
//! Nothing here runs per packet, and nothing goes to userspace per connection: state
//! transitions happen a handful of times per connection, and each one that matters adds to
//! its edge's counters and histograms with atomic adds, which userspace reads once per tick.
//! RTT and byte counts are read from the socket itself at those transitions and, for live
//! connections, once per sample interval by a walk over the kernel's TCP sockets (`iter/tcp`,
//! run by userspace), or where there is no such iterator from `tcp_rcv_space_adjust`. Each
//! connection's state lives in a hash keyed by the socket's address; it remembers what the socket had sent and received when last
//! counted, so every update adds only the difference.
//!
//! The kernel skips a run of a tp_btf program that would start while the same program is
//! already running on that CPU (a softirq state change interrupting one in process context),
//! so a connection's end can go unseen. `tcp_destroy_sock`, which every TCP socket passes
//! once, ends whatever is still tracked then; a socket that starts a new connection while
//! its old one is still tracked ends the old one; and userspace ends the entries that two
//! walks over the sockets in a row did not find (`NetConn::walk`).
//!
//! On these VMs a helper call costs a hundred nanoseconds or more, so the programs count them:
//! uninteresting transitions return before the first, and fields are plain loads.
//!
//! Kernel struct fields are read with plain loads at offsets that userspace resolved from the
//! running kernel's BTF and set as the read-only global `NET_OFFSETS` (see
//! `agent_common::net::NetOffsets`): the verifier knows their values, checks every load against
//! the BTF, and makes it fault-tolerant. No helper call per field.
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::{
    log2_bucket,
    net::{
        conn_state::{CONNECTING, ESTABLISHED},
        counters, direction, failure_index, NetConfig, NetConn as Conn, NetEdge, NetEdgeKey,
        NetOffsets, NetTuple as Tuple, FAILURE_REASONS, MAX_TRACKED_CONNS, NET_EDGES_DEFAULT,
        NET_HAVE_SK_CGROUP, PORT_SLOTS,
    },
    sock::{
        af::{INET as AF_INET, INET6 as AF_INET6},
        SockOffsets,
    },
    HIST_BUCKETS, TASK_COMM_LEN,
};
use agent_ebpf::util::{self, atomic_add, load, now_ns};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::bpf_skc_to_tcp_sock,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::{debug, warn};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_TIME_WAIT: i32 = 6;
const TCP_CLOSE: i32 = 7;
const TCP_LISTEN: i32 = 10;
const TCP_NEW_SYN_RECV: i32 = 12;

#[map]
static NET_CONFIG: Array<NetConfig> = Array::with_max_entries(1, 0);

/// Field offsets, set by userspace at load from the kernel's BTF. A read-only global: the
/// verifier knows its value, so `sk + offset` is a typed pointer with a known offset and a
/// field read is one inlined load it checks against the BTF, not a helper call.
#[unsafe(no_mangle)]
static NET_OFFSETS: NetOffsets = NetOffsets {
    flags: 0,
    sk_err: 0,
    sock: SockOffsets::ZERO,
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

/// What the kernel counted per edge. Userspace sizes it from `net.max_edges` at load and
/// removes edges that stayed idle with nothing open. Full means new edges are counted in
/// `NET_EDGES_OTHER`.
#[map]
static NET_EDGES: HashMap<NetEdgeKey, NetEdge> = HashMap::with_max_entries(NET_EDGES_DEFAULT, 0);

/// The edges past a full `NET_EDGES`, one per direction (indexed by it).
#[map]
static NET_EDGES_OTHER: Array<NetEdge> = Array::with_max_entries(3, 0);

/// One zeroed edge, never written: what a new edge is inserted from (it does not fit on the
/// program's 512-byte stack beside its key).
#[map]
static NET_EDGE_ZERO: Array<NetEdge> = Array::with_max_entries(1, 0);

#[map]
static NET_IGNORE_PORTS: Array<u8> = Array::with_max_entries(PORT_SLOTS, 0);

#[map]
static NET_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

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
/// context) and only counts the skipped run in the program's recursion_misses. End the
/// connection now, so that no connection stays open forever and no stale entry stays in the
/// map. On the common path (not tracked) this costs the hook and one hash lookup.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn isa_net_destroy(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let Some(c) = tracked(sk) else { return 0 };
    if c.state == ESTABLISHED {
        closed(sk, c, now_ns());
    } else if !syn_acked(sk) {
        // The error may have been read (and cleared) by the application by now: 0 then,
        // counted as aborted.
        failed(c, load(sk, offsets().sk_err));
    }
    // A connect whose SYN was acknowledged did complete, unseen: as on a missed ESTABLISHED
    // in `on_state`, neither a connect nor a failure is counted for it.
    bump(counters::ENDED_AT_DESTROY);
    debug!(
        &(),
        "net: connection of pid {} ended at destroy (its close went unseen)", c.pid
    );
    untrack(sk);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn isa_net_retransmit(ctx: BtfTracePointContext) -> i32 {
    bump(counters::RETRANSMITS);
    let sk: *const u8 = ctx.arg(0);
    sample(sk, true);
    0
}

/// Samples every tracked live connection, run by userspace once per sample interval over the
/// kernel's TCP sockets (a BPF iterator, `iter/tcp`): the receive path pays nothing. It also
/// stamps each tracked socket it finds with the walk's number, so that userspace can end the
/// entries whose socket is gone unseen. Its context is `struct bpf_iter__tcp { struct
/// bpf_iter_meta *meta; struct sock_common *sk_common; uid_t uid; }`, and a last call with no
/// socket ends the walk.
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
    // Most sockets a busy host holds are not connections we track (TIME_WAIT, requests,
    // listeners): one load decides, before the hash lookup.
    let state = load::<u8>(sk, offsets().skc_state) as i32;
    if state == TCP_TIME_WAIT
        || state == TCP_CLOSE
        || state == TCP_LISTEN
        || state == TCP_NEW_SYN_RECV
    {
        return 0;
    }
    let Some(c) = tracked(sk) else { return 0 };
    let Some(cfg) = NET_CONFIG.get(0) else {
        return 0;
    };
    c.walk = cfg.walk_gen as u32;
    if state == TCP_ESTABLISHED && c.state == ESTABLISHED {
        c.last_sample_ns = now_ns();
        if let Some(e) = edge(c) {
            account(sk, c, e);
        }
    }
    0
}

/// The fallback where the kernel has no TCP iterator: samples from the receive path, which
/// calls this on every receive that copied data (before its own once-per-RTT check).
#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn isa_net_sample(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    sample(sk, false);
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
    // A failed remove leaves an entry the walks reconcile later; say why it failed.
    if let Err(e) = NET_CONNS.remove(sk as u64) {
        warn!(
            &(),
            "net: removing a tracked connection failed: error {}", e
        );
    }
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
            failed(c, load(sk, offsets().sk_err));
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
        if let Some(c) = start(sk, direction::INBOUND, false) {
            if let Some(e) = edge(&c) {
                handshake(sk, e);
            }
        }
    } else if new == TCP_CLOSE {
        let Some(c) = tracked(sk) else { return };
        if c.state == ESTABLISHED {
            closed(sk, c, now_ns());
        }
        untrack(sk);
    }
}

/// Whether the peer acknowledged our SYN (`bytes_acked` counts it as one byte).
#[inline(always)]
fn syn_acked(sk: *const u8) -> bool {
    let tp = tcp_sock(sk);
    !tp.is_null() && load::<u64>(tp, offsets().tp_bytes_acked) != 0
}

/// The socket as a `struct tcp_sock` (NULL for anything that is not a full TCP socket): the
/// tcp_sock fields lie past `struct sock`.
#[inline(always)]
fn tcp_sock(sk: *const u8) -> *const u8 {
    // SAFETY: `sk` is the tracepoint's (or the iterator's) socket, as the helper requires.
    unsafe { bpf_skc_to_tcp_sock(sk.cast_mut().cast()) }
        .cast::<u8>()
        .cast_const()
}

/// An outbound connect completed: count and time it on its edge, and from now on time the
/// connection's life.
#[inline(always)]
fn connected(sk: *const u8, c: &mut Conn, now: u64) {
    let elapsed = now.saturating_sub(c.start_ns);
    // connect() enters SYN_SENT before it picks the local port: read the addresses again.
    c.tuple = read_tuple(sk);
    c.start_ns = now;
    c.state = ESTABLISHED;
    c.last_sample_ns = now;
    let Some(e) = edge(c) else { return };
    // SAFETY: a map value, alive while this program runs; other CPUs update it too, with
    // atomic adds like these.
    unsafe {
        atomic_add(&raw mut (*e).connect_sum_ns, elapsed);
        let b = log2_bucket(elapsed);
        if b < HIST_BUCKETS {
            atomic_add(&raw mut (*e).connect_buckets[b], 1);
        }
        if c.pid != 0 {
            // A plain store: the last writer wins, which is all it claims.
            (*e).last_pid = c.pid;
        }
    }
    handshake(sk, e);
}

/// A handshake completed on edge `e`: one more connection (open until a close or a
/// reconciliation counts its end), with the RTT the handshake measured.
#[inline(always)]
fn handshake(sk: *const u8, e: *mut NetEdge) {
    // SAFETY: as in `connected`.
    unsafe {
        atomic_add(&raw mut (*e).connects, 1);
    }
    // Nothing has flowed yet: the RTT only.
    let tp = tcp_sock(sk);
    if !tp.is_null() {
        rtt(tp, e);
    }
}

/// An outbound connect failed with socket error `err`.
#[inline(always)]
fn failed(c: &Conn, err: i32) {
    debug!(&(), "net: connect from pid {} failed: errno {}", c.pid, err);
    let Some(e) = edge(c) else { return };
    let i = failure_index(err);
    if i < FAILURE_REASONS {
        // SAFETY: as in `connected`.
        unsafe { atomic_add(&raw mut (*e).failures[i], 1) };
    }
}

/// A tracked established connection ended: its last bytes and its lifetime.
#[inline(always)]
fn closed(sk: *const u8, c: &mut Conn, now: u64) {
    let Some(e) = edge(c) else { return };
    account(sk, c, e);
    // SAFETY: as in `connected`.
    unsafe {
        atomic_add(&raw mut (*e).closes, 1);
        atomic_add(&raw mut (*e).lifetime_ns, now.saturating_sub(c.start_ns));
    }
}

/// Starts tracking a connection (unless one of its ports is ignored); returns what it
/// stored. An inbound connection is established from the start; an outbound one is
/// connecting.
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
        _pad: [0; 2],
        walk: 0,
    };
    if NET_CONNS
        .insert(sk as u64, conn, BPF_NOEXIST as u64)
        .is_ok()
    {
        return Some(conn);
    }
    // Still tracked: the socket's previous connection ended unseen (its state change and its
    // destroy both skipped). End it on its edge, then track the new one in its place.
    let Some(old) = tracked(sk) else {
        bump(counters::TRACK_FAILED);
        warn!(
            &(),
            "net: a connection went untracked: the connection table is full"
        );
        return None;
    };
    if old.state == ESTABLISHED {
        if let Some(e) = edge(old) {
            // SAFETY: as in `connected`.
            unsafe { atomic_add(&raw mut (*e).reconciled, 1) };
        }
        bump(counters::REUSED);
    }
    *old = conn;
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

/// A live-connection sample from the receive path, at most once per sample interval per
/// connection, or a retransmit (`always`: what the user is looking for).
#[inline(always)]
fn sample(sk: *const u8, always: bool) {
    let Some(c) = tracked(sk) else { return };
    if c.state != ESTABLISHED {
        return;
    }
    let now = now_ns();
    if !always {
        let Some(cfg) = NET_CONFIG.get(0) else {
            return;
        };
        if now.saturating_sub(c.last_sample_ns) < cfg.sample_interval_ns {
            return;
        }
    }
    c.last_sample_ns = now;
    if let Some(e) = edge(c) {
        account(sk, c, e);
    }
}

/// The edge a connection counts on: its entry in `NET_EDGES`, made if new; past a full table,
/// its direction's entry in `NET_EDGES_OTHER`.
#[inline(always)]
fn edge(c: &Conn) -> Option<*mut NetEdge> {
    let k = c.edge_key();
    if let Some(e) = NET_EDGES.get_ptr_mut(k) {
        return Some(e);
    }
    let zero = NET_EDGE_ZERO.get(0)?;
    // Another CPU may insert the same edge first: NOEXIST keeps its counts.
    let _ = NET_EDGES.insert(k, zero, BPF_NOEXIST as u64);
    if let Some(e) = NET_EDGES.get_ptr_mut(k) {
        return Some(e);
    }
    bump(counters::EDGES_FULL);
    warn!(
        &(),
        "net: the edge table is full: counting on the other edge"
    );
    NET_EDGES_OTHER.get_ptr_mut(c.direction as u32)
}

/// Adds what the socket did since it was last counted to edge `e`: an RTT sample, and the
/// bytes and retransmits since.
#[inline(always)]
fn account(sk: *const u8, c: &mut Conn, e: *mut NetEdge) {
    let tp = tcp_sock(sk);
    if tp.is_null() {
        return;
    }
    rtt(tp, e);
    let o = offsets();
    let acked: u64 = load(tp, o.tp_bytes_acked);
    let rcvd: u64 = load(tp, o.tp_bytes_received);
    let retrans: u32 = load(tp, o.tp_total_retrans);
    let sent = acked.saturating_sub(c.bytes_acked);
    let received = rcvd.saturating_sub(c.bytes_received);
    let retransmits = retrans.saturating_sub(c.total_retrans);
    c.bytes_acked = acked;
    c.bytes_received = rcvd;
    c.total_retrans = retrans;
    // SAFETY: as in `connected`.
    unsafe {
        if sent != 0 {
            atomic_add(&raw mut (*e).bytes_sent, sent);
        }
        if received != 0 {
            atomic_add(&raw mut (*e).bytes_received, received);
        }
        if retransmits != 0 {
            atomic_add(&raw mut (*e).retransmits, u64::from(retransmits));
        }
    }
}

/// Adds the socket's smoothed RTT (`tp`: the socket as a tcp_sock) to edge `e`.
#[inline(always)]
fn rtt(tp: *const u8, e: *mut NetEdge) {
    let rtt_ns = u64::from(load::<u32>(tp, offsets().tp_srtt_us) >> 3) * 1000;
    if rtt_ns == 0 {
        return;
    }
    // SAFETY: as in `connected`.
    unsafe {
        atomic_add(&raw mut (*e).rtt_sum_ns, rtt_ns);
        // The compiler knows an RTT's bucket is below 39 and drops the check, which the
        // verifier needs: read the index back opaquely so that the check stays.
        let b = log2_bucket(rtt_ns);
        let b = core::ptr::read_volatile(&b);
        if b < HIST_BUCKETS {
            atomic_add(&raw mut (*e).rtt_buckets[b], 1);
        }
    }
}

/// The socket's addresses and ports.
#[inline(always)]
fn read_tuple(sk: *const u8) -> Tuple {
    let o = offsets();
    let mut t = Tuple {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: load(sk, o.sock.skc_num),
        dport: u16::from_be(load::<u16>(sk, o.sock.skc_dport)),
        family: load(sk, o.sock.skc_family),
        _pad: 0,
    };
    if t.family == AF_INET {
        t.saddr[..4].copy_from_slice(&load::<u32>(sk, o.sock.skc_rcv_saddr).to_ne_bytes());
        t.daddr[..4].copy_from_slice(&load::<u32>(sk, o.sock.skc_daddr).to_ne_bytes());
    } else if t.family == AF_INET6 {
        t.saddr = load_in6(sk, o.sock.skc_v6_rcv_saddr);
        t.daddr = load_in6(sk, o.sock.skc_v6_daddr);
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
