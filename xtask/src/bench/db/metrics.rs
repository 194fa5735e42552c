//! The agent's Prometheus text: the series a run reads, and the counts per operation between
//! two scrapes.

use super::*;

pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
}

pub(crate) struct Metrics(pub(crate) Vec<Series>);

impl Metrics {
    pub(crate) fn parse(text: &str) -> Self {
        Self(text.lines().filter_map(parse_series).collect())
    }

    pub(crate) fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && filter
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
    }

    pub(crate) fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }

    /// Summed values of `name` by the value of `label`.
    pub(crate) fn by_label(
        &self,
        name: &str,
        filter: &[(&str, &str)],
        label: &str,
    ) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for s in self.matching(name, filter) {
            if let Some((_, v)) = s.labels.iter().find(|(k, _)| k == label) {
                *m.entry(v.clone()).or_insert(0.0) += s.value;
            }
        }
        m
    }

    pub(crate) fn label_values(
        &self,
        name: &str,
        filter: &[(&str, &str)],
        label: &str,
    ) -> Vec<String> {
        self.by_label(name, filter, label).into_keys().collect()
    }
}

/// `name{k="v",...} value` or `name value` (Prometheus text format); comments and blank
/// lines give `None`.
pub(crate) fn parse_series(line: &str) -> Option<Series> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = r.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            r = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Series {
        name,
        labels,
        value,
    })
}

/// GET /metrics over HTTP/1.0 (the body ends at the close: no chunking).
pub(crate) fn scrape(port: u16) -> Result<Metrics> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .context("sending the metrics request")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).context("reading /metrics")?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("/metrics: no end of the HTTP header")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        bail!("/metrics answered {status:?}");
    }
    Ok(Metrics::parse(body))
}

/// A scrape once the counts for `dest` have stopped changing (two scrapes `SETTLE_STEP` apart
/// agree), so that everything before it has been drained and counted.
pub(crate) fn settled(port: u16, dest: &str) -> Result<Metrics> {
    let key = |m: &Metrics| m.sum(DURATION_COUNT, &[("destination", dest)]);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut prev = scrape(port)?;
    loop {
        std::thread::sleep(SETTLE_STEP);
        let m = scrape(port)?;
        if key(&m) == key(&prev) {
            return Ok(m);
        }
        if Instant::now() > deadline {
            bail!("the agent's counts for {dest} were still changing after {SETTLE_TIMEOUT:?}");
        }
        prev = m;
    }
}

pub(crate) fn delta_by_op(
    a: &Metrics,
    b: &Metrics,
    system: &str,
    role: &str,
    dest: &str,
) -> BTreeMap<String, u64> {
    let f = [("system", system), ("role", role), ("destination", dest)];
    // Timed and untimed (beyond 64 in flight on a connection) together.
    let counts = |m: &Metrics| {
        let mut c = m.by_label(DURATION_COUNT, &f, "operation");
        for (op, v) in m.by_label("insite_db_queries_untimed_total", &f, "operation") {
            *c.entry(op).or_insert(0.0) += v;
        }
        c
    };
    let before = counts(a);
    counts(b)
        .into_iter()
        .map(|(op, v)| {
            (
                op.clone(),
                (v - before.get(&op).copied().unwrap_or(0.0)).round() as u64,
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Runs with the agent
// ---------------------------------------------------------------------------------------------
