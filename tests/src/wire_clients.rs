//! Minimal raw-protocol clients, std only, for what the real CLI clients cannot do: put several
//! PostgreSQL extended-protocol statements or several Redis commands on the wire in ONE
//! write(2), or re-execute a named prepared statement.
//!
//! Every request these clients send is built whole and handed to the kernel in a single
//! system call (a short write is an error, never a second write), so a test knows exactly how
//! the bytes arrived at the server. Note that std's `write` on a socket is sendto(2) with
//! MSG_NOSIGNAL, not write(2). Reads time out after [`IO_TIMEOUT`].

use std::{
    io::{BufRead as _, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};

/// How long a read or write may block before the client gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix stream socket path (PostgreSQL's is `<socket_dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    pub fn connect(&self) -> Result<Stream> {
        let s = match self {
            Endpoint::Unix(p) => Stream::Unix(
                UnixStream::connect(p).with_context(|| format!("connect {}", p.display()))?,
            ),
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a).with_context(|| format!("connect {a}"))?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        s.set_timeouts(IO_TIMEOUT)?;
        Ok(s)
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected unix or TCP stream.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))?;
            }
        }
        Ok(())
    }

    /// Sends `buf` with exactly one system call (sendto(2), as std writes to sockets).
    pub fn write_once(&mut self, buf: &[u8]) -> Result<()> {
        let n = self.write(buf).context("write")?;
        ensure!(
            n == buf.len(),
            "short write: {n} of {} bytes in one write()",
            buf.len()
        );
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL (frontend/backend protocol 3.0)
// ---------------------------------------------------------------------------------------------

/// What the server answered for one statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgResult {
    /// CommandComplete: its tag (`SELECT 1`, `INSERT 0 1`, ...) and the rows (text format).
    Done {
        tag: String,
        rows: Vec<Vec<Option<String>>>,
    },
    /// ErrorResponse: SQLSTATE (`42703`, ...) and message.
    Error { code: String, message: String },
    /// EmptyQueryResponse (the statement was empty).
    Empty,
    /// No answer: an earlier statement of the same pipeline failed, so the server skipped this
    /// one (it discards everything up to the Sync after an error).
    Skipped,
}

impl PgResult {
    pub fn is_done(&self) -> bool {
        matches!(self, PgResult::Done { .. })
    }

    pub fn is_error(&self) -> bool {
        matches!(self, PgResult::Error { .. })
    }

    /// The first column of the first row, if any (and not NULL).
    pub fn first_value(&self) -> Option<&str> {
        match self {
            PgResult::Done { rows, .. } => rows.first()?.first()?.as_deref(),
            _ => None,
        }
    }
}

/// One raw PostgreSQL connection (trust authentication only). Sends Terminate when dropped.
pub struct PgConn {
    io: BufReader<Stream>,
    /// The backend's process id (BackendKeyData).
    pub backend_pid: u32,
    /// ParameterStatus values the server sent during startup.
    pub params: Vec<(String, String)>,
    /// The transaction status byte of the last ReadyForQuery (`I`, `T` or `E`).
    pub tx_status: u8,
}

impl PgConn {
    /// Connects as user `postgres` to database `postgres`.
    pub fn connect(ep: &Endpoint) -> Result<Self> {
        Self::connect_as(ep, "postgres", "postgres")
    }

    pub fn connect_as(ep: &Endpoint, user: &str, database: &str) -> Result<Self> {
        let stream = ep.connect()?;
        let mut conn = PgConn {
            io: BufReader::new(stream),
            backend_pid: 0,
            params: Vec::new(),
            tx_status: b'I',
        };
        let mut body = Vec::new();
        body.extend_from_slice(&196_608i32.to_be_bytes()); // protocol 3.0
        for (k, v) in [("user", user), ("database", database)] {
            put_cstr(&mut body, k);
            put_cstr(&mut body, v);
        }
        body.push(0);
        let mut msg = Vec::with_capacity(body.len() + 4);
        msg.extend_from_slice(&len_prefix(body.len()));
        msg.extend_from_slice(&body);
        conn.io.get_mut().write_once(&msg)?;
        loop {
            let (tag, body) = conn.read_msg()?;
            match tag {
                b'R' => {
                    let code = be_i32(&body, 0)?;
                    if code != 0 {
                        bail!(
                            "{ep}: authentication method {code} requested; only trust (AuthenticationOk) is supported"
                        );
                    }
                }
                b'S' => {
                    let mut f = Fields::new(&body);
                    let k = f.cstr()?;
                    let v = f.cstr()?;
                    conn.params.push((k, v));
                }
                b'K' => conn.backend_pid = be_i32(&body, 0)? as u32,
                b'N' => {}
                b'E' => bail!("{ep}: startup failed: {}", error_text(&body)),
                b'Z' => {
                    conn.tx_status = body.first().copied().unwrap_or(b'I');
                    return Ok(conn);
                }
                other => bail!(
                    "{ep}: unexpected message {:?} during startup",
                    other as char
                ),
            }
        }
    }

    /// One Query message (which may hold several `;`-separated statements). Returns one result
    /// per statement the server answered; after an error it answers no more.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<PgResult>> {
        let mut msg = Vec::new();
        put_msg(&mut msg, b'Q', |b| put_cstr(b, sql));
        self.io.get_mut().write_once(&msg)?;
        self.read_results()
    }

    /// The extended protocol, pipelined: for each statement Parse (unnamed), Bind (unnamed
    /// portal), Execute; then ONE Sync, all in ONE write(). Reads up to ReadyForQuery and
    /// returns one result per statement, in order: the statements after a failing one are
    /// [`PgResult::Skipped`].
    pub fn pipeline_extended(&mut self, sqls: &[&str]) -> Result<Vec<PgResult>> {
        let mut msg = Vec::new();
        for sql in sqls {
            put_parse(&mut msg, "", sql);
            put_bind(&mut msg, "", &[]);
            put_execute(&mut msg);
        }
        put_msg(&mut msg, b'S', |_| {});
        self.io.get_mut().write_once(&msg)?;
        let mut results = self.read_results()?;
        ensure!(
            results.len() <= sqls.len(),
            "{} results for {} statements: {results:?}",
            results.len(),
            sqls.len()
        );
        results.resize(sqls.len(), PgResult::Skipped);
        Ok(results)
    }

    /// Parse of a named statement, then Sync (one write). Fails if the server rejects it.
    pub fn prepare(&mut self, name: &str, sql: &str) -> Result<()> {
        ensure!(!name.is_empty(), "a prepared statement needs a name");
        let mut msg = Vec::new();
        put_parse(&mut msg, name, sql);
        put_msg(&mut msg, b'S', |_| {});
        self.io.get_mut().write_once(&msg)?;
        match self.read_results()?.into_iter().next() {
            None => Ok(()),
            Some(PgResult::Error { code, message }) => {
                bail!("prepare {name}: {code} {message}")
            }
            Some(other) => bail!("prepare {name}: unexpected {other:?}"),
        }
    }

    /// Bind (unnamed portal, `params` in text format) + Execute of the named statement, then
    /// Sync, in one write.
    pub fn execute_prepared(&mut self, name: &str, params: &[&str]) -> Result<PgResult> {
        let mut msg = Vec::new();
        put_bind(&mut msg, name, params);
        put_execute(&mut msg);
        put_msg(&mut msg, b'S', |_| {});
        self.io.get_mut().write_once(&msg)?;
        let mut results = self.read_results()?;
        ensure!(results.len() <= 1, "several results: {results:?}");
        Ok(results.pop().unwrap_or(PgResult::Skipped))
    }

    /// Reads up to and including ReadyForQuery.
    fn read_results(&mut self) -> Result<Vec<PgResult>> {
        let mut results = Vec::new();
        let mut rows = Vec::new();
        loop {
            let (tag, body) = self.read_msg()?;
            match tag {
                // ParseComplete, BindComplete, CloseComplete, NoData, RowDescription.
                b'1' | b'2' | b'3' | b'n' | b'T' => {}
                // Notice, ParameterStatus, Notification: asynchronous, not answers.
                b'N' | b'S' | b'A' => {}
                b'D' => rows.push(data_row(&body)?),
                b'C' => {
                    let tag = Fields::new(&body).cstr()?;
                    results.push(PgResult::Done {
                        tag,
                        rows: std::mem::take(&mut rows),
                    });
                }
                b'I' => results.push(PgResult::Empty),
                b'E' => {
                    rows.clear();
                    let (code, message) = error_fields(&body);
                    results.push(PgResult::Error { code, message });
                }
                b'Z' => {
                    self.tx_status = body.first().copied().unwrap_or(b'I');
                    return Ok(results);
                }
                other => bail!("unexpected message {:?}", other as char),
            }
        }
    }

    fn read_msg(&mut self) -> Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.io
            .read_exact(&mut head)
            .context("reading a message header")?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        ensure!(
            (4..=64 << 20).contains(&len),
            "bad message length {len} for {:?}",
            head[0] as char
        );
        let mut body = vec![0u8; len as usize - 4];
        self.io
            .read_exact(&mut body)
            .context("reading a message body")?;
        Ok((head[0], body))
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        let mut msg = Vec::new();
        put_msg(&mut msg, b'X', |_| {});
        let _ = self.io.get_mut().write_once(&msg);
    }
}

fn len_prefix(body_len: usize) -> [u8; 4] {
    ((body_len + 4) as i32).to_be_bytes()
}

/// Appends a message: type byte, length, body.
fn put_msg(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let mut b = Vec::new();
    body(&mut b);
    out.push(tag);
    out.extend_from_slice(&len_prefix(b.len()));
    out.extend_from_slice(&b);
}

fn put_cstr(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.push(0);
}

fn put_parse(out: &mut Vec<u8>, name: &str, sql: &str) {
    put_msg(out, b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.extend_from_slice(&0i16.to_be_bytes()); // no parameter types: inferred
    });
}

fn put_bind(out: &mut Vec<u8>, statement: &str, params: &[&str]) {
    put_msg(out, b'B', |b| {
        put_cstr(b, ""); // unnamed portal
        put_cstr(b, statement);
        b.extend_from_slice(&0i16.to_be_bytes()); // parameters in text format
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes()); // results in text format
    });
}

fn put_execute(out: &mut Vec<u8>) {
    put_msg(out, b'E', |b| {
        put_cstr(b, "");
        b.extend_from_slice(&0i32.to_be_bytes()); // all rows
    });
}

fn be_i32(b: &[u8], at: usize) -> Result<i32> {
    let s = b.get(at..at + 4).context("message too short")?;
    Ok(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>> {
    let n = i16::from_be_bytes([
        *body.first().context("empty DataRow")?,
        *body.get(1).context("short DataRow")?,
    ]);
    let mut at = 2;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = be_i32(body, at)?;
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let v = body
                .get(at..at + len as usize)
                .context("DataRow value past its end")?;
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
            at += len as usize;
        }
    }
    Ok(row)
}

/// SQLSTATE and message of an ErrorResponse/NoticeResponse body.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut f = Fields::new(body);
    while let Some(kind) = f.byte() {
        if kind == 0 {
            break;
        }
        let Ok(v) = f.cstr() else { break };
        match kind {
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    (code, message)
}

fn error_text(body: &[u8]) -> String {
    let (code, message) = error_fields(body);
    format!("{code} {message}")
}

struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }

    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.at)?;
        self.at += 1;
        Some(v)
    }

    fn cstr(&mut self) -> Result<String> {
        let rest = self.b.get(self.at..).unwrap_or_default();
        let end = rest
            .iter()
            .position(|&c| c == 0)
            .context("unterminated string")?;
        self.at += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Redis (RESP2)
// ---------------------------------------------------------------------------------------------

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`
    Null,
    /// `*N` followed by N replies.
    Array(Vec<Reply>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Error,
    Integer,
    Bulk,
    Null,
    Array,
}

impl Reply {
    pub fn kind(&self) -> ReplyKind {
        match self {
            Reply::Simple(_) => ReplyKind::Simple,
            Reply::Error(_) => ReplyKind::Error,
            Reply::Integer(_) => ReplyKind::Integer,
            Reply::Bulk(_) => ReplyKind::Bulk,
            Reply::Null => ReplyKind::Null,
            Reply::Array(_) => ReplyKind::Array,
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    /// The text of a simple string, error or bulk string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Reply::Simple(s) | Reply::Error(s) => Some(s),
            Reply::Bulk(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// A command as a RESP array of bulk strings (what redis-cli and every client library send).
pub fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One raw Redis connection.
pub struct RedisConn {
    io: BufReader<Stream>,
}

impl RedisConn {
    pub fn connect(ep: &Endpoint) -> Result<Self> {
        Ok(RedisConn {
            io: BufReader::new(ep.connect()?),
        })
    }

    /// Writes every command (RESP arrays) in ONE write(), then reads exactly one reply each.
    pub fn pipeline(&mut self, cmds: &[Vec<&str>]) -> Result<Vec<Reply>> {
        let mut buf = Vec::new();
        for c in cmds {
            buf.extend_from_slice(&encode_command(c));
        }
        self.send_raw(&buf, cmds.len())
    }

    /// One command, one reply.
    pub fn command(&mut self, args: &[&str]) -> Result<Reply> {
        let mut r = self.send_raw(&encode_command(args), 1)?;
        r.pop().context("no reply")
    }

    /// Writes `bytes` as they are (e.g. inline commands) in one write() and reads `replies`
    /// replies.
    pub fn send_raw(&mut self, bytes: &[u8], replies: usize) -> Result<Vec<Reply>> {
        self.io.get_mut().write_once(bytes)?;
        self.replies(replies)
    }

    /// Writes `bytes` in one write() and reads nothing.
    pub fn send_only(&mut self, bytes: &[u8]) -> Result<()> {
        self.io.get_mut().write_once(bytes)
    }

    /// Reads exactly `n` bytes straight from the socket (no read-ahead past them), so that the
    /// kernel sees reads that end at byte `n`. Nothing may be buffered from an earlier reply.
    pub fn read_exact_unbuffered(&mut self, n: usize) -> Result<Vec<u8>> {
        ensure!(
            self.io.buffer().is_empty(),
            "bytes already buffered from an earlier read"
        );
        let mut b = vec![0u8; n];
        self.io.get_mut().read_exact(&mut b).context("read")?;
        Ok(b)
    }

    /// Reads `n` replies.
    pub fn replies(&mut self, n: usize) -> Result<Vec<Reply>> {
        (0..n)
            .map(|i| self.read_reply().with_context(|| format!("reply {i}")))
            .collect()
    }

    fn read_reply(&mut self) -> Result<Reply> {
        let line = self.read_line()?;
        let kind = line[0];
        let rest = String::from_utf8_lossy(&line[1..]).into_owned();
        Ok(match kind {
            b'+' => Reply::Simple(rest),
            b'-' => Reply::Error(rest),
            b':' => Reply::Integer(rest.parse().with_context(|| format!("integer {rest:?}"))?),
            b'$' => {
                let n: i64 = rest
                    .parse()
                    .with_context(|| format!("bulk length {rest:?}"))?;
                if n < 0 {
                    Reply::Null
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.io.read_exact(&mut b).context("bulk string")?;
                    ensure!(b.ends_with(b"\r\n"), "bulk string without CRLF");
                    b.truncate(n as usize);
                    Reply::Bulk(b)
                }
            }
            b'*' => {
                let n: i64 = rest
                    .parse()
                    .with_context(|| format!("array length {rest:?}"))?;
                if n < 0 {
                    Reply::Null
                } else {
                    let items = (0..n)
                        .map(|_| self.read_reply())
                        .collect::<Result<Vec<_>>>()?;
                    Reply::Array(items)
                }
            }
            _ => bail!("not a RESP2 reply: {:?}", String::from_utf8_lossy(&line)),
        })
    }

    /// One CRLF-terminated line without its CRLF; never empty.
    fn read_line(&mut self) -> Result<Vec<u8>> {
        let mut line = Vec::new();
        self.io.read_until(b'\n', &mut line).context("read")?;
        ensure!(
            line.ends_with(b"\r\n") && line.len() > 2,
            "connection closed or bad line: {:?}",
            String::from_utf8_lossy(&line)
        );
        line.truncate(line.len() - 2);
        Ok(line)
    }
}

/// Connects, sends `cmds` in one write(), reads one reply per command, and closes.
pub fn redis_pipeline(ep: &Endpoint, cmds: &[Vec<&str>]) -> Result<Vec<Reply>> {
    RedisConn::connect(ep)?.pipeline(cmds)
}
