//! Network probe: TCP connection lifecycle (see `agent-ebpf/src/bin/net.rs`).

use std::collections::BTreeSet;

use agent_common::net::{
    counters, NetConfig as KernelNetConfig, NetConn, NetEdge, NetEdgeKey, NetOffsets,
    NET_HAVE_SK_CGROUP, PORT_SLOTS,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, Iter},
    Btf, Ebpf,
};
use tracing::{info, warn};

use super::btf::{BtfError, KernelBtf};
use crate::{config::NetConfig, store::net::NetKernelCounters};

/// The kernel's table of tracked connections (`NET_CONNS`): the open connections.
pub struct ConnTable {
    map: HashMap<MapData, u64, NetConn>,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").finish_non_exhaustive()
    }
}

/// Entries read per syscall: 4096 x 112 bytes, well under a megabyte of buffer.
const READ_CHUNK: u32 = 4096;

impl ConnTable {
    /// Every tracked connection, by socket. Batched (a few syscalls for the whole table);
    /// kernels without batch lookups get one lookup per entry.
    pub fn read(&self) -> Result<Vec<(u64, NetConn)>, super::ProbeError> {
        super::read_hash(&self.map, "NET_CONNS", READ_CHUNK)
    }

    /// Stops tracking a socket whose end went unseen (it may be gone already).
    pub fn remove(&mut self, sock: u64) {
        let _ = self.map.remove(&sock);
    }
}

/// What the kernel counted per edge (`NET_EDGES`, and `NET_EDGES_OTHER` past it).
pub struct EdgeTable {
    map: HashMap<MapData, NetEdgeKey, NetEdge>,
    other: Array<MapData, NetEdge>,
}

impl std::fmt::Debug for EdgeTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeTable").finish_non_exhaustive()
    }
}

/// Edges read per syscall: 1024 x 424 bytes of value.
const EDGE_CHUNK: u32 = 1024;

impl EdgeTable {
    /// Every edge, batched; kernels without batch lookups get one lookup per entry.
    pub fn read(&self) -> Result<Vec<(NetEdgeKey, NetEdge)>, super::ProbeError> {
        super::read_hash(&self.map, "NET_EDGES", EDGE_CHUNK)
    }

    /// The `other` edge of a direction ([`agent_common::net::direction`]).
    pub fn other(&self, direction: u8) -> Result<NetEdge, super::ProbeError> {
        self.other
            .get(&u32::from(direction), 0)
            .map_err(|e| super::map_err("NET_EDGES_OTHER")(e))
    }

    /// Forgets an idle edge (a connection that opens on it afterwards starts it afresh).
    pub fn remove(&mut self, key: &NetEdgeKey) {
        let _ = self.map.remove(key);
    }
}

/// The attached network probe and the maps userspace talks to.
pub struct NetProbe {
    // Owns the programs and their links: dropping it detaches everything.
    _ebpf: Ebpf,
    config: Array<MapData, KernelNetConfig>,
    ignore_ports: Array<MapData, u8>,
    counters: PerCpuArray<MapData, u64>,
    tables: Option<(EdgeTable, ConnTable)>,
    kernel_config: KernelNetConfig,
    ignored: BTreeSet<u16>,
    /// (program, tracepoint) of what is attached.
    attached: Vec<(&'static str, &'static str)>,
    /// Whether live connections are sampled by walking the TCP sockets (`walk`); if not, the
    /// receive-path hook does it.
    walker: bool,
    log: Option<super::kernel_log::Logger>,
}

/// The iterator program that samples live connections, and its target.
const WALKER: (&str, &str) = ("isa_net_walk", "tcp");
/// The receive-path hook it replaces (the fallback).
const RECEIVE_HOOK: &str = "isa_net_sample";

fn walker_error(source: aya::programs::ProgramError) -> super::ProbeError {
    super::ProbeError::Program {
        what: format!("{} (iter/{})", WALKER.0, WALKER.1),
        source,
    }
}

/// The walker program of the loaded object.
fn walker_program(ebpf: &mut Ebpf) -> Result<&mut Iter, super::ProbeError> {
    ebpf.program_mut(WALKER.0)
        .ok_or(super::ProbeError::MissingProgram(WALKER.0))?
        .try_into()
        .map_err(walker_error)
}

impl std::fmt::Debug for NetProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetProbe")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// (program, tracepoint, required). Without the state tracepoint there is nothing to report;
/// the others only enrich it, so a kernel without them degrades the probe instead.
const PROGRAMS: [(&str, &str, bool); 6] = [
    // Without the backstop a missed state change leaves a connection open: degraded, counted.
    ("isa_net_destroy", "tcp_destroy_sock", false),
    ("isa_net_retransmit", "tcp_retransmit_skb", false),
    ("isa_net_sample", "tcp_rcv_space_adjust", false),
    ("isa_net_reset_sent", "tcp_send_reset", false),
    ("isa_net_reset_received", "tcp_receive_reset", false),
    // Last: connections start being tracked once everything that reads them is live.
    ("isa_net_state", "inet_sock_set_state", true),
];

impl NetProbe {
    /// Resolves the kernel struct offsets, loads the object, configures it and attaches the
    /// tracepoints. Returns the probe and any non-fatal problems.
    pub fn attach(
        cfg: &NetConfig,
        kernel_log: crate::config::KernelLog,
    ) -> Result<(Self, Vec<String>), super::ProbeError> {
        let kbtf = KernelBtf::from_sys_fs()?;
        let (offsets, mut problems) = resolve_offsets(&kbtf)?;
        // Offsets go in as a read-only global: the verifier then knows them, and every field
        // read in the programs is a checked, inlined load.
        let mut ebpf = super::kernel_log::loader(kernel_log)
            .override_global("NET_OFFSETS", &offsets, true)
            .map_max_entries("NET_EDGES", kernel_edges(cfg.max_edges))
            .load(super::NET_OBJECT)
            .map_err(|source| super::ProbeError::Load {
                object: "network",
                source,
            })?;
        let log = super::kernel_log::init(&mut ebpf, "net", kernel_log);
        let mut probe = Self {
            log,
            config: super::take_map(&mut ebpf, "NET_CONFIG", Array::try_from)?,
            ignore_ports: super::take_map(&mut ebpf, "NET_IGNORE_PORTS", Array::try_from)?,
            counters: super::take_map(&mut ebpf, "NET_COUNTERS", PerCpuArray::try_from)?,
            tables: Some((
                EdgeTable {
                    map: super::take_map(&mut ebpf, "NET_EDGES", HashMap::try_from)?,
                    other: super::take_map(&mut ebpf, "NET_EDGES_OTHER", Array::try_from)?,
                },
                ConnTable {
                    map: super::take_map(&mut ebpf, "NET_CONNS", HashMap::try_from)?,
                },
            )),
            _ebpf: ebpf,
            kernel_config: KernelNetConfig::default(),
            ignored: BTreeSet::new(),
            attached: Vec::new(),
            walker: false,
        };
        probe.apply_config(cfg)?;

        let btf = Btf::from_sys_fs()?;
        // Live connections are sampled by a walk over the TCP sockets once per interval where
        // the kernel has the iterator (5.9+), so the receive path pays nothing.
        let walker = walker_program(&mut probe._ebpf)
            .and_then(|p| p.load(WALKER.1, &btf).map_err(walker_error));
        match walker {
            Ok(()) => {
                probe.walker = true;
                probe.attached.push((WALKER.0, "iter/tcp"));
            }
            Err(e) => {
                let why = super::error_chain(&e);
                warn!(error = %why, "network probe: no TCP socket iterator; sampling on the receive path");
                problems.push(format!(
                    "iter/tcp not loaded (sampling on every receive): {why}"
                ));
            }
        }
        for (prog, tp, required) in PROGRAMS {
            if prog == RECEIVE_HOOK && probe.walker {
                continue;
            }
            let res = (|| -> Result<(), super::ProbeError> {
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
                Ok(())
            })();
            match res {
                Ok(()) => probe.attached.push((prog, tp)),
                Err(e) if !required => {
                    let why = super::error_chain(&e);
                    warn!(tracepoint = tp, error = %why, "network probe: optional hook not attached");
                    problems.push(format!("{tp} not attached: {why}"));
                }
                Err(e) => return Err(e),
            }
        }
        info!(tracepoints = ?probe.attached(), "network probe attached");
        Ok((probe, problems))
    }

    /// Whether live connections are sampled by `walk` (else by the receive-path hook).
    pub fn has_walker(&self) -> bool {
        self.walker
    }

    /// Samples every tracked live connection: runs the iterator over the kernel's TCP sockets,
    /// which adds what each did since to its edge and stamps it with walk number `gen`. Takes
    /// a few hundred ns per socket on the host, in the agent's own time.
    pub fn walk(&mut self, gen: u64) -> Result<(), super::ProbeError> {
        use std::io::Read as _;
        self.kernel_config.walk_gen = gen;
        self.config
            .set(0, self.kernel_config, 0)
            .map_err(super::map_err("NET_CONFIG"))?;
        let p = walker_program(&mut self._ebpf)?;
        let id = p.attach().map_err(walker_error)?;
        let link = p.take_link(id).map_err(walker_error)?;
        let mut file = link.into_file().map_err(super::ProbeError::Walk)?;
        // The program writes nothing to the sequence file: reading it to the end runs it.
        let mut sink = Vec::new();
        file.read_to_end(&mut sink)
            .map_err(super::ProbeError::WalkRead)?;
        Ok(())
    }

    /// Pushes the sample interval and the ignored ports into the kernel.
    pub fn apply_config(&mut self, cfg: &NetConfig) -> Result<(), super::ProbeError> {
        let wanted: BTreeSet<u16> = cfg.ignore_ports.iter().copied().collect();
        for &port in self.ignored.difference(&wanted) {
            self.ignore_ports
                .set(u32::from(port), 0, 0)
                .map_err(super::map_err("NET_IGNORE_PORTS"))?;
        }
        for &port in wanted.difference(&self.ignored) {
            if u32::from(port) < PORT_SLOTS {
                self.ignore_ports
                    .set(u32::from(port), 1, 0)
                    .map_err(super::map_err("NET_IGNORE_PORTS"))?;
            }
        }
        self.ignored = wanted;
        self.kernel_config.sample_interval_ns =
            u64::try_from(cfg.sample_interval.as_nanos()).unwrap_or(u64::MAX);
        self.config
            .set(0, self.kernel_config, 0)
            .map_err(super::map_err("NET_CONFIG"))?;
        Ok(())
    }

    /// The kernel's edge and connection tables, for the collector (once).
    /// The kernel log, for its reader task (once; `None` when `agent.kernel_log` is off).
    pub fn take_log(&mut self) -> Option<super::kernel_log::Logger> {
        self.log.take()
    }

    pub fn take_tables(&mut self) -> Option<(EdgeTable, ConnTable)> {
        self.tables.take()
    }

    /// The tracepoints that are attached (for `status`).
    pub fn attached(&self) -> Vec<&'static str> {
        self.attached.iter().map(|(_, tp)| *tp).collect()
    }

    /// Runs the kernel skipped, per attached program.
    pub fn missed_runs(&self) -> Result<Vec<(&'static str, u64)>, super::ProbeError> {
        super::missed_runs(&self._ebpf, self.attached.iter().map(|(p, _)| *p))
    }

    pub fn read_counters(&self) -> Result<NetKernelCounters, super::ProbeError> {
        let get = |idx| super::percpu_sum(&self.counters, "NET_COUNTERS", idx);
        Ok(NetKernelCounters {
            edges_full: get(counters::EDGES_FULL)?,
            reused: get(counters::REUSED)?,
            retransmits: get(counters::RETRANSMITS)?,
            resets_sent: get(counters::RESETS_SENT)?,
            resets_received: get(counters::RESETS_RECEIVED)?,
            track_failed: get(counters::TRACK_FAILED)?,
            ended_at_destroy: get(counters::ENDED_AT_DESTROY)?,
        })
    }
}

/// Offsets of the fields the programs read, from the running kernel's BTF. The socket's
/// cgroup is optional (kernels without CONFIG_SOCK_CGROUP_DATA attribute outbound connections
/// by the connecting task's cgroup only); everything else is required.
/// The kernel's edge table holds twice the edges userspace keeps: kernel edges are finer
/// (per cgroup and command; per peer) than the services they are named after, and idle ones
/// leave only after a while.
pub fn kernel_edges(max_edges: usize) -> u32 {
    u32::try_from(max_edges.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(1024, 1 << 17)
}

fn resolve_offsets(btf: &KernelBtf) -> Result<(NetOffsets, Vec<String>), BtfError> {
    let sock = |path: &str| btf.field("sock", path).map(|f| f.offset);
    let tcp = |path: &str| btf.field("tcp_sock", path).map(|f| f.offset);
    let offsets = NetOffsets {
        flags: 0,
        sk_err: sock("sk_err")?,
        sock: super::sock_offsets(btf)?,
        tp_srtt_us: tcp("srtt_us")?,
        tp_bytes_acked: tcp("bytes_acked")?,
        tp_bytes_received: tcp("bytes_received")?,
        tp_total_retrans: tcp("total_retrans")?,
        sk_cgroup: 0,
        cgroup_kn: 0,
        kn_id: 0,
        sk_socket: sock("sk_socket")?,
        skc_state: sock("__sk_common.skc_state")?,
    };
    let mut offsets = offsets;
    let mut problems = Vec::new();
    let cgroup = (|| -> Result<(u32, u32, u32), BtfError> {
        Ok((
            sock("sk_cgrp_data.cgroup")?,
            btf.field("cgroup", "kn")?.offset,
            btf.field("kernfs_node", "id")?.offset,
        ))
    })();
    match cgroup {
        Ok((sk_cgroup, cgroup_kn, kn_id)) => {
            offsets.sk_cgroup = sk_cgroup;
            offsets.cgroup_kn = cgroup_kn;
            offsets.kn_id = kn_id;
            offsets.flags |= NET_HAVE_SK_CGROUP;
        }
        Err(e) => problems.push(format!(
            "socket cgroups unavailable ({e}): inbound connections are not attributed to a service"
        )),
    }
    Ok((offsets, problems))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelLog;

    /// The verifier accepts every program on this kernel, the walker included, and every
    /// hook attaches.
    #[test]
    #[ignore = "needs root (loads eBPF programs): `cargo xtask test` runs it"]
    fn programs_load_and_attach() {
        super::super::require_root();
        // With the kernel log off (its sites removed as dead code) and at its most verbose.
        for level in [KernelLog::Off, KernelLog::Debug] {
            load_and_attach(level);
        }
    }

    fn load_and_attach(level: KernelLog) {
        match NetProbe::attach(&NetConfig::default(), level) {
            Ok((mut probe, problems)) => {
                assert!(problems.is_empty(), "{problems:?}");
                assert_eq!(probe.take_log().is_some(), level != KernelLog::Off);
                assert!(probe.has_walker());
                assert!(
                    probe.attached().contains(&"iter/tcp"),
                    "{:?}",
                    probe.attached()
                );
            }
            Err(e) => panic!("{}", super::super::error_chain(&e)),
        }
    }
}
