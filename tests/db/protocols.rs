//! Each protocol end to end: Redis, PostgreSQL and MySQL commands, errors, pipelines,
//! prepared statements and fingerprints; a disabled probe; connections older than the agent.

use super::*;

#[test]
fn redis_commands_pipelines_misses_errors_and_sleep() {
    require_root();
    let redis = Redis::start().expect("redis");
    let agent = Agent::start(DB_ONLY);
    let tcp = redis.tcp_addr().to_string();
    let unix = format!("unix:{}", redis.socket.display());

    for i in 0..5 {
        ok(&redis.cli_tcp(&["SET", &format!("k{i}"), "v"]).expect("SET"));
    }
    for i in 0..3 {
        ok(&redis
            .cli_tcp(&["GET", &format!("missing{i}")])
            .expect("GET"));
    }
    ok(&redis.cli_tcp(&["GET", "k0"]).expect("GET"));
    // An error reply, to a command Redis does not know: one bounded operation label.
    let _ = redis.cli_tcp(&["NOSUCHCOMMAND", "x"]).expect("error");
    // 50 ms inside the server, over the unix socket.
    ok(&redis
        .cli_unix(&["DEBUG", "SLEEP", "0.05"])
        .expect("DEBUG SLEEP"));
    // A pipeline of K commands in one write: 4 SETs, 6 GETs of which 3 miss.
    let mut cmds: Vec<Vec<&str>> = Vec::new();
    let names: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    for n in &names[..4] {
        cmds.push(vec!["SET", n, "value"]);
    }
    for n in &names[1..4] {
        cmds.push(vec!["GET", n]);
    }
    for n in ["absent1", "absent2", "absent3"] {
        cmds.push(vec!["GET", n]);
    }
    let replies = redis_pipeline(&redis.endpoint(Via::Unix), &cmds).expect("pipeline");
    assert_eq!(replies.len(), 10);
    assert_eq!(
        replies.iter().filter(|r| matches!(r, Reply::Null)).count(),
        3
    );

    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"].iter().all(|role| {
            count(m, "redis", "SET", role, &tcp) >= 5.0
                && count(m, "redis", "GET", role, &tcp) >= 4.0
                && count(m, "redis", "DEBUG", role, &unix) >= 1.0
                && count(m, "redis", "GET", role, &unix) >= 6.0
                && count(m, "redis", "unknown_command", role, &tcp) >= 1.0
        })
    });
    for role in ["client", "server"] {
        assert_eq!(
            count(&m, "redis", "SET", role, &tcp),
            5.0,
            "{role}\n{}",
            m.0
        );
        assert_eq!(count(&m, "redis", "GET", role, &tcp), 4.0, "{role}");
        assert_eq!(
            m.sum(
                MISSES,
                &[("operation", "GET"), ("role", role), ("destination", &tcp)]
            ),
            3.0,
            "{role}"
        );
        assert_eq!(
            count(&m, "redis", "unknown_command", role, &tcp),
            1.0,
            "{role}"
        );
        assert_eq!(errors(&m, "redis", role, &tcp), 1.0, "{role}");
        // The pipeline counts every command, not one per write.
        assert_eq!(count(&m, "redis", "SET", role, &unix), 4.0, "{role}");
        assert_eq!(count(&m, "redis", "GET", role, &unix), 6.0, "{role}");
        assert_eq!(
            m.sum(
                MISSES,
                &[("operation", "GET"), ("role", role), ("destination", &unix)]
            ),
            3.0,
            "{role}"
        );
        let sleep = [
            ("system", "redis"),
            ("operation", "DEBUG"),
            ("role", role),
            ("destination", unix.as_str()),
        ];
        assert_eq!(
            in_bucket(&m, &sleep, LO_50MS, HI_50MS),
            1.0,
            "{role}: DEBUG SLEEP 0.05"
        );
    }
    // Who: the clients by process, the server as redis-server.
    assert!(
        m.sum(DURATION, &[("role", "server"), ("service", "redis-server")]) >= 21.0,
        "{}",
        m.0
    );
    // Nothing lost on the way.
    assert_eq!(
        m.value_or_zero("insite_ringbuf_drops_total", &[("ring", "db_events")]),
        0.0
    );
    assert_eq!(m.value_or_zero("insite_db_desyncs_total", &[]), 0.0);
    assert_eq!(
        m.value_or_zero("insite_db_unmatched_responses_total", &[]),
        0.0
    );

    promtool_accepts(&m);

    // The same through the CLI: fingerprints GET ? (TCP and unix) and the slow DEBUG.
    let v = queries_json(&agent, &["--system", "redis", "--sort", "count"]);
    let rows = v["queries"].as_array().expect("rows");
    for (dest, n, misses) in [(&tcp, 4, 3), (&unix, 6, 3)] {
        let get = rows
            .iter()
            .find(|r| {
                r["fingerprint"] == "GET ?" && r["role"] == "client" && r["destination"] == **dest
            })
            .expect("GET ? row");
        assert_eq!(get["count"], n, "{get}");
        assert_eq!(get["misses"], misses, "{get}");
    }
    // The unknown command keeps its name in its fingerprint.
    assert!(
        rows.iter().any(|r| r["fingerprint"] == "NOSUCHCOMMAND ?"
            && r["operation"] == "unknown_command"
            && r["errors"] == 1),
        "{v}"
    );
    // Over db.slow_threshold.redis (10ms): in the log, with masked text and the process.
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("slow query")
            && l.contains("operation=DEBUG")
            && l.contains("text=DEBUG ? ?")
            && l.contains("comm=redis-server")),
        "{log}"
    );
    let slow = v["slow"].as_array().expect("slow");
    assert!(
        slow.iter()
            .any(|s| s["operation"] == "DEBUG" && s["duration_ms"].as_f64() >= Some(45.0)),
        "{v}"
    );
}

#[test]
fn postgres_queries_errors_pipelines_prepared_and_fingerprints() {
    require_root();
    let pg = Postgres::start().expect("postgres");
    let agent = Agent::start(DB_ONLY);
    let unix = format!("unix:{}", pg.unix_path().display());
    let tcp = pg.tcp_addr().to_string();

    // psql over the unix socket: one Query message per statement.
    ok(&pg
        .psql_unix(
            "CREATE TABLE t (id int, v text);
             INSERT INTO t VALUES (1, 'a');
             INSERT INTO t VALUES (2, 'b');
             INSERT INTO t VALUES (3, 'c');
             SELECT v FROM t WHERE id = 1;
             SELECT v FROM t WHERE id = 22;
             UPDATE t SET v = 'z' WHERE id = 3;
             SELECT pg_sleep(0.05);
             SELECT 1/0;",
        )
        .expect("psql"));
    // Extended protocol, pipelined: 5 statements and one Sync in one write; the third fails
    // and the server skips the last two.
    let mut c = PgConn::connect(&pg.endpoint(Via::Tcp)).expect("connect");
    let r = c
        .pipeline_extended(&["SELECT 1", "SELECT 2", "SELECT 1/0", "SELECT 4", "SELECT 5"])
        .expect("pipeline");
    assert!(r[0].is_done() && r[1].is_done() && r[2].is_error(), "{r:?}");
    assert!(matches!(r[3], PgResult::Skipped) && matches!(r[4], PgResult::Skipped));
    // A named prepared statement, run three times: named after its SQL.
    c.prepare("upd", "UPDATE t SET v = $1 WHERE id = 1")
        .expect("prepare");
    for v in ["x", "y", "z"] {
        assert!(c.execute_prepared("upd", &[v]).expect("execute").is_done());
    }
    drop(c);

    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"].iter().all(|role| {
            count(m, "postgresql", "SELECT", role, &unix) >= 4.0
                && count(m, "postgresql", "SELECT", role, &tcp) >= 5.0
                && count(m, "postgresql", "UPDATE", role, &tcp) >= 3.0
        })
    });
    for role in ["client", "server"] {
        assert_eq!(
            count(&m, "postgresql", "CREATE", role, &unix),
            1.0,
            "{role}\n{}",
            m.0
        );
        assert_eq!(
            count(&m, "postgresql", "INSERT", role, &unix),
            3.0,
            "{role}"
        );
        assert_eq!(
            count(&m, "postgresql", "SELECT", role, &unix),
            4.0,
            "{role}"
        );
        assert_eq!(
            count(&m, "postgresql", "UPDATE", role, &unix),
            1.0,
            "{role}"
        );
        assert_eq!(
            errors(&m, "postgresql", role, &unix),
            1.0,
            "{role}: SELECT 1/0"
        );
        // Pipelined: five statements counted one by one; the failing one and the two the
        // server skipped are errors.
        assert_eq!(count(&m, "postgresql", "SELECT", role, &tcp), 5.0, "{role}");
        // Prepare alone runs nothing; each Bind/Execute of "upd" is an UPDATE.
        assert_eq!(count(&m, "postgresql", "UPDATE", role, &tcp), 3.0, "{role}");
        assert_eq!(errors(&m, "postgresql", role, &tcp), 3.0, "{role}");
        let sleep = [
            ("system", "postgresql"),
            ("operation", "SELECT"),
            ("role", role),
            ("destination", unix.as_str()),
        ];
        assert_eq!(
            in_bucket(&m, &sleep, LO_50MS, HI_50MS),
            1.0,
            "{role}: pg_sleep(0.05)"
        );
    }
    assert_eq!(m.value_or_zero("insite_db_desyncs_total", &[]), 0.0);
    assert_eq!(
        m.value_or_zero("insite_db_unmatched_responses_total", &[]),
        0.0
    );

    // Two queries that differ only in literals are one fingerprint.
    let v = queries_json(&agent, &["--system", "postgresql"]);
    let rows = v["queries"].as_array().expect("rows");
    let fp: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            r["role"] == "client"
                && r["fingerprint"]
                    .as_str()
                    .is_some_and(|f| f.contains("FROM t WHERE id = ?") && f.starts_with("SELECT"))
        })
        .collect();
    assert_eq!(fp.len(), 1, "{v}");
    assert_eq!(fp[0]["count"], 2);
    assert!(
        !fp[0]["sample"].as_str().unwrap_or("").contains("22"),
        "masked: {}",
        fp[0]
    );
    let inserts: Vec<&Value> = rows
        .iter()
        .filter(|r| r["role"] == "server" && r["operation"] == "INSERT")
        .collect();
    assert_eq!(inserts.len(), 1, "one INSERT fingerprint: {v}");
    assert_eq!(inserts[0]["count"], 3);
    // And the text view lists it.
    let o = agent.cli(&["queries", "--system", "postgresql"]);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("FROM t WHERE id = ?"), "{text}");
    assert!(text.contains("pg_sleep"), "slow query listed: {text}");
}

#[test]
fn mysql_queries_errors_and_sleep() {
    require_root();
    let db = Mariadb::start().expect("mariadb");
    let agent = Agent::start(DB_ONLY);
    let unix = format!("unix:{}", db.socket.display());
    let tcp = db.tcp_addr().to_string();

    ok(&db
        .mysql_unix(
            "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(10));
             INSERT INTO t VALUES (1, 'a');
             INSERT INTO t VALUES (2, 'b');
             SELECT v FROM t WHERE id = 1;
             SELECT v FROM t WHERE id = 2;
             SELECT SLEEP(0.05);
             SELECT * FROM no_such_table;
             DELETE FROM t WHERE id = 2;",
        )
        .expect("mysql"));
    ok(&db
        .mysql_tcp("SELECT 1; SELECT 2; SELECT 3;")
        .expect("mysql tcp"));

    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"].iter().all(|role| {
            count(m, "mysql", "DELETE", role, &unix) >= 1.0
                && count(m, "mysql", "SELECT", role, &tcp) >= 3.0
        })
    });
    for role in ["client", "server"] {
        assert_eq!(
            count(&m, "mysql", "CREATE", role, &unix),
            1.0,
            "{role}\n{}",
            m.0
        );
        assert_eq!(count(&m, "mysql", "INSERT", role, &unix), 2.0, "{role}");
        assert_eq!(count(&m, "mysql", "SELECT", role, &unix), 4.0, "{role}");
        assert_eq!(count(&m, "mysql", "DELETE", role, &unix), 1.0, "{role}");
        assert_eq!(
            errors(&m, "mysql", role, &unix),
            1.0,
            "{role}: no_such_table"
        );
        assert_eq!(count(&m, "mysql", "SELECT", role, &tcp), 3.0, "{role}");
        assert_eq!(errors(&m, "mysql", role, &tcp), 0.0, "{role}");
        let sleep = [
            ("system", "mysql"),
            ("operation", "SELECT"),
            ("role", role),
            ("destination", unix.as_str()),
        ];
        assert_eq!(
            in_bucket(&m, &sleep, LO_50MS, HI_50MS),
            1.0,
            "{role}: SLEEP(0.05)"
        );
    }
    assert_eq!(m.value_or_zero("insite_db_desyncs_total", &[]), 0.0);
    let v = queries_json(&agent, &["--system", "mysql", "--sort", "p99"]);
    let rows = v["queries"].as_array().expect("rows");
    let p99: Vec<f64> = rows
        .iter()
        .map(|r| r["p99_ms"].as_f64().unwrap_or(0.0))
        .collect();
    assert!(
        p99.windows(2).all(|w| w[0] >= w[1]),
        "slowest first: {p99:?}"
    );
    let sleep = rows
        .iter()
        .position(|r| r["fingerprint"] == "SELECT SLEEP(?)")
        .expect("SLEEP(0.05) fingerprint");
    assert!(p99[sleep] >= 33.0 && sleep < 4, "{v}");
    let by_id = rows
        .iter()
        .find(|r| {
            r["role"] == "server"
                && r["fingerprint"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("SELECT") && f.contains("WHERE id = ?"))
        })
        .expect("one fingerprint for both ids");
    assert_eq!(by_id["count"], 2);
}

#[test]
fn disabled_probe_is_reported_and_the_rest_runs() {
    require_root();
    let agent = Agent::start("[db]\nenabled = false\n[net]\nenabled = false\n");
    assert_eq!(agent.probe("db")["state"], "disabled");
    let o = agent.cli(&["queries"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("database probe is disabled"),
        "{o:?}"
    );
    assert_eq!(agent.probe("syscalls")["state"], "attached");
}

#[test]
fn connections_open_before_the_agent_are_joined_and_bad_bytes_only_cost_a_desync() {
    require_root();
    let redis = Redis::start().expect("redis");
    let unix = format!("unix:{}", redis.socket.display());
    // A connection that has talked before the agent starts, as a pool's would have.
    let mut early = RedisConn::connect(&redis.endpoint(Via::Unix)).expect("connect");
    assert_eq!(
        early.command(&["SET", "early", "1"]).expect("SET").as_str(),
        Some("OK")
    );
    let agent = Agent::start(DB_ONLY);
    let replies = early
        .pipeline(&[
            vec!["GET", "early"],
            vec!["GET", "nothing"],
            vec!["INCR", "n"],
        ])
        .expect("pipeline");
    assert_eq!(replies.len(), 3);
    let m = Metrics::wait_for(&agent, |m| {
        ["client", "server"]
            .iter()
            .all(|role| count(m, "redis", "INCR", role, &unix) >= 1.0)
    });
    for role in ["client", "server"] {
        assert_eq!(
            count(&m, "redis", "GET", role, &unix),
            2.0,
            "{role}\n{}",
            m.0
        );
        assert_eq!(count(&m, "redis", "INCR", role, &unix), 1.0, "{role}");
        assert_eq!(
            m.sum(
                MISSES,
                &[("operation", "GET"), ("role", role), ("destination", &unix)]
            ),
            1.0
        );
    }
    let desyncs = m.value_or_zero("insite_db_desyncs_total", &[]);

    // A recognised connection that then sends bytes that fit no RESP framing: the server
    // answers with a protocol error and closes; the agent loses that connection's framing,
    // counts it, and goes on timing everything else.
    let mut bad = RedisConn::connect(&redis.endpoint(Via::Tcp)).expect("connect");
    assert!(bad.command(&["PING"]).is_ok());
    let _ = bad.send_raw(b"*2\r\n$3\r\nGET\r\n$x\r\n", 1);
    drop(bad);
    ok(&redis.cli_unix(&["SET", "after", "1"]).expect("SET"));
    let m = Metrics::wait_for(&agent, |m| {
        m.value_or_zero("insite_db_desyncs_total", &[]) > desyncs
            && count(m, "redis", "SET", "server", &unix) >= 1.0
    });
    assert!(
        m.value_or_zero("insite_db_desyncs_total", &[]) > desyncs,
        "the broken framing is counted\n{}",
        m.0
    );
    for role in ["client", "server"] {
        assert_eq!(count(&m, "redis", "SET", role, &unix), 1.0, "{role}");
    }
    assert_eq!(agent.probe("db")["state"], "attached");
}
