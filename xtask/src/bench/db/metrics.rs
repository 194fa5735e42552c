//! The agent's Prometheus text: the series a run reads, and the counts per operation between
//! two scrapes.

use super::*;

/// The agent's scrape, parsed by the end-to-end tests' `Metrics`.
pub(crate) fn scrape(agent: &Agent) -> Result<Metrics> {
    Ok(Metrics(agent.scrape_with(false)?.1))
}

/// A scrape once the counts for `dest` have stopped changing (two scrapes `SETTLE_STEP` apart
/// agree), so that everything before it has been drained and counted.
pub(crate) fn settled(agent: &Agent, dest: &str) -> Result<Metrics> {
    let key = |m: &Metrics| m.sum(DURATION_COUNT, &[("destination", dest)]);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut prev = scrape(agent)?;
    loop {
        std::thread::sleep(SETTLE_STEP);
        let m = scrape(agent)?;
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
