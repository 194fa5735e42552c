//! The probes' own diagnostics from the kernel: aya-log records from the programs' rare paths
//! (a full table, a failed map update, at `debug` every failed connect), logged through
//! `tracing` with the probe's name. Off by default (`agent.kernel_log`).
//!
//! The level is a read-only global of each object (`AYA_LOG_LEVEL`) set before load, so the
//! verifier sees a constant: with logging off it removes every log site as dead code, and a
//! program pays nothing for them. What logging costs when on is measured by `cargo xtask bench
//! net --kernel-log debug` (see the README).

use aya::{Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::config::KernelLog;

/// aya-log's levels, for `override_global` (which borrows the value).
static LEVELS: [u8; 5] = [0, 1, 2, 3, 4];

/// A loader for one probe's object, with its log level set.
pub fn loader(level: KernelLog) -> EbpfLoader<'static> {
    let mut l = EbpfLoader::new();
    let v = &LEVELS[usize::from(level.level()).min(LEVELS.len() - 1)];
    // Not every object need have log sites: a missing global is fine.
    l.override_global(aya_log::LEVEL, v, false);
    l
}

/// Forwards records to `tracing`, named after the probe.
#[derive(Debug, Clone, Copy)]
pub struct ToTracing {
    probe: &'static str,
}

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        // `agent.kernel_log` already chose what the programs send: all of it is shown.
        let msg = record.args().to_string();
        match record.level() {
            log::Level::Error | log::Level::Warn => warn!(probe = self.probe, "kernel: {msg}"),
            _ => info!(probe = self.probe, "kernel: {msg}"),
        }
    }

    fn flush(&self) {}
}

pub type Logger = aya_log::EbpfLogger<ToTracing>;

/// Takes the object's log ring when logging is on (`None` when off, or if the object has
/// none).
pub fn init(ebpf: &mut Ebpf, probe: &'static str, level: KernelLog) -> Option<Logger> {
    if level == KernelLog::Off {
        return None;
    }
    match aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing { probe }) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(probe, error = %super::error_chain(&e), "kernel log unavailable");
            None
        }
    }
}

/// Logs the records as they arrive, until the task is stopped.
pub async fn run(logger: Logger) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and unchanged for as
    // long as the AsyncFd owns the logger.
    let mut fd = match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %super::error_chain(&e), "cannot poll the kernel log");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else {
            return;
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
