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
        kind, outcome, DbConnEvent, DbLossEvent, DbSettings, DbSlowEvent, DbStat, DbStatKey,
        DbTextEvent, DB_DRAIN_INTERVAL_MS, DB_KNOWN_ENTRIES,
    },
    HIST_BUCKETS,
};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, info, warn};

use super::net::Names;
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

const AF_UNIX: u8 = 1;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

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

/// Names the kernel's ids (statement keys, destinations, owners) and turns its counts into
/// store records.
pub struct Tracker {
    names: Names,
    conns: HashMap<(u64, u64), ConnInfo>,
    dests: HashMap<u64, Arc<str>>,
    owners: HashMap<u64, Arc<str>>,
    keys: HashMap<u64, KeyInfo>,
    folded: HashMap<DbStatKey, Folded>,
    cache: ParseCache,
    /// Prepared statements kept, over every connection.
    statements: usize,
    unknown: Arc<QueryInfo>,
    /// What the kernel counted without its statement (key 0: its table was full).
    other: Arc<QueryInfo>,
    /// The operation of a Redis command the server rejected as unknown: one label for every
    /// such name, whatever a client sends (its fingerprint keeps the name).
    unknown_command: Arc<str>,
    raw_text: bool,
    /// Keys named since the kernel was last told, and keys forgotten since.
    pub named: Vec<u64>,
    pub forgotten: Vec<u64>,
    /// The generation of the kernel's `DB_KNOWN`: moves on when keys are forgotten.
    pub known_gen: u64,
    /// Kernel count entries idle for `STATS_IDLE`: to remove from its table.
    pub idle: Vec<DbStatKey>,
    pub unmatched: u64,
    pub undecodable: u64,
    /// Losses the kernel reported since the last flush, by connection labels.
    pub losses: Vec<(LossKey, LossStats)>,
    /// Slow queries since the last flush.
    pub slow: Vec<SlowQuery>,
}

impl Tracker {
    pub fn new(raw_text: bool) -> Self {
        let u: Arc<str> = Arc::from("unknown");
        Self {
            names: Names::new(),
            conns: HashMap::new(),
            dests: HashMap::new(),
            owners: HashMap::new(),
            keys: HashMap::new(),
            folded: HashMap::new(),
            cache: HashMap::new(),
            statements: 0,
            unknown: Arc::new(QueryInfo {
                operation: u.clone(),
                fingerprint: u.clone(),
                sample: u,
                read: false,
                runs: true,
            }),
            other: Arc::new(QueryInfo {
                operation: Arc::from("other"),
                fingerprint: Arc::from("other"),
                sample: Arc::from("other"),
                read: false,
                runs: true,
            }),
            unknown_command: Arc::from("unknown_command"),
            raw_text,
            idle: Vec::new(),
            named: Vec::new(),
            forgotten: Vec::new(),
            known_gen: 0,
            unmatched: 0,
            undecodable: 0,
            losses: Vec::new(),
            slow: Vec::new(),
        }
    }

    /// How full the bounded tables are.
    pub fn tables(&self) -> DbTables {
        DbTables {
            connections: self.conns.len() as u64,
            keys: self.keys.len() as u64,
            statements: self.statements as u64,
            parse_cache: self.cache.len() as u64,
            kernel_stats: self.folded.len() as u64,
        }
    }

    /// Raw text in the slow log and samples means the text of every request: no key is
    /// registered in the kernel while it is on, and those registered are forgotten.
    pub fn set_raw_text(&mut self, raw: bool) {
        if raw != self.raw_text {
            self.raw_text = raw;
            self.cache.clear();
            self.forgotten.extend(self.keys.drain().map(|(k, _)| k));
            self.named.clear();
        }
    }

    /// Feeds one ring-buffer record.
    pub fn feed(&mut self, bytes: &[u8], cfg: &DbConfig) {
        match bytes.first().copied() {
            Some(kind::CONN) => match super::decode_event::<DbConnEvent>(bytes) {
                Some(ev) => self.on_conn(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::TEXT) => match super::decode_event::<DbTextEvent>(bytes) {
                Some(ev) => self.on_text(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::SLOW) => match super::decode_event::<DbSlowEvent>(bytes) {
                Some(ev) => self.on_slow(&ev, cfg),
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
        let (Some(_), Some(role)) = (System::from_kernel(ev.system), Role::from_kernel(ev.role))
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
        // Ids seen again keep their first name: a table full of ids a local process made up
        // is started afresh (their counts then wait for a name, or go to `unknown`).
        for (map, id, name) in [
            (&mut self.dests, ev.dest, &destination),
            (&mut self.owners, ev.owner, &service),
        ] {
            if map.len() >= MAX_NAMES && !map.contains_key(&id) {
                *map = HashMap::new();
            }
            map.insert(id, name.clone());
        }
        let entry = self
            .conns
            .entry((ev.sk, ev.conn_id))
            .or_insert_with(|| ConnInfo {
                destination: destination.clone(),
                service: service.clone(),
                comm: comm.clone(),
                statements: HashMap::new(),
                last_seen: Instant::now(),
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

    /// A statement key's text: names the key (and, for PostgreSQL, defines the statements
    /// the connection prepares).
    fn on_text(&mut self, ev: &DbTextEvent) {
        let n = (ev.prefix_len as usize).min(ev.prefix.len());
        let prefix = &ev.prefix[..n];
        let Some(system) = System::from_kernel(ev.system) else {
            self.undecodable += 1;
            return;
        };
        let conn = self.conns.get_mut(&(ev.sk, ev.conn_id));
        let (info, comm) = match conn {
            Some(c) => {
                c.last_seen = Instant::now();
                let info = parse(
                    system,
                    prefix,
                    ev.len as usize,
                    (&mut c.statements, &mut self.statements),
                    &mut self.cache,
                    self.raw_text,
                );
                (info, c.comm.clone())
            }
            None => {
                let info = parse(
                    system,
                    prefix,
                    ev.len as usize,
                    (&mut HashMap::new(), &mut 0),
                    &mut self.cache,
                    self.raw_text,
                );
                (info, self.unknown.operation.clone())
            }
        };
        let info = info.unwrap_or_else(|| self.unknown.clone());
        if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&ev.key) {
            // Started afresh; the kernel forgets them too, so their text comes again.
            self.forgotten.extend(self.keys.drain().map(|(k, _)| k));
            self.named.clear();
        }
        let fresh = self
            .keys
            .insert(
                ev.key,
                KeyInfo {
                    info,
                    process: (ev.pid, comm),
                },
            )
            .is_none();
        if fresh && !self.raw_text {
            self.named.push(ev.key);
        }
    }

    /// The name of a key: its statement, or `unknown` if its text never came.
    fn key_info(&self, key: u64) -> Option<&KeyInfo> {
        self.keys.get(&key)
    }

    fn on_slow(&mut self, ev: &DbSlowEvent, cfg: &DbConfig) {
        let (Some(system), Some(role)) =
            (System::from_kernel(ev.system), Role::from_kernel(ev.role))
        else {
            self.undecodable += 1;
            return;
        };
        let info = self
            .key_info(ev.key)
            .map_or_else(|| self.unknown.clone(), |k| k.info.clone());
        let u = &self.unknown.operation;
        let (destination, service, comm) = match self.conns.get(&(ev.sk, ev.conn_id)) {
            Some(c) => (c.destination.clone(), c.service.clone(), c.comm.clone()),
            None => (u.clone(), u.clone(), u.clone()),
        };
        let result = outcome_of(ev.outcome, &info);
        let operation = self.operation(system, result, &info);
        if self.slow.len() >= cfg.slow_log_capacity.max(1) {
            self.slow.remove(0);
        }
        let duration_ns = ev.end_ns.saturating_sub(ev.start_ns);
        self.slow.push(SlowQuery {
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
    }

    /// The operation label: the statement's, but a Redis command outside the known set that
    /// the server refused is `unknown_command` (its fingerprint keeps the name).
    fn operation(&self, system: System, result: Outcome, info: &Arc<QueryInfo>) -> Arc<str> {
        if system == System::Redis
            && result == Outcome::Error
            && !Arc::ptr_eq(info, &self.unknown)
            && !resp::is_known(&info.operation)
        {
            self.unknown_command.clone()
        } else {
            info.operation.clone()
        }
    }

    /// Requests the kernel could not time on a connection: counted under its labels.
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

    /// What the kernel counted since the last fold, as store records: one per `DB_STATS`
    /// entry that changed. Counts whose names have not arrived wait up to `NAME_WAIT` (the
    /// kernel keeps counting meanwhile), then go to `unknown`.
    pub fn fold(
        &mut self,
        entries: &[(DbStatKey, DbStat)],
        now: Instant,
        out: &mut Vec<QueryRecord>,
    ) {
        for (k, v) in entries {
            let (Some(system), Some(role)) =
                (System::from_kernel(k.system), Role::from_kernel(k.role))
            else {
                continue;
            };
            let f = self.folded.entry(*k).or_insert_with(|| Folded::new(now));
            let count = v.count.wrapping_sub(f.count);
            if count == 0 {
                if now.duration_since(f.changed) >= STATS_IDLE {
                    self.idle.push(*k);
                }
                continue;
            }
            // Key 0: counted without its statement, the kernel's table was full.
            let (info, process) = match (k.key, self.keys.get(&k.key)) {
                (0, _) => (Some(&self.other), None),
                (_, Some(n)) => (Some(&n.info), Some(&n.process)),
                (_, None) => (None, None),
            };
            let dest = self.dests.get(&k.dest);
            let owner = self.owners.get(&k.owner);
            if info.is_none() || dest.is_none() || owner.is_none() {
                let since = *f.waiting.get_or_insert(now);
                if now.duration_since(since) < NAME_WAIT {
                    continue;
                }
            }
            let mut stats = OpStats::default();
            if k.outcome == outcome::UNTIMED {
                stats.untimed = count;
            } else {
                let mut h = Log2Histogram {
                    count,
                    sum_ns: v.sum_ns.wrapping_sub(f.sum_ns),
                    ..Log2Histogram::default()
                };
                for (i, b) in h.buckets.iter_mut().enumerate() {
                    *b = u64::from(v.buckets[i].wrapping_sub(f.buckets[i]));
                }
                stats.duration = h;
            }
            *f = Folded {
                count: v.count,
                sum_ns: v.sum_ns,
                buckets: v.buckets,
                waiting: None,
                changed: now,
            };
            let process = process.cloned();
            let info = match info {
                Some(i) => i.clone(),
                None => {
                    self.unmatched += count;
                    self.unknown.clone()
                }
            };
            if !info.runs {
                continue;
            }
            let result = outcome_of(k.outcome, &info);
            match result {
                Outcome::Error | Outcome::Skipped => stats.errors = stats.duration.count,
                Outcome::Miss => stats.misses = stats.duration.count,
                _ => {}
            }
            let u = &self.unknown.operation;
            out.push(QueryRecord {
                key: OpKey {
                    system,
                    role,
                    operation: self.operation(system, result, &info),
                    destination: dest.unwrap_or(u).clone(),
                    service: owner.unwrap_or(u).clone(),
                },
                fingerprint: info.fingerprint.clone(),
                sample: info.sample.clone(),
                stats,
                process,
            });
        }
    }
}

fn outcome_of(o: u8, info: &QueryInfo) -> Outcome {
    match o {
        outcome::ERROR => Outcome::Error,
        outcome::SKIPPED => Outcome::Skipped,
        outcome::NULL if info.read => Outcome::Miss,
        outcome::NULL => Outcome::Null,
        _ => Outcome::Ok,
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

/// Reads query events and the kernel's counts until the ring buffer's fd fails (the probe
/// was dropped).
pub async fn run_event_reader(
    maps: DbMaps,
    store: SharedStore,
    config: watch::Receiver<Arc<Config>>,
) {
    let DbMaps {
        ring,
        mut stats,
        mut stats_other,
        mut known,
        mut settings,
    } = maps;
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
    let mut fold = tokio::time::interval(FOLD_INTERVAL);
    fold.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut entries = Vec::new();
    let mut records = Vec::new();
    let mut applied = None;
    loop {
        let cfg = config.borrow().clone();
        tracker.set_raw_text(cfg.db.log_raw_text);
        let want = settings_of(&cfg.db, tracker.known_gen);
        if applied != Some(want) {
            match settings.set(0, want, 0) {
                Ok(()) => applied = Some(want),
                Err(e) => {
                    warn!(error = %crate::probes::error_chain(&e), "cannot set the database probe's slow thresholds")
                }
            }
        }
        let mut events = 0u64;
        let mut folding = false;
        let mut maps = KeyMaps {
            known: &mut known,
            settings: &mut settings,
            applied: &mut applied,
            cfg: &cfg.db,
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
                events += drain_ring(guard.get_inner_mut(), &mut tracker, &mut maps);
                guard.clear_ready();
            }
            _ = drain.tick() => events += drain_ring(fd.get_mut(), &mut tracker, &mut maps),
            _ = fold.tick() => {
                // Names first: the texts and connections the counts are waiting for.
                events += drain_ring(fd.get_mut(), &mut tracker, &mut maps);
                entries.clear();
                read_stats(&stats, "DB_STATS", &mut entries);
                read_stats(&stats_other, "DB_STATS_OTHER", &mut entries);
                tracker.fold(&entries, Instant::now(), &mut records);
                for k in tracker.idle.drain(..) {
                    let map = if k.key == 0 { &mut stats_other } else { &mut stats };
                    if map.remove(&k).is_ok() {
                        tracker.folded.remove(&k);
                    }
                }
                folding = true;
            }
        }
        register(&mut tracker, &mut maps);
        if events > 0 || folding || !tracker.slow.is_empty() || !tracker.losses.is_empty() {
            flush(&store, &cfg.db, &mut records, events, &mut tracker);
        }
    }
}

/// Entries of the kernel's count table read per syscall (1024 x 208 bytes).
const READ_CHUNK: u32 = 1024;

/// Every entry of one of the kernel's count tables: batched, a few syscalls for the whole
/// table (8,192 entries one by one would be 16,384 syscalls a fold); kernels without batch
/// lookups (before 5.6) get one lookup per entry.
fn read_stats(
    map: &aya::maps::HashMap<aya::maps::MapData, DbStatKey, DbStat>,
    name: &'static str,
    into: &mut Vec<(DbStatKey, DbStat)>,
) {
    match crate::probes::read_hash(map, name, READ_CHUNK) {
        Ok(v) => into.extend(v),
        Err(e) => {
            debug!(error = %crate::probes::error_chain(&e), "cannot read the kernel's query counts")
        }
    }
}

/// What the kernel needs of the config.
fn settings_of(cfg: &DbConfig, known_gen: u64) -> DbSettings {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
    let t = &cfg.slow_threshold;
    DbSettings {
        slow_ns: [0, ns(t.postgresql), ns(t.mysql), ns(t.redis)],
        known_gen,
    }
}

/// Reads what the ring holds; returns how many events. Keys are registered as they are
/// named, not when the ring is empty: under a flood it never is, and every request of a key
/// not registered sends its text.
fn drain_ring(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tracker: &mut Tracker,
    maps: &mut KeyMaps<'_>,
) -> u64 {
    let mut events = 0u64;
    while let Some(item) = ring.next() {
        events += 1;
        tracker.feed(&item, maps.cfg);
        if !tracker.named.is_empty() || !tracker.forgotten.is_empty() {
            register(tracker, maps);
        }
    }
    register(tracker, maps);
    events
}

/// What registering keys takes: the kernel's `DB_KNOWN` and settings, and the config.
struct KeyMaps<'a> {
    known: &'a mut aya::maps::HashMap<aya::maps::MapData, u64, u8>,
    settings: &'a mut aya::maps::Array<aya::maps::MapData, DbSettings>,
    applied: &'a mut Option<DbSettings>,
    cfg: &'a DbConfig,
}

/// Tells the kernel which keys are named (their text stops coming) and which are forgotten:
/// those are removed first, then `known_gen` moves on, so that no connection goes on
/// trusting its memory of one (a request in between may skip its text; the next sends it).
fn register(tracker: &mut Tracker, maps: &mut KeyMaps<'_>) {
    if !tracker.forgotten.is_empty() {
        for k in tracker.forgotten.drain(..) {
            let _ = maps.known.remove(&k);
        }
        tracker.known_gen += 1;
        let want = settings_of(maps.cfg, tracker.known_gen);
        match maps.settings.set(0, want, 0) {
            Ok(()) => *maps.applied = Some(want),
            Err(e) => {
                warn!(error = %crate::probes::error_chain(&e), "cannot update the database probe's settings")
            }
        }
    }
    let known = &mut maps.known;
    for k in tracker.named.drain(..) {
        if let Err(e) = known.insert(k, 1, 0) {
            debug!(error = %crate::probes::error_chain(&e), "cannot register a statement key");
        }
    }
}

/// Folds the kernel's counts into the store and logs the slow queries.
fn flush(
    store: &SharedStore,
    cfg: &DbConfig,
    records: &mut Vec<QueryRecord>,
    events: u64,
    tracker: &mut Tracker,
) {
    let Ok(mut st) = store.write() else {
        records.clear();
        tracker.losses.clear();
        tracker.slow.clear();
        return;
    };
    let cap = cfg.slow_log_capacity.max(1);
    {
        let t = &mut st.db_live;
        t.events += events;
        t.unmatched = tracker.unmatched;
        t.undecodable = tracker.undecodable;
        t.tables = tracker.tables();
        for (k, l) in tracker.losses.drain(..) {
            t.record_loss(k, &l, cfg.max_series);
        }
    }
    for s in tracker.slow.drain(..) {
        // The process-controlled fields are quoted and escaped when they need it: one line
        // per slow query, whatever they hold.
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
    for r in records.drain(..) {
        st.db_live.record(r, cfg.max_series, cfg.max_fingerprints);
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

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: plain repr(C) values without padding, viewed as their bytes.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
    }

    fn conn_event(sk: u64, conn_id: u64) -> DbConnEvent {
        let mut ev = DbConnEvent {
            kind: kind::CONN,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            family: AF_INET,
            pid: 1,
            sk,
            conn_id,
            cgroup_id: 0,
            comm: [0; agent_common::TASK_COMM_LEN],
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [0; 16],
            sport: 6379,
            dport: 40000,
            path_len: 0,
            path: [0; agent_common::db::DB_PATH_LEN],
            _pad: 0,
            dest: 0xde57,
            owner: 0x0a1e,
        };
        ev.comm[..5].copy_from_slice(b"redis");
        ev
    }

    fn redis_text(key: u64, cmd: &[u8]) -> DbTextEvent {
        let mut ev = DbTextEvent {
            kind: kind::TEXT,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            _pad: 0,
            pid: 1,
            sk: 9,
            conn_id: 3,
            key,
            len: cmd.len() as u32,
            prefix_len: cmd.len() as u32,
            prefix: [0; agent_common::db::DB_PREFIX_LEN],
        };
        ev.prefix[..cmd.len()].copy_from_slice(cmd);
        ev
    }

    fn stat_key(key: u64, o: u8) -> DbStatKey {
        DbStatKey {
            owner: 0x0a1e,
            dest: 0xde57,
            key,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            outcome: o,
            _pad: [0; 5],
        }
    }

    /// `n` requests of `ns` each.
    fn stat(n: u64, ns: u64) -> DbStat {
        let mut s = DbStat {
            count: n,
            sum_ns: n * ns,
            buckets: [0; HIST_BUCKETS],
        };
        s.buckets[agent_common::log2_bucket(ns)] = n as u32;
        s
    }

    #[test]
    fn texts_name_keys_and_kernel_counts_fold_as_differences() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.feed(as_bytes(&conn_event(9, 3)), &cfg);
        t.feed(
            as_bytes(&redis_text(7, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
            &cfg,
        );
        assert_eq!(t.named, [7], "the key is to be registered in the kernel");
        let now = Instant::now();
        let mut out = Vec::new();
        let entries = [
            (stat_key(7, outcome::OK), stat(3, 1_000)),
            (stat_key(7, outcome::NULL), stat(2, 5_000)),
            (
                stat_key(7, outcome::UNTIMED),
                DbStat {
                    count: 4,
                    ..stat(0, 0)
                },
            ),
        ];
        t.fold(&entries, now, &mut out);
        assert_eq!(out.len(), 3);
        for r in &out {
            assert_eq!(
                (
                    &*r.key.operation,
                    &*r.key.destination,
                    &*r.key.service,
                    &*r.fingerprint
                ),
                ("GET", "127.0.0.1:6379", "redis", "GET ?")
            );
        }
        assert_eq!((out[0].stats.duration.count, out[0].stats.misses), (3, 0));
        assert_eq!((out[1].stats.duration.count, out[1].stats.misses), (2, 2));
        assert_eq!(out[1].stats.duration.sum_ns, 10_000);
        assert_eq!((out[2].stats.untimed, out[2].stats.duration.count), (4, 0));
        // Unchanged counts give nothing; grown ones give the difference, buckets included.
        out.clear();
        t.fold(&entries, now, &mut out);
        assert!(out.is_empty());
        let mut grown = entries;
        grown[0].1 = stat(10, 1_000);
        t.fold(&grown, now, &mut out);
        assert_eq!(out.len(), 1);
        let h = &out[0].stats.duration;
        assert_eq!(
            (h.count, h.buckets[agent_common::log2_bucket(1_000)]),
            (7, 7)
        );
        assert_eq!(t.unmatched, 0);
    }

    #[test]
    fn counts_wait_for_their_names_then_go_to_unknown() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        let now = Instant::now();
        let entries = [(stat_key(5, outcome::OK), stat(6, 1_000))];
        let mut out = Vec::new();
        t.fold(&entries, now, &mut out);
        assert!(out.is_empty(), "held while the names may still come");
        // The names arrive within the wait: counted under them.
        t.feed(as_bytes(&conn_event(9, 3)), &cfg);
        t.feed(as_bytes(&redis_text(5, b"*1\r\n$4\r\nPING\r\n")), &cfg);
        t.fold(&entries, now + Duration::from_secs(1), &mut out);
        assert_eq!(&*out[0].key.operation, "PING");
        assert_eq!(out[0].stats.duration.count, 6);
        // A key whose text never comes is counted as `unknown` after the wait.
        let entries = [(stat_key(6, outcome::OK), stat(2, 1_000))];
        out.clear();
        t.fold(&entries, now, &mut out);
        t.fold(&entries, now + NAME_WAIT, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].key.operation, "unknown");
        assert_eq!(&*out[0].key.destination, "127.0.0.1:6379");
        assert_eq!(t.unmatched, 2);
    }

    #[test]
    fn unknown_redis_commands_share_one_operation_and_keep_their_fingerprint() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.feed(as_bytes(&conn_event(9, 3)), &cfg);
        t.feed(
            as_bytes(&redis_text(1, b"*2\r\n$4\r\nCMD1\r\n$1\r\nk\r\n")),
            &cfg,
        );
        t.feed(
            as_bytes(&redis_text(2, b"*2\r\n$4\r\nCMD2\r\n$1\r\nk\r\n")),
            &cfg,
        );
        t.feed(
            as_bytes(&redis_text(3, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
            &cfg,
        );
        t.feed(
            as_bytes(&redis_text(4, b"*2\r\n$5\r\nNEWER\r\n$1\r\nk\r\n")),
            &cfg,
        );
        let entries = [
            (stat_key(1, outcome::ERROR), stat(1, 1_000)),
            (stat_key(2, outcome::ERROR), stat(1, 1_000)),
            (stat_key(3, outcome::ERROR), stat(1, 1_000)),
            (stat_key(4, outcome::OK), stat(1, 1_000)),
        ];
        let mut out = Vec::new();
        t.fold(&entries, Instant::now(), &mut out);
        let ops: Vec<(&str, &str, u64)> = out
            .iter()
            .map(|r| (&*r.key.operation, &*r.fingerprint, r.stats.errors))
            .collect();
        // A known command that fails (WRONGTYPE and the like) keeps its name. A name outside
        // the table that the server accepted (a command newer than the table) is `unknown`:
        // labels never carry the client's text. Fingerprints keep the name.
        assert_eq!(
            ops,
            [
                ("unknown_command", "CMD1 ?", 1),
                ("unknown_command", "CMD2 ?", 1),
                ("GET", "GET ?", 1),
                ("unknown", "NEWER ?", 0),
            ]
        );
    }

    #[test]
    fn slow_events_name_their_statement_and_connection() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.feed(as_bytes(&conn_event(9, 3)), &cfg);
        t.feed(
            as_bytes(&redis_text(3, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
            &cfg,
        );
        let slow = DbSlowEvent {
            kind: kind::SLOW,
            system: agent_common::db::system::REDIS,
            role: agent_common::db::role::SERVER,
            outcome: outcome::NULL,
            pid: 1,
            sk: 9,
            conn_id: 3,
            key: 3,
            start_ns: 1_000,
            end_ns: 51_001_000,
        };
        t.feed(as_bytes(&slow), &cfg);
        assert_eq!(t.slow.len(), 1);
        let s = &t.slow[0];
        assert_eq!(
            (&*s.operation, &*s.text, &*s.destination, s.outcome),
            ("GET", "GET ?", "127.0.0.1:6379", Outcome::Miss)
        );
        assert!((s.duration_ms - 51.0).abs() < 1e-9);
        // Junk never panics.
        for junk in [
            &[][..],
            &[kind::CONN][..],
            &[kind::SLOW, 1, 2][..],
            &[99; 400][..],
        ] {
            t.feed(junk, &cfg);
        }
        assert_eq!(t.undecodable, 4);
    }

    #[test]
    fn raw_text_registers_no_key_and_forgets_those_registered() {
        let mut t = Tracker::new(false);
        let cfg = DbConfig::default();
        t.feed(
            as_bytes(&redis_text(3, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
            &cfg,
        );
        assert_eq!(t.named, [3]);
        t.named.clear();
        t.set_raw_text(true);
        assert_eq!(t.forgotten, [3]);
        t.feed(
            as_bytes(&redis_text(3, b"*2\r\n$3\r\nGET\r\n$2\r\nk2\r\n")),
            &cfg,
        );
        assert!(t.named.is_empty(), "every text keeps coming");
        assert_eq!(&*t.keys[&3].info.sample, "GET k2");
    }

    #[test]
    fn loss_events_count_under_the_connections_labels() {
        let mut t = Tracker::new(false);
        let conn = conn_event(9, 3);
        t.on_conn(&conn);
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
        t.feed(as_bytes(&loss), &DbConfig::default());
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
    }
}
