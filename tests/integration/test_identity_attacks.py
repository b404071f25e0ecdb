"""Attacks on who a peer is, against a real ``sidecar run``: SPIFFE ID tricks, identity confusion
between SAN types and subject fields, a client certificate whose only EKU is anyExtendedKeyUsage,
pinning, and TLS sessions carried from one listener to another.

Each refusal is proven three ways: the client gets no answer, the access record says denied (or
tls_error), and the app behind the listener never saw a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from support import (
    SPIFFE_TRICKS,
    TD,
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    TLSServer,
    client_context,
    inbound_config,
    plain_connect,
    recv_exactly,
    refused,
    start_sidecar,
    tls_call,
    tls_exchange,
    tls_section,
    write_config,
)

from sidecar import pki
from sidecar.pinning import PREFIX, pin_of_der


def pin(leaf: CertFiles) -> str:
    return PREFIX + pin_of_der(leaf.issued.cert.public_bytes(serialization.Encoding.DER))


def inbound(
    folder: Path, ca: CertFactory, server_leaf: CertFiles, listeners: dict[str, tuple[str, list[str]]]
) -> SidecarProcess:
    return start_sidecar(inbound_config(folder / "in.yaml", server_leaf, ca.ca_file, listeners))


@pytest.fixture
def jobs(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> SidecarProcess:
    sc = inbound(tmp_path, ca, server_leaf, {"jobs": (backend.address, [f"{TD}/jobs/*", f"{TD}/jobs/**"])})
    sidecars.append(sc)
    return sc


# -- SPIFFE ID tricks ------------------------------------------------------------------------------


def test_spiffe_id_tricks_are_denied_and_never_reach_the_app(
    jobs: SidecarProcess, ca: CertFactory, backend: Backend
) -> None:
    port = jobs.port("jobs")
    for trick in SPIFFE_TRICKS:
        assert refused(port, client_context(ca.leaf("trick", spiffe=trick), ca.ca_file)), trick
    records = jobs.wait_access(len(SPIFFE_TRICKS))
    assert [r["outcome"] for r in records] == ["denied"] * len(SPIFFE_TRICKS)
    assert [r["peer_identity"] for r in records] == list(SPIFFE_TRICKS)  # the log shows what was presented
    assert backend.accepts == 0
    # the same listener admits a valid ID under the pattern: the refusals were the tricks'
    assert tls_exchange(port, client_context(ca.leaf("nightly", spiffe=f"{TD}/jobs/nightly"), ca.ca_file)) == b"ping"
    assert backend.accepts == 1


def test_the_refusal_of_an_invalid_spiffe_id_says_so(jobs: SidecarProcess, ca: CertFactory) -> None:
    assert refused(jobs.port("jobs"), client_context(ca.leaf("trick", spiffe=f"{TD}/jobs/.."), ca.ca_file))
    [rec] = jobs.wait_access(1)
    assert rec["outcome"] == "denied"
    assert rec["reason"].startswith("invalid_spiffe_id: spiffe://mesh.local/jobs/.. is not a valid SPIFFE ID")


# -- identity confusion between SAN types and subject fields ---------------------------------------


def test_a_spiffe_id_anywhere_but_a_uri_san_is_not_a_spiffe_id(
    jobs: SidecarProcess, ca: CertFactory, backend: Backend
) -> None:
    claim = f"{TD}/jobs/nightly"
    impostors = [
        ca.leaf("cn", spiffe=None, common_name=claim),  # in the subject CN
        ca.leaf("ou", spiffe=None, ous=(claim,)),  # in a subject OU
        ca.leaf("dns", spiffe=None, dns=(claim,)),  # as a DNS SAN
    ]
    for leaf in impostors:
        assert refused(jobs.port("jobs"), client_context(leaf, ca.ca_file))
    assert [r["outcome"] for r in jobs.wait_access(len(impostors))] == ["denied"] * len(impostors)
    assert backend.accepts == 0


def test_dns_and_cn_patterns_are_not_fooled_by_other_fields(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    sc = inbound(tmp_path, ca, server_leaf, {"api": (backend.address, ["dns:api.mesh.local", "cn:billing"])})
    sidecars.append(sc)
    impostors = [
        ca.leaf("api.mesh.local", spiffe=None, dns=()),  # the name only as CN, no DNS SAN
        ca.leaf("uri", spiffe="dns:api.mesh.local", dns=()),  # the pattern's text as a URI SAN
        ca.leaf("x", spiffe=None, dns=("billing",)),  # the CN's value as a DNS SAN
        ca.leaf("x", spiffe=None, dns=(), ous=("billing",)),  # the CN's value as an OU
        ca.leaf("x", spiffe=f"{TD}/billing", dns=()),  # the CN's value as a SPIFFE path
    ]
    for leaf in impostors:
        assert refused(sc.port("api"), client_context(leaf, ca.ca_file))
    assert [r["outcome"] for r in sc.wait_access(len(impostors))] == ["denied"] * len(impostors)
    assert backend.accepts == 0
    assert tls_exchange(sc.port("api"), client_context(ca.leaf("billing", spiffe=None, dns=()), ca.ca_file)) == b"ping"


def test_a_certificate_signed_by_a_leaf_is_refused(jobs: SidecarProcess, ca: CertFactory, backend: Backend) -> None:
    # a real client's leaf (CA:FALSE) signs a certificate claiming an ID jobs/* admits, and the
    # client presents that certificate with the leaf as its "intermediate"
    frontend = ca.leaf("frontend")
    forged = pki.issue(frontend.issued, common_name="forged", spiffe_ids=[f"{TD}/jobs/forged"])
    assert forged.chain == (frontend.issued.cert,)
    cert, key = frontend.cert.parent / "forged.pem", frontend.cert.parent / "forged-key.pem"
    pki.write_issued(forged, cert, key)
    ctx = client_context(None, ca.ca_file)
    ctx.load_cert_chain(cert, key)
    assert refused(jobs.port("jobs"), ctx)
    [rec] = jobs.wait_access(1)
    assert rec["outcome"] == "tls_error" and rec["handshake_error"] == "bad_certificate", rec
    assert backend.accepts == 0


# -- extended key usage ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ekus", "why"),
    [
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], "anyExtendedKeyUsage alone"),
        ([ExtendedKeyUsageOID.SERVER_AUTH], "serverAuth only: not a client certificate"),
        ([ExtendedKeyUsageOID.CODE_SIGNING], "another purpose"),
    ],
)
def test_a_client_certificate_without_client_auth_is_refused_in_the_handshake(
    ekus: list[object], why: str, jobs: SidecarProcess, ca: CertFactory, backend: Backend
) -> None:
    # OpenSSL's purpose check (X509_PURPOSE_SSL_CLIENT) wants clientAuth when an EKU is present;
    # anyExtendedKeyUsage alone does not satisfy it, and the sidecar keeps that conservative answer.
    leaf = ca.leaf("eku", spiffe=f"{TD}/jobs/eku", extended_key_usages=ekus)
    assert refused(jobs.port("jobs"), client_context(leaf, ca.ca_file)), why
    [rec] = jobs.wait_access(1)
    assert rec["outcome"] == "tls_error", rec
    assert rec["handshake_error"] == "bad_certificate", rec  # X509_V_ERR_INVALID_PURPOSE
    assert rec["peer_identity"] is None  # no identity is taken from an unverified certificate
    assert backend.accepts == 0
    ok = ca.leaf("eku", spiffe=f"{TD}/jobs/eku", extended_key_usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert tls_exchange(jobs.port("jobs"), client_context(ok, ca.ca_file)) == b"ping"


# -- pinning ---------------------------------------------------------------------------------------


@pytest.fixture
def pinned(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> tuple[SidecarProcess, CertFiles]:
    """A listener whose allow is one client's pin, and that client."""
    client = ca.leaf("pinned")
    sc = inbound(tmp_path, ca, server_leaf, {"pinned": (backend.address, [pin(client)])})
    sidecars.append(sc)
    return sc, client


def test_a_pinned_key_is_allowed_inbound(pinned: tuple[SidecarProcess, CertFiles], ca: CertFactory) -> None:
    sc, client = pinned
    assert tls_exchange(sc.port("pinned"), client_context(client, ca.ca_file)) == b"ping"


def test_a_pin_admits_no_other_key_with_the_same_names(
    pinned: tuple[SidecarProcess, CertFiles], ca: CertFactory, backend: Backend
) -> None:
    sc, _ = pinned
    twin = ca.leaf("pinned")  # same SPIFFE ID, CN and DNS name; another key
    assert refused(sc.port("pinned"), client_context(twin, ca.ca_file))
    [rec] = sc.wait_access(1)
    assert rec["outcome"] == "denied"
    assert backend.accepts == 0


@pytest.fixture
def upstream(ca: CertFactory) -> Iterator[tuple[TLSServer, CertFiles]]:
    leaf = ca.leaf("billing")
    server = TLSServer(leaf, ca.ca_file)
    yield server, leaf
    server.close()


def outbound(folder: Path, ca: CertFactory, upstream: TLSServer, server_identity: list[str]) -> SidecarProcess:
    cfg = write_config(
        folder / "out.yaml",
        {
            "tls": tls_section(ca.leaf("frontend"), ca.ca_file),
            "outbound": [
                {
                    "name": "billing",
                    "listen": "127.0.0.1:0",
                    "upstream": upstream.address,
                    "server_identity": server_identity,
                }
            ],
        },
    )
    return start_sidecar(cfg)


def app_call(sc: SidecarProcess, payload: bytes = b"ping") -> bytes:
    with plain_connect(sc.port("billing")) as s:
        s.sendall(payload)
        return recv_exactly(s, len(payload))


def test_a_pinned_upstream_gets_the_apps_bytes(
    tmp_path: Path, ca: CertFactory, upstream: tuple[TLSServer, CertFiles], sidecars: list[SidecarProcess]
) -> None:
    server, leaf = upstream
    sc = outbound(tmp_path, ca, server, [pin(leaf)])
    sidecars.append(sc)
    assert app_call(sc) == b"ping"


def test_an_upstream_with_another_key_gets_none_of_the_apps_bytes(
    tmp_path: Path, ca: CertFactory, upstream: tuple[TLSServer, CertFiles], sidecars: list[SidecarProcess]
) -> None:
    server, _ = upstream
    sc = outbound(tmp_path, ca, server, [pin(ca.leaf("billing"))])  # the right names, another key
    sidecars.append(sc)
    assert app_call(sc, b"secret") == b""
    [rec] = sc.wait_access(1)
    assert rec["outcome"] == "denied"
    assert server.plaintext() == b""


# -- sessions and listeners ------------------------------------------------------------------------


@pytest.fixture
def two_listeners(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, sidecars: list[SidecarProcess]
) -> Iterator[tuple[SidecarProcess, Backend, Backend]]:
    """Listener ``a`` allows frontend and stranger; listener ``b`` allows frontend only."""
    a, b = Backend(), Backend()
    sc = inbound(
        tmp_path,
        ca,
        server_leaf,
        {"a": (a.address, [f"{TD}/frontend", f"{TD}/stranger"]), "b": (b.address, [f"{TD}/frontend"])},
    )
    sidecars.append(sc)
    yield sc, a, b
    a.close()
    b.close()


def test_a_session_from_one_listener_never_admits_a_peer_the_other_refuses(
    two_listeners: tuple[SidecarProcess, Backend, Backend], ca: CertFactory
) -> None:
    sc, a, b = two_listeners
    stranger = client_context(ca.leaf("stranger"), ca.ca_file)
    answer, session, _ = tls_call(sc.port("a"), stranger)
    assert answer == b"ping" and session is not None and session.has_ticket
    answer, _, _ = tls_call(sc.port("b"), stranger, session)
    assert answer == b""
    records = sc.wait_access(2)
    assert [(r["listener"], r["outcome"]) for r in records] == [("a", "ok"), ("b", "denied")]
    assert (a.accepts, b.accepts) == (1, 0)


def test_a_session_from_one_listener_is_not_resumed_on_another(
    two_listeners: tuple[SidecarProcess, Backend, Backend], ca: CertFactory
) -> None:
    sc, _, _ = two_listeners
    frontend = client_context(ca.leaf("frontend"), ca.ca_file)
    _, session, _ = tls_call(sc.port("a"), frontend)
    assert session is not None and session.has_ticket
    _, again, reused = tls_call(sc.port("a"), frontend, session)
    assert reused  # the ticket is good where it was issued
    answer, _, reused = tls_call(sc.port("b"), frontend, again)
    assert answer == b"ping"  # b allows frontend: a full handshake, then through
    records = sc.wait_access(3)
    assert [(r["listener"], r["resumed"]) for r in records] == [("a", False), ("a", True), ("b", False)]
    assert not reused


# -- what a denial says ----------------------------------------------------------------------------


def test_the_denial_names_the_listeners_patterns(jobs: SidecarProcess, ca: CertFactory) -> None:
    intruder = ca.leaf("intruder")
    assert refused(jobs.port("jobs"), client_context(intruder, ca.ca_file))
    [rec] = jobs.wait_access(1)
    assert rec["peer_identity"] == f"{TD}/intruder"
    said = json.dumps({k: v for k, v in rec.items() if k != "peer_identity"})
    for pattern in (f"{TD}/jobs/*", f"{TD}/jobs/**"):
        assert pattern in said, said
