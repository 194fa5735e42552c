//! PostgreSQL: what a client sends (frontend messages, protocol 3.x), from the first bytes of
//! one request: a simple `Query` (`Q`), or an extended-protocol group such as `Parse` `Bind`
//! `Describe` `Execute` `Sync` (`P B D E S`, libpq's `PQexecParams`), `Parse` `Sync`
//! (`PQprepare`) or `Bind` `Describe` `Execute` `Sync` (`PQexecPrepared`, re-running a named
//! statement). Also tells the untyped packets a connection opens with (startup, SSLRequest,
//! GSSENCRequest, CancelRequest) from the rest.
//!
//! Every typed message is a type byte, a big-endian length that counts itself, and a body whose
//! strings end in NUL. The input is a bounded prefix starting at a message boundary: any
//! message may be cut, the SQL text mid-character included. Nothing here panics.

use super::text;

/// What one request span says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The SQL text of the first `Query` or `Parse` message.
    pub sql: Option<String>,
    /// The name of the statement the first `Parse` defines when `sql` comes from one (`""`: the
    /// unnamed statement); `None` for a `Query`.
    pub parsed_statement: Option<String>,
    /// The name of the statement the first `Bind` binds (`""`: the unnamed statement), so that
    /// the SQL of a statement prepared earlier on the connection can be looked up by it.
    pub bound_statement: Option<String>,
    /// Whether the span runs a statement: it holds a `Query` or an `Execute`, or a `Parse` or
    /// `Bind` whose group goes on past the prefix (a cut `P B D E S` is taken to run). False for
    /// groups seen whole that only prepare, describe or close (`P S`), and for lone `Sync`,
    /// `Terminate`, password and COPY messages.
    pub executes: bool,
    /// The prefix ended inside a string reported here: `sql` is the start of the statement's
    /// text, or a statement name was cut (and is then `None`).
    pub truncated: bool,
}

/// Longest message the server accepts for the types that carry SQL or data (1 GiB).
const MAX_LARGE: u32 = 0x3fff_ffff;
/// Longest message the server accepts for the small fixed-shape types (`PQ_SMALL_MESSAGE_LIMIT`).
const MAX_SMALL: u32 = 10_000;
/// Longest startup packet the server accepts (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP: u32 = 10_000;

const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// Whether `buf` starts with one of the untyped packets a connection opens with: a startup
/// packet (protocol 3.x), an SSLRequest, a GSSENCRequest or a CancelRequest. Needs the first
/// 8 bytes (length and code).
pub fn is_startup(buf: &[u8]) -> bool {
    let (Some(len), Some(code)) = (be32(buf, 0), be32(buf, 4)) else {
        return false;
    };
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => len == 8,
        // A 4-byte secret key until protocol 3.2, up to 256 bytes from 3.2 on.
        CANCEL_REQUEST_CODE => (16..=12 + 256).contains(&len),
        // Major version 3; the parameters that follow end in an empty name.
        _ => code >> 16 == 3 && (9..=MAX_STARTUP).contains(&len),
    }
}

/// The request at the start of `buf`: one or more frontend messages. `None` when `buf` does
/// not start with a whole message header (5 bytes) of a frontend message type with a plausible
/// length, or with a message whose strings are malformed; untyped startup packets are `None`
/// too (see [`is_startup`]).
pub fn request(buf: &[u8]) -> Option<Request> {
    message(buf)?;
    let mut req = Request::default();
    // A Parse or Bind was seen, and no Sync or Flush after it yet.
    let mut group_open = false;
    let mut at = 0;
    while let Some(rest) = buf.get(at..).filter(|r| !r.is_empty()) {
        let Some(m) = message(rest) else {
            break; // a cut header, or bytes that are not a message: the span ends here
        };
        if apply(&mut req, &m).is_none() {
            if at == 0 {
                return None;
            }
            break;
        }
        match m.ty {
            b'P' | b'B' => group_open = true,
            b'S' | b'H' => group_open = false,
            _ => {}
        }
        if !m.complete {
            break;
        }
        at += m.size;
    }
    req.executes |= group_open;
    Some(req)
}

struct Message<'a> {
    ty: u8,
    /// The body, or as much of it as the prefix holds.
    body: &'a [u8],
    /// Whether the whole message is in the prefix.
    complete: bool,
    /// Bytes the message takes, type byte included.
    size: usize,
}

fn message(b: &[u8]) -> Option<Message<'_>> {
    let ty = *b.first()?;
    // The lengths the server accepts for each type (the length counts itself).
    let (min, max) = match ty {
        b'Q' => (5, MAX_LARGE),
        b'P' => (8, MAX_LARGE),
        b'B' => (12, MAX_LARGE),
        b'F' => (14, MAX_LARGE),
        b'd' => (4, MAX_LARGE),
        b'D' | b'C' => (6, MAX_SMALL),
        b'E' => (9, MAX_SMALL),
        b'f' => (5, MAX_SMALL),
        b'p' => (5, 65_535 + 4),
        b'S' | b'H' | b'X' | b'c' => (4, 4),
        _ => return None,
    };
    let len = be32(b, 1)?;
    if !(min..=max).contains(&len) {
        return None;
    }
    let size = usize::try_from(len).ok()?.checked_add(1)?;
    let body = b.get(5..size.min(b.len()))?;
    // Describe and Close name a statement ('S') or a portal ('P').
    if matches!(ty, b'D' | b'C') && !matches!(body.first(), Some(b'S' | b'P')) {
        return None;
    }
    Some(Message {
        ty,
        body,
        complete: b.len() >= size,
        size,
    })
}

/// Takes what `m` tells into `req` (the first SQL text and names win). `None` when the message
/// is malformed: a string without its NUL in a message the prefix holds whole.
fn apply(req: &mut Request, m: &Message<'_>) -> Option<()> {
    let whole = m.complete;
    match m.ty {
        b'Q' => {
            let (sql, _, cut) = field(m.body, whole)?;
            req.executes = true;
            if req.sql.is_none() {
                req.sql = Some(text(sql, cut));
                req.truncated |= cut;
            }
        }
        b'P' => {
            let (name, rest, name_cut) = field(m.body, whole)?;
            if req.sql.is_some() {
                return Some(());
            }
            if name_cut {
                req.truncated = true;
                return Some(());
            }
            let (sql, _, cut) = field(rest, whole)?;
            req.sql = Some(text(sql, cut));
            req.parsed_statement = Some(text(name, false));
            req.truncated |= cut;
        }
        b'B' => {
            let (_portal, rest, portal_cut) = field(m.body, whole)?;
            let (name, _, cut) = field(rest, whole)?;
            if req.bound_statement.is_none() {
                if portal_cut || cut {
                    req.truncated = true;
                } else {
                    req.bound_statement = Some(text(name, false));
                }
            }
        }
        b'E' => req.executes = true,
        _ => {}
    }
    Some(())
}

/// A NUL-terminated string at the start of `b`: (the string, the bytes after it, whether the
/// prefix cut it). `None` when the NUL is missing from a message held whole.
fn field(b: &[u8], complete: bool) -> Option<(&[u8], &[u8], bool)> {
    match b.iter().position(|&c| c == 0) {
        Some(n) => Some((&b[..n], b.get(n + 1..).unwrap_or_default(), false)),
        None if !complete => Some((b, &[], true)),
        None => None,
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frontend message: type, length, body.
    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql));
        b.extend(0u16.to_be_bytes()); // no parameter types given (libpq sends 0)
        msg(b'P', &b)
    }

    /// libpq's Bind: portal "", statement, no parameter formats, the text parameters, and one
    /// result format (text).
    fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
        let mut b = cstr("");
        b.extend(cstr(statement));
        b.extend(0u16.to_be_bytes());
        b.extend((params.len() as u16).to_be_bytes());
        for p in params {
            b.extend((p.len() as u32).to_be_bytes());
            b.extend(p.as_bytes());
        }
        b.extend(1u16.to_be_bytes());
        b.extend(0u16.to_be_bytes());
        msg(b'B', &b)
    }

    /// Describe portal "", Execute portal "" (all rows), Sync: the rest of libpq's group.
    fn describe_execute_sync() -> Vec<u8> {
        let mut v = msg(b'D', b"P\0");
        v.extend(msg(b'E', b"\0\0\0\0\0"));
        v.extend(msg(b'S', b""));
        v
    }

    const PGBENCH_SELECT: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;";

    #[test]
    fn psql_simple_query() {
        // What psql sends for `SELECT 1;`, byte for byte.
        let buf = b"Q\x00\x00\x00\x0eSELECT 1;\x00";
        assert_eq!(
            request(buf),
            Some(Request {
                sql: Some("SELECT 1;".into()),
                executes: true,
                ..Request::default()
            })
        );
        // A Terminate on its own (psql's \q) runs nothing.
        let r = request(b"X\x00\x00\x00\x04").unwrap();
        assert_eq!(r, Request::default());
    }

    #[test]
    fn extended_protocol_unnamed_statement() {
        // pgbench -M extended, PQexecParams: P B D E S with the unnamed statement.
        let mut buf = parse("", PGBENCH_SELECT);
        buf.extend(bind("", &["4242"]));
        buf.extend(describe_execute_sync());
        let r = request(&buf).unwrap();
        assert_eq!(r.sql.as_deref(), Some(PGBENCH_SELECT));
        assert_eq!(r.parsed_statement.as_deref(), Some(""));
        assert_eq!(r.bound_statement.as_deref(), Some(""));
        assert!(r.executes && !r.truncated);
    }

    #[test]
    fn named_statement_prepared_then_executed() {
        // pgbench -M prepared: PQprepare (P S) once, then PQexecPrepared (B D E S) each time.
        let mut prepare = parse("P0_1", PGBENCH_SELECT);
        prepare.extend(msg(b'S', b""));
        let r = request(&prepare).unwrap();
        assert_eq!(r.sql.as_deref(), Some(PGBENCH_SELECT));
        assert_eq!(r.parsed_statement.as_deref(), Some("P0_1"));
        assert_eq!(r.bound_statement, None);
        assert!(!r.executes, "a whole P S group only prepares");

        let mut exec = bind("P0_1", &["17"]);
        exec.extend(describe_execute_sync());
        let r = request(&exec).unwrap();
        assert_eq!(r.sql, None);
        assert_eq!(r.parsed_statement, None);
        assert_eq!(r.bound_statement.as_deref(), Some("P0_1"));
        assert!(r.executes && !r.truncated);

        // Closing a statement (C S) runs nothing either.
        let mut close = msg(b'C', b"SP0_1\0");
        close.extend(msg(b'S', b""));
        assert!(!request(&close).unwrap().executes);
    }

    #[test]
    fn a_long_query_cut_by_the_prefix() {
        let sql = format!("SELECT '{}' FROM t WHERE k = 'ключ'", "x".repeat(300));
        let mut buf = parse("", &sql);
        buf.extend(bind("", &[]));
        buf.extend(describe_execute_sync());
        let r = request(&buf[..256]).unwrap();
        let got = r.sql.unwrap();
        assert!(r.truncated && r.executes);
        assert_eq!(got.len(), 256 - 5 - 1);
        assert!(sql.starts_with(&got));

        // Cut inside a two-byte character: the half character is dropped.
        let q = msg(b'Q', &cstr("SELECT 'ключ'"));
        let cut = q.iter().position(|&c| c == 0xd0).unwrap() + 1;
        let r = request(&q[..cut]).unwrap();
        assert_eq!(r.sql.as_deref(), Some("SELECT '"));
        assert!(r.truncated);
    }

    #[test]
    fn startup_packets() {
        // psql's startup packet (protocol 3.0), SSLRequest, GSSENCRequest, CancelRequest.
        let mut startup = Vec::new();
        let params = b"user\0postgres\0database\0postgres\0application_name\0psql\0\0";
        startup.extend((8 + params.len() as u32).to_be_bytes());
        startup.extend(0x0003_0000u32.to_be_bytes());
        startup.extend(params);
        let ssl = b"\x00\x00\x00\x08\x04\xd2\x16\x2f";
        let gss = b"\x00\x00\x00\x08\x04\xd2\x16\x30";
        let cancel = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\xde\xad\xbe\xef";
        for p in [&startup[..], ssl, gss, cancel] {
            assert!(is_startup(p));
            assert_eq!(request(p), None);
            assert!(!is_startup(&p[..7]));
        }
        assert!(!is_startup(b"Q\x00\x00\x00\x0eSELECT 1;\x00"));
        assert!(!is_startup(b"\x00\x00\x00\x09\x04\xd2\x16\x2f")); // SSLRequest is 8 bytes
        assert!(!is_startup(b"\x00\x00\x00\x08\x00\x02\x00\x00")); // protocol 2
        assert!(!is_startup(b""));
    }

    #[test]
    fn not_frontend_messages() {
        assert_eq!(request(b""), None);
        assert_eq!(request(b"Q\x00\x00"), None); // header cut: cannot tell
        assert_eq!(request(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(request(b"Q\x00\x00\x00\x03"), None); // length below its own size
        assert_eq!(request(b"S\x00\x00\x00\x05\x00"), None); // Sync has no body
        assert_eq!(request(b"Q\x00\x00\x00\x06ab"), None); // whole, but no NUL
        assert_eq!(request(b"D\x00\x00\x00\x06X\x00"), None); // neither statement nor portal
        assert_eq!(request(b"Q\x7f\xff\xff\xffSELECT"), None); // beyond the 1 GiB limit
                                                               // A good first message followed by junk: the junk is not read.
        let mut buf = msg(b'Q', &cstr("SELECT 1"));
        buf.extend(b"\xff\xff junk");
        assert_eq!(request(&buf).unwrap().sql.as_deref(), Some("SELECT 1"));
    }

    #[test]
    fn every_prefix_is_safe_and_consistent() {
        let mut spans = vec![msg(b'Q', &cstr("SELECT 1; SELECT 'é'"))];
        let mut ext = parse("P0_1", PGBENCH_SELECT);
        ext.extend(bind("P0_1", &["1", "ünïcode"]));
        ext.extend(describe_execute_sync());
        spans.push(ext);
        let mut prep = parse("stmt", "INSERT INTO t VALUES ($1)");
        prep.extend(msg(b'S', b""));
        spans.push(prep);
        for span in &spans {
            let whole = request(span).unwrap();
            for i in 0..=span.len() {
                let p = &span[..i];
                let r = request(p);
                assert_eq!(r.is_some(), i >= 5, "prefix {i} of {span:?}");
                let Some(r) = r else { continue };
                if let (Some(s), Some(w)) = (&r.sql, &whole.sql) {
                    assert!(w.starts_with(s.as_str()), "{s:?} vs {w:?}");
                    assert!(r.truncated || s == w);
                }
                assert!(!is_startup(p));
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Raw bytes, and runs of messages with real types, lengths that may lie by a little,
        // and bodies drawn from NULs, names and text; every prefix of each.
        let alphabet = b"QPBDESHXCdpf\x00\x00\x00\x04\x05\x0a\xffSP ab\xc3\xa9";
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            if round % 2 == 0 {
                for _ in 0..40 {
                    buf.push(alphabet[(next() % alphabet.len() as u64) as usize]);
                }
            } else {
                for _ in 0..1 + next() % 4 {
                    let body: Vec<u8> = (0..next() % 12)
                        .map(|_| b"\0\0SPab\xc3\xa9\x01"[(next() % 9) as usize])
                        .collect();
                    let lie = (next() % 5) as u32;
                    buf.push(b"QPBDESHCX"[(next() % 9) as usize]);
                    buf.extend((body.len() as u32 + 2 + lie).to_be_bytes());
                    buf.extend(&body);
                }
            }
            for i in 0..=buf.len() {
                if let Some(r) = request(&buf[..i]) {
                    assert!(r.sql.map_or(0, |s| s.len()) <= 3 * i);
                }
                let _ = is_startup(&buf[..i]);
            }
        }
    }
}
