//! The control socket's file: bound with its mode and group, never stealing a live socket or
//! removing anything that is not one, and removed at shutdown only if it is still ours.

use std::{
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::config::ControlConfig;

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
pub(super) fn privileged(uid: u32) -> bool {
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
