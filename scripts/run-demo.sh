#!/usr/bin/env bash
# The demo, from a fresh machine (run as root): installs what is missing,
# builds `lb` (release), then runs scripts/demo.sh: a namespace topology, the
# agent on examples/manifests, and requests over IPv4 and IPv6 to a
# dual-stack Service, printing which backend answered.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/setup.sh"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
echo "[demo] building lb (release)"
cargo build --release --package lb-userspace --bin lb
exec "$ROOT/scripts/demo.sh" "$ROOT/target/release/lb"
