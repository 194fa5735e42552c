//! More in flight than the kernel times: pipelines of thousands, untimed requests, each
//! counted or counted lost.

use super::*;

/// The report of issue 9: 20,000 pipelined commands in ONE write on one connection, each
/// answered. Every one of them is timed or counted as lost, on both sockets, never neither:
/// once with unknown commands (`CMD<i> k`, an error reply each) over TCP, once with `GET k`
/// (a null reply each) over the unix socket.
#[test]
fn redis_20000_pipelined_commands_are_each_counted_or_counted_lost() {
    require_root();
    const N: usize = 20_000;
    let redis = Redis::start().expect("redis");
    let agent = Agent::start(DB_ONLY);
    let tcp = redis.tcp_addr().to_string();
    let unix = format!("unix:{}", redis.socket.display());
    for (via, dest, unknown) in [(Via::Tcp, &tcp, true), (Via::Unix, &unix, false)] {
        let before = agent.scrape();
        let mut buf = Vec::new();
        for i in 0..N {
            let name = if unknown {
                format!("CMD{i}")
            } else {
                "GET".to_string()
            };
            buf.extend_from_slice(&encode_command(&[&name, "k"]));
        }
        let mut conn = RedisConn::connect(&redis.endpoint(via)).expect("connect");
        let replies = conn.send_raw(&buf, N).expect("20000 replies");
        let want = if unknown {
            Reply::is_error
        } else {
            |r: &Reply| *r == Reply::Null
        };
        assert!(replies.iter().all(want), "{:?}", replies.first());
        drop(conn);

        let delta = |m: &Metrics, role: &str| {
            let (c0, l0) = redis_accounted(&before, role, dest);
            let (c1, l1) = redis_accounted(m, role, dest);
            (c1 - c0, l1 - l0)
        };
        let settled = |m: &Metrics| {
            ["client", "server"].iter().all(|role| {
                let (c, l) = delta(m, role);
                c + l >= N as f64
            })
        };
        let _ = Metrics::wait_for(&agent, settled);
        // Anything counted twice would show up by now.
        agent.wait_ticks(4);
        let m = agent.scrape();
        let seen: Vec<(&str, f64, f64)> = ["client", "server"]
            .into_iter()
            .map(|role| {
                let (counted, lost) = delta(&m, role);
                (role, counted, lost)
            })
            .collect();
        let what = if unknown { "CMD<i> k" } else { "GET k" };
        eprintln!("{what} to {dest}: {seen:?} (role, timed, counted as lost)");
        for (role, counted, lost) in seen {
            assert_eq!(
                counted + lost,
                N as f64,
                "{what}, {role} to {dest}: {counted} timed + {lost} lost\n{}",
                loss_report(&m, dest)
            );
        }
    }
}

/// A request timed after untimed ones gets its own reply. 100 PINGs in one write fill the
/// connection's 64-slot FIFO: 36 are counted untimed. The client reads the first 64 replies
/// only, then sends DEBUG SLEEP 0.05, which is timed; the 36 PONGs still queued ahead of its
/// reply belong to the untimed PINGs and must not complete it.
#[test]
fn redis_untimed_requests_do_not_take_later_replies() {
    require_root();
    let redis = Redis::start().expect("redis");
    let agent = Agent::start(DB_ONLY);
    let tcp = redis.tcp_addr().to_string();
    let mut conn = RedisConn::connect(&redis.endpoint(Via::Tcp)).expect("connect");
    let pings = encode_command(&["PING"]).repeat(100);
    conn.send_only(&pings).expect("100 PINGs");
    let first = conn.read_exact_unbuffered(64 * 7).expect("64 replies");
    assert_eq!(first, b"+PONG\r\n".repeat(64));
    conn.send_only(&encode_command(&["DEBUG", "SLEEP", "0.05"]))
        .expect("DEBUG SLEEP");
    let rest = conn.replies(37).expect("36 PONGs and OK");
    assert!(rest[..36].iter().all(|r| r.as_str() == Some("PONG")));
    assert_eq!(rest[36].as_str(), Some("OK"));
    drop(conn);

    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"]
            .iter()
            .all(|role| count(m, "redis", "DEBUG", role, &tcp) >= 1.0)
    });
    for role in ["client", "server"] {
        let debug = [
            ("system", "redis"),
            ("operation", "DEBUG"),
            ("role", role),
            ("destination", tcp.as_str()),
        ];
        let ping = [
            ("system", "redis"),
            ("operation", "PING"),
            ("role", role),
            ("destination", tcp.as_str()),
        ];
        assert_eq!(
            count(&m, "redis", "DEBUG", role, &tcp),
            1.0,
            "{role}\n{}",
            m.0
        );
        assert_eq!(
            in_bucket(&m, &debug, LO_50MS, HI_50MS),
            1.0,
            "{role}: DEBUG SLEEP 0.05 timed by its own reply\n{}",
            loss_report(&m, &tcp)
        );
        assert_eq!(
            in_bucket(&m, &ping, LO_50MS, "+Inf"),
            0.0,
            "{role}: no PING took a slow reply"
        );
        let (counted, lost) = redis_accounted(&m, role, &tcp);
        assert_eq!(
            counted + lost,
            101.0,
            "{role}: {counted} timed + {lost} lost"
        );
    }
    // The overflow really happened on the client's socket (it is what this test is about).
    assert!(
        m.sum(
            LOST,
            &[
                ("role", "client"),
                ("destination", &tcp),
                ("reason", "untimed")
            ]
        ) >= 1.0,
        "{}",
        loss_report(&m, &tcp)
    );
}

/// PostgreSQL's give-up paths count what they drop: 300 statements pipelined in ONE write
/// (Parse/Bind/Execute each, one Sync: 901 messages, far past the 64 requests in flight). Per
/// role, every statement is timed or counted as lost, and the next query is timed as usual.
#[test]
fn postgres_pipeline_of_300_statements_is_each_counted_or_counted_lost() {
    require_root();
    const N: usize = 300;
    let pg = Postgres::start().expect("postgres");
    let agent = Agent::start(DB_ONLY);
    let tcp = pg.tcp_addr().to_string();
    let mut c = PgConn::connect(&pg.endpoint(Via::Tcp)).expect("connect");
    let before = agent.scrape();
    let sqls: Vec<String> = (0..N).map(|i| format!("SELECT {i}")).collect();
    let sqls: Vec<&str> = sqls.iter().map(String::as_str).collect();
    let r = c.pipeline_extended(&sqls).expect("pipeline");
    assert!(r.iter().all(PgResult::is_done), "{:?}", r.last());
    // Afterwards, a query of its own: timed, in its own bucket.
    let r = c.simple_query("SELECT pg_sleep(0.05)").expect("sleep");
    assert!(r[0].is_done(), "{r:?}");
    drop(c);

    let accounted = |m: &Metrics, role: &str| {
        let labels = [
            ("system", "postgresql"),
            ("role", role),
            ("destination", tcp.as_str()),
        ];
        (m.sum(DURATION, &labels), m.sum(LOST, &labels))
    };
    let delta = |m: &Metrics, role: &str| {
        let (c0, l0) = accounted(&before, role);
        let (c1, l1) = accounted(m, role);
        (c1 - c0, l1 - l0)
    };
    let _ = Metrics::wait_for(&agent, |m| {
        ["client", "server"].iter().all(|role| {
            let (c, l) = delta(m, role);
            c + l > N as f64
        })
    });
    agent.wait_ticks(4);
    let m = agent.scrape();
    for role in ["client", "server"] {
        let (counted, lost) = delta(&m, role);
        eprintln!("postgresql {role}: {counted} timed + {lost} counted as lost");
        assert_eq!(
            counted + lost,
            (N + 1) as f64,
            "{role}: {counted} timed + {lost} lost\n{}",
            loss_report(&m, &tcp)
        );
        let sleep = [
            ("system", "postgresql"),
            ("operation", "SELECT"),
            ("role", role),
            ("destination", tcp.as_str()),
        ];
        assert_eq!(
            in_bucket(&m, &sleep, LO_50MS, HI_50MS),
            1.0,
            "{role}: pg_sleep(0.05)"
        );
    }
}
