#!/usr/bin/env bash
# The whole test suite, privileged tests included (run as root): formatting,
# clippy (host, and the eBPF crate for its BPF target), unit tests (the
# eBPF crate's on the host too), BPF_PROG_TEST_RUN datapath tests, the veth
# harnesses, and a quick smoke run of the benchmarks.
# Privileged tests fail (they never silently pass) without root or bpffs,
# unless LB_SKIP_PRIVILEGED=1 is set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
step() { printf '\n==== %s\n' "$*"; }
start=$(date +%s)

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo xtask clippy-ebpf (clippy for bpfel-unknown-none and the host tests, -D warnings)"
cargo xtask clippy-ebpf

step "cargo xtask build-ebpf"
cargo xtask build-ebpf

# Built before `cargo test` (which holds cargo's lock while tests run);
# tests/image.rs checks and runs this archive.
step "cargo xtask image (static lb, OCI archive for tests/image.rs)"
LB_IMAGE_ARCHIVE="$ROOT/target/image/lb-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1).oci.tar"
export LB_IMAGE_ARCHIVE
cargo xtask image --output "$LB_IMAGE_ARCHIVE"

# Agents started by tests keep the socket programs off (their default would
# attach them to this machine's cgroup root); tests/harness_socklb.rs asks
# for them on a child cgroup of its own with an explicit --socket-lb.
export LB_SOCKET_LB=off

step "cargo test (unit, kube source, deploy, datapath, harness)"
results="$(mktemp)"
trap 'rm -f "$results"' EXIT
cargo test --all-targets -- --test-threads="${LB_TEST_THREADS:-2}" 2>&1 | tee "$results"

step "cargo test -p lb-ebpf (the datapath's checksum, hash and verdict code, on the host)"
# lb-ebpf is not a default member (it is built for BPF); its plain modules
# also build on the host, where their unit tests run.
cargo test -p lb-ebpf --all-targets 2>&1 | tee -a "$results"
# Totals over every test binary, for the summary line at the end.
read -r passed failed < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($i == "passed;") p += $(i - 1)
      if ($i == "failed;") f += $(i - 1)
    }
  } END { print p + 0, f + 0 }' "$results")

step "cargo xtask bench --quick (a smoke run: reports numbers, never fails on them)"
cargo xtask bench --quick

printf '\n==== all tests passed in %ss\n' "$(($(date +%s) - start))"
printf 'Tests: %s passed, %s failed\n' "$passed" "$failed"
