//! Redis: commands from RESP arrays (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline commands
//! (`GET k\r\n`), and the outcome of a reply from its first bytes (`+`/`:` ok, `-` error,
//! `$-1`/`*-1`/`_` null: a miss for a read).
//!
//! Input is a bounded prefix of what crossed the socket: a command may be cut anywhere, and
//! one prefix may hold several pipelined commands. Nothing here allocates per byte or panics.

/// A command found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Upper-cased (`GET`, `SET`, `HGET`; `CLIENT` for `CLIENT SETNAME`).
    pub name: String,
    /// Arguments after the name.
    pub args: usize,
    /// Bytes the command takes, when it is complete in the buffer (for pipelines).
    pub len: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    /// A null reply: for a read command, a cache miss.
    Null,
}

const MAX_NAME: usize = 32;

/// The command at the start of `buf`, or `None` if it is not RESP or an inline command.
pub fn command(buf: &[u8]) -> Option<Command> {
    match buf.first()? {
        b'*' => array_command(buf),
        c if c.is_ascii_alphabetic() => inline_command(buf),
        _ => None,
    }
}

/// Every complete command in `buf`, in order (a pipeline), and the count of bytes they took.
pub fn commands(buf: &[u8]) -> (Vec<Command>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(rest) = buf.get(at..) {
        let Some(c) = command(rest) else { break };
        let Some(len) = c.len else {
            out.push(c);
            break;
        };
        at += len;
        out.push(c);
        if out.len() >= 4096 {
            break;
        }
    }
    (out, at)
}

/// A decimal number ending at `\r\n`: (value, bytes including the CRLF).
fn number(buf: &[u8]) -> Option<(i64, usize)> {
    let end = buf.windows(2).take(21).position(|w| w == b"\r\n")?;
    let text = std::str::from_utf8(buf.get(..end)?).ok()?;
    Some((text.parse().ok()?, end + 2))
}

fn array_command(buf: &[u8]) -> Option<Command> {
    let (n, mut at) = number(buf.get(1..)?)?;
    at += 1;
    if !(1..=1_000_000).contains(&n) {
        return None;
    }
    let mut name = None;
    let mut complete = true;
    for i in 0..n {
        // Each element: $len\r\n bytes \r\n.
        let Some(rest) = buf.get(at..) else {
            complete = false;
            break;
        };
        if rest.first() != Some(&b'$') {
            if rest.is_empty() {
                complete = false;
                break;
            }
            return None;
        }
        let Some((len, hdr)) = rest.get(1..).and_then(number) else {
            complete = false;
            break;
        };
        let len = usize::try_from(len).ok()?;
        let body = at + 1 + hdr;
        if i == 0 {
            let end = body.saturating_add(len.min(MAX_NAME)).min(buf.len());
            let raw = buf.get(body..end)?;
            // A name cut short (or lying about its length) ends at the line end at the latest.
            let raw = raw.split(|&c| c == b'\r').next().unwrap_or_default();
            name = Some(String::from_utf8_lossy(raw).to_ascii_uppercase());
        }
        at = body.saturating_add(len).saturating_add(2);
        if at > buf.len() {
            complete = false;
            break;
        }
    }
    Some(Command {
        name: name?,
        args: usize::try_from(n - 1).unwrap_or(0),
        len: complete.then_some(at),
    })
}

fn inline_command(buf: &[u8]) -> Option<Command> {
    let end = buf.windows(2).position(|w| w == b"\r\n");
    let line = &buf[..end.unwrap_or(buf.len())];
    let mut words = line
        .split(|c| c.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    if first.len() > MAX_NAME || !first.iter().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    Some(Command {
        name: String::from_utf8_lossy(first).to_ascii_uppercase(),
        args: words.count(),
        len: end.map(|e| e + 2),
    })
}

/// The outcome of the reply at the start of `buf`.
pub fn outcome(buf: &[u8]) -> Option<Outcome> {
    Some(match buf.first()? {
        b'-' | b'!' => Outcome::Error,
        b'_' => Outcome::Null,
        b'$' | b'*' if buf.get(1..3) == Some(b"-1") => Outcome::Null,
        b'+' | b':' | b'$' | b'*' | b',' | b'#' | b'%' | b'~' | b'=' | b'(' | b'>' | b'|' => {
            Outcome::Ok
        }
        _ => return None,
    })
}

/// The name a command is counted under: a command Redis knows ([`KNOWN`]), a module command
/// (`JSON.GET`: a known module's prefix and a plain name), else `unknown`. The name is the
/// client's text; as a label it must come from a bounded, printable set. (The collector
/// names an unknown command the server refused `unknown_command`.)
pub fn operation(name: &str) -> std::borrow::Cow<'static, str> {
    if let Ok(i) = KNOWN.binary_search(&name) {
        return std::borrow::Cow::Borrowed(KNOWN[i]);
    }
    if is_module_command(name) {
        return std::borrow::Cow::Owned(name.to_string());
    }
    std::borrow::Cow::Borrowed("unknown")
}

/// A command Redis (or a module: `JSON.GET`, `FT.SEARCH`) defines. `name` is upper-case.
pub fn is_known(name: &str) -> bool {
    KNOWN.binary_search(&name).is_ok() || is_module_command(name)
}

/// `PREFIX.NAME` with a Redis Stack module's prefix and a plain name.
fn is_module_command(name: &str) -> bool {
    let Some((module, command)) = name.split_once('.') else {
        return false;
    };
    let plain = !command.is_empty()
        && command.len() <= 24
        && command.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
    plain && MODULE_PREFIXES.contains(&module)
}

/// Prefixes of the Redis Stack modules' commands (RedisJSON, RediSearch, RedisTimeSeries,
/// RedisBloom).
const MODULE_PREFIXES: &[&str] = &["BF", "CF", "CMS", "FT", "JSON", "TDIGEST", "TOPK", "TS"];

/// Commands Redis knows (7.0's `COMMAND LIST`, and those 7.2 to 8.0 added), sorted: an error
/// reply to any other name is an unknown command, and its operation label is bounded.
#[rustfmt::skip]
const KNOWN: [&str; 264] = [
    "ACL", "APPEND", "ASKING", "AUTH", "BGREWRITEAOF", "BGSAVE", "BITCOUNT", "BITFIELD",
    "BITFIELD_RO", "BITOP", "BITPOS", "BLMOVE", "BLMPOP", "BLPOP", "BRPOP", "BRPOPLPUSH", "BZMPOP",
    "BZPOPMAX", "BZPOPMIN", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "COPY", "DBSIZE", "DEBUG",
    "DECR", "DECRBY", "DEL", "DISCARD", "DUMP", "ECHO", "EVAL", "EVALSHA", "EVALSHA_RO", "EVAL_RO",
    "EXEC", "EXISTS", "EXPIRE", "EXPIREAT", "EXPIRETIME", "FAILOVER", "FCALL", "FCALL_RO",
    "FLUSHALL", "FLUSHDB", "FUNCTION", "GEOADD", "GEODIST", "GEOHASH", "GEOPOS", "GEORADIUS",
    "GEORADIUSBYMEMBER", "GEORADIUSBYMEMBER_RO", "GEORADIUS_RO", "GEOSEARCH", "GEOSEARCHSTORE",
    "GET", "GETBIT", "GETDEL", "GETEX", "GETRANGE", "GETSET", "HDEL", "HELLO", "HEXISTS",
    "HEXPIRE", "HEXPIREAT", "HEXPIRETIME", "HGET", "HGETALL", "HGETDEL", "HGETEX", "HINCRBY",
    "HINCRBYFLOAT", "HKEYS", "HLEN", "HMGET", "HMSET", "HPERSIST", "HPEXPIRE", "HPEXPIREAT",
    "HPEXPIRETIME", "HPTTL", "HRANDFIELD", "HSCAN", "HSET", "HSETEX", "HSETNX", "HSTRLEN", "HTTL",
    "HVALS", "INCR", "INCRBY", "INCRBYFLOAT", "INFO", "KEYS", "LASTSAVE", "LATENCY", "LCS",
    "LINDEX", "LINSERT", "LLEN", "LMOVE", "LMPOP", "LOLWUT", "LPOP", "LPOS", "LPUSH", "LPUSHX",
    "LRANGE", "LREM", "LSET", "LTRIM", "MEMORY", "MGET", "MIGRATE", "MODULE", "MONITOR", "MOVE",
    "MSET", "MSETNX", "MULTI", "OBJECT", "PERSIST", "PEXPIRE", "PEXPIREAT", "PEXPIRETIME", "PFADD",
    "PFCOUNT", "PFDEBUG", "PFMERGE", "PFSELFTEST", "PING", "PSETEX", "PSUBSCRIBE", "PSYNC", "PTTL",
    "PUBLISH", "PUBSUB", "PUNSUBSCRIBE", "QUIT", "RANDOMKEY", "READONLY", "READWRITE", "RENAME",
    "RENAMENX", "REPLCONF", "REPLICAOF", "RESET", "RESTORE", "RESTORE-ASKING", "ROLE", "RPOP",
    "RPOPLPUSH", "RPUSH", "RPUSHX", "SADD", "SAVE", "SCAN", "SCARD", "SCRIPT", "SDIFF",
    "SDIFFSTORE", "SELECT", "SET", "SETBIT", "SETEX", "SETNX", "SETRANGE", "SHUTDOWN", "SINTER",
    "SINTERCARD", "SINTERSTORE", "SISMEMBER", "SLAVEOF", "SLOWLOG", "SMEMBERS", "SMISMEMBER",
    "SMOVE", "SORT", "SORT_RO", "SPOP", "SPUBLISH", "SRANDMEMBER", "SREM", "SSCAN", "SSUBSCRIBE",
    "STRLEN", "SUBSCRIBE", "SUBSTR", "SUNION", "SUNIONSTORE", "SUNSUBSCRIBE", "SWAPDB", "SYNC",
    "TIME", "TOUCH", "TTL", "TYPE", "UNLINK", "UNSUBSCRIBE", "UNWATCH", "VADD", "VCARD", "VDIM",
    "VEMB", "VGETATTR", "VINFO", "VLINKS", "VRANDMEMBER", "VREM", "VSETATTR", "VSIM", "WAIT",
    "WAITAOF", "WATCH", "XACK", "XADD", "XAUTOCLAIM", "XCLAIM", "XDEL", "XGROUP", "XINFO", "XLEN",
    "XPENDING", "XRANGE", "XREAD", "XREADGROUP", "XREVRANGE", "XSETID", "XTRIM", "ZADD", "ZCARD",
    "ZCOUNT", "ZDIFF", "ZDIFFSTORE", "ZINCRBY", "ZINTER", "ZINTERCARD", "ZINTERSTORE", "ZLEXCOUNT",
    "ZMPOP", "ZMSCORE", "ZPOPMAX", "ZPOPMIN", "ZRANDMEMBER", "ZRANGE", "ZRANGEBYLEX",
    "ZRANGEBYSCORE", "ZRANGESTORE", "ZRANK", "ZREM", "ZREMRANGEBYLEX", "ZREMRANGEBYRANK",
    "ZREMRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYLEX", "ZREVRANGEBYSCORE", "ZREVRANK", "ZSCAN",
    "ZSCORE", "ZUNION", "ZUNIONSTORE",
];

/// Read commands whose null reply means "not there": a cache miss.
pub fn is_read(name: &str) -> bool {
    matches!(
        name,
        "GET"
            | "GETEX"
            | "GETDEL"
            | "HGET"
            | "LINDEX"
            | "ZSCORE"
            | "GETRANGE"
            | "LPOP"
            | "RPOP"
            | "SPOP"
            | "HGETALL"
            | "SMEMBERS"
            | "ZRANGE"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_known_names_or_unknown() {
        assert_eq!(operation("GET"), "GET");
        assert_eq!(operation("HGETDEL"), "HGETDEL");
        assert_eq!(operation("JSON.GET"), "JSON.GET");
        for bad in [
            "CMD1",
            "BACK\\SLASH",
            "\"} 1\nFAKE 7\n#",
            "",
            "JSON.",
            "EVIL.GET",
            "JSON.G\"T",
            "get",
        ] {
            assert_eq!(operation(bad), "unknown", "{bad:?}");
        }
    }

    #[test]
    fn array_and_inline_commands() {
        let c = command(b"*3\r\n$3\r\nset\r\n$1\r\nk\r\n$2\r\nvv\r\n").unwrap();
        assert_eq!((c.name.as_str(), c.args, c.len), ("SET", 2, Some(28)));
        let c = command(b"GET key\r\n").unwrap();
        assert_eq!((c.name.as_str(), c.args, c.len), ("GET", 1, Some(9)));
        assert_eq!(command(b"\x00junk"), None);
        assert_eq!(command(b"*0\r\n"), None);
    }

    #[test]
    fn a_pipeline_counts_each_command_and_a_cut_one_is_incomplete() {
        let one = b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n";
        let mut buf = Vec::new();
        for _ in 0..5 {
            buf.extend_from_slice(one);
        }
        let (cmds, used) = commands(&buf);
        assert_eq!(cmds.len(), 5);
        assert_eq!(used, buf.len());
        let (cmds, used) = commands(&buf[..buf.len() - 3]);
        assert_eq!(cmds.len(), 5);
        assert_eq!(cmds[4].len, None);
        assert_eq!(used, one.len() * 4);
    }

    #[test]
    fn outcomes_and_misses() {
        assert_eq!(outcome(b"+OK\r\n"), Some(Outcome::Ok));
        assert_eq!(outcome(b"-ERR unknown\r\n"), Some(Outcome::Error));
        assert_eq!(outcome(b"$-1\r\n"), Some(Outcome::Null));
        assert_eq!(outcome(b"*-1\r\n"), Some(Outcome::Null));
        assert_eq!(outcome(b"_\r\n"), Some(Outcome::Null));
        assert_eq!(outcome(b"$3\r\nabc\r\n"), Some(Outcome::Ok));
        assert_eq!(outcome(b""), None);
        assert!(is_read("GET") && !is_read("SET"));
    }

    #[test]
    fn known_commands() {
        assert!(
            KNOWN.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for name in ["GET", "ZADD", "CLIENT", "XREADGROUP", "HEXPIRE", "JSON.GET"] {
            assert!(is_known(name), "{name}");
        }
        for name in ["CMD1", "GETT", "", "get", "EVIL.GET", "JSON.G\"T"] {
            assert!(!is_known(name), "{name}");
        }
    }

    #[test]
    fn every_prefix_and_garbage_is_safe() {
        let buf = b"*3\r\n$3\r\nSET\r\n$5\r\nkey:1\r\n$10\r\n0123456789\r\nGET k\r\n";
        for i in 0..=buf.len() {
            let _ = commands(&buf[..i]);
            let _ = outcome(&buf[..i]);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut b = [0u8; 48];
            for v in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *v = b"*$\r\n0123456789-GETSET "[(x % 22) as usize];
            }
            let _ = commands(&b);
        }
        assert_eq!(command(b"*99999999999999999999999\r\n"), None);
        // A length past i64 is not RESP; a huge one that parses leaves the command incomplete.
        assert_eq!(command(b"*2\r\n$18446744073709551615\r\nGET\r\n"), None);
        let c = command(b"*2\r\n$9223372036854775807\r\nGET\r\n").unwrap();
        assert_eq!((c.name.as_str(), c.len), ("GET", None));
    }
}
