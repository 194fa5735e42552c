//! What the probe follows: sockets that speak no database protocol, and `db.roles`.

use super::*;

#[test]
fn sockets_that_speak_no_database_protocol_are_passed_over() {
    use std::io::{Read as _, Write as _};
    require_root();
    let agent = Agent::start(DB_ONLY);
    const PASSED_OVER: &str = "insite_db_sockets_passed_over_total";
    let before = agent.scrape().value_or_zero(PASSED_OVER, &[]);
    // An HTTP-like exchange on one connection: 40 requests and responses, far more reads and
    // writes than the probe looks at before it gives up on a socket.
    const REQ: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; REQ.len()];
        for _ in 0..40 {
            s.read_exact(&mut buf).unwrap();
            s.write_all(RESP).unwrap();
        }
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let mut buf = [0u8; RESP.len()];
    for _ in 0..40 {
        c.write_all(REQ).unwrap();
        c.read_exact(&mut buf).unwrap();
    }
    server.join().unwrap();
    let m = Metrics::wait_for(&agent, |m| {
        m.value_or_zero(PASSED_OVER, &[]) >= before + 2.0
    });
    let passed = m.value_or_zero(PASSED_OVER, &[]) - before;
    assert!(passed >= 2.0, "both ends passed over: {passed}");

    // A database connection that starts after is still recognised and timed, both ends.
    let redis = Redis::start().expect("redis");
    let tcp = redis.tcp_addr().to_string();
    let mut conn = RedisConn::connect(&redis.endpoint(Via::Tcp)).expect("connect");
    assert_eq!(
        conn.command(&["SET", "k", "v"]).expect("SET").as_str(),
        Some("OK")
    );
    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"]
            .iter()
            .all(|role| count(m, "redis", "SET", role, &tcp) >= 1.0)
    });
    for role in ["client", "server"] {
        assert_eq!(
            count(&m, "redis", "SET", role, &tcp),
            1.0,
            "{role}\n{}",
            m.0
        );
    }
}

#[test]
fn db_roles_follows_only_the_named_end() {
    require_root();
    let redis = Redis::start().expect("redis");
    let agent = Agent::start(&format!("{DB_ONLY}[db]\nroles = [\"client\"]\n"));
    let tcp = redis.tcp_addr().to_string();
    let mut conn = RedisConn::connect(&redis.endpoint(Via::Tcp)).expect("connect");
    for _ in 0..5 {
        assert_eq!(
            conn.command(&["SET", "k", "v"]).expect("SET").as_str(),
            Some("OK")
        );
    }
    let m = Metrics::wait_for(&agent, |m| count(m, "redis", "SET", "client", &tcp) >= 5.0);
    assert_eq!(count(&m, "redis", "SET", "client", &tcp), 5.0, "{}", m.0);
    // Nothing of the server's end: no series, no losses, for any destination.
    assert_eq!(m.sum(DURATION, &[("role", "server")]), 0.0, "{}", m.0);
    assert_eq!(m.sum(LOST, &[("role", "server")]), 0.0, "{}", m.0);
}
