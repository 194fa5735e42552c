//! Control socket server: a unix socket, file mode and SO_PEERCRED both guard it.
//!
//! Nothing a client does can hold the socket for others: a request must arrive within
//! `control.request_timeout`, and a reply be taken within the same time; each uid other than
//! root and the agent's own holds at most `control.max_connections_per_uid` connections, and
//! a share of `control.max_connections` is kept for root. Replies are built for the page asked
//! (`limit`, `offset`) and the bytes of replies in flight are bounded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{watch, Semaphore},
};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Framed};
use tracing::{debug, warn};

pub use super::socket::{bind, remove_socket, Access, ControlError, SocketFile};
use super::{
    protocol::{parse_request, Command as _, Request, Response, StatusRequest},
    socket::privileged,
    status, Views,
};
use crate::{config::Config, store::SharedStore};

/// Bytes of replies being written at once, over every connection: replies wait for room
/// (within the reply timeout) rather than pile up in memory behind slow readers.
pub const REPLY_BUDGET_BYTES: usize = 16 << 20;
/// Budget is counted in KiB.
const KIB: usize = 1024;
/// A reply at least this large is followed by returning free heap memory to the system.
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// What a connection handler needs.
#[derive(Clone)]
pub struct Context {
    pub store: SharedStore,
    pub config: watch::Receiver<Arc<Config>>,
    pub access: Access,
    /// Every family's commands, whether or not it is attached (a detached family says why).
    pub families: Vec<Arc<dyn Views>>,
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
    handle(stream, ctx, budget, privileged(cred.uid()), cred.uid()).await;
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

async fn handle(
    stream: UnixStream,
    ctx: Context,
    budget: Arc<Semaphore>,
    privileged: bool,
    uid: u32,
) {
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
                Ok(mut req) => match dispatch(&ctx, {
                    req.privileged = privileged;
                    req.uid = Some(uid);
                    req
                }) {
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
fn dispatch(ctx: &Context, req: Request) -> Result<String, String> {
    let cfg = ctx.config.borrow().clone();
    let Ok(store) = ctx.store.read() else {
        return Err("internal: store unavailable".into());
    };
    if req.cmd == StatusRequest::NAME {
        req.args::<StatusRequest>()?;
        return super::reply(&status::status(&store, &cfg));
    }
    match ctx
        .families
        .iter()
        .find(|f| f.commands().contains(&req.cmd.as_str()))
    {
        Some(f) => f.answer(req, &store, &cfg),
        None => {
            let known: Vec<&str> = std::iter::once(StatusRequest::NAME)
                .chain(
                    ctx.families
                        .iter()
                        .flat_map(|f| f.commands().iter().copied()),
                )
                .collect();
            Err(format!(
                "bad request: unknown command {:?} (known: {})",
                req.cmd.chars().take(64).collect::<String>(),
                known.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{ConfigSource, ControlConfig},
        store::Store,
    };
    use std::{
        os::unix::fs::{MetadataExt as _, PermissionsExt as _},
        path::{Path, PathBuf},
    };
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
            families: vec![Arc::new(OneCommand)],
        };
        tokio::spawn(async move {
            let _keep = _tx;
            serve(listener, ctx, serving).await
        });
        (dir, path, stop.drop_guard())
    }

    /// A family with one command (`syscalls`, its real typed arguments): the server's part
    /// is finding the family and handing it the request.
    struct OneCommand;

    impl Views for OneCommand {
        fn commands(&self) -> &'static [&'static str] {
            &["syscalls"]
        }

        fn answer(&self, req: Request, _st: &Store, _cfg: &Config) -> Result<String, String> {
            let r: crate::control::syscalls::SyscallsRequest = req.args()?;
            super::super::reply(&r)
        }
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
        let replies = roundtrip(
            &path,
            b"{\"cmd\":\"syscalls\",\"window\":\"5s\"}\n{\"cmd\":\"nope\"}\n",
        )
        .await;
        assert_eq!(replies[0].data, Some(serde_json::json!({"window": "5s"})));
        let e = replies[1].error.as_deref().unwrap();
        assert!(
            e.contains("unknown command \"nope\" (known: status, syscalls)"),
            "{e}"
        );
    }

    /// Text a client controls comes back in error replies (an unknown command's name, a bad
    /// window or system): escaped, one line, bounded, and never read as reply structure.
    #[tokio::test]
    async fn client_text_in_error_replies_is_escaped_and_bounded() {
        let (_d, path, _s) = start(Config::default()).await;
        let evil = r#"a\"b\\c\n}{\"ok\":true"#;
        let long = "x".repeat(10_000);
        let payload = format!(
            "{{\"cmd\":\"{evil}\"}}\n{{\"cmd\":\"syscalls\",\"window\":\"{evil}\"}}\n{{\"cmd\":\"{long}\"}}\n"
        );
        let replies = roundtrip(&path, payload.as_bytes()).await;
        assert_eq!(replies.len(), 3, "{replies:?}");
        for r in &replies {
            assert!(!r.ok);
            assert!(r.data.is_none());
        }
        // The name as sent (quote, backslash, newline and all), quoted in the message.
        let e0 = replies[0].error.as_deref().unwrap();
        assert!(e0.contains(r#""a\"b\\c\n}{\"ok\":true""#), "{e0}");
        let e1 = replies[1].error.as_deref().unwrap();
        assert!(e1.contains("window") && e1.contains(r#"\"ok\""#), "{e1}");
        // A long name is cut at 64 characters.
        let e2 = replies[2].error.as_deref().unwrap();
        assert!(e2.len() < 300, "{e2}");
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
