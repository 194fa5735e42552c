//! Database and cache probe: queries timed off socket reads and writes (see
//! `agent-ebpf/src/bin/db.rs`).

use agent_common::db::{counters, DbOffsets, DbSettings, DbStat, DbStatKey, DB_HAVE_UNIX};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::BtfTracePoint,
    Btf, Ebpf,
};
use tracing::{info, warn};

use super::btf::{BtfError, KernelBtf};

/// The maps the collector reads and writes: events, counts, the statement keys it has
/// named, and the settings it may change.
pub struct DbMaps {
    pub ring: RingBuf<MapData>,
    pub stats: HashMap<MapData, DbStatKey, DbStat>,
    /// Where the kernel counts when `stats` is full (statement key 0).
    pub stats_other: HashMap<MapData, DbStatKey, DbStat>,
    pub known: HashMap<MapData, u64, u8>,
    pub settings: Array<MapData, DbSettings>,
}

/// The attached database probe and the maps userspace reads.
pub struct DbProbe {
    // Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    counters: PerCpuArray<MapData, u64>,
    maps: Option<DbMaps>,
    // Holds the walkers' slots for as long as the probe lives.
    _walkers: Option<ProgramArray<MapData>>,
    attached: Vec<&'static str>,
    log: Option<super::kernel_log::Logger>,
}

impl std::fmt::Debug for DbProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbProbe")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// (program, tracepoint). Both are needed: a request without its response (or the reverse)
/// times nothing.
/// The protocol walkers, by their index in `DB_WALKERS`: loaded (for the tracepoint prototype
/// they share with the entry programs) and tail-called, never attached.
const WALKERS: [&str; agent_common::db::walker::COUNT as usize] =
    agent_common::db::walker::PROGRAMS;

const PROGRAMS: [(&str, &str); 2] = [
    ("isa_db_recv", "sock_recv_length"),
    ("isa_db_send", "sock_send_length"),
];

impl DbProbe {
    /// Loads and attaches the probe, following the ends in `roles` (`DB_ROLE_*` bits).
    pub fn attach(
        roles: u32,
        kernel_log: crate::config::KernelLog,
    ) -> Result<(Self, Vec<String>), super::ProbeError> {
        let kbtf = KernelBtf::from_sys_fs()?;
        let (mut offsets, problems) = resolve_offsets(&kbtf)?;
        offsets.roles = roles;
        let mut ebpf = super::kernel_log::loader(kernel_log)
            .override_global("DB_OFFSETS", &offsets, true)
            .load(super::DB_OBJECT)
            .map_err(|source| super::ProbeError::Load {
                object: "database",
                source,
            })?;
        let log = super::kernel_log::init(&mut ebpf, "db", kernel_log);
        let mut probe = Self {
            log,
            counters: super::take_map(&mut ebpf, "DB_COUNTERS", PerCpuArray::try_from)?,
            maps: Some(DbMaps {
                ring: super::take_map(&mut ebpf, "DB_EVENTS", RingBuf::try_from)?,
                stats: super::take_map(&mut ebpf, "DB_STATS", HashMap::try_from)?,
                stats_other: super::take_map(&mut ebpf, "DB_STATS_OTHER", HashMap::try_from)?,
                known: super::take_map(&mut ebpf, "DB_KNOWN", HashMap::try_from)?,
                settings: super::take_map(&mut ebpf, "DB_SETTINGS", Array::try_from)?,
            }),
            _ebpf: ebpf,
            _walkers: None,
            attached: Vec::new(),
        };
        let btf = Btf::from_sys_fs()?;
        let mut walkers: ProgramArray<MapData> =
            super::take_map(&mut probe._ebpf, "DB_WALKERS", ProgramArray::try_from)?;
        for (idx, prog) in WALKERS.iter().enumerate() {
            let wrap = |source| super::ProbeError::Program {
                what: (*prog).to_string(),
                source,
            };
            let p: &mut BtfTracePoint = probe
                ._ebpf
                .program_mut(prog)
                .ok_or(super::ProbeError::MissingProgram(prog))?
                .try_into()
                .map_err(wrap)?;
            p.load("sock_send_length", &btf).map_err(wrap)?;
            let fd = p.fd().map_err(wrap)?;
            walkers
                .set(idx as u32, fd, 0)
                .map_err(super::map_err("DB_WALKERS"))?;
        }
        probe._walkers = Some(walkers);
        for (prog, tp) in PROGRAMS {
            let wrap = |source| super::ProbeError::Program {
                what: format!("{prog} ({tp})"),
                source,
            };
            let p: &mut BtfTracePoint = probe
                ._ebpf
                .program_mut(prog)
                .ok_or(super::ProbeError::MissingProgram(prog))?
                .try_into()
                .map_err(wrap)?;
            p.load(tp, &btf).map_err(wrap)?;
            p.attach().map_err(wrap)?;
            probe.attached.push(tp);
        }
        for p in &problems {
            warn!(problem = %p, "database probe degraded");
        }
        info!(tracepoints = ?probe.attached, "database probe attached");
        Ok((probe, problems))
    }

    /// The maps of the collector task (once).
    /// The kernel log, for its reader task (once; `None` when `agent.kernel_log` is off).
    pub fn take_log(&mut self) -> Option<super::kernel_log::Logger> {
        self.log.take()
    }

    pub fn take_maps(&mut self) -> Option<DbMaps> {
        self.maps.take()
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Runs the kernel skipped, per attached program (the walkers are tail-called: a skipped
    /// run of their caller is where their misses show).
    pub fn missed_runs(&self) -> Result<Vec<(&'static str, u64)>, super::ProbeError> {
        let attached = PROGRAMS
            .iter()
            .filter(|(_, tp)| self.attached.contains(tp))
            .map(|(p, _)| *p);
        super::missed_runs(&self._ebpf, attached)
    }

    pub fn read_counters(&self) -> Result<crate::store::db::DbKernelCounters, super::ProbeError> {
        let get = |idx| super::percpu_sum(&self.counters, "DB_COUNTERS", idx);
        Ok(crate::store::db::DbKernelCounters {
            events: get(counters::EVENTS)?,
            drops: get(counters::DROPS)?,
            inflight_full: get(counters::INFLIGHT_FULL)?,
            desync: get(counters::DESYNC)?,
            conns: get(counters::CONNS)?,
            storage_failed: get(counters::STORAGE_FAILED)?,
            tls: get(counters::TLS)?,
            lost_desync: get(counters::LOST_DESYNC)?,
            stats_full: get(counters::STATS_FULL)?,
            bytes_not_decoded: get(counters::BYTES_NOT_DECODED)?,
            step_cap: get(counters::STEP_CAP)?,
            gave_up: get(counters::GAVE_UP)?,
            texts: get(counters::TEXTS)?,
            slow_lost: get(counters::SLOW_LOST)?,
        })
    }
}

/// Socket fields are required; the unix-socket ones only name destinations, so a kernel
/// without them shows unix connections as `unix` without a path.
fn resolve_offsets(btf: &KernelBtf) -> Result<(DbOffsets, Vec<String>), BtfError> {
    let sock = |path: &str| btf.field("sock", path).map(|f| f.offset);
    let mut offsets = DbOffsets {
        flags: 0,
        sk_type: sock("sk_type")?,
        sock: super::sock_offsets(btf)?,
        ..DbOffsets::default()
    };
    let mut problems = Vec::new();
    let unix = (|| -> Result<(u32, u32, u32, u32), BtfError> {
        Ok((
            btf.field("unix_sock", "addr")?.offset,
            btf.field("unix_sock", "peer")?.offset,
            btf.field("unix_address", "name")?.offset,
            btf.field("unix_address", "len")?.offset,
        ))
    })();
    match unix {
        Ok((addr, peer, name, len)) => {
            offsets.unix_addr = addr;
            offsets.unix_peer = peer;
            offsets.unix_address_name = name;
            offsets.unix_address_len = len;
            offsets.flags |= DB_HAVE_UNIX;
        }
        Err(e) => problems.push(format!(
            "unix socket paths unavailable ({e}): unix destinations show without a path"
        )),
    }
    Ok((offsets, problems))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelLog;

    #[test]
    fn offsets_resolve_on_this_kernel() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            return; // no BTF here: nothing to check against
        };
        let (o, problems) = resolve_offsets(&btf).expect("socket fields");
        assert!(problems.is_empty(), "{problems:?}");
        assert_ne!(o.sk_type, 0);
        assert_ne!(o.unix_peer, 0);
        assert!(o.unix_addr < o.unix_peer);
        assert_eq!(o.flags & DB_HAVE_UNIX, DB_HAVE_UNIX);
    }

    /// The verifier accepts both programs on this kernel, with the kernel log off (its sites
    /// removed as dead code) and at its most verbose.
    #[test]
    #[ignore = "needs root (loads eBPF programs): `cargo xtask test` runs it"]
    fn programs_load_and_attach() {
        super::super::require_root();
        for level in [KernelLog::Off, KernelLog::Debug] {
            load_and_attach(level);
        }
    }

    fn load_and_attach(level: KernelLog) {
        match DbProbe::attach(0, level) {
            Ok((mut probe, problems)) => {
                assert!(problems.is_empty(), "{problems:?}");
                assert_eq!(probe.attached().len(), 2);
                assert_eq!(probe.take_log().is_some(), level != KernelLog::Off);
                for p in aya::programs::loaded_programs().flatten() {
                    if p.name_as_str().is_some_and(|n| n.starts_with("isa_db")) {
                        eprintln!(
                            "{:?} verified insns {:?}",
                            p.name_as_str(),
                            p.verified_instruction_count()
                        );
                    }
                }
            }
            Err(e) => panic!("{}", super::super::error_chain(&e)),
        }
    }
}
