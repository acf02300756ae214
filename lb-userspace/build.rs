//! Builds the eBPF object (`lb-ebpf`) with aya-build so that `lb` embeds it,
//! and records the commit `lb --version` prints.

use std::{path::Path, process::Command};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    emit_build_commit(Path::new(&manifest_dir));
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {manifest_dir}"))?
        .join("lb-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The object embeds lb-common's layouts too.
    println!("cargo::rerun-if-changed={manifest_dir}/../lb-common/src");
    let skip = std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true");
    if skip {
        // Unit tests and clippy runs without bpf-linker: embed an empty object;
        // `lb agent` then says it was built without one.
        let out_dir = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(std::path::Path::new(&out_dir).join("lb-ebpf"), [])?;
    } else if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker not found on PATH: run `cargo xtask setup` (or scripts/setup.sh) first"
        ));
    }
    // The eBPF crate needs `-Z build-std=core`; aya-build passes it only when
    // RUSTC_BOOTSTRAP=1 (or on nightly). We pin a stable toolchain, so opt in.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("RUSTUP_TOOLCHAIN").unwrap_or_else(|_| "1.98.0".to_owned());
    let toolchain = toolchain.split('-').next().unwrap_or("1.98.0").to_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// The commit `lb --version` prints, as `LB_BUILD_COMMIT`: seven hex digits,
/// `-dirty` when tracked files differed from it, `unknown` outside git.
/// `cargo xtask image` computes it itself and passes it in the environment
/// (the image's revision label and the binary then agree by construction);
/// other builds ask git here.
fn emit_build_commit(manifest_dir: &Path) {
    println!("cargo::rerun-if-env-changed=LB_BUILD_COMMIT");
    let commit = match std::env::var("LB_BUILD_COMMIT") {
        Ok(given) if !given.is_empty() => given,
        _ => git_commit(manifest_dir).unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo::rustc-env=LB_BUILD_COMMIT={commit}");
}

fn git_commit(dir: &Path) -> Option<String> {
    // Rerun when HEAD moves (checkout, commit: HEAD, its branch, packed refs)
    // or the index changes (add, reset, stash). An edit that is never staged
    // does not rerun this script, so its build may miss `-dirty`; the image
    // build does not depend on this (see above).
    let git_dir = git(dir, &["rev-parse", "--path-format=absolute", "--git-dir"])?;
    let common_dir = git(
        dir,
        &["rev-parse", "--path-format=absolute", "--git-common-dir"],
    )?;
    let mut watched = vec![
        Path::new(&git_dir).join("HEAD"),
        Path::new(&git_dir).join("index"),
        Path::new(&common_dir).join("packed-refs"),
    ];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.push(Path::new(&common_dir).join(branch));
    }
    // A missing file would make cargo rerun this script on every build.
    for path in watched.iter().filter(|path| path.exists()) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
    let full = git(dir, &["rev-parse", "HEAD"])?;
    let short = full.get(..7)?;
    // Like `git describe --dirty`: tracked files only. --no-optional-locks:
    // do not refresh (rewrite) the index, which would rerun this script.
    let status = git(
        dir,
        &[
            "--no-optional-locks",
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    );
    let dirty = if status.is_some_and(|changes| !changes.is_empty()) {
        "-dirty"
    } else {
        ""
    };
    Some(format!("{short}{dirty}"))
}

/// Git's trimmed stdout, `None` when git is missing or fails.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
