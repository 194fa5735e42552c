//! When the syscall hooks are attached.
//!
//! Two hooks on every syscall of the host cost every workload a share of its throughput that
//! grows with its syscall rate (7% of nginx's requests here). In `sampled` mode the hooks are
//! attached for `sample_window` at the start of every `sample_interval` and detached in
//! between, so the tax is the window's share of it. Detached hooks cost nothing: the kernel
//! skips a tracepoint with no probe. A trace request (`insite-agent syscalls --trace 30s`)
//! keeps them attached until it ends. In `full` mode they stay attached.
//!
//! A call is counted when its entry and exit both fall in a window: calls longer than the
//! window are not seen in sampled mode (the kernel drops starts older than the window, see
//! `SyscallConfig::window_start_ns`).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::syscalls::SyscallProbe;
use crate::config::{Config, SyscallMode};

/// Longest trace a control request may ask for.
pub const MAX_TRACE: Duration = Duration::from_secs(3600);

/// Where the trace deadline is kept: control requests set it, the sampler follows it.
pub type TraceUntil = watch::Sender<Option<Instant>>;

/// Whether the hooks should be attached at `now`, and when that next changes.
fn plan(
    mode: SyscallMode,
    window: Duration,
    interval: Duration,
    cycle_start: Instant,
    trace_until: Option<Instant>,
    now: Instant,
) -> (bool, Option<Instant>) {
    if mode == SyscallMode::Full || interval.is_zero() || window >= interval {
        return (true, None);
    }
    let since = now.saturating_duration_since(cycle_start).as_nanos();
    let phase = Duration::from_nanos((since % interval.as_nanos()) as u64);
    let (in_window, edge) = if phase < window {
        (true, now + (window - phase))
    } else {
        (false, now + (interval - phase))
    };
    match trace_until {
        Some(t) if t > now => (true, Some(t.min(edge).max(now + Duration::from_millis(1)))),
        _ => (in_window, Some(edge)),
    }
}

/// Runs until shutdown: attaches and detaches the probe's hooks as the mode, the windows and
/// trace requests say.
pub async fn run(
    probe: Arc<Mutex<SyscallProbe>>,
    mut config: watch::Receiver<Arc<Config>>,
    mut trace: watch::Receiver<Option<Instant>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // Windows open at cycle_start + k * interval; the first one is the probe's start-up.
    let cycle_start = Instant::now();
    loop {
        let (mode, window, interval) = {
            let c = config.borrow();
            (
                c.syscalls.mode,
                c.syscalls.sample_window,
                c.syscalls.sample_interval,
            )
        };
        let trace_until = *trace.borrow_and_update();
        let (want, next) = plan(
            mode,
            window,
            interval,
            cycle_start,
            trace_until,
            Instant::now(),
        );
        if let Ok(mut p) = probe.lock() {
            if p.attached() != want {
                let t = Instant::now();
                match p.set_attached(want) {
                    Ok(()) => debug!(attached = want, took = ?t.elapsed(), "syscall hooks"),
                    Err(e) => warn!(
                        attached = want,
                        error = %crate::probes::error_chain(&e),
                        "syscall hooks: could not switch; trying again at the next window"
                    ),
                }
            }
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            changed = config.changed() => if changed.is_err() { return; },
            changed = trace.changed() => if changed.is_err() { return; },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn full_mode_is_always_attached() {
        let t0 = Instant::now();
        assert_eq!(
            plan(SyscallMode::Full, S, 10 * S, t0, None, t0 + 5 * S),
            (true, None)
        );
    }

    #[test]
    fn sampled_mode_opens_a_window_each_interval() {
        let t0 = Instant::now();
        let p = |at: Duration| plan(SyscallMode::Sampled, S, 10 * S, t0, None, t0 + at);
        assert_eq!(p(Duration::ZERO), (true, Some(t0 + S)));
        assert_eq!(p(S / 2), (true, Some(t0 + S)));
        assert_eq!(p(S), (false, Some(t0 + 10 * S)));
        assert_eq!(p(9 * S), (false, Some(t0 + 10 * S)));
        assert_eq!(p(10 * S), (true, Some(t0 + 11 * S)));
        assert_eq!(p(25 * S), (false, Some(t0 + 30 * S)));
    }

    #[test]
    fn a_trace_keeps_the_hooks_on_until_it_ends() {
        let t0 = Instant::now();
        let until = Some(t0 + 34 * S);
        let p = |at: Duration| plan(SyscallMode::Sampled, S, 10 * S, t0, until, t0 + at);
        // Closed-window edges still wake the sampler, which stays attached.
        assert_eq!(p(2 * S), (true, Some(t0 + 10 * S)));
        assert_eq!(p(33 * S), (true, Some(t0 + 34 * S)));
        // Over: back to the windows.
        assert_eq!(p(34 * S), (false, Some(t0 + 40 * S)));
        // A window wider than the interval is full time.
        assert_eq!(
            plan(SyscallMode::Sampled, 10 * S, 10 * S, t0, None, t0 + 3 * S),
            (true, None)
        );
    }
}
