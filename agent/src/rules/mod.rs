//! Rules: the agent's own time-series window over its exposition (`tsdb`) and a PromQL subset
//! evaluated on it (`promql`); alerting rules, read from Prometheus rule files, sit on top.

pub mod promql;
pub mod tsdb;
