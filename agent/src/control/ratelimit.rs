//! `limits`, `limits_set`, `limits_del`, `limits_top`, `limits_flush`: the rate-limit rules
//! the kernel enforces, changed live.

use serde::{Deserialize, Serialize};

use super::protocol::Command;
use crate::config::ratelimit::RuleSpec;

/// `limits`: the rules, where they came from, what they passed and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {}

impl Command for LimitsRequest {
    const NAME: &'static str = "limits";
}

/// `limits_set`: adds or replaces rules by name; `rules` is a rules file's TOML text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSetRequest {
    pub rules: String,
}

impl Command for LimitsSetRequest {
    const NAME: &'static str = "limits_set";
}

/// `limits_del`: removes a rule by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDelRequest {
    pub name: String,
}

impl Command for LimitsDelRequest {
    const NAME: &'static str = "limits_del";
}

/// `limits_top`: the sources that had the most dropped over the last window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsTopRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Command for LimitsTopRequest {
    const NAME: &'static str = "limits_top";
}

/// `limits_flush`: detaches every program and removes every pin; nothing is enforced until
/// the next `limits_set` or reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFlushRequest {}

impl Command for LimitsFlushRequest {
    const NAME: &'static str = "limits_flush";
}

/// What a change did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsChanged {
    pub changed: Vec<String>,
    pub rules: usize,
}

/// A rules file: `[[rules]]` tables, or `[[ratelimit.rules]]` as in the agent's config.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: Vec<RuleSpec>,
    #[serde(default)]
    ratelimit: Option<RulesSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesSection {
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

/// Parses a rules file; the error names the line and the field.
pub fn parse_rules(text: &str) -> Result<Vec<RuleSpec>, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.message().trim().to_string())?;
    let f: RulesFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => format!("line {l}: `{key}`: {}", inner.message().trim()),
            None => format!("`{key}`: {}", inner.message().trim()),
        }
    })?;
    let mut rules = f.rules;
    rules.extend(f.ratelimit.map(|s| s.rules).unwrap_or_default());
    if rules.is_empty() {
        return Err("no rules in the file ([[rules]] or [[ratelimit.rules]])".into());
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_file_shapes_parse_and_errors_name_the_field() {
        let a = parse_rules("[[rules]]\nname = \"a\"\nper_source = { rate = 5 }\n").unwrap();
        assert_eq!(a[0].name, "a");
        let b = parse_rules(
            "[[ratelimit.rules]]\nname = \"b\"\nunit = \"bytes\"\naggregate = { rate = 5, burst = 9 }\n",
        )
        .unwrap();
        assert_eq!(b[0].aggregate.unwrap().burst, Some(9));
        let e = parse_rules("[[rules]]\nname = \"a\"\nspeed = 3\n").unwrap_err();
        assert!(e.contains("speed"), "{e}");
        let e = parse_rules("[[rules]]\nname = \"a\"\nunit = \"furlongs\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("unit"), "{e}");
        assert!(parse_rules("").is_err());
    }
}
