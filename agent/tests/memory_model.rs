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

use insite_agent::{
    budget,
    store::{
        db::{DbTotals, OpKey, Outcome, QueryRecord, Role, System as DbSystem},
        net::{ConnId, ConnUpdate, Direction, EdgeKey, NetTotals, OpenConns, Traffic},
        window::Windows,
        WINDOW_GRANULARITY, WINDOW_RETENTION,
    },
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
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
    // One connection per edge stays open (its entry in the open table is charged apart);
    // every tick samples each edge, so each snapshot holds its own copy of every edge.
    let mut open = OpenConns::default();
    let (after, w) = churn(&mut live, |t, tick| {
        for (i, svc) in services.iter().enumerate() {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            let key = EdgeKey {
                direction: Direction::Outbound,
                service: svc.clone(),
                peer: Some(ip),
                destination: Some(SocketAddr::new(ip, 5432)),
            };
            let update = if tick == 0 {
                ConnUpdate::Connected {
                    conn: ConnId {
                        sock: 0xffff_0000_0000 + i as u64 * 64,
                        start_ns: 1,
                    },
                    connect_ns: 1000,
                    rtt_ns: 5000,
                }
            } else {
                ConnUpdate::Sampled {
                    rtt_ns: 5000 + tick,
                }
            };
            let traffic = Traffic {
                sent: 10,
                received: 10,
                retransmits: 0,
            };
            t.apply(&mut open, key, &update, traffic, n);
        }
    });
    let per = (after - before) as f64 / n as f64;
    eprintln!(
        "edge: {per:.0} bytes each, one open connection included ({} snapshots)",
        w.snapshots()
    );
    let model = (budget::EDGE_BYTES + budget::OPEN_CONN_BYTES) as f64;
    assert!(
        per <= model,
        "an edge costs {per:.0} bytes, the model says {model}"
    );
    drop((w, live, services, open));
}

#[test]
fn open_connections_cost_what_the_model_says() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The table full: its hash table is then at its largest per entry.
    let n = insite_agent::store::net::MAX_OPEN_CONNS;
    let mut live = NetTotals::default();
    let mut open = OpenConns::default();
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let key = EdgeKey {
        direction: Direction::Inbound,
        service: Arc::from("web.service"),
        peer: Some(ip),
        destination: Some(SocketAddr::new(ip, 443)),
    };
    let sample = ConnUpdate::Sampled { rtt_ns: 1 };
    live.apply(&mut open, key.clone(), &sample, Traffic::default(), 16);
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..n {
        let conn = ConnId {
            sock: 0xffff_0000_0000 + i as u64 * 64,
            start_ns: 1,
        };
        let accepted = ConnUpdate::Accepted { conn, rtt_ns: 1 };
        live.apply(&mut open, key.clone(), &accepted, Traffic::default(), 16);
    }
    let per = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    eprintln!("open connection: {per:.0} bytes each");
    assert_eq!(open.len(), n);
    assert!(
        per <= budget::OPEN_CONN_BYTES as f64,
        "an open connection costs {per:.0} bytes, the model says {}",
        budget::OPEN_CONN_BYTES
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
        duration_ns: 1000 + tick,
        outcome: Outcome::Ok,
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
