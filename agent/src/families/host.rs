//! `host`: CPU, memory, load, PSI pressure, disks, network devices and TCP counters of the
//! whole host, from procfs. No kernel programs; a reload turns it on and off.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Instant,
};

use super::{Attached, Family};
use crate::{
    collectors::{host::HostCollector, Reading, TickSource},
    config::Config,
    control::{protocol::Request, Views},
    exporters::prometheus::{encode_host, EncodeFamily},
    probes::error_chain,
    store::{SharedStore, Store},
};

#[derive(Default)]
pub struct Host {
    sampler: Mutex<HostCollector>,
    on: AtomicBool,
}

impl TickSource for Host {
    fn name(&self) -> &'static str {
        "host"
    }

    fn read(&self, _now: Instant) -> Reading {
        let sample = if self.on.load(Ordering::Relaxed) {
            match self.sampler.lock().map(|mut s| s.sample()) {
                Ok(Ok(s)) => Ok(Some(s)),
                Ok(Err(e)) => Err(error_chain(&e)),
                Err(_) => Err("internal: host sampler unavailable".to_string()),
            }
        } else {
            Ok(None)
        };
        let (sample, error) = match sample {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e)),
        };
        Reading::fold(move |st| st.host = sample).with_error(error)
    }
}

impl Views for Host {
    fn commands(&self) -> &'static [&'static str] {
        &[]
    }

    fn answer(&self, req: Request, _st: &Store, _cfg: &Config) -> Result<String, String> {
        Err(format!("host has no command {:?}", req.cmd))
    }
}

impl Family for Host {
    fn enabled(&self, cfg: &Config) -> bool {
        cfg.host.enabled
    }

    fn needs_ebpf(&self, _cfg: &Config) -> bool {
        false
    }

    fn attach(&self, _cfg: &Config) -> Result<Attached, String> {
        self.on.store(true, Ordering::Relaxed);
        Ok(Attached {
            how: "procfs".into(),
            problems: Vec::new(),
        })
    }

    fn metrics(&self) -> EncodeFamily {
        encode_host
    }

    fn reload(&self, cfg: &Config, _store: &SharedStore) {
        self.on.store(cfg.host.enabled, Ordering::Relaxed);
    }
}
