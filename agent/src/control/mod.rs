//! The local control API: a unix socket speaking line-delimited JSON, and the CLI's client.

pub mod client;
pub mod connections;
pub mod protocol;
pub mod queries;
pub mod server;
pub mod views;
