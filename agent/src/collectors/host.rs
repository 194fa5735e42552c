//! Host signals from procfs: CPU, memory, load, PSI, disks, network devices, TCP counters.

use procfs::{Current as _, CurrentSI as _};

use crate::store::{DiskReading, HostSample, NetDevReading, PressureReading, TcpHostReading};

/// Sectors in /proc/diskstats are always 512 bytes, whatever the device's block size.
const SECTOR_BYTES: u64 = 512;

#[derive(Debug, Default)]
pub struct HostCollector {
    /// PSI missing (kernel without CONFIG_PSI or psi=0): stop asking after the first try.
    psi_missing: bool,
}

impl HostCollector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn sample(&mut self) -> Result<HostSample, procfs::ProcError> {
        let mut s = HostSample::default();

        let stat = procfs::KernelStats::current()?;
        let tps = procfs::ticks_per_second() as f64;
        let t = &stat.total;
        let secs = |v: u64| v as f64 / tps;
        s.cpus = stat.cpu_time.len();
        s.cpu_seconds.insert("user", secs(t.user));
        s.cpu_seconds.insert("nice", secs(t.nice));
        s.cpu_seconds.insert("system", secs(t.system));
        s.cpu_seconds.insert("idle", secs(t.idle));
        for (mode, v) in [
            ("iowait", t.iowait),
            ("irq", t.irq),
            ("softirq", t.softirq),
            ("steal", t.steal),
        ] {
            if let Some(v) = v {
                s.cpu_seconds.insert(mode, secs(v));
            }
        }

        let mem = procfs::Meminfo::current()?;
        s.memory_total_bytes = mem.mem_total;
        s.memory_free_bytes = mem.mem_free;
        s.memory_available_bytes = mem.mem_available.unwrap_or(mem.mem_free);
        s.memory_cached_bytes = mem.cached;
        s.swap_total_bytes = mem.swap_total;
        s.swap_free_bytes = mem.swap_free;

        let load = procfs::LoadAverage::current()?;
        s.load1 = f64::from(load.one);
        s.load5 = f64::from(load.five);
        s.load15 = f64::from(load.fifteen);

        if !self.psi_missing {
            match read_psi() {
                Ok(p) => s.pressure = p,
                Err(_) => self.psi_missing = true,
            }
        }

        s.disks = procfs::diskstats()?
            .into_iter()
            .filter(|d| is_real_disk(&d.name))
            .map(|d| DiskReading {
                device: d.name,
                reads_completed: d.reads,
                writes_completed: d.writes,
                read_bytes: d.sectors_read * SECTOR_BYTES,
                written_bytes: d.sectors_written * SECTOR_BYTES,
                io_seconds: d.time_in_progress as f64 / 1000.0,
            })
            .collect();

        let mut devs: Vec<NetDevReading> = procfs::net::dev_status()?
            .into_values()
            .map(|d| NetDevReading {
                device: d.name,
                rx_bytes: d.recv_bytes,
                tx_bytes: d.sent_bytes,
                rx_packets: d.recv_packets,
                tx_packets: d.sent_packets,
                rx_errors: d.recv_errs,
                tx_errors: d.sent_errs,
                rx_dropped: d.recv_drop,
                tx_dropped: d.sent_drop,
            })
            .collect();
        devs.sort_by(|a, b| a.device.cmp(&b.device));
        s.net_devices = devs;
        s.tcp = read_tcp().ok();
        Ok(s)
    }
}

fn read_tcp() -> Result<TcpHostReading, procfs::ProcError> {
    let snmp = procfs::net::snmp()?;
    let mut t = TcpHostReading {
        established: snmp.tcp_curr_estab,
        active_opens: snmp.tcp_active_opens,
        passive_opens: snmp.tcp_passive_opens,
        attempt_fails: snmp.tcp_attempt_fails,
        retrans_segs: snmp.tcp_retrans_segs,
        out_rsts: snmp.tcp_out_rsts,
        ..Default::default()
    };
    // procfs has no reader for the TcpExt counters: header and value lines alternate.
    let netstat = std::fs::read_to_string("/proc/net/netstat")?;
    let ext = tcp_ext(&netstat);
    t.listen_overflows = ext("ListenOverflows").unwrap_or(0);
    t.listen_drops = ext("ListenDrops").unwrap_or(0);
    Ok(t)
}

/// A lookup of `TcpExt:` counters by name in /proc/net/netstat text.
fn tcp_ext(text: &str) -> impl Fn(&str) -> Option<u64> + '_ {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next().unwrap_or_default();
    let values = lines.next().unwrap_or_default();
    move |want| {
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .find(|(n, _)| *n == want)
            .and_then(|(_, v)| v.parse().ok())
    }
}

fn read_psi() -> Result<Vec<PressureReading>, procfs::ProcError> {
    let rec = |resource, kind, r: &procfs::PressureRecord| PressureReading {
        resource,
        kind,
        stall_seconds_total: r.total as f64 / 1e6,
        avg10: f64::from(r.avg10),
    };
    let cpu = procfs::CpuPressure::current()?;
    let mem = procfs::MemoryPressure::current()?;
    let io = procfs::IoPressure::current()?;
    Ok(vec![
        rec("cpu", "some", &cpu.some),
        rec("memory", "some", &mem.some),
        rec("memory", "full", &mem.full),
        rec("io", "some", &io.some),
        rec("io", "full", &io.full),
    ])
}

/// Whole disks only: partitions would double count, loop/ram devices are noise.
#[cfg(test)]
#[test]
fn tcp_ext_parses_header_value_pairs() {
    let text =
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: A\nIpExt: 1\n";
    let ext = tcp_ext(text);
    assert_eq!(ext("ListenOverflows"), Some(7));
    assert_eq!(ext("ListenDrops"), Some(9));
    assert_eq!(ext("Nope"), None);
    assert_eq!(tcp_ext("")("ListenDrops"), None);
}

fn is_real_disk(name: &str) -> bool {
    if name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram") {
        return false;
    }
    let sys = std::path::Path::new("/sys/block").join(name);
    sys.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let s = HostCollector::new().sample().unwrap();
        assert!(s.cpus >= 1);
        assert!(s.memory_total_bytes > 0);
        assert!(s.memory_available_bytes <= s.memory_total_bytes);
        assert!(s.cpu_seconds["idle"] > 0.0);
        assert!(s.net_devices.iter().any(|d| d.device == "lo"));
        assert!(s.tcp.is_some());
    }
}
