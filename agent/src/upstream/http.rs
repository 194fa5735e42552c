//! The one HTTP call upstream receivers need: POST a JSON body, with a deadline, to a
//! plain-HTTP endpoint. One connection per request: notifications are rare, and a fresh
//! connection after an outage needs no pool to notice that the peer came back.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Reply bodies read at most (an error message is enough).
const MAX_REPLY_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port` as written (a name is resolved at each connect).
    pub authority: String,
    /// Path prefix, without a trailing slash (`""` or `/alertmanager`).
    pub prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("https is not supported: the agent has no TLS client yet; point it at a plain-HTTP address (an Alertmanager on loopback, or a local TLS proxy)")]
    Https,
    #[error("must start with http://")]
    Scheme,
    #[error("has no host")]
    NoHost,
    #[error("must not carry a query, fragment or credentials")]
    Extra,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, EndpointError> {
        if url.starts_with("https://") {
            return Err(EndpointError::Https);
        }
        let rest = url.strip_prefix("http://").ok_or(EndpointError::Scheme)?;
        if rest.contains(['?', '#', '@'])
            || rest.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(EndpointError::Extra);
        }
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if host.is_empty() {
            return Err(EndpointError::NoHost);
        }
        let authority = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        Ok(Endpoint {
            authority,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// What a POST got back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// POSTs `body` to `prefix + path` with the given extra headers.
pub async fn post(
    ep: &Endpoint,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
    timeout: Duration,
) -> Result<Reply, PostError> {
    tokio::time::timeout(timeout, post_inner(ep, path, headers, body))
        .await
        .map_err(|_| PostError::Timeout(timeout))?
}

async fn post_inner(
    ep: &Endpoint,
    path: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> Result<Reply, PostError> {
    let stream = tokio::net::TcpStream::connect(&ep.authority)
        .await
        .map_err(|e| PostError::Connect(ep.authority.clone(), e))?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(match format!("{}{path}", ep.prefix) {
            p if p.is_empty() => "/".to_string(),
            p => p,
        })
        .header(hyper::header::HOST, &ep.authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("insite-agent/", env!("CARGO_PKG_VERSION")),
        );
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let reply = send.send_request(req.body(Full::new(body))?).await?;
    let status = reply.status().as_u16();
    let body = Limited::new(reply.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    conn.abort();
    Ok(Reply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_prefix_and_port() {
        let e = Endpoint::parse("http://127.0.0.1:9093").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.prefix.as_str()),
            ("127.0.0.1:9093", "")
        );
        let e = Endpoint::parse("http://am.local/alertmanager/").unwrap();
        assert_eq!(
            (e.authority.as_str(), e.prefix.as_str()),
            ("am.local:80", "/alertmanager")
        );
        let e = Endpoint::parse("http://[::1]:9093/").unwrap();
        assert_eq!(e.authority, "[::1]:9093");
        assert!(matches!(
            Endpoint::parse("https://x"),
            Err(EndpointError::Https)
        ));
        assert!(matches!(
            Endpoint::parse("ftp://x"),
            Err(EndpointError::Scheme)
        ));
        assert!(matches!(
            Endpoint::parse("http://"),
            Err(EndpointError::NoHost)
        ));
        assert!(matches!(
            Endpoint::parse("http://u:p@x:1"),
            Err(EndpointError::Extra)
        ));
        assert!(matches!(
            Endpoint::parse("http://x:1/a\nb"),
            Err(EndpointError::Extra)
        ));
    }
}
