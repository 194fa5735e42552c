//! Query events from the kernel ring buffer into the store: each request's bytes are parsed
//! (operation, normalized fingerprint) and joined with its completion by (connection, sequence
//! number); the kernel's two timestamps give the duration.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use agent_common::db::{
    kind, outcome, DbConnEvent, DbLossEvent, DbRequestEvent, DbResponseEvent, DB_DRAIN_INTERVAL_MS,
    DB_MAX_RUN,
};
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, info, warn};

use super::net::Names;
use crate::{
    config::{Config, DbConfig},
    probes::syscalls::comm_str,
    store::{
        db::{DbTables, LossKey, LossStats, OpKey, Outcome, QueryRecord, Role, SlowQuery, System},
        SharedStore,
    },
    untrusted::{strip_controls, LogField},
    wire::{mysql, pg, resp, sql},
};

const AF_UNIX: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Connections remembered (by socket and recognition time); the least recently used go first.
pub const MAX_CONNS: usize = 16_384;
/// Requests waiting for their completion, all connections together.
pub const MAX_PENDING: usize = 65_536;
/// Parsed request prefixes reused as they are (identical bytes, identical answer).
pub const MAX_PARSE_CACHE: usize = 1024;
/// A request still waiting after this long is forgotten (counted in pending_dropped): the
/// connection ended after its last completions were lost, or a statement runs longer than
/// this, whose completion is then counted as `operation="unknown"` (its time stays right:
/// the kernel times it).
const PENDING_MAX_AGE_NS: u64 = 10 * 60 * 1_000_000_000;
/// How often waiting requests are checked for age.
const PENDING_SWEEP_NS: u64 = 30 * 1_000_000_000;
/// Requests before a completion that are forgotten at most, per completion: the usual gap is
/// none; a larger one (many completion events lost at once) is left to the pending table's
/// own bound.
const MAX_SWEEP: u64 = 4096;
/// Prepared statements remembered per PostgreSQL connection...
const MAX_STATEMENTS: usize = 256;
/// ...and over all connections: any local process can open connections that look like
/// PostgreSQL and prepare statements on them, so what they make the agent keep is bounded as
/// a whole. Past it, a Bind/Execute of a statement not kept is named `EXECUTE <name>`.
pub const MAX_STATEMENTS_TOTAL: usize = 8192;

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
    system: System,
    destination: Arc<str>,
    service: Arc<str>,
    comm: Arc<str>,
    statements: HashMap<String, Arc<QueryInfo>>,
    last_seen: Instant,
    /// Sequence numbers below this have been completed or forgotten (see `on_response`).
    swept_to: u64,
}

#[derive(Debug)]
struct Pending {
    info: Arc<QueryInfo>,
    start_ns: u64,
}

/// Joins requests with their completions and names them.
pub struct Tracker {
    names: Names,
    conns: HashMap<(u64, u64), ConnInfo>,
    pending: HashMap<(u64, u64, u64), Pending>,
    cache: ParseCache,
    /// Prepared statements kept, over every connection.
    statements: usize,
    /// Kernel time of the last sweep of old requests.
    swept_at_ns: u64,
    unknown: Arc<QueryInfo>,
    /// The operation of a Redis command the server rejected as unknown: one label for every
    /// such name, whatever a client sends (its fingerprint keeps the name).
    unknown_command: Arc<str>,
    raw_text: bool,
    pub unmatched: u64,
    pub pending_dropped: u64,
    pub undecodable: u64,
    /// Losses the kernel reported since the last flush, by connection labels.
    pub losses: Vec<(LossKey, LossStats)>,
}

/// A completed query and, when it crossed its system's threshold, its slow-log entry.
pub struct Completed {
    pub record: QueryRecord,
    pub slow: Option<SlowQuery>,
}

impl Tracker {
    pub fn new(raw_text: bool) -> Self {
        let u: Arc<str> = Arc::from("unknown");
        Self {
            names: Names::new(),
            conns: HashMap::new(),
            pending: HashMap::new(),
            cache: HashMap::new(),
            statements: 0,
            swept_at_ns: 0,
            unknown: Arc::new(QueryInfo {
                operation: u.clone(),
                fingerprint: u.clone(),
                sample: u,
                read: false,
                runs: true,
            }),
            unknown_command: Arc::from("unknown_command"),
            raw_text,
            unmatched: 0,
            pending_dropped: 0,
            undecodable: 0,
            losses: Vec::new(),
        }
    }

    /// How full the bounded tables are.
    pub fn tables(&self) -> DbTables {
        DbTables {
            connections: self.conns.len() as u64,
            pending: self.pending.len() as u64,
            statements: self.statements as u64,
            parse_cache: self.cache.len() as u64,
        }
    }

    pub fn set_raw_text(&mut self, raw: bool) {
        if raw != self.raw_text {
            self.raw_text = raw;
            self.cache.clear();
        }
    }

    /// Feeds one ring-buffer record; returns the queries it completed.
    pub fn feed(&mut self, bytes: &[u8], cfg: &DbConfig, out: &mut Vec<Completed>) {
        match bytes.first().copied() {
            Some(kind::CONN) => match super::decode_event::<DbConnEvent>(bytes) {
                Some(ev) => self.on_conn(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::REQUEST) => match super::decode_event::<DbRequestEvent>(bytes) {
                Some(ev) => self.on_request(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::RESPONSE) => match super::decode_event::<DbResponseEvent>(bytes) {
                Some(ev) => self.on_response(&ev, cfg, out),
                None => self.undecodable += 1,
            },
            Some(kind::LOSS) => match super::decode_event::<DbLossEvent>(bytes) {
                Some(ev) => self.on_loss(&ev),
                None => self.undecodable += 1,
            },
            _ => self.undecodable += 1,
        }
    }

    fn on_conn(&mut self, ev: &DbConnEvent) {
        let (Some(system), Some(role)) =
            (System::from_kernel(ev.system), Role::from_kernel(ev.role))
        else {
            self.undecodable += 1;
            return;
        };
        if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&(ev.sk, ev.conn_id)) {
            self.evict_conns();
        }
        let destination = self.names.intern(destination(ev, role));
        let comm = comm_str(&ev.comm);
        let service = self.names.service(ev.cgroup_id, &comm, None);
        let comm = self.names.intern(comm);
        let entry = self
            .conns
            .entry((ev.sk, ev.conn_id))
            .or_insert_with(|| ConnInfo {
                system,
                destination: destination.clone(),
                service: service.clone(),
                comm: comm.clone(),
                statements: HashMap::new(),
                last_seen: Instant::now(),
                swept_to: 0,
            });
        // A new owner (a forked worker) re-attributes the connection.
        entry.service = service;
        entry.comm = comm;
        entry.destination = destination;
        entry.last_seen = Instant::now();
    }

    fn evict_conns(&mut self) {
        let mut ages: Vec<Instant> = self.conns.values().map(|c| c.last_seen).collect();
        ages.sort_unstable();
        let cut = ages[ages.len() / 4];
        let mut dropped = 0;
        self.conns.retain(|_, c| {
            let keep = c.last_seen > cut;
            if !keep {
                dropped += c.statements.len();
            }
            keep
        });
        self.statements = self.statements.saturating_sub(dropped);
    }

    fn on_request(&mut self, ev: &DbRequestEvent) {
        let n = (ev.prefix_len as usize).min(ev.prefix.len());
        let prefix = &ev.prefix[..n];
        let conn = self.conns.get_mut(&(ev.sk, ev.conn_id));
        let info = match conn {
            Some(c) => {
                c.last_seen = Instant::now();
                parse(
                    c.system,
                    prefix,
                    ev.len as usize,
                    (&mut c.statements, &mut self.statements),
                    &mut self.cache,
                    self.raw_text,
                )
            }
            None => System::from_kernel(ev.system).and_then(|s| {
                parse(
                    s,
                    prefix,
                    ev.len as usize,
                    (&mut HashMap::new(), &mut 0),
                    &mut self.cache,
                    self.raw_text,
                )
            }),
        }
        .unwrap_or_else(|| self.unknown.clone());
        // Requests of connections that ended, whose last completions were lost: nothing
        // will ever complete them. Kernel time (CLOCK_MONOTONIC) of the requests is the clock.
        if ev.start_ns > self.swept_at_ns.saturating_add(PENDING_SWEEP_NS) {
            self.swept_at_ns = ev.start_ns;
            let cutoff = ev.start_ns.saturating_sub(PENDING_MAX_AGE_NS);
            let before = self.pending.len();
            self.pending.retain(|_, p| p.start_ns >= cutoff);
            self.pending_dropped += (before - self.pending.len()) as u64;
        }
        if self.pending.len() >= MAX_PENDING {
            // Requests whose completions never came (dropped events, connections that died).
            // A new map: clear() would keep the full table's memory.
            self.pending_dropped += self.pending.len() as u64;
            self.pending = HashMap::new();
        }
        self.pending.insert(
            (ev.sk, ev.conn_id, ev.seq),
            Pending {
                info,
                start_ns: ev.start_ns,
            },
        );
    }

    /// Requests the kernel could not time on a connection: counted under its labels. Those
    /// a desync dropped will never complete: their request events are forgotten.
    fn on_loss(&mut self, ev: &DbLossEvent) {
        let (Some(system), Some(role)) =
            (System::from_kernel(ev.system), Role::from_kernel(ev.role))
        else {
            self.undecodable += 1;
            return;
        };
        let (destination, service) = match self.conns.get(&(ev.sk, ev.conn_id)) {
            Some(c) => (c.destination.clone(), c.service.clone()),
            None => {
                let u = &self.unknown.operation;
                (u.clone(), u.clone())
            }
        };
        let dropped = ev.dropped_to.wrapping_sub(ev.dropped_from);
        if dropped <= u64::from(DB_MAX_RUN) {
            for seq in ev.dropped_from..ev.dropped_to {
                self.pending.remove(&(ev.sk, ev.conn_id, seq));
            }
        }
        self.losses.push((
            LossKey {
                system,
                role,
                destination,
                service,
            },
            LossStats {
                untimed: u64::from(ev.untimed),
                desync: u64::from(ev.desync),
                event_lost: u64::from(ev.event_lost),
                bytes: ev.bytes,
            },
        ));
    }

    fn on_response(&mut self, ev: &DbResponseEvent, cfg: &DbConfig, out: &mut Vec<Completed>) {
        let (Some(system), Some(role)) =
            (System::from_kernel(ev.system), Role::from_kernel(ev.role))
        else {
            self.undecodable += 1;
            return;
        };
        let conn = self.conns.get_mut(&(ev.sk, ev.conn_id));
        let (destination, service, comm) = match conn {
            Some(c) => {
                // Completions come in request order on a connection: a request before this
                // one still waiting has lost its completion (its event was dropped, and
                // counted by the kernel as event_lost). Forget it now rather than hold it
                // until the pending table fills.
                let from = c.swept_to.max(ev.seq.saturating_sub(MAX_SWEEP));
                for seq in from..ev.seq {
                    self.pending.remove(&(ev.sk, ev.conn_id, seq));
                }
                c.swept_to = c.swept_to.max(
                    ev.seq
                        .wrapping_add(u64::from(ev.count.clamp(1, DB_MAX_RUN))),
                );
                (c.destination.clone(), c.service.clone(), c.comm.clone())
            }
            None => {
                let u = &self.unknown.operation;
                (u.clone(), u.clone(), u.clone())
            }
        };
        let threshold = match system {
            System::Postgresql => cfg.slow_threshold.postgresql,
            System::Mysql => cfg.slow_threshold.mysql,
            System::Redis => cfg.slow_threshold.redis,
        };
        for i in 0..u64::from(ev.count.clamp(1, DB_MAX_RUN)) {
            let seq = ev.seq.wrapping_add(i);
            let (info, start) = match self.pending.remove(&(ev.sk, ev.conn_id, seq)) {
                Some(p) => (p.info, p.start_ns),
                None => {
                    self.unmatched += 1;
                    (self.unknown.clone(), ev.start_ns)
                }
            };
            if !info.runs {
                continue;
            }
            let duration_ns = ev.end_ns.saturating_sub(start);
            let result = match ev.outcome {
                outcome::ERROR => Outcome::Error,
                outcome::SKIPPED => Outcome::Skipped,
                outcome::NULL if info.read => Outcome::Miss,
                outcome::NULL => Outcome::Null,
                _ => Outcome::Ok,
            };
            let operation = if system == System::Redis
                && result == Outcome::Error
                && !Arc::ptr_eq(&info, &self.unknown)
                && !resp::is_known(&info.operation)
            {
                self.unknown_command.clone()
            } else {
                info.operation.clone()
            };
            let slow = (Duration::from_nanos(duration_ns) >= threshold).then(|| SlowQuery {
                at: SystemTime::now(),
                system,
                role,
                operation: operation.to_string(),
                fingerprint: info.fingerprint.to_string(),
                text: info.sample.to_string(),
                duration_ms: duration_ns as f64 / 1e6,
                outcome: result,
                pid: ev.pid,
                comm: comm.to_string(),
                service: service.to_string(),
                destination: destination.to_string(),
            });
            out.push(Completed {
                record: QueryRecord {
                    key: OpKey {
                        system,
                        role,
                        operation,
                        destination: destination.clone(),
                        service: service.clone(),
                    },
                    fingerprint: info.fingerprint.clone(),
                    sample: info.sample.clone(),
                    duration_ns,
                    outcome: result,
                    process: Some((ev.pid, comm.clone())),
                },
                slow,
            });
        }
    }
}

/// Where the connection goes: the server's address (seen from the client), or the local
/// listening address (on the server); for unix sockets, the listening path.
fn destination(ev: &DbConnEvent, role: Role) -> String {
    let (addr, port) = match role {
        Role::Client => (&ev.daddr, ev.dport),
        Role::Server => (&ev.saddr, ev.sport),
    };
    match ev.family {
        AF_INET => format!(
            "{}:{port}",
            Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
        ),
        AF_INET6 => match Ipv6Addr::from(*addr).to_canonical() {
            IpAddr::V4(v4) => format!("{v4}:{port}"),
            IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        },
        AF_UNIX => {
            let n = (ev.path_len as usize).min(ev.path.len());
            let path = &ev.path[..n];
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            if end == 0 {
                "unix".to_string()
            } else {
                format!("unix:{}", String::from_utf8_lossy(&path[..end]))
            }
        }
        _ => "unknown".to_string(),
    }
}

/// Names a request from its first bytes. PostgreSQL statements prepared on the connection are
/// remembered by name, so that a later Bind/Execute of one is named after its SQL.
fn parse(
    system: System,
    prefix: &[u8],
    len: usize,
    (statements, kept): (&mut HashMap<String, Arc<QueryInfo>>, &mut usize),
    cache: &mut ParseCache,
    raw: bool,
) -> Option<Arc<QueryInfo>> {
    if let Some((s, hit)) = cache.get(prefix) {
        if *s == system {
            return Some(hit.clone());
        }
    }
    let (info, cacheable) = match system {
        System::Postgresql => {
            let req = pg::request(prefix)?;
            let info = match (&req.sql, &req.bound_statement) {
                (Some(text), _) => Arc::new(sql_info(text, raw)),
                (None, Some(name)) => match statements.get(name) {
                    Some(i) => i.clone(),
                    None => Arc::new(QueryInfo {
                        operation: Arc::from("EXECUTE"),
                        fingerprint: Arc::from(&*strip_controls(&format!("EXECUTE {name}"))),
                        sample: Arc::from(&*strip_controls(&format!("EXECUTE {name}"))),
                        read: false,
                        runs: true,
                    }),
                },
                (None, None) => return None,
            };
            if let (Some(name), Some(_)) = (&req.parsed_statement, &req.sql) {
                if !name.is_empty() {
                    if statements.len() >= MAX_STATEMENTS {
                        *kept = kept.saturating_sub(statements.len());
                        *statements = HashMap::new();
                    }
                    let room = statements.contains_key(name) || *kept < MAX_STATEMENTS_TOTAL;
                    if room && statements.insert(name.clone(), info.clone()).is_none() {
                        *kept += 1;
                    }
                }
            }
            let info = if req.executes {
                info
            } else {
                let mut i = (*info).clone();
                i.runs = false;
                Arc::new(i)
            };
            // A Bind's answer depends on the connection's statements; a Parse defines one.
            (info, req.sql.is_some() && req.parsed_statement.is_none())
        }
        System::Mysql => {
            let req = mysql::request(prefix, len.max(prefix.len()))?;
            let op = mysql::operation(&req);
            let info = match &req.sql {
                Some(text) => {
                    let mut i = sql_info(text, raw);
                    i.operation = Arc::from(op.as_str());
                    i
                }
                None => QueryInfo {
                    operation: Arc::from(op.as_str()),
                    fingerprint: Arc::from(op.as_str()),
                    sample: Arc::from(op.as_str()),
                    read: false,
                    runs: true,
                },
            };
            (Arc::new(info), true)
        }
        System::Redis => {
            let cmd = resp::command(prefix)?;
            // The name is the client's text: counted under a known command's name or `unknown`.
            let op = resp::operation(&cmd.name);
            let fingerprint = redis_fingerprint(&strip_controls(&cmd.name), cmd.args);
            let sample = if raw {
                redis_raw(prefix)
            } else {
                fingerprint.clone()
            };
            (
                Arc::new(QueryInfo {
                    runs: true,
                    read: resp::is_read(&cmd.name),
                    operation: Arc::from(&*op),
                    fingerprint: Arc::from(fingerprint.as_str()),
                    sample: Arc::from(sample.as_str()),
                }),
                // Keys make nearly every command's bytes unique, and decoding one costs
                // less than keeping it.
                false,
            )
        }
    };
    if cacheable {
        if cache.len() >= MAX_PARSE_CACHE {
            *cache = HashMap::new();
        }
        cache.insert(Box::from(prefix), (system, info.clone()));
    }
    Some(info)
}

fn sql_info(text: &str, raw: bool) -> QueryInfo {
    let fingerprint = sql::fingerprint(text);
    QueryInfo {
        operation: Arc::from(sql::operation(text).as_str()),
        sample: if raw {
            Arc::from(&*strip_controls(text.trim()))
        } else {
            Arc::from(fingerprint.as_str())
        },
        fingerprint: Arc::from(fingerprint.as_str()),
        read: false,
        runs: true,
    }
}

/// `GET ?`, `SET ? ?`, `MSET ? ? ? ...`: the command and the shape of its arguments.
fn redis_fingerprint(name: &str, args: usize) -> String {
    let mut s = name.to_string();
    for _ in 0..args.min(3) {
        s.push_str(" ?");
    }
    if args > 3 {
        s.push_str(" ...");
    }
    s
}

/// The command's words as sent (RESP framing dropped).
fn redis_raw(prefix: &[u8]) -> String {
    let text = String::from_utf8_lossy(prefix);
    let words: Vec<&str> = text
        .split("\r\n")
        .filter(|w| !w.is_empty() && !w.starts_with('*') && !w.starts_with('$'))
        .collect();
    strip_controls(&words.join(" ")).into_owned()
}

/// Reads query events until the ring buffer's fd fails (the probe was dropped).
pub async fn run_event_reader(
    ring: RingBuf<MapData>,
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open for as long as the AsyncFd
    // owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "cannot poll the query-event ring buffer");
            return;
        }
    };
    let mut tracker = Tracker::new(config.borrow().db.log_raw_text);
    let mut drain = tokio::time::interval(Duration::from_millis(DB_DRAIN_INTERVAL_MS));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut done = Vec::with_capacity(FLUSH_EVERY);
    loop {
        let cfg = config.borrow().clone();
        tracker.set_raw_text(cfg.db.log_raw_text);
        // A reader that falls behind meets a full ring: what it holds is folded into the
        // store every FLUSH_EVERY completions, so its own memory stays bounded.
        let mut drain_ring = |ring: &mut RingBuf<MapData>, done: &mut Vec<Completed>| {
            let mut events = 0u64;
            while let Some(item) = ring.next() {
                events += 1;
                tracker.feed(&item, &cfg.db, done);
                if done.len() >= FLUSH_EVERY || tracker.losses.len() >= FLUSH_EVERY {
                    flush(&store, &cfg.db, done, events, &mut tracker);
                    events = 0;
                }
            }
            flush(&store, &cfg.db, done, events, &mut tracker);
        };
        tokio::select! {
            ready = fd.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => {
                        debug!(error = %crate::probes::error_chain(&e), "query-event ring buffer closed");
                        return;
                    }
                };
                drain_ring(guard.get_inner_mut(), &mut done);
                guard.clear_ready();
            }
            _ = drain.tick() => drain_ring(fd.get_mut(), &mut done),
        }
    }
}

/// Completions handled per store update.
const FLUSH_EVERY: usize = 4096;

/// Folds completed queries into the store and logs the slow ones.
fn flush(
    store: &SharedStore,
    cfg: &DbConfig,
    done: &mut Vec<Completed>,
    events: u64,
    tracker: &mut Tracker,
) {
    if events == 0 && done.is_empty() && tracker.losses.is_empty() {
        return;
    }
    let Ok(mut st) = store.write() else {
        done.clear();
        tracker.losses.clear();
        return;
    };
    let cap = cfg.slow_log_capacity.max(1);
    {
        let t = &mut st.db_live;
        t.events += events;
        t.unmatched = tracker.unmatched;
        t.pending_dropped = tracker.pending_dropped;
        t.undecodable = tracker.undecodable;
        t.tables = tracker.tables();
        for (k, l) in tracker.losses.drain(..) {
            t.record_loss(k, &l, cfg.max_series);
        }
    }
    for c in done.drain(..) {
        if let Some(s) = c.slow {
            // The process-controlled fields are quoted and escaped when they need it: one
            // line per slow query, whatever they hold.
            info!(
                target: "insite::slow_query",
                system = s.system.as_str(),
                role = s.role.as_str(),
                operation = %LogField(&s.operation),
                duration_ms = s.duration_ms,
                outcome = ?s.outcome,
                pid = s.pid,
                comm = %LogField(&s.comm),
                service = %LogField(&s.service),
                destination = %LogField(&s.destination),
                text = %LogField(&s.text),
                "slow query"
            );
            while st.db_slow.len() >= cap {
                st.db_slow.pop_front();
            }
            st.db_slow.push_back(s);
        }
        st.db_live
            .record(c.record, cfg.max_series, cfg.max_fingerprints);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ParseCache {
        HashMap::new()
    }

    fn pg_query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    /// A Parse message preparing `sql` as statement `name`.
    fn pg_parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn names_sql_and_masks_literals() {
        let mut st = HashMap::new();
        let a = parse(
            System::Postgresql,
            &pg_query("SELECT * FROM t WHERE id = 7"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        let b = parse(
            System::Postgresql,
            &pg_query("select * from t where id = 8"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*a.operation, "SELECT");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(!a.sample.contains('7'), "{}", a.sample);
        let raw = parse(
            System::Postgresql,
            &pg_query("SELECT 7"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            true,
        )
        .unwrap();
        assert!(raw.sample.contains('7'));
    }

    #[test]
    fn prepared_statements_are_bounded_over_all_connections() {
        let mut c = cache();
        let mut kept = 0usize;
        let mut conns: Vec<HashMap<String, Arc<QueryInfo>>> = Vec::new();
        // 64 connections preparing 256 statements each: 16384 asked, MAX_STATEMENTS_TOTAL kept.
        for _ in 0..64 {
            let mut st = HashMap::new();
            for i in 0..256 {
                let msg = pg_parse(&format!("s{i}"), &format!("SELECT {i}"));
                parse(
                    System::Postgresql,
                    &msg,
                    0,
                    (&mut st, &mut kept),
                    &mut c,
                    false,
                );
            }
            conns.push(st);
        }
        let held: usize = conns.iter().map(HashMap::len).sum();
        assert_eq!(kept, MAX_STATEMENTS_TOTAL);
        assert_eq!(held, MAX_STATEMENTS_TOTAL);
    }

    #[test]
    fn prepared_statements_are_named_after_their_sql() {
        // Parse "s1" then, later, Bind "s1" + Execute.
        let mut parse_msg = vec![b'P'];
        let body = b"s1\0UPDATE t SET a = $1\0\0\0";
        parse_msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        parse_msg.extend_from_slice(body);
        let mut bind = vec![b'B'];
        let body = b"\0s1\0\0\0\0\0\0\0";
        bind.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        bind.extend_from_slice(body);
        bind.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
        let mut st = HashMap::new();
        let mut c = cache();
        let p = parse(
            System::Postgresql,
            &parse_msg,
            0,
            (&mut st, &mut 0),
            &mut c,
            false,
        )
        .unwrap();
        assert_eq!(&*p.operation, "UPDATE");
        let e = parse(
            System::Postgresql,
            &bind,
            0,
            (&mut st, &mut 0),
            &mut c,
            false,
        )
        .unwrap();
        assert_eq!(&*e.operation, "UPDATE");
        let other = parse(
            System::Postgresql,
            &bind,
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*other.operation, "EXECUTE");
    }

    #[test]
    fn redis_commands_and_reads() {
        let get = parse(
            System::Redis,
            b"*2\r\n$3\r\nget\r\n$3\r\nkey\r\n",
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(
            (&*get.operation, &*get.fingerprint, get.read),
            ("GET", "GET ?", true)
        );
        let raw = parse(
            System::Redis,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            true,
        )
        .unwrap();
        assert_eq!(&*raw.sample, "SET k v");
        assert!(!raw.read);
    }

    #[test]
    fn mysql_commands() {
        let mut q = vec![0x03];
        q.extend_from_slice(b"INSERT INTO t VALUES (1, 'x')");
        let i = parse(
            System::Mysql,
            &q,
            q.len(),
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*i.operation, "INSERT");
        assert!(!i.fingerprint.contains('x'));
        let ping = parse(
            System::Mysql,
            &[0x0e],
            1,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*ping.operation, "PING");
    }

    #[test]
    fn completions_join_requests_and_count_ranges() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        let mut req = DbRequestEvent {
            kind: kind::REQUEST,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::CLIENT,
            _pad: 0,
            pid: 1,
            sk: 9,
            conn_id: 3,
            seq: 0,
            start_ns: 1_000,
            len: 0,
            prefix_len: 0,
            prefix: [0; agent_common::db::DB_PREFIX_LEN],
        };
        let cmd = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        req.prefix[..cmd.len()].copy_from_slice(cmd);
        req.prefix_len = cmd.len() as u32;
        for seq in 0..3 {
            req.seq = seq;
            req.start_ns = 1_000 + seq;
            t.on_request(&req);
        }
        let resp = DbResponseEvent {
            kind: kind::RESPONSE,
            system: req.system,
            role: req.role,
            outcome: outcome::NULL,
            pid: 1,
            sk: 9,
            conn_id: 3,
            seq: 0,
            count: 3,
            _pad: 0,
            start_ns: 1_000,
            end_ns: 51_000,
        };
        let mut out = Vec::new();
        t.on_response(&resp, &cfg, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|c| c.record.outcome == Outcome::Miss));
        assert_eq!(out[2].record.duration_ns, 51_000 - 1_002);
        assert_eq!(t.unmatched, 0);
        // A completion whose request never arrived still counts, as `unknown`.
        let mut out = Vec::new();
        t.on_response(
            &DbResponseEvent {
                seq: 7,
                count: 1,
                ..resp
            },
            &cfg,
            &mut out,
        );
        assert_eq!(&*out[0].record.key.operation, "unknown");
        assert_eq!(t.unmatched, 1);
        // Junk never panics.
        let mut out = Vec::new();
        for junk in [
            &[][..],
            &[kind::CONN][..],
            &[kind::RESPONSE, 1, 2][..],
            &[99; 400][..],
        ] {
            t.feed(junk, &cfg, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(t.undecodable, 4);
    }

    fn conn_event(sk: u64, conn_id: u64) -> DbConnEvent {
        DbConnEvent {
            kind: kind::CONN,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            family: AF_INET,
            pid: 1,
            sk,
            conn_id,
            cgroup_id: 0,
            comm: [0; agent_common::TASK_COMM_LEN],
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 6379,
            dport: 40000,
            path_len: 0,
            path: [0; agent_common::db::DB_PATH_LEN],
            _pad: 0,
        }
    }

    fn redis_response(seq: u64, count: u32) -> DbResponseEvent {
        DbResponseEvent {
            kind: kind::RESPONSE,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            outcome: outcome::OK,
            pid: 1,
            sk: 9,
            conn_id: 3,
            seq,
            count,
            _pad: 0,
            start_ns: 1_000,
            end_ns: 2_000,
        }
    }

    fn redis_request(seq: u64, cmd: &[u8]) -> DbRequestEvent {
        let mut req = DbRequestEvent {
            kind: kind::REQUEST,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            _pad: 0,
            pid: 1,
            sk: 9,
            conn_id: 3,
            seq,
            start_ns: 1_000,
            len: cmd.len() as u32,
            prefix_len: cmd.len() as u32,
            prefix: [0; agent_common::db::DB_PREFIX_LEN],
        };
        req.prefix[..cmd.len()].copy_from_slice(cmd);
        req
    }

    #[test]
    fn unknown_redis_commands_share_one_operation_and_keep_their_fingerprint() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.on_request(&redis_request(0, b"*2\r\n$4\r\nCMD1\r\n$1\r\nk\r\n"));
        t.on_request(&redis_request(1, b"*2\r\n$4\r\nCMD2\r\n$1\r\nk\r\n"));
        t.on_request(&redis_request(2, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        let resp = DbResponseEvent {
            kind: kind::RESPONSE,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            outcome: outcome::ERROR,
            pid: 1,
            sk: 9,
            conn_id: 3,
            seq: 0,
            count: 3,
            _pad: 0,
            start_ns: 1_000,
            end_ns: 2_000,
        };
        let mut out = Vec::new();
        t.on_response(&resp, &cfg, &mut out);
        let ops: Vec<(&str, &str)> = out
            .iter()
            .map(|c| (&*c.record.key.operation, &*c.record.fingerprint))
            .collect();
        // A known command that fails (WRONGTYPE and the like) keeps its name.
        assert_eq!(
            ops,
            [
                ("unknown_command", "CMD1 ?"),
                ("unknown_command", "CMD2 ?"),
                ("GET", "GET ?")
            ]
        );
        // A name outside the table that the server accepted (a command newer than the table)
        // is `unknown`: labels never carry the client's text. Its fingerprint keeps the name.
        t.on_request(&redis_request(3, b"*2\r\n$5\r\nNEWER\r\n$1\r\nk\r\n"));
        let mut out = Vec::new();
        t.on_response(
            &DbResponseEvent {
                seq: 3,
                count: 1,
                outcome: outcome::OK,
                ..resp
            },
            &cfg,
            &mut out,
        );
        assert_eq!(&*out[0].record.key.operation, "unknown");
        assert_eq!(&*out[0].record.fingerprint, "NEWER ?");
    }

    #[test]
    fn a_request_whose_completion_was_lost_is_forgotten_at_the_next_completion() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.on_conn(&conn_event(9, 3));
        for seq in 0..3 {
            t.on_request(&redis_request(seq, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"));
        }
        assert_eq!(t.pending.len(), 3);
        // The completion of seq 0 was lost; seq 1 completes.
        let mut out = Vec::new();
        t.on_response(&redis_response(1, 1), &cfg, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(t.pending.len(), 1, "seq 0 forgotten, seq 2 still waiting");
        t.on_response(&redis_response(2, 1), &cfg, &mut out);
        assert!(t.pending.is_empty());
        assert_eq!(t.unmatched, 0);
    }

    #[test]
    fn requests_left_waiting_for_ten_minutes_are_forgotten() {
        let mut t = Tracker::new(false);
        t.on_conn(&conn_event(9, 3));
        let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        let mut old = redis_request(0, get);
        old.start_ns = 1_000_000_000;
        t.on_request(&old);
        let mut recent = redis_request(1, get);
        recent.start_ns = old.start_ns + PENDING_MAX_AGE_NS - 1;
        t.on_request(&recent);
        assert_eq!(t.pending.len(), 2);
        let mut now = redis_request(2, get);
        now.start_ns = old.start_ns + PENDING_MAX_AGE_NS + PENDING_SWEEP_NS + 1;
        t.on_request(&now);
        assert_eq!(
            t.pending.len(),
            2,
            "the request of 10 minutes ago is forgotten"
        );
        assert_eq!(t.pending_dropped, 1);
    }

    #[test]
    fn loss_events_count_under_the_connections_labels_and_forget_dropped_requests() {
        let mut t = Tracker::new(false);
        let mut conn = DbConnEvent {
            kind: kind::CONN,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            family: AF_INET,
            pid: 1,
            sk: 9,
            conn_id: 3,
            cgroup_id: 0,
            comm: [0; 16],
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [0; 16],
            sport: 6379,
            dport: 0,
            path_len: 0,
            path: [0; agent_common::db::DB_PATH_LEN],
            _pad: 0,
        };
        conn.comm[..5].copy_from_slice(b"redis");
        t.on_conn(&conn);
        for seq in 0..4 {
            t.on_request(&redis_request(seq, b"*1\r\n$4\r\nPING\r\n"));
        }
        let loss = DbLossEvent {
            kind: kind::LOSS,
            system: conn.system,
            role: conn.role,
            _pad: 0,
            pid: 1,
            sk: 9,
            conn_id: 3,
            untimed: 36,
            desync: 3,
            event_lost: 1,
            _pad2: 0,
            bytes: 700,
            dropped_from: 1,
            dropped_to: 4,
        };
        let mut out = Vec::new();
        // SAFETY: a plain repr(C) value without padding, viewed as its bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const loss).cast::<u8>(),
                std::mem::size_of::<DbLossEvent>(),
            )
        };
        t.feed(bytes, &DbConfig::default(), &mut out);
        assert!(out.is_empty());
        assert_eq!(t.losses.len(), 1);
        let (k, l) = &t.losses[0];
        assert_eq!(
            (k.system, k.role, &*k.destination),
            (System::Redis, Role::Server, "127.0.0.1:6379")
        );
        assert_eq!(
            (l.untimed, l.desync, l.event_lost, l.bytes),
            (36, 3, 1, 700)
        );
        assert_eq!(l.requests(), 40);
        // Requests 1..4 were dropped in the kernel: only 0 still waits for its completion.
        let waiting: Vec<u64> = t.pending.keys().map(|k| k.2).collect();
        assert_eq!(waiting, [0]);
    }
}
