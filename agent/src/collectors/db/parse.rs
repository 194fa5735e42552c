//! A request's first bytes, as the kernel sent them, into an operation and a normalized
//! fingerprint (cached: identical bytes, identical answer).

use super::*;

/// Names a request from its first bytes. PostgreSQL statements prepared on the connection are
/// remembered by name, so that a later Bind/Execute of one is named after its SQL.
pub(super) fn parse(
    system: System,
    prefix: &[u8],
    len: usize,
    (statements, kept): (&mut HashMap<String, Arc<QueryInfo>>, &mut usize),
    cache: &mut ParseCache,
    raw: bool,
) -> Option<Arc<QueryInfo>> {
    if let Some((s, hit)) = cache.get(prefix) {
        if *s == system {
            return Some(hit.clone());
        }
    }
    let (info, cacheable) = match system {
        System::Postgresql => {
            let req = pg::request(prefix)?;
            let info = match (&req.sql, &req.bound_statement) {
                (Some(text), _) => Arc::new(sql_info(text, raw)),
                (None, Some(name)) => match statements.get(name) {
                    Some(i) => i.clone(),
                    None => Arc::new(QueryInfo {
                        operation: Arc::from("EXECUTE"),
                        fingerprint: Arc::from(&*strip_controls(&format!("EXECUTE {name}"))),
                        sample: Arc::from(&*strip_controls(&format!("EXECUTE {name}"))),
                        read: false,
                        runs: true,
                    }),
                },
                (None, None) => return None,
            };
            if let (Some(name), Some(_)) = (&req.parsed_statement, &req.sql) {
                if !name.is_empty() {
                    if statements.len() >= MAX_STATEMENTS {
                        *kept = kept.saturating_sub(statements.len());
                        *statements = HashMap::new();
                    }
                    let room = statements.contains_key(name) || *kept < MAX_STATEMENTS_TOTAL;
                    if room && statements.insert(name.clone(), info.clone()).is_none() {
                        *kept += 1;
                    }
                }
            }
            let info = if req.executes {
                info
            } else {
                let mut i = (*info).clone();
                i.runs = false;
                Arc::new(i)
            };
            // A Bind's answer depends on the connection's statements; a Parse defines one.
            (info, req.sql.is_some() && req.parsed_statement.is_none())
        }
        System::Mysql => {
            let req = mysql::request(prefix, len.max(prefix.len()))?;
            let op = mysql::operation(&req);
            let info = match &req.sql {
                Some(text) => {
                    let mut i = sql_info(text, raw);
                    i.operation = Arc::from(op.as_str());
                    i
                }
                None => QueryInfo {
                    operation: Arc::from(op.as_str()),
                    fingerprint: Arc::from(op.as_str()),
                    sample: Arc::from(op.as_str()),
                    read: false,
                    runs: true,
                },
            };
            (Arc::new(info), true)
        }
        System::Redis => {
            let cmd = resp::command(prefix)?;
            // The name is the client's text: counted under a known command's name or `unknown`.
            let op = resp::operation(&cmd.name);
            let fingerprint = redis_fingerprint(&strip_controls(&cmd.name), cmd.args);
            let sample = if raw {
                redis_raw(prefix)
            } else {
                fingerprint.clone()
            };
            (
                Arc::new(QueryInfo {
                    runs: true,
                    read: resp::is_read(&cmd.name),
                    operation: Arc::from(&*op),
                    fingerprint: Arc::from(fingerprint.as_str()),
                    sample: Arc::from(sample.as_str()),
                }),
                // Keys make nearly every command's bytes unique, and decoding one costs
                // less than keeping it.
                false,
            )
        }
    };
    if cacheable {
        if cache.len() >= MAX_PARSE_CACHE {
            *cache = HashMap::new();
        }
        cache.insert(Box::from(prefix), (system, info.clone()));
    }
    Some(info)
}

pub(super) fn sql_info(text: &str, raw: bool) -> QueryInfo {
    let fingerprint = sql::fingerprint(text);
    QueryInfo {
        operation: Arc::from(sql::operation(text).as_str()),
        sample: if raw {
            Arc::from(&*strip_controls(text.trim()))
        } else {
            Arc::from(fingerprint.as_str())
        },
        fingerprint: Arc::from(fingerprint.as_str()),
        read: false,
        runs: true,
    }
}

/// `GET ?`, `SET ? ?`, `MSET ? ? ? ...`: the command and the shape of its arguments.
pub(super) fn redis_fingerprint(name: &str, args: usize) -> String {
    let mut s = name.to_string();
    for _ in 0..args.min(3) {
        s.push_str(" ?");
    }
    if args > 3 {
        s.push_str(" ...");
    }
    s
}

/// The command's words as sent (RESP framing dropped).
pub(super) fn redis_raw(prefix: &[u8]) -> String {
    let text = String::from_utf8_lossy(prefix);
    let words: Vec<&str> = text
        .split("\r\n")
        .filter(|w| !w.is_empty() && !w.starts_with('*') && !w.starts_with('$'))
        .collect();
    strip_controls(&words.join(" ")).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ParseCache {
        HashMap::new()
    }

    fn pg_query(sql: &str) -> Vec<u8> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    /// A Parse message preparing `sql` as statement `name`.
    fn pg_parse(name: &str, sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn names_sql_and_masks_literals() {
        let mut st = HashMap::new();
        let a = parse(
            System::Postgresql,
            &pg_query("SELECT * FROM t WHERE id = 7"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        let b = parse(
            System::Postgresql,
            &pg_query("select * from t where id = 8"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*a.operation, "SELECT");
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(!a.sample.contains('7'), "{}", a.sample);
        let raw = parse(
            System::Postgresql,
            &pg_query("SELECT 7"),
            0,
            (&mut st, &mut 0),
            &mut cache(),
            true,
        )
        .unwrap();
        assert!(raw.sample.contains('7'));
    }

    #[test]
    fn prepared_statements_are_bounded_over_all_connections() {
        let mut c = cache();
        let mut kept = 0usize;
        let mut conns: Vec<HashMap<String, Arc<QueryInfo>>> = Vec::new();
        // 64 connections preparing 256 statements each: 16384 asked, MAX_STATEMENTS_TOTAL kept.
        for _ in 0..64 {
            let mut st = HashMap::new();
            for i in 0..256 {
                let msg = pg_parse(&format!("s{i}"), &format!("SELECT {i}"));
                parse(
                    System::Postgresql,
                    &msg,
                    0,
                    (&mut st, &mut kept),
                    &mut c,
                    false,
                );
            }
            conns.push(st);
        }
        let held: usize = conns.iter().map(HashMap::len).sum();
        assert_eq!(kept, MAX_STATEMENTS_TOTAL);
        assert_eq!(held, MAX_STATEMENTS_TOTAL);
    }

    #[test]
    fn prepared_statements_are_named_after_their_sql() {
        // Parse "s1" then, later, Bind "s1" + Execute.
        let mut parse_msg = vec![b'P'];
        let body = b"s1\0UPDATE t SET a = $1\0\0\0";
        parse_msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        parse_msg.extend_from_slice(body);
        let mut bind = vec![b'B'];
        let body = b"\0s1\0\0\0\0\0\0\0";
        bind.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        bind.extend_from_slice(body);
        bind.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
        let mut st = HashMap::new();
        let mut c = cache();
        let p = parse(
            System::Postgresql,
            &parse_msg,
            0,
            (&mut st, &mut 0),
            &mut c,
            false,
        )
        .unwrap();
        assert_eq!(&*p.operation, "UPDATE");
        let e = parse(
            System::Postgresql,
            &bind,
            0,
            (&mut st, &mut 0),
            &mut c,
            false,
        )
        .unwrap();
        assert_eq!(&*e.operation, "UPDATE");
        let other = parse(
            System::Postgresql,
            &bind,
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*other.operation, "EXECUTE");
    }

    #[test]
    fn redis_commands_and_reads() {
        let get = parse(
            System::Redis,
            b"*2\r\n$3\r\nget\r\n$3\r\nkey\r\n",
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(
            (&*get.operation, &*get.fingerprint, get.read),
            ("GET", "GET ?", true)
        );
        let raw = parse(
            System::Redis,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n",
            0,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            true,
        )
        .unwrap();
        assert_eq!(&*raw.sample, "SET k v");
        assert!(!raw.read);
    }

    #[test]
    fn mysql_commands() {
        let mut q = vec![0x03];
        q.extend_from_slice(b"INSERT INTO t VALUES (1, 'x')");
        let i = parse(
            System::Mysql,
            &q,
            q.len(),
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*i.operation, "INSERT");
        assert!(!i.fingerprint.contains('x'));
        let ping = parse(
            System::Mysql,
            &[0x0e],
            1,
            (&mut HashMap::new(), &mut 0),
            &mut cache(),
            false,
        )
        .unwrap();
        assert_eq!(&*ping.operation, "PING");
    }
}
