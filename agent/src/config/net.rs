//! `[net]`: the network probe's sampling, ignored ports and networks, and bounds.

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    pub enabled: bool,
    /// Destinations exported with their own series (by traffic); the rest fold into
    /// `destination="other"`.
    pub top_n: usize,
    /// Connection edges (service, direction, peer, destination) kept in memory; new edges
    /// beyond it are counted under one `other` edge.
    pub max_edges: usize,
    /// A live connection's RTT and byte counts are sampled at most this often.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// Connections to or from these ports are not tracked (in the kernel).
    pub ignore_ports: Vec<u16>,
    /// Connections with a remote address in these networks are dropped (e.g. "10.0.0.0/8",
    /// "::1/128", or a single address).
    pub ignore_cidrs: Vec<String>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            top_n: 20,
            max_edges: 1024,
            sample_interval: Duration::from_secs(1),
            ignore_ports: Vec::new(),
            ignore_cidrs: Vec::new(),
        }
    }
}

impl NetConfig {
    /// The parsed `ignore_cidrs` (validated at load, so unparsable entries never get here).
    pub fn ignored_networks(&self) -> Vec<ipnet::IpNet> {
        self.ignore_cidrs
            .iter()
            .filter_map(|c| parse_cidr(c).ok())
            .collect()
    }
}

/// A network ("10.0.0.0/8") or a single address ("10.1.2.3", as /32 or /128).
pub fn parse_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or a network like 10.0.0.0/8"))
}

impl NetConfig {
    /// Checks values that the types alone do not constrain.
    pub(super) fn validate(&self) -> Result<(), Violation> {
        if self.top_n == 0 || self.top_n > 1000 {
            return Err(violation("net.top_n", "must be between 1 and 1000"));
        }
        if self.max_edges < 16 || self.max_edges > 65_536 {
            return Err(violation("net.max_edges", "must be between 16 and 65536"));
        }
        if self.sample_interval < Duration::from_millis(100)
            || self.sample_interval > Duration::from_secs(60)
        {
            return Err(violation(
                "net.sample_interval",
                "must be between 100ms and 60s",
            ));
        }
        if self.ignore_ports.contains(&0) {
            return Err(violation("net.ignore_ports", "port 0 is not a port"));
        }
        for c in &self.ignore_cidrs {
            parse_cidr(c).map_err(|reason| violation("net.ignore_cidrs", reason))?;
        }
        Ok(())
    }
}
