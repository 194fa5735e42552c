//! Rate limits: what each rule passed and dropped at each level, its effective rate, and the
//! per-source table's churn.

use super::*;
use crate::store::ratelimit::RatelimitView;

pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    _cfg: &Config,
) -> Result<(), std::fmt::Error> {
    match &st.ratelimit {
        Some(v) if v.state == "enforcing" => view(e, v),
        _ => Ok(()),
    }
}

fn rl(rule: &str, key: &'static str, value: &'static str) -> Labels {
    let mut ls = l("rule", rule.to_string());
    ls.extend(l(key, value));
    ls
}

fn view(e: &mut DescriptorEncoder<'_>, v: &RatelimitView) -> Result<(), std::fmt::Error> {
    counter(
        e,
        "insite_ratelimit_passed",
        "Admissions a rule let through, by level (source, aggregate; new_source: passed unlimited because the new-source budget was spent and the rule fails open)",
        None,
        v.rules.iter().flat_map(|r| {
            let c = &r.counts;
            [
                (rl(&r.rule.name, "level", "source"), c.passed_source as f64),
                (rl(&r.rule.name, "level", "aggregate"), c.passed_aggregate as f64),
                (rl(&r.rule.name, "level", "new_source"), c.passed_new_source as f64),
            ]
        }),
    )?;
    counter(
        e,
        "insite_ratelimit_dropped",
        "Admissions a rule refused, by the level that refused (source, aggregate; new_source: the new-source budget was spent and the rule fails closed)",
        None,
        v.rules.iter().flat_map(|r| {
            let c = &r.counts;
            [
                (rl(&r.rule.name, "level", "source"), c.dropped_source as f64),
                (rl(&r.rule.name, "level", "aggregate"), c.dropped_aggregate as f64),
                (rl(&r.rule.name, "level", "new_source"), c.dropped_new_source as f64),
            ]
        }),
    )?;
    counter(
        e,
        "insite_ratelimit",
        "Frame bytes a rule passed and dropped",
        Some(&Unit::Bytes),
        v.rules.iter().flat_map(|r| {
            [
                (
                    rl(&r.rule.name, "verdict", "passed"),
                    r.counts.passed_bytes as f64,
                ),
                (
                    rl(&r.rule.name, "verdict", "dropped"),
                    r.counts.dropped_bytes as f64,
                ),
            ]
        }),
    )?;
    gauge(
        e,
        "insite_ratelimit_rate",
        "A rule's effective rate per second by level, after load adaptation",
        None,
        v.rules.iter().flat_map(|r| {
            let s = r.scale;
            r.rule
                .per_source
                .map(|l| {
                    (
                        rl(&r.rule.name, "level", "source"),
                        (l.rate as f64 * s).round().max(1.0),
                    )
                })
                .into_iter()
                .chain(r.rule.aggregate.map(|l| {
                    (
                        rl(&r.rule.name, "level", "aggregate"),
                        (l.rate as f64 * s).round().max(1.0),
                    )
                }))
        }),
    )?;
    gauge(
        e,
        "insite_ratelimit_scale",
        "The factor load adaptation applies to a rule's rates now (1: as configured)",
        None,
        v.rules
            .iter()
            .map(|r| (l("rule", r.rule.name.clone()), r.scale)),
    )?;
    counter(
        e,
        "insite_ratelimit_adaptations",
        "Times load adaptation scaled a rule down or back up",
        None,
        [(vec![], v.adaptations as f64)],
    )?;
    gauge(
        e,
        "insite_ratelimit_tracked_sources",
        "Per-source entries in the kernel's table",
        None,
        [(vec![], v.tracked_sources as f64)],
    )?;
    counter(
        e,
        "insite_ratelimit_sources",
        "Per-source entries created; refused: the new-source budget was spent; evicted: created and since pushed out of the LRU table",
        None,
        [
            (l("event", "created"), v.sources_created as f64),
            (l("event", "refused"), v.sources_refused as f64),
            (
                l("event", "evicted"),
                v.sources_created.saturating_sub(v.tracked_sources) as f64,
            ),
        ],
    )?;
    counter(
        e,
        "insite_ratelimit_allowlisted",
        "Admissions on a rule's port from an allowlisted source (never limited)",
        None,
        [(vec![], v.allowlisted as f64)],
    )?;
    counter(
        e,
        "insite_ratelimit_unparsed_packets",
        "Packets whose headers the XDP program could not parse (passed)",
        None,
        [(vec![], v.unparsed_packets as f64)],
    )?;
    gauge(
        e,
        "insite_ratelimit_rules",
        "Rules in force",
        None,
        [(vec![], v.rules.len() as f64)],
    )
}
