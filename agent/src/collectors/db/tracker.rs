//! What the collector knows of the kernel's ids (connections, destinations, owners,
//! statement keys) from its events, and the fold of the kernel's counts into store records.

use super::*;

/// Names the kernel's ids (statement keys, destinations, owners) and turns its counts into
/// store records.
pub struct Tracker {
    pub(super) names: Names,
    pub(super) conns: HashMap<(u64, u64), ConnInfo>,
    pub(super) dests: HashMap<u64, Arc<str>>,
    pub(super) owners: HashMap<u64, Arc<str>>,
    pub(super) keys: HashMap<u64, KeyInfo>,
    pub(super) folded: HashMap<DbStatKey, Folded>,
    pub(super) cache: ParseCache,
    /// Prepared statements kept, over every connection.
    pub(super) statements: usize,
    pub(super) unknown: Arc<QueryInfo>,
    /// What the kernel counted without its statement (key 0: its table was full).
    pub(super) other: Arc<QueryInfo>,
    /// The operation of a Redis command the server rejected as unknown: one label for every
    /// such name, whatever a client sends (its fingerprint keeps the name).
    pub(super) unknown_command: Arc<str>,
    pub(super) raw_text: bool,
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
            Some(kind::CONN) => match crate::collectors::decode_event::<DbConnEvent>(bytes) {
                Some(ev) => self.on_conn(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::TEXT) => match crate::collectors::decode_event::<DbTextEvent>(bytes) {
                Some(ev) => self.on_text(&ev),
                None => self.undecodable += 1,
            },
            Some(kind::SLOW) => match crate::collectors::decode_event::<DbSlowEvent>(bytes) {
                Some(ev) => self.on_slow(&ev, cfg),
                None => self.undecodable += 1,
            },
            Some(kind::LOSS) => match crate::collectors::decode_event::<DbLossEvent>(bytes) {
                Some(ev) => self.on_loss(&ev),
                None => self.undecodable += 1,
            },
            _ => self.undecodable += 1,
        }
    }

    pub(super) fn on_conn(&mut self, ev: &DbConnEvent) {
        let (Some(_), Some(role)) = (
            System::try_from(ev.system).ok(),
            Role::try_from(ev.role).ok(),
        ) else {
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

    pub(super) fn evict_conns(&mut self) {
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
    pub(super) fn on_text(&mut self, ev: &DbTextEvent) {
        let n = (ev.prefix_len as usize).min(ev.prefix.len());
        let prefix = &ev.prefix[..n];
        let Some(system) = System::try_from(ev.system).ok() else {
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
    pub(super) fn key_info(&self, key: u64) -> Option<&KeyInfo> {
        self.keys.get(&key)
    }

    pub(super) fn on_slow(&mut self, ev: &DbSlowEvent, cfg: &DbConfig) {
        let (Some(system), Some(role)) = (
            System::try_from(ev.system).ok(),
            Role::try_from(ev.role).ok(),
        ) else {
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
    pub(super) fn operation(
        &self,
        system: System,
        result: Outcome,
        info: &Arc<QueryInfo>,
    ) -> Arc<str> {
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
    pub(super) fn on_loss(&mut self, ev: &DbLossEvent) {
        let (Some(system), Some(role)) = (
            System::try_from(ev.system).ok(),
            Role::try_from(ev.role).ok(),
        ) else {
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
                (System::try_from(k.system).ok(), Role::try_from(k.role).ok())
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

pub(super) fn outcome_of(o: u8, info: &QueryInfo) -> Outcome {
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
pub(super) fn destination(ev: &DbConnEvent, role: Role) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
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
