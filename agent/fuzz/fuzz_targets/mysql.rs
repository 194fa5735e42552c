//! MySQL commands: `request` and `operation` never panic, `truncated` only when the prefix is
//! shorter than the payload, and a shorter prefix never tells a different story.
//!
//! Input: one byte for the payload's length (0xff: half the prefix, else the prefix plus that
//! many bytes), then the prefix.
#![no_main]

use insite_agent_fuzz::wire::mysql;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&extra, buf)) = data.split_first() else {
        return;
    };
    let len = match extra {
        0xff => buf.len() / 2,
        n => buf.len() + usize::from(n),
    };
    let Some(whole) = mysql::request(buf, len) else {
        return;
    };
    assert!(!whole.truncated || buf.len() < len);
    assert!(whole.sql.as_ref().map_or(0, String::len) <= 3 * buf.len());
    assert!(!mysql::operation(&whole).is_empty());
    let held = buf.len().min(len);
    for cut in [held / 2, held.saturating_sub(1)] {
        let Some(part) = mysql::request(&buf[..cut], len) else {
            continue;
        };
        assert_eq!(part.command, whole.command);
        if let (Some(p), Some(w)) = (&part.sql, &whole.sql) {
            assert!(w.starts_with(p.as_str()), "{p:?} is not a prefix of {w:?}");
        }
        let _ = mysql::operation(&part);
    }
});
