//! A real Prometheus Alertmanager (Debian's `prometheus-alertmanager`) on a free 127.0.0.1
//! port, clustering off, its data in a temporary directory; and a recording HTTP receiver
//! that keeps every request it gets, in order.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

pub const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// One HTTP/1.1 request to 127.0.0.1:`port`: (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        crate::metrics::dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

pub struct Alertmanager {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Alertmanager {
    pub fn start() -> Result<Self> {
        let port = super::free_port()?;
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("am.yml"),
            "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n",
        )?;
        let mut am = Self {
            port,
            dir,
            child: None,
        };
        am.resume()?;
        Ok(am)
    }

    /// Starts it again (same port, same data) after `pause`.
    pub fn resume(&mut self) -> Result<()> {
        if !std::path::Path::new(ALERTMANAGER).exists() {
            bail!("{ALERTMANAGER} is missing: `cargo xtask setup --tests` installs prometheus-alertmanager");
        }
        let d = self.dir.path();
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", d.join("am.yml").display()))
            .arg(format!("--storage.path={}", d.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("am.log"))?)
            .spawn()
            .context("starting alertmanager")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(http(self.port, "GET", "/-/ready", ""), Ok((200, _))) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("alertmanager not ready: {}", self.log())
    }

    /// Stops it (its data stays).
    pub fn pause(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on a pid we own.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("am.log")).unwrap_or_default()
    }

    /// `GET /api/v2/alerts`: the active alerts.
    pub fn alerts(&self) -> Result<Vec<serde_json::Value>> {
        let (status, body) = http(self.port, "GET", "/api/v2/alerts", "")?;
        if status != 200 {
            bail!("GET /api/v2/alerts: {status} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        self.pause();
    }
}

/// A request the recorder got.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// When its body had been read.
    pub at: Instant,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// An HTTP receiver that answers 200 to everything and keeps every request, in order. It can
/// be stopped and started again on its port (an upstream going down and coming back).
pub struct Recorder {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Recorded>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start() -> Result<Self> {
        let mut r = Self {
            port: super::free_port()?,
            got: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        r.resume()?;
        Ok(r)
    }

    pub fn resume(&mut self) -> Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port))?;
        listener.set_nonblocking(true)?;
        self.stop.store(false, Ordering::SeqCst);
        let (got, stop) = (self.got.clone(), self.stop.clone());
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        if let Ok(r) = read_request(s) {
                            got.lock().unwrap().push(r);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
        Ok(())
    }

    /// Stops listening: connections are refused until `resume`.
    pub fn pause(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.pause();
    }
}

fn read_request(mut s: TcpStream) -> Result<Recorded> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mut headers = Vec::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
            if k == "content-length" {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(Recorded {
        at: Instant::now(),
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Where the tests' rule files are.
pub fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules")
}

/// A webhook receiver's check of the agent's signature, written from the README's contract
/// (not from the agent's code): `x-insite-signature: sha256=<hex HMAC-SHA256(secret,
/// "<x-insite-timestamp>.<body>")>`, and the timestamp within `window` of `now`.
pub fn verify_signature(
    secret: &[u8],
    req: &Recorded,
    now_unix: i64,
    window: Duration,
) -> std::result::Result<(), String> {
    use hmac::{Hmac, KeyInit as _, Mac as _};
    let header = |k: &str| {
        req.headers
            .iter()
            .find(|(h, _)| h == k)
            .map(|(_, v)| v.as_str())
            .ok_or(format!("no {k} header"))
    };
    let ts: i64 = header("x-insite-timestamp")?
        .parse()
        .map_err(|e| format!("timestamp: {e}"))?;
    if (now_unix - ts).unsigned_abs() > window.as_secs() {
        return Err(format!(
            "timestamp {ts} is {}s from now: stale",
            now_unix - ts
        ));
    }
    let hex = header("x-insite-signature")?
        .strip_prefix("sha256=")
        .ok_or("signature without sha256=")?;
    let tag: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).map_err(|e| e.to_string())?;
    mac.update(format!("{ts}.").as_bytes());
    mac.update(req.body.as_bytes());
    mac.verify_slice(&tag)
        .map_err(|_| "signature does not match".to_string())
}
