//! Exporters: how the store leaves the host.

pub mod http;
pub mod labels;
pub mod prometheus;
