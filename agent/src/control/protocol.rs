//! Wire format of the control socket.
//!
//! One JSON object per line each way. A request names its command in `cmd`, and its other
//! keys are the command's arguments: `{"cmd":"status"}`,
//! `{"cmd":"syscalls","window":"10s","limit":10}`, `{"cmd":"connections","window":"60s"}`,
//! `{"cmd":"map"}`. Each family declares its commands and their typed arguments next to its
//! views (`control::syscalls`, `net`, `db`). The reply is
//! `{"ok":true,"data":{...}}` or `{"ok":false,"error":"..."}`. Lines are capped in size; a
//! connection may send several requests.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

/// A request line: `cmd` names the command; every other key is one of its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub cmd: String,
    pub args: Map<String, Value>,
    /// Whether the client is root or the agent's own user (set by the server from the peer's
    /// credentials, never from the request): only they may change what the agent enforces.
    pub privileged: bool,
    /// The peer's uid (set by the server from its credentials): who acknowledged, who
    /// silenced.
    pub uid: Option<u32>,
}

/// A command's arguments, typed: serde parses and checks every value (windows, limits,
/// names) and refuses keys the command does not know.
pub trait Command: Serialize + DeserializeOwned {
    /// The command's name on the wire (`cmd`).
    const NAME: &'static str;
}

/// `status`: the agent, its probes and its event streams.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

impl Command for StatusRequest {
    const NAME: &'static str = "status";
}

impl Request {
    /// The request for a typed command.
    pub fn of<C: Command>(command: &C) -> Self {
        let args = match serde_json::to_value(command) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        Self {
            cmd: C::NAME.to_string(),
            args,
            privileged: false,
            uid: None,
        }
    }

    /// The command's typed arguments; the error is what the client is told.
    pub fn args<C: Command>(self) -> Result<C, String> {
        serde_json::from_value(Value::Object(self.args))
            .map_err(|e| format!("bad request: {}: {e}", C::NAME))
    }

    /// One line of JSON, newline included.
    pub fn to_line(&self) -> String {
        let mut m = Map::with_capacity(self.args.len() + 1);
        m.insert("cmd".into(), Value::String(self.cmd.clone()));
        for (k, v) in &self.args {
            m.insert(k.clone(), v.clone());
        }
        let mut s = Value::Object(m).to_string();
        s.push('\n');
        s
    }
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
    let v: Value = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let Value::Object(mut args) = v else {
        return Err("bad request: a request is a JSON object, e.g. {\"cmd\":\"status\"}".into());
    };
    match args.remove("cmd") {
        Some(Value::String(cmd)) => Ok(Request {
            cmd,
            args,
            privileged: false,
            uid: None,
        }),
        Some(_) => Err("bad request: `cmd` must be a string".into()),
        None => Err("bad request: missing `cmd`, e.g. {\"cmd\":\"status\"}".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let r = parse_request(r#"{"cmd":"status"}"#).unwrap();
        assert_eq!(r.cmd, "status");
        assert_eq!(r.args::<StatusRequest>(), Ok(StatusRequest {}));
        let r = parse_request(r#" {"cmd":"syscalls","window":"10s"} "#).unwrap();
        assert_eq!(r.cmd, "syscalls");
        assert_eq!(r.args["window"], "10s");
        let extra = parse_request(r#"{"cmd":"status","extra":1}"#).unwrap();
        assert!(extra.args::<StatusRequest>().unwrap_err().contains("extra"));
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
            r#"{"cmd":5}"#,
            r#"{"command":"status"}"#,
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
        let r = Request::of(&StatusRequest {});
        let line = r.to_line();
        assert_eq!(line, "{\"cmd\":\"status\"}\n");
        assert_eq!(parse_request(&line), Ok(r));
    }
}
