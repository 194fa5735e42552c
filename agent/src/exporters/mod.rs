//! Exporters: how the store leaves the host.

pub mod prometheus;
