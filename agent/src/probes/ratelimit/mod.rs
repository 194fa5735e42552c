//! Rate-limit probe: the XDP program on the ingress links and the cgroup connect hooks (see
//! `agent-ebpf/src/bin/ratelimit.rs`), their pinned maps, and writing rules into them.
//!
//! Maps and links are pinned under `<pin_dir>/v1` (the layout's version), so enforcement goes on
//! while the agent is stopped, restarts or crashes. On load the agent adopts what is pinned: a
//! map whose type and sizes match is reused with its state (buckets, counters, rule slots), one
//! that does not is replaced; a pinned XDP link gets the new program atomically
//! (`bpf_link_update`), a connect hook is re-attached before the old link is let go, so an
//! upgrade leaves no gap.

pub mod compile;

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, HashSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use agent_common::ratelimit::{
    Addr, Counters, EgressKey, PortKey, RuleConfig, RuleName, RuleSet, Settings, SourceKey,
    SourceState, MAX_RULES,
};
use aya::{
    maps::{
        lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, MapData, MapInfo, MapType, PerCpuArray,
    },
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use tracing::{info, warn};

use self::compile::Compiled;
use super::{map_err, take_map, ProbeError};
use crate::config::ratelimit::XdpAttach;

/// The pinned layout's version: a change to a map's key or value bumps it, and an agent
/// never adopts a layout it does not know.
pub const LAYOUT: &str = "v1";

const XDP_PROGRAM: &str = "insite_ratelimit";
const TC_PROGRAM: &str = "insite_ratelimit_tc";
const CONNECT_PROGRAMS: [&str; 2] = ["insite_ratelimit_connect4", "insite_ratelimit_connect6"];

/// Every pinned map: name, type, key and value size, entries (`None`: set at load).
fn expected_maps(max_sources: u32) -> [(&'static str, MapType, usize, usize, u32); 10] {
    use std::mem::size_of as s;
    [
        ("RL_SETTINGS", MapType::Array, 4, s::<Settings>(), 1),
        ("RL_RULES", MapType::Array, 4, s::<RuleConfig>(), MAX_RULES),
        ("RL_NAMES", MapType::Array, 4, s::<RuleName>(), MAX_RULES),
        (
            "RL_PORTS",
            MapType::Hash,
            s::<PortKey>(),
            s::<RuleSet>(),
            8192,
        ),
        (
            "RL_EGRESS",
            MapType::Hash,
            s::<EgressKey>(),
            s::<RuleSet>(),
            8192,
        ),
        ("RL_CLASSES", MapType::LpmTrie, 4 + s::<Addr>(), 8, 262_144),
        (
            "RL_SOURCES",
            MapType::LruHash,
            s::<SourceKey>(),
            s::<SourceState>(),
            max_sources,
        ),
        (
            "RL_AGGREGATES",
            MapType::Array,
            4,
            s::<SourceState>(),
            MAX_RULES,
        ),
        ("RL_BUDGET", MapType::Array, 4, s::<SourceState>(), 1),
        (
            "RL_COUNTERS",
            MapType::PerCpuArray,
            4,
            s::<Counters>(),
            MAX_RULES + 1,
        ),
    ]
}

/// Removes pinned maps whose layout is not the one this agent expects (their state is lost,
/// and said so); returns how many were kept for adoption.
fn check_pins(dir: &Path, max_sources: u32) -> usize {
    let mut kept = 0;
    for (name, ty, key, value, entries) in expected_maps(max_sources) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let fits = MapInfo::from_pin(&path).is_ok_and(|i| {
            i.map_type().ok() == Some(ty)
                && i.key_size() as usize == key
                && i.value_size() as usize == value
                && i.max_entries() == entries
        });
        if fits {
            kept += 1;
        } else {
            warn!(map = name, path = %path.display(), "pinned map has another layout or size; replacing it (its state is lost)");
            let _ = std::fs::remove_file(&path);
        }
    }
    kept
}

/// The rate-limit probe's maps, as userspace writes and reads them.
struct Maps {
    settings: Array<MapData, Settings>,
    rules: Array<MapData, RuleConfig>,
    names: Array<MapData, RuleName>,
    ports: HashMap<MapData, PortKey, RuleSet>,
    egress: HashMap<MapData, EgressKey, RuleSet>,
    classes: LpmTrie<MapData, Addr, u64>,
    sources: HashMap<MapData, SourceKey, SourceState>,
    aggregates: Array<MapData, SourceState>,
    counters: PerCpuArray<MapData, Counters>,
}

/// A link this agent holds, pinned at `path`.
struct Pinned {
    path: PathBuf,
    _link: FdLink,
}

/// How an interface's XDP program attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressLink {
    pub interface: String,
    pub mode: &'static str,
    /// The program replaced one a previous agent left pinned.
    pub adopted: bool,
}

pub struct RatelimitProbe {
    ebpf: Ebpf,
    maps: Maps,
    dir: PathBuf,
    xdp: BTreeMap<String, (Pinned, IngressLink)>,
    connect: Vec<Pinned>,
    /// What the maps hold that the current rules put there (stale entries are deleted).
    written_ports: HashSet<PortKey>,
    written_egress: HashSet<EgressKey>,
    written_prefixes: HashSet<(u32, Addr)>,
    /// Generation last written per slot: a new one resets the slot's aggregate.
    written_generations: StdHashMap<u32, u32>,
    /// Maps adopted from a previous agent.
    pub adopted_maps: usize,
}

impl std::fmt::Debug for RatelimitProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatelimitProbe")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn program_err(what: impl Into<String>) -> impl FnOnce(aya::programs::ProgramError) -> ProbeError {
    let what = what.into();
    move |source| ProbeError::Program { what, source }
}

fn io_err(name: &'static str) -> impl FnOnce(std::io::Error) -> ProbeError {
    move |source| ProbeError::Read { name, source }
}

impl RatelimitProbe {
    /// Loads the object with its maps pinned under `pin_dir` (adopting matching pins).
    pub fn load(pin_dir: &Path, max_sources: u32) -> Result<Self, ProbeError> {
        let dir = pin_dir.join(LAYOUT);
        std::fs::create_dir_all(dir.join("links")).map_err(io_err("pin directory"))?;
        let adopted_maps = check_pins(&dir, max_sources);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries("RL_SOURCES", max_sources)
            .load(super::RATELIMIT_OBJECT)
            .map_err(|source| ProbeError::Load {
                object: "ratelimit",
                source,
            })?;
        let maps = Maps {
            settings: take_map(&mut ebpf, "RL_SETTINGS", Array::try_from)?,
            rules: take_map(&mut ebpf, "RL_RULES", Array::try_from)?,
            names: take_map(&mut ebpf, "RL_NAMES", Array::try_from)?,
            ports: take_map(&mut ebpf, "RL_PORTS", HashMap::try_from)?,
            egress: take_map(&mut ebpf, "RL_EGRESS", HashMap::try_from)?,
            classes: take_map(&mut ebpf, "RL_CLASSES", LpmTrie::try_from)?,
            sources: take_map(&mut ebpf, "RL_SOURCES", HashMap::try_from)?,
            aggregates: take_map(&mut ebpf, "RL_AGGREGATES", Array::try_from)?,
            counters: take_map(&mut ebpf, "RL_COUNTERS", PerCpuArray::try_from)?,
        };
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(ProbeError::MissingProgram(XDP_PROGRAM))?
            .try_into()
            .map_err(program_err(XDP_PROGRAM))?;
        xdp.load().map_err(program_err(XDP_PROGRAM))?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(ProbeError::MissingProgram(TC_PROGRAM))?
            .try_into()
            .map_err(program_err(TC_PROGRAM))?;
        tc.load().map_err(program_err(TC_PROGRAM))?;
        let mut me = Self {
            ebpf,
            maps,
            dir,
            xdp: BTreeMap::new(),
            connect: Vec::new(),
            written_ports: HashSet::new(),
            written_egress: HashSet::new(),
            written_prefixes: HashSet::new(),
            written_generations: StdHashMap::new(),
            adopted_maps,
        };
        if adopted_maps > 0 {
            me.adopt_written();
        }
        Ok(me)
    }

    /// What adopted maps hold, so that the first rule update deletes what is stale in them.
    fn adopt_written(&mut self) {
        self.written_ports = self.maps.ports.keys().filter_map(Result::ok).collect();
        self.written_egress = self.maps.egress.keys().filter_map(Result::ok).collect();
        self.written_prefixes = self
            .maps
            .classes
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        for slot in 0..MAX_RULES {
            if let Ok(r) = self.maps.rules.get(&slot, 0) {
                if r.generation != 0 {
                    self.written_generations.insert(slot, r.generation);
                }
            }
        }
    }

    /// The rule slots a previous agent left in the pinned maps: (slot, name, generation).
    pub fn pinned_slots(&self) -> Vec<(u32, String, u32)> {
        let mut out = Vec::new();
        for slot in 0..MAX_RULES {
            let (Ok(n), Ok(r)) = (self.maps.names.get(&slot, 0), self.maps.rules.get(&slot, 0))
            else {
                continue;
            };
            let end = n
                .bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(n.bytes.len());
            if end > 0 {
                if let Ok(name) = std::str::from_utf8(&n.bytes[..end]) {
                    out.push((slot, name.to_string(), r.generation));
                }
            }
        }
        out
    }

    /// Attaches the XDP program to `interfaces` (adopting pinned links) and detaches it from
    /// links no longer wanted. Returns the problems of the interfaces that failed.
    pub fn attach_ingress(&mut self, interfaces: &[String], mode: XdpAttach) -> Vec<String> {
        let mut problems = Vec::new();
        let wanted: HashSet<&str> = interfaces.iter().map(String::as_str).collect();
        let gone: Vec<String> = self
            .xdp
            .keys()
            .filter(|i| !wanted.contains(i.as_str()))
            .cloned()
            .collect();
        for i in gone {
            if let Some((p, _)) = self.xdp.remove(&i) {
                let _ = std::fs::remove_file(&p.path);
                info!(interface = %crate::untrusted::LogField(&i), "rate limits detached from the interface");
            }
        }
        for i in interfaces {
            if self.xdp.contains_key(i) {
                continue;
            }
            match self.attach_one(i, mode) {
                Ok(v) => {
                    info!(interface = %crate::untrusted::LogField(i), mode = v.1.mode, adopted = v.1.adopted, "rate limits attached");
                    self.xdp.insert(i.clone(), v);
                }
                Err(e) => problems.push(format!("{i}: {}", super::error_chain(&e))),
            }
        }
        problems
    }

    /// Attaches to one interface in the first way `mode` allows that works. A link a previous
    /// agent pinned for a way the mode allows gets the new program in place, without a gap; a
    /// pinned link of another way goes once the new one is in.
    fn attach_one(
        &mut self,
        interface: &str,
        mode: XdpAttach,
    ) -> Result<(Pinned, IngressLink), ProbeError> {
        let links = self.dir.join("links");
        let xdp_pin = links.join(format!("xdp-{interface}"));
        let tc_pin = links.join(format!("tc-{interface}"));
        let tries: &[Way] = match mode {
            // A NIC's driver runs XDP before it allocates a socket buffer: the cheapest place
            // to drop. A virtual link (veth, bridge, tun) hands over socket buffers already,
            // which native XDP copies into XDP frames and generic XDP linearises; TC takes
            // them as they are (measured with `cargo xtask bench ratelimit --attach`).
            XdpAttach::Auto if is_virtual(interface) => &[Way::Tc, Way::Xdp(XdpMode::Skb)],
            XdpAttach::Auto => &[Way::Xdp(XdpMode::Driver), Way::Xdp(XdpMode::Skb), Way::Tc],
            XdpAttach::Native => &[Way::Xdp(XdpMode::Driver)],
            XdpAttach::Generic => &[Way::Xdp(XdpMode::Skb)],
            XdpAttach::Tc => &[Way::Tc],
        };
        if tries.iter().any(|w| matches!(w, Way::Xdp(_))) {
            if let Some(l) = self.adopt(interface, &xdp_pin, false)? {
                let _ = std::fs::remove_file(&tc_pin);
                return Ok(l);
            }
        }
        if tries.contains(&Way::Tc) {
            if let Some(l) = self.adopt(interface, &tc_pin, true)? {
                let _ = std::fs::remove_file(&xdp_pin);
                return Ok(l);
            }
        }
        let mut errors = Vec::new();
        for &way in tries {
            let got = match way {
                Way::Xdp(m) => self.new_xdp(interface, m, &xdp_pin),
                Way::Tc => self.new_tc(interface, &tc_pin),
            };
            match got {
                Ok(l) => {
                    // A pinned link of the other way (the mode changed) goes now.
                    let other = if way == Way::Tc { &xdp_pin } else { &tc_pin };
                    let _ = std::fs::remove_file(other);
                    return Ok(l);
                }
                Err(e) => errors.push(format!("{}: {}", way.name(), super::error_chain(&e))),
            }
        }
        Err(ProbeError::NoAttach(format!(
            "{interface}: {}",
            errors.join("; ")
        )))
    }

    /// Swaps this agent's program into a link a previous agent pinned at `path`.
    fn adopt(
        &mut self,
        interface: &str,
        path: &Path,
        tc: bool,
    ) -> Result<Option<(Pinned, IngressLink)>, ProbeError> {
        let Ok(pinned) = PinnedLink::from_pin(path) else {
            return Ok(None);
        };
        let fd = FdLink::from(pinned);
        let what = format!("{} on {interface}", if tc { "TC" } else { "XDP" });
        let swapped = if tc {
            let Ok(link) = SchedClassifierLink::try_from(fd) else {
                let _ = std::fs::remove_file(path);
                return Ok(None);
            };
            let prog = self.tc_program()?;
            let id = prog
                .attach_to_link(link)
                .map_err(program_err(what.clone()))?;
            FdLink::try_from(prog.take_link(id).map_err(program_err(what.clone()))?)
        } else {
            let Ok(link) = XdpLink::try_from(fd) else {
                let _ = std::fs::remove_file(path);
                return Ok(None);
            };
            let prog = self.xdp_program()?;
            let id = prog
                .attach_to_link(link)
                .map_err(program_err(what.clone()))?;
            FdLink::try_from(prog.take_link(id).map_err(program_err(what.clone()))?)
        };
        let fd = swapped.map_err(|e| ProbeError::NoAttach(format!("{what}: {e}")))?;
        let mode = if tc { "tc (adopted)" } else { "xdp (adopted)" };
        Ok(Some(pinned_link(path, fd, interface, mode, true)))
    }

    fn new_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
        path: &Path,
    ) -> Result<(Pinned, IngressLink), ProbeError> {
        let what = format!("XDP on {interface}");
        let prog = self.xdp_program()?;
        let id = prog
            .attach(interface, mode)
            .map_err(program_err(what.clone()))?;
        let link = prog.take_link(id).map_err(program_err(what.clone()))?;
        let fd = FdLink::try_from(link)
            .map_err(|e| ProbeError::NoAttach(format!("{what}: no bpf_link: {e}")))?;
        let name = if mode == XdpMode::Driver {
            "xdp-native"
        } else {
            "xdp-generic"
        };
        pin_new(path, fd, interface, name)
    }

    fn new_tc(
        &mut self,
        interface: &str,
        path: &Path,
    ) -> Result<(Pinned, IngressLink), ProbeError> {
        let what = format!("TC on {interface}");
        // TCX links (6.6+) need no qdisc; older kernels attach under clsact (EEXIST is fine).
        let _ = aya::programs::tc::qdisc_add_clsact(interface);
        let prog = self.tc_program()?;
        let id = prog
            .attach(interface, TcAttachType::Ingress)
            .map_err(program_err(what.clone()))?;
        let link = prog.take_link(id).map_err(program_err(what.clone()))?;
        let fd = FdLink::try_from(link).map_err(|e| {
            ProbeError::NoAttach(format!("{what}: no bpf_link (TCX needs Linux 6.6): {e}"))
        })?;
        pin_new(path, fd, interface, "tc")
    }

    fn xdp_program(&mut self) -> Result<&mut Xdp, ProbeError> {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(ProbeError::MissingProgram(XDP_PROGRAM))?
            .try_into()
            .map_err(program_err(XDP_PROGRAM))
    }

    fn tc_program(&mut self) -> Result<&mut SchedClassifier, ProbeError> {
        self.ebpf
            .program_mut(TC_PROGRAM)
            .ok_or(ProbeError::MissingProgram(TC_PROGRAM))?
            .try_into()
            .map_err(program_err(TC_PROGRAM))
    }

    pub fn ingress_links(&self) -> Vec<IngressLink> {
        self.xdp.values().map(|(_, l)| l.clone()).collect()
    }

    /// Attaches the connect hooks at the cgroup2 root (once; egress rules select services by
    /// cgroup in the maps).
    pub fn attach_egress(&mut self, cgroup_root: &Path) -> Result<(), ProbeError> {
        if !self.connect.is_empty() {
            return Ok(());
        }
        let root = std::fs::File::open(cgroup_root).map_err(io_err("cgroup2 root"))?;
        for name in CONNECT_PROGRAMS {
            let path = self.dir.join("links").join(name);
            // A previous agent's link stays until ours is in place. (bpf_link attachments
            // are multi-attach by nature; link_create takes no attach flags.)
            let old = PinnedLink::from_pin(&path).ok();
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(ProbeError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            if prog.fd().is_err() {
                prog.load().map_err(program_err(name))?;
            }
            let id = prog
                .attach(&root, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let link = prog.take_link(id).map_err(program_err(name))?;
            let fd = FdLink::try_from(link)
                .map_err(|e| ProbeError::NoAttach(format!("{name}: no bpf_link: {e}")))?;
            let _ = std::fs::remove_file(&path);
            let pinned = fd
                .pin(&path)
                .map_err(|e| ProbeError::NoAttach(format!("{name}: pinning: {e}")))?;
            drop(old);
            self.connect.push(Pinned {
                path,
                _link: pinned.into(),
            });
        }
        Ok(())
    }

    pub fn has_egress(&self) -> bool {
        !self.connect.is_empty()
    }

    /// Writes a compiled rule set: rules first, then the lists that point to them, then
    /// deletes what the old set had and this one has not, so no packet finds a half-written
    /// rule. `rates` scales each rule's rates (load adaptation), by slot.
    pub fn apply(
        &mut self,
        c: &Compiled,
        new_sources: (u64, u64),
        scale: &dyn Fn(u32) -> f64,
        cgroup_ids: &BTreeMap<String, u64>,
    ) -> Result<(), ProbeError> {
        let m = &mut self.maps;
        for r in &c.rules {
            if self.written_generations.get(&r.slot) != Some(&r.config.generation) {
                m.aggregates
                    .set(r.slot, SourceState::default(), 0)
                    .map_err(map_err("RL_AGGREGATES"))?;
                self.written_generations.insert(r.slot, r.config.generation);
            }
            let f = scale(r.slot);
            let mut cfg = r.config;
            cfg.per_source = scaled(&cfg.per_source, f);
            cfg.aggregate = scaled(&cfg.aggregate, f);
            m.rules.set(r.slot, cfg, 0).map_err(map_err("RL_RULES"))?;
            let mut name = RuleName::default();
            let b = r.spec.name.as_bytes();
            let n = b.len().min(name.bytes.len());
            name.bytes[..n].copy_from_slice(&b[..n]);
            m.names.set(r.slot, name, 0).map_err(map_err("RL_NAMES"))?;
        }
        for (len, addr, bits) in &c.prefixes {
            m.classes
                .insert(&LpmKey::new(*len, *addr), bits, 0)
                .map_err(map_err("RL_CLASSES"))?;
        }
        // After the trie is filled (the programs consult it once this says it has entries),
        // before stale entries go.
        let settings = Settings {
            new_sources: agent_common::ratelimit::Limit::new(new_sources.0, new_sources.1),
            prefixes: c.prefixes.len() as u64,
        };
        m.settings
            .set(0, settings, 0)
            .map_err(map_err("RL_SETTINGS"))?;
        for (k, v) in &c.ports {
            m.ports.insert(k, v, 0).map_err(map_err("RL_PORTS"))?;
        }
        let mut egress = HashSet::new();
        for (t, v) in &c.egress {
            let Some(&cgroup) = cgroup_ids.get(&t.service) else {
                continue;
            };
            let k = EgressKey {
                cgroup,
                port: t.port,
                proto: t.proto,
                reserved: [0; 5],
            };
            m.egress.insert(k, v, 0).map_err(map_err("RL_EGRESS"))?;
            egress.insert(k);
        }
        // What the old set had and this one has not.
        let ports: HashSet<PortKey> = c.ports.keys().copied().collect();
        for k in self.written_ports.difference(&ports) {
            let _ = m.ports.remove(k);
        }
        self.written_ports = ports;
        for k in self.written_egress.difference(&egress) {
            let _ = m.egress.remove(k);
        }
        self.written_egress = egress;
        let prefixes: HashSet<(u32, Addr)> = c.prefixes.iter().map(|p| (p.0, p.1)).collect();
        for (len, addr) in self.written_prefixes.difference(&prefixes) {
            let _ = m.classes.remove(&LpmKey::new(*len, *addr));
        }
        self.written_prefixes = prefixes;
        let live: HashSet<u32> = c.rules.iter().map(|r| r.slot).collect();
        for slot in 0..MAX_RULES {
            if !live.contains(&slot) && self.written_generations.contains_key(&slot) {
                let _ = m.rules.set(slot, RuleConfig::default(), 0);
                let _ = m.names.set(slot, RuleName::default(), 0);
                self.written_generations.remove(&slot);
            }
        }
        Ok(())
    }

    /// A rule's counters (summed over CPUs); slot `MAX_RULES` holds the global ones.
    pub fn counters(&self, slot: u32) -> Result<Counters, ProbeError> {
        let per_cpu = self
            .maps
            .counters
            .get(&slot, 0)
            .map_err(map_err("RL_COUNTERS"))?;
        let mut sum = Counters::default();
        for c in per_cpu.iter() {
            for (s, v) in sum.n.iter_mut().zip(c.n) {
                *s += v;
            }
        }
        Ok(sum)
    }

    /// Every per-source entry (batched reads).
    pub fn sources(&self) -> Result<Vec<(SourceKey, SourceState)>, ProbeError> {
        super::read_hash(&self.maps.sources, "RL_SOURCES", 4096)
    }
}

/// A link without a device behind it (`/sys/class/net/IF/device`): veth, bridge, tun, bond.
fn is_virtual(interface: &str) -> bool {
    !Path::new("/sys/class/net")
        .join(interface)
        .join("device")
        .exists()
}

/// One way to attach on ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Xdp(XdpMode),
    Tc,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Xdp(XdpMode::Driver) => "xdp-native",
            Way::Xdp(_) => "xdp-generic",
            Way::Tc => "tc",
        }
    }
}

fn pinned_link(
    path: &Path,
    fd: FdLink,
    interface: &str,
    mode: &'static str,
    adopted: bool,
) -> (Pinned, IngressLink) {
    (
        Pinned {
            path: path.to_path_buf(),
            _link: fd,
        },
        IngressLink {
            interface: interface.to_string(),
            mode,
            adopted,
        },
    )
}

/// Pins a new link (replacing a stale pin file) and keeps it.
fn pin_new(
    path: &Path,
    fd: FdLink,
    interface: &str,
    mode: &'static str,
) -> Result<(Pinned, IngressLink), ProbeError> {
    let _ = std::fs::remove_file(path);
    let pinned = fd
        .pin(path)
        .map_err(|e| ProbeError::NoAttach(format!("{interface}: pinning the link: {e}")))?;
    Ok(pinned_link(path, pinned.into(), interface, mode, false))
}

fn scaled(l: &agent_common::ratelimit::Limit, f: f64) -> agent_common::ratelimit::Limit {
    if f >= 1.0 || l.rate == 0 {
        return *l;
    }
    let rate = ((l.rate as f64 * f).round() as u64).max(1);
    if l.horizon_ns == 0 {
        // A sliding window: its per-window count scales too.
        let burst = ((l.burst as f64 * f).round() as u64).max(1);
        return agent_common::ratelimit::Limit {
            rate,
            burst,
            horizon_ns: 0,
        };
    }
    agent_common::ratelimit::Limit::new(rate, l.burst)
}

/// A service (unit name or cgroup path) -> its cgroup id under the cgroup2 root: the inode of
/// its directory. A unit is found by name anywhere in the tree (`system.slice/nginx.service`).
pub fn cgroup_id(root: &Path, service: &str) -> Option<u64> {
    if service.starts_with('/') {
        return std::fs::metadata(root.join(service.trim_start_matches('/')))
            .ok()
            .map(|m| m.ino());
    }
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_str() == Some(service) {
                return e.metadata().ok().map(|m| m.ino());
            }
            if depth < 6 {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    None
}

/// Every non-loopback link that is up (the default set of ingress interfaces).
pub fn default_interfaces() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut out: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .filter(|n| {
            std::fs::read_to_string(format!("/sys/class/net/{n}/operstate"))
                .is_ok_and(|s| matches!(s.trim(), "up" | "unknown"))
        })
        .collect();
    out.sort();
    out
}
