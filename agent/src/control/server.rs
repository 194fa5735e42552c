//! Control socket server: a unix socket, file mode and SO_PEERCRED both guard it.
//!
//! Nothing a client does can hold the socket for others: a request must arrive within
//! `control.request_timeout`, and a reply be taken within the same time; each uid other than
//! root and the agent's own holds at most `control.max_connections_per_uid` connections, and
//! a share of `control.max_connections` is kept for root. Replies are built for the page asked
//! (`limit`, `offset`) and the bytes of replies in flight are bounded.

use std::{
    collections::HashMap,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
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
    db::{self, Sort},
    net::{self, Page},
    protocol::{parse_request, Request, Response},
    status, syscalls,
};
use crate::{
    config::{Config, ControlConfig},
    store::{db::System, SharedStore},
};

/// Bytes of replies being written at once, over every connection: replies wait for room
/// (within the reply timeout) rather than pile up in memory behind slow readers.
pub const REPLY_BUDGET_BYTES: usize = 16 << 20;
/// Budget is counted in KiB.
const KIB: usize = 1024;
/// A reply at least this large is followed by returning free heap memory to the system.
const TRIM_AFTER_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control.group: no group named {0:?} on this host")]
    NoSuchGroup(String),
    #[error("control socket {path}: another agent is already listening there")]
    InUse { path: PathBuf },
    #[error(
        "control socket {path}: something that is not a socket is there ({kind}); refusing to replace it (choose another path, or remove it yourself)"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error(
        "control socket {path}: its directory {dir} may be written by other users and is not sticky; use a directory only root can write to (e.g. /run/insite-agent)"
    )]
    UnsafeDirectory { path: PathBuf, dir: PathBuf },
    #[error("control socket {path}")]
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
        privileged(uid) || self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

/// Root and the agent's own uid: they may use the slots kept back from everyone else.
fn privileged(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// The socket file we created (device and inode), so that shutdown removes that one and no
/// other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
}

/// Binds the socket with its mode and group. Replaces a stale socket file, refuses to steal a
/// live one, and never removes anything that is not a socket.
pub fn bind(cfg: &ControlConfig) -> Result<(UnixListener, Access, SocketFile), ControlError> {
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
        // Anyone who may rename files in the directory could swap the socket for a link
        // between our bind and our chown.
        let meta = std::fs::metadata(dir).map_err(io)?;
        let mode = meta.mode();
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(ControlError::UnsafeDirectory {
                path: path.to_path_buf(),
                dir: dir.to_path_buf(),
            });
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse {
                    path: path.to_path_buf(),
                });
            }
            info!(path = %path.display(), "removing a stale control socket (nothing answers there)");
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(meta) => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
                kind: file_kind(&meta.file_type()),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    // The mode is set as the socket is created (umask), not by a later chmod through the path.
    // The mask is the process's: two binds at once (tests run in parallel) would each restore
    // the other's mask, so they take turns.
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = UMASK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // SAFETY: umask only swaps the process's file creation mask; nothing else creates files
    // while the agent starts.
    let old = unsafe { libc::umask(0o777 & !mode) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the mask.
    unsafe { libc::umask(old) };
    drop(turn);
    let listener = bound.map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if let Some(gid) = group {
        // lchown: the path is ours and a socket (just checked); a link put there meanwhile is
        // changed itself, never followed.
        std::os::unix::fs::lchown(path, None, Some(gid.as_raw())).map_err(io)?;
    }
    info!(path = %path.display(), mode = format!("{mode:o}"), "control socket listening");
    Ok((
        listener,
        access,
        SocketFile {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "a special file"
    }
}

/// What a connection handler needs.
#[derive(Clone)]
pub struct Context {
    pub store: SharedStore,
    pub config: watch::Receiver<Arc<Config>>,
    pub access: Access,
    /// Trace requests for the syscall sampler; None when the syscall probe is not attached.
    pub syscall_trace: Option<Arc<crate::probes::sampling::TraceUntil>>,
}

/// Connection slots: at most `max` in all, at most `per_uid` for each unprivileged uid, and
/// `max / 8` (at least one) that only root and the agent's uid may take.
#[derive(Debug)]
struct Slots {
    max: usize,
    per_uid: usize,
    held: Mutex<(usize, HashMap<u32, usize>)>,
}

/// A taken slot, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    fn new(max: usize, per_uid: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_uid,
            held: Mutex::new((0, HashMap::new())),
        })
    }

    fn reserved(&self) -> usize {
        (self.max / 8).max(1)
    }

    fn take(self: &Arc<Self>, uid: u32) -> Option<Slot> {
        let mut held = self.held.lock().ok()?;
        let (total, by_uid) = &mut *held;
        let mine = by_uid.get(&uid).copied().unwrap_or(0);
        let room = if privileged(uid) {
            *total < self.max
        } else {
            *total < self.max - self.reserved() && mine < self.per_uid
        };
        if !room {
            return None;
        }
        *total += 1;
        by_uid.insert(uid, mine + 1);
        Some(Slot {
            slots: self.clone(),
            uid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.slots.held.lock() {
            let (total, by_uid) = &mut *held;
            *total = total.saturating_sub(1);
            if let Some(n) = by_uid.get_mut(&self.uid) {
                *n -= 1;
                if *n == 0 {
                    by_uid.remove(&self.uid);
                }
            }
        }
    }
}

pub async fn serve(
    listener: UnixListener,
    ctx: Context,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (max, per_uid) = {
        let c = ctx.config.borrow();
        (c.control.max_connections, c.control.max_connections_per_uid)
    };
    let slots = Slots::new(max, per_uid);
    let budget = Arc::new(Semaphore::new(REPLY_BUDGET_BYTES / KIB));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin; the fd reserve (see
                    // `limits`) keeps this rare.
                    warn!(error = %crate::probes::error_chain(&e), "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let ctx = ctx.clone();
        let slots = slots.clone();
        let budget = budget.clone();
        tokio::spawn(async move { admit(stream, ctx, slots, budget).await });
    }
}

/// Checks who is calling and whether they have a slot left, then serves the connection.
async fn admit(stream: UnixStream, ctx: Context, slots: Arc<Slots>, budget: Arc<Semaphore>) {
    let timeout = ctx.config.borrow().control.request_timeout;
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %crate::probes::error_chain(&e), "control client without credentials refused");
            return;
        }
    };
    let mut framed = Framed::new(stream, line_codec(256));
    if !ctx.access.allows(cred.uid(), cred.gid()) {
        warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "control client refused");
        let msg = format!(
            "permission denied: uid {} gid {} may not use this socket (allowed: root, control.allowed_uids, control.group, control.allowed_gids)",
            cred.uid(),
            cred.gid()
        );
        let _ = send_line(&mut framed, &Response::error(msg).to_line(), timeout).await;
        return;
    }
    let Some(slot) = slots.take(cred.uid()) else {
        debug!(uid = cred.uid(), "control client turned away: no slot left");
        let msg = format!(
            "busy: too many control connections (at most {} per uid, {} in all), retry",
            slots.per_uid, slots.max
        );
        let _ = send_line(&mut framed, &Response::error(msg).to_line(), timeout).await;
        return;
    };
    debug!(uid = cred.uid(), pid = ?cred.pid(), "control client connected");
    let stream = framed.into_inner();
    handle(stream, ctx, budget).await;
    drop(slot);
}

/// Writes one reply line within `timeout`; a client that does not take it loses the
/// connection.
async fn send_line(
    framed: &mut Framed<UnixStream, AnyDelimiterCodec>,
    line: &str,
    timeout: Duration,
) -> Result<(), ()> {
    match tokio::time::timeout(timeout, framed.send(line.trim_end())).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

async fn handle(stream: UnixStream, ctx: Context, budget: Arc<Semaphore>) {
    let (max_bytes, timeout) = {
        let c = ctx.config.borrow();
        (c.control.max_request_bytes, c.control.request_timeout)
    };
    let mut framed = Framed::new(stream, line_codec(max_bytes));
    loop {
        let next = tokio::time::timeout(timeout, framed.next()).await;
        let line = match next {
            Ok(Some(Ok(bytes))) => bytes,
            Ok(Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded))) => {
                let msg = format!("request too large: the limit is {max_bytes} bytes per line");
                let _ = send_line(&mut framed, &Response::error(msg).to_line(), timeout).await;
                return;
            }
            Ok(Some(Err(AnyDelimiterCodecError::Io(e)))) => {
                debug!(error = %crate::probes::error_chain(&e), "control connection error");
                return;
            }
            Ok(None) => return,
            Err(_) => {
                let msg = format!(
                    "timed out: no complete request within {}",
                    humantime::format_duration(timeout)
                );
                let _ = send_line(&mut framed, &Response::error(msg).to_line(), timeout).await;
                return;
            }
        };
        // Bytes, not str: a line that is not UTF-8 gets an error reply like any other bad
        // request, and the connection goes on.
        let reply = match std::str::from_utf8(&line) {
            Ok(text) => match parse_request(text) {
                Ok(req) => match dispatch(&ctx, req) {
                    Ok(data) => Response::ok_line(&data),
                    Err(e) => Response::error(e).to_line(),
                },
                Err(e) => Response::error(e).to_line(),
            },
            Err(_) => Response::error("bad request: not UTF-8").to_line(),
        };
        drop(line);
        let kib = u32::try_from(reply.len().div_ceil(KIB).max(1)).unwrap_or(u32::MAX);
        let permit = match tokio::time::timeout(timeout, budget.acquire_many(kib)).await {
            Ok(Ok(p)) => p,
            // Larger than the whole budget, or no room in time: say so in a short reply.
            _ => {
                let msg = format!(
                    "reply too large to send now ({} bytes): ask for a smaller page (limit)",
                    reply.len()
                );
                if send_line(&mut framed, &Response::error(msg).to_line(), timeout)
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
        };
        let sent = send_line(&mut framed, &reply, timeout).await;
        let large = reply.len() >= TRIM_AFTER_BYTES;
        drop(reply);
        drop(permit);
        if large {
            crate::limits::trim_heap();
        }
        if sent.is_err() {
            debug!("control client did not take its reply in time; connection closed");
            return;
        }
    }
}

/// Newline-delimited frames of at most `max` bytes.
fn line_codec(max: usize) -> AnyDelimiterCodec {
    AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), b"\n".to_vec(), max)
}

/// Runs one request; `Ok` is the reply's `data` as JSON text.
/// Attaches the syscall hooks for `duration` (sampled mode; full mode has them attached).
fn trace_syscalls(ctx: &Context, cfg: &Config, duration: &str) -> Result<String, String> {
    use crate::probes::sampling::MAX_TRACE;
    let d = humantime::parse_duration(duration)
        .map_err(|e| format!("duration {duration:?}: {e} (e.g. \"30s\")"))?;
    if d.is_zero() || d > MAX_TRACE {
        return Err(format!(
            "duration {duration:?}: must be more than 0s and at most {}",
            humantime::format_duration(MAX_TRACE)
        ));
    }
    let Some(trace) = &ctx.syscall_trace else {
        return Err("the syscall probe is not attached: nothing to trace".into());
    };
    let until = std::time::Instant::now() + d;
    // A longer trace already running is kept.
    trace.send_modify(|t| *t = Some(t.map_or(until, |t| t.max(until))));
    let until = (*trace.borrow()).unwrap_or(until);
    let left = until.saturating_duration_since(std::time::Instant::now());
    let until_unix_ms = std::time::SystemTime::now()
        .checked_add(left)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |t| t.as_millis() as u64);
    let v = syscalls::SyscallTraceView {
        mode: cfg.syscalls.mode.as_str().into(),
        seconds_left: left.as_secs_f64(),
        until_unix_ms,
    };
    serde_json::to_string(&v).map_err(|e| format!("internal: {e}"))
}

fn dispatch(ctx: &Context, req: Request) -> Result<String, String> {
    let cfg = ctx.config.borrow().clone();
    let Ok(store) = ctx.store.read() else {
        return Err("internal: store unavailable".into());
    };
    let json = |v: Result<String, serde_json::Error>| v.map_err(|e| format!("internal: {e}"));
    match req {
        Request::TraceSyscalls { duration } => trace_syscalls(ctx, &cfg, &duration),
        Request::Status {} => json(serde_json::to_string(&status::status(&store, &cfg))),
        Request::Syscalls { window, limit } => {
            let window = status::parse_window(window.as_deref())?;
            let v =
                syscalls::syscalls(&store, &cfg, window, limit.unwrap_or(status::DEFAULT_LIMIT))?;
            json(serde_json::to_string(&v))
        }
        Request::Connections {
            window,
            limit,
            offset,
        } => {
            let v = net::connections(
                &store,
                net_window(window.as_deref())?,
                Page::new(offset, limit)?,
            )?;
            json(serde_json::to_string(&v))
        }
        Request::Map {
            window,
            limit,
            offset,
        } => {
            let v = net::map(
                &store,
                net_window(window.as_deref())?,
                Page::new(offset, limit)?,
            )?;
            json(serde_json::to_string(&v))
        }
        Request::Queries {
            window,
            system,
            sort,
            limit,
        } => {
            let window = match window.as_deref() {
                None => db::DEFAULT_WINDOW,
                Some(w) => status::parse_window(Some(w))?,
            };
            let system =
                match system.as_deref() {
                    None | Some("") | Some("all") => None,
                    Some(s) => Some(System::parse(s).ok_or_else(|| {
                        format!("system {s:?}: must be postgresql, mysql or redis")
                    })?),
                };
            let sort = sort.as_deref().map_or(Ok(Sort::default()), Sort::parse)?;
            let v = db::queries(
                &store,
                system,
                window,
                sort,
                limit.unwrap_or(db::DEFAULT_LIMIT),
            )?;
            json(serde_json::to_string(&v))
        }
    }
}

fn net_window(w: Option<&str>) -> Result<std::time::Duration, String> {
    match w {
        None => Ok(net::DEFAULT_WINDOW),
        Some(w) => status::parse_window(Some(w)),
    }
}

/// Removes the socket file at shutdown if it is still the one we bound (the same inode): never
/// another agent's socket, nor a file someone put there since.
pub fn remove_socket(path: &Path, ours: SocketFile) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        let same = meta.dev() == ours.dev && meta.ino() == ours.ino;
        if meta.file_type().is_socket() && same {
            if let Err(e) = std::fs::remove_file(path) {
                warn!(path = %path.display(), error = %crate::probes::error_chain(&e), "could not remove control socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::ConfigSource, store::Store};
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

    async fn start(cfg: Config) -> (tempfile::TempDir, PathBuf, tokio_util::sync::DropGuard) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let mut cfg = cfg;
        cfg.control.socket = path.clone();
        let (listener, access, _) = bind(&cfg.control).unwrap();
        let store = Arc::new(std::sync::RwLock::new(Store::new(
            ConfigSource::Defaults,
            8,
        )));
        let (_tx, rx) = watch::channel(Arc::new(cfg));
        let stop = tokio_util::sync::CancellationToken::new();
        let serving = stop.clone();
        let ctx = Context {
            store,
            config: rx,
            access,
            syscall_trace: None,
        };
        tokio::spawn(async move {
            let _keep = _tx;
            serve(listener, ctx, serving).await
        });
        (dir, path, stop.drop_guard())
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
        let (_l, _, ours) = bind(&cfg.control).unwrap();
        remove_socket(&stale, ours);
        assert!(!stale.exists());
    }

    #[test]
    fn anything_but_a_socket_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hosts");
        std::fs::write(&file, "precious\n").unwrap();
        let sub = dir.path().join("subdir");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (path, kind) in [
            (&file, "regular file"),
            (&sub, "directory"),
            (&link, "symbolic link"),
        ] {
            let c = ControlConfig {
                socket: path.clone(),
                ..ControlConfig::default()
            };
            let e = bind(&c).unwrap_err();
            assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
            assert!(e.to_string().contains(kind), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious\n");
        assert!(sub.is_dir());
    }

    #[tokio::test]
    async fn a_socket_in_a_world_writable_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let c = ControlConfig {
            socket: dir.path().join("ctl.sock"),
            ..ControlConfig::default()
        };
        assert!(matches!(
            bind(&c),
            Err(ControlError::UnsafeDirectory { .. })
        ));
        // Sticky (as /tmp): others cannot rename or remove our socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let (_l, _, ours) = bind(&c).unwrap();
        let mode = std::fs::symlink_metadata(&c.socket).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A socket that is not ours (another inode) is left alone at shutdown.
        std::fs::remove_file(&c.socket).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&c.socket).unwrap());
        remove_socket(&c.socket, ours);
        assert!(c.socket.exists());
    }

    #[test]
    fn slots_per_uid_and_kept_for_root() {
        let slots = Slots::new(16, 4);
        // uid 1000 gets 4, no more.
        let a: Vec<Slot> = (0..4).filter_map(|_| slots.take(1000)).collect();
        assert_eq!(a.len(), 4);
        assert!(slots.take(1000).is_none());
        // Other uids fill up to max - reserved (16 - 2)...
        let b: Vec<Slot> = (0..3)
            .flat_map(|u| (0..4).map(move |_| u))
            .filter_map(|u| slots.take(2000 + u))
            .collect();
        assert_eq!(a.len() + b.len(), 14);
        assert!(slots.take(3000).is_none());
        // ...and root still gets the two kept back.
        let r1 = slots.take(0);
        let r2 = slots.take(0);
        assert!(r1.is_some() && r2.is_some());
        assert!(slots.take(0).is_none());
        drop(a);
        assert!(slots.take(1000).is_some());
    }

    #[tokio::test]
    async fn a_client_that_never_reads_its_replies_is_dropped() {
        let mut cfg = Config::default();
        cfg.control.request_timeout = Duration::from_millis(300);
        cfg.control.max_connections = 4;
        let (_d, path, _s) = start(cfg).await;
        // Stalled readers: they pipeline requests and never read.
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            let req = b"{\"cmd\":\"status\"}\n".repeat(20_000);
            let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&req)).await;
            stalled.push(s);
        }
        // Within a few reply timeouts every slot is free again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = roundtrip(&path, b"{\"cmd\":\"status\"}\n").await;
            if r.first().is_some_and(|r| r.ok) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
