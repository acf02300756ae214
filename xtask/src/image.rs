//! `cargo xtask image`: the `lb` container image, built without a registry,
//! a daemon or a base image.
//!
//! It builds a static `lb` (musl, release, eBPF object embedded by
//! lb-userspace's build script) and writes the OCI image layout around it
//! by hand (`oci-layout`, `index.json`, `blobs/sha256/`: one gzip'd tar
//! layer, the config, the manifest) as an `oci-archive` tar, which
//! containerd, podman, kind and skopeo all read. Every byte is a function
//! of the commit: file times are the commit's time (or
//! `SOURCE_DATE_EPOCH`), owners are root, entries are in a fixed order and
//! the binary is built with its paths remapped, so two builds of one commit
//! give the same digest.
//!
//! No CA certificates: in a cluster the kube client trusts the service
//! account's `ca.crt` only (kube-client's `Config::incluster`); the system
//! trust store would only be read for a kubeconfig without a CA.
//!
//! deploy/Containerfile builds the same image with a container engine; it
//! calls `cargo xtask image --binary-only` for the binary, so the two paths
//! share one build recipe, and carries the same entrypoint, command and
//! labels (tests/image.rs checks that).

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{cargo, run};

/// Repository part of the image's name; deploy/kustomization.yaml points
/// the `DaemonSet`'s `image: lb` at it.
const IMAGE_REPOSITORY: &str = "localhost/lb";
/// Where the binary lives in the image (deploy/Containerfile agrees).
const BINARY_IN_IMAGE: &str = "usr/bin/lb";
/// The `DaemonSet` passes its own arguments; this default runs the agent
/// in-cluster as `kube-proxy` would.
const DEFAULT_CMD: [&str; 3] = ["agent", "--source=kube", "--attach-pattern=veth*,eth*"];

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// What `cargo xtask image` writes.
pub(crate) enum ImageOutput {
    /// The OCI archive (default `target/image/lb-VERSION.oci.tar`).
    Archive(Option<PathBuf>),
    /// Only the static binary, copied to this path (deploy/Containerfile).
    BinaryOnly(PathBuf),
}

pub(crate) fn build_image(root: &Path, output: ImageOutput) -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let revision = Revision::of(root)?;
    let started = std::time::Instant::now();
    let binary_path = build_static_lb(root, &revision)?;
    let binary =
        fs::read(&binary_path).with_context(|| format!("cannot read {}", binary_path.display()))?;
    ensure_static(&binary).with_context(|| binary_path.display().to_string())?;
    eprintln!(
        "[xtask] static lb: {} ({} bytes, built in {:.0?})",
        binary_path.display(),
        binary.len(),
        started.elapsed()
    );
    let archive_path = match output {
        ImageOutput::BinaryOnly(path) => {
            copy_executable(&binary_path, &path)?;
            eprintln!("[xtask] binary copied to {}", path.display());
            return Ok(());
        }
        ImageOutput::Archive(path) => {
            path.unwrap_or_else(|| root.join(format!("target/image/lb-{version}.oci.tar")))
        }
    };
    let layout = OciLayout::new(&binary, version, &revision, source_url(root))?;
    let archive = layout.archive(revision.epoch)?;
    write_atomically(&archive_path, &archive)?;
    println!(
        "{} {}:{version} {} ({:.1} MiB)",
        archive_path.display(),
        IMAGE_REPOSITORY,
        layout.manifest_digest,
        mib(archive.len()),
    );
    Ok(())
}

/// The commit the image is built from.
struct Revision {
    /// Full hex commit id, `None` outside git.
    commit: Option<String>,
    /// Tracked files differed from the commit.
    dirty: bool,
    /// Seconds since the epoch for every timestamp in the image.
    epoch: u64,
}

impl Revision {
    /// From git, else (a container build context without `.git`) from
    /// `LB_REVISION` (`COMMIT[-dirty]`); `SOURCE_DATE_EPOCH` overrides the
    /// commit's time.
    fn of(root: &Path) -> anyhow::Result<Self> {
        let from_git = git(root, &["rev-parse", "HEAD"]);
        let (commit, dirty) = match from_git {
            Some(commit) => {
                let status = git(
                    root,
                    &[
                        "--no-optional-locks",
                        "status",
                        "--porcelain",
                        "--untracked-files=no",
                    ],
                );
                (Some(commit), status.is_some_and(|s| !s.is_empty()))
            }
            None => match std::env::var("LB_REVISION") {
                Ok(given) if !given.is_empty() && given != "unknown" => {
                    let (commit, dirty) = given
                        .strip_suffix("-dirty")
                        .map_or((given.as_str(), false), |commit| (commit, true));
                    (Some(commit.to_owned()), dirty)
                }
                _ => (None, false),
            },
        };
        if let Some(commit) = &commit
            && (commit.len() < 7 || !commit.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            bail!("not a commit id: {commit:?}");
        }
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(epoch) => epoch
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={epoch:?} is not a number"))?,
            Err(_) => git(root, &["log", "-1", "--format=%ct"])
                .and_then(|time| time.parse().ok())
                .unwrap_or(0),
        };
        Ok(Self {
            commit,
            dirty,
            epoch,
        })
    }

    /// `lb --version`'s form: seven digits, `-dirty`, or `unknown`.
    fn short(&self) -> String {
        self.with_dirty(|commit| &commit[..7])
    }

    /// The `org.opencontainers.image.revision` label: the full id.
    fn label(&self) -> String {
        self.with_dirty(|commit| commit)
    }

    fn with_dirty(&self, form: impl Fn(&str) -> &str) -> String {
        match &self.commit {
            Some(commit) if self.dirty => format!("{}-dirty", form(commit)),
            Some(commit) => form(commit).to_owned(),
            None => "unknown".to_owned(),
        }
    }
}

/// Builds `lb` for `ARCH-unknown-linux-musl`: statically linked, debug info
/// left out (the image carries symbols, not DWARF), paths remapped so that
/// the binary does not depend on where the checkout or cargo's home is.
fn build_static_lb(root: &Path, revision: &Revision) -> anyhow::Result<PathBuf> {
    let target = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    );
    let rustflags = [
        format!("--remap-path-prefix={}=/lb", root.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
    ]
    .join("\x1f");
    let mut cmd = cargo();
    cmd.current_dir(root)
        .env("LB_BUILD_COMMIT", revision.short())
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        // With --target these reach the target's crates only, not build
        // scripts; aya-build sets its own for the eBPF object.
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .args([
            "build",
            "--locked",
            "--release",
            "--package",
            "lb-userspace",
            "--bin",
            "lb",
            "--target",
        ])
        .arg(&target);
    run(cmd).with_context(|| {
        format!("the static build needs the {target} target and musl-gcc: run scripts/setup.sh")
    })?;
    Ok(root.join("target").join(target).join("release/lb"))
}

/// Refuses a dynamically linked binary: a `scratch` image has no loader.
fn ensure_static(elf: &[u8]) -> anyhow::Result<()> {
    const PT_INTERP: u32 = 3;
    let field = |at: usize, len: usize| {
        elf.get(at..at + len)
            .context("truncated ELF header")
            .map(|bytes| {
                bytes
                    .iter()
                    .rev()
                    .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
            })
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("not a 64-bit ELF file");
    }
    let phoff = usize::try_from(field(0x20, 8)?)?;
    let phentsize = usize::try_from(field(0x36, 2)?)?;
    let phnum = usize::try_from(field(0x38, 2)?)?;
    for index in 0..phnum {
        if field(phoff + index * phentsize, 4)? == u64::from(PT_INTERP) {
            bail!("dynamically linked (it names an ELF interpreter)");
        }
    }
    Ok(())
}

/// The image as an OCI layout: content-addressed blobs and the index.
struct OciLayout {
    /// `(digest hex, bytes)`: layer, config, manifest.
    blobs: Vec<(String, Vec<u8>)>,
    index: Vec<u8>,
    manifest_digest: String,
}

impl OciLayout {
    fn new(
        binary: &[u8],
        version: &str,
        revision: &Revision,
        source: Option<String>,
    ) -> anyhow::Result<Self> {
        let layer_tar = layer_tar(binary, revision.epoch)?;
        let layer = gzip(&layer_tar)?;
        let created = rfc3339(revision.epoch);
        // The same labels as deploy/Containerfile's (the time is the
        // config's `created`, which an engine sets by itself).
        let mut labels = json!({
            "org.opencontainers.image.title": "lb",
            "org.opencontainers.image.description":
                "Node agent of lb, a dual-stack eBPF kube-proxy replacement",
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.revision": revision.label(),
            "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
        });
        if let Some(source) = source {
            labels["org.opencontainers.image.source"] = Value::String(source);
        }
        let (os, architecture) = ("linux", oci_architecture()?);
        let config = to_json(&json!({
            "created": created,
            "architecture": architecture,
            "os": os,
            "config": {
                "Entrypoint": [format!("/{BINARY_IN_IMAGE}")],
                "Cmd": DEFAULT_CMD,
                "User": "0:0",
                "Labels": labels,
            },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{}", sha256(&layer_tar))] },
            "history": [{ "created": created, "created_by": "cargo xtask image" }],
        }))?;
        let manifest = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": [descriptor(OCI_LAYER, &layer)],
        }))?;
        let name = format!("{IMAGE_REPOSITORY}:{version}");
        let mut manifest_entry = descriptor(OCI_MANIFEST, &manifest);
        manifest_entry["platform"] = json!({ "architecture": architecture, "os": os });
        // podman and skopeo read the standard annotation; containerd (ctr,
        // kind) prefers its own. Both hold the full name.
        manifest_entry["annotations"] = json!({
            "org.opencontainers.image.ref.name": name,
            "io.containerd.image.name": name,
        });
        let index = to_json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [manifest_entry],
        }))?;
        let manifest_digest = format!("sha256:{}", sha256(&manifest));
        Ok(Self {
            blobs: [layer, config, manifest]
                .into_iter()
                .map(|blob| (sha256(&blob), blob))
                .collect(),
            index,
            manifest_digest,
        })
    }

    /// The layout as one uncompressed tar (`oci-archive:`).
    fn archive(&self, epoch: u64) -> anyhow::Result<Vec<u8>> {
        let mut blobs: Vec<_> = self.blobs.iter().collect();
        blobs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut tar = DeterministicTar::new(epoch);
        tar.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644)?;
        tar.file("index.json", &self.index, 0o644)?;
        tar.dir("blobs/")?;
        tar.dir("blobs/sha256/")?;
        for (digest, blob) in blobs {
            tar.file(&format!("blobs/sha256/{digest}"), blob, 0o644)?;
        }
        tar.finish()
    }
}

/// The image's only layer: `/usr/bin/lb` and its directories.
fn layer_tar(binary: &[u8], epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut tar = DeterministicTar::new(epoch);
    tar.dir("usr/")?;
    tar.dir("usr/bin/")?;
    tar.file(BINARY_IN_IMAGE, binary, 0o755)?;
    tar.finish()
}

/// A tar whose headers hold nothing of the machine: root owner, no names,
/// one fixed time.
struct DeterministicTar {
    builder: tar::Builder<Vec<u8>>,
    epoch: u64,
}

impl DeterministicTar {
    fn new(epoch: u64) -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            epoch,
        }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.epoch);
        header.set_size(size as u64);
        header
    }

    fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        let mut header = self.header(tar::EntryType::Directory, 0o755, 0);
        self.builder
            .append_data(&mut header, path, std::io::empty())
            .with_context(|| format!("tar entry {path}"))
    }

    fn file(&mut self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<()> {
        let mut header = self.header(tar::EntryType::Regular, mode, data.len());
        self.builder
            .append_data(&mut header, path, data)
            .with_context(|| format!("tar entry {path}"))
    }

    fn finish(self) -> anyhow::Result<Vec<u8>> {
        self.builder.into_inner().context("finishing a tar")
    }
}

fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    // GzBuilder writes mtime 0 and no file name: the bytes depend on the
    // input only.
    let mut encoder = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({ "mediaType": media_type, "digest": format!("sha256:{}", sha256(blob)), "size": blob.len() })
}

fn to_json(value: &Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

/// The OCI (Go) name of this machine's architecture.
fn oci_architecture() -> anyhow::Result<&'static str> {
    Ok(match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => bail!("no OCI architecture name known for {other}"),
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (UTC, proleptic
/// Gregorian; Howard Hinnant's days-to-civil).
fn rfc3339(epoch: u64) -> String {
    let days = i64::try_from(epoch / 86_400).unwrap_or(0);
    let seconds = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `org.opencontainers.image.source`: the `origin` remote, if there is one.
fn source_url(root: &Path) -> Option<String> {
    git(root, &["remote", "get-url", "origin"]).filter(|url| !url.is_empty())
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("output path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = path.with_extension("partial");
    fs::write(&partial, data).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("cannot rename to {}", path.display()))
}

fn copy_executable(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = to.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    fs::copy(from, to).with_context(|| format!("cannot copy to {}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot chmod {}", to.display()))
}

#[expect(clippy::cast_precision_loss, reason = "a size to print")]
fn mib(bytes: usize) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn layout_is_deterministic() {
        let revision = Revision {
            commit: Some("0123456789abcdef0123456789abcdef01234567".to_owned()),
            dirty: false,
            epoch: 1_700_000_000,
        };
        let build = || {
            let layout = OciLayout::new(b"binary", "0.1.0", &revision, None).unwrap();
            (
                layout.manifest_digest.clone(),
                layout.archive(revision.epoch).unwrap(),
            )
        };
        assert_eq!(build(), build());
        assert_eq!(revision.short(), "0123456");
    }
}
