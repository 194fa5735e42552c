//! cgroup v2 ids -> paths, so that events name the service (`/system.slice/nginx.service`)
//! rather than a number.
//!
//! A cgroup's id is the inode number of its directory in the cgroup2 hierarchy (what
//! bpf_get_current_cgroup_id() returns). Ids are resolved from a cache; an unknown id
//! triggers a rescan of the hierarchy, at most once per `RESCAN_INTERVAL`.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds on one scan and on the cache.
const MAX_DEPTH: usize = 16;
const MAX_ENTRIES: usize = 50_000;

#[derive(Debug)]
pub struct CgroupNames {
    root: Option<PathBuf>,
    cache: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupNames {
    pub fn new(root: Option<PathBuf>) -> Self {
        Self {
            root,
            cache: HashMap::new(),
            last_scan: None,
        }
    }

    /// The cgroup path of `id` (relative to the cgroup2 root, starting with `/`), if known.
    pub fn resolve(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cache.get(&id) {
            return Some(p.clone());
        }
        let due = self
            .last_scan
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL);
        if due {
            self.scan();
        }
        self.cache.get(&id).cloned()
    }

    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        // Rebuilt from scratch: removed cgroups drop out, and the size stays bounded.
        self.cache.clear();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if self.cache.len() >= MAX_ENTRIES {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.cache.insert(meta.ino(), relative(&root, &dir));
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
}

fn relative(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_string(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

/// The systemd unit a cgroup path belongs to: its innermost `.service` or `.scope`
/// component (`/system.slice/nginx.service` -> `nginx.service`).
pub fn service_of(path: &str) -> Option<String> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_directories_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let svc = dir.path().join("system.slice/nginx.service");
        std::fs::create_dir_all(&svc).unwrap();
        let mut names = CgroupNames::new(Some(dir.path().to_path_buf()));
        let id = std::fs::metadata(&svc).unwrap().ino();
        assert_eq!(
            names.resolve(id).as_deref(),
            Some("/system.slice/nginx.service")
        );
        let root_id = std::fs::metadata(dir.path()).unwrap().ino();
        assert_eq!(names.resolve(root_id).as_deref(), Some("/"));
        // Unknown ids do not rescan more than once per interval.
        assert_eq!(names.resolve(u64::MAX), None);
        let late = dir.path().join("late");
        std::fs::create_dir(&late).unwrap();
        let late_id = std::fs::metadata(&late).unwrap().ino();
        assert_eq!(names.resolve(late_id), None);
        names.last_scan = None;
        assert_eq!(names.resolve(late_id).as_deref(), Some("/late"));
    }

    #[test]
    fn no_hierarchy_resolves_nothing() {
        assert_eq!(CgroupNames::new(None).resolve(1), None);
    }

    #[test]
    fn services() {
        assert_eq!(
            service_of("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            service_of("/user.slice/user-0.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            service_of("/system.slice/docker-1.scope/init.service/x").as_deref(),
            Some("init.service")
        );
        assert_eq!(service_of("/"), None);
    }
}
