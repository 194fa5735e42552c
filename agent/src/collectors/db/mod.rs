//! Database and cache queries into the store. The kernel counts and times every query in
//! `DB_STATS` under a statement key; this collector names the keys from the statement texts
//! the kernel sends while a key is new (operation, normalized fingerprint), registers them in
//! `DB_KNOWN` so that their text stops coming, and folds what the kernel counted into the
//! store every tick. Connection events name destinations and services; slow-query events,
//! the slow log.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agent_common::{
    db::{
        DbConnEvent, DbLossEvent, DbSettings, DbSlowEvent, DbStat, DbStatKey, DbTextEvent,
        EventKind, Outcome as KernelOutcome, DB_DRAIN_INTERVAL_MS, DB_KNOWN_ENTRIES,
    },
    HIST_BUCKETS,
};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, info, warn};

use super::services::Names;
use crate::{
    config::{Config, DbConfig},
    names::comm_str,
    probes::db::DbMaps,
    store::{
        db::{
            DbTables, LossKey, LossStats, OpKey, OpStats, Outcome, QueryRecord, Role, SlowQuery,
            System,
        },
        histogram::Log2Histogram,
        SharedStore,
    },
    untrusted::{strip_controls, LogField},
    wire::{mysql, pg, resp, sql},
};

// The connection event carries the family in a byte.
const AF_UNIX: u8 = agent_common::sock::af::UNIX as u8;
const AF_INET: u8 = agent_common::sock::af::INET as u8;
const AF_INET6: u8 = agent_common::sock::af::INET6 as u8;

/// Connections remembered (by socket and recognition time); the least recently used go first.
pub const MAX_CONNS: usize = 16_384;
/// Destinations and owners named (by the kernel's ids), each.
const MAX_NAMES: usize = 16_384;
/// Statement keys named: as many as the kernel's `DB_KNOWN` holds.
pub const MAX_KEYS: usize = DB_KNOWN_ENTRIES as usize;
/// Parsed request prefixes reused as they are (identical bytes, identical answer).
pub const MAX_PARSE_CACHE: usize = 1024;
/// Prepared statements remembered per PostgreSQL connection...
const MAX_STATEMENTS: usize = 256;
/// ...and over all connections: any local process can open connections that look like
/// PostgreSQL and prepare statements on them, so what they make the agent keep is bounded as
/// a whole. Past it, a Bind/Execute of a statement not kept is named `EXECUTE <name>`.
pub const MAX_STATEMENTS_TOTAL: usize = 8192;
/// How long counts wait for the text or connection event that names them (a full ring
/// delays those); then they are counted as `unknown`.
const NAME_WAIT: Duration = Duration::from_secs(3);
/// A `DB_STATS` entry unchanged for this long is removed from the kernel's table, to make
/// room (an increment in the instant between the last read and the removal would be lost:
/// the entry has been idle for this long).
const STATS_IDLE: Duration = Duration::from_secs(600);
/// How often the kernel's counts are folded into the store.
const FOLD_INTERVAL: Duration = Duration::from_millis(250);

/// Parsed requests by their exact bytes. Looked up by slice: a request allocates a key only
/// when it is new and worth keeping.
type ParseCache = HashMap<Box<[u8]>, (System, Arc<QueryInfo>)>;

/// What a request was, once parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryInfo {
    pub operation: Arc<str>,
    pub fingerprint: Arc<str>,
    /// What the slow log and `queries` show: the fingerprint, or the raw text if allowed.
    pub sample: Arc<str>,
    /// A Redis read: a null reply is a miss.
    pub read: bool,
    /// A round trip that runs no statement (PostgreSQL Parse/Describe + Sync): timed by the
    /// kernel, but not a query.
    pub runs: bool,
}

#[derive(Debug)]
struct ConnInfo {
    destination: Arc<str>,
    service: Arc<str>,
    comm: Arc<str>,
    statements: HashMap<String, Arc<QueryInfo>>,
    last_seen: Instant,
}

/// A named statement key.
#[derive(Debug)]
struct KeyInfo {
    info: Arc<QueryInfo>,
    /// The process that sent (client) or served (server) its text.
    process: (u32, Arc<str>),
}

/// What the store has of a `DB_STATS` entry.
#[derive(Debug, Clone, Copy)]
struct Folded {
    count: u64,
    sum_ns: u64,
    buckets: [u32; HIST_BUCKETS],
    /// Since when counts have waited for a name (see `NAME_WAIT`).
    waiting: Option<Instant>,
    /// When the count last changed.
    changed: Instant,
}

impl Folded {
    fn new(now: Instant) -> Self {
        Self {
            count: 0,
            sum_ns: 0,
            buckets: [0; HIST_BUCKETS],
            waiting: None,
            changed: now,
        }
    }
}

mod parse;
mod reader;
mod tracker;

use parse::*;
pub use reader::run_event_reader;
pub use tracker::Tracker;
