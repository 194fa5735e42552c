//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets of the parsers of
//! untrusted input
//! (`agent/fuzz`) for N seconds each, every target when none is named, and fails if any
//! target finds a crash (libFuzzer saves the input under `agent/fuzz/artifacts/TARGET/`).
//!
//! cargo-fuzz is installed when missing (built with the machine's stable Rust); the targets are
//! built by the nightly toolchain (sanitizer flags), in `target/fuzz`, so that a fuzz build never
//! waits on, nor invalidates, the main build's target directory.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{setup, util};

/// The targets in `agent/fuzz/fuzz_targets/`, and the longest input each is given: the kernel
/// hands over at most 256 bytes of a request; SQL gets more, to reach the fingerprint's cap;
/// a control request line is capped at 64 KiB by default (4 KiB reaches every branch).
const TARGETS: &[(&str, usize)] = &[
    ("sql", 2048),
    ("resp", 512),
    ("pg", 512),
    ("mysql", 512),
    ("control", 4096),
    ("labels", 512),
];

/// Builds with the machine's stable Rust (1.95); `--locked` keeps its dependencies to the
/// versions it was released with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run(target: Option<&str>, seconds: u64) -> Result<()> {
    let targets: Vec<(&str, usize)> = match target {
        None => TARGETS.to_vec(),
        Some(t) => match TARGETS.iter().find(|(name, _)| *name == t) {
            Some(&found) => vec![found],
            None => bail!(
                "no fuzz target {t:?}; the targets are {}",
                TARGETS
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    };
    // The decoders build on their own (agent/fuzz/src/lib.rs): nightly (for the sanitizer) and
    // cargo-fuzz are all they need.
    setup::run(setup::Want { tests: false })?;
    ensure_cargo_fuzz()?;

    let root = util::workspace_root();
    let fuzz_dir = root.join("agent/fuzz");
    // The fuzz crate is a workspace of its own: start its lock file from the main one, so that
    // what they share (libfuzzer-sys's build dependencies) resolves to the same versions.
    std::fs::copy(root.join("Cargo.lock"), fuzz_dir.join("Cargo.lock"))
        .context("copying Cargo.lock into agent/fuzz")?;

    let mut failed = Vec::new();
    for (name, max_len) in targets {
        let corpus = fuzz_dir.join("corpus").join(name);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(name);
        let mut cmd = Command::new("rustup");
        cmd.args(["run", "nightly", "cargo", "fuzz", "run", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(name)
            // New inputs go to the first directory (not kept in git); the seeds are read only.
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-max_len={max_len}"))
            // A decoder taking seconds over a few hundred bytes is a bug too.
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .env("CARGO_TARGET_DIR", root.join("target/fuzz"))
            .current_dir(&root);
        if let Err(e) = util::run(&mut cmd) {
            eprintln!("xtask: fuzz target {name}: {e:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs under {})",
            failed.join(", "),
            fuzz_dir.join("artifacts").display()
        );
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if util::output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    util::cargo(&[
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ])
}
