//! `cargo xtask`: set up the toolchain, build, run, test, bench and install insite-agent.
//!
//! Every step a fresh machine needs lives here, so that `cargo xtask run` and
//! `cargo xtask test` work on a clean clone (CI runs the latter as root).

mod bench;
mod fuzz;
mod setup;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing to build the agent (idempotent).
    Setup {
        /// Also install what the tests and benchmarks use (promtool, bpftrace).
        #[arg(long)]
        tests: bool,
    },
    /// Build the agent (kernel programs embedded) in release mode.
    Build,
    /// Set up, build and run the agent in the foreground (as root; uses sudo -E otherwise).
    Run {
        /// Arguments passed to `insite-agent run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build, lint and run every test, including the eBPF end-to-end tests (as root;
    /// through sudo -E otherwise, or, without sudo, only the tests that need no root).
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Run only what needs no root (lint, unit tests, fuzz) and say what was skipped.
        #[arg(long)]
        no_root: bool,
    },
    /// Benchmarks (not tests): `cargo xtask bench syscalls`, `cargo xtask bench net`,
    /// `cargo xtask bench db`, `cargo xtask bench web`, `cargo xtask bench ratelimit`,
    /// `cargo xtask bench soak --minutes N`.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Fuzz the parsers of untrusted input (cargo-fuzz, nightly): `cargo xtask fuzz [TARGET]
    /// [--seconds N]`.
    Fuzz {
        /// One target (sql, resp, pg, mysql, control, labels); every target when omitted.
        target: Option<String>,
        /// Seconds to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Install the binary, the systemd unit and an example config (as root).
    Install {
        /// Root to install under (for packaging).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup { tests } => setup::run(setup::Want { tests }),
        Cmd::Build => {
            setup::run(setup::Want { tests: false })?;
            build()
        }
        Cmd::Run { args } => {
            util::ensure_root()?;
            setup::run(setup::Want { tests: false })?;
            build()?;
            let mut cmd = std::process::Command::new(util::agent_bin());
            cmd.arg("run").args(&args);
            util::exec(cmd)
        }
        Cmd::Test { no_lint, no_root } => {
            if !no_root && (util::is_root() || util::have("sudo")) {
                util::ensure_root()?;
            }
            setup::run(setup::Want { tests: true })?;
            test(!no_lint, util::is_root() && !no_root)
        }
        Cmd::Bench { which } => {
            util::ensure_root()?;
            setup::run(setup::Want { tests: true })?;
            build()?;
            bench::run(which)
        }
        Cmd::Fuzz { target, seconds } => fuzz::run(target.as_deref(), seconds),
        Cmd::Install { destdir } => {
            util::ensure_root()?;
            setup::run(setup::Want { tests: false })?;
            build()?;
            install(&destdir)
        }
    }
}

fn build() -> Result<()> {
    util::cargo(&["build", "--release", "-p", "insite-agent"])
}

/// `root`: run the tests that load eBPF programs too; without it, they are skipped and counted.
fn test(lint: bool, root: bool) -> Result<()> {
    if lint {
        util::cargo(&["fmt", "--all", "--", "--check"])?;
        util::cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--all-targets",
            "--release",
            "--",
            "-D",
            "warnings",
        ])?;
        // The kernel programs only build for the bpf target, with nightly.
        util::run(
            std::process::Command::new("rustup")
                .args(["run", "nightly", "cargo", "clippy", "-p", "agent-ebpf"])
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--release",
                ])
                .args(["--", "-D", "warnings"])
                .current_dir(util::workspace_root()),
        )?;
    }
    build()?;
    // Unit tests in parallel; end-to-end tests one at a time (each starts a real agent that
    // attaches to every syscall on the host).
    let unit = [
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "insite-e2e",
        "--exclude",
        "agent-ebpf",
    ];
    // The unit tests that load eBPF programs are ignored by a plain `cargo test` (they need
    // root): as root they run, without it they show as ignored.
    let mut args = unit.to_vec();
    if root {
        args.extend(["--", "--include-ignored"]);
    }
    util::cargo(&args)?;
    // Every wire decoder under cargo-fuzz, briefly (the decoders alone, in target/fuzz).
    fuzz::run(None, 15)?;
    let e2e = ["test", "--release", "-p", "insite-e2e"];
    if !root {
        let count = |args: &[&str]| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            util::output(
                std::process::Command::new(cargo)
                    .args(args)
                    .current_dir(util::workspace_root()),
            )
            .map_or(0, |out| {
                out.lines().filter(|l| l.ends_with(": test")).count()
            })
        };
        let ignored = count(&[&unit[..], &["--", "--list", "--ignored"]].concat());
        let end_to_end = count(&[&e2e[..], &["--", "--list"]].concat());
        eprintln!(
            "xtask: skipped without root: {ignored} unit tests that load eBPF programs and \
             {end_to_end} end-to-end tests (they load eBPF programs); run `cargo xtask test` as \
             root to include them"
        );
        return Ok(());
    }
    std::env::set_var("INSITE_AGENT_BIN", util::agent_bin());
    util::cargo(&[&e2e[..], &["--", "--test-threads=1"]].concat())
}

fn install(destdir: &std::path::Path) -> Result<()> {
    let root = util::workspace_root();
    let under = |p: &str| destdir.join(p.trim_start_matches('/'));
    let copies = [
        (
            util::agent_bin(),
            under("/usr/local/bin/insite-agent"),
            0o755,
        ),
        (
            root.join("systemd/insite-agent.service"),
            under("/etc/systemd/system/insite-agent.service"),
            0o644,
        ),
        // The shipped alert rules: replaced on every install; local rules go beside them.
        (
            root.join("systemd/rules/insite-default.yml"),
            under("/etc/insite-agent/rules/insite-default.yml"),
            0o644,
        ),
    ];
    for (from, to, mode) in copies {
        util::install_file(&from, &to, mode)?;
        println!("installed {}", to.display());
    }
    let cfg = under("/etc/insite-agent/config.toml");
    if cfg.exists() {
        println!("kept existing {}", cfg.display());
    } else {
        util::install_file(&root.join("systemd/config.example.toml"), &cfg, 0o644)?;
        println!("installed {}", cfg.display());
    }
    if destdir == std::path::Path::new("/") && util::systemd_running() {
        util::run(std::process::Command::new("systemctl").arg("daemon-reload"))?;
        println!("systemd reloaded: `systemctl enable --now insite-agent` starts it");
    }
    Ok(())
}
