//! Syscall latency probe: attach, configure, read.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use agent_common::{
    counters,
    syscalls::{
        SyscallConfig, SyscallStats, FILTER_CGROUP, FILTER_COMM, FILTER_PID, FILTER_SYSCALL,
        MAX_SYSCALLS, SEEN_WORDS,
    },
    TASK_COMM_LEN,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        raw_trace_point::RawTracePointLink, tp_btf::BtfTracePointLink, BtfTracePoint, ProgramError,
        RawTracePoint,
    },
    Btf, Ebpf,
};
use tracing::{info, warn};

use crate::{
    config::{AttachMode, SyscallMode, SyscallsConfig},
    store::{
        histogram::Log2Histogram,
        syscalls::{SyscallCounters, SyscallTotals},
    },
    syscall_names,
};

/// One attached hook; dropping it detaches it.
enum Hook {
    // Held for their Drop, which detaches.
    Btf(#[allow(dead_code)] BtfTracePointLink),
    Raw(#[allow(dead_code)] RawTracePointLink),
}

/// The attached syscall probe and the maps userspace talks to.
pub struct SyscallProbe {
    // Owns the programs; `hooks` owns their links.
    ebpf: Ebpf,
    mode: AttachMode,
    /// Attached links, in attach order (sched_switch, sys_exit, sys_enter); empty while a
    /// sampling window is closed.
    hooks: Vec<Hook>,
    attached_since: Option<Instant>,
    /// Attached time of the windows that have closed.
    observed: Duration,
    sampling: SyscallMode,
    /// Last configuration written to the kernel (its window start is rewritten on attach).
    kcfg: SyscallConfig,
    stats: PerCpuArray<MapData, SyscallStats>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, SyscallConfig>,
    filter_pids: HashMap<MapData, u32, u8>,
    filter_comms: HashMap<MapData, [u8; TASK_COMM_LEN], u8>,
    filter_cgroups: HashMap<MapData, u64, u8>,
    filter_nrs: Array<MapData, u8>,
    ring: Option<RingBuf<MapData>>,
    log: Option<super::kernel_log::Logger>,
    seen_bitmap: Array<MapData, [u64; SEEN_WORDS]>,
    /// Syscalls with a non-zero count so far, and reads done (see `read`).
    seen: BTreeSet<u32>,
    reads: u64,
}

const FULL_SWEEP_EVERY: u64 = 40;

impl std::fmt::Debug for SyscallProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyscallProbe")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl SyscallProbe {
    /// Loads the object and attaches sys_enter/sys_exit with the configured method (`auto`:
    /// tp_btf, then raw tracepoints). Returns the probe and any non-fatal problems.
    pub fn attach(
        cfg: &SyscallsConfig,
        kernel_log: crate::config::KernelLog,
    ) -> Result<(Self, Vec<String>), super::ProbeError> {
        // SYSCALL_START is task-local storage, a map type aya has no wrapper for: the kernel
        // creates it all the same, and userspace never touches it.
        let mut ebpf = super::kernel_log::loader(kernel_log)
            .allow_unsupported_maps()
            .load(super::SYSCALLS_OBJECT)
            .map_err(|source| super::ProbeError::Load {
                object: "syscall",
                source,
            })?;
        let log = super::kernel_log::init(&mut ebpf, "syscalls", kernel_log);
        let mut probe = Self {
            log,
            stats: super::take_map(&mut ebpf, "SYSCALL_STATS", PerCpuArray::try_from)?,
            counters: super::take_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?,
            config: super::take_map(&mut ebpf, "SYSCALL_CONFIG", Array::try_from)?,
            filter_pids: super::take_map(&mut ebpf, "SYSCALL_FILTER_PIDS", HashMap::try_from)?,
            filter_comms: super::take_map(&mut ebpf, "SYSCALL_FILTER_COMMS", HashMap::try_from)?,
            filter_cgroups: super::take_map(
                &mut ebpf,
                "SYSCALL_FILTER_CGROUPS",
                HashMap::try_from,
            )?,
            filter_nrs: super::take_map(&mut ebpf, "SYSCALL_FILTER_NRS", Array::try_from)?,
            ring: Some(super::take_map(
                &mut ebpf,
                "SYSCALL_SLOW_EVENTS",
                RingBuf::try_from,
            )?),
            seen_bitmap: super::take_map(&mut ebpf, "SYSCALL_SEEN", Array::try_from)?,
            ebpf,
            mode: cfg.attach,
            hooks: Vec::new(),
            attached_since: None,
            observed: Duration::ZERO,
            sampling: cfg.mode,
            kcfg: SyscallConfig::default(),
            seen: BTreeSet::new(),
            reads: 0,
        };
        // Filters before attaching: from its first event the probe sees only what was asked
        // for (including none of our own start-up map writes).
        let mut problems = probe.apply_config(cfg)?;

        let order: &[AttachMode] = match cfg.attach {
            AttachMode::Auto => &[AttachMode::TpBtf, AttachMode::RawTracepoint],
            AttachMode::TpBtf => &[AttachMode::TpBtf],
            AttachMode::RawTracepoint => &[AttachMode::RawTracepoint],
        };
        let mut errors = Vec::new();
        let mut mode = None;
        probe.set_window_start()?;
        for &m in order {
            match attach_set(&mut probe.ebpf, m) {
                Ok(hooks) => {
                    probe.hooks = hooks;
                    probe.attached_since = Some(Instant::now());
                    mode = Some(m);
                    break;
                }
                Err(e) => {
                    warn!(method = %m, error = %e, "syscall probe: attach method failed");
                    errors.push(format!("{m}: {e}"));
                }
            }
        }
        let Some(mode) = mode else {
            return Err(super::ProbeError::NoAttach(errors.join("; ")));
        };
        info!(method = %mode, "syscall probe attached");
        probe.mode = mode;
        // A fallback (tp_btf -> raw) still works, but say why the first choice did not.
        errors.append(&mut problems);
        Ok((probe, errors))
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// Whether the hooks are attached now (always in full mode; in sampled mode, during a
    /// window).
    pub fn attached(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// Attaches or detaches the hooks (a sampling window opens or closes). Programs stay
    /// loaded, so this is a few bpf() calls, not a verification.
    pub fn set_attached(&mut self, on: bool) -> Result<(), super::ProbeError> {
        if on == self.attached() {
            return Ok(());
        }
        if on {
            // Starts recorded before this instant belong to an earlier window whose exits
            // were missed: the kernel must not time them against now.
            self.set_window_start()?;
            self.hooks =
                link_set(&mut self.ebpf, self.mode).map_err(super::ProbeError::NoAttach)?;
            self.attached_since = Some(Instant::now());
        } else {
            // sys_enter first, so no start is recorded that its exit hook cannot see.
            while let Some(hook) = self.hooks.pop() {
                drop(hook);
            }
            if let Some(since) = self.attached_since.take() {
                self.observed += since.elapsed();
            }
        }
        Ok(())
    }

    /// The configured mode (`sampled` or `full`); the sampler task applies it.
    pub fn sampling(&self) -> SyscallMode {
        self.sampling
    }

    /// Time the hooks have been attached since the probe was loaded.
    pub fn observed(&self) -> Duration {
        self.observed + self.attached_since.map_or(Duration::ZERO, |t| t.elapsed())
    }

    fn set_window_start(&mut self) -> Result<(), super::ProbeError> {
        self.kcfg.window_start_ns = monotonic_ns();
        self.config
            .set(0, self.kcfg, 0)
            .map_err(super::map_err("SYSCALL_CONFIG"))?;
        Ok(())
    }

    /// Runs the kernel skipped, per attached program.
    pub fn missed_runs(&self) -> Result<Vec<(&'static str, u64)>, super::ProbeError> {
        let names = programs(self.mode).map(|(p, _)| p);
        super::missed_runs(&self.ebpf, names)
    }

    /// The ring buffer of slow-call events, for the reader task (once).
    /// The kernel log, for its reader task (once; `None` when `agent.kernel_log` is off).
    pub fn take_log(&mut self) -> Option<super::kernel_log::Logger> {
        self.log.take()
    }

    pub fn take_ring(&mut self) -> Option<RingBuf<MapData>> {
        self.ring.take()
    }

    /// Pushes threshold and filters into the kernel. Returns non-fatal problems (e.g. a
    /// configured cgroup that does not exist: nothing in it can be traced until it does).
    pub fn apply_config(&mut self, cfg: &SyscallsConfig) -> Result<Vec<String>, super::ProbeError> {
        self.sampling = cfg.mode;
        let mut problems = Vec::new();
        let mut flags = 0u32;

        replace_keys(&mut self.filter_pids, &cfg.pids, "SYSCALL_FILTER_PIDS")?;
        if !cfg.pids.is_empty() {
            flags |= FILTER_PID;
        }

        let comms: Vec<[u8; TASK_COMM_LEN]> = cfg.comms.iter().map(|c| comm_key(c)).collect();
        replace_keys(&mut self.filter_comms, &comms, "SYSCALL_FILTER_COMMS")?;
        if !comms.is_empty() {
            flags |= FILTER_COMM;
        }

        let mut cgroup_ids = Vec::new();
        if !cfg.cgroups.is_empty() {
            flags |= FILTER_CGROUP;
            let root = crate::names::cgroup2_root();
            for path in &cfg.cgroups {
                match cgroup_id(root.as_deref(), path) {
                    Ok(id) => cgroup_ids.push(id),
                    Err(e) => {
                        warn!(cgroup = ?path, error = %e, "syscalls.cgroups entry not traced");
                        problems.push(format!("syscalls.cgroups {}: {e}", path.display()));
                    }
                }
            }
        }
        replace_keys(
            &mut self.filter_cgroups,
            &cgroup_ids,
            "SYSCALL_FILTER_CGROUPS",
        )?;

        let mut wanted = vec![0u8; MAX_SYSCALLS as usize];
        if !cfg.syscalls.is_empty() {
            flags |= FILTER_SYSCALL;
            for name in &cfg.syscalls {
                if let Some(nr) = syscall_names::number(name) {
                    if let Some(w) = wanted.get_mut(nr as usize) {
                        *w = 1;
                    }
                }
            }
        }
        for (nr, w) in wanted.iter().enumerate() {
            self.filter_nrs
                .set(nr as u32, w, 0)
                .map_err(super::map_err("SYSCALL_FILTER_NRS"))?;
        }

        // Flags last: the filter maps are complete before the kernel starts consulting them.
        self.kcfg = SyscallConfig {
            slow_threshold_ns: u64::try_from(cfg.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
            filter_flags: flags,
            _reserved: 0,
            window_start_ns: self.kcfg.window_start_ns,
        };
        self.config
            .set(0, self.kcfg, 0)
            .map_err(super::map_err("SYSCALL_CONFIG"))?;
        Ok(problems)
    }

    /// Cumulative per-syscall counters (summed over CPUs) and the kernel's self-counters.
    ///
    /// Each slot costs one bpf() call, so only the syscalls the kernel marked in
    /// `SYSCALL_SEEN` are read; every `FULL_SWEEP_EVERY` reads all slots are swept, in case a
    /// racing bit was lost (see the kernel side). Counts are cumulative, so a late slot loses
    /// nothing.
    pub fn read(&mut self) -> Result<SyscallTotals, super::ProbeError> {
        let sweep = self.reads.is_multiple_of(FULL_SWEEP_EVERY);
        self.reads += 1;
        if let Ok(words) = self.seen_bitmap.get(&0, 0) {
            for (w, word) in words.iter().enumerate() {
                for bit in 0..64u32 {
                    if word & (1u64 << bit) != 0 {
                        self.seen.insert(w as u32 * 64 + bit);
                    }
                }
            }
        }
        let slots: Vec<u32> = if sweep {
            (0..MAX_SYSCALLS).collect()
        } else {
            self.seen.iter().copied().collect()
        };
        let mut by_nr = BTreeMap::new();
        for nr in slots {
            let per_cpu = self
                .stats
                .get(&nr, 0)
                .map_err(super::map_err("SYSCALL_STATS"))?;
            let mut c = SyscallCounters::default();
            for s in per_cpu.iter() {
                add_stats(&mut c, s);
            }
            if c.latency.count > 0 {
                by_nr.insert(nr, c);
                self.seen.insert(nr);
            }
        }
        let counter = |idx: u32| -> Result<u64, super::ProbeError> {
            let v = self
                .counters
                .get(&idx, 0)
                .map_err(super::map_err("COUNTERS"))?;
            Ok(v.iter().sum())
        };
        Ok(SyscallTotals {
            by_nr,
            slow_events: counter(counters::SLOW_EVENTS)?,
            slow_drops: counter(counters::SLOW_DROPS)?,
            start_drops: counter(counters::START_DROPS)?,
            observed_ns: u64::try_from(self.observed().as_nanos()).unwrap_or(u64::MAX),
            mode: Some(self.sampling),
            attached: self.attached(),
        })
    }
}

fn add_stats(c: &mut SyscallCounters, s: &SyscallStats) {
    let h: &mut Log2Histogram = &mut c.latency;
    h.count += s.count;
    h.sum_ns = h.sum_ns.saturating_add(s.total_ns);
    for (a, b) in h.buckets.iter_mut().zip(s.buckets.iter()) {
        *a += b;
    }
    c.errors += s.errors;
}

/// (program, tracepoint) of one attach method, in attach order.
fn programs(mode: AttachMode) -> [(&'static str, &'static str); 3] {
    match mode {
        AttachMode::TpBtf => [
            ("isa_btf_switch", "sched_switch"),
            ("isa_btf_exit", "sys_exit"),
            ("isa_btf_enter", "sys_enter"),
        ],
        _ => [
            ("isa_raw_switch", "sched_switch"),
            ("isa_raw_exit", "sys_exit"),
            ("isa_raw_enter", "sys_enter"),
        ],
    }
}

/// `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Attaches the loaded programs of `mode`: sched_switch, sys_exit and sys_enter, in that order
/// (a start recorded before its consumers are live would be stranded), or none of them.
fn link_set(ebpf: &mut Ebpf, mode: AttachMode) -> Result<Vec<Hook>, String> {
    let mut hooks = Vec::with_capacity(3);
    for (prog, tp) in programs(mode) {
        let wrap = |source| super::ProbeError::Program {
            what: format!("{prog} ({tp})"),
            source,
        };
        let hook = (|| -> Result<Hook, super::ProbeError> {
            let p = ebpf
                .program_mut(prog)
                .ok_or_else(|| super::ProbeError::NoAttach(format!("program {prog} missing")))?;
            Ok(match mode {
                AttachMode::TpBtf => {
                    let p: &mut BtfTracePoint = p.try_into().map_err(wrap)?;
                    let id = p.attach().map_err(wrap)?;
                    Hook::Btf(p.take_link(id).map_err(wrap)?)
                }
                _ => {
                    let p: &mut RawTracePoint = p.try_into().map_err(wrap)?;
                    let id = p.attach(tp).map_err(wrap)?;
                    Hook::Raw(p.take_link(id).map_err(wrap)?)
                }
            })
        })();
        match hook {
            Ok(h) => hooks.push(h),
            Err(e) => {
                // Detach what did attach, last first.
                while let Some(h) = hooks.pop() {
                    drop(h);
                }
                return Err(super::error_chain(&e));
            }
        }
    }
    Ok(hooks)
}

/// Loads and attaches sched_switch, sys_exit and sys_enter with one method, or nothing.
fn attach_set(ebpf: &mut Ebpf, mode: AttachMode) -> Result<Vec<Hook>, String> {
    let progs = programs(mode);
    let result = (|| -> Result<Vec<Hook>, super::ProbeError> {
        let btf = if mode == AttachMode::TpBtf {
            Some(
                Btf::from_sys_fs()
                    .map_err(|e| super::ProbeError::NoAttach(format!("kernel BTF: {e}")))?,
            )
        } else {
            None
        };
        for (prog, tp) in progs {
            let wrap = |source| super::ProbeError::Program {
                what: format!("{prog} ({tp})"),
                source,
            };
            let p = ebpf
                .program_mut(prog)
                .ok_or_else(|| super::ProbeError::NoAttach(format!("program {prog} missing")))?;
            match &btf {
                Some(btf) => {
                    let p: &mut BtfTracePoint = p.try_into().map_err(wrap)?;
                    p.load(tp, btf).map_err(wrap)?;
                }
                None => {
                    let p: &mut RawTracePoint = p.try_into().map_err(wrap)?;
                    p.load().map_err(wrap)?;
                }
            }
        }
        link_set(ebpf, mode).map_err(super::ProbeError::NoAttach)
    })();
    let e = match result {
        Ok(hooks) => return Ok(hooks),
        Err(e) => e,
    };
    // Leave nothing half-attached behind before trying the next method.
    for (prog, _) in progs {
        let Some(p) = ebpf.program_mut(prog) else {
            continue;
        };
        let unloaded = match mode {
            AttachMode::TpBtf => <&mut BtfTracePoint>::try_from(p).map(|p| p.unload()),
            _ => <&mut RawTracePoint>::try_from(p).map(|p| p.unload()),
        };
        match unloaded {
            Ok(Err(ProgramError::NotLoaded)) | Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) => {
                warn!(program = prog, error = %crate::probes::error_chain(&e), "unloading after a failed attach")
            }
        }
    }
    Err(super::error_chain(&e))
}

fn replace_keys<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u8>,
    wanted: &[K],
    name: &'static str,
) -> Result<(), super::ProbeError> {
    let existing: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in existing {
        if !wanted.contains(&k) {
            map.remove(&k).map_err(super::map_err(name))?;
        }
    }
    for k in wanted {
        map.insert(k, 1, 0).map_err(super::map_err(name))?;
    }
    Ok(())
}

fn comm_key(comm: &str) -> [u8; TASK_COMM_LEN] {
    let mut key = [0u8; TASK_COMM_LEN];
    let bytes = comm.as_bytes();
    let n = bytes.len().min(TASK_COMM_LEN - 1);
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

/// The cgroup v2 id of `path` (relative to the cgroup2 root): the inode number of its
/// directory, which is what bpf_get_current_cgroup_id() returns.
fn cgroup_id(root: Option<&std::path::Path>, path: &std::path::Path) -> Result<u64, String> {
    let root = root.ok_or("no cgroup2 hierarchy is mounted")?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let dir = root.join(rel);
    std::fs::metadata(&dir)
        .map(|m| m.ino())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_keys_are_nul_padded_and_truncated() {
        let k = comm_key("postgres");
        assert_eq!(&k[..8], b"postgres");
        assert!(k[8..].iter().all(|&b| b == 0));
        let long = comm_key("abcdefghijklmnopqrst");
        assert_eq!(&long[..15], b"abcdefghijklmno");
        assert_eq!(long[15], 0);
        assert_eq!(crate::names::comm_str(&k), "postgres");
    }

    /// The verifier accepts the three programs on this kernel, with the kernel log off (its
    /// site removed as dead code) and at its most verbose, and the hooks attach.
    #[test]
    #[ignore = "needs root (loads eBPF programs): `cargo xtask test` runs it"]
    fn programs_load_and_attach() {
        super::super::require_root();
        for level in [
            crate::config::KernelLog::Off,
            crate::config::KernelLog::Debug,
        ] {
            let cfg = SyscallsConfig {
                mode: crate::config::SyscallMode::Full,
                ..SyscallsConfig::default()
            };
            match SyscallProbe::attach(&cfg, level) {
                Ok((mut probe, problems)) => {
                    assert!(problems.is_empty(), "{problems:?}");
                    assert!(probe.attached());
                    assert_eq!(
                        probe.take_log().is_some(),
                        level != crate::config::KernelLog::Off
                    );
                }
                Err(e) => panic!("{}", super::super::error_chain(&e)),
            }
        }
    }
}
