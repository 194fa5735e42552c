//! Rules: the agent's own time-series window over its exposition (`tsdb`) and a PromQL subset
//! evaluated on it (`promql`); alerting rules, read from Prometheus rule files, sit on top.

pub mod alerting;
pub mod bench;
pub mod engine;
pub mod files;
pub mod promql;
pub mod silence;
pub mod template;
pub mod tsdb;

#[cfg(test)]
mod tests;
