//! Rules -> what the kernel reads per packet: each rule's slot and [`RuleConfig`], the rule
//! lists by port (ingress) and by service and port (egress), and the LPM trie's prefixes with
//! their class bits. Pure, so that it is checked without a kernel.

use std::collections::{BTreeMap, HashMap};

use agent_common::ratelimit::{
    flag, unit, v4_mapped, Addr, Limit, PortKey, RuleConfig, RuleSet, ALLOW_BIT, MAX_RULES, NANO,
    RULES_PER_PORT,
};
use ipnet::IpNet;

use crate::config::{
    parse_cidr,
    ratelimit::{Algorithm, Direction, FailMode, Protocol, RefuseWith, RuleSpec, Unit},
};

/// Slots by rule name, kept across changes: a rule that stays keeps its slot, its counters and
/// its buckets; a slot that is reused gets a new generation, so the state of the rule that
/// held it before is never inherited.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    by_name: BTreeMap<String, u32>,
    generations: Vec<u32>,
}

impl Slots {
    /// Slots as the pinned maps hold them (adopted after a restart).
    pub fn adopt(names: impl IntoIterator<Item = (u32, String, u32)>) -> Self {
        let mut s = Self::default();
        for (slot, name, generation) in names {
            if slot < MAX_RULES {
                s.by_name.insert(name, slot);
                s.generation_mut(slot, generation);
            }
        }
        s
    }

    fn generation_mut(&mut self, slot: u32, at_least: u32) -> u32 {
        let i = slot as usize;
        if self.generations.len() <= i {
            self.generations.resize(i + 1, 0);
        }
        self.generations[i] = self.generations[i].max(at_least);
        self.generations[i]
    }

    /// Assigns slots to `names` (in order): kept ones keep theirs, new ones take the lowest
    /// free slot with the next generation. Returns (slot, generation) per name, and the slots
    /// given up.
    pub fn assign(&mut self, names: &[&str]) -> (Vec<(u32, u32)>, Vec<u32>) {
        let keep: std::collections::BTreeSet<&str> = names.iter().copied().collect();
        let freed: Vec<u32> = self
            .by_name
            .iter()
            .filter(|(n, _)| !keep.contains(n.as_str()))
            .map(|(_, &s)| s)
            .collect();
        self.by_name.retain(|n, _| keep.contains(n.as_str()));
        let mut used: std::collections::BTreeSet<u32> = self.by_name.values().copied().collect();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            let slot = match self.by_name.get(*n) {
                Some(&s) => s,
                None => {
                    let s = (0..MAX_RULES).find(|s| !used.contains(s)).unwrap_or(0);
                    used.insert(s);
                    self.by_name.insert((*n).to_string(), s);
                    let g = self.generation_mut(s, 0);
                    self.generation_mut(s, g + 1);
                    s
                }
            };
            let g = self.generation_mut(slot, 0);
            out.push((slot, g));
        }
        (out, freed)
    }
}

/// One rule, placed.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub spec: RuleSpec,
    pub slot: u32,
    /// As configured; load adaptation scales the rates it writes.
    pub config: RuleConfig,
}

/// An egress rule list, before its service is resolved to a cgroup id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgressTarget {
    pub service: String,
    pub port: u16,
    pub proto: u8,
}

/// Everything the maps hold for a set of rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    pub rules: Vec<Placed>,
    pub ports: HashMap<PortKey, RuleSet>,
    pub egress: BTreeMap<EgressTarget, RuleSet>,
    /// (prefix length over the 128-bit address, address, class bits).
    pub prefixes: Vec<(u32, Addr, u64)>,
    /// Slots whose rule went away: their state is cleared.
    pub freed: Vec<u32>,
}

impl Compiled {
    pub fn has_ingress(&self) -> bool {
        !self.ports.is_empty()
    }
    pub fn has_egress(&self) -> bool {
        !self.egress.is_empty()
    }
}

/// A network as an LPM key: IPv4 mapped into IPv6 (`::ffff:0:0/96` + the prefix).
pub fn prefix_of(net: &IpNet) -> (u32, Addr) {
    match net.trunc() {
        IpNet::V4(n) => (96 + u32::from(n.prefix_len()), v4_mapped(n.addr().octets())),
        IpNet::V6(n) => (u32::from(n.prefix_len()), n.addr().octets()),
    }
}

fn truncate(addr: &Addr, len: u32) -> Addr {
    let mut out = [0u8; 16];
    for (i, b) in addr.iter().enumerate() {
        let bits = (len as i64 - 8 * i as i64).clamp(0, 8) as u32;
        out[i] = if bits == 0 {
            0
        } else {
            b & (0xffu8 << (8 - bits))
        };
    }
    out
}

fn limit_of(spec: &crate::config::ratelimit::LimitSpec, r: &RuleSpec) -> Limit {
    match r.algorithm {
        Algorithm::TokenBucket => Limit::new(spec.rate, spec.burst()),
        // A window's limit is rate x window, held as the burst; no horizon.
        Algorithm::SlidingWindow => {
            let per_window = (u128::from(spec.rate) * r.window.as_nanos()) / u128::from(NANO);
            Limit {
                rate: spec.rate,
                burst: u64::try_from(per_window).unwrap_or(u64::MAX),
                horizon_ns: 0,
            }
        }
    }
}

/// Places `rules` (validated: see `config::ratelimit::validate_rules`) in slots and builds the
/// maps' contents. `classes` are the named classes' networks.
pub fn compile(
    rules: &[RuleSpec],
    classes: &BTreeMap<String, Vec<IpNet>>,
    allow: &[String],
    slots: &mut Slots,
) -> Compiled {
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    let (placed, freed) = slots.assign(&names);
    let class_bit: BTreeMap<&str, u64> = classes
        .keys()
        .enumerate()
        .map(|(i, n)| (n.as_str(), 1u64 << i))
        .collect();
    let mut bits: HashMap<(u32, Addr), u64> = HashMap::new();
    for (name, nets) in classes {
        let b = class_bit.get(name.as_str()).copied().unwrap_or(0);
        for n in nets {
            *bits.entry(prefix_of(n)).or_default() |= b;
        }
    }
    for a in allow {
        if let Ok(n) = parse_cidr(a) {
            *bits.entry(prefix_of(&n)).or_default() |= ALLOW_BIT;
        }
    }
    let mut next_inline = classes.len() as u32;
    let mut out = Compiled {
        freed,
        ..Default::default()
    };
    for (r, &(slot, generation)) in rules.iter().zip(&placed) {
        let mut classes_mask = 0u64;
        let mut inline = None;
        for s in &r.sources {
            if let Some(b) = class_bit.get(s.as_str()) {
                classes_mask |= b;
            } else if let Ok(n) = parse_cidr(s) {
                let b = *inline.get_or_insert_with(|| {
                    let b = 1u64 << next_inline.min(62);
                    next_inline += 1;
                    b
                });
                classes_mask |= b;
                *bits.entry(prefix_of(&n)).or_default() |= b;
            }
        }
        let mut flags = match r.unit {
            Unit::Packets => unit::PACKETS,
            Unit::Bytes => unit::BYTES,
            Unit::Connections => unit::CONNECTIONS,
        };
        if r.algorithm == Algorithm::SlidingWindow {
            flags |= flag::SLIDING_WINDOW;
        }
        if r.fail == FailMode::Closed {
            flags |= flag::FAIL_CLOSED;
        }
        if r.refuse_with == RefuseWith::Econnrefused {
            flags |= flag::REFUSE;
        }
        let mut config = RuleConfig {
            window_ns: u64::try_from(r.window.as_nanos()).unwrap_or(u64::MAX),
            classes: classes_mask,
            generation,
            ..Default::default()
        };
        if let Some(l) = &r.per_source {
            flags |= flag::PER_SOURCE;
            config.per_source = limit_of(l, r);
        }
        if let Some(l) = &r.aggregate {
            flags |= flag::AGGREGATE;
            config.aggregate = limit_of(l, r);
        }
        config.flags = flags;
        let protos: &[u8] = match r.protocol {
            Protocol::Tcp => &[6],
            Protocol::Udp => &[17],
            Protocol::Any => &[6, 17],
        };
        let ports: &[u16] = if r.ports.is_empty() { &[0] } else { &r.ports };
        for &proto in protos {
            for &port in ports {
                let set = match (&r.direction, &r.service) {
                    (Direction::Egress, Some(service)) => out
                        .egress
                        .entry(EgressTarget {
                            service: service.clone(),
                            port,
                            proto,
                        })
                        .or_default(),
                    _ => out
                        .ports
                        .entry(PortKey {
                            port,
                            proto,
                            reserved: 0,
                        })
                        .or_default(),
                };
                if let Some(free) = set.slots.iter_mut().find(|s| **s == 0) {
                    *free = (slot + 1) as u16;
                }
            }
        }
        out.rules.push(Placed {
            spec: r.clone(),
            slot,
            config,
        });
    }
    // A prefix holds its own bits and those of every shorter prefix that covers it: the
    // trie answers with the longest match only.
    let mut prefixes: Vec<(u32, Addr, u64)> = bits
        .iter()
        .map(|(&(len, addr), &b)| {
            let covered = (0..len)
                .filter_map(|l| bits.get(&(l, truncate(&addr, l))))
                .fold(b, |acc, x| acc | x);
            (len, addr, covered)
        })
        .collect();
    prefixes.sort();
    out.prefixes = prefixes;
    debug_assert!(out.ports.values().all(|s| s.slots.len() == RULES_PER_PORT));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ratelimit::LimitSpec;

    fn rule(name: &str, ports: &[u16], sources: &[&str]) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            direction: Direction::Ingress,
            protocol: Protocol::Udp,
            ports: ports.to_vec(),
            sources: sources.iter().map(|s| s.to_string()).collect(),
            service: None,
            unit: Unit::Packets,
            per_source: Some(LimitSpec {
                rate: 100,
                burst: Some(10),
            }),
            aggregate: None,
            algorithm: Algorithm::TokenBucket,
            window: std::time::Duration::from_secs(1),
            adaptive: None,
            fail: FailMode::Open,
            refuse_with: RefuseWith::Eperm,
        }
    }

    fn net(s: &str) -> IpNet {
        parse_cidr(s).unwrap()
    }

    #[test]
    fn rules_keep_their_slots_and_reused_slots_get_a_new_generation() {
        let mut slots = Slots::default();
        let none = BTreeMap::new();
        let a = compile(
            &[rule("a", &[1], &[]), rule("b", &[2], &[])],
            &none,
            &[],
            &mut slots,
        );
        assert_eq!(
            a.rules
                .iter()
                .map(|r| (r.slot, r.config.generation))
                .collect::<Vec<_>>(),
            [(0, 1), (1, 1)]
        );
        // `a` goes, `c` comes: `b` keeps slot 1, `c` takes slot 0 with a new generation.
        let b = compile(
            &[rule("b", &[2], &[]), rule("c", &[3], &[])],
            &none,
            &[],
            &mut slots,
        );
        assert_eq!(b.freed, [0]);
        assert_eq!(
            b.rules
                .iter()
                .map(|r| (r.slot, r.config.generation))
                .collect::<Vec<_>>(),
            [(1, 1), (0, 2)]
        );
        let key = PortKey {
            port: 3,
            proto: 17,
            reserved: 0,
        };
        assert_eq!(b.ports[&key].slots[0], 1);
        assert!(!b.ports.contains_key(&PortKey { port: 1, ..key }));
    }

    #[test]
    fn prefixes_carry_the_bits_of_the_networks_that_cover_them() {
        let classes = BTreeMap::from([
            ("eu".to_string(), vec![net("10.0.0.0/8")]),
            (
                "lab".to_string(),
                vec![net("10.1.0.0/16"), net("2001:db8::/32")],
            ),
        ]);
        let mut slots = Slots::default();
        let c = compile(
            &[rule("r", &[9000], &["lab", "192.0.2.0/24"])],
            &classes,
            &["10.1.2.0/24".to_string()],
            &mut slots,
        );
        let find = |s: &str| {
            let (l, a) = prefix_of(&net(s));
            c.prefixes
                .iter()
                .find(|p| p.0 == l && p.1 == a)
                .map(|p| p.2)
        };
        assert_eq!(find("10.0.0.0/8"), Some(0b01));
        assert_eq!(find("10.1.0.0/16"), Some(0b11));
        assert_eq!(find("10.1.2.0/24"), Some(0b11 | ALLOW_BIT));
        assert_eq!(find("2001:db8::/32"), Some(0b10));
        // The rule's own network is a third class.
        assert_eq!(find("192.0.2.0/24"), Some(0b100));
        assert_eq!(c.rules[0].config.classes, 0b110);
        assert_eq!(prefix_of(&net("10.0.0.0/8")).0, 104);
    }

    #[test]
    fn any_protocol_and_every_port_expand() {
        let mut r = rule("r", &[], &[]);
        r.protocol = Protocol::Any;
        let c = compile(&[r], &BTreeMap::new(), &[], &mut Slots::default());
        let mut keys: Vec<_> = c.ports.keys().map(|k| (k.proto, k.port)).collect();
        keys.sort();
        assert_eq!(keys, [(6, 0), (17, 0)]);
    }

    #[test]
    fn sliding_windows_hold_their_count_per_window() {
        let mut r = rule("r", &[1], &[]);
        r.algorithm = Algorithm::SlidingWindow;
        r.window = std::time::Duration::from_millis(500);
        let c = compile(&[r], &BTreeMap::new(), &[], &mut Slots::default());
        let cfg = c.rules[0].config;
        assert_eq!(cfg.per_source.burst, 50);
        assert_eq!(cfg.window_ns, 500_000_000);
        assert_ne!(cfg.flags & flag::SLIDING_WINDOW, 0);
    }
}
