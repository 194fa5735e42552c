//! SQL text (decoded lossily, as the collectors decode a prefix): `operation` and
//! `fingerprint` never panic, and their output stays bounded by their input.
#![no_main]

use insite_agent_fuzz::wire::sql;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let op = sql::operation(&text);
    // The first keyword, upper-cased (same length), or OTHER.
    assert!(op == "OTHER" || (!op.is_empty() && op.len() <= text.len()));
    assert!(op.bytes().all(|c| !c.is_ascii_lowercase()));

    let fp = sql::fingerprint(&text);
    assert!(fp.len() <= sql::MAX_FINGERPRINT + '…'.len_utf8());
    // Each token gives at most itself and one space; `…` ends a cut fingerprint.
    assert!(
        fp.len() <= 2 * text.len() + '…'.len_utf8(),
        "{text:?} -> {fp:?}"
    );
    // Not idempotent, and not asserted: `a ::: :::E` gives `a:::::: E` (`::` `:` twice, the
    // spaces dropped), which reads back as `::` three times and then `a::::::E`. The fuzzer
    // finds such inputs within seconds.
});
