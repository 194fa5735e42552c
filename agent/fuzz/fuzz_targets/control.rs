//! Control requests: any line (bytes, as a client may send) either parses into a request or
//! is refused with a reason; a parsed request survives a round trip; typed arguments parse
//! or are refused; replies are one line.
#![no_main]

use insite_agent_fuzz::protocol::{parse_request, Response, StatusRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(line) {
        Ok(req) => {
            let again = req.to_line();
            assert_eq!(again.matches('\n').count(), 1);
            // serde_json reads a long decimal to the nearest float only approximately, so
            // the first re-encoding may round an argument; from then on it is stable.
            let once = parse_request(&again).expect("a request's own line parses");
            assert_eq!(once.cmd, req.cmd);
            assert_eq!(parse_request(&once.to_line()).as_ref(), Ok(&once));
            // Typed arguments either parse or are refused with a reason.
            if let Err(reason) = req.args::<StatusRequest>() {
                assert!(!reason.is_empty());
            }
        }
        Err(reason) => {
            assert!(!reason.is_empty());
            // The refusal goes back to the client as one line of JSON.
            let reply = Response::error(reason).to_line();
            assert_eq!(reply.matches('\n').count(), 1);
            assert!(serde_json::from_str::<Response>(reply.trim_end()).is_ok());
        }
    }
});
