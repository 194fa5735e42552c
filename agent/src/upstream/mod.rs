//! What the agent sends upstream: notifications to Prometheus Alertmanager and webhooks,
//! each drained in order from its queue in the durable outbox (`crate::outbox`), retried with
//! backoff until the receiver takes it.

pub mod alertmanager;
pub mod http;
pub mod sender;
pub mod webhook;
