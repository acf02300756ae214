//! Developer tasks: `cargo xtask build-ebpf`, `cargo xtask check-setup`,
//! `cargo xtask bench`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "lb developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (`-Z build-std=core`, bpfel-unknown-none, bpf-linker).
    BuildEbpf {
        /// Build with the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Check (and install what is missing of) the build and test prerequisites.
    Setup,
    /// Run the benchmarks (per-packet cost of the TC program; root).
    Bench {
        /// Fewer repeats: a smoke run.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    match Cli::parse().task {
        Task::BuildEbpf { debug } => build_ebpf(&root, debug),
        Task::Setup => run(Command::new(root.join("scripts/setup.sh"))),
        Task::Bench { quick } => {
            let mut cmd = cargo();
            cmd.current_dir(&root).args([
                "run",
                "--release",
                "--package",
                "lb-userspace",
                "--example",
                "datapath_cost",
                "--",
            ]);
            if quick {
                cmd.arg("--quick");
            }
            run(cmd)
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    eprintln!("[xtask] {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build_ebpf(root: &Path, debug: bool) -> anyhow::Result<()> {
    if which("bpf-linker").is_none() {
        bail!("bpf-linker not found on PATH: run `cargo xtask setup` (scripts/setup.sh)");
    }
    let arch = std::env::consts::ARCH;
    let mut cmd = cargo();
    cmd.current_dir(root.join("lb-ebpf"))
        // -Z build-std on the pinned stable toolchain.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{arch}\""),
                "-Cdebuginfo=2".to_owned(),
                "-Clink-arg=--btf".to_owned(),
            ]
            .join("\x1f"),
        )
        .args([
            "build",
            "--package",
            "lb-ebpf",
            "--bins",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    if !debug {
        cmd.arg("--release");
    }
    run(cmd)?;
    let object = root
        .join("target/bpfel-unknown-none")
        .join(if debug { "debug" } else { "release" })
        .join("lb-ebpf");
    eprintln!("[xtask] eBPF object: {}", object.display());
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
