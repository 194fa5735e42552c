//! `ratelimit`: rate limits the kernel enforces: ingress packets, bytes or new connections per
//! source and per rule (XDP), outbound connects per service (cgroup hooks). Rules come from the
//! config and live from `limits set`; load adaptation scales them under host pressure.
//!
//! With no rules nothing is loaded or attached: the family costs nothing until it is used.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::{keep, Attached, Family, Slot, Spawn};
use crate::{
    collectors::{Reading, TickSource},
    config::{
        ratelimit::{validate_rules, Pressure, RuleSpec},
        Config, RatelimitConfig,
    },
    control::{
        protocol::{Command as _, Request},
        ratelimit::{
            parse_rules, LimitsChanged, LimitsDelRequest, LimitsFlushRequest, LimitsRequest,
            LimitsSetRequest, LimitsTopRequest,
        },
        reply, Views,
    },
    exporters::prometheus::{encode_ratelimit, EncodeFamily},
    probes::{
        error_chain,
        ratelimit::{
            cgroup_id,
            compile::{compile, Compiled, Slots},
            default_interfaces, IngressLink, RatelimitProbe,
        },
    },
    store::{
        ratelimit::{LinkView, RatelimitView, RuleCounts, RuleView, TopSource, TopView},
        SharedStore, Store,
    },
};

#[derive(Default)]
pub struct Ratelimit(std::sync::Arc<Inner>);

#[derive(Default)]
struct Inner {
    probe: Slot<RatelimitProbe>,
    rules: Mutex<Rules>,
}

/// The rule set: the config's, changed by `limits set` and `limits del`.
#[derive(Default)]
struct Rules {
    config: RatelimitConfig,
    /// Rules set live, by name (they replace a config rule of the same name).
    set: BTreeMap<String, RuleSpec>,
    /// Config rules deleted live.
    deleted: BTreeSet<String>,
    slots: Slots,
    compiled: Compiled,
    /// Load adaptation: the factor in force per rule (absent: 1).
    scales: BTreeMap<String, f64>,
    adaptations: u64,
    cgroup_ids: BTreeMap<String, u64>,
    interfaces: Vec<String>,
    flushed: bool,
    tracked_sources: u64,
}

impl Rules {
    /// The rules in force, in order: the config's (minus deleted and replaced ones, at their
    /// place), then the ones added live; with where each came from.
    fn effective(&self) -> Vec<(RuleSpec, &'static str)> {
        let mut out: Vec<(RuleSpec, &'static str)> = Vec::new();
        for r in &self.config.rules {
            if self.deleted.contains(&r.name) {
                continue;
            }
            match self.set.get(&r.name) {
                Some(s) => out.push((s.clone(), "limits set")),
                None => out.push((r.clone(), "config")),
            }
        }
        for (name, s) in &self.set {
            if !self.config.rules.iter().any(|r| &r.name == name) {
                out.push((s.clone(), "limits set"));
            }
        }
        out
    }

    fn scale_of(&self, name: &str) -> f64 {
        self.scales.get(name).copied().unwrap_or(1.0)
    }
}

impl Inner {
    /// Loads (if needed) and writes the rule set into the kernel; returns problems that did
    /// not stop it (an interface that would not attach).
    fn sync(&self, rules: &mut Rules) -> Result<Vec<String>, String> {
        let eff = rules.effective();
        if rules.flushed || (eff.is_empty() && self.probe.get().is_none()) {
            return Ok(Vec::new());
        }
        let cfg = rules.config.clone();
        let classes = cfg
            .load_classes()
            .map_err(|v| format!("{}: {}", v.key, v.reason))?;
        if self.probe.get().is_none() {
            let p =
                RatelimitProbe::load(&cfg.pin_dir, cfg.max_sources).map_err(|e| error_chain(&e))?;
            if p.adopted_maps > 0 {
                let pinned = p.pinned_slots();
                info!(
                    maps = p.adopted_maps,
                    rules = pinned.len(),
                    "adopted the rate-limit state a previous agent pinned"
                );
                rules.slots = Slots::adopt(pinned);
            }
            self.probe.set(p);
        }
        let specs: Vec<RuleSpec> = eff.iter().map(|(r, _)| r.clone()).collect();
        let compiled = compile(&specs, &classes, &cfg.allow, &mut rules.slots);
        if compiled.has_egress() {
            rules.cgroup_ids = resolve_services(&compiled);
        }
        let interfaces = if compiled.has_ingress() {
            cfg.interfaces.clone().unwrap_or_else(default_interfaces)
        } else {
            Vec::new()
        };
        let scales: HashMap<u32, f64> = compiled
            .rules
            .iter()
            .map(|r| (r.slot, rules.scale_of(&r.spec.name)))
            .collect();
        let new_sources = (cfg.new_sources.rate, cfg.new_sources.burst());
        let cgroup_ids = rules.cgroup_ids.clone();
        let problems = self
            .probe
            .with(|p| -> Result<Vec<String>, String> {
                p.apply(
                    &compiled,
                    new_sources,
                    &|slot| scales.get(&slot).copied().unwrap_or(1.0),
                    &cgroup_ids,
                )
                .map_err(|e| error_chain(&e))?;
                let mut problems = p.attach_ingress(&interfaces, cfg.attach);
                if compiled.has_egress() {
                    match crate::names::cgroup2_root() {
                        Some(root) => {
                            if let Err(e) = p.attach_egress(&root) {
                                problems.push(format!("egress: {}", error_chain(&e)));
                            }
                        }
                        None => problems.push("egress: no cgroup2 hierarchy is mounted".into()),
                    }
                }
                Ok(problems)
            })
            .unwrap_or_else(|| Err("internal: rate-limit probe unavailable".into()))?;
        rules.compiled = compiled;
        rules.interfaces = interfaces;
        Ok(problems)
    }

    fn change(&self, req: Request) -> Result<String, String> {
        if !req.privileged {
            return Err(format!(
                "permission denied: {} changes what the kernel enforces; only root or the agent's own user may",
                req.cmd
            ));
        }
        let mut rules = self
            .rules
            .lock()
            .map_err(|_| "internal: rules unavailable".to_string())?;
        let mut changed = Vec::new();
        if req.cmd == LimitsFlushRequest::NAME {
            req.args::<LimitsFlushRequest>()?;
            // Our links go with the probe (a tick's reader may hold it a moment longer); the
            // pins, the kernel's other references, go here.
            drop(self.probe.take());
            let dir = rules.config.pin_dir.join(crate::probes::ratelimit::LAYOUT);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(format!("limits flush: removing {}: {e}", dir.display()));
                }
            }
            rules.flushed = true;
            rules.set.clear();
            rules.deleted.clear();
            rules.slots = Slots::default();
            rules.compiled = Compiled::default();
            info!("rate limits flushed: programs detached, pins removed");
            return reply(&LimitsChanged {
                changed: vec!["flushed".into()],
                rules: 0,
            });
        }
        let (set, deleted) = if req.cmd == LimitsSetRequest::NAME {
            let r: LimitsSetRequest = req.args()?;
            let new = parse_rules(&r.rules).map_err(|e| format!("limits set: {e}"))?;
            let mut set = rules.set.clone();
            let mut deleted = rules.deleted.clone();
            for s in new {
                changed.push(s.name.clone());
                deleted.remove(&s.name);
                set.insert(s.name.clone(), s);
            }
            (set, deleted)
        } else {
            let r: LimitsDelRequest = req.args()?;
            let mut set = rules.set.clone();
            let mut deleted = rules.deleted.clone();
            let known =
                set.remove(&r.name).is_some() | rules.config.rules.iter().any(|c| c.name == r.name);
            if !known {
                return Err(format!(
                    "limits del: no rule named \"{}\"",
                    crate::untrusted::Printable(&r.name)
                ));
            }
            if rules.config.rules.iter().any(|c| c.name == r.name) {
                deleted.insert(r.name.clone());
            }
            changed.push(r.name);
            (set, deleted)
        };
        let candidate = Rules {
            config: rules.config.clone(),
            set: set.clone(),
            deleted: deleted.clone(),
            ..Default::default()
        };
        let specs: Vec<RuleSpec> = candidate.effective().into_iter().map(|(r, _)| r).collect();
        validate_rules(&specs, &rules.config.classes, "rules")
            .map_err(|v| format!("limits set: invalid value for `{}`: {}", v.key, v.reason))?;
        let (old_set, old_deleted, old_flushed) =
            (rules.set.clone(), rules.deleted.clone(), rules.flushed);
        rules.set = set;
        rules.deleted = deleted;
        rules.flushed = false;
        if let Err(e) = self.sync(&mut rules) {
            rules.set = old_set;
            rules.deleted = old_deleted;
            rules.flushed = old_flushed;
            return Err(format!(
                "{}: {e} (the running rules stay)",
                req_name(&changed)
            ));
        }
        for n in &changed {
            info!(rule = %crate::untrusted::LogField(n), "rate-limit rule changed live");
        }
        reply(&LimitsChanged {
            changed,
            rules: specs.len(),
        })
    }

    fn view(&self, rules: &Rules) -> RatelimitView {
        let eff = rules.effective();
        let origin: HashMap<&str, &str> = eff.iter().map(|(r, o)| (r.name.as_str(), *o)).collect();
        let read = self.probe.with(|p| {
            let counts: Vec<(String, RuleCounts)> = rules
                .compiled
                .rules
                .iter()
                .map(|r| {
                    let c = p
                        .counters(r.slot)
                        .map(|c| RuleCounts::from_kernel(&c))
                        .unwrap_or_default();
                    (r.spec.name.clone(), c)
                })
                .collect();
            let global = p
                .counters(agent_common::ratelimit::MAX_RULES)
                .unwrap_or_default();
            (
                counts,
                global,
                p.ingress_links(),
                p.has_egress(),
                p.adopted_maps,
            )
        });
        let mut v = RatelimitView {
            state: if rules.flushed {
                "flushed"
            } else if read.is_some() {
                "enforcing"
            } else {
                "idle"
            }
            .into(),
            tracked_sources: rules.tracked_sources,
            adaptations: rules.adaptations,
            ..Default::default()
        };
        if let Some((counts, global, links, egress, adopted)) = read {
            use agent_common::ratelimit::global as g;
            v.allowlisted = global.n[g::ALLOWED];
            v.sources_created = global.n[g::SOURCES_CREATED];
            v.sources_refused = global.n[g::SOURCES_REFUSED];
            v.unparsed_packets = global.n[g::UNPARSED];
            v.interfaces = links
                .into_iter()
                .map(|l| LinkView {
                    interface: l.interface,
                    mode: l.mode.into(),
                })
                .collect();
            v.egress_hooked = egress;
            v.adopted_maps = adopted;
            let counts: HashMap<String, RuleCounts> = counts.into_iter().collect();
            v.rules = rules
                .compiled
                .rules
                .iter()
                .map(|r| RuleView {
                    rule: r.spec.clone(),
                    origin: origin
                        .get(r.spec.name.as_str())
                        .copied()
                        .unwrap_or("config")
                        .into(),
                    scale: rules.scale_of(&r.spec.name),
                    counts: counts.get(&r.spec.name).copied().unwrap_or_default(),
                })
                .collect();
        }
        v
    }

    /// Once a second: load adaptation, services that moved to a new cgroup, links that came
    /// up; every few seconds, the per-source table (tracked count, top dropped sources).
    async fn run(
        self: std::sync::Arc<Self>,
        store: SharedStore,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut last_sources = Instant::now() - SOURCES_EVERY;
        let mut previous: HashMap<agent_common::ratelimit::SourceKey, u64> = HashMap::new();
        let mut previous_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let pressure: Vec<(&'static str, f64)> = store
                .read()
                .ok()
                .and_then(|s| {
                    s.host.as_ref().map(|h| {
                        h.pressure
                            .iter()
                            .filter(|p| p.kind == "some")
                            .map(|p| (p.resource, p.avg10 / 100.0))
                            .collect()
                    })
                })
                .unwrap_or_default();
            let Ok(mut rules) = self.rules.lock() else {
                return;
            };
            if rules.flushed || self.probe.get().is_none() {
                continue;
            }
            let mut resync = adapt(&mut rules, &pressure);
            if rules.compiled.has_egress() && resolve_services(&rules.compiled) != rules.cgroup_ids
            {
                resync = true;
            }
            if rules.compiled.has_ingress()
                && rules.config.interfaces.is_none()
                && default_interfaces() != rules.interfaces
            {
                resync = true;
            }
            if resync {
                if let Err(e) = self.sync(&mut rules) {
                    warn!(error = %e, "rate limits: could not apply a change");
                }
            }
            if last_sources.elapsed() < SOURCES_EVERY {
                continue;
            }
            last_sources = Instant::now();
            let names: HashMap<u32, (String, u32)> = rules
                .compiled
                .rules
                .iter()
                .map(|r| (r.slot, (r.spec.name.clone(), r.config.generation)))
                .collect();
            drop(rules);
            let Some(Ok(sources)) = self.probe.with(|p| p.sources()) else {
                continue;
            };
            let window = previous_at.elapsed().as_secs_f64();
            let mut top: Vec<TopSource> = sources
                .iter()
                .filter_map(|(k, v)| {
                    let (rule, generation) = names.get(&k.slot)?;
                    if *generation != k.generation {
                        return None;
                    }
                    let dropped = v
                        .dropped
                        .saturating_sub(previous.get(k).copied().unwrap_or(0));
                    (dropped > 0).then(|| TopSource {
                        rule: rule.clone(),
                        source: show_addr(&k.addr),
                        dropped,
                        passed: v.passed,
                    })
                })
                .collect();
            top.sort_by_key(|t| std::cmp::Reverse(t.dropped));
            top.truncate(TOP_KEPT);
            previous = sources.iter().map(|(k, v)| (*k, v.dropped)).collect();
            previous_at = Instant::now();
            if let Ok(mut r) = self.rules.lock() {
                r.tracked_sources = sources.len() as u64;
            }
            if let Ok(mut s) = store.write() {
                s.ratelimit_top = TopView {
                    window_seconds: window,
                    sources: top,
                };
            }
        }
    }
}

const SOURCES_EVERY: Duration = Duration::from_secs(5);
const TOP_KEPT: usize = 100;

fn req_name(changed: &[String]) -> String {
    format!("rules {}", changed.join(", "))
}

/// Scales rules down while their pressure is above `above`, back once it is below `below`.
/// Returns whether any rule changed.
fn adapt(rules: &mut Rules, pressure: &[(&'static str, f64)]) -> bool {
    let mut changed = false;
    let specs: Vec<RuleSpec> = rules.effective().into_iter().map(|(r, _)| r).collect();
    for r in &specs {
        let Some(a) = &r.adaptive else {
            rules.scales.remove(&r.name);
            continue;
        };
        let resource = match a.pressure {
            Pressure::Cpu => "cpu",
            Pressure::Memory => "memory",
            Pressure::Io => "io",
        };
        let Some(&(_, now)) = pressure.iter().find(|(res, _)| *res == resource) else {
            continue;
        };
        let scaled = rules.scales.contains_key(&r.name);
        if !scaled && now > a.above {
            rules.scales.insert(r.name.clone(), a.factor);
            info!(rule = %crate::untrusted::LogField(&r.name), pressure = resource, share = now, factor = a.factor, "rate limit scaled down under pressure");
        } else if scaled && now < a.below() {
            rules.scales.remove(&r.name);
            info!(rule = %crate::untrusted::LogField(&r.name), pressure = resource, share = now, "rate limit back to its configured rate");
        } else {
            continue;
        }
        rules.adaptations += 1;
        changed = true;
    }
    changed
}

fn resolve_services(c: &Compiled) -> BTreeMap<String, u64> {
    let Some(root) = crate::names::cgroup2_root() else {
        return BTreeMap::new();
    };
    let services: BTreeSet<&str> = c.egress.keys().map(|t| t.service.as_str()).collect();
    services
        .into_iter()
        .filter_map(|s| cgroup_id(&root, s).map(|id| (s.to_string(), id)))
        .collect()
}

fn show_addr(a: &agent_common::ratelimit::Addr) -> String {
    let v6 = std::net::Ipv6Addr::from(*a);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

impl TickSource for Ratelimit {
    fn name(&self) -> &'static str {
        "ratelimit"
    }

    fn read(&self, _now: Instant) -> Reading {
        let Ok(rules) = self.0.rules.lock() else {
            return Reading::default();
        };
        let view = self.0.view(&rules);
        drop(rules);
        Reading::fold(move |st| st.ratelimit = Some(view))
    }
}

impl Views for Ratelimit {
    fn commands(&self) -> &'static [&'static str] {
        &[
            LimitsRequest::NAME,
            LimitsSetRequest::NAME,
            LimitsDelRequest::NAME,
            LimitsTopRequest::NAME,
            LimitsFlushRequest::NAME,
        ]
    }

    fn answer(&self, req: Request, st: &Store, _cfg: &Config) -> Result<String, String> {
        match req.cmd.as_str() {
            LimitsRequest::NAME => {
                req.args::<LimitsRequest>()?;
                let rules = self
                    .0
                    .rules
                    .lock()
                    .map_err(|_| "internal: rules unavailable".to_string())?;
                reply(&self.0.view(&rules))
            }
            LimitsTopRequest::NAME => {
                let r: LimitsTopRequest = req.args()?;
                let mut top = st.ratelimit_top.clone();
                top.sources.truncate(r.limit.unwrap_or(20).min(TOP_KEPT));
                reply(&top)
            }
            _ => self.0.change(req),
        }
    }
}

impl Family for Ratelimit {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.ratelimit.enabled
    }

    /// Only with rules: with none it loads nothing, so it needs no privileges (and an
    /// unprivileged agent without rules has not failed at it).
    fn needs_ebpf(&self, cfg: &Config) -> bool {
        !cfg.ratelimit.rules.is_empty()
    }

    fn attach(&self, cfg: &Config) -> Result<Attached, String> {
        let mut rules = self
            .0
            .rules
            .lock()
            .map_err(|_| "internal: rules unavailable".to_string())?;
        rules.config = cfg.ratelimit.clone();
        let problems = self.0.sync(&mut rules)?;
        let how = describe(&rules, self.0.probe.with(|p| p.ingress_links()));
        Ok(Attached { how, problems })
    }

    fn spawn(&self, ctx: &Spawn, tasks: &mut JoinSet<()>) {
        tasks.spawn(self.0.clone().run(ctx.store.clone(), ctx.shutdown.clone()));
    }

    fn metrics(&self) -> EncodeFamily {
        encode_ratelimit
    }

    fn keep_restart_keys(&self, running: &Config, new: &mut Config) -> Vec<&'static str> {
        let (r, n) = (&running.ratelimit, &mut new.ratelimit);
        let mut changed = Vec::new();
        keep(
            &mut changed,
            "ratelimit.enabled",
            &r.enabled,
            &mut n.enabled,
        );
        keep(
            &mut changed,
            "ratelimit.pin_dir",
            &r.pin_dir,
            &mut n.pin_dir,
        );
        keep(
            &mut changed,
            "ratelimit.max_sources",
            &r.max_sources,
            &mut n.max_sources,
        );
        changed
    }

    fn reload(&self, cfg: &Config, _store: &SharedStore) {
        let Ok(mut rules) = self.0.rules.lock() else {
            return;
        };
        let old = std::mem::replace(&mut rules.config, cfg.ratelimit.clone());
        if let Err(e) = self.0.sync(&mut rules) {
            warn!(error = %e, "SIGHUP: could not apply the rate-limit rules; the running ones stay");
            rules.config = old;
        }
    }

    fn detach(&self) {
        // The links and maps stay pinned: enforcement goes on while the agent is away.
        drop(self.0.probe.take());
    }
}

fn describe(rules: &Rules, links: Option<Vec<IngressLink>>) -> String {
    let Some(links) = links else {
        return "idle: no rules (nothing loaded)".into();
    };
    let n = rules.compiled.rules.len();
    let mut parts = vec![format!("{n} rules")];
    if !links.is_empty() {
        let on: Vec<String> = links
            .iter()
            .map(|l| format!("{} ({})", l.interface, l.mode))
            .collect();
        parts.push(format!("ingress on {}", on.join(", ")));
    }
    if rules.compiled.has_egress() {
        parts.push("cgroup connect hooks".into());
    }
    parts.join("; ")
}
