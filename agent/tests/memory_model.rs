//! The memory model of `budget` against what the store really allocates: each bounded table
//! (connection edges, query series, query fingerprints) is filled to a size with every entry
//! changing on every tick, the worst a workload can do to the rolling windows, for longer
//! than the windows reach back; the heap bytes it holds then must stay within what the model
//! charges per entry. A counting allocator measures them.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicIsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use agent_common::net::{NetEdge, NetEdgeKey};
use insite_agent::{
    budget,
    collectors::net::{FoldConfig, Folder},
    store::{
        db::{DbTotals, OpKey, OpStats, Outcome, QueryRecord, Role, System as DbSystem},
        net::{Direction, EdgeCounters, EdgeKey, NetTotals},
        window::Windows,
        WINDOW_GRANULARITY, WINDOW_RETENTION,
    },
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Allocations made by this thread (const-initialised: reading it allocates nothing).
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn allocs() -> u64 {
    ALLOCS.with(std::cell::Cell::get)
}

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: same layout as asked.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: allocated above with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: as GlobalAlloc::realloc requires.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// One test at a time: the counter is process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// 70 s of 250 ms ticks (longer than the 60 s the windows keep), each calling `touch` on the
/// live totals and pushing a snapshot; returns the heap bytes held at the end.
fn churn<T: insite_agent::store::window::Cumulative>(
    live: &mut T,
    mut touch: impl FnMut(&mut T, u64),
) -> (isize, Windows<T>) {
    let t0 = Instant::now();
    let mut w = Windows::new(WINDOW_GRANULARITY, WINDOW_RETENTION);
    for tick in 0..280u64 {
        touch(live, tick);
        w.push(t0 + Duration::from_millis(250 * tick), live.clone());
    }
    (LIVE.load(Ordering::Relaxed), w)
}

#[test]
fn edges_cost_what_the_model_says() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 2000usize;
    let before = LIVE.load(Ordering::Relaxed);
    let services: Vec<Arc<str>> = (0..n)
        .map(|i| Arc::from(format!("svc-{i}.service").as_str()))
        .collect();
    let mut live = NetTotals::default();
    // One connection per edge stays open; every tick samples each edge, so each snapshot
    // holds its own copy of every edge.
    let (after, w) = churn(&mut live, |t, tick| {
        for (i, svc) in services.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            let key = EdgeKey {
                direction: Direction::Outbound,
                service: svc.clone(),
                peer: Some(ip),
                destination: Some(SocketAddr::new(ip, 5432)),
            };
            let mut d = EdgeCounters {
                connects: u64::from(tick == 0),
                bytes_sent: 10,
                bytes_received: 10,
                ..EdgeCounters::default()
            };
            if tick == 0 {
                d.connect_time.record(1000);
            }
            d.rtt.record(5000 + tick);
            let at = t.add(&key, &d, n);
            if tick == 0 {
                t.move_open(None, 0, &at, 1);
            }
        }
    });
    let per = (after - before) as f64 / n as f64;
    eprintln!(
        "edge: {per:.0} bytes each, one open connection included ({} snapshots)",
        w.snapshots()
    );
    let model = budget::EDGE_BYTES as f64;
    assert!(
        per <= model,
        "an edge costs {per:.0} bytes, the model says {model}"
    );
    drop((w, live, services));
}

/// `n` kernel edges, one per peer, each with a handshake and bytes.
fn kernel_edges(n: usize) -> Vec<(NetEdgeKey, NetEdge)> {
    (0..n)
        .map(|i| {
            let mut k = NetEdgeKey {
                cgroup_id: 1,
                comm: *b"client\0\0\0\0\0\0\0\0\0\0",
                dport: 5432,
                family: 2,
                direction: agent_common::net::direction::OUTBOUND,
                ..NetEdgeKey::default()
            };
            k.peer[..4].copy_from_slice(&(0x0a00_0000 + i as u32).to_be_bytes());
            k.dest = k.peer;
            let mut v = NetEdge {
                connects: 1,
                bytes_sent: 10,
                last_pid: 42,
                ..NetEdge::default()
            };
            v.connect_buckets[10] = 1;
            (k, v)
        })
        .collect()
}

#[test]
fn kernel_edges_cost_what_the_model_says() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The kernel's table full at the default net.max_edges, every entry changing.
    let n = insite_agent::probes::net::kernel_edges(1024) as usize;
    let cfg = FoldConfig {
        max_edges: 16,
        ignored: Vec::new(),
    };
    let mut totals = NetTotals::default();
    let mut folder = Folder::new();
    let before = LIVE.load(Ordering::Relaxed);
    let mut entries = kernel_edges(n);
    let now = Instant::now();
    folder.fold(&entries, Default::default(), &mut totals, &cfg, now);
    for (_, v) in &mut entries {
        v.connects += 1;
        v.bytes_sent += 10;
    }
    folder.fold(&entries, Default::default(), &mut totals, &cfg, now);
    let per = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    eprintln!("kernel edge: {per:.0} bytes each, with its share of the read buffer");
    assert_eq!(folder.len(), n);
    assert!(
        per <= budget::KERNEL_EDGE_BYTES as f64,
        "a kernel edge costs {per:.0} bytes, the model says {}",
        budget::KERNEL_EDGE_BYTES
    );
}

fn record(i: usize, tick: u64) -> QueryRecord {
    let op: Arc<str> = Arc::from("SELECT");
    QueryRecord {
        key: OpKey {
            system: DbSystem::Postgresql,
            role: Role::Client,
            operation: op,
            destination: Arc::from(format!("10.0.{}.{}:5432", i / 256, i % 256).as_str()),
            service: Arc::from("api.service"),
        },
        // As long as fingerprints get (sql::MAX_FINGERPRINT).
        fingerprint: Arc::from(format!("SELECT {i} {}", "x".repeat(500)).as_str()),
        sample: Arc::from(format!("SELECT {i} {}", "y".repeat(500)).as_str()),
        stats: OpStats::one(1000 + tick, Outcome::Ok),
        process: Some((42, Arc::from("psql"))),
    }
}

#[test]
fn query_series_and_fingerprints_cost_what_the_model_says() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = 2000usize;
    let before = LIVE.load(Ordering::Relaxed);
    let mut live = DbTotals::default();
    // Each record makes one series (distinct destination) and one fingerprint.
    let (after, w) = churn(&mut live, |t, tick| {
        for i in 0..n {
            t.record(record(i, tick), n, n);
        }
    });
    let per = (after - before) as f64 / n as f64;
    let model = (budget::DB_SERIES_BYTES + budget::FINGERPRINT_BYTES) as f64;
    eprintln!(
        "db series + fingerprint: {per:.0} bytes each ({} snapshots)",
        w.snapshots()
    );
    assert!(
        per <= model,
        "a series and a fingerprint cost {per:.0} bytes, the model says {model}"
    );
    drop((w, live));
}

/// The bytes of a `#[repr(C)]` event, as the kernel writes it into the ring buffer.
fn event_bytes<T: Copy>(ev: &T) -> Vec<u8> {
    // SAFETY: plain-data event types without padding (agent-common checks their sizes).
    unsafe { std::slice::from_raw_parts((ev as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

/// A statement text the kernel sends for a key not named yet.
fn request(system: u8, sk: u64, key: u64, prefix: &[u8]) -> Vec<u8> {
    use agent_common::db::{kind, role, DbTextEvent, DB_PREFIX_LEN};
    let mut ev = DbTextEvent {
        kind: kind::TEXT,
        system,
        role: role::CLIENT,
        _pad: 0,
        pid: 1,
        sk,
        conn_id: 1,
        key,
        len: prefix.len() as u32,
        prefix_len: prefix.len().min(DB_PREFIX_LEN) as u32,
        prefix: [0; DB_PREFIX_LEN],
    };
    let n = prefix.len().min(DB_PREFIX_LEN);
    ev.prefix[..n].copy_from_slice(&prefix[..n]);
    event_bytes(&ev)
}

/// The database collector's own tables at their bounds: connections, destinations and owners
/// remembered, prepared statements kept, statement keys named, the parse cache, and what it
/// holds of every entry of the kernel's count table.
#[test]
fn database_collector_tables_cost_what_the_model_says() {
    use agent_common::db::{
        kind, outcome, role, system, DbConnEvent, DbStat, DbStatKey, DB_PATH_LEN, DB_STATS_ENTRIES,
    };
    use insite_agent::collectors::db::{
        Tracker, MAX_CONNS, MAX_KEYS, MAX_PARSE_CACHE, MAX_STATEMENTS_TOTAL,
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = insite_agent::config::DbConfig::default();
    let before = LIVE.load(Ordering::Relaxed);
    let mut t = Tracker::new(false);
    let sock = |i: usize| 0xffff_0000_0000 + i as u64 * 64;
    for i in 0..MAX_CONNS {
        let mut path = [0u8; DB_PATH_LEN];
        let p = format!("/run/postgresql/{i:0>90}");
        path[..p.len()].copy_from_slice(p.as_bytes());
        let ev = DbConnEvent {
            kind: kind::CONN,
            system: system::POSTGRESQL,
            role: role::CLIENT,
            family: 1,
            pid: 1,
            sk: sock(i),
            conn_id: 1,
            cgroup_id: 0,
            comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            path_len: p.len() as u32,
            path,
            _pad: 0,
            dest: i as u64,
            owner: i as u64,
        };
        t.feed(&event_bytes(&ev), &cfg);
    }
    // Statements of 200 bytes of SQL each, 256 on a connection, until none more is kept.
    let mut seq = 0;
    for i in 0..(MAX_STATEMENTS_TOTAL / 256 + 2) {
        for s in 0..256 {
            let name = format!("stmt_{s}");
            let sql = format!("SELECT c{s}, {} FROM t{i} WHERE id = $1", "x".repeat(160));
            let mut body = name.into_bytes();
            body.push(0);
            body.extend_from_slice(sql.as_bytes());
            body.extend_from_slice(&[0, 0, 0]);
            let mut msg = vec![b'P'];
            msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
            msg.extend_from_slice(&body);
            t.feed(&request(system::POSTGRESQL, sock(i), seq, &msg), &cfg);
            seq += 1;
        }
    }
    // Distinct MySQL queries (cacheable) fill the parse cache...
    for i in 0..MAX_PARSE_CACHE - 1 {
        let mut q = vec![0x03];
        q.extend_from_slice(format!("SELECT * FROM t WHERE name = '{i:0>200}'").as_bytes());
        t.feed(&request(system::MYSQL, sock(MAX_CONNS - 1), seq, &q), &cfg);
        seq += 1;
    }
    // ...statement keys fill the keys table...
    let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    while (seq as usize) < MAX_KEYS - 1 {
        t.feed(&request(system::REDIS, sock(MAX_CONNS - 2), seq, get), &cfg);
        seq += 1;
    }
    // ...and every entry of the kernel's count table has been folded.
    let entries: Vec<(DbStatKey, DbStat)> = (0..DB_STATS_ENTRIES as u64)
        .map(|i| {
            let k = DbStatKey {
                owner: i,
                dest: i,
                key: i,
                system: system::REDIS,
                role: role::CLIENT,
                outcome: outcome::OK,
                _pad: [0; 5],
            };
            let mut v = DbStat {
                count: 1,
                sum_ns: 1000,
                buckets: [0; agent_common::HIST_BUCKETS],
            };
            v.buckets[9] = 1;
            (k, v)
        })
        .collect();
    let mut records = Vec::new();
    t.fold(&entries, std::time::Instant::now(), &mut records);
    drop((entries, records));
    let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64;
    eprintln!(
        "database collector at its bounds: {:.1} MiB",
        bytes / (1 << 20) as f64
    );
    let tables = t.tables();
    assert_eq!(
        (tables.keys, tables.kernel_stats),
        (MAX_KEYS as u64 - 1, u64::from(DB_STATS_ENTRIES)),
        "a table was started afresh: the test asked too much"
    );
    assert!(
        bytes <= budget::DB_COLLECTOR_BYTES as f64,
        "the database collector holds {bytes} bytes, the model says {}",
        budget::DB_COLLECTOR_BYTES
    );
    drop(t);
}

/// Issue 10: the readers do not allocate per event on the hot path. The folds of the
/// kernel's counts (connection edges, database statements) that changed allocate nothing
/// once warm.
#[test]
fn known_events_and_count_folds_allocate_nothing() {
    use agent_common::db::{outcome, role, system, DbStat, DbStatKey};
    use insite_agent::collectors::db::Tracker;
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = FoldConfig {
        max_edges: 2000,
        ignored: Vec::new(),
    };
    let mut totals = NetTotals::default();
    let mut folder = Folder::new();
    let mut entries = kernel_edges(1000);
    folder.fold(
        &entries,
        Default::default(),
        &mut totals,
        &cfg,
        Instant::now(),
    );
    for (_, v) in &mut entries {
        v.connects += 1;
        v.closes += 1;
        v.rtt_buckets[12] += 2;
        v.bytes_received += 100;
    }
    let before = allocs();
    folder.fold(
        &entries,
        Default::default(),
        &mut totals,
        &cfg,
        Instant::now(),
    );
    assert_eq!(
        allocs() - before,
        0,
        "allocations folding 1000 changed connection edges"
    );
    assert_eq!(totals.edges.values().map(|e| e.connects).sum::<u64>(), 2000);

    let mut t = Tracker::new(false);
    let mut entries: Vec<(DbStatKey, DbStat)> = (0..1000u64)
        .map(|i| {
            let k = DbStatKey {
                owner: 1,
                dest: 1,
                key: 0,
                system: system::REDIS,
                role: role::CLIENT,
                outcome: outcome::OK,
                _pad: [0; 5],
            };
            let k = DbStatKey { dest: i, ..k };
            let v = DbStat {
                count: 1,
                sum_ns: 1000,
                buckets: [0; agent_common::HIST_BUCKETS],
            };
            (k, v)
        })
        .collect();
    let now = std::time::Instant::now();
    let mut out = Vec::with_capacity(entries.len());
    // The first fold meets the entries (and holds them: their destinations are not named).
    t.fold(&entries, now, &mut out);
    for (_, v) in &mut entries {
        v.count += 5;
        v.sum_ns += 5000;
        v.buckets[9] += 5;
    }
    let later = now + std::time::Duration::from_secs(5);
    let before = allocs();
    t.fold(&entries, later, &mut out);
    assert_eq!(out.len(), entries.len());
    assert_eq!(
        allocs() - before,
        0,
        "allocations folding 1000 changed counts"
    );
}
