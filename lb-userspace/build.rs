//! Builds the eBPF object (`lb-ebpf`) with aya-build so that `lb` embeds it.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
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
