#!/bin/sh
# Certificates for the compose mesh (docker-compose.yml), run by its one-shot `pki` and `rotate`
# services with the sidecar image. The CA lives in the `ca` volume (mounted at /ca); each
# workload's identity lives in its own volume, mounted at /vol/NAME here and read-only at /certs
# in that workload's sidecar, as cert.pem + key.pem + ca.pem.
#
#   pki.sh init NAME...     make the CA once, then issue every NAME that has no identity yet
#   pki.sh rotate NAME...   re-issue NAME in place (atomic writes): its sidecar reloads it live
set -eu

TRUST_DOMAIN=${TRUST_DOMAIN:-mesh.local}
CERT_HOURS=${CERT_HOURS:-24}
SIDECAR_UID=${SIDECAR_UID:-10001}

issue() {
    name=$1
    # The SPIFFE ID is spiffe://$TRUST_DOMAIN/$name; the DNS SAN is the compose service name.
    sidecar pki issue --dir /ca --name "$name" --dns "$name" --hours "$CERT_HOURS" --out "/vol/$name"
    cp /ca/ca.pem "/vol/$name/.ca.pem.tmp" && mv -f "/vol/$name/.ca.pem.tmp" "/vol/$name/ca.pem"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
init)
    # Runs as root only to hand the fresh volumes to the sidecar's non-root user.
    if [ ! -e /ca/ca.pem ]; then
        sidecar pki init --dir /ca --trust-domain "$TRUST_DOMAIN"
    fi
    for name in "$@"; do
        if [ -e "/vol/$name/cert.pem" ]; then
            echo "$name: identity already issued (use the rotate service to re-issue)"
        else
            issue "$name"
        fi
    done
    chown -R "$SIDECAR_UID:$SIDECAR_UID" /ca /vol
    ;;
rotate)
    [ $# -gt 0 ] || { echo "usage: pki.sh rotate NAME..." >&2; exit 2; }
    for name in "$@"; do
        [ -e "/vol/$name/cert.pem" ] || { echo "no identity '$name' under /vol" >&2; exit 2; }
        issue "$name"
    done
    ;;
*)
    echo "usage: pki.sh init NAME... | pki.sh rotate NAME..." >&2
    exit 2
    ;;
esac
