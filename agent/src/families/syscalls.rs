//! `syscalls`: latency and errors of every syscall, per syscall, process and service, and the
//! slow calls.

use std::{sync::Mutex, time::Instant};

use tokio::{sync::watch, task::JoinSet};
use tracing::error;

use super::{keep, Attached, Family, Slot, Spawn};
use crate::{
    collectors::{self, MissedRuns, Reading, TickSource},
    config::Config,
    control::{
        protocol::{Command as _, Request},
        reply,
        status::{Window, DEFAULT_LIMIT, DEFAULT_WINDOW},
        syscalls::{SyscallsRequest, TraceSyscallsRequest},
        Views,
    },
    exporters::prometheus::{encode_syscalls, EncodeFamily},
    probes::{self, error_chain, sampling::TraceUntil, syscalls::SyscallProbe},
    store::{streams::RingTotals, SharedStore},
};

/// The ring of slow calls, as `status` and `insite_ringbuf_*` name it.
const SLOW_RING: &str = "syscall_slow";

#[derive(Default)]
pub struct Syscalls {
    probe: Slot<SyscallProbe>,
    /// Trace requests for the sampler, once it runs.
    trace: Mutex<Option<TraceUntil>>,
}

impl TickSource for Syscalls {
    fn name(&self) -> &'static str {
        "syscalls"
    }

    fn read(&self, now: Instant) -> Reading {
        // A failed read pushes nothing: the windows keep their last snapshot.
        Reading::of(self.probe.with(|p| p.read()), move |st, totals| {
            let Some(t) = totals else { return };
            let ring = RingTotals {
                events: t.slow_events,
                drops: t.slow_drops,
            };
            st.streams.record(now, SLOW_RING, ring);
            st.syscalls.push(now, t);
        })
    }

    fn missed_runs(&self) -> Option<Result<MissedRuns, String>> {
        self.probe.missed_runs(SyscallProbe::missed_runs)
    }
}

impl Views for Syscalls {
    fn commands(&self) -> &'static [&'static str] {
        &[SyscallsRequest::NAME, TraceSyscallsRequest::NAME]
    }

    fn answer(
        &self,
        req: Request,
        st: &crate::store::Store,
        cfg: &Config,
    ) -> Result<String, String> {
        if req.cmd == TraceSyscallsRequest::NAME {
            let r: TraceSyscallsRequest = req.args()?;
            let trace = self
                .trace
                .lock()
                .map_err(|_| "internal: trace unavailable")?;
            let Some(trace) = trace.as_ref() else {
                return Err("the syscall probe is not attached: nothing to trace".into());
            };
            return reply(&crate::control::syscalls::trace(trace, cfg, r.duration.0));
        }
        let r: SyscallsRequest = req.args()?;
        let v = crate::control::syscalls::syscalls(
            st,
            cfg,
            Window::or(r.window, DEFAULT_WINDOW),
            r.limit.unwrap_or(DEFAULT_LIMIT),
        )?;
        reply(&v)
    }
}

impl Family for Syscalls {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.syscalls.enabled
    }

    fn attach(&self, cfg: &Config) -> Result<Attached, String> {
        let (p, problems) = SyscallProbe::attach(&cfg.syscalls, cfg.agent.kernel_log)
            .map_err(|e| error_chain(&e))?;
        let how = p.mode().to_string();
        self.probe.set(p);
        Ok(Attached { how, problems })
    }

    fn spawn(&self, ctx: &Spawn, tasks: &mut JoinSet<()>) {
        let Some(p) = self.probe.get() else {
            return;
        };
        if let Some(log) = self.probe.with(|p| p.take_log()).flatten() {
            tasks.spawn(crate::probes::kernel_log::run(log));
        }
        let (trace_tx, trace_rx) = watch::channel(None);
        if let Ok(mut t) = self.trace.lock() {
            *t = Some(trace_tx);
        }
        tasks.spawn(probes::sampling::run(
            p.clone(),
            ctx.config.clone(),
            trace_rx,
            ctx.shutdown.clone(),
        ));
        if let Some(ring) = self.probe.with(|p| p.take_ring()).flatten() {
            tasks.spawn(collectors::syscalls::run_slow_reader(
                ring,
                ctx.store.clone(),
            ));
        }
    }

    fn metrics(&self) -> EncodeFamily {
        encode_syscalls
    }

    fn keep_restart_keys(&self, running: &Config, new: &mut Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let (r, n) = (&running.syscalls, &mut new.syscalls);
        keep(&mut changed, "syscalls.enabled", &r.enabled, &mut n.enabled);
        keep(&mut changed, "syscalls.attach", &r.attach, &mut n.attach);
        changed
    }

    fn reload(&self, cfg: &Config, store: &SharedStore) {
        let applied = self.probe.with(|p| p.apply_config(&cfg.syscalls));
        if let Ok(mut st) = store.write() {
            st.set_slow_capacity(cfg.syscalls.slow_log_size);
            if let (Some(Ok(problems)), Some(s)) = (&applied, st.probes.get_mut("syscalls")) {
                s.error = (!problems.is_empty()).then(|| problems.join("; "));
            }
        }
        if let Some(Err(e)) = applied {
            error!(error = %error_chain(&e), "SIGHUP: could not apply syscall settings");
        }
    }

    fn detach(&self) {
        if let Ok(mut t) = self.trace.lock() {
            t.take();
        }
        drop(self.probe.take());
    }
}
