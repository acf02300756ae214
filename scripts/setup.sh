#!/usr/bin/env bash
# Checks for, and installs when missing, everything lb needs to build and to
# run its tests and demo on a fresh Debian machine (run as root):
#   - the pinned Rust toolchain (rust-toolchain.toml) with rust-src, clippy, rustfmt
#     and the ARCH-unknown-linux-musl target (cargo xtask image: a static lb)
#   - LLVM 22 development files and bpf-linker built against them
#   - iproute2, nsenter (util-linux), socat, curl, bpftool, iperf3 (tests, demo),
#     python3 (the socket client of tests/harness_socklb.rs)
#   - wrk, nginx-light, nftables, iptables, conntrack (cargo xtask bench)
#   - kubectl (Debian's kubernetes-client) when missing (tests/deploy.rs)
#   - musl-tools (musl-gcc for ring's C code), skopeo and umoci (cargo xtask
#     image, tests/image.rs)
#   - a bpf filesystem at /sys/fs/bpf
# Every step says what it checks and what it does. Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLCHAIN="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
BPF_LINKER_VERSION="0.13.0"
LLVM_MAJOR="22"
APT_PACKAGES=(
  "llvm-${LLVM_MAJOR}-dev" "libpolly-${LLVM_MAJOR}-dev" iproute2 util-linux socat curl
  bpftool iperf3 procps python3
  wrk nginx-light nftables iptables conntrack
  musl-tools skopeo umoci
)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root for: $* (run this script as root)"
  fi
}

# --- Debian packages -------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
  say "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
    # The benchmarks start their own nginx inside their namespaces; the
    # package's service on the host is not wanted.
    say "stopping and disabling the host nginx service the package started"
    as_root systemctl disable --now nginx >/dev/null 2>&1 || as_root service nginx stop >/dev/null 2>&1 || true
  fi
else
  say "Debian packages present: ${APT_PACKAGES[*]}"
fi

# --- kubectl (tests/deploy.rs renders and dry-runs deploy/) ------------------
# Any kubectl will do; Debian's comes with kubernetes-client.
if command -v kubectl >/dev/null; then
  say "kubectl present ($(command -v kubectl))"
else
  command -v apt-get >/dev/null || die "kubectl missing and no apt-get to install kubernetes-client"
  say "installing kubectl (Debian package kubernetes-client)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi

# --- Rust toolchain --------------------------------------------------------
command -v rustup >/dev/null || die "rustup not found: install rustup first (https://rustup.rs)"
if rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1 &&
  [[ -d "$(rustup run "$TOOLCHAIN" rustc --print sysroot)/lib/rustlib/src/rust/library" ]] &&
  rustup run "$TOOLCHAIN" cargo clippy --version >/dev/null 2>&1 &&
  rustup run "$TOOLCHAIN" rustfmt --version >/dev/null 2>&1; then
  say "Rust $TOOLCHAIN with rust-src, clippy, rustfmt present"
else
  say "installing Rust $TOOLCHAIN with rust-src, clippy, rustfmt (pinned: bpf-linker needs its LLVM $LLVM_MAJOR)"
  rustup toolchain install "$TOOLCHAIN" --profile minimal --component rust-src,clippy,rustfmt
fi

MUSL_TARGET="$(uname -m)-unknown-linux-musl"
if rustup target list --installed --toolchain "$TOOLCHAIN" | grep -qx "$MUSL_TARGET"; then
  say "Rust target $MUSL_TARGET present"
else
  say "installing Rust target $MUSL_TARGET for $TOOLCHAIN (cargo xtask image builds a static lb)"
  rustup target add --toolchain "$TOOLCHAIN" "$MUSL_TARGET"
fi

# --- bpf-linker ------------------------------------------------------------
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"
if command -v bpf-linker >/dev/null && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
  say "bpf-linker $BPF_LINKER_VERSION present ($(command -v bpf-linker))"
else
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR (about a minute)"
  PATH="/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH" rustup run "$TOOLCHAIN" cargo install --quiet \
    bpf-linker --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM_MAJOR}"
fi

# --- bpffs -----------------------------------------------------------------
if [[ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" == "bpf_fs" ]]; then
  say "bpffs mounted at /sys/fs/bpf"
else
  say "mounting bpffs at /sys/fs/bpf"
  as_root mount -t bpf bpf /sys/fs/bpf || die "cannot mount bpffs at /sys/fs/bpf"
fi

say "ready: toolchain $TOOLCHAIN (+ $MUSL_TARGET), bpf-linker, LLVM $LLVM_MAJOR, test tools, bpffs"
