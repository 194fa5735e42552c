//! `insite-agent limits ...`: the rate-limit rules, changed live.

use std::path::PathBuf;

use clap::Subcommand;

use super::{client_cmd, Request};
use crate::untrusted::Printable;

#[derive(Debug, Subcommand)]
pub enum LimitsAction {
    /// The rules in force, with what each passed and dropped (the default).
    List,
    /// Adds or replaces rules by name from a rules file ([[rules]] or [[ratelimit.rules]]).
    Set { file: PathBuf },
    /// Removes a rule.
    Del { name: String },
    /// The sources with the most dropped over the last few seconds.
    Top {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Detaches every rate-limit program and removes its pins: nothing is enforced.
    Flush,
}

pub fn limits(socket: &std::path::Path, action: LimitsAction, json: bool) -> anyhow::Result<()> {
    use crate::{
        control::ratelimit::*,
        store::ratelimit::{RatelimitView, TopView},
    };
    let changed = |v: serde_json::Value| {
        serde_json::from_value::<LimitsChanged>(v).map(|c| {
            println!("{}: {} rules in force", c.changed.join(", "), c.rules);
        })
    };
    match action {
        LimitsAction::List => client_cmd(socket, &Request::of(&LimitsRequest {}), json, |v| {
            serde_json::from_value::<RatelimitView>(v).map(|v| print_limits(&v))
        }),
        LimitsAction::Set { file } => {
            let rules = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            client_cmd(
                socket,
                &Request::of(&LimitsSetRequest { rules }),
                json,
                changed,
            )
        }
        LimitsAction::Del { name } => client_cmd(
            socket,
            &Request::of(&LimitsDelRequest { name }),
            json,
            changed,
        ),
        LimitsAction::Top { limit } => client_cmd(
            socket,
            &Request::of(&LimitsTopRequest { limit: Some(limit) }),
            json,
            |v| {
                serde_json::from_value::<TopView>(v).map(|t| {
                    println!("Dropped over the last {:.1}s", t.window_seconds);
                    println!(
                        "{:<24} {:<40} {:>12} {:>12}",
                        "RULE", "SOURCE", "DROPPED", "PASSED"
                    );
                    for s in &t.sources {
                        println!(
                            "{:<24} {:<40} {:>12} {:>12}",
                            Printable(&s.rule),
                            s.source,
                            s.dropped,
                            s.passed
                        );
                    }
                })
            },
        ),
        LimitsAction::Flush => {
            client_cmd(socket, &Request::of(&LimitsFlushRequest {}), json, changed)
        }
    }
}

fn print_limits(v: &crate::store::ratelimit::RatelimitView) {
    println!("rate limits: {}", v.state);
    if !v.interfaces.is_empty() {
        let ifs: Vec<String> = v
            .interfaces
            .iter()
            .map(|i| format!("{} ({})", Printable(&i.interface), i.mode))
            .collect();
        println!("  ingress on    {}", ifs.join(", "));
    }
    if v.egress_hooked {
        println!("  egress        cgroup connect hooks");
    }
    println!(
        "  sources       {} tracked, {} created, {} refused by the new-source budget; {} allowlisted",
        v.tracked_sources, v.sources_created, v.sources_refused, v.allowlisted
    );
    println!(
        "{:<24} {:<8} {:<5} {:<12} {:>14} {:>14} {:>6} {:>12} {:>12}",
        "RULE", "DIR", "PROTO", "UNIT", "PER SOURCE", "AGGREGATE", "SCALE", "PASSED", "DROPPED"
    );
    let lim = |l: &Option<crate::config::ratelimit::LimitSpec>| {
        l.map_or("-".to_string(), |l| format!("{}/s b{}", l.rate, l.burst()))
    };
    for r in &v.rules {
        let passed =
            r.counts.passed_source.max(r.counts.passed_aggregate) + r.counts.passed_new_source;
        println!(
            "{:<24} {:<8} {:<5} {:<12} {:>14} {:>14} {:>6.2} {:>12} {:>12}",
            Printable(&r.rule.name),
            r.rule.direction.as_str(),
            r.rule.protocol.as_str(),
            r.rule.unit.as_str(),
            lim(&r.rule.per_source),
            lim(&r.rule.aggregate),
            r.scale,
            passed,
            r.counts.dropped()
        );
    }
}
