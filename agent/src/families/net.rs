//! `net`: TCP connections per edge (who talks to whom), with connect time, failures, RTT,
//! retransmits and bytes.

use std::time::Instant;

use tokio::{sync::watch, task::JoinSet};
use tracing::error;

use super::{keep, Attached, Family, Slot, Spawn};
use crate::{
    collectors::{self, MissedRuns, Reading, TickSource},
    config::Config,
    control::{
        net::{connections, map, ConnectionsRequest, MapRequest, Page, DEFAULT_WINDOW},
        protocol::{Command as _, Request},
        reply,
        status::Window,
        Views,
    },
    exporters::prometheus::{encode_net, EncodeFamily},
    probes::{error_chain, net::NetProbe},
    store::{SharedStore, Store},
};

#[derive(Default)]
pub struct Net {
    probe: Slot<NetProbe>,
}

impl TickSource for Net {
    fn name(&self) -> &'static str {
        "net"
    }

    fn read(&self, now: Instant) -> Reading {
        Reading::of(
            self.probe.with(|p| p.read_counters()),
            move |st, counters| {
                if let Some(c) = counters {
                    st.net_live.kernel = c;
                }
                // Cheap: edges are shared with the previous snapshot unless they changed.
                let snap = st.net_live.clone();
                st.net.push(now, snap);
            },
        )
    }

    fn missed_runs(&self) -> Option<Result<MissedRuns, String>> {
        self.probe.missed_runs(NetProbe::missed_runs)
    }
}

impl Views for Net {
    fn commands(&self) -> &'static [&'static str] {
        &[ConnectionsRequest::NAME, MapRequest::NAME]
    }

    fn answer(&self, req: Request, st: &Store, _cfg: &Config) -> Result<String, String> {
        if req.cmd == MapRequest::NAME {
            let MapRequest(r) = req.args()?;
            let window = Window::or(r.window, DEFAULT_WINDOW);
            return reply(&map(st, window, Page::new(r.offset, r.limit)?)?);
        }
        let r: ConnectionsRequest = req.args()?;
        let window = Window::or(r.window, DEFAULT_WINDOW);
        reply(&connections(st, window, Page::new(r.offset, r.limit)?)?)
    }
}

impl Family for Net {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.net.enabled
    }

    fn attach(&self, cfg: &Config) -> Result<Attached, String> {
        let (p, problems) =
            NetProbe::attach(&cfg.net, cfg.agent.kernel_log).map_err(|e| error_chain(&e))?;
        let how = format!("tp_btf: {}", p.attached().join(", "));
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
        // Walks over the TCP sockets sample live connections and find the ones whose end
        // went unseen; without the iterator the receive-path hook samples.
        let walks = if self.probe.with(|p| p.has_walker()) == Some(true) {
            let (tx, rx) = watch::channel(collectors::net::Walks::default());
            tasks.spawn(collectors::net::run_walker(
                p,
                ctx.store.clone(),
                ctx.config.clone(),
                tx,
                ctx.shutdown.clone(),
            ));
            Some(rx)
        } else {
            None
        };
        if let Some(tables) = self.probe.with(|p| p.take_tables()).flatten() {
            tasks.spawn(collectors::net::run_collector(
                tables,
                ctx.store.clone(),
                ctx.config.clone(),
                walks,
                ctx.ticks.clone(),
            ));
        }
    }

    fn metrics(&self) -> EncodeFamily {
        encode_net
    }

    fn keep_restart_keys(&self, running: &Config, new: &mut Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        keep(
            &mut changed,
            "net.enabled",
            &running.net.enabled,
            &mut new.net.enabled,
        );
        changed
    }

    fn reload(&self, cfg: &Config, _store: &SharedStore) {
        if let Some(Err(e)) = self.probe.with(|p| p.apply_config(&cfg.net)) {
            error!(error = %error_chain(&e), "SIGHUP: could not apply network settings");
        }
    }

    fn detach(&self) {
        drop(self.probe.take());
    }
}
