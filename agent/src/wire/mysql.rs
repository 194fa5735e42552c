//! MySQL and MariaDB: the command a client sends (client/server protocol, command phase), from
//! the first bytes of its packet's payload: the command byte, then the command's fields. The
//! 4-byte packet header (length, sequence id) is not part of the input; the payload's length
//! is, because COM_QUERY text is not terminated and only the length tells whether the prefix
//! holds all of it.
//!
//! COM_QUERY is plain text after the command byte, except from clients that negotiated
//! CLIENT_QUERY_ATTRIBUTES (MySQL 8.0.23+ clients and servers): there a parameter count, a
//! parameter set count (always 1) and any attributes come first. MariaDB (10.11) never sends
//! them. The two are told apart by the second byte: `0x01` (the set count) never starts SQL.
//!
//! Nothing here panics, whatever the bytes.

use super::{sql, text};

pub const COM_QUIT: u8 = 0x01;
pub const COM_INIT_DB: u8 = 0x02;
pub const COM_QUERY: u8 = 0x03;
pub const COM_PING: u8 = 0x0e;
pub const COM_STMT_PREPARE: u8 = 0x16;
pub const COM_STMT_EXECUTE: u8 = 0x17;
/// MariaDB's bulk execute (arrays of parameters for one prepared statement).
pub const COM_STMT_BULK_EXECUTE: u8 = 0xfa;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// COM_QUERY: SQL text.
    Query,
    /// COM_STMT_PREPARE: SQL text; the server answers with the statement id.
    Prepare,
    /// COM_STMT_EXECUTE of a statement prepared earlier.
    Execute {
        statement_id: u32,
    },
    Ping,
    /// COM_INIT_DB (`USE db`).
    InitDb,
    Quit,
    /// Another command of the command phase (COM_STMT_CLOSE, COM_RESET_CONNECTION, ...).
    Other(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// The SQL text of a Query or Prepare (`None` for a Query whose attributes the prefix
    /// cut, or that could not be read).
    pub sql: Option<String>,
    /// The prefix ended inside the SQL text (or inside a Query's attributes, before it).
    pub truncated: bool,
}

/// The command at the start of `buf`, a prefix of a payload `len` bytes long (the packet
/// header's length; `buf.len()` when not known, and then nothing counts as cut). Bytes of `buf`
/// past `len` are not read. `None` when `buf` is empty, the byte is not a command-phase command,
/// or an Execute's statement id is cut.
pub fn request(buf: &[u8], len: usize) -> Option<Request> {
    let buf = buf.get(..len).unwrap_or(buf);
    let cut = buf.len() < len;
    let (&cmd, body) = buf.split_first()?;
    let command = match cmd {
        COM_QUERY => Command::Query,
        COM_STMT_PREPARE => Command::Prepare,
        COM_STMT_EXECUTE => Command::Execute {
            statement_id: u32::from_le_bytes(body.get(..4)?.try_into().ok()?),
        },
        COM_PING => Command::Ping,
        COM_INIT_DB => Command::InitDb,
        COM_QUIT => Command::Quit,
        // COM_SLEEP (0x00) to COM_CLONE (0x20), and MariaDB's bulk execute.
        0x00..=0x20 | COM_STMT_BULK_EXECUTE => Command::Other(cmd),
        _ => return None,
    };
    let (sql, truncated) = match command {
        Command::Query => match query_text(body, cut) {
            Some(at) => (body.get(at..).map(|t| text(t, cut)), cut),
            // Attributes the prefix cut before the text, or could not be read at all.
            None => (None, cut),
        },
        Command::Prepare => (Some(text(body, cut)), cut),
        _ => (None, false),
    };
    Some(Request {
        command,
        sql,
        truncated,
    })
}

/// The statement kind: `SELECT`, `INSERT`, ... (see [`sql::operation`]) for a Query or Prepare
/// (`QUERY`/`PREPARE` when its text is not known), else the command's name: `EXECUTE`, `PING`,
/// `INIT_DB`, `QUIT`, `STMT_CLOSE`, ...
pub fn operation(req: &Request) -> String {
    let name = match (req.command, &req.sql) {
        (Command::Query | Command::Prepare, Some(s)) => return sql::operation(s),
        (Command::Query, None) => "QUERY",
        (Command::Prepare, None) => "PREPARE",
        (Command::Execute { .. }, _) => "EXECUTE",
        (Command::Ping, _) => "PING",
        (Command::InitDb, _) => "INIT_DB",
        (Command::Quit, _) => "QUIT",
        (Command::Other(c), _) => match c {
            0x00 => "SLEEP",
            0x04 => "FIELD_LIST",
            0x05 => "CREATE_DB",
            0x06 => "DROP_DB",
            0x07 => "REFRESH",
            0x08 => "SHUTDOWN",
            0x09 => "STATISTICS",
            0x0a => "PROCESS_INFO",
            0x0b => "CONNECT",
            0x0c => "PROCESS_KILL",
            0x0d => "DEBUG",
            0x0f => "TIME",
            0x10 => "DELAYED_INSERT",
            0x11 => "CHANGE_USER",
            0x12 => "BINLOG_DUMP",
            0x13 => "TABLE_DUMP",
            0x14 => "CONNECT_OUT",
            0x15 => "REGISTER_SLAVE",
            0x18 => "STMT_SEND_LONG_DATA",
            0x19 => "STMT_CLOSE",
            0x1a => "STMT_RESET",
            0x1b => "SET_OPTION",
            0x1c => "STMT_FETCH",
            0x1d => "DAEMON",
            0x1e => "BINLOG_DUMP_GTID",
            0x1f => "RESET_CONNECTION",
            0x20 => "CLONE",
            COM_STMT_BULK_EXECUTE => "STMT_BULK_EXECUTE",
            _ => return format!("COM_{c:#04x}"),
        },
    };
    name.into()
}

/// Where a COM_QUERY's SQL text starts in `body` (after the command byte): 0 for plain text,
/// after the attributes for a client that sends them. `None` when the attributes are cut (or
/// the prefix ends before telling), or cannot be read.
fn query_text(body: &[u8], cut: bool) -> Option<usize> {
    // Plain text, unless the second byte is the parameter set count (always 1); a prefix
    // that ends before it cannot tell.
    match body.get(1) {
        None if cut => return None,
        None => return Some(0),
        Some(&c) if c != 1 => return Some(0),
        Some(_) => {}
    }
    let (params, mut at) = lenenc(body)?;
    at += 1; // the parameter set count
    if params == 0 {
        return Some(at);
    }
    let params = usize::try_from(params).ok().filter(|&n| n <= 4096)?;
    let nulls = body.get(at..at + params.div_ceil(8))?;
    at += nulls.len();
    // new_params_bind_flag: always 1 for COM_QUERY (types and names follow).
    if body.get(at) != Some(&1) {
        return None;
    }
    at += 1;
    let mut types = Vec::with_capacity(params.min(64));
    for _ in 0..params {
        types.push(*body.get(at)?);
        at += 2; // type, flags
        let (name_len, n) = lenenc(body.get(at..)?)?;
        at = at
            .checked_add(n)?
            .checked_add(usize::try_from(name_len).ok()?)?;
    }
    for (i, ty) in types.into_iter().enumerate() {
        if nulls.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
            continue;
        }
        at = at.checked_add(value_len(ty, body.get(at..)?)?)?;
    }
    (at <= body.len()).then_some(at)
}

/// Bytes a binary-protocol value of type `ty` takes at the start of `b`.
fn value_len(ty: u8, b: &[u8]) -> Option<usize> {
    Some(match ty {
        0x06 => 0,               // NULL
        0x01 => 1,               // TINY
        0x02 | 0x0d => 2,        // SHORT, YEAR
        0x03 | 0x04 | 0x09 => 4, // LONG, FLOAT, INT24
        0x05 | 0x08 => 8,        // DOUBLE, LONGLONG
        0x07 | 0x0a..=0x0c => {
            // TIMESTAMP, DATE, TIME, DATETIME: a length byte, then that many.
            1 + usize::from(*b.first()?)
        }
        // DECIMAL, VARCHAR, BIT, JSON, NEWDECIMAL, ENUM, SET, the BLOBs, VAR_STRING, STRING,
        // GEOMETRY: a length-encoded string.
        0x00 | 0x0f | 0x10 | 0xf5..=0xff => {
            let (n, hdr) = lenenc(b)?;
            hdr.checked_add(usize::try_from(n).ok()?)?
        }
        _ => return None,
    })
}

/// A length-encoded integer at the start of `b`: (value, bytes it took).
fn lenenc(b: &[u8]) -> Option<(u64, usize)> {
    let le = |n: usize| -> Option<(u64, usize)> {
        let bytes = b.get(1..1 + n)?;
        let v = bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &d| (acc << 8) | u64::from(d));
        Some((v, 1 + n))
    };
    match *b.first()? {
        c @ 0..=0xfa => Some((u64::from(c), 1)),
        0xfc => le(2),
        0xfd => le(3),
        0xfe => le(8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload (what follows the 4-byte header): command byte and fields.
    fn payload(cmd: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![cmd];
        p.extend_from_slice(rest);
        p
    }

    fn req(p: &[u8]) -> Request {
        request(p, p.len()).unwrap()
    }

    #[test]
    fn mariadb_client_queries() {
        // The mariadb client's first query in interactive mode, as the server reads it after
        // the header `21 00 00 00`.
        let p = payload(COM_QUERY, b"select @@version_comment limit 1");
        let r = req(&p);
        assert_eq!(r.command, Command::Query);
        assert_eq!(r.sql.as_deref(), Some("select @@version_comment limit 1"));
        assert!(!r.truncated);
        assert_eq!(operation(&r), "SELECT");

        let r = req(&payload(COM_QUERY, b"INSERT INTO t VALUES (1, 'x')"));
        assert_eq!(operation(&r), "INSERT");
        let r = req(&payload(COM_INIT_DB, b"test"));
        assert_eq!(
            (r.command, r.sql, operation(&req(b"\x02test"))),
            (Command::InitDb, None, "INIT_DB".into())
        );
        assert_eq!(operation(&req(&[COM_PING])), "PING");
        assert_eq!(req(&[COM_QUIT]).command, Command::Quit);
        assert_eq!(operation(&req(&[0x19, 1, 0, 0, 0])), "STMT_CLOSE");
        assert_eq!(operation(&req(&[0x1f])), "RESET_CONNECTION");
    }

    #[test]
    fn mysql8_query_attributes() {
        // No attributes: parameter count 0, parameter set count 1, then the text.
        let r = req(&payload(COM_QUERY, b"\x00\x01SELECT 1"));
        assert_eq!(r.sql.as_deref(), Some("SELECT 1"));
        // One attribute, `mysql_bind_param` with a string named "trace": null bitmap,
        // new_params_bind_flag, type VAR_STRING (0xfd) and flags, the name, then the value.
        let p = payload(
            COM_QUERY,
            b"\x01\x01\x00\x01\xfd\x00\x05trace\x03abcUPDATE t SET v = 1",
        );
        let r = req(&p);
        assert_eq!(r.sql.as_deref(), Some("UPDATE t SET v = 1"));
        assert_eq!(operation(&r), "UPDATE");
        // A LONGLONG attribute and a NULL one (bit 1 of the bitmap): no value for the latter.
        let p = payload(
            COM_QUERY,
            b"\x02\x01\x02\x01\x08\x00\x01a\xfd\x00\x01b\x2a\0\0\0\0\0\0\0DELETE FROM t",
        );
        assert_eq!(req(&p).sql.as_deref(), Some("DELETE FROM t"));
        // Attributes cut by the prefix: the text is not known.
        let r = request(&p[..8], p.len()).unwrap();
        assert_eq!(
            (r.sql, r.truncated, operation(&req(&p[..8]))),
            (None, true, "QUERY".into())
        );
    }

    #[test]
    fn prepare_and_execute() {
        let p = payload(COM_STMT_PREPARE, b"SELECT c FROM sbtest1 WHERE id=?");
        let r = req(&p);
        assert_eq!(r.command, Command::Prepare);
        assert_eq!(operation(&r), "SELECT");
        // COM_STMT_EXECUTE of statement 7: flags, iteration count, null bitmap,
        // new_params_bind_flag, type LONG, the value.
        let p = payload(
            COM_STMT_EXECUTE,
            b"\x07\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\x03\x00\x2a\x00\x00\x00",
        );
        let r = req(&p);
        assert_eq!(r.command, Command::Execute { statement_id: 7 });
        assert_eq!((r.sql, r.truncated), (None, false));
        assert_eq!(operation(&req(&p)), "EXECUTE");
        // The id itself cut: not a command we can report.
        assert_eq!(request(&p[..4], p.len()), None);
    }

    #[test]
    fn a_long_query_cut_by_the_prefix() {
        let sql = format!("SELECT * FROM t WHERE name IN ('{}', 'ü')", "n".repeat(300));
        let p = payload(COM_QUERY, sql.as_bytes());
        let r = request(&p[..256], p.len()).unwrap();
        assert!(r.truncated);
        assert_eq!(r.sql.as_deref(), Some(&sql[..255]));
        assert_eq!(operation(&r), "SELECT");
        // Cut inside the two-byte ü: it is dropped, not shown as U+FFFD.
        let at = p.len() - 3;
        let r = request(&p[..at], p.len()).unwrap();
        assert!(r.sql.unwrap().ends_with("', '"));
        // Bytes past the payload's length are not the query's.
        let mut two = payload(COM_QUERY, b"SELECT 1");
        two.extend(b"\x0c\x00\x00\x00\x03SELECT 2");
        let r = request(&two, 9).unwrap();
        assert_eq!((r.sql.as_deref(), r.truncated), (Some("SELECT 1"), false));
    }

    #[test]
    fn not_commands() {
        assert_eq!(request(b"", 0), None);
        assert_eq!(request(b"", 10), None);
        assert_eq!(request(b"\x21hello", 6), None);
        assert_eq!(request(b"\xff\x15\x04", 3), None); // an ERR packet, not a command
        assert_eq!(request(b"\x03SELECT 1", 0), None);
    }

    #[test]
    fn every_prefix_and_garbage_is_safe() {
        let payloads = [
            payload(COM_QUERY, "SELECT 'é' FROM t".as_bytes()),
            payload(
                COM_QUERY,
                b"\x01\x01\x00\x01\xfd\x00\x05trace\x03abcSELECT 2",
            ),
            payload(COM_STMT_PREPARE, b"SELECT ?"),
            payload(COM_STMT_EXECUTE, b"\x07\x00\x00\x00\x00\x01\x00\x00\x00"),
        ];
        for p in &payloads {
            let whole = req(p);
            for i in 0..=p.len() {
                let Some(r) = request(&p[..i], p.len()) else {
                    assert!(i == 0 || matches!(whole.command, Command::Execute { .. }));
                    continue;
                };
                assert_eq!(r.command, whole.command);
                assert!(r.truncated == (i < p.len()) || r.sql.is_none() && !r.truncated);
                if let (Some(s), Some(w)) = (&r.sql, &whole.sql) {
                    assert!(w.starts_with(s.as_str()), "{s:?} vs {w:?}");
                }
                let _ = operation(&r);
            }
        }
        let alphabet = b"\x00\x01\x02\x03\x08\x16\x17\xfa\xfb\xfc\xfd\xfe\xffSEL 'x\xc3\xa9";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..50_000 {
            let mut b = [0u8; 40];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = alphabet[(x % alphabet.len() as u64) as usize];
            }
            let len = (x >> 32) as usize % 64;
            if let Some(r) = request(&b, len) {
                assert!(r.sql.as_ref().map_or(0, String::len) <= 3 * b.len());
                assert!(!r.truncated || len > b.len());
                let _ = operation(&r);
            }
        }
    }
}
