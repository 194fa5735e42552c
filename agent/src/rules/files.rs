//! Prometheus rule files: read, checked against what the agent evaluates, and compiled.
//!
//! The format is Prometheus' own (`groups:` -> `name`, `interval`, `rules:` -> `alert`,
//! `expr`, `for`, `keep_firing_for`, `labels`, `annotations`), so `promtool check rules`
//! accepts every file the agent accepts. What the agent cannot evaluate is refused with the
//! file, the group, the rule and the part named; a refused set leaves the running rules alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::{
    promql::{Expr, Needs},
    template::{is_label_name, Template},
};

/// Largest rule file read (a rule file is pages of rules, not megabytes).
pub const MAX_RULE_FILE_BYTES: u64 = 4 << 20;
/// Rules across every file.
pub const MAX_RULES: usize = 10_000;

/// Why a rule set was refused: where, and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{}: {reason}", file.display(), group.as_ref().map(|g| format!(": group {g:?}")).unwrap_or_default(), rule.as_ref().map(|r| format!(": rule {r:?}")).unwrap_or_default())]
pub struct RuleError {
    pub file: PathBuf,
    pub group: Option<String>,
    pub rule: Option<String>,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct RuleSet {
    pub files: Vec<PathBuf>,
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone)]
pub struct Group {
    pub file: PathBuf,
    pub name: String,
    /// Evaluation interval; `None`: every tick.
    pub interval: Option<Duration>,
    pub rules: Vec<Arc<AlertRule>>,
}

#[derive(Debug, Clone)]
pub struct AlertRule {
    pub name: String,
    pub expr: Expr,
    pub expr_src: String,
    pub for_: Duration,
    pub keep_firing_for: Duration,
    pub labels: BTreeMap<String, Template>,
    pub annotations: BTreeMap<String, Template>,
}

impl RuleSet {
    pub fn empty() -> Self {
        Self {
            files: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// Reads every file the patterns name. A glob that matches nothing adds nothing; a path
    /// without glob characters must exist.
    pub fn load(patterns: &[String]) -> Result<RuleSet, RuleError> {
        let mut files = BTreeSet::new();
        for p in patterns {
            let err = |reason: String| RuleError {
                file: PathBuf::from(p),
                group: None,
                rule: None,
                reason,
            };
            if !p.contains(['*', '?', '[']) {
                files.insert(PathBuf::from(p));
                continue;
            }
            let paths = glob::glob(p).map_err(|e| err(format!("bad glob: {e}")))?;
            for path in paths {
                files.insert(path.map_err(|e| err(e.to_string()))?);
            }
        }
        let mut set = RuleSet::empty();
        for f in files {
            let text = read(&f)?;
            set.groups.extend(parse(&f, &text)?);
            set.files.push(f);
        }
        let n: usize = set.groups.iter().map(|g| g.rules.len()).sum();
        if n > MAX_RULES {
            return Err(RuleError {
                file: set.files.first().cloned().unwrap_or_default(),
                group: None,
                rule: None,
                reason: format!("{n} rules in all; at most {MAX_RULES} are evaluated"),
            });
        }
        Ok(set)
    }

    pub fn needs(&self) -> Needs {
        let mut n = Needs::default();
        for r in self.rules() {
            n.merge(&r.expr.needs());
        }
        n
    }

    pub fn rules(&self) -> impl Iterator<Item = &Arc<AlertRule>> {
        self.groups.iter().flat_map(|g| g.rules.iter())
    }
}

fn read(path: &Path) -> Result<String, RuleError> {
    use std::io::Read as _;
    let err = |reason: String| RuleError {
        file: path.to_path_buf(),
        group: None,
        rule: None,
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut bytes = Vec::new();
    f.take(MAX_RULE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_RULE_FILE_BYTES {
        return Err(err(format!("larger than {MAX_RULE_FILE_BYTES} bytes")));
    }
    String::from_utf8(bytes).map_err(|e| err(format!("not UTF-8: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    groups: Vec<GroupDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupDoc {
    name: String,
    interval: Option<String>,
    /// Prometheus' cap on alerts a rule may produce; 0 is none.
    #[serde(default)]
    limit: u64,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    alert: Option<String>,
    record: Option<String>,
    expr: serde_yaml_ng::Value,
    #[serde(rename = "for")]
    for_: Option<String>,
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Parses one file's text into its groups.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Group>, RuleError> {
    let at = |group: Option<&str>, rule: Option<&str>, reason: String| RuleError {
        file: file.to_path_buf(),
        group: group.map(str::to_string),
        rule: rule.map(str::to_string),
        reason,
    };
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc { groups: Vec::new() }
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| at(None, None, e.to_string()))?
    };
    let mut names = BTreeSet::new();
    let mut groups = Vec::new();
    for g in doc.groups {
        let gname = g.name.as_str();
        if gname.is_empty() {
            return Err(at(None, None, "a group has no name".into()));
        }
        if !names.insert(gname.to_string()) {
            return Err(at(
                Some(gname),
                None,
                "group name repeated in the file".into(),
            ));
        }
        let interval = g
            .interval
            .as_deref()
            .map(|s| duration(s).map_err(|e| at(Some(gname), None, format!("interval: {e}"))))
            .transpose()?;
        if interval == Some(Duration::ZERO) {
            return Err(at(Some(gname), None, "interval: must be above zero".into()));
        }
        if g.limit != 0 {
            return Err(at(Some(gname), None, "limit: not supported (every alert a rule produces is kept; the rule window's max_series bounds them)".into()));
        }
        let mut rules = Vec::new();
        for (i, r) in g.rules.into_iter().enumerate() {
            let rname = r
                .alert
                .clone()
                .or_else(|| r.record.clone())
                .unwrap_or_else(|| format!("#{}", i + 1));
            let rat = |reason: String| at(Some(gname), Some(&rname), reason);
            rules.push(Arc::new(rule(r).map_err(rat)?));
        }
        groups.push(Group {
            file: file.to_path_buf(),
            name: g.name,
            interval,
            rules,
        });
    }
    Ok(groups)
}

fn rule(r: RuleDoc) -> Result<AlertRule, String> {
    let name = match (r.alert, r.record) {
        (Some(a), None) => a,
        (None, Some(_)) => {
            return Err("recording rules are not supported: the agent evaluates alerting rules; keep recording rules in Prometheus".into())
        }
        (Some(_), Some(_)) => return Err("both `alert` and `record` are set".into()),
        (None, None) => return Err("neither `alert` nor `record` is set".into()),
    };
    if !is_metric_name(&name) {
        return Err(format!("alert name {name:?} is not a valid metric name"));
    }
    let expr_src = match r.expr {
        serde_yaml_ng::Value::String(s) => s,
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        _ => return Err("expr: must be a string".into()),
    };
    if expr_src.trim().is_empty() {
        return Err("expr: is empty".into());
    }
    let expr = Expr::compile(&expr_src).map_err(|e| format!("expr: {e}"))?;
    let dur = |key: &str, v: Option<String>| -> Result<Duration, String> {
        v.as_deref()
            .map(duration)
            .transpose()
            .map(Option::unwrap_or_default)
            .map_err(|e| format!("{key}: {e}"))
    };
    let templates =
        |key: &str, m: BTreeMap<String, String>| -> Result<BTreeMap<String, Template>, String> {
            m.into_iter()
                .map(|(k, v)| {
                    if !is_label_name(&k) || k.starts_with("__") {
                        return Err(format!("{key}: {k:?} is not a valid label name"));
                    }
                    Template::parse(&v)
                        .map(|t| (k.clone(), t))
                        .map_err(|e| format!("{key}.{k}: {e}"))
                })
                .collect()
        };
    Ok(AlertRule {
        for_: dur("for", r.for_)?,
        keep_firing_for: dur("keep_firing_for", r.keep_firing_for)?,
        labels: templates("labels", r.labels)?,
        annotations: templates("annotations", r.annotations)?,
        name,
        expr,
        expr_src,
    })
}

/// A Prometheus duration (`250ms`, `1m30s`, `1h`, `2d`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // "0", "0s": zero, which the parser refuses and Prometheus takes (`for: 0s`).
    if s.starts_with('0')
        && ["", "ms", "s", "m", "h", "d", "w", "y"].contains(&s.trim_start_matches('0'))
    {
        return Ok(Duration::ZERO);
    }
    // The parser reads a bare number as seconds (and panics on a negative one); Prometheus
    // wants a unit.
    if s.parse::<f64>().is_ok() {
        return Err(format!(
            "{s:?} is not a Prometheus duration (it needs a unit: ms, s, m, h, d, w, y)"
        ));
    }
    promql_parser::util::duration::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a Prometheus duration ({e})"))
}

fn is_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f == '_' || f == ':' || f.is_ascii_alphabetic())
        && c.all(|ch| ch == '_' || ch == ':' || ch.is_ascii_alphanumeric())
}
