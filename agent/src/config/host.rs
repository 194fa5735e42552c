//! `[host]`: host signals from procfs.

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HostConfig {
    pub enabled: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}
