"""A bundle vouches only for its own trust domain: ``TrustDomains`` asked by real TLS engines.

Material with our trust domain (mesh.local) and a federated one (partner.org) verifies peers
against the union of the bundles, so OpenSSL accepts a partner-signed certificate that claims
*our* trust domain. These handshakes run two ``TLSEngine``s over memory, as the legs drive them,
and prove that the engine's answer refuses that impostor on both sides, that a refused client gets
no session ticket, and that honest peers (and their resumed sessions) pass.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support import CertFactory, CertFiles, client_context, server_context

from sidecar import pki
from sidecar.identity import PeerIdentity
from sidecar.tls import Material, Origin, PemBundle, TrustBundle, TrustDomains, load_material
from sidecar.tlsio import TLSEngine

MESH, PARTNER = "mesh.local", "partner.org"


def material_of(ca: CertFactory, *federated: CertFactory) -> Material:
    leaf = pki.issue(ca.ca, spiffe_ids=["spiffe://mesh.local/orders"], dns_names=["localhost"])
    trust = (TrustBundle(MESH, ca.ca.cert_pem()), *(TrustBundle(PARTNER, f.ca.cert_pem()) for f in federated))
    origin = Origin.workload_api("unix:///run/agent.sock", "spiffe://mesh.local/orders", [MESH, PARTNER])
    return load_material(PemBundle(chain=leaf.cert_pem(), key=leaf.key_pem(), trust=trust, origin=origin))


def both_bundles(ca: CertFactory, partner: CertFactory, folder: Path) -> Path:
    path = folder / "both.pem"
    path.write_bytes(ca.ca.cert_pem() + partner.ca.cert_pem())
    return path


def pump(client: TLSEngine, server: TLSEngine) -> None:
    """Run the handshake to its end on both sides, then carry what the server sent after it."""
    for _ in range(10):
        done = [engine.handshake() for engine in (client, server) if not engine.established]
        server.feed(client.output())
        client.feed(server.output())
        if not done:
            break
    assert client.established and server.established
    client.read()  # the ticket, if any, arrives after the handshake


def inbound(
    material: Material, peer: CertFiles | ssl.SSLContext, trusted: Path, session: ssl.SSLSession | None = None
) -> tuple[TLSEngine, TLSEngine]:
    """Our server engine, as the inbound policy makes it, and ``peer``'s, after their handshake."""
    ctx = peer if isinstance(peer, ssl.SSLContext) else client_context(peer, trusted)
    client = TLSEngine(ctx, server_side=False, server_hostname="localhost", session=session)
    server = TLSEngine(material.server_ctx, server_side=True, vet=material.vet)
    pump(client, server)
    return server, client


def test_an_impostor_of_our_trust_domain_is_refused_inbound_and_gets_no_ticket(
    ca: CertFactory, partner: CertFactory, tmp_path: Path
) -> None:
    material = material_of(ca, partner)
    impostor = partner.leaf("admin", spiffe="spiffe://mesh.local/admin")
    ours, theirs = inbound(material, impostor, ca.ca_file)
    assert ours.negotiated().trust_problem == (
        "spiffe://mesh.local/admin: its chain does not lead to the bundle of its trust domain mesh.local"
    )
    session = theirs.session()
    assert session is None or not session.has_ticket  # it cannot come back without a chain to check


def test_an_impostor_server_is_refused_outbound(ca: CertFactory, partner: CertFactory, tmp_path: Path) -> None:
    material = material_of(ca, partner)
    impostor = partner.leaf("orders", spiffe="spiffe://mesh.local/orders")
    client = TLSEngine(material.client_ctx(verify_hostname=False), server_side=False, vet=material.vet)
    server = TLSEngine(server_context(impostor, both_bundles(ca, partner, tmp_path)), server_side=True)
    pump(client, server)
    assert client.negotiated().trust_problem == (
        "spiffe://mesh.local/orders: its chain does not lead to the bundle of its trust domain mesh.local"
    )


@pytest.mark.parametrize(
    ("spiffe", "problem"),
    [
        ("spiffe://partner.org/billing", "its chain does not lead to the bundle of its trust domain partner.org"),
        ("spiffe://elsewhere.org/x", "no trust bundle for its trust domain elsewhere.org"),
        (None, "the peer's certificate carries 0 SPIFFE IDs, not exactly one"),
    ],
)
def test_our_own_ca_does_not_vouch_for_other_trust_domains_either(
    ca: CertFactory, partner: CertFactory, spiffe: str | None, problem: str
) -> None:
    material = material_of(ca, partner)
    peer = ca.leaf("odd", spiffe=spiffe)
    got = inbound(material, peer, ca.ca_file)[0].negotiated().trust_problem
    assert got is not None and got.endswith(problem)


def test_honest_peers_of_both_trust_domains_pass_and_resume(
    ca: CertFactory, partner: CertFactory, tmp_path: Path
) -> None:
    material = material_of(ca, partner)
    for leaf in (ca.leaf("frontend"), partner.leaf("billing", spiffe="spiffe://partner.org/billing")):
        peer = client_context(leaf, ca.ca_file)
        first, theirs = inbound(material, peer, ca.ca_file)
        assert first.negotiated().trust_problem is None
        session = theirs.session()
        assert session is not None and session.has_ticket
        again, _ = inbound(material, peer, ca.ca_file, session=session)
        assert again.negotiated().resumed and again.negotiated().trust_problem is None


def test_with_one_trust_domain_only_the_identity_is_checked(ca: CertFactory) -> None:
    material = material_of(ca)
    assert inbound(material, ca.leaf("frontend"), ca.ca_file)[0].negotiated().trust_problem is None
    stranger, _ = inbound(material, ca.leaf("x", spiffe="spiffe://partner.org/x"), ca.ca_file)
    assert stranger.negotiated().trust_problem == (
        "spiffe://partner.org/x: no trust bundle for its trust domain partner.org"
    )


def test_a_full_handshake_whose_chain_cannot_be_read_is_refused(ca: CertFactory, partner: CertFactory) -> None:
    """Where libssl's chain cannot be had (another interpreter, pointers that do not check out), a
    material with several trust domains refuses rather than admits; a resumed session, which never
    has a chain, is judged by its identity."""
    check = TrustDomains({MESH: [ca.ca.cert], PARTNER: [partner.ca.cert]})
    frontend = PeerIdentity(uris=("spiffe://mesh.local/frontend",))
    chain = (b"leaf", ca.ca.cert.public_bytes(serialization.Encoding.DER))
    assert check.problem(frontend, chain, False) is None
    assert check.problem(frontend, None, False) == (
        "spiffe://mesh.local/frontend: the verified chain cannot be read, so its trust domain cannot be checked"
    )
    assert check.problem(frontend, None, True) is None
    assert check.problem(PeerIdentity(uris=("spiffe://elsewhere.org/x",)), None, True) is not None
