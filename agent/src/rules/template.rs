//! Annotation and label templates: the part of Prometheus' Go templates alert rules use.
//!
//! `{{ $value }}`, `{{ $labels.name }}` (and their `.Value`, `.Labels.name` spellings), each
//! optionally piped through `humanize`, `humanize1024`, `humanizeDuration`,
//! `humanizePercentage` or `printf "%.Nf"`. Anything else inside `{{ }}` is refused when the
//! rule loads, naming the action. Label values come from the workload (process names, query
//! text); they are inserted as they are, and escaped wherever the result is written.

use std::fmt::Write as _;

use super::promql::Labels;

#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Part>);

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Action { source: Source, pipe: Pipe },
}

#[derive(Debug, Clone, PartialEq)]
enum Source {
    Value,
    Label(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Pipe {
    None,
    Humanize,
    Humanize1024,
    HumanizeDuration,
    HumanizePercentage,
    Fixed(usize),
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after.find("}}").ok_or_else(|| {
                format!(
                    "`{{{{` at byte {} is never closed",
                    src.len() - rest.len() + open
                )
            })?;
            parts.push(action(&after[..close])?);
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// Whether it reads `$value` (else it renders the same for the same labels).
    pub fn reads_value(&self) -> bool {
        (self.0.iter()).any(|p| {
            matches!(
                p,
                Part::Action {
                    source: Source::Value,
                    ..
                }
            )
        })
    }

    pub fn render(&self, labels: &Labels, value: f64) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Action { source, pipe } => match source {
                    Source::Value => format_value(&mut out, value, *pipe),
                    Source::Label(name) => out.push_str(labels.get(name).unwrap_or("")),
                },
            }
        }
        out
    }
}

fn action(inner: &str) -> Result<Part, String> {
    // `{{- x -}}` trims whitespace around the action in Go; the agent keeps the text as is.
    let inner = inner
        .trim()
        .trim_start_matches('-')
        .trim_end_matches('-')
        .trim();
    let mut stages = inner.split('|').map(str::trim);
    let head = stages.next().unwrap_or_default();
    let source = if head == "$value" || head == ".Value" {
        Source::Value
    } else if let Some(name) = head
        .strip_prefix("$labels.")
        .or_else(|| head.strip_prefix(".Labels."))
    {
        if !is_label_name(name) {
            return Err(format!("`{head}`: `{name}` is not a label name"));
        }
        Source::Label(name.to_string())
    } else {
        return Err(format!(
            "template action `{{{{ {inner} }}}}` is not supported: the agent renders `$value` and `$labels.<name>`, optionally piped through humanize, humanize1024, humanizeDuration, humanizePercentage or printf \"%.Nf\""
        ));
    };
    let pipe = match stages.next() {
        None => Pipe::None,
        Some(p) => pipe(p).ok_or_else(|| format!("template function `{p}` is not supported"))?,
    };
    if let Some(extra) = stages.next() {
        return Err(format!(
            "only one template function per action (`{extra}` follows another)"
        ));
    }
    if matches!(source, Source::Label(_)) && pipe != Pipe::None {
        return Err(format!(
            "`{head}` is text; `{inner}` pipes it into a number function"
        ));
    }
    Ok(Part::Action { source, pipe })
}

fn pipe(p: &str) -> Option<Pipe> {
    Some(match p {
        "humanize" => Pipe::Humanize,
        "humanize1024" => Pipe::Humanize1024,
        "humanizeDuration" => Pipe::HumanizeDuration,
        "humanizePercentage" => Pipe::HumanizePercentage,
        _ => {
            let fmt = p.strip_prefix("printf")?.trim();
            let digits = fmt.strip_prefix("\"%.")?.strip_suffix("f\"")?;
            Pipe::Fixed(digits.parse().ok().filter(|d| *d <= 17)?)
        }
    })
}

pub fn is_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f == '_' || f.is_ascii_alphabetic())
        && c.all(|ch| ch == '_' || ch.is_ascii_alphanumeric())
}

fn format_value(out: &mut String, v: f64, pipe: Pipe) {
    let _ = match pipe {
        Pipe::None => write!(out, "{}", go_float(v)),
        Pipe::Fixed(d) => write!(out, "{v:.d$}"),
        Pipe::Humanize => write!(
            out,
            "{}",
            humanize(
                v,
                1000.0,
                &["k", "M", "G", "T", "P", "E", "Z", "Y"],
                &["m", "u", "n", "p", "f", "a", "z", "y"]
            )
        ),
        Pipe::Humanize1024 => write!(
            out,
            "{}",
            humanize(
                v,
                1024.0,
                &["ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"],
                &[]
            )
        ),
        Pipe::HumanizePercentage => write!(out, "{}%", sig4(v * 100.0)),
        Pipe::HumanizeDuration => write!(out, "{}", humanize_duration(v)),
    };
}

/// Go's `%v` of a float64 (`strconv.FormatFloat(v, 'g', -1, 64)`) for the common cases.
fn go_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v != 0.0 && (v.abs() >= 1e21 || v.abs() < 1e-4) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Four significant digits, without trailing zeros (Go's `%.4g`).
fn sig4(v: f64) -> String {
    if !v.is_finite() {
        return go_float(v);
    }
    if v == 0.0 {
        return "0".into();
    }
    let mag = v.abs().log10().floor() as i32;
    let decimals = (3 - mag).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn humanize(v: f64, base: f64, big: &[&str], small: &[&str]) -> String {
    if v == 0.0 || !v.is_finite() {
        return sig4(v);
    }
    let mut x = v;
    let mut prefix = "";
    if x.abs() >= 1.0 {
        for p in big {
            if x.abs() < base {
                break;
            }
            x /= base;
            prefix = p;
        }
    } else {
        for p in small {
            if x.abs() >= 1.0 {
                break;
            }
            x *= base;
            prefix = p;
        }
    }
    format!("{}{prefix}", sig4(x))
}

fn humanize_duration(v: f64) -> String {
    if !v.is_finite() {
        return go_float(v);
    }
    if v.abs() < 1.0 {
        return humanize(v, 1000.0, &[], &["m", "u", "n", "p", "f", "a", "z", "y"]) + "s";
    }
    let sign = if v < 0.0 { "-" } else { "" };
    let whole = v.abs() as u64;
    let (d, h, m, s) = (
        whole / 86_400,
        whole / 3600 % 24,
        whole / 60 % 60,
        whole % 60,
    );
    // Whole seconds once minutes show, four significant digits below a minute (as Go does).
    if d > 0 {
        format!("{sign}{d}d {h}h {m}m {s}s")
    } else if h > 0 {
        format!("{sign}{h}h {m}m {s}s")
    } else if m > 0 {
        format!("{sign}{m}m {s}s")
    } else {
        format!("{sign}{}s", sig4(v.abs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn renders_value_and_labels() {
        let l = labels(&[("instance", "db-1"), ("syscall", "read\"x")]);
        let t = Template::parse("{{ $labels.syscall }} on {{$labels.instance}}: {{ $value }} ({{ .Value | printf \"%.2f\" }}, {{ $labels.missing }})").unwrap();
        assert_eq!(t.render(&l, 0.12345), "read\"x on db-1: 0.12345 (0.12, )");
    }

    #[test]
    fn humanizes_as_prometheus_does() {
        let r = |src: &str, v: f64| Template::parse(src).unwrap().render(&Labels::default(), v);
        assert_eq!(r("{{ $value | humanize }}", 1234567.0), "1.235M");
        assert_eq!(r("{{ $value | humanize }}", 0.0123), "12.3m");
        assert_eq!(r("{{ $value | humanize1024 }}", 2048.0), "2ki");
        assert_eq!(r("{{ $value | humanizePercentage }}", 0.256), "25.6%");
        assert_eq!(r("{{ $value | humanizeDuration }}", 3725.5), "1h 2m 5s");
        assert_eq!(r("{{ $value | humanizeDuration }}", 0.25), "250ms");
        assert_eq!(r("{{ $value }}", 1e-9), "1e-9");
    }

    #[test]
    fn refuses_what_it_cannot_render() {
        for (src, says) in [
            ("{{ range $labels }}", "range $labels"),
            ("{{ $value | title }}", "`title`"),
            ("{{ $labels.a | humanize }}", "is text"),
            ("open {{ $value", "never closed"),
            ("{{ $labels.1x }}", "not a label name"),
            (
                "{{ $value | humanize | humanize }}",
                "one template function",
            ),
        ] {
            let e = Template::parse(src).unwrap_err();
            assert!(e.contains(says), "{src}: {e}");
        }
    }
}
