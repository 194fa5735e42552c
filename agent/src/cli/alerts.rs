//! `insite-agent alerts ...`: live alerts and their history.

use clap::Subcommand;

use super::{client_cmd, Request};
use crate::{
    control::alerts::{
        AlertsAckRequest, AlertsChanged, AlertsHistoryRequest, AlertsRequest, AlertsSilenceRequest,
        AlertsUnsilenceRequest, HistoryView,
    },
    store::alerts::AlertsView,
    untrusted::Printable,
    upstream::alertmanager::rfc3339,
};

#[derive(Debug, Subcommand)]
pub enum AlertsAction {
    /// Pending, firing and recently resolved alerts (the default).
    List,
    /// The last state changes, oldest first.
    History {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Acknowledges a pending or firing alert (its id, or 4+ leading characters): stops its
    /// escalation.
    Ack {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Mutes notifications of the alerts every matcher matches (`alertname=X`, `job!=y`,
    /// `instance=~"db-.*"`, `x!~re`) for a while.
    Silence {
        #[arg(required = true)]
        matchers: Vec<String>,
        #[arg(long = "for", default_value = "1h")]
        for_: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Ends a silence now.
    Unsilence { id: String },
    /// Checks rule files as the agent would load them (no agent needed), like `promtool
    /// check rules`: what the agent cannot evaluate is named with its file, group and rule.
    Check {
        #[arg(required = true)]
        files: Vec<String>,
    },
    /// The engine's cost on a synthetic exposition (for `cargo xtask bench alerts`).
    #[command(hide = true)]
    Bench {
        #[arg(long, default_value_t = 1000)]
        rules: usize,
        #[arg(long, default_value_t = 10_000)]
        series: usize,
        #[arg(long, default_value_t = 480)]
        ticks: usize,
    },
}

pub fn alerts(socket: &std::path::Path, action: AlertsAction, json: bool) -> anyhow::Result<()> {
    let changed = |v: serde_json::Value| {
        serde_json::from_value::<AlertsChanged>(v).map(|c| println!("{} {}", c.what, c.id))
    };
    match action {
        AlertsAction::Check { files } => {
            let set = crate::rules::files::RuleSet::load(&files)?;
            println!(
                "{} rules in {} groups from {} files: the agent evaluates them all",
                set.rules().count(),
                set.groups.len(),
                set.files.len()
            );
            Ok(())
        }
        AlertsAction::Bench {
            rules,
            series,
            ticks,
        } => {
            let r = crate::rules::bench::run(rules, series, ticks)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        AlertsAction::Ack { id, comment } => client_cmd(
            socket,
            &Request::of(&AlertsAckRequest { id, comment }),
            json,
            changed,
        ),
        AlertsAction::Silence {
            matchers,
            for_,
            comment,
        } => client_cmd(
            socket,
            &Request::of(&AlertsSilenceRequest {
                matchers,
                for_,
                comment,
            }),
            json,
            changed,
        ),
        AlertsAction::Unsilence { id } => client_cmd(
            socket,
            &Request::of(&AlertsUnsilenceRequest { id }),
            json,
            changed,
        ),
        AlertsAction::List => client_cmd(socket, &Request::of(&AlertsRequest {}), json, |v| {
            serde_json::from_value::<AlertsView>(v).map(|v| print_alerts(&v))
        }),
        AlertsAction::History { limit } => client_cmd(
            socket,
            &Request::of(&AlertsHistoryRequest { limit: Some(limit) }),
            json,
            |v| {
                serde_json::from_value::<HistoryView>(v).map(|h| {
                    println!(
                        "{:<24} {:<16} {:<22} {:>12}  LABELS",
                        "AT", "ID", "CHANGE", "VALUE"
                    );
                    for t in &h.transitions {
                        println!(
                            "{:<24} {:<16} {:<22} {:>12}  {}",
                            rfc3339(t.at_ms),
                            t.id,
                            format!("{} -> {}", t.from.as_str(), t.to.as_str()),
                            format!("{:.4}", t.value),
                            labels(&t.labels)
                        );
                    }
                })
            },
        ),
    }
}

fn labels(l: &std::collections::BTreeMap<String, String>) -> String {
    let parts: Vec<String> = l
        .iter()
        .filter(|(k, _)| *k != "alertname")
        .map(|(k, v)| format!("{k}={:?}", Printable(v).to_string()))
        .collect();
    format!(
        "{}{{{}}}",
        Printable(l.get("alertname").map_or("", |s| s.as_str())),
        parts.join(",")
    )
}

fn print_alerts(v: &AlertsView) {
    println!(
        "{} rules in {} groups from {} files",
        v.rules,
        v.groups,
        v.files.len()
    );
    if let Some(r) = &v.refused {
        println!(
            "last rule change refused (the running rules stay): {}",
            Printable(r)
        );
    }
    println!(
        "outbox: {} waiting, {} dropped; window: {} series, {} KiB",
        v.outbox.records,
        v.outbox.dropped,
        v.window.series,
        v.window.bytes / 1024
    );
    for s in &v.silences {
        let m: Vec<String> = s
            .matchers
            .iter()
            .map(|m| Printable(&m.to_string()).to_string())
            .collect();
        println!(
            "silence {} until {} by {}: {} {}",
            s.id,
            rfc3339(s.ends_at_ms),
            Printable(&s.created_by),
            m.join(" "),
            Printable(&s.comment)
        );
    }
    if v.alerts.is_empty() {
        println!("no alerts");
        return;
    }
    println!(
        "{:<16} {:<9} {:<24} {:>12}  ALERT",
        "ID", "STATE", "SINCE", "VALUE"
    );
    for a in &v.alerts {
        let since = match a.state {
            crate::rules::alerting::State::Firing => a.fired_at_ms,
            crate::rules::alerting::State::Resolved => a.resolved_at_ms,
            _ => Some(a.active_at_ms),
        };
        println!(
            "{:<16} {:<9} {:<24} {:>12}  {}",
            a.id,
            a.state.as_str(),
            since.map(rfc3339).unwrap_or_default(),
            format!("{:.4}", a.value),
            labels(&a.labels_out())
        );
        let mut marks = Vec::new();
        if let Some(k) = &a.ack {
            marks.push(format!(
                "acknowledged by {} ({})",
                Printable(&k.by),
                Printable(&k.comment)
            ));
        }
        if let Some(s) = &a.silenced_by {
            marks.push(format!("silenced by {s}"));
        }
        if a.flapping {
            marks.push("flapping".into());
        }
        if a.escalation > 0 {
            marks.push(format!("escalation {}", a.escalation));
        }
        if !marks.is_empty() {
            println!("{:<16} {}", "", marks.join("; "));
        }
        if let Some(s) = a.annotations.get("summary") {
            println!("{:<16} {}", "", Printable(s));
        }
    }
}
