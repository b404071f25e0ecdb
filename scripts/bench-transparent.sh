#!/usr/bin/env bash
# make bench-transparent: what transparent mode costs, against explicit mode, in the same run.
#
# Runs `python -m bench --pairs sidecar,sidecar-transparent` inside a network namespace of its
# own (its loopback only), since the capture pair installs nat rules (bench/transparent.py);
# extra arguments go to the bench (--reps 3, --duration 2, ...). Results: bench/results/transparent/.
# Needs root, ip, iptables (nft), nft, setpriv, and the bench's tools (make bench-deps).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NETNS=${BENCH_NETNS:-sidecar-bench-$$}
[ "$(id -u)" = 0 ] || { echo "bench-transparent: needs root (a network namespace, nat rules)" >&2; exit 2; }
ip netns add "$NETNS"
trap 'ip netns del "$NETNS"' EXIT
ip -n "$NETNS" link set lo up
cd "$ROOT"
ip netns exec "$NETNS" "$PYTHON" -m bench --pairs sidecar,sidecar-transparent --out bench/results/transparent "$@"
