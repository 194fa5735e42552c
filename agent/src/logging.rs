//! Logs through `tracing` to stderr (journald under systemd), written so that logging can never
//! stop or kill the agent: a full disk, a closed or broken stderr, or a reader that stalls
//! (journald busy) costs log lines, which are counted (`insite_agent_log_lines_dropped_total`),
//! and nothing else.
//!
//! The fmt layer reports its own write errors with `eprintln!`, which panics when stderr is
//! broken; so the writer it is given never fails: [`Stderr`] swallows and counts write errors.
//! The daemon writes through a bounded queue to a logging thread ([`tracing_appender`], lossy):
//! a stalled stderr fills the queue and lines are dropped, counted, instead of blocking the
//! tick loop.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering},
};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Lines that could not be written to stderr.
static WRITE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Lines the daemon's queue had no room for (set once the queue exists).
static QUEUE_DROPS: std::sync::OnceLock<ErrorCounter> = std::sync::OnceLock::new();

/// Log lines lost so far: failed writes and lines the queue dropped.
pub fn dropped_lines() -> u64 {
    WRITE_FAILURES.load(Ordering::Relaxed)
        + QUEUE_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// stderr that never reports an error: a failed write is counted and the line dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if io::Write::write_all(&mut io::stderr().lock(), buf).is_err() {
            WRITE_FAILURES.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::Write::flush(&mut io::stderr());
        Ok(())
    }
}

/// Lines the daemon may queue for the logging thread before it drops them.
const QUEUE_LINES: usize = 4096;

/// Installs the global subscriber. The daemon (`queued`) logs at `info` through the lossy
/// queue; keep the returned guard alive until exit (dropping it flushes the queue). The CLI
/// logs at `warn`, straight to stderr.
pub fn init(queued: bool) -> Option<WorkerGuard> {
    let default = if queued { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("INSITE_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // journald adds its own timestamps; keep lines short and plain.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false)
        .log_internal_errors(false);
    let (guard, result) = if queued {
        let (writer, guard) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(QUEUE_LINES)
            .thread_name("insite-log")
            .finish(Stderr);
        let _ = QUEUE_DROPS.set(writer.error_counter());
        let b = builder.with_writer(writer);
        let r = if under_journald {
            b.without_time().try_init()
        } else {
            b.try_init()
        };
        (Some(guard), r)
    } else {
        let b = builder.with_writer(|| Stderr);
        let r = if under_journald {
            b.without_time().try_init()
        } else {
            b.try_init()
        };
        (None, r)
    };
    // Only fails if a subscriber is already installed (tests): logging goes there then.
    let _ = result;
    guard
}

/// Makes sure fds 0, 1 and 2 are open (on /dev/null if they are not). A daemon started with
/// one of them closed would otherwise hand that number to the next file or socket it opens,
/// and then write log lines into it.
pub fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: a NUL-terminated path; the lowest free descriptor is `fd` itself, as
            // every lower one is open.
            let got = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if got >= 0 && got != fd {
                // SAFETY: closing the descriptor we just opened.
                unsafe { libc::close(got) };
            }
        }
    }
}

/// A CLI whose output is cut short (`insite-agent connections | head -3`) ends quietly, as
/// Unix tools do, instead of panicking in `println!` on EPIPE: SIGPIPE gets its default
/// action back (the Rust runtime ignores it). Not for the daemon, which must survive a closed
/// pipe on stderr.
pub fn quiet_on_closed_stdout() {
    // SAFETY: restores the default disposition of one signal; no handler runs Rust code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[test]
    fn stderr_writer_never_fails() {
        let mut w = Stderr;
        assert_eq!(w.write(b"").unwrap(), 0);
        assert!(w.flush().is_ok());
    }
}
