//! The tracker against kernel events built byte for byte: naming, folding, losses.

use super::*;
use agent_common::db::{kind, outcome};

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: plain repr(C) values without padding, viewed as their bytes.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
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

#[test]
fn kernel_codes_convert_by_name_and_unknown_ones_are_refused() {
    for (code, k) in [
        (kind::CONN, EventKind::Conn),
        (kind::TEXT, EventKind::Text),
        (kind::SLOW, EventKind::Slow),
        (kind::LOSS, EventKind::Loss),
    ] {
        assert_eq!(EventKind::try_from(code), Ok(k));
    }
    assert_eq!(EventKind::try_from(0), Err(0));
    for (code, o) in [
        (outcome::OK, KernelOutcome::Ok),
        (outcome::ERROR, KernelOutcome::Error),
        (outcome::NULL, KernelOutcome::Null),
        (outcome::SKIPPED, KernelOutcome::Skipped),
        (outcome::UNTIMED, KernelOutcome::Untimed),
    ] {
        assert_eq!(KernelOutcome::try_from(code), Ok(o));
    }
    assert_eq!(KernelOutcome::try_from(200), Err(200));
    // An unknown event kind is counted as undecodable, not guessed.
    let mut t = Tracker::new(false);
    t.feed(&[9, 0, 0, 0], &DbConfig::default());
    assert_eq!(t.undecodable, 1);
}
