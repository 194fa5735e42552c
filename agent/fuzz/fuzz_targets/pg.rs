//! PostgreSQL frontend messages: `request` and `is_startup` never panic, a startup packet is
//! never a request, and a shorter prefix of the same bytes never tells a different story.
#![no_main]

use insite_agent_fuzz::wire::pg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let startup = pg::is_startup(data);
    let Some(whole) = pg::request(data) else {
        return;
    };
    assert!(!startup, "a startup packet read as a request");
    for s in [&whole.sql, &whole.parsed_statement, &whole.bound_statement]
        .into_iter()
        .flatten()
    {
        assert!(s.len() <= 3 * data.len());
    }
    assert!(whole.parsed_statement.is_none() || whole.sql.is_some());
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        let Some(part) = pg::request(&data[..cut]) else {
            continue;
        };
        if let (Some(p), Some(w)) = (&part.sql, &whole.sql) {
            assert!(w.starts_with(p.as_str()), "{p:?} is not a prefix of {w:?}");
            assert!(part.truncated || p == w);
        }
    }
});
