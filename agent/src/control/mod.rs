//! The local control API: a unix socket speaking line-delimited JSON, and the CLI's client.
//!
//! `status` belongs to the agent; every other command belongs to a family, which declares
//! it (`Views`) with its typed arguments (`protocol::Command`) next to its views.

pub mod alerts;
pub mod client;
pub mod db;
pub mod net;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod socket;
pub mod status;
pub mod syscalls;

use crate::{config::Config, store::Store};

/// What a family answers on the control socket.
pub trait Views: Send + Sync {
    /// The commands it answers (`cmd`), unique across families.
    fn commands(&self) -> &'static [&'static str];
    /// Answers one of its commands from the store; `Ok` is the reply's `data` as JSON text,
    /// `Err` what the client is told.
    fn answer(&self, req: protocol::Request, st: &Store, cfg: &Config) -> Result<String, String>;
}

/// A view as the JSON text of a reply's `data`.
pub fn reply<T: serde::Serialize>(view: &T) -> Result<String, String> {
    serde_json::to_string(view).map_err(|e| format!("internal: {e}"))
}
