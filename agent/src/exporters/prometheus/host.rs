//! Host signals from procfs: CPU, memory, load, PSI pressure, disks, network devices, TCP.

use super::*;

/// The host families, once the first sample is in.
pub fn encode(
    e: &mut DescriptorEncoder<'_>,
    st: &Store,
    _cfg: &Config,
) -> Result<(), std::fmt::Error> {
    match &st.host {
        Some(h) => sample(e, h),
        None => Ok(()),
    }
}

fn sample(e: &mut DescriptorEncoder<'_>, h: &HostSample) -> Result<(), std::fmt::Error> {
    counter(
        e,
        "insite_host_cpu",
        "CPU time of all CPUs by mode (/proc/stat)",
        Some(&Unit::Seconds),
        h.cpu_seconds.iter().map(|(m, v)| (l("mode", *m), *v)),
    )?;
    gauge(
        e,
        "insite_host_cpus",
        "Online CPUs",
        None,
        [(vec![], h.cpus as f64)],
    )?;
    gauge(
        e,
        "insite_host_memory",
        "Memory by kind (/proc/meminfo)",
        Some(&Unit::Bytes),
        [
            (l("kind", "total"), h.memory_total_bytes as f64),
            (l("kind", "available"), h.memory_available_bytes as f64),
            (l("kind", "free"), h.memory_free_bytes as f64),
            (l("kind", "cached"), h.memory_cached_bytes as f64),
            (l("kind", "swap_total"), h.swap_total_bytes as f64),
            (l("kind", "swap_free"), h.swap_free_bytes as f64),
        ],
    )?;
    gauge(
        e,
        "insite_host_load",
        "Load average",
        None,
        [
            (l("window", "1m"), h.load1),
            (l("window", "5m"), h.load5),
            (l("window", "15m"), h.load15),
        ],
    )?;
    counter(
        e,
        "insite_host_pressure_stall",
        "Time tasks were stalled on a resource (PSI total)",
        Some(&Unit::Seconds),
        h.pressure.iter().map(|p| {
            (
                vec![
                    ("resource".into(), p.resource.into()),
                    ("kind".into(), p.kind.into()),
                ],
                p.stall_seconds_total,
            )
        }),
    )?;
    gauge(
        e,
        "insite_host_pressure_avg10",
        "Share of the last 10 s that tasks were stalled on a resource (PSI avg10 / 100)",
        Some(&Unit::Other("ratio".into())),
        h.pressure.iter().map(|p| {
            (
                vec![
                    ("resource".into(), p.resource.into()),
                    ("kind".into(), p.kind.into()),
                ],
                p.avg10 / 100.0,
            )
        }),
    )?;
    type DiskField = fn(&DiskReading) -> f64;
    let disk_counters: [(&str, &str, Option<Unit>, DiskField); 5] = [
        (
            "insite_host_disk_reads_completed",
            "Disk reads completed",
            None,
            |d| d.reads_completed as f64,
        ),
        (
            "insite_host_disk_writes_completed",
            "Disk writes completed",
            None,
            |d| d.writes_completed as f64,
        ),
        (
            "insite_host_disk_read",
            "Bytes read from disk",
            Some(Unit::Bytes),
            |d| d.read_bytes as f64,
        ),
        (
            "insite_host_disk_written",
            "Bytes written to disk",
            Some(Unit::Bytes),
            |d| d.written_bytes as f64,
        ),
        (
            "insite_host_disk_io_time",
            "Time the disk was busy with I/O",
            Some(Unit::Seconds),
            |d| d.io_seconds,
        ),
    ];
    for (name, help, unit, field) in disk_counters {
        let rows = h
            .disks
            .iter()
            .map(|d| (l("device", d.device.clone()), field(d)));
        counter(e, name, help, unit.as_ref(), rows)?;
    }
    type NetField = fn(&NetDevReading) -> u64;
    let net_counters: [(&str, &str, Option<Unit>, NetField); 8] = [
        (
            "insite_host_network_receive",
            "Bytes received by a network device",
            Some(Unit::Bytes),
            |d| d.rx_bytes,
        ),
        (
            "insite_host_network_transmit",
            "Bytes sent by a network device",
            Some(Unit::Bytes),
            |d| d.tx_bytes,
        ),
        (
            "insite_host_network_receive_packets",
            "Packets received by a network device",
            None,
            |d| d.rx_packets,
        ),
        (
            "insite_host_network_transmit_packets",
            "Packets sent by a network device",
            None,
            |d| d.tx_packets,
        ),
        (
            "insite_host_network_receive_errors",
            "Receive errors of a network device",
            None,
            |d| d.rx_errors,
        ),
        (
            "insite_host_network_transmit_errors",
            "Transmit errors of a network device",
            None,
            |d| d.tx_errors,
        ),
        (
            "insite_host_network_receive_drops",
            "Received packets dropped by a network device",
            None,
            |d| d.rx_dropped,
        ),
        (
            "insite_host_network_transmit_drops",
            "Outgoing packets dropped by a network device",
            None,
            |d| d.tx_dropped,
        ),
    ];
    for (name, help, unit, field) in net_counters {
        let rows = h
            .net_devices
            .iter()
            .map(|d| (l("device", d.device.clone()), field(d) as f64));
        counter(e, name, help, unit.as_ref(), rows)?;
    }
    if let Some(t) = &h.tcp {
        gauge(
            e,
            "insite_host_tcp_established",
            "TCP connections in ESTABLISHED or CLOSE-WAIT, all sockets (/proc/net/snmp)",
            None,
            [(vec![], t.established as f64)],
        )?;
        for (name, help, v) in [
            (
                "insite_host_tcp_active_opens",
                "TCP connects started (/proc/net/snmp)",
                t.active_opens,
            ),
            (
                "insite_host_tcp_passive_opens",
                "TCP handshakes answered by listeners (/proc/net/snmp)",
                t.passive_opens,
            ),
            (
                "insite_host_tcp_attempt_fails",
                "TCP handshakes that failed (/proc/net/snmp)",
                t.attempt_fails,
            ),
            (
                "insite_host_tcp_retransmitted_segments",
                "TCP segments retransmitted (/proc/net/snmp)",
                t.retrans_segs,
            ),
            (
                "insite_host_tcp_resets_sent",
                "TCP segments sent with RST (/proc/net/snmp)",
                t.out_rsts,
            ),
            (
                "insite_host_tcp_listen_overflows",
                "Handshakes dropped because a listener's accept queue was full (/proc/net/netstat)",
                t.listen_overflows,
            ),
            (
                "insite_host_tcp_listen_drops",
                "Handshakes dropped by listeners for any reason (/proc/net/netstat)",
                t.listen_drops,
            ),
        ] {
            counter(e, name, help, None, [(vec![], v as f64)])?;
        }
    }

    Ok(())
}
