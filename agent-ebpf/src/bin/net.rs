//! TCP connection lifecycle: connect time and failures, accepts, lifetime, RTT, bytes and
//! retransmits, from the `sock:inet_sock_set_state` and `tcp:*` tracepoints (tp_btf).
//!
//! Nothing here runs per packet. State transitions happen a handful of times per connection;
//! RTT and byte counts are read from the socket itself at those transitions and, for live
//! connections, at most once per sample interval from `tcp_rcv_space_adjust` (which the
//! receive path calls about once per RTT, not per segment). Each connection's state lives in
//! an LRU hash keyed by the socket's address; every event carries byte and retransmit deltas
//! since the previous one, so userspace only adds.
//!
//! Kernel struct fields are read with `bpf_probe_read_kernel` at offsets that userspace
//! resolved from the running kernel's BTF (see `agent_common::net::NetOffsets`).
#![no_std]
#![no_main]

agent_ebpf::license!();

use agent_common::{
    net::{
        counters, direction, kind, NetConfig, NetEvent, MAX_TRACKED_CONNS, NET_HAVE_SK_CGROUP,
        NET_RINGBUF_BYTES, NET_WAKEUP_BYTES, PORT_SLOTS,
    },
    TASK_COMM_LEN,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;
const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The connection's addresses, kept from when they are complete: by the time a socket reaches
/// CLOSE the kernel may already have released its local port (`skc_num` reads 0).
#[repr(C)]
#[derive(Clone, Copy)]
struct Tuple {
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    family: u16,
    _pad: u16,
}

/// What we remember about a live connection.
#[repr(C)]
#[derive(Clone, Copy)]
struct Conn {
    start_ns: u64,
    last_sample_ns: u64,
    cgroup_id: u64,
    bytes_acked: u64,
    bytes_received: u64,
    pid: u32,
    total_retrans: u32,
    comm: [u8; TASK_COMM_LEN],
    tuple: Tuple,
    direction: u8,
    established: u8,
    _pad: [u8; 6],
}

#[map]
static NET_CONFIG: Array<NetConfig> = Array::with_max_entries(1, 0);

#[map]
static NET_CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(MAX_TRACKED_CONNS, 0);

#[map]
static NET_EVENTS: RingBuf = RingBuf::with_byte_size(NET_RINGBUF_BYTES, 0);

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

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn isa_net_retransmit(ctx: BtfTracePointContext) -> i32 {
    bump(counters::RETRANSMITS);
    let sk: *const u8 = ctx.arg(0);
    sample(sk, kind::RETRANSMIT, true);
    0
}

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
    if let Some(c) = NET_COUNTERS.get_ptr_mut(counter) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU.
        unsafe { *c += 1 };
    }
}

/// Reads a `T` at `base + off` from kernel memory (zero if unreadable).
#[inline(always)]
fn read<T: Default>(base: *const u8, off: u32) -> T {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one yields an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize).cast::<T>()) }
        .unwrap_or_default()
}

#[inline(always)]
fn config() -> Option<&'static NetConfig> {
    NET_CONFIG.get(0)
}

#[inline(always)]
fn ignored(port: u16) -> bool {
    matches!(NET_IGNORE_PORTS.get(port as u32), Some(v) if *v != 0)
}

#[inline(always)]
fn on_state(sk: *const u8, old: i32, new: i32) {
    let Some(cfg) = config() else { return };
    let o = &cfg.offsets;
    if read::<u16>(sk, o.sk_protocol) != IPPROTO_TCP {
        return;
    }
    let key = sk as u64;
    if new == TCP_SYN_SENT {
        // connect(): process context, so the current task is the one connecting.
        start(sk, cfg, direction::OUTBOUND, true);
    } else if old == TCP_SYN_SENT {
        // ESTABLISHED: connected; CLOSE: failed. (SYN_RECV, a simultaneous open, goes on to
        // ESTABLISHED from there and is not timed.)
        let Some(c) = NET_CONNS.get_ptr_mut(key) else {
            return;
        };
        let now = now_ns();
        // SAFETY: a value of our own map, valid for this program run.
        let c = unsafe { &mut *c };
        if new == TCP_ESTABLISHED {
            connected(sk, cfg, c, now);
        } else if new == TCP_CLOSE {
            let err: i32 = read(sk, o.sk_err);
            let elapsed = now.saturating_sub(c.start_ns);
            emit(sk, cfg, c, kind::CONNECT_FAILED, elapsed, err);
            let _ = NET_CONNS.remove(key);
        }
    } else if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        if let Some(c) = NET_CONNS.get_ptr_mut(key) {
            // A simultaneous open: our own connect, through SYN_RECV.
            // SAFETY: a value of our own map, valid for this program run.
            let c = unsafe { &mut *c };
            if c.established == 0 {
                connected(sk, cfg, c, now_ns());
            }
            return;
        }
        // The child socket of a listener completed its handshake (softirq context).
        if let Some(c) = start(sk, cfg, direction::INBOUND, false) {
            // SAFETY: a value of our own map, valid for this program run.
            let c = unsafe { &mut *c };
            c.established = 1;
            emit(sk, cfg, c, kind::ACCEPT, 0, 0);
        }
    } else if new == TCP_CLOSE {
        let Some(c) = NET_CONNS.get_ptr_mut(key) else {
            return;
        };
        // SAFETY: a value of our own map, valid for this program run.
        let c = unsafe { &mut *c };
        if c.established != 0 {
            let lifetime = now_ns().saturating_sub(c.start_ns);
            emit(sk, cfg, c, kind::CLOSE, lifetime, 0);
        }
        let _ = NET_CONNS.remove(key);
    }
}

/// An outbound connect completed: time it, and from now on time the connection's life.
#[inline(always)]
fn connected(sk: *const u8, cfg: &NetConfig, c: &mut Conn, now: u64) {
    let elapsed = now.saturating_sub(c.start_ns);
    // connect() enters SYN_SENT before it picks the local port: read the addresses again.
    c.tuple = read_tuple(sk, cfg);
    c.start_ns = now;
    c.established = 1;
    c.last_sample_ns = now;
    emit(sk, cfg, c, kind::CONNECT, elapsed, 0);
}

/// Starts tracking a connection (unless one of its ports is ignored).
#[inline(always)]
fn start(sk: *const u8, cfg: &NetConfig, dir: u8, process_context: bool) -> Option<*mut Conn> {
    let tuple = read_tuple(sk, cfg);
    if ignored(tuple.sport) || ignored(tuple.dport) {
        return None;
    }
    let mut cgroup_id = sock_cgroup(sk, cfg);
    let (mut pid, mut comm) = (0u32, [0u8; TASK_COMM_LEN]);
    if process_context {
        pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        comm = bpf_get_current_comm().unwrap_or_default();
        if cgroup_id == 0 {
            // SAFETY: no preconditions.
            cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        }
    }
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
        established: 0,
        _pad: [0; 6],
    };
    let key = sk as u64;
    if NET_CONNS.insert(key, conn, 0).is_err() {
        bump(counters::TRACK_FAILED);
        return None;
    }
    NET_CONNS.get_ptr_mut(key)
}

/// The cgroup (v2) the socket was created in: `sk->sk_cgrp_data.cgroup->kn->id`.
#[inline(always)]
fn sock_cgroup(sk: *const u8, cfg: &NetConfig) -> u64 {
    if cfg.flags & NET_HAVE_SK_CGROUP == 0 {
        return 0;
    }
    let o = &cfg.offsets;
    let cgrp: *const u8 = read::<u64>(sk, o.sk_cgroup) as *const u8;
    if cgrp.is_null() {
        return 0;
    }
    let kn: *const u8 = read::<u64>(cgrp, o.cgroup_kn) as *const u8;
    if kn.is_null() {
        return 0;
    }
    read(kn, o.kn_id)
}

/// A live-connection sample or a retransmit: RTT and byte deltas, rate-limited per connection
/// (retransmits are always reported: they are what the user is looking for).
#[inline(always)]
fn sample(sk: *const u8, what: u8, always: bool) {
    let Some(c) = NET_CONNS.get_ptr_mut(sk as u64) else {
        return;
    };
    // SAFETY: a value of our own map, valid for this program run.
    let c = unsafe { &mut *c };
    if c.established == 0 {
        return;
    }
    let Some(cfg) = config() else { return };
    let now = now_ns();
    if !always && now.saturating_sub(c.last_sample_ns) < cfg.sample_interval_ns {
        return;
    }
    c.last_sample_ns = now;
    emit(sk, cfg, c, what, 0, 0);
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Wake the reader only once a batch has built up: a wakeup per event would cost more than the
/// event on a host that opens tens of thousands of connections a second. Userspace also drains
/// the ring on a short timer, so a trickle of events is never stranded.
#[inline(always)]
fn wakeup_flags() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    if NET_EVENTS.query(BPF_RB_AVAIL_DATA) >= NET_WAKEUP_BYTES as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn read_tuple(sk: *const u8, cfg: &NetConfig) -> Tuple {
    let o = &cfg.offsets;
    let family: u16 = read(sk, o.skc_family);
    let mut t = Tuple {
        saddr: [0; 16],
        daddr: [0; 16],
        sport: read(sk, o.skc_num),
        dport: u16::from_be(read::<u16>(sk, o.skc_dport)),
        family,
        _pad: 0,
    };
    if family == AF_INET6 {
        t.saddr = read(sk, o.skc_v6_rcv_saddr);
        t.daddr = read(sk, o.skc_v6_daddr);
    } else if family == AF_INET {
        let s: [u8; 4] = read(sk, o.skc_rcv_saddr);
        let d: [u8; 4] = read(sk, o.skc_daddr);
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    }
    t
}

/// Writes one event for `c`, with counters read from the socket now and deltas against what
/// the previous event of this connection reported.
#[inline(always)]
fn emit(sk: *const u8, cfg: &NetConfig, c: &mut Conn, what: u8, duration_ns: u64, error: i32) {
    let Some(mut entry) = NET_EVENTS.reserve::<NetEvent>(0) else {
        bump(counters::DROPS);
        return;
    };
    let o = &cfg.offsets;
    let acked: u64 = read(sk, o.tp_bytes_acked);
    let received: u64 = read(sk, o.tp_bytes_received);
    let retrans: u32 = read(sk, o.tp_total_retrans);
    let ev = NetEvent {
        ts_ns: now_ns(),
        sock: sk as u64,
        cgroup_id: c.cgroup_id,
        duration_ns,
        bytes_sent: acked.saturating_sub(c.bytes_acked),
        bytes_received: received.saturating_sub(c.bytes_received),
        saddr: c.tuple.saddr,
        daddr: c.tuple.daddr,
        pid: c.pid,
        srtt_us: read::<u32>(sk, o.tp_srtt_us) >> 3,
        retransmits: retrans.saturating_sub(c.total_retrans),
        error,
        sport: c.tuple.sport,
        dport: c.tuple.dport,
        family: c.tuple.family,
        kind: what,
        direction: c.direction,
        comm: c.comm,
    };
    c.bytes_acked = acked;
    c.bytes_received = received;
    c.total_retrans = retrans;
    entry.write(ev);
    entry.submit(wakeup_flags());
    bump(counters::EVENTS);
}
