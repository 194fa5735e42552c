//! insite-agent: the InsiteChart host agent.
//!
//! Data path: `probes` (kernel programs, attach) -> `collectors` (read maps and procfs every
//! tick) -> `store` (cumulative totals, rolling windows) -> `exporters` (Prometheus) and
//! `control` (unix socket API for the CLI). `daemon` wires them together.

pub mod budget;
pub mod cli;
pub mod collectors;
pub mod config;
pub mod control;
pub mod daemon;
pub mod exporters;
pub mod families;
pub mod limits;
pub mod logging;
pub mod names;
pub mod outbox;
pub mod probes;
pub mod rules;
pub mod store;
pub mod syscall_names;
pub mod untrusted;
pub mod upstream;
pub mod wire;
