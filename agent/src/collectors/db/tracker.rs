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
        use crate::collectors::decode_event;
        let Some(Ok(kind)) = bytes.first().copied().map(EventKind::try_from) else {
            self.undecodable += 1;
            return;
        };
        let decoded = match kind {
            EventKind::Conn => decode_event::<DbConnEvent>(bytes).map(|ev| self.on_conn(&ev)),
            EventKind::Text => decode_event::<DbTextEvent>(bytes).map(|ev| self.on_text(&ev)),
            EventKind::Slow => decode_event::<DbSlowEvent>(bytes).map(|ev| self.on_slow(&ev, cfg)),
            EventKind::Loss => decode_event::<DbLossEvent>(bytes).map(|ev| self.on_loss(&ev)),
        };
        if decoded.is_none() {
            self.undecodable += 1;
        }
    }

    pub(super) fn on_conn(&mut self, ev: &DbConnEvent) {
        let Some((_, role)) = system_role(ev.system, ev.role) else {
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
        let Some((system, role)) = system_role(ev.system, ev.role) else {
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
        let Some((system, role)) = system_role(ev.system, ev.role) else {
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
            let Some((system, role)) = system_role(k.system, k.role) else {
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
            if KernelOutcome::try_from(k.outcome) == Ok(KernelOutcome::Untimed) {
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

/// The kernel's system and role codes, both known, or `None`.
fn system_role(system: u8, role: u8) -> Option<(System, Role)> {
    Some((System::try_from(system).ok()?, Role::try_from(role).ok()?))
}

pub(super) fn outcome_of(o: u8, info: &QueryInfo) -> Outcome {
    match KernelOutcome::try_from(o) {
        Ok(KernelOutcome::Error) => Outcome::Error,
        Ok(KernelOutcome::Skipped) => Outcome::Skipped,
        Ok(KernelOutcome::Null) if info.read => Outcome::Miss,
        Ok(KernelOutcome::Null) => Outcome::Null,
        // Untimed requests have no outcome; one kernel object and one agent are built
        // together, so an unknown code cannot arrive: it would count as answered.
        Ok(KernelOutcome::Ok | KernelOutcome::Untimed) | Err(_) => Outcome::Ok,
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
mod tests;
