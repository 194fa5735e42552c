//! Control requests: any line (bytes, as a client may send) either parses into a request or
//! is refused with a reason; a parsed request survives a round trip; replies are one line.
#![no_main]

use insite_agent_fuzz::protocol::{parse_request, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_request(line) {
        Ok(req) => {
            let again = serde_json::to_string(&req).expect("a request serializes");
            assert_eq!(parse_request(&again).as_ref(), Ok(&req));
            // Request is a closed set of commands.
            let _: &Request = &req;
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
