//! The agent's Prometheus endpoint as the tests and benches read it: one scrape, and its
//! samples looked up by name and labels.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::Agent;

/// GET /metrics of the agent on 127.0.0.1:`port`: (content type, body). `openmetrics` sets
/// the Accept header Prometheus sends.
pub fn scrape(port: u16, openmetrics: bool) -> Result<(String, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let accept = if openmetrics {
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    } else {
        "*/*"
    };
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scrape failed: {head}");
    }
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((ctype, body))
}

pub(crate) fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// A sample: metric name, labels (unescaped) and value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// One sample line of the Prometheus text format: name, labels (unescaped) and value; `None`
/// for comments, blank lines and anything that does not parse.
pub fn parse_sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find("=\"")?;
            let key = rest[..eq].trim_start_matches(',').to_string();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        _ => return None,
                    },
                    '"' => break eq + 2 + i + 1,
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            rest = rest[end..].trim_start_matches(',');
        }
    }
    let value = rest.trim().split(' ').next()?.parse().ok()?;
    Some((name, labels, value))
}

/// A scrape in the Prometheus text format, with lookups by name and labels.
pub struct Metrics(pub String);

impl Metrics {
    /// Every sample: (name, labels, value).
    pub fn samples(&self) -> Vec<Sample> {
        self.0.lines().filter_map(parse_sample).collect()
    }

    /// Value of the sample `name` whose labels include every `(key, value)` in `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .lines()
            .filter_map(parse_sample)
            .find(|(n, l, _)| n == name && has_labels(l, labels))
            .map(|(_, _, v)| v)
    }

    /// Like `value` but 0 when the series does not exist (yet).
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Sum over every sample `name` whose labels include every `(key, value)` in `labels`
    /// (e.g. over all services); 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .lines()
            .filter_map(parse_sample)
            .filter(|(n, l, _)| n == name && has_labels(l, labels))
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.0
            .lines()
            .filter_map(parse_sample)
            .any(|(n, _, _)| n == name)
    }

    /// Sums of the samples `name` matching `labels`, by the value of their label `by`.
    pub fn by_label(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        by: &str,
    ) -> std::collections::BTreeMap<String, f64> {
        let mut m = std::collections::BTreeMap::new();
        for (_, l, v) in self
            .0
            .lines()
            .filter_map(parse_sample)
            .filter(|(n, l, _)| n == name && has_labels(l, labels))
        {
            if let Some((_, value)) = l.iter().find(|(k, _)| k == by) {
                *m.entry(value.clone()).or_insert(0.0) += v;
            }
        }
        m
    }

    /// Waits (up to 10 s) until `f` holds for a scrape of `agent`; returns the last scrape.
    pub fn wait_for(agent: &Agent, f: impl Fn(&Metrics) -> bool) -> Metrics {
        Self::wait_within(agent, Duration::from_secs(10), f)
    }

    /// Waits up to `timeout` until `f` holds for a scrape of `agent`; returns the last scrape.
    pub fn wait_within(agent: &Agent, timeout: Duration, f: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let m = agent.scrape();
            if f(&m) || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether `have` holds every `(key, value)` of `want`.
fn has_labels(have: &[(String, String)], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
}
