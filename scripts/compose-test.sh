#!/usr/bin/env bash
# make test-compose: prove docker-compose.yml for real, with Podman standing in for Docker.
#
# Prepares what the test needs (each step is skipped when its result is already there):
#   1. podman, runc, debootstrap, iproute2 from Debian; podman-compose in a venv of its own;
#   2. a containers.conf for this kind of machine (runc, cgroupfs, file events, fixed ulimits);
#   3. a Debian bookworm base image with python3 + venv, made with debootstrap and imported
#      (the tarball is cached, so later runs skip debootstrap), plus a thin layer holding this
#      machine's local CA certificates so pip inside the build trusts what the host trusts;
#   4. the sidecar image, built from the repository's Dockerfile with BASE_IMAGE set to that base;
# then runs tests/compose with pytest. The test runs the mesh inside a network namespace of its
# own (podman under `nsenter --net`), so podman's bridge and firewall rules never touch the host,
# and tears everything down, namespace included, even when it fails; the trap below is a second
# net for when pytest itself is killed.
#
# Environment: SIDECAR_COMPOSE_CACHE (default /var/cache/sidecar-compose), PYTHON (the project's
# interpreter, default .venv/bin/python), KEEP_LOGS=1 keeps the containers' logs after success.
# Needs root (network namespaces, rootful podman).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SIDECAR_COMPOSE_CACHE:-/var/cache/sidecar-compose}
PODMAN_COMPOSE_VERSION=1.6.0
BASE_RAW=localhost/sidecar-base-raw:bookworm
BASE=localhost/sidecar-base:bookworm
IMAGE=localhost/sidecar:compose-test
NETNS=sidecar-compose-$$
PROJECT=sidecar-ct-$$
LOGS=${SIDECAR_COMPOSE_LOGS:-$ROOT/build/compose-logs}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'compose-test: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (network namespaces and rootful podman)"
started=$(date +%s)

# --- 1. tools -----------------------------------------------------------------------------------
missing=()
for tool in podman:podman runc:runc debootstrap:debootstrap ip:iproute2 nsenter:util-linux; do
    command -v "${tool%%:*}" > /dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap iproute2
fi
mkdir -p "$CACHE"
if ! "$CACHE/venv/bin/podman-compose" --version 2> /dev/null | grep -q "$PODMAN_COMPOSE_VERSION"; then
    step "installing podman-compose $PODMAN_COMPOSE_VERSION into $CACHE/venv"
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi

# --- 2. containers.conf -------------------------------------------------------------------------
# crun fails here on cgroups and rlimits; there is no systemd (cgroupfs, file events) nor journald.
cat > "$CACHE/containers.conf" << 'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF=$CACHE/containers.conf

# --- 3. base image ------------------------------------------------------------------------------
if ! podman image exists "$BASE_RAW"; then
    tarball=$CACHE/base-bookworm.tar
    if [ ! -s "$tarball" ]; then
        step "debootstrap bookworm (minbase + python3 python3-venv) into $CACHE, a few minutes"
        rootfs=$CACHE/rootfs.tmp
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian > "$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    step "importing $tarball as $BASE_RAW"
    podman import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_RAW" > /dev/null
fi
# The machine's local CAs (a TLS-inspecting egress proxy's, say), so pip in the build reaches PyPI.
basectx=$CACHE/base-context
rm -rf "$basectx" && mkdir -p "$basectx/ca"
cp /usr/local/share/ca-certificates/*.crt "$basectx/ca/" 2> /dev/null || true
cat > "$basectx/Containerfile" << EOF
FROM $BASE_RAW
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates > /dev/null 2>&1 \\
 && printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' > /etc/pip.conf
EOF
step "base image $BASE"
podman build -q --network host --format docker -t "$BASE" "$basectx" > /dev/null

# --- 4. the sidecar image -----------------------------------------------------------------------
step "building $IMAGE from Dockerfile (BASE_IMAGE=$BASE)"
# --format docker keeps the HEALTHCHECK (the OCI image format has no field for it).
podman build --network host --format docker --build-arg "BASE_IMAGE=$BASE" -t "$IMAGE" "$ROOT" \
    > "$CACHE/build.log" 2>&1 || { tail -30 "$CACHE/build.log" >&2; die "image build failed"; }
echo "built in $(($(date +%s) - started))s so far"

# --- 5. the test --------------------------------------------------------------------------------
cleanup() {
    # A second net under the test's own teardown: only what this run named, by name or label.
    if [ -e "/run/netns/$NETNS" ]; then
        echo "compose-test: cleaning up after an interrupted test ($NETNS)" >&2
        in_ns() { nsenter --net="/run/netns/$NETNS" "$@"; }
        local -a ids vols
        mapfile -t ids < <(in_ns podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" || true)
        [ ${#ids[@]} -eq 0 ] || in_ns podman rm -f -t 2 "${ids[@]}" > /dev/null 2>&1 || true
        mapfile -t vols < <(in_ns podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT" || true)
        [ ${#vols[@]} -eq 0 ] || in_ns podman volume rm -f "${vols[@]}" > /dev/null 2>&1 || true
        in_ns podman network rm -f "${PROJECT}_default" > /dev/null 2>&1 || true
        for pid in $(ip netns pids "$NETNS" 2> /dev/null); do kill "$pid" 2> /dev/null || true; done
        ip netns del "$NETNS" 2> /dev/null || true
    fi
}
trap cleanup EXIT INT TERM

# What of the host's network podman could change; it must be the same after the test.
host_network() {
    ip -o link show | awk -F': ' '{print $2}'
    if command -v iptables-save > /dev/null; then iptables-save | grep -v '^#' | sed 's/ \[[0-9:]*\]$//'; fi
    cat /proc/sys/net/ipv4/ip_forward
}
host_before=$(host_network)

step "tests/compose (netns $NETNS, project $PROJECT)"
rm -rf "$LOGS"
status=0
SIDECAR_COMPOSE_TEST=1 \
SIDECAR_COMPOSE_NETNS=$NETNS \
SIDECAR_COMPOSE_PROJECT=$PROJECT \
SIDECAR_COMPOSE_LOGS=$LOGS \
SIDECAR_IMAGE=$IMAGE \
PODMAN_COMPOSE=$CACHE/venv/bin/podman-compose \
    "$PYTHON" -m pytest -p no:cacheprovider -v -rA "$ROOT/tests/compose" || status=$?
cleanup
if [ "$(host_network)" != "$host_before" ]; then
    echo "compose-test: the host's network changed during the test:" >&2
    diff <(echo "$host_before") <(host_network) >&2 || true
    status=1
fi
echo "compose-test: $(($(date +%s) - started))s in all; containers' logs in $LOGS"
exit "$status"
