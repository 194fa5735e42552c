//! Self-check of the database fixtures: real servers, real CLI clients and the raw wire
//! clients, with the real answers asserted. No agent is involved.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Instant,
};

use insite_e2e::{
    servers::{Mariadb, Postgres, Redis, Via},
    wire_clients::{redis_pipeline, PgConn, PgResult, RedisConn, Reply, ReplyKind},
};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the server process has been reaped and its directory removed.
fn assert_gone(pid: u32, dir: &Path) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server pid {pid} still exists after drop"
    );
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

#[test]
fn postgres_cli_and_wire() {
    let t = Instant::now();
    let pg = Postgres::start().expect("start postgres");
    eprintln!("postgres ready in {:?}", t.elapsed());
    let (pid, dir) = (pg.pid(), pg.socket_dir.parent().map(PathBuf::from));
    assert!(pg.unix_path().exists());

    let o = pg.psql_unix("SELECT 40 + 2;").expect("psql unix");
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "42\n");
    let o = pg
        .psql_tcp("SELECT current_user; SHOW ssl; SHOW fsync;")
        .expect("psql tcp");
    assert_eq!(stdout(&o), "postgres\noff\noff\n", "{}", stderr(&o));
    // ON_ERROR_STOP=0: the statement after the failing one still runs.
    let o = pg
        .psql_tcp("SELECT 1; SELECT nosuch; SELECT 2;")
        .expect("psql tcp");
    assert_eq!(stdout(&o), "1\n2\n");
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));

    for via in [Via::Unix, Via::Tcp] {
        let mut c = PgConn::connect(&pg.endpoint(via)).expect("raw connect");
        assert!(c.backend_pid > 0);
        let r = c
            .simple_query("SELECT 1; SELECT 'two'")
            .expect("simple query");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].first_value(), Some("two"));
        let r = c
            .simple_query("SELECT 1; SELECT 1/0; SELECT 3")
            .expect("simple");
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(matches!(&r[1], PgResult::Error { code, .. } if code == "22012"));

        let r = c
            .pipeline_extended(&["SELECT 1", "SELECT 2", "SELECT 1/0", "SELECT 4", "SELECT 5"])
            .expect("pipeline");
        assert_eq!(
            r[0],
            PgResult::Done {
                tag: "SELECT 1".into(),
                rows: vec![vec![Some("1".into())]]
            }
        );
        assert_eq!(r[1].first_value(), Some("2"));
        assert!(matches!(&r[2], PgResult::Error { code, .. } if code == "22012"));
        assert_eq!(r[3..], [PgResult::Skipped, PgResult::Skipped]);
        // The connection is usable after the failed pipeline's Sync.
        let r = c.pipeline_extended(&["SELECT 6", "SELECT 7"]).expect("2nd");
        assert_eq!(r[1].first_value(), Some("7"));
        assert_eq!(c.tx_status, b'I');

        c.prepare("double", "SELECT $1::int * 2").expect("prepare");
        for (arg, want) in [("21", "42"), ("50", "100")] {
            let r = c.execute_prepared("double", &[arg]).expect("execute");
            assert_eq!(r.first_value(), Some(want), "{r:?}");
        }
        let r = c.execute_prepared("double", &["x"]).expect("execute");
        assert!(r.is_error(), "{r:?}");
    }

    let o = pg.pgbench(Via::Unix, &["-i", "-q"]).expect("pgbench -i");
    assert!(o.status.success(), "{}", stderr(&o));
    let o = pg
        .pgbench(Via::Tcp, &["-S", "-c", "1", "-t", "50"])
        .expect("pgbench");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("number of transactions actually processed: 50/50"),
        "{}",
        stdout(&o)
    );

    let t = Instant::now();
    drop(pg);
    eprintln!("postgres stopped in {:?}", t.elapsed());
    assert_gone(pid, &dir.expect("server dir"));
}

#[test]
fn mariadb_cli() {
    let t = Instant::now();
    let db = Mariadb::start().expect("start mariadb");
    eprintln!("mariadb ready in {:?}", t.elapsed());
    let (pid, dir) = (db.pid(), db.socket.parent().map(PathBuf::from));

    let o = db.mysql_unix("SELECT 40 + 2;").expect("mariadb unix");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    let o = db
        .mysql_tcp("SELECT CURRENT_USER(); SELECT DATABASE(); SELECT @@have_ssl;")
        .expect("mariadb tcp");
    assert_eq!(
        stdout(&o),
        "root@127.0.0.1\ninsite\nDISABLED\n",
        "{}",
        stderr(&o)
    );
    let o = db
        .mysql_unix("SELECT CURRENT_USER(); SELECT 1; SELECT nosuch; SELECT 2;")
        .expect("mariadb unix");
    assert_eq!(stdout(&o), "root@localhost\n1\n2\n");
    assert!(stderr(&o).contains("Unknown column"), "{}", stderr(&o));
    let o = db
        .mysql_tcp("CREATE TABLE t (id INT PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'a'), (2, 'b'); SELECT v FROM t ORDER BY id;")
        .expect("mariadb tcp");
    assert_eq!(stdout(&o), "a\nb\n", "{}", stderr(&o));

    let o = db
        .mysqlslap(
            Via::Tcp,
            &[
                "--concurrency=1",
                "--iterations=1",
                "--number-of-queries=20",
                "--auto-generate-sql",
            ],
        )
        .expect("mysqlslap");
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    let t = Instant::now();
    drop(db);
    eprintln!("mariadb stopped in {:?}", t.elapsed());
    assert_gone(pid, &dir.expect("server dir"));
}

#[test]
fn redis_cli_and_wire() {
    let t = Instant::now();
    let r = Redis::start().expect("start redis");
    eprintln!("redis ready in {:?}", t.elapsed());
    let (pid, dir) = (r.pid(), r.socket.parent().map(PathBuf::from));

    assert_eq!(stdout(&r.cli_unix(&["PING"]).expect("cli")), "PONG\n");
    assert_eq!(stdout(&r.cli_tcp(&["SET", "k", "v"]).expect("cli")), "OK\n");
    assert_eq!(stdout(&r.cli_unix(&["GET", "k"]).expect("cli")), "v\n");
    let t0 = Instant::now();
    assert_eq!(
        stdout(&r.cli_tcp(&["DEBUG", "SLEEP", "0.1"]).expect("cli")),
        "OK\n"
    );
    assert!(t0.elapsed().as_millis() >= 100);

    let cmds: Vec<Vec<&str>> = vec![
        vec!["SET", "a", "1"],
        vec!["GET", "a"],
        vec!["INCR", "a"],
        vec!["GET", "nosuch"],
        vec!["RPUSH", "l", "x", "y"],
        vec!["LRANGE", "l", "0", "-1"],
        vec!["PING"],
        vec!["NOSUCHCOMMAND"],
        vec!["DEBUG", "SLEEP", "0"],
        vec!["DEL", "a", "l"],
    ];
    for via in [Via::Tcp, Via::Unix] {
        let replies = redis_pipeline(&r.endpoint(via), &cmds).expect("pipeline");
        let kinds: Vec<ReplyKind> = replies.iter().map(Reply::kind).collect();
        use ReplyKind::*;
        assert_eq!(
            kinds,
            [Simple, Bulk, Integer, Null, Integer, Array, Simple, Error, Simple, Integer]
        );
        assert_eq!(replies[1].as_str(), Some("1"));
        assert_eq!(replies[2], Reply::Integer(2));
        assert_eq!(
            replies[5],
            Reply::Array(vec![Reply::Bulk(b"x".to_vec()), Reply::Bulk(b"y".to_vec())])
        );
        assert_eq!(replies[6].as_str(), Some("PONG"));
        assert!(replies[7].as_str().is_some_and(|e| e.starts_with("ERR")));
        assert_eq!(replies[9], Reply::Integer(2));
    }
    let mut c = RedisConn::connect(&r.endpoint(Via::Unix)).expect("connect");
    assert_eq!(
        c.command(&["ECHO", "hi"]).expect("echo").as_str(),
        Some("hi")
    );
    let inline = c.send_raw(b"PING\r\nPING\r\n", 2).expect("inline");
    assert_eq!(
        inline,
        [Reply::Simple("PONG".into()), Reply::Simple("PONG".into())]
    );

    let o = r
        .benchmark(Via::Tcp, &["-n", "100", "-c", "2", "-t", "ping", "-q"])
        .expect("redis-benchmark");
    assert!(o.status.success(), "{}", stderr(&o));

    let t = Instant::now();
    drop(r);
    eprintln!("redis stopped in {:?}", t.elapsed());
    assert_gone(pid, &dir.expect("server dir"));
}

/// A test that panics while holding servers still stops them.
#[test]
fn servers_stop_when_a_test_panics() {
    let mut seen = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let r = Redis::start().expect("start redis");
        let pg = Postgres::start().expect("start postgres");
        seen.push((r.pid(), r.socket.parent().map(PathBuf::from)));
        seen.push((pg.pid(), pg.socket_dir.parent().map(PathBuf::from)));
        panic!("deliberate");
    }));
    assert!(result.is_err());
    assert_eq!(seen.len(), 2);
    for (pid, dir) in seen {
        assert_gone(pid, &dir.expect("server dir"));
    }
}
