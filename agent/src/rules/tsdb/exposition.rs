//! The exposition text, read line by line. The metric name is cut first so that lines of
//! metrics no rule reads cost one hash look-up; labels are only parsed for a series the window
//! has not seen yet (known series are found by their raw label text). Text is untrusted: a line
//! that does not parse is skipped and counted, never a panic.

/// One sample line, split but not yet interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line<'a> {
    pub name: &'a str,
    /// What is between the braces (empty without braces).
    pub labels: &'a str,
    /// The value token.
    pub value: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split<'a> {
    /// Blank or a comment (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`).
    Skip,
    /// A sample line whose name is `name`; the rest is only cut when the name is wanted.
    Sample(&'a str),
}

/// Where the metric name ends: at a brace, a space or a tab (ASCII, so a char boundary).
fn name_end(line: &str) -> usize {
    memchr::memchr3(b'{', b' ', b'\t', line.as_bytes()).unwrap_or(line.len())
}

/// The metric name of a line, if it is a sample line.
pub(crate) fn name_of(line: &str) -> Split<'_> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return Split::Skip;
    }
    Split::Sample(line.get(..name_end(line)).unwrap_or(line))
}

/// Cuts a sample line into name, raw labels and value token; `None` when malformed.
pub(crate) fn split(line: &str) -> Option<Line<'_>> {
    let line = line.trim();
    let bytes = line.as_bytes();
    let name_end = name_end(line);
    let name = line.get(..name_end)?;
    let (labels, rest) = if bytes.get(name_end) == Some(&b'{') {
        let close = closing_brace(line, name_end + 1)?;
        (line.get(name_end + 1..close)?, line.get(close + 1..)?)
    } else {
        ("", line.get(name_end..)?)
    };
    let rest = rest.trim_start();
    let value = rest.split([' ', '\t']).next().filter(|v| !v.is_empty())?;
    Some(Line {
        name,
        labels,
        value,
    })
}

/// The value token of a sample line whose label text is `raw`, a label text that parsed
/// before (so its quotes are balanced and the `}` right after it closes the set): what
/// [`split`] would give, found with one comparison instead of a scan. `None` when the line's
/// labels are not `raw` (or `raw` is empty), for the caller to [`split`] it.
pub(crate) fn known_value<'a>(line: &'a str, raw: &str) -> Option<&'a str> {
    if raw.is_empty() {
        return None;
    }
    let line = line.trim();
    let rest = line.get(name_end(line)..)?;
    let rest = rest
        .strip_prefix('{')?
        .strip_prefix(raw)?
        .strip_prefix('}')?;
    rest.trim_start()
        .split([' ', '\t'])
        .next()
        .filter(|v| !v.is_empty())
}

/// The index of the `}` closing the label set that starts at `from`, quotes and escapes
/// respected.
fn closing_brace(line: &str, from: usize) -> Option<usize> {
    let bytes = line.as_bytes();
    let mut quoted = false;
    let mut i = from;
    while let Some(&b) = bytes.get(i) {
        match (quoted, b) {
            (true, b'\\') => i += 1,
            (_, b'"') => quoted = !quoted,
            (false, b'}') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

pub(crate) fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A sample value: floats, integers, `NaN`, `+Inf`, `-Inf`. Every NaN is the canonical one, so
/// it never collides with the ring's absence marker.
pub(crate) fn parse_value(token: &str) -> Option<f64> {
    let digits = token.as_bytes();
    // Counters are mostly small integers: exact as f64 below 10^15 < 2^53.
    if !digits.is_empty() && digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) {
        let n = digits
            .iter()
            .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        return Some(n as f64);
    }
    let v: f64 = token.parse().ok()?;
    Some(if v.is_nan() { f64::NAN } else { v })
}

/// The labels between the braces as (name, unescaped value) pairs in text order; `None` when
/// malformed (bad name, missing quote, unknown escape, duplicate name, `__name__`). Empty
/// values are dropped: Prometheus treats them as absent labels.
pub(crate) fn parse_labels(raw: &str) -> Option<Vec<(&str, String)>> {
    let mut out: Vec<(&str, String)> = Vec::new();
    let mut rest = raw.trim_start();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest.get(..eq)?.trim();
        if !valid_label_name(name) || name == "__name__" {
            return None;
        }
        rest = rest.get(eq + 1..)?.trim_start();
        rest = rest.strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    _ => return None,
                },
                (_, c) => value.push(c),
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            return None;
        }
        if !value.is_empty() {
            out.push((name, value));
        }
        rest = rest.get(close + 1..)?.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start(),
            None if rest.is_empty() => {}
            None => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_openmetrics_lines() {
        assert_eq!(name_of("# TYPE x counter"), Split::Skip);
        assert_eq!(name_of(""), Split::Skip);
        assert_eq!(name_of("x_total{a=\"b\"} 1"), Split::Sample("x_total"));
        assert_eq!(name_of("up 1"), Split::Sample("up"));
        let l = split(r#"lat_bucket{syscall="read",le="0.001"} 12"#).unwrap();
        assert_eq!(
            (l.name, l.labels, l.value),
            ("lat_bucket", r#"syscall="read",le="0.001""#, "12")
        );
        // A brace and a quote inside a value do not end the label set; exemplars are ignored.
        let l = split(r#"x{a="}\"{"} +Inf # {trace="1"} 2"#).unwrap();
        assert_eq!((l.labels, l.value), (r#"a="}\"{""#, "+Inf"));
        assert_eq!(split("up 1 1700000000").unwrap().value, "1");
    }

    #[test]
    fn known_label_text_gives_what_split_gives() {
        for line in [
            r#"x{a="b"} 1"#,
            r#"  x{a="}\"{",b="c"} +Inf # {trace="1"} 2"#,
            "x{a=\"b\"}\t7 1700000000",
            r#"x{a="b"}"#,
            r#"x{a="b",c="d"} 1"#,
        ] {
            let want = split(line).map(|l| (l.labels, l.value));
            for raw in [r#"a="b""#, r#"a="}\"{",b="c""#] {
                let got = known_value(line, raw);
                assert!(
                    got.is_none() || want == Some((raw, got.unwrap_or(""))),
                    "{line} {raw}"
                );
            }
        }
        assert_eq!(known_value(r#"x{a="b"} 1"#, r#"a="b""#), Some("1"));
        assert_eq!(known_value(r#"x{a="b",c="d"} 1"#, r#"a="b""#), None);
        assert_eq!(known_value("x 1", ""), None);
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in ["x{a=\"b\" 1", "x{a=\"b\"}", "x{", "x{a=\"b\\"] {
            assert_eq!(split(bad), None, "{bad}");
        }
        for bad in [
            "a=b",
            "a=\"b\" c=\"d\"",
            "1a=\"b\"",
            "a=\"b\",a=\"c\"",
            "a=\"\\t\"",
            "__name__=\"x\"",
            "a=\"b",
        ] {
            assert_eq!(parse_labels(bad), None, "{bad}");
        }
    }

    #[test]
    fn metric_names() {
        assert!(valid_metric_name("insite_x:rate_total"));
        assert!(!valid_metric_name("9x"));
        assert!(!valid_metric_name(""));
        assert!(!valid_metric_name("a-b"));
    }

    #[test]
    fn unescapes_label_values() {
        let got = parse_labels(r#"a="x\\y\"z\n", b="", c="ü","#).unwrap();
        assert_eq!(
            got,
            vec![("a", "x\\y\"z\n".to_string()), ("c", "ü".to_string())]
        );
        assert_eq!(parse_labels("").unwrap(), vec![]);
    }

    #[test]
    fn parses_values() {
        assert_eq!(parse_value("12"), Some(12.0));
        assert_eq!(parse_value("-1.5e-3"), Some(-0.0015));
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
        assert_eq!(parse_value("-Inf"), Some(f64::NEG_INFINITY));
        assert!(parse_value("NaN").is_some_and(|v| v.to_bits() == f64::NAN.to_bits()));
        assert_eq!(parse_value("abc"), None);
        assert_eq!(parse_value(""), None);
    }
}
