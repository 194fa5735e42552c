//! Database and cache probe (`insite-db`): queries to PostgreSQL, MySQL/MariaDB and Redis timed
//! off the wire, from socket reads and writes (TCP and unix-domain sockets alike).
//!
//! The kernel recognises the protocol from a connection's bytes, matches every request to its
//! response (several may be in flight), times it and counts it in `DB_STATS` under
//! [`DbStatKey`]: (service's cgroup, destination, statement key, system, role, outcome), with a
//! log2 latency histogram. The statement key is a hash of the request's first bytes with
//! literals skipped, so that every run of one statement shares it.
//!
//! Events carry only what counts cannot: a connection was recognised ([`DbConnEvent`], names
//! its destination and service), a statement key userspace has not registered in `DB_KNOWN`
//! was sent, with its text ([`DbTextEvent`]), a request took longer than its system's
//! threshold ([`DbSlowEvent`]: request and completion in one record), and requests could not be
//! timed or bytes not decoded ([`DbLossEvent`]). A full ring delays names and the slow log; it
//! never changes a count.

use crate::TASK_COMM_LEN;

/// Ring buffer of query events.
pub const DB_RINGBUF_BYTES: u32 = 8 << 20;
/// Bytes of each request handed to userspace.
pub const DB_PREFIX_LEN: usize = 256;
/// Requests in flight per connection (a power of two); more are counted, not timed.
pub const DB_INFLIGHT: usize = 64;
/// Bytes of a unix socket's path kept for naming the destination.
pub const DB_PATH_LEN: usize = 108;
/// How often userspace drains the ring without being woken.
pub const DB_DRAIN_INTERVAL_MS: u64 = 100;
/// Entries of `DB_STATS`: (cgroup, destination, statement, system, role, outcome) series.
pub const DB_STATS_ENTRIES: u32 = 8192;
/// Entries of `DB_STATS_OTHER`: series (without the statement) counted there when `DB_STATS`
/// is full. Past both, a completion is counted in `counters::STATS_FULL` only.
pub const DB_STATS_OTHER_ENTRIES: u32 = 2048;
/// Statement keys userspace has named (`DB_KNOWN`, least recently used go first: their text
/// is then sent again).
pub const DB_KNOWN_ENTRIES: u32 = 16_384;
/// Steps the kernel walks per read or write (RESP: a header byte or a jump over a bulk
/// payload; PostgreSQL and MySQL: a message). Past it the rest of the read or write is not
/// decoded: counted in [`DbLossEvent::bytes`] and the requests in flight dropped, counted.
pub const DB_MAX_STEPS: u32 = 1 << 18;

/// [`DbConnEvent::system`] and friends.
pub mod system {
    pub const POSTGRESQL: u8 = 1;
    pub const MYSQL: u8 = 2;
    pub const REDIS: u8 = 3;
}

/// Which end of the connection this host's socket is.
pub mod role {
    /// Sends requests, receives responses.
    pub const CLIENT: u8 = 1;
    /// Receives requests, sends responses.
    pub const SERVER: u8 = 2;
}

/// [`DbStatKey::outcome`], [`DbSlowEvent::outcome`].
pub mod outcome {
    pub const OK: u8 = 0;
    /// PostgreSQL `ErrorResponse`, MySQL `ERR` packet, Redis `-` reply.
    pub const ERROR: u8 = 1;
    /// A Redis null reply (`$-1`, `*-1`, RESP3 `_`): a miss when the command was a read.
    pub const NULL: u8 = 2;
    /// A PostgreSQL pipelined statement the server skipped after an earlier error.
    pub const SKIPPED: u8 = 3;
    /// Counted when sent, not timed: `DB_INFLIGHT` were already in flight (no outcome).
    pub const UNTIMED: u8 = 4;
}

/// The protocol walkers: each its own program, tail-called through `DB_WALKERS` at its index.
pub mod walker {
    pub const PG: u32 = 0;
    pub const MYSQL: u32 = 1;
    pub const RESP_REQ: u32 = 2;
    pub const RESP_RESP: u32 = 3;
    /// Slots of `DB_WALKERS`.
    pub const COUNT: u32 = 4;
    /// The walker programs' names, by index.
    pub const PROGRAMS: [&str; COUNT as usize] = [
        "isa_db_walk_pg",
        "isa_db_walk_mysql",
        "isa_db_walk_resp_req",
        "isa_db_walk_resp_resp",
    ];
}

/// Event kinds: the first byte of every event.
pub mod kind {
    pub const CONN: u8 = 1;
    pub const TEXT: u8 = 2;
    pub const SLOW: u8 = 3;
    pub const LOSS: u8 = 4;
}

/// A request's [`outcome`] code, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Null,
    Skipped,
    Untimed,
}

impl TryFrom<u8> for Outcome {
    /// The code, unknown.
    type Error = u8;

    fn try_from(code: u8) -> Result<Self, u8> {
        match code {
            outcome::OK => Ok(Self::Ok),
            outcome::ERROR => Ok(Self::Error),
            outcome::NULL => Ok(Self::Null),
            outcome::SKIPPED => Ok(Self::Skipped),
            outcome::UNTIMED => Ok(Self::Untimed),
            _ => Err(code),
        }
    }
}

/// An event's [`kind`] byte, named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Conn,
    Text,
    Slow,
    Loss,
}

impl TryFrom<u8> for EventKind {
    /// The byte, unknown.
    type Error = u8;

    fn try_from(code: u8) -> Result<Self, u8> {
        match code {
            kind::CONN => Ok(Self::Conn),
            kind::TEXT => Ok(Self::Text),
            kind::SLOW => Ok(Self::Slow),
            kind::LOSS => Ok(Self::Loss),
            _ => Err(code),
        }
    }
}

/// Indices into the per-CPU `DB_COUNTERS` array.
pub mod counters {
    /// Events written to the ring buffer.
    pub const EVENTS: u32 = 0;
    /// Events lost because the ring buffer was full.
    pub const DROPS: u32 = 1;
    /// Requests not timed because `DB_INFLIGHT` were already in flight on the connection.
    pub const INFLIGHT_FULL: u32 = 2;
    /// Times a connection's framing was lost (bytes that fit no message); its requests in
    /// flight are dropped and it resynchronises on a later read or write.
    pub const DESYNC: u32 = 3;
    /// Connections recognised.
    pub const CONNS: u32 = 4;
    /// Connections whose state could not be allocated.
    pub const STORAGE_FAILED: u32 = 5;
    /// Connections that switched to TLS (not decoded).
    pub const TLS: u32 = 6;
    /// Timed requests dropped when their connection's framing was lost.
    pub const LOST_DESYNC: u32 = 7;
    /// Completions not counted because `DB_STATS` was full.
    pub const STATS_FULL: u32 = 8;
    /// Bytes of reads and writes left undecoded (after a desync, or past `DB_MAX_STEPS`).
    pub const BYTES_NOT_DECODED: u32 = 9;
    /// Reads and writes whose walk stopped at `DB_MAX_STEPS`.
    pub const STEP_CAP: u32 = 10;
    /// Sockets decided not to be database connections (`DB_GIVE_UP` unrecognised reads and
    /// writes).
    pub const GAVE_UP: u32 = 11;
    /// Statement texts sent (the key was not in `DB_KNOWN`).
    pub const TEXTS: u32 = 12;
    /// Slow-query events lost to a full ring buffer (the query is counted all the same).
    pub const SLOW_LOST: u32 = 13;
    pub const COUNT: u32 = 14;
}

/// Reads and writes of a socket that fit no database protocol before the probe stops looking
/// at it: its later ones cost the hook and two storage lookups. A connection open before the
/// agent started is joined at its first recognisable request, which a request/response
/// protocol sends within a few reads and writes.
pub const DB_GIVE_UP: u32 = 16;

/// [`DbOffsets::flags`]: `unix_sock` offsets are valid.
pub const DB_HAVE_UNIX: u32 = 1;

/// Kernel struct member offsets, resolved by userspace from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbOffsets {
    pub flags: u32,
    /// `sock.sk_type` (u16).
    pub sk_type: u32,
    /// The family and the two ends, as the network probe reads them too.
    pub sock: crate::sock::SockOffsets,
    /// `unix_sock.addr` (struct unix_address *).
    pub unix_addr: u32,
    /// `unix_sock.peer` (struct sock *).
    pub unix_peer: u32,
    /// `unix_address.name` (struct sockaddr_un[]).
    pub unix_address_name: u32,
    /// `unix_address.len` (int).
    pub unix_address_len: u32,
    /// Not an offset but a load-time setting like them: the roles followed, `DB_ROLE_*` bits
    /// (`db.roles`); 0 is both.
    pub roles: u32,
}

/// [`DbOffsets::roles`]: follow the end that sends requests.
pub const DB_ROLE_CLIENT: u32 = 1 << 0;
/// [`DbOffsets::roles`]: follow the end that receives them.
pub const DB_ROLE_SERVER: u32 = 1 << 1;

/// A connection was recognised (or changed owner). Carries who and where.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbConnEvent {
    pub kind: u8,
    pub system: u8,
    pub role: u8,
    /// AF_INET, AF_INET6 or AF_UNIX.
    pub family: u8,
    pub pid: u32,
    /// The socket's address: with `conn_id`, names the connection.
    pub sk: u64,
    /// The time the connection was recognised: tells reused socket addresses apart.
    pub conn_id: u64,
    pub cgroup_id: u64,
    pub comm: [u8; TASK_COMM_LEN],
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Bytes of `path` that are valid.
    pub path_len: u32,
    /// The unix socket's path (the server's listening path, seen from either end).
    pub path: [u8; DB_PATH_LEN],
    pub _pad: u32,
    /// The destination's id in [`DbStatKey::dest`].
    pub dest: u64,
    /// The owner's id in [`DbStatKey::owner`] (from `cgroup_id` and `comm`).
    pub owner: u64,
}

/// A request whose statement key userspace has not named yet, with its first bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbTextEvent {
    pub kind: u8,
    pub system: u8,
    pub role: u8,
    pub _pad: u8,
    pub pid: u32,
    pub sk: u64,
    pub conn_id: u64,
    /// The statement key the kernel counts it under.
    pub key: u64,
    /// Bytes of the request in this read or write, from its first byte (PostgreSQL: the first
    /// message of the request, MySQL: the command byte, Redis: the command).
    pub len: u32,
    /// Bytes of `prefix` that are valid.
    pub prefix_len: u32,
    pub prefix: [u8; DB_PREFIX_LEN],
}

/// A request that took at least its system's slow threshold: request and completion in one.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbSlowEvent {
    pub kind: u8,
    pub system: u8,
    pub role: u8,
    pub outcome: u8,
    pub pid: u32,
    pub sk: u64,
    pub conn_id: u64,
    pub key: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Where `DB_STATS` counts a request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DbStatKey {
    /// Who owns the connection: a hash of its owner's cgroup and command name when it was
    /// recognised or last changed owner (what names its service).
    pub owner: u64,
    /// The destination (see [`DbConnEvent::dest`]).
    pub dest: u64,
    /// The statement key (see [`DbTextEvent::key`]).
    pub key: u64,
    pub system: u8,
    pub role: u8,
    /// `outcome::*`.
    pub outcome: u8,
    pub _pad: [u8; 5],
}

/// Requests counted under one [`DbStatKey`] since the probe was loaded. Updated with atomic
/// adds from every CPU; `buckets` wrap (userspace takes wrapping differences each tick).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbStat {
    pub count: u64,
    pub sum_ns: u64,
    /// log2 buckets of the duration in ns (see [`crate::log2_bucket`]).
    pub buckets: [u32; crate::HIST_BUCKETS],
}

impl Default for DbStat {
    fn default() -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; crate::HIST_BUCKETS],
        }
    }
}

/// Settings userspace may change while the probe runs (`DB_SETTINGS[0]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbSettings {
    /// Slow-query thresholds in ns, by `system::*` (index 0 unused); 0 sends no slow events.
    pub slow_ns: [u64; 4],
    /// Bumped by userspace whenever it forgets keys (removes them from `DB_KNOWN`): a
    /// connection's memory of the last key found there is good for one generation only.
    pub known_gen: u64,
}

/// Requests of a connection the kernel could not time, and bytes it could not decode, since
/// its previous loss event. Sent at the end of a read or write that had any (kept on the
/// connection and sent later if the ring is full). Every request the walker identifies is
/// counted in `DB_STATS` (timed, or untimed) or, if a desync dropped it, here.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DbLossEvent {
    pub kind: u8,
    pub system: u8,
    pub role: u8,
    pub _pad: u8,
    pub pid: u32,
    pub sk: u64,
    pub conn_id: u64,
    /// Requests not timed: `DB_INFLIGHT` were already in flight. Their responses are matched
    /// (and dropped) in order, so later requests keep their own.
    pub untimed: u32,
    /// Timed requests in flight dropped because the framing was lost (untimed ones in flight
    /// then are counted in `untimed` already).
    pub desync: u32,
    /// Completions not counted: `DB_STATS` was full.
    pub event_lost: u32,
    pub _pad2: u32,
    /// Bytes not decoded: the rest of a read or write after a desync or past the step cap.
    pub bytes: u64,
    /// The timed requests a desync dropped: sequence numbers `dropped_from..dropped_to`
    /// (counted in no series).
    pub dropped_from: u64,
    pub dropped_to: u64,
}

const _: () = assert!(core::mem::size_of::<DbOffsets>() == 14 * 4);
const _: () = assert!(core::mem::size_of::<DbLossEvent>() == 8 + 2 * 8 + 4 * 4 + 3 * 8);
const _: () = assert!(
    core::mem::size_of::<DbConnEvent>()
        == 8 + 3 * 8 + 16 + 32 + 2 * 2 + 4 + DB_PATH_LEN + 4 + 2 * 8
);
const _: () = assert!(core::mem::size_of::<DbTextEvent>() == 8 + 3 * 8 + 8 + DB_PREFIX_LEN);
const _: () = assert!(core::mem::size_of::<DbSlowEvent>() == 8 + 5 * 8);
const _: () = assert!(core::mem::size_of::<DbStatKey>() == 32);
const _: () = assert!(core::mem::size_of::<DbStat>() == 16 + 4 * crate::HIST_BUCKETS);
const _: () = assert!(core::mem::size_of::<DbSettings>() == 40);
const _: () = assert!(DB_INFLIGHT.is_power_of_two());

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::DbOffsets {}
    unsafe impl aya::Pod for super::DbConnEvent {}
    unsafe impl aya::Pod for super::DbTextEvent {}
    unsafe impl aya::Pod for super::DbSlowEvent {}
    unsafe impl aya::Pod for super::DbStatKey {}
    unsafe impl aya::Pod for super::DbStat {}
    unsafe impl aya::Pod for super::DbSettings {}
    unsafe impl aya::Pod for super::DbLossEvent {}
}
