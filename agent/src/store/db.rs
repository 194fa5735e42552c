//! Query timings: cumulative per (system, role, operation, destination, service) for the
//! metrics, and per normalized query (fingerprint) for `insite-agent queries`.
//!
//! Entries are `Arc`-shared with the per-second snapshots the windows keep: a snapshot costs a
//! map of pointers, and only entries that changed since are copied (`Arc::make_mut`).

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use super::{histogram::Log2Histogram, window::Cumulative};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum System {
    Postgresql,
    Mysql,
    Redis,
}

impl System {
    pub const ALL: [System; 3] = [System::Postgresql, System::Mysql, System::Redis];

    pub fn as_str(self) -> &'static str {
        match self {
            System::Postgresql => "postgresql",
            System::Mysql => "mysql",
            System::Redis => "redis",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "postgresql" | "postgres" | "pg" => Some(System::Postgresql),
            "mysql" | "mariadb" => Some(System::Mysql),
            "redis" => Some(System::Redis),
            _ => None,
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Server,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

/// A code from the kernel this agent does not know (a mismatched kernel object, or garbage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} code {code} from the kernel")]
pub struct UnknownCode {
    pub what: &'static str,
    pub code: u8,
}

impl TryFrom<u8> for System {
    type Error = UnknownCode;

    fn try_from(code: u8) -> Result<Self, UnknownCode> {
        use agent_common::db::system;
        match code {
            system::POSTGRESQL => Ok(System::Postgresql),
            system::MYSQL => Ok(System::Mysql),
            system::REDIS => Ok(System::Redis),
            _ => Err(UnknownCode {
                what: "system",
                code,
            }),
        }
    }
}

impl TryFrom<u8> for Role {
    type Error = UnknownCode;

    fn try_from(code: u8) -> Result<Self, UnknownCode> {
        match code {
            agent_common::db::role::CLIENT => Ok(Role::Client),
            agent_common::db::role::SERVER => Ok(Role::Server),
            _ => Err(UnknownCode { what: "role", code }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error,
    /// A read that found nothing (Redis null reply to GET and friends).
    Miss,
    /// Null reply to a command that is not a read: not a miss.
    Null,
    /// A pipelined PostgreSQL statement the server skipped after an earlier error.
    Skipped,
}

impl Outcome {
    pub fn is_error(self) -> bool {
        matches!(self, Outcome::Error | Outcome::Skipped)
    }
}

/// Kernel-side counters of the database probe (cumulative, summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbKernelCounters {
    pub events: u64,
    pub drops: u64,
    pub inflight_full: u64,
    pub desync: u64,
    pub conns: u64,
    pub storage_failed: u64,
    pub tls: u64,
    pub lost_desync: u64,
    pub stats_full: u64,
    pub bytes_not_decoded: u64,
    pub step_cap: u64,
    pub gave_up: u64,
    pub texts: u64,
    pub slow_lost: u64,
}

/// Labels of one metric series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpKey {
    pub system: System,
    pub role: Role,
    pub operation: Arc<str>,
    pub destination: Arc<str>,
    pub service: Arc<str>,
}

impl OpKey {
    fn other(system: System, role: Role) -> Self {
        let o: Arc<str> = Arc::from("other");
        Self {
            system,
            role,
            operation: o.clone(),
            destination: o.clone(),
            service: o,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct OpStats {
    pub duration: Log2Histogram,
    pub errors: u64,
    pub misses: u64,
    /// Counted but not timed: sent while `DB_INFLIGHT` requests were in flight on their
    /// connection (outcome unknown, so not in `errors` or `misses` either).
    pub untimed: u64,
}

impl OpStats {
    /// One timed query.
    pub fn one(ns: u64, outcome: Outcome) -> Self {
        let mut s = Self::default();
        s.duration.record(ns);
        s.errors = u64::from(outcome.is_error());
        s.misses = u64::from(outcome == Outcome::Miss);
        s
    }

    pub fn add(&mut self, o: &Self) {
        self.duration.add(&o.duration);
        self.errors += o.errors;
        self.misses += o.misses;
        self.untimed += o.untimed;
    }

    /// Queries counted, timed or not.
    pub fn count(&self) -> u64 {
        self.duration.count + self.untimed
    }

    fn delta_since(&self, e: &Self) -> Self {
        Self {
            duration: self.duration.delta_since(&e.duration),
            errors: self.errors.saturating_sub(e.errors),
            misses: self.misses.saturating_sub(e.misses),
            untimed: self.untimed.saturating_sub(e.untimed),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FpKey {
    pub system: System,
    pub role: Role,
    /// Per server, as pg_stat_statements is per database server.
    pub destination: Arc<str>,
    pub fingerprint: Arc<str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FpStats {
    pub operation: Arc<str>,
    pub stats: OpStats,
    /// A recent example (masked unless `db.log_raw_text`).
    pub sample: Arc<str>,
    /// The process that sent (client) or served (server) it most recently.
    pub process: Option<(u32, Arc<str>)>,
}

/// Queries of one statement under one series, as the collector hands them to the store:
/// what the kernel counted since the collector last read its counts.
#[derive(Debug, Clone)]
pub struct QueryRecord {
    pub key: OpKey,
    pub fingerprint: Arc<str>,
    pub sample: Arc<str>,
    pub stats: OpStats,
    pub process: Option<(u32, Arc<str>)>,
}

/// Where requests were lost: the labels of a series without its operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LossKey {
    pub system: System,
    pub role: Role,
    pub destination: Arc<str>,
    pub service: Arc<str>,
}

impl LossKey {
    fn other(system: System, role: Role) -> Self {
        let o: Arc<str> = Arc::from("other");
        Self {
            system,
            role,
            destination: o.clone(),
            service: o,
        }
    }
}

/// Requests the kernel saw but could not time, by why, and bytes it could not decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossStats {
    /// Beyond the in-flight limit: counted, responses matched in order, not timed.
    pub untimed: u64,
    /// In flight when the connection's framing was lost.
    pub desync: u64,
    /// Completed, but not counted: both of the kernel's count tables were full.
    pub event_lost: u64,
    /// Bytes of reads and writes not decoded (after a desync, or past the step cap).
    pub bytes: u64,
}

impl LossStats {
    pub fn requests(&self) -> u64 {
        self.untimed + self.desync + self.event_lost
    }

    fn add(&mut self, o: &Self) {
        self.untimed += o.untimed;
        self.desync += o.desync;
        self.event_lost += o.event_lost;
        self.bytes += o.bytes;
    }

    fn delta_since(&self, e: &Self) -> Self {
        Self {
            untimed: self.untimed.saturating_sub(e.untimed),
            desync: self.desync.saturating_sub(e.desync),
            event_lost: self.event_lost.saturating_sub(e.event_lost),
            bytes: self.bytes.saturating_sub(e.bytes),
        }
    }

    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Default)]
pub struct DbTotals {
    pub ops: HashMap<OpKey, Arc<OpStats>>,
    pub fingerprints: HashMap<FpKey, Arc<FpStats>>,
    /// Queries counted under an `other` key because `db.max_series` was reached.
    pub ops_overflowed: u64,
    /// ...or under the fingerprint `other` because `db.max_fingerprints` was reached.
    pub fingerprints_overflowed: u64,
    /// Queries whose statement text never reached userspace (operation `unknown`).
    pub unmatched: u64,
    /// Events read from the ring buffer.
    pub events: u64,
    /// Events that could not be decoded.
    pub undecodable: u64,
    /// Requests not timed and bytes not decoded, per connection's labels (bounded like `ops`).
    pub losses: HashMap<LossKey, LossStats>,
    pub kernel: DbKernelCounters,
    /// Entries in the collector's bounded tables now (not cumulative).
    pub tables: DbTables,
}

/// How full the database collector's bounded tables are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbTables {
    pub connections: u64,
    /// Statement keys named.
    pub keys: u64,
    pub statements: u64,
    pub parse_cache: u64,
    /// Entries of the kernel's `DB_STATS`.
    pub kernel_stats: u64,
}

impl DbTotals {
    pub fn record_loss(&mut self, key: LossKey, loss: &LossStats, max_series: usize) {
        let key = if self.losses.contains_key(&key) || self.losses.len() < max_series {
            key
        } else {
            LossKey::other(key.system, key.role)
        };
        self.losses.entry(key).or_default().add(loss);
    }

    pub fn record(&mut self, q: QueryRecord, max_series: usize, max_fingerprints: usize) {
        let (system, role) = (q.key.system, q.key.role);
        let n = q.stats.count();
        let apply = |s: &mut OpStats| s.add(&q.stats);
        let key = if self.ops.contains_key(&q.key) || self.ops.len() < max_series {
            q.key.clone()
        } else {
            self.ops_overflowed += n;
            OpKey::other(system, role)
        };
        apply(Arc::make_mut(self.ops.entry(key).or_default()));

        let mut fk = FpKey {
            system,
            role,
            destination: q.key.destination.clone(),
            fingerprint: q.fingerprint.clone(),
        };
        if !self.fingerprints.contains_key(&fk) && self.fingerprints.len() >= max_fingerprints {
            self.fingerprints_overflowed += n;
            fk.fingerprint = Arc::from("other");
        }
        let e = self.fingerprints.entry(fk).or_insert_with(|| {
            Arc::new(FpStats {
                operation: q.key.operation.clone(),
                stats: OpStats::default(),
                sample: q.sample.clone(),
                process: None,
            })
        });
        let e = Arc::make_mut(e);
        apply(&mut e.stats);
        e.sample = q.sample;
        if q.process.is_some() {
            e.process = q.process;
        }
    }
}

impl Cumulative for DbTotals {
    fn delta_since(&self, earlier: &Self) -> Self {
        let ops = self
            .ops
            .iter()
            .filter_map(|(k, v)| {
                let d = match earlier.ops.get(k) {
                    Some(e) if Arc::ptr_eq(e, v) => return None,
                    Some(e) => v.delta_since(e),
                    None => (**v).clone(),
                };
                (d.count() > 0).then(|| (k.clone(), Arc::new(d)))
            })
            .collect();
        let fingerprints = self
            .fingerprints
            .iter()
            .filter_map(|(k, v)| {
                let stats = match earlier.fingerprints.get(k) {
                    Some(e) if Arc::ptr_eq(e, v) => return None,
                    Some(e) => v.stats.delta_since(&e.stats),
                    None => v.stats.clone(),
                };
                (stats.count() > 0).then(|| {
                    let mut f = (**v).clone();
                    f.stats = stats;
                    (k.clone(), Arc::new(f))
                })
            })
            .collect();
        Self {
            ops,
            fingerprints,
            ops_overflowed: self.ops_overflowed.saturating_sub(earlier.ops_overflowed),
            fingerprints_overflowed: self
                .fingerprints_overflowed
                .saturating_sub(earlier.fingerprints_overflowed),
            unmatched: self.unmatched.saturating_sub(earlier.unmatched),
            events: self.events.saturating_sub(earlier.events),
            undecodable: self.undecodable.saturating_sub(earlier.undecodable),
            losses: self
                .losses
                .iter()
                .filter_map(|(k, v)| {
                    let d = match earlier.losses.get(k) {
                        Some(e) => v.delta_since(e),
                        None => *v,
                    };
                    (!d.is_zero()).then(|| (k.clone(), d))
                })
                .collect(),
            kernel: kernel_delta(&self.kernel, &earlier.kernel),
            tables: self.tables,
        }
    }
}

fn kernel_delta(a: &DbKernelCounters, b: &DbKernelCounters) -> DbKernelCounters {
    DbKernelCounters {
        events: a.events.saturating_sub(b.events),
        drops: a.drops.saturating_sub(b.drops),
        inflight_full: a.inflight_full.saturating_sub(b.inflight_full),
        desync: a.desync.saturating_sub(b.desync),
        conns: a.conns.saturating_sub(b.conns),
        storage_failed: a.storage_failed.saturating_sub(b.storage_failed),
        tls: a.tls.saturating_sub(b.tls),
        lost_desync: a.lost_desync.saturating_sub(b.lost_desync),
        stats_full: a.stats_full.saturating_sub(b.stats_full),
        texts: a.texts.saturating_sub(b.texts),
        slow_lost: a.slow_lost.saturating_sub(b.slow_lost),
        bytes_not_decoded: a.bytes_not_decoded.saturating_sub(b.bytes_not_decoded),
        step_cap: a.step_cap.saturating_sub(b.step_cap),
        gave_up: a.gave_up.saturating_sub(b.gave_up),
    }
}

/// A query over its system's `db.slow_threshold`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlowQuery {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    pub system: System,
    pub role: Role,
    pub operation: String,
    pub fingerprint: String,
    pub text: String,
    pub duration_ms: f64,
    pub outcome: Outcome,
    pub pid: u32,
    pub comm: String,
    pub service: String,
    pub destination: String,
}

/// Series for export: the `top_n` busiest keep their labels, the rest of each
/// (system, role) fold into `other`. Returns the rows and how many keys were folded.
pub fn top_series(
    ops: &HashMap<OpKey, Arc<OpStats>>,
    top_n: usize,
) -> (Vec<(OpKey, OpStats)>, usize) {
    let mut all: Vec<(&OpKey, &Arc<OpStats>)> = ops.iter().collect();
    all.sort_by(|a, b| b.1.count().cmp(&a.1.count()).then_with(|| a.0.cmp(b.0)));
    let mut rows: Vec<(OpKey, OpStats)> = Vec::new();
    let mut other: HashMap<(System, Role), OpStats> = HashMap::new();
    let mut folded = 0;
    for (i, (k, v)) in all.into_iter().enumerate() {
        // The `other` series (of `db.max_series`) is added to, not kept as a row; statements
        // the kernel counted as `other` keep their destination and service.
        let is_other = *k == OpKey::other(k.system, k.role);
        if i < top_n && !is_other {
            rows.push((k.clone(), (**v).clone()));
        } else {
            folded += usize::from(!is_other);
            other.entry((k.system, k.role)).or_default().add(v);
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut others: Vec<_> = other.into_iter().collect();
    others.sort_by_key(|(k, _)| *k);
    for ((system, role), s) in others {
        rows.push((OpKey::other(system, role), s));
    }
    (rows, folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_codes_convert_and_unknown_ones_are_named() {
        use agent_common::db::{role, system};
        for (code, sys) in [
            (system::POSTGRESQL, System::Postgresql),
            (system::MYSQL, System::Mysql),
            (system::REDIS, System::Redis),
        ] {
            assert_eq!(System::try_from(code), Ok(sys));
        }
        assert_eq!(Role::try_from(role::CLIENT), Ok(Role::Client));
        assert_eq!(Role::try_from(role::SERVER), Ok(Role::Server));
        let e = System::try_from(200).unwrap_err();
        assert_eq!(e.to_string(), "unknown system code 200 from the kernel");
        assert!(Role::try_from(0).is_err());
    }

    fn rec(op: &str, fp: &str, ns: u64, outcome: Outcome) -> QueryRecord {
        QueryRecord {
            key: OpKey {
                system: System::Redis,
                role: Role::Client,
                operation: Arc::from(op),
                destination: Arc::from("127.0.0.1:6379"),
                service: Arc::from("app"),
            },
            fingerprint: Arc::from(fp),
            sample: Arc::from(fp),
            stats: OpStats::one(ns, outcome),
            process: Some((7, Arc::from("app"))),
        }
    }

    #[test]
    fn records_counts_errors_misses_and_folds_beyond_the_bounds() {
        let mut t = DbTotals::default();
        for i in 0..20 {
            t.record(
                rec(&format!("OP{i}"), &format!("FP{i}"), 1000, Outcome::Ok),
                16,
                16,
            );
        }
        t.record(rec("GET", "GET ?", 5_000, Outcome::Miss), 16, 16);
        t.record(rec("OP0", "FP0", 5_000, Outcome::Error), 16, 16);
        assert_eq!(t.ops.len(), 17, "16 keys and one other");
        assert_eq!(t.ops_overflowed, 5, "OP16..OP19 and GET");
        let other = &t.ops[&OpKey::other(System::Redis, Role::Client)];
        assert_eq!(other.duration.count, 5);
        assert_eq!(other.misses, 1);
        let op0 = t
            .ops
            .iter()
            .find(|(k, _)| &*k.operation == "OP0")
            .unwrap()
            .1;
        assert_eq!((op0.duration.count, op0.errors), (2, 1));
        assert_eq!(t.fingerprints_overflowed, 5);
    }

    #[test]
    fn losses_add_up_per_connection_labels_fold_beyond_the_bound_and_subtract() {
        let key = |d: &str| LossKey {
            system: System::Redis,
            role: Role::Client,
            destination: Arc::from(d),
            service: Arc::from("app"),
        };
        let l = LossStats {
            untimed: 2,
            desync: 1,
            event_lost: 0,
            bytes: 10,
        };
        let mut t = DbTotals::default();
        for d in ["a", "b", "a", "c"] {
            t.record_loss(key(d), &l, 2);
        }
        assert_eq!(t.losses[&key("a")].untimed, 4);
        assert_eq!(t.losses[&key("b")].requests(), 3);
        assert_eq!(
            t.losses[&LossKey::other(System::Redis, Role::Client)].bytes,
            10,
            "c is beyond the bound"
        );
        assert_eq!(t.losses.values().map(LossStats::requests).sum::<u64>(), 12);
        let before = t.clone();
        t.record_loss(key("b"), &l, 2);
        let d = t.delta_since(&before);
        assert_eq!(d.losses.len(), 1, "only b changed");
        assert_eq!(d.losses[&key("b")], l);
    }

    #[test]
    fn windows_subtract_and_share_unchanged_entries() {
        let mut t = DbTotals::default();
        t.record(rec("GET", "GET ?", 1000, Outcome::Ok), 100, 100);
        t.record(rec("SET", "SET ? ?", 1000, Outcome::Ok), 100, 100);
        let before = t.clone();
        t.record(rec("GET", "GET ?", 1000, Outcome::Miss), 100, 100);
        let d = t.delta_since(&before);
        assert_eq!(d.ops.len(), 1, "SET did not change");
        let get = d.ops.values().next().unwrap();
        assert_eq!((get.duration.count, get.misses), (1, 1));
        assert_eq!(d.fingerprints.len(), 1);
    }

    #[test]
    fn top_series_keeps_the_busiest_and_folds_the_rest_per_system_and_role() {
        let mut t = DbTotals::default();
        for (op, n) in [("GET", 5), ("SET", 3), ("DEL", 1)] {
            for _ in 0..n {
                t.record(rec(op, op, 1000, Outcome::Ok), 100, 100);
            }
        }
        let (rows, folded) = top_series(&t.ops, 2);
        assert_eq!(folded, 1);
        let ops: Vec<&str> = rows.iter().map(|r| &*r.0.operation).collect();
        assert_eq!(ops, ["GET", "SET", "other"]);
        assert_eq!(rows[2].1.duration.count, 1);
    }
}
