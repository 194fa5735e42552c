//! Blocking client for the CLI.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use super::protocol::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}{hint}")]
    Connect {
        path: String,
        #[source]
        error: std::io::Error,
        hint: &'static str,
    },
    #[error("control socket i/o")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection without a reply")]
    NoReply,
    #[error("unreadable reply from the agent: {0}")]
    BadReply(String),
    #[error("{0}")]
    Agent(String),
}

/// Sends one request and returns the reply's `data`.
pub fn request(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|error| {
        let hint = match error.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (the socket is for root and control.group members)"
            }
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                " (is insite-agent running? see --control-socket)"
            }
            _ => "",
        };
        ClientError::Connect {
            path: socket.display().to_string(),
            error,
            hint,
        }
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let line = req.to_line();
    // A refused client may find the connection closed before it writes: the agent's reply
    // (why it was refused) is still there to read, and says more than EPIPE.
    let written = (&stream).write_all(line.as_bytes());
    let mut reader = BufReader::new(&stream);
    let mut reply = String::new();
    let read = reader.read_line(&mut reply);
    match (written, read) {
        (_, Ok(n)) if n > 0 => {}
        (Err(e), _) => return Err(e.into()),
        (Ok(()), Err(e)) => return Err(e.into()),
        (Ok(()), Ok(_)) => return Err(ClientError::NoReply),
    }
    let resp: Response =
        serde_json::from_str(reply.trim_end()).map_err(|e| ClientError::BadReply(e.to_string()))?;
    if resp.ok {
        Ok(resp.data.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Agent(
            resp.error.unwrap_or_else(|| "request failed".into()),
        ))
    }
}
