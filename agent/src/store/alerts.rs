//! What the alert engine shows: the rules loaded, every live alert, the window's and the
//! outbox's sizes, and the receivers' counts. The engine's task writes it after each tick.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::histogram::Log2Histogram;
use crate::rules::alerting::Alert;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertsView {
    pub files: Vec<String>,
    pub groups: usize,
    pub rules: usize,
    /// Why the last rule set read was refused (the running rules stayed).
    pub refused: Option<String>,
    /// Pending, firing and recently resolved alerts, by alert name then labels.
    pub alerts: Vec<Alert>,
    /// Silences in force or yet to start.
    #[serde(default)]
    pub silences: Vec<crate::rules::silence::Silence>,
    pub window: WindowView,
    pub outbox: OutboxView,
    pub receivers: Vec<String>,
    /// Deliveries by receiver and result (`sent`, `failed`, `rejected`, `unreadable`).
    pub notifications: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(skip)]
    pub evaluation: Log2Histogram,
    #[serde(skip)]
    pub detection: Log2Histogram,
    pub evaluations: u64,
    pub last_evaluation_seconds: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowView {
    pub series: usize,
    pub bytes: usize,
    pub refused_total: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct OutboxView {
    pub records: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub oldest_age_seconds: Option<f64>,
}
