//! Toolchain setup: only what is missing, every time (idempotent).
//!
//! The recipe is the one verified in shared/PLATFORM.md: the nightly toolchain with rust-src
//! for the bpf target, Debian's LLVM 22 and bpf-linker 0.13.0 built against it.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::util::{self, have, is_root, output};

pub struct Want {
    /// Tools the tests and benchmarks use.
    pub tests: bool,
}

const LLVM_CONFIG: &str = "/usr/lib/llvm-22/bin/llvm-config";
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

/// (binary, Debian package that ships it). PostgreSQL 15's server package ships `pgbench`;
/// `psql` comes with it (postgresql-client-15).
const DATABASE_TOOLS: &[(&str, &str)] = &[
    ("/usr/lib/postgresql/15/bin/postgres", "postgresql"),
    ("/usr/lib/postgresql/15/bin/initdb", "postgresql"),
    ("/usr/lib/postgresql/15/bin/pgbench", "postgresql"),
    ("/usr/lib/postgresql/15/bin/psql", "postgresql"),
    ("/usr/sbin/mariadbd", "mariadb-server"),
    ("/usr/bin/mariadb-install-db", "mariadb-server"),
    ("/usr/bin/mariadb", "mariadb-client"),
    ("/usr/bin/mysqlslap", "mariadb-client"),
    ("/usr/bin/redis-server", "redis-server"),
    ("/usr/bin/redis-cli", "redis-tools"),
    ("/usr/bin/redis-benchmark", "redis-tools"),
];

pub fn run(want: Want) -> Result<()> {
    let mut apt = Apt::default();

    // Nightly + rust-src: the bpf target is built with -Z build-std=core.
    if !output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|l| l.lines().any(|t| t.starts_with("nightly")))
    {
        util::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if !Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        util::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // bpf-linker, built against Debian's LLVM 22.
    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        let missing: Vec<&str> = LLVM_PACKAGES
            .iter()
            .copied()
            .filter(|p| !deb_installed(p))
            .collect();
        if !missing.is_empty() || !Path::new(LLVM_CONFIG).exists() {
            apt.install(LLVM_PACKAGES)?;
        }
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        util::run(Command::new("cargo").env("PATH", path).args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    }

    if want.tests {
        // promtool checks the scrape format, bpftrace is the benchmarks' peer, dot (graphviz)
        // renders `insite-agent map --dot`, ip (iproute2) builds the network namespaces.
        for (tool, package) in [
            ("promtool", "prometheus"),
            ("bpftrace", "bpftrace"),
            ("dot", "graphviz"),
            ("ip", "iproute2"),
            ("python3", "python3"),
            // The alert tests' upstream: a real Alertmanager on loopback.
            ("prometheus-alertmanager", "prometheus-alertmanager"),
            // `cargo xtask bench web`: the web server and its load generator.
            ("nginx", "nginx"),
            ("wrk", "wrk"),
        ] {
            if !have(tool) {
                apt.install(&[package])?;
            }
        }
        // The database servers whose queries the agent times off the wire, and their clients
        // and load generators. The tests start private instances of them on free ports; they
        // never use (or need) a cluster or service the packages set up.
        for &(binary, package) in DATABASE_TOOLS {
            if !Path::new(binary).exists() {
                apt.install(&[package])?;
            }
        }
    }
    Ok(())
}

/// Installs the Debian package of each (tool, package) whose tool is not on PATH: for what
/// only one bench uses (`bench ratelimit`'s iptables), installed only when that bench runs.
pub fn tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut apt = Apt::default();
    for &(tool, package) in tools {
        if !have(tool) {
            apt.install(&[package])?;
        }
    }
    Ok(())
}

/// Whether a Debian package is installed (false where there is no dpkg).
fn deb_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.trim_end().ends_with("installed") && !s.contains("not-installed"))
}

/// apt-get, with one `update` before the first install of this run.
#[derive(Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        let cmdline = format!("apt-get install -y {}", packages.join(" "));
        if !is_root() || !have("apt-get") {
            bail!(
                "missing system packages; as root on Debian/Ubuntu run:\n  apt-get update && {cmdline}"
            );
        }
        if !self.updated {
            util::run(Command::new("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        util::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages),
        )
    }
}
