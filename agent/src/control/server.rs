//! Control socket server: a unix socket, file mode and SO_PEERCRED both guard it.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{watch, Semaphore},
};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tracing::{debug, info, warn};

use super::{
    connections,
    protocol::{parse_request, Request, Response},
    queries::{self, Sort},
    views,
};
use crate::{
    config::{Config, ControlConfig},
    store::{db::System, SharedStore},
};

/// Connections served at once; more are told to retry.
const MAX_CONNECTIONS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control.group: no group named {0:?} on this host")]
    NoSuchGroup(String),
    #[error("control socket {path}: another agent is already listening there")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who may talk to the socket, besides root and the agent's own uid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
}

impl Access {
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == nix::unistd::geteuid().as_raw()
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

/// Binds the socket with its mode and group. Replaces a stale socket file, refuses to steal a
/// live one.
pub fn bind(cfg: &ControlConfig) -> Result<(UnixListener, Access), ControlError> {
    let path = cfg.socket.as_path();
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut access = Access {
        uids: cfg.allowed_uids.clone(),
        gids: cfg.allowed_gids.clone(),
    };
    let group = match &cfg.group {
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ControlError::NoSuchGroup(name.clone()))?;
            access.gids.push(g.gid.as_raw());
            Some(g.gid)
        }
        None => None,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| io(std::io::Error::from_raw_os_error(e as i32)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    info!(path = %path.display(), mode = format!("{mode:o}"), "control socket listening");
    Ok((listener, access))
}

/// What a connection handler needs.
#[derive(Clone)]
pub struct Context {
    pub store: SharedStore,
    pub config: watch::Receiver<Arc<Config>>,
    pub access: Access,
}

pub async fn serve(listener: UnixListener, ctx: Context, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::daemon::shutdown_requested(&mut shutdown) => return,
        };
        let ctx = ctx.clone();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    handle(stream, ctx).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tokio::spawn(async move {
                    let mut f = Framed::new(stream, line_codec(256));
                    let _ = f
                        .send(
                            Response::error("busy: too many control connections, retry")
                                .to_line()
                                .trim_end(),
                        )
                        .await;
                });
            }
        }
    }
}

async fn handle(stream: UnixStream, ctx: Context) {
    let cred = stream.peer_cred();
    let (max_bytes, timeout) = {
        let c = ctx.config.borrow();
        (c.control.max_request_bytes, c.control.request_timeout)
    };
    let mut framed = Framed::new(stream, line_codec(max_bytes));
    let reply = |r: Response| r.to_line().trim_end().to_string();

    match cred {
        Ok(c) if ctx.access.allows(c.uid(), c.gid()) => {
            debug!(uid = c.uid(), pid = ?c.pid(), "control client connected");
        }
        Ok(c) => {
            warn!(uid = c.uid(), gid = c.gid(), pid = ?c.pid(), "control client refused");
            let _ = framed
                .send(reply(Response::error(format!(
                    "permission denied: uid {} gid {} may not use this socket (allowed: root, control.allowed_uids, control.group, control.allowed_gids)",
                    c.uid(),
                    c.gid()
                ))))
                .await;
            return;
        }
        Err(e) => {
            warn!(error = %e, "control client without credentials refused");
            return;
        }
    }

    loop {
        let next = tokio::time::timeout(timeout, framed.next()).await;
        let line = match next {
            Ok(Some(Ok(bytes))) => bytes,
            Ok(Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded))) => {
                let _ = framed
                    .send(reply(Response::error(format!(
                        "request too large: the limit is {max_bytes} bytes per line"
                    ))))
                    .await;
                return;
            }
            Ok(Some(Err(AnyDelimiterCodecError::Io(e)))) => {
                debug!(error = %e, "control connection error");
                return;
            }
            Ok(None) => return,
            Err(_) => {
                let _ = framed
                    .send(reply(Response::error(format!(
                        "timed out: no complete request within {}",
                        humantime::format_duration(timeout)
                    ))))
                    .await;
                return;
            }
        };
        // Bytes, not str: a line that is not UTF-8 gets an error reply like any other bad
        // request, and the connection goes on.
        let response = match std::str::from_utf8(&line) {
            Ok(text) => match parse_request(text) {
                Ok(req) => dispatch(&ctx, req),
                Err(e) => Response::error(e),
            },
            Err(_) => Response::error("bad request: not UTF-8"),
        };
        if framed.send(reply(response)).await.is_err() {
            return;
        }
    }
}

/// Newline-delimited frames of at most `max` bytes.
fn line_codec(max: usize) -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), max)
}

fn dispatch(ctx: &Context, req: Request) -> Response {
    let cfg = ctx.config.borrow().clone();
    let Ok(store) = ctx.store.read() else {
        return Response::error("internal: store unavailable");
    };
    let value = match req {
        Request::Status {} => serde_json::to_value(views::status(&store, &cfg)),
        Request::Syscalls { window, limit } => {
            let window = match views::parse_window(window.as_deref()) {
                Ok(w) => w,
                Err(e) => return Response::error(e),
            };
            match views::syscalls(&store, &cfg, window, limit.unwrap_or(views::DEFAULT_LIMIT)) {
                Ok(v) => serde_json::to_value(v),
                Err(e) => return Response::error(e),
            }
        }
        Request::Connections { window } => {
            match net_window(window.as_deref()).and_then(|w| connections::connections(&store, w)) {
                Ok(v) => serde_json::to_value(v),
                Err(e) => return Response::error(e),
            }
        }
        Request::Map { window } => {
            match net_window(window.as_deref()).and_then(|w| connections::map(&store, w)) {
                Ok(v) => serde_json::to_value(v),
                Err(e) => return Response::error(e),
            }
        }
        Request::Queries {
            window,
            system,
            sort,
            limit,
        } => {
            let args = (|| -> Result<_, String> {
                let window = match window.as_deref() {
                    None => queries::DEFAULT_WINDOW,
                    Some(w) => views::parse_window(Some(w))?,
                };
                let system = match system.as_deref() {
                    None | Some("") | Some("all") => None,
                    Some(s) => Some(System::parse(s).ok_or_else(|| {
                        format!("system {s:?}: must be postgresql, mysql or redis")
                    })?),
                };
                let sort = sort.as_deref().map_or(Ok(Sort::default()), Sort::parse)?;
                Ok((window, system, sort))
            })();
            match args.and_then(|(w, s, o)| {
                queries::queries(&store, s, w, o, limit.unwrap_or(queries::DEFAULT_LIMIT))
            }) {
                Ok(v) => serde_json::to_value(v),
                Err(e) => return Response::error(e),
            }
        }
    };
    match value {
        Ok(v) => Response::ok(v),
        Err(e) => Response::error(format!("internal: {e}")),
    }
}

fn net_window(w: Option<&str>) -> Result<std::time::Duration, String> {
    match w {
        None => Ok(connections::DEFAULT_WINDOW),
        Some(w) => views::parse_window(Some(w)),
    }
}

/// Removes the socket file at shutdown (only if it is still ours: a socket).
pub fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %e, "could not remove control socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::ConfigSource, store::Store};
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    async fn start(cfg: Config) -> (tempfile::TempDir, PathBuf, watch::Sender<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let mut cfg = cfg;
        cfg.control.socket = path.clone();
        let (listener, access) = bind(&cfg.control).unwrap();
        let store = Arc::new(std::sync::RwLock::new(Store::new(
            ConfigSource::Defaults,
            8,
        )));
        let (_tx, rx) = watch::channel(Arc::new(cfg));
        let (stx, srx) = watch::channel(false);
        let ctx = Context {
            store,
            config: rx,
            access,
        };
        tokio::spawn(async move {
            let _keep = _tx;
            serve(listener, ctx, srx).await
        });
        (dir, path, stx)
    }

    async fn roundtrip(path: &Path, payload: &[u8]) -> Vec<Response> {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(payload).await.unwrap();
        s.shutdown().await.unwrap();
        let mut lines = BufReader::new(s).lines();
        let mut out = Vec::new();
        while let Ok(Some(l)) = lines.next_line().await {
            out.push(serde_json::from_str(&l).unwrap());
        }
        out
    }

    #[tokio::test]
    async fn socket_is_private_by_default() {
        let (_d, path, _s) = start(Config::default()).await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn several_requests_on_one_connection_and_errors_in_between() {
        let (_d, path, _s) = start(Config::default()).await;
        let replies = roundtrip(
            &path,
            b"{\"cmd\":\"status\"}\nnot json\n{\"cmd\":\"syscalls\",\"window\":\"2h\"}\n{\"cmd\":\"status\"}\n",
        )
        .await;
        assert_eq!(replies.len(), 4);
        assert!(replies[0].ok);
        assert!(!replies[1].ok);
        assert!(replies[1].error.as_ref().unwrap().contains("bad request"));
        assert!(!replies[2].ok);
        assert!(replies[2].error.as_ref().unwrap().contains("window"));
        assert!(replies[3].ok);
    }

    #[tokio::test]
    async fn oversized_request_is_refused_and_server_survives() {
        let mut cfg = Config::default();
        cfg.control.max_request_bytes = 256;
        let (_d, path, _s) = start(cfg).await;
        let mut big = vec![b'x'; 10_000];
        big.push(b'\n');
        let replies = roundtrip(&path, &big).await;
        assert_eq!(replies.len(), 1);
        assert!(replies[0].error.as_ref().unwrap().contains("too large"));
        let again = roundtrip(&path, b"{\"cmd\":\"status\"}\n").await;
        assert!(again[0].ok);
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let mut cfg = Config::default();
        cfg.control.request_timeout = Duration::from_millis(200);
        let (_d, path, _s) = start(cfg).await;
        let s = UnixStream::connect(&path).await.unwrap();
        let mut lines = BufReader::new(s).lines();
        let l = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let r: Response = serde_json::from_str(&l).unwrap();
        assert!(r.error.unwrap().contains("timed out"));
    }

    #[tokio::test]
    async fn live_socket_is_not_stolen_and_stale_one_is_replaced() {
        let (_d, path, _s) = start(Config::default()).await;
        let mut cfg = Config::default();
        cfg.control.socket = path.clone();
        assert!(matches!(
            bind(&cfg.control),
            Err(ControlError::InUse { .. })
        ));

        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        cfg.control.socket = stale.clone();
        let (_l, _) = bind(&cfg.control).unwrap();
        remove_socket(&stale);
        assert!(!stale.exists());
    }

    #[test]
    fn access_rules() {
        let a = Access {
            uids: vec![1000],
            gids: vec![50],
        };
        assert!(a.allows(0, 0));
        assert!(a.allows(1000, 1000));
        assert!(a.allows(1234, 50));
        assert!(!a.allows(65534, 65534));
    }

    #[test]
    fn unknown_group_is_a_named_error() {
        let c = ControlConfig {
            group: Some("no-such-group-insite".into()),
            ..ControlConfig::default()
        };
        let e = bind(&c).unwrap_err().to_string();
        assert!(e.contains("control.group"), "{e}");
    }
}
