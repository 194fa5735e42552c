//! `alerts`, `alerts_history`: the alert rules' live alerts, and their last transitions.

use serde::{Deserialize, Serialize};

use super::protocol::Command;
use crate::rules::alerting::Transition;

/// `alerts`: rules loaded, live alerts, outbox and receivers (an `AlertsView`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsRequest {}

impl Command for AlertsRequest {
    const NAME: &'static str = "alerts";
}

/// `alerts_history`: the last `limit` transitions (default 100), oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsHistoryRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

impl Command for AlertsHistoryRequest {
    const NAME: &'static str = "alerts_history";
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryView {
    pub transitions: Vec<Transition>,
}
