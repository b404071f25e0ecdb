"""Inbound: only verified, allowed peers reach the app; every refusal is counted and logged."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from support import (
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    plain_connect,
    refused,
    start_sidecar,
    tls_connect,
    tls_exchange,
    tls_section,
    write_config,
)


@pytest.fixture
def inbound(
    tmp_path: Path, ca: CertFactory, server_leaf: CertFiles, backend: Backend, sidecars: list[SidecarProcess]
) -> SidecarProcess:
    cfg = write_config(
        tmp_path / "in.yaml",
        {
            "tls": tls_section(server_leaf, ca.ca_file),
            "inbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "forward": backend.address,
                    "allow": ["spiffe://mesh.local/frontend", "spiffe://mesh.local/jobs/*"],
                }
            ],
            "limits": {"handshake_timeout": "1s"},
        },
    )
    sc = start_sidecar(cfg)
    sidecars.append(sc)
    return sc


def assert_still_serving(sc: SidecarProcess, ca: CertFactory, client_leaf: CertFiles) -> None:
    assert tls_exchange(sc.port("orders"), client_context(client_leaf, ca.ca_file), b"still here") == b"still here"


def test_allowed_peer_gets_through_on_tls13(
    inbound: SidecarProcess, ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    with tls_connect(inbound.port("orders"), client_context(client_leaf, ca.ca_file)) as s:
        assert s.version() == "TLSv1.3"
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
    assert backend.accepts == 1
    [rec] = inbound.wait_access(1)
    assert rec["outcome"] == "ok"
    assert rec["peer_identity"] == "spiffe://mesh.local/frontend"
    assert rec["tls_version"] == "TLSv1.3"
    assert rec["bytes_to_upstream"] == 5 and rec["bytes_to_downstream"] == 5


def test_wildcard_pattern_allows_one_segment(inbound: SidecarProcess, ca: CertFactory, backend: Backend) -> None:
    one = ca.leaf("one", spiffe="spiffe://mesh.local/jobs/nightly")
    two = ca.leaf("two", spiffe="spiffe://mesh.local/jobs/nightly/extra")
    assert tls_exchange(inbound.port("orders"), client_context(one, ca.ca_file)) == b"ping"
    assert refused(inbound.port("orders"), client_context(two, ca.ca_file))
    assert backend.accepts == 1


def _refusal_case(name: str, ca: CertFactory, rogue_ca: CertFactory) -> tuple[ssl.SSLContext | None, bytes | None, str]:
    """(client context or None for raw bytes, raw bytes to send, expected handshake failure reason)."""
    if name == "no_client_cert":
        return client_context(None, ca.ca_file), None, "no_client_cert"
    if name == "unknown_ca":
        return client_context(rogue_ca.leaf("frontend"), ca.ca_file), None, "untrusted"
    if name == "expired":
        return client_context(ca.expired("frontend"), ca.ca_file), None, "expired"
    if name == "not_yet_valid":
        return client_context(ca.not_yet_valid("frontend"), ca.ca_file), None, "not_yet_valid"
    if name == "tls12":
        return client_context(ca.leaf("frontend"), ca.ca_file, tls12=True), None, "protocol_version"
    if name == "plaintext":
        return None, b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n", "protocol"
    if name == "garbage":
        # random bytes behind a header OpenSSL can never take for a record it should wait for: a
        # random 0x16 first byte, or any type with 0x03 next (a TLS version) and a length over
        # what was sent, made it wait for the rest until handshake_timeout; 0xff 0xff 0xff is
        # neither a TLS version nor an SSLv2 ClientHello, so it is refused at once, every time
        return None, b"\xff\xff\xff" + os.urandom(4093), "protocol"
    raise AssertionError(name)


@pytest.mark.parametrize(
    "case", ["no_client_cert", "unknown_ca", "expired", "not_yet_valid", "tls12", "plaintext", "garbage"]
)
def test_bad_peer_is_refused_counted_and_never_reaches_the_app(
    case: str,
    inbound: SidecarProcess,
    ca: CertFactory,
    rogue_ca: CertFactory,
    client_leaf: CertFiles,
    backend: Backend,
) -> None:
    ctx, raw, reason = _refusal_case(case, ca, rogue_ca)
    port = inbound.port("orders")
    if ctx is not None:
        assert refused(port, ctx)
    else:
        with plain_connect(port) as s:
            assert raw is not None
            s.sendall(raw)
            s.settimeout(10)
            try:
                answer = s.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert b"hello" not in answer and b"HTTP/1.1 200" not in answer
    [rec] = inbound.wait_access(1)
    assert rec["outcome"] == "tls_error", rec
    assert backend.accepts == 0
    assert_still_serving(inbound, ca, client_leaf)
    assert backend.accepts == 1
    failures = [r for r in inbound.logs() if r.get("logger") == "sidecar.access" and r.get("outcome") == "tls_error"]
    assert len(failures) == 1
    assert failures[0]["handshake_error"] == reason


def test_identity_not_in_allow_is_denied(
    inbound: SidecarProcess, ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    stranger = ca.leaf("stranger")
    assert refused(inbound.port("orders"), client_context(stranger, ca.ca_file))
    [rec] = inbound.wait_access(1)
    assert rec["outcome"] == "denied"
    assert rec["peer_identity"] == "spiffe://mesh.local/stranger"
    assert backend.accepts == 0
    assert_still_serving(inbound, ca, client_leaf)


def test_silent_client_is_closed_after_handshake_timeout(
    inbound: SidecarProcess, ca: CertFactory, client_leaf: CertFiles, backend: Backend
) -> None:
    with plain_connect(inbound.port("orders")) as s:
        s.settimeout(10)
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
        assert time.monotonic() - started < 8  # handshake_timeout is 1s; generous liveness bound
    [rec] = inbound.wait_access(1)
    assert rec["outcome"] == "timeout"
    assert rec["handshake_error"] == "timeout"
    assert backend.accepts == 0
    assert_still_serving(inbound, ca, client_leaf)


def test_raw_socket_helper_is_real() -> None:
    # guards the helpers above: a closed port really refuses
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(OSError):
        plain_connect(port, timeout=2)
