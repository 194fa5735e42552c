//! Redis: `commands`, `command` and `outcome` never panic, and a pipeline's byte count is
//! the sum of its complete commands' lengths.
#![no_main]

use insite_agent_fuzz::wire::resp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (cmds, used) = resp::commands(data);
    assert!(used <= data.len());
    assert!(cmds.len() <= data.len() && cmds.len() <= 4096);
    let mut sum = 0;
    for (i, c) in cmds.iter().enumerate() {
        // Names are cut to 32 bytes before a lossy decode (which at most triples them).
        assert!(c.name.len() <= 3 * 32);
        let _ = resp::is_read(&c.name);
        match c.len {
            Some(n) => sum += n,
            None => assert_eq!(i, cmds.len() - 1, "only the last command may be cut"),
        }
    }
    assert_eq!(sum, used);
    assert_eq!(resp::command(data), cmds.first().cloned());
    let _ = resp::outcome(data);
});
