//! Network probe (`insite-net`): TCP connection lifecycle events and the kernel-struct offsets
//! the programs read them with.
//!
//! Our kernel programs have no CO-RE relocations (Rust BPF has no `preserve_access_index`), so
//! userspace resolves the offsets of the few `struct sock`/`tcp_sock` fields we need from the
//! running kernel's BTF and hands them over in [`NetOffsets`].

use crate::TASK_COMM_LEN;

/// Connections tracked at once; beyond it new connections go untracked (counted).
pub const MAX_TRACKED_CONNS: u32 = 65_536;
/// Ring buffer of connection events.
pub const NET_RINGBUF_BYTES: u32 = 1 << 20;
/// How often userspace drains the ring without being woken.
pub const NET_DRAIN_INTERVAL_MS: u64 = 100;
/// One byte per port: non-zero means "do not track connections to or from this port".
pub const PORT_SLOTS: u32 = 65_536;

/// Event kinds ([`NetEvent::kind`]).
pub mod kind {
    /// An outbound connect reached ESTABLISHED; `duration_ns` is SYN sent -> ESTABLISHED.
    pub const CONNECT: u8 = 1;
    /// An outbound connect ended before ESTABLISHED; `error` is the socket error
    /// (ECONNREFUSED, ETIMEDOUT, ...; 0 when the application gave up first).
    pub const CONNECT_FAILED: u8 = 2;
    /// An inbound connection completed its handshake on a listening port.
    pub const ACCEPT: u8 = 3;
    /// A tracked connection closed; `duration_ns` is its lifetime since ESTABLISHED.
    pub const CLOSE: u8 = 4;
    /// A periodic sample of a live connection (RTT and the bytes since the last event).
    pub const SAMPLE: u8 = 5;
    /// A segment of a tracked connection was retransmitted.
    pub const RETRANSMIT: u8 = 6;
}

/// [`NetEvent::direction`].
pub mod direction {
    pub const OUTBOUND: u8 = 1;
    pub const INBOUND: u8 = 2;
}

/// Indices into the per-CPU `NET_COUNTERS` array.
pub mod counters {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPS: u32 = 1;
    /// Retransmitted segments, all sockets (tracked or not).
    pub const RETRANSMITS: u32 = 2;
    /// Resets sent.
    pub const RESETS_SENT: u32 = 3;
    /// Resets received.
    pub const RESETS_RECEIVED: u32 = 4;
    /// Connections that could not be tracked (the connection map was full).
    pub const TRACK_FAILED: u32 = 5;
    /// Tracked connections still in the map when their socket was destroyed: the state hook
    /// missed their end (a run the kernel skipped), so the close or failure was reported then.
    pub const ENDED_AT_DESTROY: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// [`NetConn::state`].
pub mod conn_state {
    /// An outbound connect in progress (SYN sent, no answer yet).
    pub const CONNECTING: u8 = 1;
    /// Connected (outbound) or accepted (inbound) at `start_ns`.
    pub const ESTABLISHED: u8 = 2;
}

/// [`NetOffsets::flags`]: the socket's cgroup can be read (`sk_cgrp_data.cgroup->kn->id`).
pub const NET_HAVE_SK_CGROUP: u32 = 1;

/// Byte offsets of kernel struct fields, from the running kernel's BTF, handed to the programs
/// as the read-only global `NET_OFFSETS`. All `sk_*`/`skc_*` offsets are from the start of
/// `struct sock`; `tp_*` from the start of `struct tcp_sock` (the same pointer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetOffsets {
    /// NET_HAVE_SK_CGROUP when the socket-cgroup chain below was found.
    pub flags: u32,
    pub sk_err: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    pub tp_srtt_us: u32,
    pub tp_bytes_acked: u32,
    pub tp_bytes_received: u32,
    pub tp_total_retrans: u32,
    /// `sock.sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sk_cgroup: u32,
    /// `cgroup.kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (the cgroup id).
    pub kn_id: u32,
    /// `sock.sk_socket`: NULL on a listener's child until it is accepted.
    pub sk_socket: u32,
    /// `sock_common.skc_state` (u8): the walk over the sockets skips all but ESTABLISHED
    /// before any lookup (TIME_WAIT ones can be most of a busy host's).
    pub skc_state: u32,
}

/// Settings userspace may change while the probe runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// A live connection is sampled (RTT, bytes) at most this often.
    pub sample_interval_ns: u64,
}

/// One connection event. Addresses are as on the wire (network byte order); IPv4 addresses
/// sit in the first four bytes. `s*` is the local end, `d*` the remote end, in both
/// directions.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    pub ts_ns: u64,
    /// The socket's kernel address: identifies the connection while it lives.
    pub sock: u64,
    pub cgroup_id: u64,
    /// Connect time (CONNECT, CONNECT_FAILED) or lifetime (CLOSE), in ns.
    pub duration_ns: u64,
    /// Bytes acknowledged by the peer since this connection's previous event.
    pub bytes_sent: u64,
    /// Bytes received since this connection's previous event.
    pub bytes_received: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The process that connected (outbound; 0 for inbound: the handshake completes in
    /// softirq context, so the owner is known by its cgroup only).
    pub pid: u32,
    /// Smoothed RTT in microseconds (0: no sample).
    pub srtt_us: u32,
    /// Retransmits since this connection's previous event.
    pub retransmits: u32,
    /// Socket error (positive errno) for CONNECT_FAILED.
    pub error: i32,
    /// Local port (host byte order).
    pub sport: u16,
    /// Remote port (host byte order).
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    pub kind: u8,
    pub direction: u8,
    pub comm: [u8; TASK_COMM_LEN],
}

/// A connection's addresses, kept from when they are complete: by the time a socket reaches
/// CLOSE the kernel may already have released its local port (`skc_num` reads 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Local port (host byte order).
    pub sport: u16,
    /// Remote port (host byte order).
    pub dport: u16,
    pub family: u16,
    pub _pad: u16,
}

/// A tracked connection, the value of the kernel's `NET_CONNS` map (keyed by the socket's
/// address). Userspace reads the map to reconcile its view of open connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetConn {
    /// When the connect started (CONNECTING), then when it was established (ESTABLISHED):
    /// the `ts_ns` of its CONNECT or ACCEPT event, so (socket, start_ns) names a connection.
    pub start_ns: u64,
    pub last_sample_ns: u64,
    pub cgroup_id: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub pid: u32,
    pub total_retrans: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub tuple: NetTuple,
    /// [`direction`].
    pub direction: u8,
    /// [`conn_state`].
    pub state: u8,
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<NetOffsets>() == 18 * 4);
const _: () = assert!(core::mem::size_of::<NetTuple>() == 32 + 4 * 2);
const _: () = assert!(core::mem::size_of::<NetConn>() == 5 * 8 + 2 * 4 + 16 + 40 + 8);
const _: () = assert!(core::mem::size_of::<NetConfig>() == 8);
const _: () = assert!(core::mem::size_of::<NetEvent>() == 6 * 8 + 32 + 4 * 4 + 4 * 2 + 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::NetConfig {}
    unsafe impl aya::Pod for super::NetOffsets {}
    unsafe impl aya::Pod for super::NetEvent {}
    unsafe impl aya::Pod for super::NetConn {}
}
