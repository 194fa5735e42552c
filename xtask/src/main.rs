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
    /// Set up, build, lint and run every test, including the eBPF end-to-end tests (as root).
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Benchmarks (not tests): `cargo xtask bench syscalls`, `cargo xtask bench net`,
    /// `cargo xtask bench db`, `cargo xtask bench web`, `cargo xtask bench soak --minutes N`.
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
        Cmd::Test { no_lint } => {
            util::ensure_root()?;
            setup::run(setup::Want { tests: true })?;
            test(!no_lint)
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

fn test(lint: bool) -> Result<()> {
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
    util::cargo(&[
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "insite-e2e",
        "--exclude",
        "agent-ebpf",
        "--",
        // The unit tests that load eBPF programs are ignored by a plain `cargo test` (they
        // need root); here we are root.
        "--include-ignored",
    ])?;
    // Every wire decoder under cargo-fuzz, briefly (the decoders alone, in target/fuzz).
    fuzz::run(None, 15)?;
    std::env::set_var("INSITE_AGENT_BIN", util::agent_bin());
    util::cargo(&[
        "test",
        "--release",
        "-p",
        "insite-e2e",
        "--",
        "--test-threads=1",
    ])
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
