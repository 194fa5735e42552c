//! Wire format of the control socket.
//!
//! One JSON object per line each way. A request names its command in `cmd`:
//! `{"cmd":"status"}`, `{"cmd":"syscalls","window":"10s","limit":10}`,
//! `{"cmd":"connections","window":"60s"}`, `{"cmd":"map"}`. The reply is
//! `{"ok":true,"data":{...}}` or `{"ok":false,"error":"..."}`. Lines are capped in size; a
//! connection may send several requests.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    Syscalls {
        /// humantime duration, 1s..=60s; default 10s.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<String>,
        /// Rows per table; default 10.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
    /// Connection edges over a window (default 60s), busiest first: `limit` edges (default
    /// 1000, at most 10000) from `offset`.
    Connections {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<usize>,
    },
    /// The dependency map over a window (default 60s), of the busiest `limit` edges from
    /// `offset` (as `connections`).
    Map {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<usize>,
    },
    /// Attaches the syscall hooks for `duration` (humantime, up to 1h): every call is counted
    /// until it ends, also in sampled mode.
    TraceSyscalls {
        duration: String,
    },
    /// Top query fingerprints over a window (default 60s) and recent slow queries.
    Queries {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        window: Option<String>,
        /// postgresql, mysql or redis; all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<String>,
        /// p99, count or total (default).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sort: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(msg.into()),
        }
    }

    /// The line of a successful reply whose `data` is already JSON text (views serialize
    /// straight to text, without a `serde_json::Value` of the whole reply in between).
    pub fn ok_line(data_json: &str) -> String {
        let mut s = String::with_capacity(data_json.len() + 22);
        s.push_str(r#"{"ok":true,"data":"#);
        s.push_str(data_json);
        s.push_str("}\n");
        s
    }

    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"ok":false,"error":"internal: reply not encodable"}"#.into());
        s.push('\n');
        s
    }
}

/// Parses one request line; the error is what the client is told.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err(
            "empty request: send one JSON object per line, e.g. {\"cmd\":\"status\"}".into(),
        );
    }
    serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse_request(r#"{"cmd":"status"}"#), Ok(Request::Status {}));
        assert_eq!(
            parse_request(r#" {"cmd":"syscalls","window":"10s"} "#),
            Ok(Request::Syscalls {
                window: Some("10s".into()),
                limit: None
            })
        );
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "",
            "   ",
            "status",
            "{",
            "[]",
            "null",
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"{"cmd":"syscalls","window":5}"#,
            r#"{"cmd":"syscalls","limit":-1}"#,
            "\u{0}\u{1}\u{2}",
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn replies_are_single_lines() {
        let r = Response::error("multi\nline");
        let line = r.to_line();
        assert_eq!(line.matches('\n').count(), 1);
        let back: Response = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, r);
        let ok = Response::ok(serde_json::json!({"a": 1})).to_line();
        assert!(ok.starts_with(r#"{"ok":true,"data":"#));
        let raw = Response::ok_line(r#"{"a":1}"#);
        assert_eq!(raw, ok);
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Status {},
            Request::Syscalls {
                window: Some("60s".into()),
                limit: Some(5),
            },
            Request::Connections {
                window: Some("30s".into()),
                limit: Some(10),
                offset: Some(20),
            },
            Request::Map {
                window: None,
                limit: None,
                offset: None,
            },
            Request::Queries {
                window: Some("60s".into()),
                system: Some("redis".into()),
                sort: Some("p99".into()),
                limit: Some(5),
            },
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&s), Ok(r));
        }
    }
}
