//! `[ratelimit]`: rules the kernel enforces on ingress packets (XDP, per destination port and
//! source) and on outbound connects (per service), with the allowlist and named CIDR classes
//! they refer to. The same rule format is what `insite-agent limits set FILE` takes.

use std::collections::BTreeMap;

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatelimitConfig {
    pub enabled: bool,
    /// Links the ingress rules attach to; absent: every non-loopback link that is up.
    pub interfaces: Option<Vec<String>>,
    /// How ingress rules attach: `auto` (on a NIC: XDP in the driver, else generic XDP, else
    /// TC; on a virtual link: TC, else generic XDP), `native`, `generic` or `tc`.
    pub attach: XdpAttach,
    /// Sources that bypass every rule.
    pub allow: Vec<String>,
    /// Named CIDR classes: a file of CIDRs, one a line (`#` starts a comment).
    pub classes: BTreeMap<String, PathBuf>,
    pub rules: Vec<RuleSpec>,
    /// Per-source entries kept in the kernel (an LRU: the least recently seen go first).
    pub max_sources: u32,
    /// New per-source entries a second across all rules, so that spoofed sources cannot churn
    /// the table faster than this.
    pub new_sources: LimitSpec,
    /// Where the maps and links are pinned (bpffs), so enforcement outlives the process.
    pub pin_dir: PathBuf,
}

impl Default for RatelimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interfaces: None,
            attach: XdpAttach::Auto,
            allow: Vec::new(),
            classes: BTreeMap::new(),
            rules: Vec::new(),
            max_sources: 65_536,
            new_sources: LimitSpec {
                rate: 20_000,
                burst: Some(20_000),
            },
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/insite-agent/ratelimit";
/// Largest class file read.
pub const MAX_CLASS_FILE_BYTES: u64 = 16 << 20;
/// CIDRs in the allowlist and every class together (the LPM trie's size).
pub const MAX_PREFIXES: usize = 262_144;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttach {
    /// Driver mode, falling back to generic (skb) mode.
    Auto,
    Native,
    Generic,
    /// TC ingress (a TCX link on 6.6+).
    Tc,
}

/// A rule, as in the config and in `limits set` files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination ports; empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Class names or CIDRs; empty: every source.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Egress: the systemd unit or cgroup path whose processes the rule limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub unit: Unit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_source: Option<LimitSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<LimitSpec>,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Sliding windows: the window (limits are per second, counted over it).
    #[serde(default = "one_second", with = "humantime_serde")]
    pub window: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<Adaptive>,
    /// When the new-source budget refuses a new source: pass it unlimited (`open`) or drop it.
    #[serde(default)]
    pub fail: FailMode,
    /// Egress: the errno a refused connect() gets.
    #[serde(default)]
    pub refuse_with: RefuseWith,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Units a second.
    pub rate: u64,
    /// Units the bucket holds; default: the rate (one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
}

impl LimitSpec {
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.rate)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adaptive {
    pub pressure: Pressure,
    /// Scale down while the share of time some task stalled on the resource (PSI `some`,
    /// 10 s average, 0..1) is above this...
    pub above: f64,
    /// ...by this factor (0..1]...
    pub factor: f64,
    /// ...and back up once it is below this (default: `above` x 0.8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
}

impl Adaptive {
    pub fn below(&self) -> f64 {
        self.below.unwrap_or(self.above * 0.8)
    }
}

/// A closed set of names: serde reads and writes them, `as_str` shows them.
macro_rules! names {
    ($(#[$m:meta])* $t:ident { $d:ident = $ds:literal $(, $v:ident = $s:literal)* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $t {
            #[default]
            #[serde(rename = $ds)]
            $d,
            $(#[serde(rename = $s)] $v,)*
        }
        impl $t {
            pub fn as_str(&self) -> &'static str {
                match self { Self::$d => $ds, $(Self::$v => $s,)* }
            }
        }
    };
}

names!(Direction { Ingress = "ingress", Egress = "egress" });
names!(Protocol { Any = "any", Tcp = "tcp", Udp = "udp" });
names!(Unit { Packets = "packets", Bytes = "bytes", Connections = "connections" });
names!(Algorithm { TokenBucket = "token_bucket", SlidingWindow = "sliding_window" });
names!(Pressure { Cpu = "cpu", Memory = "memory", Io = "io" });
names!(FailMode { Open = "open", Closed = "closed" });
names!(RefuseWith { Eperm = "eperm", Econnrefused = "econnrefused" });

/// Longest rule name (it becomes a metric label).
pub const MAX_RULE_NAME: usize = 64;

impl RatelimitConfig {
    /// Checks values that the types alone do not constrain, and reads the class files.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        if !(1024..=16 << 20).contains(&self.max_sources) {
            return Err(violation(
                "ratelimit.max_sources",
                "must be between 1024 and 16777216",
            ));
        }
        check_limit("ratelimit.new_sources", &self.new_sources)?;
        if !self.pin_dir.is_absolute() {
            return Err(violation("ratelimit.pin_dir", "must be an absolute path"));
        }
        if let Some(ifs) = &self.interfaces {
            for i in ifs {
                if i.is_empty() || i.len() > 15 || i.contains('/') {
                    return Err(violation(
                        "ratelimit.interfaces",
                        format!(
                            "\"{}\" is not an interface name",
                            crate::untrusted::Printable(i)
                        ),
                    ));
                }
            }
        }
        for c in &self.allow {
            parse_cidr(c).map_err(|r| violation("ratelimit.allow", r))?;
        }
        self.load_classes()?;
        validate_rules(&self.rules, &self.classes, "ratelimit.rules")
    }

    /// Every class's networks, read from its file.
    pub fn load_classes(&self) -> Result<BTreeMap<String, Vec<ipnet::IpNet>>, Violation> {
        if self.classes.len() > MAX_NAMED_CLASSES {
            return Err(violation(
                "ratelimit.classes",
                format!("at most {MAX_NAMED_CLASSES} classes"),
            ));
        }
        let mut out = BTreeMap::new();
        let mut total = self.allow.len();
        for (name, path) in &self.classes {
            let key = format!("ratelimit.classes.{name}");
            check_name(name).map_err(|r| violation(&key, r))?;
            let nets = read_class_file(path).map_err(|r| violation(&key, r))?;
            total += nets.len();
            if total > MAX_PREFIXES {
                return Err(violation(
                    &key,
                    format!("the allowlist and the classes hold more than {MAX_PREFIXES} networks"),
                ));
            }
            out.insert(name.clone(), nets);
        }
        Ok(out)
    }
}

/// Named classes; the rest of the 63 class bits go to rules' inline CIDRs.
pub const MAX_NAMED_CLASSES: usize = 32;

/// A class file's networks: one CIDR or address a line, blank lines and `#` comments skipped.
fn read_class_file(path: &Path) -> Result<Vec<ipnet::IpNet>, String> {
    use std::io::Read as _;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    f.take(MAX_CLASS_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_CLASS_FILE_BYTES {
        return Err(format!(
            "{} is larger than {MAX_CLASS_FILE_BYTES} bytes",
            path.display()
        ));
    }
    let mut nets = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let net = parse_cidr(line).map_err(|r| format!("{}:{}: {r}", path.display(), i + 1))?;
        nets.push(net);
        if nets.len() > MAX_PREFIXES {
            return Err(format!(
                "{} holds more than {MAX_PREFIXES} networks",
                path.display()
            ));
        }
    }
    Ok(nets)
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{}\" is not a name: 1 to {MAX_RULE_NAME} letters, digits, '_', '.', ':' or '-'",
            crate::untrusted::Printable(name)
        ))
    }
}

/// A unit name (`nginx.service`) or a cgroup path from the cgroup2 root (`/system.slice/x`).
fn check_service(s: &str) -> Result<(), String> {
    let bad = s.is_empty()
        || s.len() > 4096
        || s.contains('\0')
        || s.split('/').any(|c| c == "..")
        || (!s.starts_with('/') && s.contains('/'));
    if bad {
        return Err(format!(
            "\"{}\" is neither a unit name nor a cgroup path like /system.slice/nginx.service",
            crate::untrusted::Printable(s)
        ));
    }
    Ok(())
}

fn check_limit(key: &str, l: &LimitSpec) -> Result<(), Violation> {
    use agent_common::ratelimit::{MAX_BURST, MAX_RATE};
    if l.rate == 0 || l.rate > MAX_RATE {
        return Err(violation(
            format!("{key}.rate"),
            format!("must be between 1 and {MAX_RATE} a second"),
        ));
    }
    if l.burst() == 0 || l.burst() > MAX_BURST {
        return Err(violation(
            format!("{key}.burst"),
            format!("must be between 1 and {MAX_BURST}"),
        ));
    }
    Ok(())
}

/// Checks a set of rules (the config's, or the running set with a `limits set` file's merged
/// in); errors name the rule and the field: `ratelimit.rules[udp-9000].per_source.rate`.
pub fn validate_rules(
    rules: &[RuleSpec],
    classes: &BTreeMap<String, PathBuf>,
    at: &str,
) -> Result<(), Violation> {
    use agent_common::ratelimit::{MAX_CLASSES, MAX_RULES, MAX_WINDOW_NS, RULES_PER_PORT};
    if rules.len() > MAX_RULES as usize {
        return Err(violation(at, format!("at most {MAX_RULES} rules")));
    }
    let mut names = std::collections::HashSet::new();
    let mut per_port: std::collections::HashMap<(Direction, Option<&str>, u8, u16), usize> =
        Default::default();
    let mut inline_classes = 0;
    for (i, r) in rules.iter().enumerate() {
        check_name(&r.name).map_err(|e| violation(format!("{at}[{i}].name"), e))?;
        let key = |field: &str| format!("{at}[{}].{field}", r.name);
        if !names.insert(r.name.as_str()) {
            return Err(violation(key("name"), "two rules have this name"));
        }
        if r.per_source.is_none() && r.aggregate.is_none() {
            return Err(violation(
                key("per_source"),
                "a rule needs per_source, aggregate or both",
            ));
        }
        for (field, l) in [("per_source", &r.per_source), ("aggregate", &r.aggregate)] {
            if let Some(l) = l {
                check_limit(&key(field), l)?;
                if r.algorithm == Algorithm::SlidingWindow {
                    let per_window = (l.rate as u128 * r.window.as_nanos()) / 1_000_000_000;
                    if per_window == 0
                        || per_window > agent_common::ratelimit::MAX_WINDOW_COUNT as u128
                    {
                        return Err(violation(
                            key(field),
                            "rate x window must be at least 1 and at most 2^40",
                        ));
                    }
                }
            }
        }
        if r.window.is_zero() || r.window.as_nanos() > MAX_WINDOW_NS as u128 {
            return Err(violation(
                key("window"),
                "must be more than 0s and at most 13 days",
            ));
        }
        if r.ports.contains(&0) {
            return Err(violation(
                key("ports"),
                "port 0 is not a port (omit ports for every port)",
            ));
        }
        if r.ports.len() > 1024 {
            return Err(violation(key("ports"), "at most 1024 ports a rule"));
        }
        match r.direction {
            Direction::Ingress => {
                if r.service.is_some() {
                    return Err(violation(
                        key("service"),
                        "only egress rules select a service",
                    ));
                }
            }
            Direction::Egress => {
                match &r.service {
                    None => {
                        return Err(violation(
                            key("service"),
                            "an egress rule needs the service (unit or cgroup path) it limits",
                        ))
                    }
                    Some(s) => check_service(s).map_err(|e| violation(key("service"), e))?,
                }
                if r.unit != Unit::Connections {
                    return Err(violation(key("unit"), "egress rules limit connections"));
                }
                if !r.sources.is_empty() {
                    return Err(violation(
                        key("sources"),
                        "egress rules match the service, not sources",
                    ));
                }
            }
        }
        if r.unit == Unit::Connections
            && r.protocol != Protocol::Tcp
            && r.direction == Direction::Ingress
        {
            return Err(violation(
                key("protocol"),
                "connections are counted for tcp only",
            ));
        }
        let mut has_inline = false;
        for s in &r.sources {
            if classes.contains_key(s) {
                continue;
            }
            parse_cidr(s).map_err(|_| {
                violation(
                    key("sources"),
                    format!(
                        "\"{}\" is neither a class nor a network",
                        crate::untrusted::Printable(s)
                    ),
                )
            })?;
            has_inline = true;
        }
        inline_classes += usize::from(has_inline);
        if classes.len() + inline_classes > MAX_CLASSES as usize {
            return Err(violation(
                key("sources"),
                format!("classes and rules with their own networks number more than {MAX_CLASSES}"),
            ));
        }
        if let Some(a) = &r.adaptive {
            if !(a.above > 0.0 && a.above < 1.0) {
                return Err(violation(
                    key("adaptive.above"),
                    "must be between 0 and 1 (a share of time)",
                ));
            }
            if !(a.factor > 0.0 && a.factor <= 1.0) {
                return Err(violation(
                    key("adaptive.factor"),
                    "must be more than 0 and at most 1",
                ));
            }
            if !(a.below() >= 0.0 && a.below() <= a.above) {
                return Err(violation(
                    key("adaptive.below"),
                    "must be between 0 and adaptive.above",
                ));
            }
        }
        let protos: &[u8] = match r.protocol {
            Protocol::Tcp => &[6],
            Protocol::Udp => &[17],
            Protocol::Any => &[6, 17],
        };
        let ports: &[u16] = if r.ports.is_empty() { &[0] } else { &r.ports };
        for &p in protos {
            for &port in ports {
                let n = per_port
                    .entry((r.direction, r.service.as_deref(), p, port))
                    .or_default();
                *n += 1;
                if *n > RULES_PER_PORT {
                    return Err(violation(
                        key("ports"),
                        format!("more than {RULES_PER_PORT} rules on port {port}"),
                    ));
                }
            }
        }
    }
    Ok(())
}
