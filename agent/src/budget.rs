//! What the agent's bounded tables cost in memory, and the check that the configured bounds fit
//! in `agent.memory_budget_mib` (the unit's MemoryMax leaves room above it).
//!
//! Every table the workload can grow is bounded by a setting; what one entry costs at worst
//! (every entry changing every tick, so that each snapshot the rolling windows keep holds its
//! own copy) is measured by `agent/tests/memory_model.rs` and charged here with a margin. The
//! sum over the settings, plus the agent's fixed part, must fit the budget, or the config is
//! refused with the setting that costs most named.

use crate::config::Config;

/// The agent without any table: runtime, probes' userspace side, BTF once parsed, buffers of
/// the ring readers, logging queue.
pub const BASE_BYTES: u64 = 48 << 20;
/// One connection edge (`net.max_edges`), its counters in every kept snapshot included.
pub const EDGE_BYTES: u64 = 28 << 10;
/// One edge of the kernel's edge table, as the network collector keeps it (its last counts,
/// and its share of each fold's read buffer). The kernel table holds
/// `probes::net::kernel_edges(net.max_edges)`.
pub const KERNEL_EDGE_BYTES: u64 = 2048;
/// One query series (`db.max_series`).
pub const DB_SERIES_BYTES: u64 = 20 << 10;
/// One query fingerprint (`db.max_fingerprints`), with its text and sample.
pub const FINGERPRINT_BYTES: u64 = 24 << 10;
/// The database collector's own tables at their bounds (`collectors::db`: connections
/// remembered, prepared statements kept, requests awaiting completion, the parse cache).
pub const DB_COLLECTOR_BYTES: u64 = 24 << 20;
/// One slow call or slow query kept for the CLI.
pub const SLOW_ENTRY_BYTES: u64 = 2 << 10;
/// Replies of the control socket in flight (`control::server::REPLY_BUDGET_BYTES`), and the
/// shared rendering of a scrape.
pub const REPLIES_BYTES: u64 = 16 << 20;

/// One series of the alert rules' window at its worst: a value for every step of its fine and
/// coarse rings (`window_bounds`), its labels and index.
pub fn window_series_bytes() -> u64 {
    (WINDOW_FINE_STEPS + WINDOW_COARSE_STEPS) * 8 + 1024
}
/// Steps the rule window's fine ring keeps (2 min at the default 250 ms tick; ranges longer
/// than it read the coarse ring), and its coarse ring (1 h at 10 s).
pub const WINDOW_FINE_STEPS: u64 = 480;
pub const WINDOW_COARSE_STEPS: u64 = 360;

/// The rule window's bounds for a config: a fixed number of steps, whatever the tick.
pub fn window_bounds(cfg: &Config) -> crate::rules::tsdb::Bounds {
    let step = cfg.agent.tick_interval;
    let coarse_step = std::time::Duration::from_secs(10);
    crate::rules::tsdb::Bounds {
        max_series: cfg.alerts.max_series,
        step,
        fine_span: step * WINDOW_FINE_STEPS as u32,
        coarse_step,
        coarse_span: coarse_step * WINDOW_COARSE_STEPS as u32,
    }
}
/// The alert engine without its window: the outbox's page cache and its write buffers, the
/// alerts and their history.
pub const ALERTS_BYTES: u64 = 8 << 20;

/// The budget's parts, largest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub total: u64,
    pub parts: Vec<(&'static str, u64)>,
}

pub fn estimate(cfg: &Config) -> Estimate {
    let n = |v: usize| v as u64;
    let mut parts = vec![
        ("base", BASE_BYTES),
        ("control and scrape replies", REPLIES_BYTES),
        ("net.max_edges", n(cfg.net.max_edges) * EDGE_BYTES),
        (
            "kernel connection edges",
            if cfg.net.enabled {
                u64::from(crate::probes::net::kernel_edges(cfg.net.max_edges)) * KERNEL_EDGE_BYTES
            } else {
                0
            },
        ),
        ("db.max_series", n(cfg.db.max_series) * DB_SERIES_BYTES),
        (
            "database collector",
            if cfg.db.enabled {
                DB_COLLECTOR_BYTES
            } else {
                0
            },
        ),
        (
            "db.max_fingerprints",
            n(cfg.db.max_fingerprints) * FINGERPRINT_BYTES,
        ),
        (
            "alerts.max_series",
            if cfg.alerts.enabled {
                n(cfg.alerts.max_series) * window_series_bytes() + ALERTS_BYTES
            } else {
                0
            },
        ),
        (
            "syscalls.slow_log_size + db.slow_log_capacity",
            n(cfg.syscalls.slow_log_size + cfg.db.slow_log_capacity) * SLOW_ENTRY_BYTES,
        ),
    ];
    parts.sort_by_key(|p| std::cmp::Reverse(p.1));
    Estimate {
        total: parts.iter().map(|p| p.1).sum(),
        parts,
    }
}

pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}
