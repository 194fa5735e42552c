//! SQL text -> (operation, fingerprint): the statement's kind (SELECT, INSERT, ...) and its
//! text with every literal replaced by `?`, so that `SELECT * FROM t WHERE id = 7` and
//! `... id = 8` are one query, as pg_stat_statements groups them.
//!
//! A small tokenizer, not a parser: the kernel hands over a bounded prefix of each query, which
//! is often cut mid-statement, and SQL dialects differ (PostgreSQL `$1` and `::casts`, MySQL
//! backticks and `#` comments). Anything it does not understand passes through as-is; it never
//! fails and never panics.

/// Longest fingerprint kept (bytes); longer ones end in `…`.
pub const MAX_FINGERPRINT: usize = 512;

/// The statement kind: the first keyword, upper-cased (`SELECT`, `INSERT`, `BEGIN`, ...), with
/// `WITH ... SELECT` reported by its main verb where it can be seen; `OTHER` when there is no
/// keyword or the first word is not a statement verb of PostgreSQL or MySQL (the text is the
/// client's: as a label it must come from a bounded, printable set).
pub fn operation(sql: &str) -> String {
    let mut depth = 0i32;
    let mut with = false;
    for t in Tokens::new(sql) {
        match t {
            Token::Punct("(") => depth += 1,
            Token::Punct(")") => depth -= 1,
            Token::Word(w) if depth <= 0 => {
                let w = w.to_ascii_uppercase();
                if !with {
                    if w == "WITH" {
                        with = true;
                        continue;
                    }
                    return verb(&w).to_string();
                }
                // After the CTEs, the main statement's verb at the top level.
                if matches!(
                    w.as_str(),
                    "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE"
                ) {
                    return w;
                }
            }
            _ => {}
        }
    }
    if with { "WITH" } else { "OTHER" }.into()
}

/// `w` if it is a statement verb, else `OTHER`.
fn verb(w: &str) -> &'static str {
    VERBS.binary_search(&w).map_or("OTHER", |i| VERBS[i])
}

/// Statement verbs of PostgreSQL and MySQL/MariaDB. Sorted.
const VERBS: &[&str] = &[
    "ABORT",
    "ALTER",
    "ANALYSE",
    "ANALYZE",
    "BEGIN",
    "BINLOG",
    "CACHE",
    "CALL",
    "CHANGE",
    "CHECK",
    "CHECKPOINT",
    "CHECKSUM",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DESC",
    "DESCRIBE",
    "DISCARD",
    "DO",
    "DROP",
    "END",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "FLUSH",
    "GRANT",
    "HANDLER",
    "HELP",
    "IMPORT",
    "INSERT",
    "INSTALL",
    "KILL",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "NOTIFY",
    "OPTIMIZE",
    "PREPARE",
    "PURGE",
    "REASSIGN",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "RENAME",
    "REPAIR",
    "REPLACE",
    "RESET",
    "RESTART",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SECURITY",
    "SELECT",
    "SET",
    "SHOW",
    "SHUTDOWN",
    "START",
    "STOP",
    "TABLE",
    "TRUNCATE",
    "UNINSTALL",
    "UNLISTEN",
    "UNLOCK",
    "UPDATE",
    "USE",
    "VACUUM",
    "VALUES",
    "XA",
];

/// The query with literals replaced by `?`, `IN (...)`/`VALUES (...)` lists of literals folded
/// to one `?`, comments dropped, whitespace collapsed and keywords upper-cased.
pub fn fingerprint(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len().min(MAX_FINGERPRINT));
    let mut prev: Option<Token<'_>> = None;
    let mut toks = Tokens::new(sql);
    while let Some(t) = toks.next() {
        let piece: std::borrow::Cow<'_, str> = match t {
            Token::Comment => continue,
            // A literal after `?,` continues a list of literals: it folds into the first.
            Token::Literal if matches!(prev, Some(Token::Punct(","))) && out.ends_with("?,") => {
                out.pop();
                prev = Some(Token::Literal);
                continue;
            }
            Token::Literal => "?".into(),
            Token::Word(w) if is_keyword(w) => w.to_ascii_uppercase().into(),
            // A quoted identifier may hold anything: no control characters in a fingerprint.
            Token::Word(w) => crate::untrusted::strip_controls(w),
            Token::Punct(p) => p.into(),
        };
        let glue = match (prev, t) {
            (None, _) => "",
            (Some(Token::Punct("(" | "." | "::")), _) => "",
            (_, Token::Punct(")" | "," | "." | ";" | "::")) => "",
            // A call keeps its name and parenthesis together, as written.
            (Some(Token::Word(w)), Token::Punct("(")) if !is_keyword(w) && !toks.spaced => "",
            _ => " ",
        };
        if out.len() + glue.len() + piece.len() > MAX_FINGERPRINT {
            out.push('…');
            break;
        }
        out.push_str(glue);
        out.push_str(&piece);
        prev = Some(t);
    }
    out
}

fn is_keyword(w: &str) -> bool {
    const KEYWORDS: &[&str] = &[
        "select",
        "from",
        "where",
        "and",
        "or",
        "not",
        "in",
        "is",
        "null",
        "insert",
        "into",
        "values",
        "update",
        "set",
        "delete",
        "join",
        "left",
        "right",
        "inner",
        "outer",
        "on",
        "group",
        "by",
        "order",
        "having",
        "limit",
        "offset",
        "as",
        "distinct",
        "union",
        "all",
        "with",
        "begin",
        "commit",
        "rollback",
        "create",
        "drop",
        "alter",
        "table",
        "index",
        "like",
        "between",
        "case",
        "when",
        "then",
        "else",
        "end",
        "returning",
        "asc",
        "desc",
        "exists",
        "true",
        "false",
        "show",
        "use",
        "start",
        "transaction",
        "savepoint",
        "release",
        "for",
        "replace",
        "truncate",
        "explain",
        "analyze",
        "call",
        "do",
    ];
    KEYWORDS.iter().any(|k| k.eq_ignore_ascii_case(w))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// An identifier or keyword (quoted identifiers included, as written).
    Word(&'a str),
    /// A number, string, `$n`/`?` parameter, or other constant.
    Literal,
    Punct(&'a str),
    Comment,
}

struct Tokens<'a> {
    s: &'a str,
    i: usize,
    /// Whether whitespace came before the token last returned.
    spaced: bool,
}

impl<'a> Tokens<'a> {
    fn new(s: &'a str) -> Self {
        Self {
            s,
            i: 0,
            spaced: false,
        }
    }

    fn rest(&self) -> &'a [u8] {
        self.s.as_bytes().get(self.i..).unwrap_or_default()
    }

    /// Advances past the first `end` found (or to the end of the text).
    fn skip_past(&mut self, end: &[u8]) {
        let rest = self.rest();
        let n = rest
            .windows(end.len())
            .position(|w| w == end)
            .map_or(rest.len(), |p| p + end.len());
        self.i += n;
    }

    /// Advances past a quoted run opened by `q` (the opening quote already consumed), where a
    /// doubled quote or a backslash escapes.
    fn skip_quoted(&mut self, q: u8) {
        let b = self.rest();
        let mut j = 0;
        while j < b.len() {
            if b[j] == b'\\' {
                j += 2;
                continue;
            }
            if b[j] == q {
                if b.get(j + 1) == Some(&q) {
                    j += 2;
                    continue;
                }
                j += 1;
                break;
            }
            j += 1;
        }
        self.i += j.min(b.len());
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a str {
        let start = self.i;
        let n = self.rest().iter().take_while(|&&c| f(c)).count();
        self.i += n;
        // Only ASCII bytes are taken, so the bounds are char boundaries.
        self.s.get(start..self.i).unwrap_or_default()
    }
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        self.spaced = false;
        loop {
            let b = self.rest();
            let c = *b.first()?;
            // Control bytes (a NUL terminator some clients send, stray CRs) separate tokens
            // like whitespace: they are never part of a fingerprint.
            if c.is_ascii_whitespace() || c.is_ascii_control() {
                self.i += 1;
                self.spaced = true;
                continue;
            }
            let next = b.get(1).copied();
            return Some(match c {
                b'-' if next == Some(b'-') => {
                    self.skip_past(b"\n");
                    Token::Comment
                }
                b'#' => {
                    self.skip_past(b"\n");
                    Token::Comment
                }
                b'/' if next == Some(b'*') => {
                    self.i += 2;
                    self.skip_past(b"*/");
                    Token::Comment
                }
                b'\'' => {
                    self.i += 1;
                    self.skip_quoted(b'\'');
                    Token::Literal
                }
                b'"' | b'`' => {
                    let start = self.i;
                    self.i += 1;
                    self.skip_quoted(c);
                    Token::Word(self.s.get(start..self.i).unwrap_or_default())
                }
                b'$' if next.is_some_and(|d| d.is_ascii_digit()) => {
                    self.i += 1;
                    self.take_while(|d| d.is_ascii_digit());
                    Token::Literal
                }
                b'$' => {
                    // Dollar quoting: $tag$ ... $tag$.
                    let tag_len = b.iter().skip(1).position(|&d| d == b'$').filter(|&n| {
                        b[1..=n]
                            .iter()
                            .all(|d| d.is_ascii_alphanumeric() || *d == b'_')
                    });
                    match tag_len {
                        Some(n) => {
                            let tag = b[..n + 2].to_vec();
                            self.i += n + 2;
                            self.skip_past(&tag);
                            Token::Literal
                        }
                        None => {
                            self.i += 1;
                            Token::Punct("$")
                        }
                    }
                }
                b'?' => {
                    self.i += 1;
                    Token::Literal
                }
                b'0'..=b'9' => {
                    self.take_while(|d| d.is_ascii_alphanumeric() || d == b'.');
                    Token::Literal
                }
                b'.' if next.is_some_and(|d| d.is_ascii_digit()) => {
                    self.i += 1;
                    self.take_while(|d| d.is_ascii_digit());
                    Token::Literal
                }
                b':' if next == Some(b':') => {
                    self.i += 2;
                    Token::Punct("::")
                }
                c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                    let start = self.i;
                    let n = b
                        .iter()
                        .take_while(|&&d| {
                            d.is_ascii_alphanumeric() || d == b'_' || d == b'$' || d >= 0x80
                        })
                        .count();
                    self.i += n;
                    // A multi-byte character may have been cut by the prefix: back off to a
                    // boundary rather than split it.
                    while !self.s.is_char_boundary(self.i) {
                        self.i -= 1;
                    }
                    if self.i == start {
                        self.i = self.s.len();
                        return None;
                    }
                    Token::Word(self.s.get(start..self.i).unwrap_or_default())
                }
                _ => {
                    let start = self.i;
                    self.i += 1;
                    while !self.s.is_char_boundary(self.i) {
                        self.i += 1;
                    }
                    Token::Punct(self.s.get(start..self.i).unwrap_or_default())
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_masked_and_queries_that_differ_only_in_them_match() {
        let a = fingerprint("SELECT * FROM t WHERE id = 7");
        let b = fingerprint("select *   from t\n where id = 8 -- note");
        assert_eq!(a, "SELECT * FROM t WHERE id = ?");
        assert_eq!(a, b);
        assert_eq!(
            fingerprint("SELECT name FROM users WHERE email = 'a@b.c' AND age > 3.5"),
            "SELECT name FROM users WHERE email = ? AND age > ?"
        );
        assert_eq!(
            fingerprint("UPDATE t SET v = 'it''s', w = $1 WHERE k = $2"),
            "UPDATE t SET v = ?, w = ? WHERE k = ?"
        );
    }

    #[test]
    fn lists_fold_to_one_placeholder() {
        assert_eq!(
            fingerprint("SELECT * FROM t WHERE id IN (1, 2, 3)"),
            fingerprint("SELECT * FROM t WHERE id IN (4,5)")
        );
        assert_eq!(
            fingerprint("INSERT INTO t (a, b) VALUES (1, 'x')"),
            "INSERT INTO t (a, b) VALUES (?)"
        );
    }

    #[test]
    fn dialect_bits() {
        assert_eq!(
            fingerprint("SELECT `col` FROM `db`.`t` # mysql comment\nWHERE x = 0x1F"),
            "SELECT `col` FROM `db`.`t` WHERE x = ?"
        );
        assert_eq!(
            fingerprint("SELECT $$a 'b' c$$::text, '1'::int /* c */"),
            "SELECT ?::text, ?::int"
        );
        assert_eq!(fingerprint("SELECT pg_sleep(0.05)"), "SELECT pg_sleep(?)");
    }

    #[test]
    fn operations() {
        assert_eq!(operation("  select 1"), "SELECT");
        assert_eq!(operation("/* x */ INSERT INTO t VALUES (1)"), "INSERT");
        assert_eq!(operation("WITH a AS (SELECT 1) DELETE FROM t"), "DELETE");
        assert_eq!(operation("begin"), "BEGIN");
        assert_eq!(operation(""), "OTHER");
        assert_eq!(operation("123"), "OTHER");
        assert_eq!(operation("WITH a AS (SELECT 1)"), "WITH");
        assert!(VERBS.windows(2).all(|w| w[0] < w[1]), "sorted");
        // The first word is the client's text: only verbs are labels.
        for hostile in [
            "\"} 1\nfake 7\n#\" x",
            "frobnicate the table",
            "`back\\slash`",
            "ünïcode",
        ] {
            assert_eq!(operation(hostile), "OTHER", "{hostile:?}");
        }
    }

    #[test]
    fn truncated_and_hostile_text_never_panics() {
        let samples = [
            "SELECT 'unterminated",
            "SELECT \"x",
            "SELECT $tag$ never closed",
            "/* open",
            "é'ü\"`$1$$",
            "SELECT 1,",
            "\\\\\\'",
        ];
        for s in samples {
            let _ = fingerprint(s);
            let _ = operation(s);
            // Every prefix, cut on character boundaries as a bounded copy would be decoded.
            for (i, _) in s.char_indices() {
                let _ = fingerprint(&s[..i]);
            }
        }
        let long = format!("SELECT {} FROM t", "a, ".repeat(1000));
        assert!(fingerprint(&long).len() <= MAX_FINGERPRINT + '…'.len_utf8());
    }
}
