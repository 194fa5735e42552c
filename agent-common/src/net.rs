//! Network probe (`insite-net`): what the kernel counts per connection edge, the connections
//! it tracks, and the kernel-struct offsets the programs read them with.
//!
//! Our kernel programs have no CO-RE relocations (Rust BPF has no `preserve_access_index`), so
//! userspace resolves the offsets of the few `struct sock`/`tcp_sock` fields we need from the
//! running kernel's BTF and hands them over in [`NetOffsets`].

use crate::TASK_COMM_LEN;

/// Connections tracked at once; beyond it new connections go untracked (counted).
pub const MAX_TRACKED_CONNS: u32 = 65_536;
/// Entries of the kernel's edge table as compiled; userspace sizes it from `net.max_edges`
/// at load.
pub const NET_EDGES_DEFAULT: u32 = 2048;
/// One byte per port: non-zero means "do not track connections to or from this port".
pub const PORT_SLOTS: u32 = 65_536;

/// [`NetEdgeKey::direction`], [`NetConn::direction`].
pub mod direction {
    pub const OUTBOUND: u8 = 1;
    pub const INBOUND: u8 = 2;
}

/// Indices into the per-CPU `NET_COUNTERS` array.
pub mod counters {
    /// Connection updates counted in `NET_EDGES_OTHER` because `NET_EDGES` was full.
    pub const EDGES_FULL: u32 = 0;
    /// Connections whose socket carried a new connection while the kernel still tracked the
    /// old one (its end went unseen): ended then, counted as reconciled on their edge.
    pub const REUSED: u32 = 1;
    /// Retransmitted segments, all sockets (tracked or not).
    pub const RETRANSMITS: u32 = 2;
    /// Resets sent.
    pub const RESETS_SENT: u32 = 3;
    /// Resets received.
    pub const RESETS_RECEIVED: u32 = 4;
    /// Connections that could not be tracked (the connection map was full).
    pub const TRACK_FAILED: u32 = 5;
    /// Tracked connections still in the map when their socket was destroyed: the state hook
    /// missed their end (a run the kernel skipped), so the close or failure was counted then.
    pub const ENDED_AT_DESTROY: u32 = 6;
    pub const COUNT: u32 = 7;
}

/// Why a connect failed, as an index into [`NetEdge::failures`] (the order of the agent's
/// `FailureReason`): refused, timed out, reset, unreachable, aborted, other.
pub const FAILURE_REASONS: usize = 6;

/// The failure index of a socket error (positive errno; 0: the application gave up first).
#[inline(always)]
pub fn failure_index(err: i32) -> usize {
    match err {
        111 => 0,                   // ECONNREFUSED
        110 => 1,                   // ETIMEDOUT
        104 => 2,                   // ECONNRESET
        100 | 101 | 112 | 113 => 3, // ENETDOWN, ENETUNREACH, EHOSTDOWN, EHOSTUNREACH
        0 => 4,
        _ => 5,
    }
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
    /// The family and the two ends, as the database probe reads them too.
    pub sock: crate::sock::SockOffsets,
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
    /// The number of the walk over the sockets now running (see [`NetConn::walk`]).
    pub walk_gen: u64,
}

/// Where the kernel counts a connection: who (cgroup and command name: the service) talks to
/// whom (the peer's address) through which destination (the remote address and port for
/// outbound connections, the local address and listening port for inbound ones). Addresses
/// are as on the wire; IPv4 ones sit in the first four bytes. The key of `NET_EDGES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetEdgeKey {
    pub cgroup_id: u64,
    /// The connecting task's command name (outbound; zero for inbound, whose handshake
    /// completes in softirq context).
    pub comm: [u8; TASK_COMM_LEN],
    pub peer: [u8; 16],
    pub dest: [u8; 16],
    /// The destination port (host byte order).
    pub dport: u16,
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// [`direction`].
    pub direction: u8,
    pub _pad: [u8; 3],
}

/// What the kernel counted on one edge since it entered `NET_EDGES`, updated with atomic
/// adds from every CPU. Userspace takes differences each tick (wrapping, for the 32-bit
/// fields).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetEdge {
    /// Handshakes completed: outbound connects, inbound accepts.
    pub connects: u64,
    /// Tracked connections that closed (seen by the state or the destroy hook).
    pub closes: u64,
    /// Summed lifetime of the closed connections, in ns.
    pub lifetime_ns: u64,
    /// Bytes acknowledged by the peer (SYN and FIN count one each, as in tcp_info).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub retransmits: u64,
    /// Tracked connections ended because their socket carried a new one ([`counters::REUSED`]).
    /// Open now: `connects - closes - reconciled` (one fewer atomic add per handshake and
    /// per end than a gauge of its own).
    pub reconciled: u64,
    /// Summed SYN -> ESTABLISHED times of `connect_buckets`, in ns.
    pub connect_sum_ns: u64,
    /// Summed smoothed RTTs of `rtt_buckets`, in ns.
    pub rtt_sum_ns: u64,
    /// Failed connects by reason ([`failure_index`]).
    pub failures: [u32; FAILURE_REASONS],
    /// The last process that completed a connect on this edge (0: none, or inbound).
    pub last_pid: u32,
    pub _pad: [u32; 3],
    /// log2 buckets of the connect times in ns (see [`crate::log2_bucket`]).
    pub connect_buckets: [u32; crate::HIST_BUCKETS],
    /// log2 buckets of the RTT samples in ns: one at each handshake, close and live sample.
    pub rtt_buckets: [u32; crate::HIST_BUCKETS],
}

impl Default for NetEdge {
    fn default() -> Self {
        Self {
            connects: 0,
            closes: 0,
            lifetime_ns: 0,
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            reconciled: 0,
            connect_sum_ns: 0,
            rtt_sum_ns: 0,
            failures: [0; FAILURE_REASONS],
            last_pid: 0,
            _pad: [0; 3],
            connect_buckets: [0; crate::HIST_BUCKETS],
            rtt_buckets: [0; crate::HIST_BUCKETS],
        }
    }
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
    /// When the connect started (CONNECTING), then when it was established (ESTABLISHED), on
    /// the kernel's monotonic clock.
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
    pub _pad: [u8; 2],
    /// The last walk over the sockets that found this connection's socket alive
    /// ([`NetConfig::walk_gen`]): userspace ends entries that walks stop finding.
    pub walk: u32,
}

impl NetConn {
    /// The edge this connection counts on.
    #[inline(always)]
    pub fn edge_key(&self) -> NetEdgeKey {
        let t = &self.tuple;
        let (dest, dport) = if self.direction == direction::OUTBOUND {
            (t.daddr, t.dport)
        } else {
            (t.saddr, t.sport)
        };
        NetEdgeKey {
            cgroup_id: self.cgroup_id,
            comm: self.comm,
            peer: t.daddr,
            dest,
            dport,
            family: t.family,
            direction: self.direction,
            _pad: [0; 3],
        }
    }
}

const _: () = assert!(core::mem::size_of::<NetOffsets>() == 18 * 4);
const _: () = assert!(core::mem::size_of::<NetTuple>() == 32 + 4 * 2);
const _: () = assert!(core::mem::size_of::<NetConn>() == 5 * 8 + 2 * 4 + 16 + 40 + 8);
const _: () = assert!(core::mem::size_of::<NetConfig>() == 16);
const _: () = assert!(core::mem::size_of::<NetEdgeKey>() == 8 + 16 * 3 + 2 * 2 + 4);
const _: () =
    assert!(core::mem::size_of::<NetEdge>() == 9 * 8 + 10 * 4 + 2 * 4 * crate::HIST_BUCKETS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::NetConfig {}
    unsafe impl aya::Pod for super::NetOffsets {}
    unsafe impl aya::Pod for super::NetEdgeKey {}
    unsafe impl aya::Pod for super::NetEdge {}
    unsafe impl aya::Pod for super::NetConn {}
}
