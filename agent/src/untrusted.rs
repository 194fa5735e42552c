//! Text that a process controls: its name (`comm`), its cgroup path, a unix socket path, a
//! query's text, a Redis command name. Any local user can set these to anything, newlines and
//! quotes included, so every place that writes them out escapes them for where they go:
//!
//! - the exposition formats (Prometheus text 0.0.4 and OpenMetrics): [`write_label_value`],
//!   used by the exporter's label type so that no label can skip it;
//! - logs: through [`LogField`], as written when it is plain, Debug-quoted (quotes,
//!   backslashes and control characters escaped) when it is not, so a value cannot end its
//!   field or forge a line;
//! - terminals: [`Printable`], which shows control characters and backslashes as escapes, so
//!   a value cannot break a table row or move the cursor;
//! - JSON: serde_json escapes on its own; Graphviz: `control::net::quote`.
//!
//! Sanitising (replacing a value by a safe name) happens where the value is parsed, e.g. a
//! Redis command that is not a known command is `unknown` (`wire::resp`).

use std::fmt;

/// Writes `s` as the inside of a quoted label value: `\` -> `\\`, `"` -> `\"`, newline ->
/// `\n`, the three escapes both formats define. Every other character (control characters
/// included) is legal as it is.
pub fn write_label_value(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(['\\', '"', '\n']) {
        out.write_str(&rest[..i])?;
        out.write_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[i + 1..];
    }
    out.write_str(rest)
}

/// Displays untrusted text on one line: backslashes and characters that are not printable
/// (control characters, line and paragraph separators, bidirectional overrides) are shown as
/// Rust escapes (`\\`, `\n`, `\u{202e}`), everything else as it is.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(needs_escape) {
            return f.pad(self.0);
        }
        let mut out = String::with_capacity(self.0.len() + 8);
        for c in self.0.chars() {
            if needs_escape(c) {
                out.extend(c.escape_debug());
            } else {
                out.push(c);
            }
        }
        // Widths and alignment apply as for any string (the CLI's tables use them).
        f.pad(&out)
    }
}

/// A log field's value: as it is when it holds nothing a log line could be confused by, else
/// quoted as Rust's Debug quotes a string (`"ev\"il\n"`).
#[derive(Debug, Clone, Copy)]
pub struct LogField<'a>(pub &'a str);

impl fmt::Display for LogField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self
            .0
            .chars()
            .any(|c| c == '"' || c == '=' || needs_escape(c))
        {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str(self.0)
        }
    }
}

pub(crate) fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c,
            // line/paragraph separators, bidi embeddings, overrides and isolates, BOM
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `s` with control characters removed (NUL padding, stray CR/LF and the like), for text that
/// is shown as a whole, e.g. a query fingerprint; interior runs of whitespace are the caller's
/// business.
pub fn strip_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        std::borrow::Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
                .trim()
                .to_string(),
        )
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(s: &str) -> String {
        let mut out = String::new();
        write_label_value(&mut out, s).unwrap();
        out
    }

    #[test]
    fn label_values_escape_exactly_the_three_specials() {
        assert_eq!(label("plain"), "plain");
        assert_eq!(label("\"} 1\nfake 7\n#"), "\\\"} 1\\nfake 7\\n#");
        assert_eq!(label("back\\slash"), "back\\\\slash");
        assert_eq!(label("tab\tcr\r\0"), "tab\tcr\r\0");
        assert_eq!(label("é\"ü"), "é\\\"ü");
        assert_eq!(label(""), "");
    }

    #[test]
    fn escaped_values_never_end_a_quoted_string_or_a_line() {
        for s in ["\"", "\\", "\\\"", "a\\", "\n\"\\\n", "\"}\n# EOF\n"] {
            let e = label(s);
            assert!(!e.contains('\n'), "{e:?}");
            // Every quote is escaped: preceded by an odd run of backslashes.
            let b = e.as_bytes();
            for (i, _) in e.match_indices('"') {
                let run = b[..i].iter().rev().take_while(|&&c| c == b'\\').count();
                assert_eq!(run % 2, 1, "{s:?} -> {e:?}");
            }
        }
    }

    #[test]
    fn printable_escapes_controls_and_backslashes() {
        let p = |s: &str| Printable(s).to_string();
        assert_eq!(p("nginx"), "nginx");
        assert_eq!(p("ev\"il\\x\n}{"), "ev\"il\\\\x\\n}{");
        assert_eq!(p("\x1b[31mred"), "\\u{1b}[31mred");
        assert_eq!(p("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(p("ünïcødé"), "ünïcødé");
        assert!(!p("\r\n\0\u{2028}").chars().any(|c| c.is_control()));
        assert_eq!(format!("{:<6}|", Printable("a\nb")), "a\\nb  |");
    }

    #[test]
    fn log_fields_are_plain_unless_they_need_quoting() {
        let l = |s: &str| LogField(s).to_string();
        assert_eq!(l("redis-server"), "redis-server");
        assert_eq!(l("DEBUG ? ?"), "DEBUG ? ?");
        assert_eq!(l("\"} 1\nfake 7\n#"), r#""\"} 1\nfake 7\n#""#);
        assert_eq!(l("a=b"), r#""a=b""#);
        assert!(!l("x\ny").contains('\n'));
    }

    #[test]
    fn controls_are_stripped() {
        assert_eq!(
            strip_controls("INSERT INTO t1 VALUES (?) \0"),
            "INSERT INTO t1 VALUES (?)"
        );
        assert_eq!(strip_controls("a\nb"), "a b");
        assert!(matches!(
            strip_controls("clean"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
