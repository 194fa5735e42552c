//! Silences and acknowledgements: what people tell the agent about its alerts.
//!
//! A silence is a set of label matchers (`name=value`, `!=`, `=~`, `!~`, regexes fully
//! anchored, as Alertmanager has them) and an end: while it lasts, alerts it matches are
//! evaluated and shown as ever but not notified; once it ends, a still-firing alert is sent at
//! its next evaluation. An acknowledgement (who, when, comment) marks one alert as seen; it
//! stops that alert's escalation, and lasts as long as the alert does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::template::is_label_name;

/// Silences kept at once (expired ones are dropped).
pub const MAX_SILENCES: usize = 1000;
/// Matchers in one silence, and the length of one.
pub const MAX_MATCHERS: usize = 32;
pub const MAX_MATCHER_BYTES: usize = 1024;
pub const MAX_COMMENT_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "=~")]
    Re,
    #[serde(rename = "!~")]
    NotRe,
}

impl Matcher {
    /// `name=value`, `name!=value`, `name=~regex`, `name!~regex`; the value may be quoted.
    pub fn parse(s: &str) -> Result<Matcher, String> {
        if s.len() > MAX_MATCHER_BYTES {
            return Err(format!("matcher longer than {MAX_MATCHER_BYTES} bytes"));
        }
        let at = s.find(['=', '!']).ok_or_else(|| {
            format!("{s:?}: expected name=value, name!=value, name=~regex or name!~regex")
        })?;
        let (name, rest) = s.split_at(at);
        let (op, value) = if let Some(v) = rest.strip_prefix("=~") {
            (Op::Re, v)
        } else if let Some(v) = rest.strip_prefix("!~") {
            (Op::NotRe, v)
        } else if let Some(v) = rest.strip_prefix("!=") {
            (Op::Ne, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Eq, v)
        } else {
            return Err(format!("{s:?}: expected =, !=, =~ or !~ after the name"));
        };
        let name = name.trim();
        if !is_label_name(name) {
            return Err(format!("{s:?}: {name:?} is not a label name"));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value)
            .to_string();
        let m = Matcher {
            name: name.to_string(),
            op,
            value,
        };
        if matches!(op, Op::Re | Op::NotRe) {
            m.regex()?;
        }
        Ok(m)
    }

    fn regex(&self) -> Result<regex::Regex, String> {
        regex::RegexBuilder::new(&format!("^(?:{})$", self.value))
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("{}: bad regex: {e}", self.name))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.name).map_or("", String::as_str);
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Re => self.regex().is_ok_and(|r| r.is_match(v)),
            Op::NotRe => self.regex().is_ok_and(|r| !r.is_match(v)),
        }
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Re => "=~",
            Op::NotRe => "!~",
        };
        write!(f, "{}{op}{:?}", self.name, self.value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<Matcher>,
    pub starts_at_ms: i64,
    pub ends_at_ms: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn active(&self, now_ms: i64) -> bool {
        self.starts_at_ms <= now_ms && now_ms < self.ends_at_ms
    }

    pub fn mutes(&self, labels: &BTreeMap<String, String>, now_ms: i64) -> bool {
        self.active(now_ms) && self.matchers.iter().all(|m| m.matches(labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub by: String,
    pub at_ms: i64,
    pub comment: String,
}

/// A user's name for a uid (the uid itself when it has none).
pub fn user_name(uid: Option<u32>) -> String {
    match uid {
        None => "unknown".into(),
        Some(u) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u))
            .ok()
            .flatten()
            .map_or_else(|| format!("uid {u}"), |u| u.name),
    }
}

/// The comment as kept: at most [`MAX_COMMENT_BYTES`], cut at a character boundary.
pub fn comment(s: &str) -> String {
    let mut end = s.len().min(MAX_COMMENT_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matchers_parse_and_match_as_alertmanager_has_them() {
        let l = labels(&[("alertname", "DiskFull"), ("instance", "db-1")]);
        for (m, hit) in [
            ("alertname=DiskFull", true),
            ("alertname=\"DiskFull\"", true),
            ("alertname!=DiskFull", false),
            ("instance=~db-.*", true),
            ("instance=~db", false),
            ("instance!~web-.*", true),
            ("missing=", true),
            ("missing!=", false),
        ] {
            assert_eq!(Matcher::parse(m).unwrap().matches(&l), hit, "{m}");
        }
        for bad in ["alertname", "=x", "a b=c", "x=~(", "1x=y"] {
            assert!(Matcher::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Matcher::parse("a=~\"x|y\"").unwrap().to_string(),
            "a=~\"x|y\""
        );
    }

    #[test]
    fn a_silence_mutes_only_while_it_lasts_and_only_what_it_matches() {
        let s = Silence {
            id: "s".into(),
            matchers: vec![Matcher::parse("alertname=A").unwrap()],
            starts_at_ms: 100,
            ends_at_ms: 200,
            created_by: "root".into(),
            comment: String::new(),
        };
        let a = labels(&[("alertname", "A")]);
        assert!(!s.mutes(&a, 99));
        assert!(s.mutes(&a, 100));
        assert!(!s.mutes(&a, 200));
        assert!(!s.mutes(&labels(&[("alertname", "B")]), 150));
    }

    #[test]
    fn comments_are_bounded_on_a_character_boundary() {
        let long = "é".repeat(MAX_COMMENT_BYTES);
        let c = comment(&long);
        assert!(c.len() <= MAX_COMMENT_BYTES && c.chars().all(|ch| ch == 'é'));
    }
}
