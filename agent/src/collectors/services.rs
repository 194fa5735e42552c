//! Service names for what the kernel reports: a cgroup id, a command name, a listening port.
//! Shared by the families that name services (network, database).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::TASK_COMM_LEN;

use super::{
    cgroups::{service_of, CgroupNames},
    listeners::ListenerOwners,
};
use crate::names::{cgroup2_root, comm_str};

/// Service names by cgroup id, cached, with interned strings (every event of an edge shares
/// one allocation).
pub struct Names {
    pub(crate) cgroups: CgroupNames,
    pub(crate) listeners: ListenerOwners,
    pub(crate) interned: HashMap<String, Arc<str>>,
    /// Services named for what an event carries: the events of one service cost a lookup,
    /// no allocation. Named again after `EVENT_NAME_TTL` (a cgroup found by a later scan).
    pub(crate) by_event: HashMap<EventOwner, (Arc<str>, Instant)>,
    pub(crate) comms: HashMap<[u8; TASK_COMM_LEN], Arc<str>>,
}

/// What names an event's service: its cgroup, command name and (inbound) listening port.
type EventOwner = (u64, [u8; TASK_COMM_LEN], u16);

/// How long a service named from an event's (cgroup, command, port) is reused.
const EVENT_NAME_TTL: Duration = Duration::from_secs(10);
/// Entries of each event-name cache before it starts afresh.
const MAX_EVENT_NAMES: usize = 10_000;

impl Names {
    pub fn new() -> Self {
        Self {
            cgroups: CgroupNames::new(cgroup2_root()),
            listeners: ListenerOwners::new(),
            interned: HashMap::new(),
            by_event: HashMap::new(),
            comms: HashMap::new(),
        }
    }

    /// [`Self::service`] for an event's raw command name, cached.
    pub(crate) fn service_of_event(
        &mut self,
        cgroup_id: u64,
        comm: &[u8; TASK_COMM_LEN],
        listen_port: Option<u16>,
    ) -> Arc<str> {
        let key = (cgroup_id, *comm, listen_port.unwrap_or(0));
        if let Some((name, at)) = self.by_event.get(&key) {
            if at.elapsed() < EVENT_NAME_TTL {
                return name.clone();
            }
        }
        let name = self.service(cgroup_id, &comm_str(comm), listen_port);
        if self.by_event.len() >= MAX_EVENT_NAMES {
            self.by_event = HashMap::new();
        }
        self.by_event.insert(key, (name.clone(), Instant::now()));
        name
    }

    /// An event's raw command name, interned and cached.
    pub(crate) fn comm(&mut self, comm: &[u8; TASK_COMM_LEN]) -> Arc<str> {
        if let Some(c) = self.comms.get(comm) {
            return c.clone();
        }
        let name = self.intern(comm_str(comm));
        if self.comms.len() >= MAX_EVENT_NAMES {
            self.comms = HashMap::new();
        }
        self.comms.insert(*comm, name.clone());
        name
    }

    /// The systemd unit of the cgroup; else the cgroup path (unless it is the root); else the
    /// process name (for inbound connections: of the listener on `listen_port`); else
    /// `unknown`.
    pub(crate) fn service(
        &mut self,
        cgroup_id: u64,
        comm: &str,
        listen_port: Option<u16>,
    ) -> Arc<str> {
        let path = self.cgroups.resolve(cgroup_id);
        let name = path
            .as_deref()
            .and_then(service_of)
            .or_else(|| path.filter(|p| p != "/"))
            .or_else(|| (!comm.is_empty()).then(|| comm.to_string()))
            .or_else(|| listen_port.and_then(|p| self.listeners.owner(p)))
            .unwrap_or_else(|| "unknown".to_string());
        self.intern(name)
    }

    /// One shared allocation per distinct name (bounded).
    pub(crate) fn intern(&mut self, name: String) -> Arc<str> {
        if self.interned.len() > 10_000 {
            self.interned.clear();
        }
        self.interned
            .entry(name)
            .or_insert_with_key(|k| Arc::from(k.as_str()))
            .clone()
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}
