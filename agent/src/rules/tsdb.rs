//! CONTRACT STUB (the helper replaces the bodies; keep the signatures).
use std::time::Duration;

use super::promql::Needs;

/// How much the window may hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Series kept at most; a new series beyond it is dropped and counted.
    pub max_series: usize,
    /// The fine ring's step (the agent's tick) and span.
    pub step: Duration,
    pub fine_span: Duration,
    /// The coarse ring's step and span (ranges longer than `fine_span` read it).
    pub coarse_step: Duration,
    pub coarse_span: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            max_series: 10_000,
            step: Duration::from_millis(250),
            fine_span: Duration::from_secs(120),
            coarse_step: Duration::from_secs(10),
            coarse_span: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Samples in the text, samples kept (their metric is needed), new series refused (bound).
    pub samples: usize,
    pub kept: usize,
    pub refused: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub series: usize,
    /// Heap the rings hold, estimated from their capacities.
    pub bytes: usize,
    /// New series refused since start (the `max_series` bound).
    pub refused_total: u64,
}

#[derive(Debug)]
pub struct Tsdb {}

impl Tsdb {
    pub fn new(_bounds: Bounds) -> Self {
        todo!()
    }
    /// Keeps only the metric names the rules read, each as far back as they read it; frees
    /// the rest.
    pub fn set_needs(&mut self, _needs: &Needs) {
        todo!()
    }
    /// One scrape of the agent's own exposition (OpenMetrics or Prometheus text) at `at_ms`
    /// (unix ms, increasing). A needed series absent from it has no sample at `at_ms`.
    pub fn ingest(&mut self, _at_ms: i64, _text: &str) -> Ingested {
        todo!()
    }
    pub fn stats(&self) -> Stats {
        todo!()
    }
}
