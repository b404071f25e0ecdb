"""TLS 1.3 session resumption: cheaper handshakes, never weaker checks.

A resumed peer is still held to ``allow`` / ``server_identity``; a reload of the TLS material makes
every earlier ticket and cached session useless; cached sessions expire; it can be turned off.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    TD,
    Backend,
    CertFactory,
    CertFiles,
    SidecarProcess,
    client_context,
    plain_connect,
    recv_exactly,
    start_sidecar,
    tls_call,
    tls_section,
    wait_for,
    write_config,
)

from sidecar import pki


def inbound_config(
    path: Path, leaf: CertFiles, ca: CertFactory, backend: Backend, workers: int = 1, **tls: Any
) -> Path:
    return write_config(
        path,
        {
            "tls": {**tls_section(leaf, ca.ca_file), **tls},
            "inbound": [
                {"name": "orders", "listen": "127.0.0.1:0", "forward": backend.address, "allow": [f"{TD}/frontend"]}
            ],
            "workers": workers,
        },
    )


def outbound_config(path: Path, leaf: CertFiles, ca: CertFactory, upstream_port: int, **tls: Any) -> Path:
    return write_config(
        path,
        {
            "tls": {**tls_section(leaf, ca.ca_file), **tls},
            "outbound": [
                {
                    "name": "orders",
                    "listen": "127.0.0.1:0",
                    "upstream": f"127.0.0.1:{upstream_port}",
                    "server_identity": [f"{TD}/orders"],
                }
            ],
        },
    )


def app_call(port: int, payload: bytes = b"ping") -> bytes:
    with plain_connect(port) as s:
        s.sendall(payload)
        return recv_exactly(s, len(payload))


def resumed_flags(sc: SidecarProcess, n: int) -> list[bool]:
    return [r["resumed"] for r in sc.wait_access(n)]


@pytest.fixture
def pair(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> tuple[SidecarProcess, SidecarProcess]:
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend))
    sidecars.append(inbound)
    outbound = start_sidecar(outbound_config(tmp_path / "out.yaml", ca.leaf("frontend"), ca, inbound.port("orders")))
    sidecars.append(outbound)
    return inbound, outbound


def test_the_pair_resumes_after_the_first_handshake(pair: tuple[SidecarProcess, SidecarProcess]) -> None:
    inbound, outbound = pair
    for i in range(3):
        assert app_call(outbound.port("orders"), b"call %d" % i) == b"call %d" % i
        outbound.wait_access(i + 1)
    assert resumed_flags(outbound, 3) == [False, True, True]
    assert resumed_flags(inbound, 3) == [False, True, True]
    assert {r["peer_identity"] for r in inbound.access()} == {f"{TD}/frontend"}
    assert {r["peer_identity"] for r in outbound.access()} == {f"{TD}/orders"}


def test_a_resumed_peer_is_still_held_to_allow(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend))
    sidecars.append(inbound)
    stranger = client_context(ca.leaf("stranger"), ca.ca_file)
    answer, session, _ = tls_call(inbound.port("orders"), stranger)
    assert answer == b""
    assert session is not None and session.has_ticket  # the ticket came with the (denied) handshake
    answer, _, reused = tls_call(inbound.port("orders"), stranger, session)
    assert reused and answer == b""
    records = inbound.wait_access(2)
    assert [(r["outcome"], r["resumed"]) for r in records] == [("denied", False), ("denied", True)]
    assert backend.accepts == 0


def test_inbound_reload_invalidates_every_ticket(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend))
    sidecars.append(inbound)
    frontend = client_context(ca.leaf("frontend"), ca.ca_file)
    _, session, _ = tls_call(inbound.port("orders"), frontend)
    answer, _, reused = tls_call(inbound.port("orders"), frontend, session)
    assert answer == b"ping" and reused
    inbound.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("msg") == "certificates reloaded" for r in inbound.logs()))
    answer, _, reused = tls_call(inbound.port("orders"), frontend, session)
    assert answer == b"ping" and not reused
    assert resumed_flags(inbound, 3) == [False, True, False]


def test_every_worker_opens_every_workers_tickets_until_a_reload(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    """With workers, a ticket must not depend on which worker the kernel picks (shared keys), and a
    reload must void it in every worker."""
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend, workers=2))
    sidecars.append(inbound)
    frontend = client_context(ca.leaf("frontend"), ca.ca_file)
    _, session, _ = tls_call(inbound.port("orders"), frontend)
    calls = 20  # with keys per worker about half would fall back to a full handshake
    for _ in range(calls):
        answer, _, reused = tls_call(inbound.port("orders"), frontend, session)
        assert answer == b"ping" and reused
    records = inbound.wait_access(calls + 1)
    assert {r["worker"] for r in records[1:]} == {0, 1}  # both workers took some
    assert not any(r.get("msg", "").startswith("cannot share session-ticket keys") for r in inbound.logs())
    inbound.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("msg") == "certificates reloaded" for r in inbound.logs()))
    for _ in range(4):
        answer, _, reused = tls_call(inbound.port("orders"), frontend, session)
        assert answer == b"ping" and not reused


def test_outbound_reload_drops_the_cached_session(pair: tuple[SidecarProcess, SidecarProcess]) -> None:
    _, outbound = pair
    port = outbound.port("orders")
    for i in range(2):
        app_call(port)
        outbound.wait_access(i + 1)
    outbound.signal(signal.SIGHUP)
    wait_for(lambda: any(r.get("msg") == "certificates reloaded" for r in outbound.logs()))
    app_call(port)
    assert resumed_flags(outbound, 3) == [False, True, False]


def test_an_upstream_that_changed_identity_is_refused_not_resumed(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    folder = tmp_path / "orders"
    orders = ca.leaf("orders", folder=folder)
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", orders, ca, backend))
    sidecars.append(inbound)
    outbound = start_sidecar(outbound_config(tmp_path / "out.yaml", ca.leaf("frontend"), ca, inbound.port("orders")))
    sidecars.append(outbound)
    port = outbound.port("orders")
    for i in range(2):
        assert app_call(port) == b"ping"
        outbound.wait_access(i + 1)
    # the upstream now presents someone else: its new contexts cannot honour the old ticket
    imposter = pki.issue(ca.ca, common_name="imposter", spiffe_ids=[f"{TD}/imposter"], dns_names=["localhost"])
    pki.write_issued(imposter, orders.cert, orders.key)
    wait_for(lambda: any(r.get("msg") == "certificates reloaded" for r in inbound.logs()))
    assert app_call(port) == b""
    last = outbound.wait_access(3)[-1]
    assert (last["outcome"], last["resumed"], last["peer_identity"]) == ("denied", False, f"{TD}/imposter")
    assert last["bytes_to_upstream"] == 0
    upstream_side = inbound.wait_access(3)[-1]  # the upstream sidecar saw the connection, not the app's bytes
    assert upstream_side["bytes_to_upstream"] == 0


def test_cached_sessions_expire(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    inbound = start_sidecar(inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend))
    sidecars.append(inbound)
    outbound = start_sidecar(
        outbound_config(tmp_path / "out.yaml", ca.leaf("frontend"), ca, inbound.port("orders"), session_lifetime="2s")
    )
    sidecars.append(outbound)
    port = outbound.port("orders")
    # OpenSSL dates a session in whole seconds, so its age reads up to 1 s high: a lifetime of 2 s
    # keeps the second call inside it whatever the clock's fraction, and 2.2 s later it is over
    for i in range(2):
        app_call(port)
        outbound.wait_access(i + 1)
    time.sleep(2.2)
    app_call(port)
    assert resumed_flags(outbound, 3) == [False, True, False]


def test_resumption_can_be_turned_off(
    tmp_path: Path, ca: CertFactory, backend: Backend, sidecars: list[SidecarProcess]
) -> None:
    inbound = start_sidecar(
        inbound_config(tmp_path / "in.yaml", ca.leaf("orders"), ca, backend, session_resumption=False)
    )
    sidecars.append(inbound)
    frontend = client_context(ca.leaf("frontend"), ca.ca_file)
    _, session, _ = tls_call(inbound.port("orders"), frontend)
    assert session is None or not session.has_ticket  # no ticket is issued at all
    outbound = start_sidecar(
        outbound_config(
            tmp_path / "out.yaml", ca.leaf("frontend"), ca, inbound.port("orders"), session_resumption=False
        )
    )
    sidecars.append(outbound)
    for i in range(3):
        assert app_call(outbound.port("orders")) == b"ping"
        outbound.wait_access(i + 1)
    assert resumed_flags(outbound, 3) == [False, False, False]
