//! `db`: PostgreSQL, MySQL/MariaDB and Redis queries timed off the wire, per operation and
//! normalized query, with errors, misses and the slow ones.

use std::time::Instant;

use tokio::task::JoinSet;

use super::{keep, Attached, Family, Slot, Spawn};
use crate::{
    collectors::{self, MissedRuns, Reading, TickSource},
    config::Config,
    control::{
        db::{queries, QueriesRequest, DEFAULT_LIMIT, DEFAULT_WINDOW},
        protocol::{Command as _, Request},
        reply,
        status::Window,
        Views,
    },
    exporters::prometheus::{encode_db, EncodeFamily},
    probes::{db::DbProbe, error_chain},
    store::{streams::RingTotals, Store},
};

/// The ring of query events, as `status` and `insite_ringbuf_*` name it.
const EVENTS_RING: &str = "db_events";

#[derive(Default)]
pub struct Db {
    probe: Slot<DbProbe>,
}

impl TickSource for Db {
    fn name(&self) -> &'static str {
        "db"
    }

    fn read(&self, now: Instant) -> Reading {
        Reading::of(
            self.probe.with(|p| p.read_counters()),
            move |st, counters| {
                if let Some(c) = counters {
                    st.db_live.kernel = c;
                }
                let k = &st.db_live.kernel;
                let ring = RingTotals {
                    events: k.events,
                    drops: k.drops,
                };
                st.streams.record(now, EVENTS_RING, ring);
                let snap = st.db_live.clone();
                st.db.push(now, snap);
            },
        )
    }

    fn missed_runs(&self) -> Option<Result<MissedRuns, String>> {
        self.probe.missed_runs(DbProbe::missed_runs)
    }
}

impl Views for Db {
    fn commands(&self) -> &'static [&'static str] {
        &[QueriesRequest::NAME]
    }

    fn answer(&self, req: Request, st: &Store, _cfg: &Config) -> Result<String, String> {
        let r: QueriesRequest = req.args()?;
        let v = queries(
            st,
            r.system,
            Window::or(r.window, DEFAULT_WINDOW),
            r.sort.unwrap_or_default(),
            r.limit.unwrap_or(DEFAULT_LIMIT),
        )?;
        reply(&v)
    }
}

impl Family for Db {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.db.enabled
    }

    fn attach(&self, cfg: &Config) -> Result<Attached, String> {
        let (p, problems) = DbProbe::attach(cfg.db.role_bits(), cfg.agent.kernel_log)
            .map_err(|e| error_chain(&e))?;
        let how = format!("tp_btf: {}", p.attached().join(", "));
        self.probe.set(p);
        Ok(Attached { how, problems })
    }

    fn spawn(&self, ctx: &Spawn, tasks: &mut JoinSet<()>) {
        if let Some(log) = self.probe.with(|p| p.take_log()).flatten() {
            tasks.spawn(crate::probes::kernel_log::run(log));
        }
        if let Some(maps) = self.probe.with(|p| p.take_maps()).flatten() {
            tasks.spawn(collectors::db::run_event_reader(
                maps,
                ctx.store.clone(),
                ctx.config.clone(),
            ));
        }
    }

    fn metrics(&self) -> EncodeFamily {
        encode_db
    }

    fn keep_restart_keys(&self, running: &Config, new: &mut Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let (r, n) = (&running.db, &mut new.db);
        keep(&mut changed, "db.enabled", &r.enabled, &mut n.enabled);
        keep(&mut changed, "db.roles", &r.roles, &mut n.roles);
        changed
    }

    fn detach(&self) {
        drop(self.probe.take());
    }
}
