//! What the rate-limit family enforces and counted, as its task last read it from the kernel.

use serde::{Deserialize, Serialize};

use crate::config::ratelimit::RuleSpec;

/// The family's state, for `limits list`, `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RatelimitView {
    /// `idle` (no rules: nothing loaded), `enforcing`, or `flushed`.
    pub state: String,
    pub rules: Vec<RuleView>,
    pub interfaces: Vec<LinkView>,
    pub egress_hooked: bool,
    /// Maps a previous agent left pinned and this one adopted.
    pub adopted_maps: usize,
    pub allowlisted: u64,
    pub sources_created: u64,
    pub sources_refused: u64,
    /// Per-source entries in the kernel now (read every few seconds).
    pub tracked_sources: u64,
    pub unparsed_packets: u64,
    /// Load adaptations since start (a rule scaled down or back up).
    pub adaptations: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    pub interface: String,
    pub mode: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleView {
    pub rule: RuleSpec,
    /// Where it came from: `config` or `limits set`.
    pub origin: String,
    /// The factor load adaptation applies now (1: none).
    pub scale: f64,
    pub counts: RuleCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounts {
    pub passed_source: u64,
    pub passed_aggregate: u64,
    pub dropped_source: u64,
    pub dropped_aggregate: u64,
    pub dropped_new_source: u64,
    pub passed_new_source: u64,
    pub passed_bytes: u64,
    pub dropped_bytes: u64,
}

impl RuleCounts {
    pub fn from_kernel(c: &agent_common::ratelimit::Counters) -> Self {
        use agent_common::ratelimit::rule as r;
        Self {
            passed_source: c.n[r::PASSED_SOURCE],
            passed_aggregate: c.n[r::PASSED_AGGREGATE],
            dropped_source: c.n[r::DROPPED_SOURCE],
            dropped_aggregate: c.n[r::DROPPED_AGGREGATE],
            dropped_new_source: c.n[r::DROPPED_NEW_SOURCE],
            passed_new_source: c.n[r::PASSED_NEW_SOURCE],
            passed_bytes: c.n[r::PASSED_BYTES],
            dropped_bytes: c.n[r::DROPPED_BYTES],
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped_source + self.dropped_aggregate + self.dropped_new_source
    }
}

/// A source by what it had dropped over the last window (`limits top`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopSource {
    pub rule: String,
    pub source: String,
    pub dropped: u64,
    pub passed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TopView {
    /// The span the counts cover.
    pub window_seconds: f64,
    pub sources: Vec<TopSource>,
}
