//! The local control API: a unix socket speaking line-delimited JSON, and the CLI's client.

pub mod client;
pub mod db;
pub mod net;
pub mod protocol;
pub mod server;
pub mod status;
pub mod syscalls;
