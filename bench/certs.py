"""The bench's PKI: one EC P-256 CA, a server leaf, a client leaf, and a rogue CA's leaf for checks.

Both leaves carry a SPIFFE ID (what our sidecar's allow lists match) and the DNS name
``localhost`` (what the peers' host-name verification matches). Files are written in every shape
a proxy wants: separate cert and key, and cert + key in one PEM for HAProxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sidecar import pki

TRUST_DOMAIN = "bench.local"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/client"
SERVER_NAME = "localhost"

# TLS 1.3 suites, in the order the sidecar's openssl.cnf sets (Mozilla "modern"). Every peer is
# given the same list, so all pairs negotiate the same suite and compare like with like.
CIPHERSUITES = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path
    combined: Path  # cert chain then key, for HAProxy's ``crt``
    serial: int = 0


@dataclass(frozen=True)
class Certs:
    ca: Path
    server: Leaf
    client: Leaf
    rogue: Leaf  # a client leaf from another CA: must be refused
    issuer: pki.Issued | None = field(default=None, repr=False)  # the CA, for rotations (``write_leaf``)


def make(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca = pki.new_ca("bench CA", trust_domain=TRUST_DOMAIN)
    rogue_ca = pki.new_ca("rogue CA", trust_domain=TRUST_DOMAIN)
    ca_file = folder / "ca.pem"
    pki.write_atomic(ca_file, ca.cert_pem())
    return Certs(
        ca=ca_file,
        server=write_leaf(ca, folder, "server", SERVER_ID),
        client=write_leaf(ca, folder, "client", CLIENT_ID),
        rogue=write_leaf(rogue_ca, folder, "rogue", CLIENT_ID),
        issuer=ca,
    )


def write_leaf(issuer: pki.Issued, folder: Path, name: str, spiffe_id: str) -> Leaf:
    """Issue a leaf into ``folder`` (key, then cert, then the combined file, each atomically):
    writing it again over the same name is a rotation a watching proxy picks up."""
    issued = pki.issue(issuer, common_name=name, spiffe_ids=[spiffe_id], dns_names=[SERVER_NAME], hours=48)
    out = Leaf(
        folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.combined.pem", issued.cert.serial_number
    )
    pki.write_issued(issued, out.cert, out.key)
    pki.write_atomic(out.combined, issued.cert_pem() + issued.key_pem(), 0o600)
    return out
