//! `alerts`, `alerts_history`, `alerts_ack`, `alerts_silence`, `alerts_unsilence`: the alert
//! rules' live alerts, their last transitions, and what people say about them.

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

/// `alerts_ack`: acknowledges a pending or firing alert (its id, or 4+ leading characters of
/// it); stops its escalation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsAckRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl Command for AlertsAckRequest {
    const NAME: &'static str = "alerts_ack";
}

/// `alerts_silence`: mutes notifications of the alerts every matcher matches, for `for`
/// (`1h`, `30m`; at most 30 days).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSilenceRequest {
    pub matchers: Vec<String>,
    #[serde(rename = "for")]
    pub for_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

impl Command for AlertsSilenceRequest {
    const NAME: &'static str = "alerts_silence";
}

/// `alerts_unsilence`: ends a silence now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsUnsilenceRequest {
    pub id: String,
}

impl Command for AlertsUnsilenceRequest {
    const NAME: &'static str = "alerts_unsilence";
}

/// What `alerts_ack`, `alerts_silence` and `alerts_unsilence` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertsChanged {
    pub id: String,
    pub what: String,
}
