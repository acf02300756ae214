//! Developer tasks: `cargo xtask build-ebpf`, `cargo xtask clippy-ebpf`,
//! `cargo xtask setup`, `cargo xtask bench`, `cargo xtask image`,
//! `cargo xtask fuzz`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod image;

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
    /// Lint the eBPF crate as it is built (clippy for bpfel-unknown-none,
    /// `-D warnings`), then its host unit tests (clippy --all-targets).
    ClippyEbpf,
    /// Check (and install what is missing of) the build and test prerequisites.
    Setup,
    /// Run the benchmarks and write the report (root): per-packet cost
    /// (`BPF_PROG_TEST_RUN`), end to end in network namespaces against
    /// kube-proxy's rule shapes, control plane, connections under load
    /// through agent restarts, endpoint changes and a SYN flood. A full run updates
    /// docs/benchmarks.md, docs/benchmarks.json and the plots; every run
    /// keeps its raw results in docs/bench-results/RUN/.
    Bench {
        /// A smoke run of about two minutes (small scales, one short
        /// round, short lifecycle phases, dev builds); its report stays in
        /// docs/bench-results/.
        #[arg(long)]
        quick: bool,
        /// Only these parts: datapath, xdp, maglev, e2e, socklb, forward, xdp-e2e,
        /// lifecycle (comma-separated;
        /// default all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Build the container image from scratch (static musl `lb`, no
    /// registry, no daemon, no base image) as an OCI archive; prints its
    /// path, name and manifest digest.
    Image {
        /// Where to write the archive [default: target/image/lb-VERSION.oci.tar].
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Only build the static binary and copy it to FILE (what
        /// deploy/Containerfile's builder stage runs).
        #[arg(long, value_name = "FILE", conflicts_with = "output")]
        binary_only: Option<PathBuf>,
    },
    /// Fuzz the datapath (root): random and mutated frames through
    /// `BPF_PROG_TEST_RUN`, checked against its invariants; the report
    /// goes into docs/fuzzing.md.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Replay this seed (decimal or 0x-hex) instead of a fresh one.
        #[arg(long)]
        seed: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    match Cli::parse().task {
        Task::BuildEbpf { debug } => build_ebpf(&root, debug),
        Task::ClippyEbpf => clippy_ebpf(&root),
        Task::Setup => run(Command::new(root.join("scripts/setup.sh"))),
        Task::Bench { quick, only } => bench::run_bench(&root, quick, &only),
        Task::Image {
            output,
            binary_only,
        } => image::build_image(
            &root,
            binary_only.map_or(
                image::ImageOutput::Archive(output),
                image::ImageOutput::BinaryOnly,
            ),
        ),
        Task::Fuzz { frames, seed } => fuzz::run_fuzz(&root, frames, seed.as_deref()),
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub(crate) fn run(mut cmd: Command) -> anyhow::Result<()> {
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
    let mut cmd = ebpf_cargo(root, "build");
    cmd.arg("--bins");
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

/// Clippy on the eBPF crate for the BPF target (the code that is loaded),
/// then on the host (its unit tests: `csum`, `hash`, `verdict`).
fn clippy_ebpf(root: &Path) -> anyhow::Result<()> {
    let mut cmd = ebpf_cargo(root, "clippy");
    cmd.args(["--release", "--", "-D", "warnings"]);
    run(cmd)?;
    let mut host = cargo();
    host.current_dir(root).args([
        "clippy",
        "--package",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(host)
}

/// `cargo SUBCOMMAND` on lb-ebpf for bpfel-unknown-none with
/// `-Z build-std=core`, as aya-build builds it.
fn ebpf_cargo(root: &Path, subcommand: &str) -> Command {
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
            subcommand,
            "--package",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    cmd
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
