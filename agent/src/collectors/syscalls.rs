//! Slow-call events from the kernel ring buffer into the store's recent-calls log.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agent_common::syscalls::SlowSyscallEvent;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use super::cgroups::{service_of, CgroupNames};
use crate::{
    names::{cgroup2_root, comm_str},
    store::{syscalls::SlowCall, SharedStore},
    syscall_names,
};

/// Reads slow-call events until the ring buffer's fd fails (the probe was dropped).
pub async fn run_slow_reader(ring: RingBuf<MapData>, store: SharedStore) {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "cannot poll the slow-call ring buffer");
            return;
        }
    };
    let mut cgroups = CgroupNames::new(cgroup2_root());
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                debug!(error = %crate::probes::error_chain(&e), "slow-call ring buffer closed");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        let mut batch = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = super::decode_event::<SlowSyscallEvent>(&item) {
                batch.push(ev);
            }
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        let (mono_now, wall_now) = (monotonic_ns(), SystemTime::now());
        // Resolve names before taking the store lock: a rescan reads the cgroup tree.
        let calls: Vec<SlowCall> = batch
            .iter()
            .map(|ev| {
                let mut call = to_slow_call(ev, mono_now, wall_now);
                call.cgroup = cgroups.resolve(ev.cgroup_id);
                call.service = call.cgroup.as_deref().and_then(service_of);
                call
            })
            .collect();
        if let Ok(mut st) = store.write() {
            for call in calls {
                st.push_slow_call(call);
            }
        }
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn to_slow_call(ev: &SlowSyscallEvent, mono_now: u64, wall_now: SystemTime) -> SlowCall {
    // bpf_ktime_get_ns is CLOCK_MONOTONIC: place the event on the wall clock by its age.
    let age = Duration::from_nanos(mono_now.saturating_sub(ev.ts_ns));
    let at = wall_now.checked_sub(age).unwrap_or(wall_now);
    SlowCall {
        at_unix_ms: at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        syscall: syscall_names::label(ev.nr),
        duration_ns: ev.duration_ns,
        ret: ev.ret,
        pid: ev.pid,
        tid: ev.tid,
        comm: comm_str(&ev.comm),
        cgroup_id: ev.cgroup_id,
        cgroup: None,
        service: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_are_ignored() {
        assert!(crate::collectors::decode_event::<SlowSyscallEvent>(&[0u8; 10]).is_none());
    }

    #[test]
    fn event_is_placed_on_the_wall_clock() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"cat\0");
        let ev = SlowSyscallEvent {
            ts_ns: 9_000_000_000,
            duration_ns: 42,
            cgroup_id: 7,
            ret: -11,
            pid: 10,
            tid: 11,
            nr: 0,
            _reserved: 0,
            comm,
        };
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let c = to_slow_call(&ev, 10_000_000_000, wall);
        assert_eq!(c.at_unix_ms, 999_000);
        assert_eq!(c.syscall, "read");
        assert_eq!(c.comm, "cat");
        assert_eq!(c.ret, -11);
        let bytes: [u8; std::mem::size_of::<SlowSyscallEvent>()] =
            // SAFETY: plain data to bytes, for the round-trip test.
            unsafe { std::mem::transmute(ev) };
        assert_eq!(
            crate::collectors::decode_event::<SlowSyscallEvent>(&bytes)
                .unwrap()
                .tid,
            11
        );
    }
}
