//! `[db]`: the database probe's roles, bounds, slow-query thresholds and text handling.

use super::*;

/// Database and cache queries timed off the wire (PostgreSQL, MySQL/MariaDB, Redis).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    pub enabled: bool,
    /// The ends of a connection followed: `client` (the end that sends requests), `server`,
    /// or both (default). On a host that runs both ends of its connections, one role halves
    /// the probe's cost (restart to change).
    pub roles: Vec<DbRole>,
    /// Series of `insite_db_*` exported with their own labels (by query count); the rest fold
    /// into `operation="other"`, `destination="other"`, `service="other"`.
    pub top_n: usize,
    /// (system, operation, role, destination, service) keys kept in memory; beyond it new ones
    /// count under an `other` key.
    pub max_series: usize,
    /// Query fingerprints kept in memory (for `insite-agent queries`); beyond it new ones count
    /// under the fingerprint `other`.
    pub max_fingerprints: usize,
    /// Queries at least this slow are logged and kept for `insite-agent queries --slow`.
    pub slow_threshold: SlowThresholds,
    /// Slow queries kept in memory.
    pub slow_log_capacity: usize,
    /// Log and show the query text as sent. Off: literals are masked (`id = ?`).
    pub log_raw_text: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlowThresholds {
    #[serde(with = "humantime_serde")]
    pub postgresql: Duration,
    #[serde(with = "humantime_serde")]
    pub mysql: Duration,
    #[serde(with = "humantime_serde")]
    pub redis: Duration,
}

/// An end of a database connection, as `db.roles` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbRole {
    Client,
    Server,
}

impl DbConfig {
    /// `db.roles` as the kernel's bits.
    pub fn role_bits(&self) -> u32 {
        self.roles.iter().fold(0, |bits, r| {
            bits | match r {
                DbRole::Client => agent_common::db::DB_ROLE_CLIENT,
                DbRole::Server => agent_common::db::DB_ROLE_SERVER,
            }
        })
    }
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            roles: vec![DbRole::Client, DbRole::Server],
            top_n: 50,
            max_series: 2048,
            max_fingerprints: 1000,
            slow_threshold: SlowThresholds::default(),
            slow_log_capacity: 256,
            log_raw_text: false,
        }
    }
}

impl Default for SlowThresholds {
    fn default() -> Self {
        Self {
            postgresql: Duration::from_millis(100),
            mysql: Duration::from_millis(100),
            redis: Duration::from_millis(10),
        }
    }
}

impl DbConfig {
    /// Checks values that the types alone do not constrain.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        if self.roles.is_empty() {
            return Err(violation(
                "db.roles",
                "name at least one of \"client\" and \"server\" (or set db.enabled = false)",
            ));
        }
        if self.top_n == 0 || self.top_n > 1000 {
            return Err(violation("db.top_n", "must be between 1 and 1000"));
        }
        if self.max_series < 16 || self.max_series > 65_536 {
            return Err(violation("db.max_series", "must be between 16 and 65536"));
        }
        if self.max_fingerprints < 16 || self.max_fingerprints > 100_000 {
            return Err(violation(
                "db.max_fingerprints",
                "must be between 16 and 100000",
            ));
        }
        if self.slow_log_capacity == 0 || self.slow_log_capacity > 100_000 {
            return Err(violation(
                "db.slow_log_capacity",
                "must be between 1 and 100000",
            ));
        }
        for (key, t) in [
            (
                "db.slow_threshold.postgresql",
                self.slow_threshold.postgresql,
            ),
            ("db.slow_threshold.mysql", self.slow_threshold.mysql),
            ("db.slow_threshold.redis", self.slow_threshold.redis),
        ] {
            if t.is_zero() || t > Duration::from_secs(3600) {
                return Err(violation(key, "must be more than 0s and at most 1h"));
            }
        }
        Ok(())
    }
}
