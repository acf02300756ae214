#!/usr/bin/env bash
# Demo of the dual-stack service load balancer, end to end, on one machine.
#
#   scripts/demo.sh [path-to-lb-binary]      (as root; default: target/{release,debug}/lb)
#
# Builds a small topology entirely inside network namespaces it creates
# (lbdemo-node, lbdemo-client, lbdemo-be1..3; nothing is added to the root
# namespace), starts socat servers in the backends that answer with their
# name, runs `lb agent` in the node namespace on examples/manifests (Service
# demo/web: 198.19.0.10 and fd00:96::10, 80/TCP -> 8080, 53/UDP -> 5353), sends
# requests to both VIPs, prints who answered and `lb services`, and removes
# everything again on exit (also on failure or Ctrl-C).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
P=lbdemo
NODE="$P-node"
CLIENT="$P-client"
BACKENDS=(be1 be2 be3)
VIP4=198.19.0.10
VIP6=fd00:96::10
METRICS=127.0.0.1:9917
PIN="/sys/fs/bpf/$P-$$"
WORK=""
AGENT_PID=""
FAILURES=0

die() { echo "demo: $*" >&2; exit 1; }

LB="${1:-}"
if [[ -z "$LB" ]]; then
    for candidate in "$ROOT/target/release/lb" "$ROOT/target/debug/lb"; do
        if [[ -x "$candidate" ]]; then LB="$candidate"; break; fi
    done
fi
[[ -n "$LB" && -x "$LB" ]] || die "no lb binary (build it: cargo build -p lb-userspace --release, or pass its path)"
LB="$(realpath "$LB")"
[[ $EUID -eq 0 ]] || die "must run as root (network namespaces, BPF)"
for tool in ip nsenter socat curl timeout; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done

namespaces() { ip netns list | awk -v p="$P-" 'index($1, p) == 1 { print $1 }'; }

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n "$AGENT_PID" ]]; then
        kill -KILL "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
    if [[ -d "$PIN" ]]; then
        timeout 15 nsenter --net="/run/netns/$NODE" -- "$LB" cleanup --pin-path "$PIN" >/dev/null 2>&1 \
            || echo "demo: warning: lb cleanup failed" >&2
        rm -rf "$PIN"
    fi
    local ns pid
    for ns in $(namespaces); do
        # Every process inside our namespaces was started by this script.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null
        done
        ip netns delete "$ns" 2>/dev/null || echo "demo: warning: cannot delete netns $ns" >&2
    done
    if [[ $rc -ne 0 && -n "$WORK" && -s "$WORK/agent.log" ]]; then
        echo "---- agent log ----" >&2
        tail -n 50 "$WORK/agent.log" >&2
    fi
    [[ -n "$WORK" ]] && rm -rf "$WORK"
    [[ -z "$(namespaces)" ]] && echo "cleaned up: no $P-* namespaces left, pins $PIN removed"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Namespaces left by a run that was SIGKILLed carry our prefix: remove them.
for ns in $(namespaces); do
    echo "removing stale namespace $ns"
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
    ip netns delete "$ns"
done

if ! awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts; then
    mount -t bpf bpf /sys/fs/bpf
fi

WORK="$(mktemp -d "/tmp/$P.XXXXXX")"
mkdir "$WORK/manifests"
cp "$ROOT"/examples/manifests/*.yaml "$WORK/manifests/"

in_ns() { local ns="$1"; shift; ip netns exec "$ns" "$@"; }

# --- topology -------------------------------------------------------------
echo "== building topology ($NODE, $CLIENT, ${BACKENDS[*]/#/$P-})"
ip netns add "$NODE"
in_ns "$NODE" sh -c '
    sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    ip link set lo up'

# wire POD_NS NODE_IFACE K: pod gets 198.18.K.2/24 + fd00:K::2/64, node .1 / ::1
wire() {
    local ns="$1" ifc="$2" k="$3"
    ip netns add "$ns"
    in_ns "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    in_ns "$ns" ip link set lo up
    ip -n "$NODE" link add "$ifc" type veth peer name eth0 netns "$ns"
    in_ns "$NODE" sysctl -qw "net.ipv4.conf.$ifc.rp_filter=0"
    ip -n "$NODE" addr add "198.18.$k.1/24" dev "$ifc"
    ip -n "$NODE" -6 addr add "fd00:$k::1/64" dev "$ifc" nodad
    ip -n "$NODE" link set "$ifc" up
    ip -n "$ns" addr add "198.18.$k.2/24" dev eth0
    ip -n "$ns" -6 addr add "fd00:$k::2/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add 198.18.0.0/16 via "198.18.$k.1"
    ip -n "$ns" route add 198.19.0.0/24 via "198.18.$k.1"
    ip -n "$ns" -6 route add fd00::/16 via "fd00:$k::1"
    ip -n "$ns" -6 route add fd00:96::/112 via "fd00:$k::1"
}

wire "$CLIENT" h-cl 1
IFACES=h-cl
k=2
for be in "${BACKENDS[@]}"; do
    wire "$P-$be" "h-$be" "$k"
    IFACES="$IFACES,h-$be"
    # Servers answering with their name: TCP 8080 and UDP 5353, both families.
    # The reply script reads the request first: if it exited without reading,
    # socat could hit EPIPE writing the request to it and drop the answer.
    ip netns exec "$P-$be" socat -T 5 TCP6-LISTEN:8080,ipv6only=0,fork,reuseaddr \
        SYSTEM:"read -r request; echo $be" &
    ip netns exec "$P-$be" socat -T 5 UDP6-RECVFROM:5353,ipv6only=0,fork \
        SYSTEM:"read -r request; echo $be" &
    disown -a  # killed by pid in cleanup; no job-status noise
    k=$((k + 1))
done
sleep 0.3

# --- agent ----------------------------------------------------------------
echo "== starting lb agent in $NODE (attach $IFACES, pins $PIN, log $WORK/agent.log)"
# --socket-lb=off: the socket programs would attach to this machine's cgroup
# root; the demo's clients are pods, served by the TC program.
nsenter --net="/run/netns/$NODE" -- "$LB" agent --source "file:$WORK/manifests" \
    --attach "$IFACES" --pin-path "$PIN" --metrics-addr "$METRICS" --socket-lb=off \
    >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!

ready=0
for _ in $(seq 1 100); do
    kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited early"
    if in_ns "$NODE" curl -sf --max-time 1 "http://$METRICS/readyz" >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
[[ $ready -eq 1 ]] || die "agent not ready within 10 s"
echo "agent ready"

# --- traffic --------------------------------------------------------------
# ask FAMILY PROTO SOCAT-ADDRESS LABEL: one request from the client namespace.
ask() {
    local family="$1" proto="$2" address="$3" label="$4" answer
    # -T: idle timeout; -t: how long to wait for the answer after our EOF
    # (UDP has no EOF, so keep it short); timeout(1) bounds it all.
    answer="$(echo ping | in_ns "$CLIENT" timeout 5 socat -T 2 -t 1 - "$address" 2>/dev/null | head -n 1)" || true
    if [[ -n "$answer" ]]; then
        echo "$family $proto $label -> answered by $answer"
    else
        echo "$family $proto $label -> NO ANSWER"
        FAILURES=$((FAILURES + 1))
    fi
}

echo "== requests"
for _ in 1 2 3 4 5 6; do
    ask IPv4 TCP "TCP4:$VIP4:80,connect-timeout=2" "$VIP4:80"
done
for _ in 1 2; do
    ask IPv4 UDP "UDP4:$VIP4:53" "$VIP4:53"
done
for _ in 1 2 3 4 5 6; do
    ask IPv6 TCP "TCP6:[$VIP6]:80,connect-timeout=2" "[$VIP6]:80"
done
for _ in 1 2; do
    ask IPv6 UDP "UDP6:[$VIP6]:53" "[$VIP6]:53"
done

echo "== lb services"
"$LB" services --pin-path "$PIN" || "$LB" services --json --pin-path "$PIN" || true

if [[ $FAILURES -ne 0 ]]; then
    die "$FAILURES request(s) got no answer"
fi
echo "== all requests answered"
